"""routing_report on a hand-built model whose routing and experts are known exactly, on a
trained model, and the clustering scores (NMI, ARI) against hand-computed values; the
expert cards against a float64 reference; the JSON and Markdown renderings."""

import json
import math

import pytest
import torch

from smoe_ops.reward import (
    PreferenceData,
    SparseMoERewardModel,
    expert_cards,
    routing_report,
    single_head,
    train,
)
from smoe_ops.reward.report import (
    adjusted_rand_index,
    matched_cosine,
    normalized_mutual_information,
)
from smoe_ops.reward.synthetic import prompt_regions


def test_clustering_scores_by_hand():
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])
    # b splits one cluster of a: I = H(a) = log 2, H(b) = 1.5 log 2, NMI = 1 / 1.25.
    assert normalized_mutual_information(a, b) == pytest.approx(0.8)
    # Pairs: together in both 1, in a 2, in b 1, of 6: (1 - 2/6) / (1.5 - 2/6) = 4/7.
    assert adjusted_rand_index(a, b) == pytest.approx(4 / 7)
    relabelled = torch.tensor([5, 5, 3, 3])  # same partition, other names
    assert normalized_mutual_information(a, relabelled) == pytest.approx(1.0)
    assert adjusted_rand_index(a, relabelled) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(4, (20000,), generator=gen), torch.randint(4, (20000,), generator=gen)
    assert normalized_mutual_information(x, y) < 0.01 and abs(adjusted_rand_index(x, y)) < 0.01


def hand_built(k):
    """Context = one-hot of the category (3 categories); expert c gets logit 20 for
    category c, so it takes category c; expert 3 gets no pair at k = 1. Expert e scores
    response feature e."""
    model = SparseMoERewardModel(3, 4, num_experts=4, k=k)
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.zero_()
        model.router.weight[:3, :3] = 20 * torch.eye(3)
        model.expert_weight.copy_(torch.eye(4))
    categories = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    context = torch.nn.functional.one_hot(categories, 3).float()
    # chosen - rejected = row below: expert e's margin is the e-th entry.
    difference = torch.tensor([[1.0, 1, -1, 0], [1, -1, -1, 0], [-1, 1, 1, 0],
                               [1, 1, 1, 0], [-1, 1, -1, 0], [1, 1, 1, 0],
                               [-1, -1, 1, 0], [1, 1, 1, 0], [1, 1, -1, 0], [1, 1, 1, 0]])
    return model, PreferenceData(context, difference, torch.zeros(10, 4),
                                 categories=categories)


def test_report_of_a_known_routing():
    model, data = hand_built(k=1)
    report = routing_report(model, data)
    torch.testing.assert_close(report.load, torch.tensor([0.3, 0.2, 0.5, 0.0],
                                                         dtype=torch.float64))
    assert report.dead_experts == [3] and report.categories == [0, 1, 2]
    torch.testing.assert_close(report.specialization[:, :3], torch.eye(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert report.nmi == pytest.approx(1.0) and report.ari == pytest.approx(1.0)
    assert report.top_expert.tolist() == data.categories.tolist()
    assert report.own_category.tolist() == [0, 1, 2, -1]
    # Expert 0 on category 0: margins 1, 1, -1 -> 2/3; elsewhere 1, -1, 1, -1, 1, 1, 1 -> 5/7.
    expected_own = torch.tensor([2 / 3, 1.0, 4 / 5, math.nan], dtype=torch.float64)
    expected_other = torch.tensor([5 / 7, 3 / 4, 2 / 5, math.nan], dtype=torch.float64)
    torch.testing.assert_close(report.own_accuracy, expected_own, equal_nan=True)
    torch.testing.assert_close(report.other_accuracy, expected_other, equal_nan=True)
    assert report.head_cosine == pytest.approx(0.0)  # orthogonal heads
    assert report.entropy < 1e-6  # logits 20 apart: one-hot routing


def test_report_weights_sum_to_one_and_no_categories():
    model, data = hand_built(k=2)
    report = routing_report(model, data)
    assert report.load.sum().item() == pytest.approx(1.0)
    assert report.mean_weight.sum().item() == pytest.approx(1.0)
    # The second choice is a tie at logit 0, which goes to the lowest free id (0 or 1):
    # expert 3 stays dead even at k = 2.
    assert report.dead_experts == [3]
    torch.testing.assert_close(report.specialization.sum(1),
                               torch.ones(3, dtype=torch.float64))
    unlabelled = PreferenceData(data.context, data.chosen, data.rejected)
    bare = routing_report(model, unlabelled)
    assert bare.nmi is None and bare.specialization is None and bare.categories == []
    with pytest.raises(ValueError, match="data has no pairs"):
        routing_report(model, data[0:0])


def test_report_of_the_single_head():
    # K = 1: no expert pairs, so no cosine or correlation between experts.
    _model, data = hand_built(k=1)
    report = routing_report(single_head(3, 4), data)
    assert report.load.tolist() == [1.0] and report.dead_experts == []
    assert report.head_cosine == 0.0 and report.margin_correlation == 0.0
    assert report.nmi == pytest.approx(0.0)  # one expert says nothing about the category


def test_report_of_a_trained_model():
    generated = prompt_regions(6000, num_clusters=4, seed=0)
    model = SparseMoERewardModel(64, 64, num_experts=4, k=2)
    train(model, generated.data, epochs=8, progress=False)
    report = routing_report(model, generated.data)
    # 4 experts for 4 well-separated clusters: routing recovers them (measured NMI ~1).
    assert report.nmi > 0.8 and report.dead_experts == []
    assert (report.own_accuracy > report.other_accuracy + 0.1).all()


def test_matched_cosine_finds_the_best_one_to_one_matching():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # The best total pairs target 0 with head 1 (cos 0.99) and target 1 with head 0 (0.8);
    # matching target 0 in order of the heads (head 0, cos 0.6) leaves target 1 only 0.6.
    heads = torch.tensor([[0.6, 0.8], [0.99, -0.141], [-0.8, 0.6]])
    cosines = torch.nn.functional.normalize(heads, dim=1)
    expected = (cosines[1, 0] + cosines[0, 1]).item() / 2
    assert matched_cosine(heads, targets) == pytest.approx(expected)
    assert matched_cosine(5 * targets, targets) == pytest.approx(1.0)  # scale-free
    with pytest.raises(ValueError, match="need C <= K"):
        matched_cosine(targets[:1], targets)


# Router logits of the 8 pairs of graded_routing for experts 0-2 (expert 3 sits at -30, so
# it is never among the top 2). Chosen for known answers: pairs 0 and 7 are identical (a
# weight tie across pairs), pairs 3 and 6 split 0.5 / 0.5 (ties at 0.5 for experts 1, 2
# and 0, 2).
GRADED_LOGITS = [[3.0, 0, -5], [1, 0, -5], [0, 2, -5], [-5, 0, 0], [-5, 1, 3], [2, -5, 0],
                 [0, -5, 0], [3, 0, -5]]


def graded_routing():
    """K = 4, k = 2: the context is the logits of experts 0-2 and expert 3 is dead;
    seeded random heads and responses, so the margins are generic (no ties)."""
    model = SparseMoERewardModel(3, 5, num_experts=4, k=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.weight[:3, :3] = torch.eye(3)
        model.router.bias.copy_(torch.tensor([0.0, 0, 0, -30]))
        model.expert_weight.copy_(torch.randn(4, 5, generator=gen))
    difference = torch.randn(8, 5, generator=gen)
    categories = torch.tensor([0, 0, 1, -1, 1, 2, 2, 0])  # pair 3 unknown
    return model, PreferenceData(torch.tensor(GRADED_LOGITS), difference, torch.zeros(8, 5),
                                 categories=categories)


def graded_reference(model, data):
    """float64 from first principles: dense routing weights [P, K] (softmax over each
    pair's top 2 logits, ties to the lower id), margins [P, K], P_e [P, K], P_pop [P]."""
    logits = torch.tensor(GRADED_LOGITS, dtype=torch.float64)
    logits = torch.cat([logits, torch.full((8, 1), -30.0, dtype=torch.float64)], 1)
    weights = torch.zeros(8, 4, dtype=torch.float64)
    for pair, row in enumerate(logits.tolist()):
        chosen = sorted(range(4), key=lambda expert: (-row[expert], expert))[:2]
        total = sum(math.exp(row[expert]) for expert in chosen)
        for expert in chosen:
            weights[pair, expert] = math.exp(row[expert]) / total
    heads = model.expert_weight.detach().double()
    margins = (data.chosen - data.rejected).double() @ heads.T
    expert_probability = torch.sigmoid(margins)
    return weights, margins, expert_probability, (weights * expert_probability).sum(1)


def test_cards_pick_the_pairs_an_expert_is_responsible_for():
    model, data = graded_routing()
    weights, margins, _expert_p, _population = graded_reference(model, data)
    cards = expert_cards(model, data, top=5)
    assert [card.expert for card in cards] == [0, 1, 2, 3]
    assert [card.num_pairs for card in cards] == [6, 6, 4, 0]  # 16 = P * k slots
    # Expert 0: weights 0.95 (pairs 0 and 7: the tie goes to pair 0), 0.88, 0.73, 0.5,
    # 0.12; pair 2 is sixth and cut by top = 5. Expert 1: pairs 0 and 7 tie at 0.05 right
    # at the cut, pair 0 stays. Expert 2: pairs 3 and 6 tie at 0.5.
    expected = [[0, 7, 5, 1, 6], [2, 3, 1, 4, 0], [4, 3, 6, 5], []]
    assert [[item.pair for item in card.responsible] for card in cards] == expected
    for card in cards:
        for item in card.responsible:
            assert item.weight == pytest.approx(float(weights[item.pair, card.expert]),
                                                rel=1e-6)
            assert item.correct == bool(margins[item.pair, card.expert] > 0)
            assert item.category == int(data.categories[item.pair])
    assert cards[1].responsible[1].category == -1  # pair 3's category is unknown
    # Both answers occur, so a card that always said "right" would fail.
    assert {item.correct for card in cards for item in card.responsible} == {True, False}
    assert [item.pair for item in expert_cards(model, data, top=2)[0].responsible] == [0, 7]


def test_card_disagreements_follow_the_float64_reference():
    model, data = graded_routing()
    _weights, _margins, expert_p, population = graded_reference(model, data)
    cards = expert_cards(model, data, top=8)
    for expert in range(3):
        gap = expert_p[:, expert] - population
        expected = sorted(range(8), key=lambda pair: (-abs(gap[pair]), pair))
        # The data has no near-ties, so float32 rounding cannot reorder the reference.
        sorted_gaps = sorted(gap.abs().tolist(), reverse=True)
        assert min(a - b for a, b in zip(sorted_gaps, sorted_gaps[1:])) > 1e-5
        disagreements = cards[expert].disagreements
        assert [item.pair for item in disagreements] == expected
        for item in disagreements:
            assert item.expert_probability == pytest.approx(float(expert_p[item.pair, expert]),
                                                            rel=1e-5)
            assert item.population_probability == pytest.approx(
                float(population[item.pair]), rel=1e-5)
            assert item.difference == pytest.approx(float(gap[item.pair]), abs=1e-6)
    assert cards[3].disagreements == []  # dead expert: empty card


def test_cards_in_the_report_and_with_one_hot_routing():
    model, data = hand_built(k=1)
    report = routing_report(model, data, top=2)
    assert report.cards == expert_cards(model, data, top=2)
    # k = 1: every weight is 1, so the lowest indices of each expert's category win.
    assert [[item.pair for item in card.responsible] for card in report.cards] == [
        [0, 1], [3, 4], [5, 6], []]
    assert [item.weight for item in report.cards[2].responsible] == [1.0, 1.0]
    empty = report.cards[3]
    assert (empty.num_pairs, empty.responsible, empty.disagreements) == (0, [], [])
    # Routed to one expert, the population is that expert: it never disagrees with itself.
    for card in report.cards[:3]:
        assert all(report.top_expert[item.pair] != card.expert
                   for item in card.disagreements if item.difference != 0)
    assert all(card.num_pairs == 0 for card in expert_cards(model, data[0:0]))


class CubedHeads(SparseMoERewardModel):
    """Experts that are not linear: r_e(y) = (w_e . y)^3 + b_e. The cards must read the
    margins through expert_rewards, not from head_weights."""

    def expert_rewards(self, response, routing):
        linear = super().expert_rewards(response, routing)
        bias = self.expert_bias[routing.ids.long()]
        return (linear - bias) ** 3 + bias


def test_cards_use_the_expert_rewards_of_any_head():
    _model, data = hand_built(k=1)
    model, _ = hand_built(k=1)
    cubed = CubedHeads(3, 4, num_experts=4, k=1)
    cubed.load_state_dict(model.state_dict())
    with torch.no_grad():
        cubed.expert_weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                [0, 0, 0, 1]]) - 0.5)
    heads = cubed.expert_weight.detach().double()
    margins = (data.chosen.double() @ heads.T) ** 3  # rejected is 0
    for card in expert_cards(cubed, data, top=10):
        for item in card.responsible:
            assert item.correct == bool(margins[item.pair, card.expert] > 0)
        for item in card.disagreements:
            assert item.expert_probability == pytest.approx(
                torch.sigmoid(margins[item.pair, card.expert]).item(), rel=1e-6)


def all_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and all_plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(all_plain(item) for item in value)
    return value is None or type(value) in (int, float, bool, str)


def test_report_to_dict_is_plain_json():
    model, data = hand_built(k=1)
    report = routing_report(model, data, top=3)
    summary = report.to_dict()
    assert all_plain(summary)
    text = json.dumps(summary, allow_nan=False)  # raises on NaN or a tensor
    assert json.loads(text) == summary
    assert summary["num_experts"] == 4 and summary["num_pairs"] == 10 and summary["k"] == 1
    assert summary["own_accuracy"][3] is None  # NaN for the dead expert
    assert summary["load"] == pytest.approx([0.3, 0.2, 0.5, 0.0])
    assert summary["cards"][0]["responsible"][0] == dict(pair=0, weight=1.0, category=0,
                                                         correct=True)
    assert summary["cards"][3] == dict(expert=3, num_pairs=0, responsible=[],
                                       disagreements=[])
    assert "top_expert" not in summary and "routing_weights" not in summary
    full = report.to_dict(per_pair=True)
    assert json.loads(json.dumps(full, allow_nan=False)) == full
    assert full["top_expert"] == data.categories.tolist()
    assert len(full["routing_weights"]) == 10 and len(full["routing_weights"][0]) == 4
    bare = routing_report(model, PreferenceData(data.context, data.chosen, data.rejected))
    bare_summary = bare.to_dict()
    assert bare_summary["specialization"] is None and bare_summary["categories"] == []
    assert json.loads(json.dumps(bare_summary, allow_nan=False)) == bare_summary


def test_report_markdown_shows_every_expert_and_the_matrix():
    model, data = graded_routing()
    text = routing_report(model, data).to_markdown()
    for expert in range(4):
        assert f"### Expert {expert}:" in text
    assert "No pairs are routed to this expert." in text  # expert 3
    assert "| category | e0 | e1 | e2 | e3 |" in text
    assert "| 0 | 0.953 |" in text  # expert 0's first pair and its weight, sigmoid(3)
    assert max(len(line) for line in text.splitlines()) < 120
    bare = routing_report(model, PreferenceData(data.context, data.chosen, data.rejected))
    assert "No known categories" in bare.to_markdown()


@pytest.mark.parametrize("top", [0, -1, 2.5, True])
def test_cards_reject_a_bad_top(top):
    model, data = graded_routing()
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        routing_report(model, data, top=top)
    with pytest.raises(ValueError, match="expert_cards: top"):
        expert_cards(model, data, top=top)


def test_report_rejects_data_of_other_feature_sizes():
    model, data = graded_routing()
    wide_context = PreferenceData(torch.zeros(8, 4), data.chosen, data.rejected)
    with pytest.raises(ValueError, match="data.context has 4 features .* context_dim=3"):
        routing_report(model, wide_context)
    narrow_response = PreferenceData(data.context, torch.zeros(8, 2), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="data.response has 2 features .* response_dim=5"):
        expert_cards(model, narrow_response)
