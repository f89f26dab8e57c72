"""Expert parallelism: the sparse MoE FFN with its experts sharded across a process group.

With a group of G ranks and E experts (E divisible by G), rank r owns the E_local = E / G
experts [r E_local, (r + 1) E_local) and holds only their weights; the router is replicated.
Every rank routes its own tokens over all E experts, then

1. dispatch + permute put its T k rows in global expert order, so the rows bound for rank j
   are one contiguous block (experts of j are contiguous ids);
2. the per-expert row counts go to their owners with all_to_all_single: rank r learns, for
   every source rank s, how many rows of each of its experts s sends ([G, E_local]);
3. the rows themselves travel with all_to_all_single; they arrive grouped by source rank,
   and a local dispatch (key = local expert) regroups them by expert, stably, so within an
   expert the rows keep (source rank, source order);
4. grouped_mm -> swiglu -> grouped_mm run the local experts on exactly their rows;
5. the local regrouping is undone, the rows travel back with the split sizes swapped, and
   unpermute combines each token's k rows with its routing weights.

Backward mirrors it: `_AllToAll` wraps torch.distributed.all_to_all_single in an
autograd.Function whose backward is the reverse exchange (torch.distributed.nn.functional
has one too, deprecated as of torch 2.13 and warning on every call), and every other step
is one of our ops with its own autograd formula. Gradients of the local expert weights
collect the rows of every rank; the router gradient on a rank covers only its own tokens
(replicated parameters are reduced by the data-parallel wrapper, e.g. DDP).

Host sync: all_to_all_single takes its split sizes as host integers, so each forward reads
the [E] counts and the exchanged [G, E_local] counts back to the host (one device-to-host
copy and one small collective before the row exchange; backward reuses the sizes). This
is the one place in smoe_ops that syncs; the single-process moe_ffn does not.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from smoe_ops.ops.dispatch import dispatch, permute, unpermute
from smoe_ops.ops.moe import check_moe_shapes, expert_ffn
from smoe_ops.ops.routing import RouterLosses, route, router_losses

__all__ = ["expert_parallel_moe_ffn", "local_expert_range"]


def local_expert_range(num_experts: int, group: Optional[dist.ProcessGroup]) -> range:
    """The global ids of the experts this rank owns in `group`: [r E/G, (r + 1) E/G).

    Raises ValueError when E is not divisible by the group size G.
    """
    world = dist.get_world_size(group)
    if num_experts % world:
        raise ValueError(
            f"expert parallel: num_experts={num_experts} must be divisible by the process "
            f"group size {world} (each rank owns num_experts / group size experts)"
        )
    per_rank = num_experts // world
    rank = dist.get_rank(group)
    return range(rank * per_rank, (rank + 1) * per_rank)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows [N, H] with host split sizes; backward sends the gradient
    rows back the way they came (the same exchange with the split sizes swapped)."""

    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.send_sizes, ctx.recv_sizes, ctx.group = send_sizes, recv_sizes, group
        out = rows.new_empty(sum(recv_sizes), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_rows = _AllToAll.apply(grad_out, ctx.recv_sizes, ctx.send_sizes, ctx.group)
        return grad_rows, None, None, None


def _exchange_counts(expert_counts: torch.Tensor, world: int, group) -> torch.Tensor:
    """[G, E_local] rows that each source rank sends to each of this rank's experts, from
    this rank's [E] counts (all_to_all_single with E_local counts per destination)."""
    received = torch.empty_like(expert_counts)
    dist.all_to_all_single(received, expert_counts, group=group)
    return received.view(world, -1)


def expert_parallel_moe_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    k: int,
    group: Optional[dist.ProcessGroup] = None,
    **route_options,
) -> Tuple[torch.Tensor, RouterLosses]:
    """`moe_ffn` with this rank's experts only; the other experts live on the other ranks.

    Every rank of `group` must call it (a collective), each with its own tokens.

    Args:
        x: [T, H] this rank's tokens (T may be 0 and may differ between ranks).
        router_weight: [H, E], replicated: the same on every rank.
        w_in: [E/G, H, 2I] and w_out: [E/G, I, H], the experts this rank owns
            (`local_expert_range`), in global id order.
        k: experts per token, 1 <= k <= E.
        group: the process group the experts are sharded over (None: the default group).
        route_options: as for `moe_ffn`.

    Returns:
        y [T, H] and the routing losses of this rank's tokens (a per-rank batch).
        Differentiable w.r.t. x, router_weight, w_in and w_out; on every rank the
        result equals the single-process moe_ffn on these tokens with the full weights.
    """
    world = dist.get_world_size(group)
    check_moe_shapes(x, router_weight, w_in, w_out, k, "swiglu",
                     caller="expert_parallel_moe_ffn", group_size=world)
    num_experts, per_rank = router_weight.shape[1], w_in.shape[0]

    # Route locally over all E experts; group the T k rows by global expert.
    logits = x @ router_weight
    routing = route(logits, k, **route_options)
    aux = router_losses(logits, routing)
    plan = dispatch(routing.ids, num_experts)
    rows = permute(x, plan)

    # Counts first (host sync: the split sizes must be host integers), then the rows.
    expert_counts = plan.offsets.diff()
    received_counts = _exchange_counts(expert_counts, world, group)
    send_sizes = expert_counts.view(world, per_rank).sum(1).tolist()
    recv_sizes = received_counts.sum(1).tolist()
    arrived = _AllToAll.apply(rows, send_sizes, recv_sizes, group)

    # Regroup the arrivals by local expert: a stable dispatch with one slot per row.
    local_ids = torch.arange(per_rank, dtype=torch.int32, device=x.device).repeat(world)
    local_ids = local_ids.repeat_interleave(received_counts.reshape(-1))
    local_plan = dispatch(local_ids[:, None], per_rank)
    local_rows = permute(arrived, local_plan)
    expert_out = expert_ffn(local_rows, w_in, w_out, local_plan.offsets)

    # Back to arrival order (unpermute with k = 1 and no weights is the inverse gather),
    # back to the source ranks, and the weighted combine.
    leaving = unpermute(expert_out, local_plan)
    returned = _AllToAll.apply(leaving, recv_sizes, send_sizes, group)
    return unpermute(returned, plan, routing.weights), aux
