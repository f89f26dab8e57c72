"""nn.Module wrappers over the fused ops."""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from smoe_ops.ops.expert_parallel import expert_parallel_moe_ffn, local_expert_range
from smoe_ops.ops.moe import moe_ffn
from smoe_ops.ops.routing import RouterLosses


class SparseMoE(nn.Module):
    """A sparse MoE SwiGLU feed-forward layer: each token goes to `k` of `num_experts` experts.

    forward(x [..., H]) -> (y [..., H], RouterLosses). Add the losses you want to the training
    loss (e.g. `0.01 * aux.balance + 1e-3 * aux.z`); the layer does not weigh them for you.

    Expert parallel: with `process_group` (a torch.distributed group of G ranks, E divisible
    by G), this rank holds only its experts `expert_range` = [r E/G, (r + 1) E/G): w_in is
    [E/G, H, 2I], w_out [E/G, I, H]; the router [H, E] is replicated. Every rank of the
    group must call forward together (it is a collective), each with its own tokens; rows
    travel to their experts' ranks and back with all_to_all_single
    (`smoe_ops.ops.expert_parallel`). The router must be equal on every rank: build the
    layer under the same seed on every rank (the initialization draws the full E experts
    and keeps this rank's slice, so a seed gives the single-process layer's weights), and
    reduce its gradient across ranks as for any replicated parameter (DDP does).
    aux then holds the routing losses of this rank's tokens.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        k: int,
        score: str = "softmax",
        expert_bias: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"SparseMoE: k must be in [1, num_experts={num_experts}], got {k}")
        factory = {"device": device, "dtype": dtype}
        self.process_group = process_group
        if process_group is None:
            self.expert_range = range(num_experts)
        else:
            self.expert_range = local_expert_range(num_experts, process_group)
        local_experts = len(self.expert_range)
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.num_experts, self.k, self.score = num_experts, k, score
        self.router_weight = nn.Parameter(torch.empty(hidden_size, num_experts, **factory))
        self.w_in = nn.Parameter(
            torch.empty(local_experts, hidden_size, 2 * ffn_size, **factory))
        self.w_out = nn.Parameter(torch.empty(local_experts, ffn_size, hidden_size, **factory))
        # Aux-loss-free balancing (DeepSeek-V3): a selection-only bias the trainer adjusts.
        bias = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.register_buffer("expert_bias", bias if expert_bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Fan-in scaled uniform init, as nn.Linear; a small router keeps early routing soft.
        nn.init.normal_(self.router_weight, std=0.02)
        bound_in, bound_out = 1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.ffn_size)
        if self.process_group is None:
            nn.init.uniform_(self.w_in, -bound_in, bound_in)
            nn.init.uniform_(self.w_out, -bound_out, bound_out)
            return
        # Draw all E experts and keep ours, so that a seed gives every rank the same router
        # and distinct experts, the single-process layer's. TODO: draw only the local
        # experts (a per-expert generator) once E H I floats no longer fit on one rank.
        local = slice(self.expert_range.start, self.expert_range.stop)
        with torch.no_grad():
            for weight, bound in ((self.w_in, bound_in), (self.w_out, bound_out)):
                full = weight.new_empty(self.num_experts, *weight.shape[1:])
                weight.copy_(nn.init.uniform_(full, -bound, bound)[local])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, RouterLosses]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SparseMoE: x.shape[-1] must be hidden_size={self.hidden_size}, "
                f"got shape {list(x.shape)}"
            )
        tokens = x.reshape(-1, self.hidden_size)
        if self.process_group is not None:
            y, aux = expert_parallel_moe_ffn(
                tokens, self.router_weight, self.w_in, self.w_out, self.k,
                group=self.process_group, score=self.score, expert_bias=self.expert_bias,
            )  # fmt: skip
            return y.reshape(x.shape), aux
        y, aux = moe_ffn(
            tokens, self.router_weight, self.w_in, self.w_out, self.k,
            score=self.score, expert_bias=self.expert_bias,
        )  # fmt: skip
        return y.reshape(x.shape), aux

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
            f"num_experts={self.num_experts}, k={self.k}, score={self.score!r}"
            + ("" if self.process_group is None else
               f", local experts [{self.expert_range.start}, {self.expert_range.stop})")
        )
