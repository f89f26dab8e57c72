"""The whole sparse MoE feed-forward layer, composed from the fused ops."""

from typing import Optional, Tuple

import torch

from smoe_ops.ops.activation import swiglu
from smoe_ops.ops.dispatch import dispatch, permute, unpermute
from smoe_ops.ops.grouped_mm import grouped_mm
from smoe_ops.ops.routing import RouterLosses, route, router_losses

ACTIVATIONS = ("swiglu",)


def check_moe_shapes(x, router_weight, w_in, w_out, k, activation, caller: str = "moe_ffn",
                     group_size: Optional[int] = None) -> None:
    """Shape checks shared by moe_ffn, its reference and the expert-parallel layer; each
    names the argument. group_size: None when w_in and w_out hold all E experts, else the
    number of ranks the experts are sharded over (they hold E / group_size)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{caller}: activation must be one of {ACTIVATIONS}, got "
                         f"{activation!r}")
    if x.dim() != 2:
        raise ValueError(f"{caller}: x must be 2-D [T, H], got shape {list(x.shape)}")
    hidden = x.shape[1]
    if router_weight.dim() != 2 or router_weight.shape[0] != hidden:
        raise ValueError(
            f"{caller}: router_weight must be [H={hidden}, E], got shape "
            f"{list(router_weight.shape)}"
        )
    num_experts = held = router_weight.shape[1]
    held_text = f"E={num_experts}"
    if group_size is not None:
        if num_experts % group_size:
            raise ValueError(
                f"{caller}: num_experts={num_experts} must be divisible by the process "
                f"group size {group_size}"
            )
        held, held_text = num_experts // group_size, f"E/G={num_experts // group_size}"
    if w_in.dim() != 3 or w_in.shape[0] != held or w_in.shape[1] != hidden:
        whose = "" if group_size is None else "hold this rank's experts, "
        raise ValueError(
            f"{caller}: w_in must {whose}be [{held_text}, H={hidden}, 2I], got shape "
            f"{list(w_in.shape)}"
        )
    if w_in.shape[2] % 2:
        raise ValueError(f"{caller}: w_in.shape[2] must be even (2I), got {w_in.shape[2]}")
    ffn = w_in.shape[2] // 2
    if tuple(w_out.shape) != (held, ffn, hidden):
        raise ValueError(
            f"{caller}: w_out must be [{held_text}, I={ffn}, H={hidden}], got shape "
            f"{list(w_out.shape)}"
        )
    if not 1 <= k <= num_experts:
        raise ValueError(f"{caller}: k must be in [1, E={num_experts}], got {k}")


def expert_ffn(rows: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
    """The experts' SwiGLU FFN on [N, H] rows grouped by expert (offsets [E+1])."""
    return grouped_mm(swiglu(grouped_mm(rows, w_in, offsets)), w_out, offsets)


def moe_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    k: int,
    activation: str = "swiglu",
    **route_options,
) -> Tuple[torch.Tensor, RouterLosses]:
    """A sparse MoE FFN: route, dispatch, expert FFNs as grouped GEMMs, weighted combine.

    Args:
        x: [T, H] tokens.
        router_weight: [H, E]; logits = x @ router_weight.
        w_in: [E, H, 2I], the fused gate and up projections ([gate | up] along the last dim).
        w_out: [E, I, H], the down projection.
        k: experts per token, 1 <= k <= E.
        activation: "swiglu" (silu(gate) * up).
        route_options: forwarded to `smoe_ops.route` (score, renormalize, expert_bias,
            num_groups, topk_groups, scale); its defaults otherwise.

    Returns:
        y [T, H] in x's dtype, and the routing losses of `smoe_ops.router_losses`.
        Differentiable w.r.t. x, router_weight, w_in and w_out.
    """
    check_moe_shapes(x, router_weight, w_in, w_out, k, activation)
    logits = x @ router_weight
    routing = route(logits, k, **route_options)
    aux = router_losses(logits, routing)

    plan = dispatch(routing.ids, router_weight.shape[1])
    expert_out = expert_ffn(permute(x, plan), w_in, w_out, plan.offsets)
    return unpermute(expert_out, plan, routing.weights), aux
