"""`SparseMoERewardModel`: a router picks k of K reward experts for each pair.

Shapes: P pairs (or B examples), Dc context features, Dr response features, K experts,
k experts per pair, H hidden units per MLP expert. The router maps the context to K logits
and `smoe_ops.route` keeps the top k with weights g renormalized over them, so a pair
costs k experts, not K. Two kinds of expert score a response y:

- linear (expert_hidden=None): r_e(y) = w_e . y + b_e, with w_e = learned_e +
  prior_scale * prior_e (prior_e a fixed random head, never trained);
- MLP (expert_hidden=H): r_e(y) = w_out_e . gelu(W_in_e^T y + b_in_e) + b_e +
  prior_scale * q_e(y), q_e a fixed random MLP of the same shape (never trained).
  Only the routed (pair, expert) rows are computed: `smoe_ops.dispatch` groups them by
  expert, `smoe_ops.permute` gathers the responses, and two `smoe_ops.grouped_mm` calls
  with a GELU between them run all K experts at once on their own rows.
"""

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import smoe_ops
from smoe_ops.reference.routing import RouteResult

__all__ = ["SparseMoERewardModel", "dense", "single_head"]

# Linear experts score responses with one [B, Dr] x [Dr, K] product (the router's shape)
# while K <= this many times k: gathering k heads per row instead copies B k Dr floats,
# a cost that does not fall with K, while the product's grows with K; on one core at
# B = 4096, Dr = 384, k = 2 the two crossed between K = 64 and K = 256.
_DENSE_LINEAR_MAX_RATIO = 64


class SparseMoERewardModel(nn.Module):
    """Sparse mixture of K reward experts (linear or one-hidden-layer MLP) on response
    features.

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
        expert_hidden: None for linear experts (parameters expert_weight [K, Dr],
            expert_bias [K]; buffer prior_weight [K, Dr]), else H >= 1 for MLP experts
            with parameters expert_w_in [K, Dr, H], expert_b_in [K, H], expert_w_out
            [K, H, 1], expert_bias [K] (the output bias), in the layouts `grouped_mm`
            reads, and, only when prior_scale > 0, the fixed prior MLP as buffers
            prior_w_in [K, Dr, H], prior_b_in [K, H], prior_w_out [K, H, 1].
        router_prior: with num_users only. False: a user outside the training set starts
            from the training users' mean routing, the same for every context. True: it
            starts from router(context), a prior over the experts that depends on who the
            user is (e.g. rater covariates), fitted after training by
            `smoe_ops.reward.train.fit_router_prior`.

    The MLP experts use GELU: near 0 it is 0.5 z + O(z^2), so a freshly built MLP expert
    starts close to a linear one (the kind of reward the linear model already fits) and
    bends where the data asks, with smooth gradients (no dead units as with ReLU, and
    float64 gradcheck holds). SwiGLU would double the first layer ([K, Dr, 2H]) for the
    same H, and silu(a) * b starts out quadratic, its gradients a product of two small
    terms at init.
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
        expert_hidden: Optional[int] = None,
        router_prior: bool = False,
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
        if router_prior and num_users is None:
            raise ValueError(
                "SparseMoERewardModel: router_prior=True needs num_users (a context-routed "
                "model's router is already its population routing), got num_users=None"
            )
        if score not in ("softmax", "sigmoid"):
            raise ValueError(
                f"SparseMoERewardModel: score must be 'softmax' or 'sigmoid', got {score!r}"
            )
        if expert_hidden is not None and (
            isinstance(expert_hidden, bool) or not isinstance(expert_hidden, int)
            or expert_hidden < 1
        ):
            raise ValueError(
                "SparseMoERewardModel: expert_hidden must be None (linear experts) or an "
                f"int >= 1, got {expert_hidden!r}"
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
            expert_hidden=expert_hidden,
            router_prior=bool(router_prior),
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
            # The linear branch draws exactly what it drew before expert_hidden existed, in
            # the same order, so a seed still gives bit-identical linear models.
            if expert_hidden is None:
                # Distinct random heads break the symmetry between experts; small enough
                # that the initial margins are near 0 and no expert starts out confident.
                scale = 0.1 / response_dim**0.5
                self.expert_weight = nn.Parameter(
                    torch.randn(num_experts, response_dim) * scale)
                self.expert_bias = nn.Parameter(torch.zeros(num_experts))
                prior = torch.randn(num_experts, response_dim) / response_dim**0.5
            else:
                self._init_mlp_experts(num_experts, response_dim, expert_hidden)
            if num_users is not None:
                # Small random logits: users start near uniform but not tied.
                self.user_logits = nn.Parameter(0.01 * torch.randn(num_users, num_experts))
            if expert_hidden is not None and prior_scale != 0.0:
                # Drawn last: the learned weights and user logits of a seed do not depend
                # on prior_scale, so prior ablations start from the same learned init.
                self._init_mlp_prior(num_experts, response_dim, expert_hidden)
        if expert_hidden is None:
            self.register_buffer("prior_weight", prior)

    def _init_mlp_experts(self, num_experts: int, response_dim: int, hidden: int) -> None:
        # Unit-variance columns put the pre-activations of unit-scale responses at O(1),
        # where GELU bends and the experts differ; the small output layer keeps the initial
        # margins near 0, as the linear heads do.
        self.expert_w_in = nn.Parameter(
            torch.randn(num_experts, response_dim, hidden) / response_dim**0.5)
        self.expert_b_in = nn.Parameter(torch.zeros(num_experts, hidden))
        self.expert_w_out = nn.Parameter(
            torch.randn(num_experts, hidden, 1) * (0.1 / hidden**0.5))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts))

    def _init_mlp_prior(self, num_experts: int, response_dim: int, hidden: int) -> None:
        # Buffers only when prior_scale > 0: at K * Dr * H floats they are as large as the
        # experts, and a model without a prior never reads them. Random hidden biases put
        # each unit's bend somewhere else, so a prior is a generic function, not one
        # symmetric about the origin; unit-scale output, like the linear prior heads.
        self.register_buffer(
            "prior_w_in", torch.randn(num_experts, response_dim, hidden) / response_dim**0.5)
        self.register_buffer("prior_b_in", torch.randn(num_experts, hidden))
        self.register_buffer(
            "prior_w_out", torch.randn(num_experts, hidden, 1) / hidden**0.5)

    @property
    def num_experts(self) -> int:
        return self.config["num_experts"]

    @property
    def k(self) -> int:
        return self.config["k"]

    @property
    def expert_hidden(self) -> Optional[int]:
        """H of the MLP experts, None for linear experts."""
        return self.config["expert_hidden"]

    def head_weights(self) -> torch.Tensor:
        """[K, Dr] one vector per expert, in the parameters' dtype, differentiable: what the
        diversity regularizer and the reports compare between experts.

        Linear experts: the effective weight vectors (learned + scaled prior).
        MLP experts: the reward gradient at the origin, grad_y r_e(0) = W_in_e
        (gelu'(b_in_e) * w_out_e), prior included. It is the linear part of each expert,
        exactly what the linear model returns for its heads, so cosines keep their
        meaning across the two kinds, and it does not change when hidden units are
        permuted (flattened W_in would: two experts computing the same function with
        their units in another order would look unrelated). It ignores curvature and
        describes the experts best for responses centred near 0; the report's
        margin_correlation compares the experts' whole functions on data.
        """
        if self.expert_hidden is None:
            if self.config["prior_scale"] == 0.0:
                return self.expert_weight
            return self.expert_weight + self.config["prior_scale"] * self.prior_weight
        slopes = _mlp_slopes(self.expert_w_in, self.expert_b_in, self.expert_w_out)
        if self.config["prior_scale"] == 0.0:
            return slopes
        prior = _mlp_slopes(self.prior_w_in, self.prior_b_in, self.prior_w_out)
        return slopes + self.config["prior_scale"] * prior

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
        if self.expert_hidden is not None:
            margins = self._mlp_margins("expert_margins", routing.ids, chosen, rejected)
            return routing, logits, margins
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
        if self.expert_hidden is not None:
            margins = self._mlp_margins("user_expert_margins", routing.ids[rows], chosen,
                                        rejected)
            return routing, logits, margins, rows
        heads = _rows(self.head_weights(), routing.ids[rows])  # [P, k, Dr]
        margins = torch.einsum("pjd,pd->pj", heads, chosen - rejected)
        return routing, logits, margins, rows

    def expert_rewards(self, response: torch.Tensor, routing: RouteResult) -> torch.Tensor:
        """[B, k] reward of each routed expert for the [B, Dr] responses (column j: expert
        routing.ids[:, j]; only routing.ids is read)."""
        if self.expert_hidden is not None:
            if response.shape[0] != routing.ids.shape[0]:
                raise ValueError(
                    f"expert_rewards: response has {response.shape[0]} rows but "
                    f"routing.ids has {routing.ids.shape[0]}; expected one row per response"
                )
            return self._mlp_rewards(response, routing.ids, with_bias=True)
        if self.num_experts <= _DENSE_LINEAR_MAX_RATIO * routing.ids.shape[1]:
            return self.all_expert_rewards(response).gather(1, routing.ids.long())
        heads = _rows(self.head_weights(), routing.ids)
        return (torch.einsum("bjd,bd->bj", heads, response)
                + _rows(self.expert_bias[:, None], routing.ids)[..., 0])

    def population_logits(self, context: torch.Tensor) -> torch.Tensor:
        """[B, K] routing logits for [B, Dc] contexts when no user profile is given.

        Context-routed models: the router's logits. A model built with num_users routes
        its users by their own logits and never trains the router; a new user starts from
        the log of the training users' mean routing, the prior over the user types, the
        same row for every context, or, with router_prior, from the router's logits for its
        context (fitted by `fit_router_prior` to the training users' routing).
        """
        if self.config["num_users"] is not None and not self.config.get("router_prior"):
            prior = torch.softmax(self.user_logits, dim=1).mean(0)
            return prior.clamp_min(1e-30).log().expand(context.shape[0], -1)
        return self.router(context)

    @property
    def population_k(self) -> int:
        """Experts mixed on the population routing (no user profile): k, except for a model
        built with num_users and no router prior, whose population routing is one prior over
        the user types for every context. Its top k would keep k arbitrary, possibly opposite
        types; a user with no labels is scored on the whole prior mixture instead (all K)."""
        if self.config["num_users"] is not None and not self.config.get("router_prior"):
            return self.num_experts
        return self.k

    def reward(self, context: torch.Tensor, response: torch.Tensor,
               profile=None) -> torch.Tensor:
        """[B] reward sum_j g_j r_{ids_j}(response) for [B, Dc] contexts and [B, Dr]
        responses, routed on the population logits (`population_k` experts), or with a
        `UserProfile` (`smoe_ops.reward.personalization`) on that user's logits: the top k
        experts, so a personalized pair costs what a context-routed pair does."""
        if context.shape[0] != response.shape[0]:
            raise ValueError(
                f"reward: context has {context.shape[0]} rows but response has "
                f"{response.shape[0]}; expected one response per context"
            )
        logits = self.population_logits(context)
        k = self.population_k
        if profile is not None:
            logits, k = profile.routing_logits(logits), self.k
        routing = smoe_ops.route(logits.contiguous(), k, score=self.config["score"])
        return (routing.weights * self.expert_rewards(response, routing)).sum(1)

    def all_expert_rewards(self, response: torch.Tensor) -> torch.Tensor:
        """[B, K] reward of every expert for the [B, Dr] responses (dense: B K expert
        rows; personalization needs every expert's opinion of a user's few pairs)."""
        if self.expert_hidden is None:
            return torch.addmm(self.expert_bias, response, self.head_weights().T)
        ids = torch.arange(self.num_experts, dtype=torch.int32).expand(
            response.shape[0], -1).contiguous()
        return self._mlp_rewards(response, ids, with_bias=True)

    def forward(self, context: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        return self.reward(context, response)

    def _mlp_margins(self, caller: str, ids: torch.Tensor, chosen: torch.Tensor,
                     rejected: torch.Tensor) -> torch.Tensor:
        """[P, k] r_e(chosen) - r_e(rejected) of the experts ids [P, k] of each pair.

        A nonlinear expert must score both responses, so [chosen; rejected] go through as
        2P rows with the routing repeated: one dispatch and one grouped_mm per layer serve
        both, 2 P k rows in all. The output bias cancels and is left out.
        """
        if chosen.shape != rejected.shape or chosen.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{caller}: chosen {list(chosen.shape)} and rejected "
                f"{list(rejected.shape)} must both be [P={ids.shape[0]}, Dr], one row per "
                "routed pair"
            )
        num_pairs = ids.shape[0]
        rewards = self._mlp_rewards(torch.cat([chosen, rejected]), torch.cat([ids, ids]),
                                    with_bias=False)
        return rewards[:num_pairs] - rewards[num_pairs:]

    def _mlp_rewards(self, response: torch.Tensor, ids: torch.Tensor,
                     with_bias: bool) -> torch.Tensor:
        """[B, k] r_{ids[b, j]}(response[b]) for [B, Dr] responses and [B, k] expert ids
        (int32 or int64), computed on the B k routed rows only; with_bias=False leaves
        out the output bias b_e (margins, where it cancels)."""
        plan = smoe_ops.dispatch(ids, self.num_experts)
        rows = smoe_ops.permute(response, plan)  # [B k, Dr], grouped by expert
        bias = self.expert_bias[:, None] if with_bias else None  # [K, 1] for grouped_mm
        out = _mlp(rows, plan.offsets, self.expert_w_in, self.expert_b_in,
                   self.expert_w_out, bias)
        if self.config["prior_scale"] != 0.0:
            # A second pair of grouped GEMMs on the same rows. Concatenating the prior
            # onto the learned weights (one [K, Dr, 2H] GEMM) would do the same FLOPs but
            # copy all K experts' weights on every call, a cost that grows with K.
            prior = _mlp(rows, plan.offsets, self.prior_w_in, self.prior_b_in,
                         self.prior_w_out, None)
            out = out + self.config["prior_scale"] * prior
        # Row (b, j) back to its slot. Not unpermute: it would sum the k slots of a pair,
        # and the mixture losses need each expert's own value. index_select, not out[...],
        # for a backward that adds in a fixed order (see _rows).
        slots = plan.inverse.reshape(-1).long()
        return out.view(-1).index_select(0, slots).view(ids.shape)


def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for [K, D] table and [P, k] ids -> [P, k, D]. index_select, because the
    backward of table[ids] (index_put_ with accumulate) adds rows in a thread-dependent
    order on the CPU, so two identical trainings could differ in the last bits; the
    backward of index_select (index_add_) does not."""
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])


def _mlp(rows: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
         w_out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[N, 1] w_out_e . gelu(W_in_e^T x + b_in_e) (+ bias_e) for the [N, Dr] rows of
    expert e in offsets[e]:offsets[e + 1]; w_in [K, Dr, H], b_in [K, H], w_out [K, H, 1],
    bias [K, 1] or None, all in the rows' dtype."""
    hidden = F.gelu(smoe_ops.grouped_mm(rows, w_in, offsets, b_in))  # [N, H]
    return smoe_ops.grouped_mm(hidden, w_out, offsets, bias)


def _mlp_slopes(w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """[K, Dr] grad_y at y = 0 of w_out_e . gelu(W_in_e^T y + b_in_e):
    W_in_e (gelu'(b_in_e) * w_out_e), with gelu'(z) = Phi(z) + z phi(z)."""
    cdf = 0.5 * (1.0 + torch.erf(b_in / math.sqrt(2.0)))
    density = torch.exp(-0.5 * b_in.square()) / math.sqrt(2.0 * math.pi)
    slope = (cdf + b_in * density) * w_out[..., 0]  # [K, H]
    return torch.bmm(w_in, slope[:, :, None])[..., 0]


def single_head(context_dim: int, response_dim: int, **kwargs) -> SparseMoERewardModel:
    """The single-head Bradley-Terry baseline: K = 1, k = 1 (the router is inert)."""
    return SparseMoERewardModel(context_dim, response_dim, num_experts=1, k=1, **kwargs)


def dense(context_dim: int, response_dim: int, num_experts: int = 8,
          **kwargs) -> SparseMoERewardModel:
    """The dense MoE baseline: every pair uses all K experts (k = K)."""
    return SparseMoERewardModel(context_dim, response_dim, num_experts=num_experts,
                                k=num_experts, **kwargs)
