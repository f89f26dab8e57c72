"""Training objectives and regularizers of the sparse MoE reward model.

weights g [P, k] (the routed experts' weights, summing to 1 per pair) and margins
m [P, k] (r_e(chosen) - r_e(rejected) of those experts) as `expert_margins` returns them.
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F

import smoe_ops
from smoe_ops.reference.routing import RouteResult

__all__ = [
    "Regularizers", "diversity_loss", "mixture_bt_loss", "pair_accuracy",
    "preference_probability", "regularization", "reward_mixture_bt_loss",
    "user_mixture_bt_loss",
]  # fmt: skip

OBJECTIVES = ("mixture", "reward_mixture")


def _negative_log_mixture(weights: torch.Tensor, log_agree: torch.Tensor) -> torch.Tensor:
    """[R] -log sum_j g_j exp(a_j) per row of [R, k] weights and log-probabilities a.

    Computed as -(a* + log sum_j g_j exp(a_j - a*)) with a* the largest a_j among experts
    with g_j > 0: no term overflows, the sum is at least the g of that expert, and a zero
    weight gives a zero term and finite gradients (log g would not). NaN when every weight
    of a row is 0 (route never produces that for finite logits).
    """
    usable = torch.where(weights > 0, log_agree, torch.full_like(log_agree, -math.inf))
    # a* is a constant shift: any value gives the same loss, so it carries no gradient.
    shift = usable.amax(dim=1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    # Zero-weight terms use -inf, not their own log_agree, which could lie far above a* and
    # overflow exp (0 * inf = NaN); they get no gradient, as softmax gives them none either.
    mixture = (weights * torch.exp(usable - shift)).sum(1)
    return -(shift.squeeze(1) + torch.log(mixture))


def mixture_bt_loss(weights: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Mixture Bradley-Terry: mean over pairs of -log sum_j g_j sigmoid(m_j), computed
    stably in the log domain (zero weights and margins of any size are fine)."""
    return _negative_log_mixture(weights, F.logsigmoid(margins)).mean()


def user_mixture_bt_loss(user_weights: torch.Tensor, margins: torch.Tensor,
                         pair_users: torch.Tensor) -> torch.Tensor:
    """User-level mixture Bradley-Terry: all the pairs of one user share its routing.

    -(1/P) sum_u log sum_j g_j(u) prod_{i of u} sigmoid(m_ij), computed in the log domain
    (a user's product of many sigmoids underflows long before its log does).

    Args:
        user_weights: [U, k] routing weights of each user over its k experts.
        margins: [P, k] margins of each pair under the k experts of its user (column j is
            the expert of user_weights[:, j]).
        pair_users: [P] int64 row of user_weights each pair belongs to, in [0, U).
    Users without pairs add nothing.
    """
    if margins.shape[0] == 0:
        return margins.sum() * 0.0
    log_agree = torch.zeros_like(user_weights, dtype=margins.dtype)
    log_agree = log_agree.index_add(0, pair_users, F.logsigmoid(margins))
    present = torch.zeros(user_weights.shape[0], dtype=torch.bool, device=margins.device)
    present[pair_users] = True
    per_user = _negative_log_mixture(user_weights[present], log_agree[present])
    return per_user.sum() / margins.shape[0]


def reward_mixture_bt_loss(weights: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Reward-mixture Bradley-Terry: mean over pairs of -logsigmoid(sum_j g_j m_j)."""
    return -F.logsigmoid((weights * margins).sum(1)).mean()


def preference_probability(weights: torch.Tensor, margins: torch.Tensor,
                           objective: str = "mixture") -> torch.Tensor:
    """[P] the model's probability that chosen beats rejected: sum_j g_j sigmoid(m_j)
    ("mixture") or sigmoid(sum_j g_j m_j) ("reward_mixture")."""
    if objective == "mixture":
        return (weights * torch.sigmoid(margins)).sum(1)
    if objective == "reward_mixture":
        return torch.sigmoid((weights * margins).sum(1))
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def pair_accuracy(weights: torch.Tensor, margins: torch.Tensor,
                  objective: str = "mixture") -> torch.Tensor:
    """[P] bool: the pair is right when the preference probability exceeds 0.5."""
    return preference_probability(weights, margins, objective) > 0.5


def diversity_loss(heads: torch.Tensor) -> torch.Tensor:
    """Mean over expert pairs i < j of cos(w_i, w_j)^2 for [K, Dr] heads (0 when K = 1)."""
    num_experts = heads.shape[0]
    if num_experts < 2:
        return heads.sum() * 0.0
    unit = F.normalize(heads, dim=1)
    cosines = unit @ unit.T
    off_diagonal = torch.triu(torch.ones_like(cosines, dtype=torch.bool), diagonal=1)
    return cosines[off_diagonal].square().mean()


@dataclass(frozen=True)
class Regularizers:
    """Weights of the regularizers; 0 switches a term off.

    sparsity: local sparsity, mean per-pair entropy of the full routing softmax (lower is
        sparser), `router_losses(...).entropy`.
    balance: global balance; balance_kind "kl" = log K - H(mean routing), the KL of the
        batch-mean routing from uniform, or "switch" = the Switch loss `.balance`.
    diversity: mean pairwise squared cosine of the experts' `head_weights()` (linear
        experts: their weight vectors; MLP experts: their reward gradients at the origin).
    """

    sparsity: float = 0.01
    balance: float = 0.1
    balance_kind: str = "kl"
    diversity: float = 0.01

    def __post_init__(self):
        if self.balance_kind not in ("kl", "switch"):
            raise ValueError(
                f"Regularizers: balance_kind must be 'kl' or 'switch', got {self.balance_kind!r}"
            )
        for name in ("sparsity", "balance", "diversity"):
            if getattr(self, name) < 0:
                raise ValueError(f"Regularizers: {name} must be >= 0, got {getattr(self, name)}")


def regularization(logits: torch.Tensor, routing: RouteResult, heads: torch.Tensor,
                   weights: Regularizers):
    """(total, terms): the weighted sum of the switched-on regularizers and a dict of every
    term's unweighted value (0-d tensors), for logging."""
    terms = {}
    if weights.sparsity or weights.balance:
        losses = smoe_ops.router_losses(logits, routing)
        terms["sparsity"] = losses.entropy
        if weights.balance_kind == "kl":
            terms["balance"] = math.log(logits.shape[1]) - losses.batch_entropy
        else:
            terms["balance"] = losses.balance
    if weights.diversity:
        terms["diversity"] = diversity_loss(heads)
    total = logits.new_zeros(())
    for name, value in terms.items():
        weight = getattr(weights, name)
        if weight:
            total = total + weight * value
    return total, terms
