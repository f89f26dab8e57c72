"""`SparseMoERewardModel`: a router picks k of K linear reward heads for each pair.

Shapes: P pairs (or B examples), Dc context features, Dr response features, K experts,
k experts per pair. Expert e scores a response y as r_e(y) = w_e . y + b_e, with
w_e = learned_e + prior_scale * prior_e (prior_e a fixed random head, never trained).
The router maps the context to K logits and `smoe_ops.route` keeps the top k with weights
g renormalized over them, so a pair costs k heads, not K.
"""

import contextlib
from typing import Optional

import torch
from torch import nn

import smoe_ops
from smoe_ops.reference.routing import RouteResult

__all__ = ["SparseMoERewardModel", "dense", "single_head"]


class SparseMoERewardModel(nn.Module):
    """Sparse mixture of K linear reward experts on response features.

    Args:
        context_dim: Dc, features the router sees.
        response_dim: Dr, features the experts score.
        num_experts: K >= 1.
        k: experts per pair, 1 <= k <= K (k = K: the dense MoE).
        router_hidden: None for a linear router, else the width of a one-hidden-layer
            GELU MLP router.
        prior_scale: weight of the fixed random prior head added to each expert (0: none).
        score: "softmax" or "sigmoid", passed to `smoe_ops.route`.
        seed: seeds the initial weights and the prior heads (None: the global generator).
        num_users: None, or U to give every user id in [0, U) its own learned routing
            logits (the user-level mixture: all of a user's pairs share one routing).
    """

    def __init__(
        self,
        context_dim: int,
        response_dim: int,
        num_experts: int = 8,
        k: int = 2,
        router_hidden: Optional[int] = None,
        prior_scale: float = 0.0,
        score: str = "softmax",
        seed: Optional[int] = 0,
        num_users: Optional[int] = None,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"SparseMoERewardModel: k must be in [1, num_experts={num_experts}], got {k}"
            )
        if context_dim < 1 or response_dim < 1:
            raise ValueError(
                "SparseMoERewardModel: context_dim and response_dim must be >= 1, got "
                f"{context_dim} and {response_dim}"
            )
        if score not in ("softmax", "sigmoid"):
            raise ValueError(
                f"SparseMoERewardModel: score must be 'softmax' or 'sigmoid', got {score!r}"
            )
        self.config = dict(
            context_dim=context_dim,
            response_dim=response_dim,
            num_experts=num_experts,
            k=k,
            router_hidden=router_hidden,
            prior_scale=float(prior_scale),
            score=score,
            num_users=num_users,
        )
        fork = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
        with fork:
            if seed is not None:
                torch.manual_seed(seed)
            if router_hidden is None:
                self.router = nn.Linear(context_dim, num_experts)
            else:
                self.router = nn.Sequential(
                    nn.Linear(context_dim, router_hidden),
                    nn.GELU(),
                    nn.Linear(router_hidden, num_experts),
                )
            # Distinct random heads break the symmetry between experts; small enough that
            # the initial margins are near 0 and no expert starts out confident.
            scale = 0.1 / response_dim**0.5
            self.expert_weight = nn.Parameter(torch.randn(num_experts, response_dim) * scale)
            self.expert_bias = nn.Parameter(torch.zeros(num_experts))
            prior = torch.randn(num_experts, response_dim) / response_dim**0.5
            if num_users is not None:
                # Small random logits: users start near uniform but not tied.
                self.user_logits = nn.Parameter(0.01 * torch.randn(num_users, num_experts))
        self.register_buffer("prior_weight", prior)

    @property
    def num_experts(self) -> int:
        return self.config["num_experts"]

    @property
    def k(self) -> int:
        return self.config["k"]

    def head_weights(self) -> torch.Tensor:
        """[K, Dr] the effective expert weight vectors (learned + scaled prior)."""
        if self.config["prior_scale"] == 0.0:
            return self.expert_weight
        return self.expert_weight + self.config["prior_scale"] * self.prior_weight

    def route(self, context: torch.Tensor):
        """Route [P, Dc] contexts: (RouteResult with weights [P, k], ids [P, k] int32,
        counts [K]; router logits [P, K] float32)."""
        logits = self.router(context)
        return smoe_ops.route(logits, self.k, score=self.config["score"]), logits

    def expert_margins(self, context: torch.Tensor, chosen: torch.Tensor,
                       rejected: torch.Tensor):
        """Margins r_e(chosen) - r_e(rejected) of the k routed experts of every pair.

        Args: context [P, Dc], chosen [P, Dr], rejected [P, Dr], float32.
        Returns: (RouteResult, logits [P, K], margins [P, k] float32, column j for
        expert ids[:, j]). The biases cancel in a margin.
        """
        routing, logits = self.route(context)
        heads = _rows(self.head_weights(), routing.ids)  # [P, k, Dr]: only the routed heads
        margins = torch.einsum("pjd,pd->pj", heads, chosen - rejected)
        return routing, logits, margins

    def user_expert_margins(self, pair_users: torch.Tensor, chosen: torch.Tensor,
                            rejected: torch.Tensor):
        """Margins for the user-level mixture: each pair uses its user's k experts.

        Args: pair_users [P] int64 user ids in [0, num_users), chosen / rejected [P, Dr].
        Returns: (RouteResult of the U distinct users, in increasing id order; their logits
        [U, K]; margins [P, k] under the experts of routing.ids[rows]; rows [P] int64, the
        row of each pair's user).
        """
        num_users = self.config["num_users"]
        if num_users is None:
            raise ValueError("user_expert_margins: the model was built without num_users")
        if len(pair_users) and (pair_users.min() < 0 or pair_users.max() >= num_users):
            raise ValueError(
                f"user_expert_margins: user ids must be in [0, {num_users}), got "
                f"[{int(pair_users.min())}, {int(pair_users.max())}]"
            )
        users, rows = torch.unique(pair_users, return_inverse=True)
        logits = self.user_logits[users]
        routing = smoe_ops.route(logits, self.k, score=self.config["score"])
        heads = _rows(self.head_weights(), routing.ids[rows])  # [P, k, Dr]
        margins = torch.einsum("pjd,pd->pj", heads, chosen - rejected)
        return routing, logits, margins, rows

    def expert_rewards(self, response: torch.Tensor, routing: RouteResult) -> torch.Tensor:
        """[B, k] reward of each routed expert for the [B, Dr] responses."""
        heads = _rows(self.head_weights(), routing.ids)
        return (torch.einsum("bjd,bd->bj", heads, response)
                + _rows(self.expert_bias[:, None], routing.ids)[..., 0])

    def reward(self, context: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """[B] population reward sum_j g_j r_{ids_j}(response) for [B, Dc] contexts and
        [B, Dr] responses."""
        if context.shape[0] != response.shape[0]:
            raise ValueError(
                f"reward: context has {context.shape[0]} rows but response has "
                f"{response.shape[0]}; expected one response per context"
            )
        routing, _logits = self.route(context)
        return (routing.weights * self.expert_rewards(response, routing)).sum(1)

    def forward(self, context: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        return self.reward(context, response)


def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for [K, D] table and [P, k] ids -> [P, k, D]. index_select, because the
    backward of table[ids] (index_put_ with accumulate) adds rows in a thread-dependent
    order on the CPU, so two identical trainings could differ in the last bits; the
    backward of index_select (index_add_) does not."""
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])


def single_head(context_dim: int, response_dim: int, **kwargs) -> SparseMoERewardModel:
    """The single-head Bradley-Terry baseline: K = 1, k = 1 (the router is inert)."""
    return SparseMoERewardModel(context_dim, response_dim, num_experts=1, k=1, **kwargs)


def dense(context_dim: int, response_dim: int, num_experts: int = 8,
          **kwargs) -> SparseMoERewardModel:
    """The dense MoE baseline: every pair uses all K experts (k = K)."""
    return SparseMoERewardModel(context_dim, response_dim, num_experts=num_experts,
                                k=num_experts, **kwargs)
