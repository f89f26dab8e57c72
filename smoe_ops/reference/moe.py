"""Reference MoE layer in the usual per-expert loop style (index_select, expert MLP,
index_add): the specification of `smoe_ops.moe_ffn` and the baseline it is measured against."""

import torch

from smoe_ops.reference.activation import swiglu
from smoe_ops.reference.routing import route, router_losses


def moe_ffn(x, router_weight, w_in, w_out, k, activation="swiglu", **route_options):
    """Same contract as `smoe_ops.moe_ffn`; one Python iteration per expert."""
    if activation != "swiglu":
        raise ValueError(f"moe_ffn: activation must be 'swiglu', got {activation!r}")
    logits = x @ router_weight
    routing = route(logits, k, **route_options)
    aux = router_losses(logits, routing)

    # Accumulate in float32 (float64 for float64 inputs), round once, as the kernels do.
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    for expert in range(router_weight.shape[1]):
        token_idx, slot = torch.where(routing.ids == expert)
        if token_idx.numel() == 0:
            continue
        tokens = x.index_select(0, token_idx)
        out = swiglu(tokens @ w_in[expert]) @ w_out[expert]
        weight = routing.weights[token_idx, slot].unsqueeze(1)
        y = y.index_add(0, token_idx, out.to(acc_dtype) * weight.to(acc_dtype))
    return y.to(x.dtype), aux
