"""`routing_report`: how a trained SparseMoERewardModel routes a data set, in numbers.

What it reports: expert load, routing entropies, dead experts, the specialization matrix
against known categories with NMI and ARI, each expert's accuracy on its own category
against the rest, and expert diversity.
"""

from dataclasses import dataclass
import math
from typing import Optional

import torch

import smoe_ops
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.model import SparseMoERewardModel

__all__ = ["RoutingReport", "adjusted_rand_index", "matched_cosine",
           "normalized_mutual_information", "routing_report"]


@dataclass
class RoutingReport:
    """The numbers of `routing_report` (K experts, C known categories).

    load: [K] fraction of the P * k routed slots that went to each expert.
    mean_weight: [K] routing weight of each expert averaged over pairs (0 when not routed).
    entropy: mean per-pair entropy of the full routing softmax (low: sparse routing).
    mean_routing_entropy: entropy of the batch-mean routing softmax (log K: balanced).
    dead_experts: ids of the experts no pair is routed to.
    top_expert: [P] int64 the expert with the largest weight of each pair.
    categories: the known category ids (sorted), rows of `specialization`; empty if none.
    specialization: [C, K] mean routing weight of each expert over the pairs of each
        category (rows sum to 1); None without categories.
    nmi, ari: of top_expert against the known categories (pairs with category -1
        left out); None without categories.
    own_category: [K] the category each expert weighs most (-1 for a dead expert).
    own_accuracy, other_accuracy: [K] accuracy of each expert alone (margin > 0) on the
        pairs of its own category and on all the other pairs (NaN where there are none).
    head_cosine: mean |cos| between the expert weight vectors over expert pairs.
    margin_correlation: mean |corr| between the experts' margins over the pairs.
    """

    load: torch.Tensor
    mean_weight: torch.Tensor
    entropy: float
    mean_routing_entropy: float
    dead_experts: list
    top_expert: torch.Tensor
    categories: list
    specialization: Optional[torch.Tensor]
    nmi: Optional[float]
    ari: Optional[float]
    own_category: Optional[torch.Tensor]
    own_accuracy: Optional[torch.Tensor]
    other_accuracy: Optional[torch.Tensor]
    head_cosine: float
    margin_correlation: float


def _contingency(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    _values_a, index_a = torch.unique(labels_a, return_inverse=True)
    _values_b, index_b = torch.unique(labels_b, return_inverse=True)
    table = torch.zeros(int(index_a.max()) + 1, int(index_b.max()) + 1, dtype=torch.float64)
    table.index_put_((index_a, index_b), torch.ones(len(labels_a), dtype=torch.float64),
                     accumulate=True)
    return table


def _entropy(counts: torch.Tensor) -> float:
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def normalized_mutual_information(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """I(a; b) / ((H(a) + H(b)) / 2) of two [n] labelings (natural logs; 1 when both are
    constant, as they then agree)."""
    if len(labels_a) == 0:
        return float("nan")
    table = _contingency(labels_a, labels_b)
    joint = table / table.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum())
    mean_entropy = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2
    return 1.0 if mean_entropy == 0 else mutual / mean_entropy


def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Rand index of two [n] labelings adjusted for chance (1: same partition, about 0:
    independent); 1 when both put everything in one cluster."""
    if len(labels_a) == 0:
        return float("nan")
    table = _contingency(labels_a, labels_b)

    def pairs(counts):
        return float((counts * (counts - 1) / 2).sum())

    together = pairs(table)
    rows, columns, total = pairs(table.sum(1)), pairs(table.sum(0)), pairs(table.sum())
    expected = rows * columns / total if total else 0.0
    best = (rows + columns) / 2
    return 1.0 if best == expected else (together - expected) / (best - expected)


def matched_cosine(heads: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine between each of C target vectors ([C, D]) and a distinct head of
    [K, D] (K >= C), under the one-to-one matching that maximizes it (exact: dynamic
    programming over the subsets of matched targets, so C is limited to 16)."""
    num_targets, num_heads = targets.shape[0], heads.shape[0]
    if num_targets > num_heads or num_targets > 16:
        raise ValueError(
            f"matched_cosine: need C <= K and C <= 16 targets, got C={num_targets}, "
            f"K={num_heads}"
        )
    unit_heads = heads.double() / heads.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit_targets = targets.double() / targets.double().norm(dim=1, keepdim=True)
    cosines = (unit_targets @ unit_heads.T).tolist()  # [C, K]
    # best[mask]: the largest sum of cosines with the targets in mask matched to distinct
    # heads among those seen so far.
    best = [-math.inf] * (1 << num_targets)
    best[0] = 0.0
    for head in range(num_heads):
        for mask in range((1 << num_targets) - 1, -1, -1):
            if best[mask] == -math.inf:
                continue
            for target in range(num_targets):
                if not mask >> target & 1:
                    grown = mask | 1 << target
                    candidate = best[mask] + cosines[target][head]
                    best[grown] = max(best[grown], candidate)
    return best[-1] / num_targets if num_targets else float("nan")


def _mean_abs_off_diagonal(matrix: torch.Tensor) -> float:
    size = matrix.shape[0]
    if size < 2:
        return 0.0
    mask = ~torch.eye(size, dtype=torch.bool)
    return float(matrix[mask].abs().mean())


@torch.no_grad()
def routing_report(model: SparseMoERewardModel, data: PreferenceData) -> RoutingReport:
    """Route every pair of `data` through `model` and summarize what the experts do."""
    if len(data) == 0:
        raise ValueError("routing_report: data has no pairs")
    num_experts = model.num_experts
    routing, logits = model.route(data.context)
    ids = routing.ids.long()
    dense_weights = torch.zeros(len(data), num_experts, dtype=torch.float64)
    dense_weights.scatter_(1, ids, routing.weights.double())
    losses = smoe_ops.router_losses(logits, routing)
    load = routing.counts.double() / ids.numel()
    top_expert = ids.gather(1, dense_weights.gather(1, ids).argmax(1, keepdim=True))[:, 0]

    # Every expert's margin on every pair: the report looks at experts a pair was not
    # routed to as well, unlike training.
    heads = model.head_weights().double()
    margins = (data.chosen - data.rejected).double() @ heads.T  # [P, K]
    unit = heads / heads.norm(dim=1, keepdim=True).clamp_min(1e-30)
    head_cosine = _mean_abs_off_diagonal(unit @ unit.T)
    if num_experts < 2:
        margin_correlation = 0.0
    elif len(data) < 2:
        margin_correlation = float("nan")
    else:
        margin_correlation = _mean_abs_off_diagonal(torch.corrcoef(margins.T))

    report = RoutingReport(
        load=load, mean_weight=dense_weights.mean(0), entropy=float(losses.entropy),
        mean_routing_entropy=float(losses.batch_entropy),
        dead_experts=[e for e in range(num_experts) if routing.counts[e] == 0],
        top_expert=top_expert, categories=[], specialization=None, nmi=None, ari=None,
        own_category=None, own_accuracy=None, other_accuracy=None,
        head_cosine=head_cosine, margin_correlation=margin_correlation,
    )
    known = data.categories >= 0
    if known.any():
        _add_category_metrics(report, data.categories, known, dense_weights, margins)
    return report


def _add_category_metrics(report, categories, known, dense_weights, margins):
    values = torch.unique(categories[known])
    report.categories = values.tolist()
    rows = torch.stack([dense_weights[categories == value].mean(0) for value in values])
    report.specialization = rows
    report.nmi = normalized_mutual_information(report.top_expert[known], categories[known])
    report.ari = adjusted_rand_index(report.top_expert[known], categories[known])

    num_experts = rows.shape[1]
    own = values[rows.argmax(0)]
    own[dense_weights.sum(0) == 0] = -1
    correct = margins > 0
    own_accuracy = torch.full((num_experts,), math.nan, dtype=torch.float64)
    other_accuracy = torch.full((num_experts,), math.nan, dtype=torch.float64)
    for expert in range(num_experts):
        if own[expert] < 0:
            continue
        inside = categories == own[expert]
        if inside.any():
            own_accuracy[expert] = correct[inside, expert].double().mean()
        if (~inside).any():
            other_accuracy[expert] = correct[~inside, expert].double().mean()
    report.own_category, report.own_accuracy = own, own_accuracy
    report.other_accuracy = other_accuracy
