"""`routing_report`: how a trained SparseMoERewardModel routes a data set, in numbers.

What it reports: expert load, routing entropies, dead experts, the specialization matrix
against known categories with NMI and ARI, each expert's accuracy on its own category
against the rest, expert diversity, and one card per expert (`expert_cards`): the pairs it
is most responsible for and the pairs on which it disagrees most with the population.
`RoutingReport.to_dict` gives plain JSON-ready values, `RoutingReport.to_markdown` a text
rendering; `smoe_ops.reward.plots` draws the report.

The report reads the model only through its public methods (`route`, `expert_rewards`,
`head_weights`, `num_experts`, `k`, `config`), so it holds for any kind of expert head.
"""

from dataclasses import asdict, dataclass
import logging
import math
from typing import Optional

import torch

import smoe_ops
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.model import SparseMoERewardModel

__all__ = ["Disagreement", "ExpertCard", "ResponsiblePair", "RoutingReport",
           "adjusted_rand_index", "expert_cards", "matched_cosine",
           "normalized_mutual_information", "routing_report"]

logger = logging.getLogger("smoe_ops")

# Pairs per call of expert_rewards: the linear heads build a [pairs, K, Dr] intermediate,
# which for a whole data set of 10^5 pairs would take gigabytes.
_MARGIN_BATCH = 4096


@dataclass
class ResponsiblePair:
    """One of the pairs an expert is most responsible for.

    pair: index of the pair in the data given to the report.
    weight: the expert's routing weight g_e on that pair (in [0, 1]).
    category: the pair's known category, -1 when unknown.
    correct: whether the expert alone prefers the chosen response (its margin > 0).
    """

    pair: int
    weight: float
    category: int
    correct: bool


@dataclass
class Disagreement:
    """A pair on which an expert and the population disagree.

    expert_probability: P_e = sigmoid(m_e), the expert's probability that chosen beats
        rejected (m_e its margin r_e(chosen) - r_e(rejected)).
    population_probability: P_pop = sum_j g_j sigmoid(m_{ids_j}) over the k experts the
        pair is routed to, the mixture Bradley-Terry probability that training fits.
    difference: P_e - P_pop (signed; the cards rank by its absolute value).
    """

    pair: int
    expert_probability: float
    population_probability: float
    difference: float
    category: int


@dataclass
class ExpertCard:
    """What one expert does, by example.

    expert: the expert id.
    num_pairs: the pairs that have it among their k experts.
    responsible: up to `top` pairs routed to it, by descending routing weight g_e, ties
        to the lower pair index.
    disagreements: up to `top` pairs of all the data (routed to the expert or not), by
        descending |P_e - P_pop|, ties to the lower pair index.

    An expert that no pair of the data is routed to gets both lists empty (no error): it
    takes no part in the model's predictions there, and if it was dead in training too,
    the mixture loss never trained it, so its disagreements would rank noise.
    """

    expert: int
    num_pairs: int
    responsible: list[ResponsiblePair]
    disagreements: list[Disagreement]


@dataclass
class RoutingReport:
    """The numbers of `routing_report` (P pairs, K experts, k per pair, C categories).

    num_pairs, k: P and the experts per pair; K is len(load).
    load: [K] fraction of the P * k routed slots that went to each expert.
    mean_weight: [K] routing weight of each expert averaged over pairs (0 when not routed).
    entropy: mean per-pair entropy of the full routing softmax (low: sparse routing).
    mean_routing_entropy: entropy of the batch-mean routing softmax (log K: balanced).
    dead_experts: ids of the experts no pair is routed to.
    top_expert: [P] int64 the expert with the largest weight of each pair.
    routing_weights: [P, K] float64 each pair's routing weights, 0 off its k experts.
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
    cards: [K] ExpertCard, one per expert (see `expert_cards`).
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
    num_pairs: int
    k: int
    routing_weights: torch.Tensor
    cards: list[ExpertCard]

    @property
    def num_experts(self) -> int:
        return len(self.load)

    def to_dict(self, per_pair: bool = False) -> dict:
        """The report as plain Python values (dict, list, int, float, bool, str, None)
        that `json.dumps(..., allow_nan=False)` accepts: tensors become nested lists and
        NaN and infinities become None (JSON has neither). The [P] and [P, K] per-pair
        fields (top_expert, routing_weights) are left out unless `per_pair`, so the
        output's size does not grow with the data."""
        names = ["num_pairs", "k", "load", "mean_weight", "entropy", "mean_routing_entropy",
                 "dead_experts", "categories", "specialization", "nmi", "ari",
                 "own_category", "own_accuracy", "other_accuracy", "head_cosine",
                 "margin_correlation"]
        if per_pair:
            names += ["top_expert", "routing_weights"]
        result = {"num_experts": self.num_experts}
        result.update({name: _plain(getattr(self, name)) for name in names})
        result["cards"] = [_plain(asdict(card)) for card in self.cards]
        return result

    def to_markdown(self) -> str:
        """The report as Markdown text: summary, per-expert table, specialization matrix
        (category x expert) and the expert cards. Numbers are rounded for reading; use
        `to_dict` for the exact values."""
        lines = _summary_markdown(self) + _experts_markdown(self)
        lines += _specialization_markdown(self)
        lines += ["## Expert cards", ""]
        for card in self.cards:
            lines += _card_markdown(card)
        return "\n".join(lines).rstrip() + "\n"


def _plain(value):
    """Tensors, floats and containers as JSON-ready Python values, NaN as None."""
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


def _check_inputs(caller: str, model: SparseMoERewardModel, data: PreferenceData,
                  top: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{caller}: top must be an integer >= 1, got {top!r}")
    for name, found in (("context", data.context_dim), ("response", data.response_dim)):
        expected = model.config[f"{name}_dim"]
        if found != expected:
            raise ValueError(
                f"{caller}: data.{name} has {found} features per pair, expected the "
                f"model's {name}_dim={expected}"
            )


def _all_expert_margins(model: SparseMoERewardModel, data: PreferenceData) -> torch.Tensor:
    """[P, K] float64 margin r_e(chosen) - r_e(rejected) of every expert on every pair,
    routed there or not. Goes through the public `expert_rewards` with a routing that
    sends each pair to all K experts, so it holds for any kind of expert head."""
    num_experts = model.num_experts
    columns = []
    for start in range(0, len(data), _MARGIN_BATCH):
        batch = data[start:start + _MARGIN_BATCH]
        num_pairs = len(batch)
        # A consistent RouteResult (weights sum to 1, counts match the ids): the linear
        # heads read only the ids, but another expert implementation may read the rest.
        everyone = smoe_ops.RouteResult(
            torch.full((num_pairs, num_experts), 1.0 / num_experts),
            torch.arange(num_experts, dtype=torch.int32).expand(num_pairs, -1).contiguous(),
            torch.full((num_experts,), num_pairs, dtype=torch.int32),
        )
        chosen = model.expert_rewards(batch.chosen, everyone).double()
        columns.append(chosen - model.expert_rewards(batch.rejected, everyone).double())
    if not columns:
        return torch.zeros(0, num_experts, dtype=torch.float64)
    return torch.cat(columns)


def _dense_weights(routing: smoe_ops.RouteResult, num_experts: int) -> torch.Tensor:
    """[P, K] float64 routing weights, 0 off each pair's k experts."""
    dense = torch.zeros(routing.ids.shape[0], num_experts, dtype=torch.float64)
    return dense.scatter_(1, routing.ids.long(), routing.weights.double())


@torch.no_grad()
def expert_cards(model: SparseMoERewardModel, data: PreferenceData,
                 top: int = 5) -> list[ExpertCard]:
    """One ExpertCard per expert of `model` on the pairs of `data` (see ExpertCard).

    Args:
        model: the reward model; data: pairs with the model's context and response sizes.
        top: pairs per list of a card, >= 1.
    Returns: [K] ExpertCard, in expert order. Pair indices index `data`.
    """
    _check_inputs("expert_cards", model, data, top)
    routing, _logits = model.route(data.context)
    margins = _all_expert_margins(model, data)
    return _cards(routing, margins, data.categories, top)


def _cards(routing: smoe_ops.RouteResult, margins: torch.Tensor, categories: torch.Tensor,
           top: int) -> list[ExpertCard]:
    num_experts = margins.shape[1]
    routed = torch.zeros(margins.shape, dtype=torch.bool)
    routed.scatter_(1, routing.ids.long(), True)
    weights = _dense_weights(routing, num_experts)
    # Mixture Bradley-Terry, in float64 so near-equal differences still rank reliably.
    expert_probability = torch.sigmoid(margins)  # [P, K]
    population = (weights * expert_probability).sum(1)  # [P]
    difference = expert_probability - population[:, None]
    cards = []
    for expert in range(num_experts):
        candidates = routed[:, expert].nonzero()[:, 0]  # ascending pair index
        if len(candidates) == 0:
            cards.append(ExpertCard(expert, 0, [], []))
            continue
        # Stable sort of ascending indices: equal values stay in index order.
        by_weight = torch.sort(weights[candidates, expert], descending=True, stable=True)
        responsible = [
            ResponsiblePair(int(pair), float(weights[pair, expert]), int(categories[pair]),
                            bool(margins[pair, expert] > 0))
            for pair in candidates[by_weight.indices[:top]].tolist()
        ]
        by_gap = torch.sort(difference[:, expert].abs(), descending=True, stable=True)
        disagreements = [
            Disagreement(pair, float(expert_probability[pair, expert]),
                         float(population[pair]), float(difference[pair, expert]),
                         int(categories[pair]))
            for pair in by_gap.indices[:top].tolist()
        ]
        cards.append(ExpertCard(expert, len(candidates), responsible, disagreements))
    return cards


@torch.no_grad()
def routing_report(model: SparseMoERewardModel, data: PreferenceData,
                   top: int = 5) -> RoutingReport:
    """Route every pair of `data` through `model` and summarize what the experts do.

    Args:
        model: the reward model; data: >= 1 pairs with the model's context and response
            sizes (categories optional: without them the category fields are None).
        top: pairs per list of each expert card, >= 1.
    """
    _check_inputs("routing_report", model, data, top)
    if len(data) == 0:
        raise ValueError("routing_report: data has no pairs")
    num_experts = model.num_experts
    routing, logits = model.route(data.context)
    ids = routing.ids.long()
    dense_weights = _dense_weights(routing, num_experts)
    losses = smoe_ops.router_losses(logits, routing)
    load = routing.counts.double() / ids.numel()
    top_expert = ids.gather(1, dense_weights.gather(1, ids).argmax(1, keepdim=True))[:, 0]

    # Every expert's margin on every pair: the report looks at experts a pair was not
    # routed to as well, unlike training.
    margins = _all_expert_margins(model, data)
    heads = model.head_weights().double()
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
        num_pairs=len(data), k=model.k, routing_weights=dense_weights,
        cards=_cards(routing, margins, data.categories, top),
    )
    known = data.categories >= 0
    if known.any():
        _add_category_metrics(report, data.categories, known, dense_weights, margins)
    logger.debug("routing_report: %d pairs, %d experts, %d dead", len(data), num_experts,
                 len(report.dead_experts))
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


def _number(value, digits: int = 3) -> str:
    """A float rounded for reading; '-' for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _category(value: int) -> str:
    return "-" if value < 0 else str(value)


def _summary_markdown(report: RoutingReport) -> list:
    num_experts = report.num_experts
    dead = ", ".join(map(str, report.dead_experts)) or "none"
    return [
        "# Routing report",
        "",
        f"{report.num_pairs} pairs, {num_experts} experts, k = {report.k} per pair.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mean per-pair routing entropy (0: one expert per pair) | "
        f"{_number(report.entropy)} |",
        f"| entropy of the mean routing (log K = {math.log(num_experts):.3f}: balanced) | "
        f"{_number(report.mean_routing_entropy)} |",
        f"| dead experts | {dead} |",
        f"| NMI / ARI of the top expert vs the categories | {_number(report.nmi)} / "
        f"{_number(report.ari)} |",
        f"| mean abs cosine between expert heads | {_number(report.head_cosine)} |",
        f"| mean abs correlation between expert margins | "
        f"{_number(report.margin_correlation)} |",
        "",
    ]


def _experts_markdown(report: RoutingReport) -> list:
    uniform = 1.0 / report.num_experts
    lines = [
        "## Experts",
        "",
        f"Load: fraction of the routed slots (uniform: {uniform:.3f}). Accuracy: the "
        "expert alone, on its own category and on the rest.",
        "",
        "| expert | load | mean weight | own category | own accuracy | other accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for expert in range(report.num_experts):
        own, own_accuracy, other_accuracy = "-", "-", "-"
        if report.own_category is not None:
            own = _category(int(report.own_category[expert]))
            own_accuracy = _number(float(report.own_accuracy[expert]))
            other_accuracy = _number(float(report.other_accuracy[expert]))
        lines.append(
            f"| {expert} | {_number(float(report.load[expert]))} | "
            f"{_number(float(report.mean_weight[expert]))} | {own} | {own_accuracy} | "
            f"{other_accuracy} |"
        )
    return lines + [""]


def _specialization_markdown(report: RoutingReport) -> list:
    lines = ["## Specialization", ""]
    if report.specialization is None:
        return lines + ["No known categories in the data.", ""]
    experts = range(report.num_experts)
    lines += [
        "Mean routing weight of each expert (columns) over the pairs of each category "
        "(rows sum to 1).",
        "",
        "| category | " + " | ".join(f"e{expert}" for expert in experts) + " |",
        "|---|" + "---|" * report.num_experts,
    ]
    for category, row in zip(report.categories, report.specialization.tolist()):
        lines.append(f"| {category} | " + " | ".join(_number(value) for value in row) + " |")
    return lines + [""]


def _card_markdown(card: ExpertCard) -> list:
    lines = [f"### Expert {card.expert}: {card.num_pairs} pairs routed", ""]
    if card.num_pairs == 0:
        return lines + ["No pairs are routed to this expert.", ""]
    lines += [
        "Most responsible for (highest routing weight):",
        "",
        "| pair | weight | category | expert right |",
        "|---|---|---|---|",
    ]
    for item in card.responsible:
        lines.append(f"| {item.pair} | {_number(item.weight)} | {_category(item.category)} "
                     f"| {'yes' if item.correct else 'no'} |")
    lines += [
        "",
        "Disagrees most with the population (probability that chosen beats rejected):",
        "",
        "| pair | expert | population | difference | category |",
        "|---|---|---|---|---|",
    ]
    for item in card.disagreements:
        lines.append(
            f"| {item.pair} | {_number(item.expert_probability)} | "
            f"{_number(item.population_probability)} | {item.difference:+.3f} | "
            f"{_category(item.category)} |"
        )
    return lines + [""]
