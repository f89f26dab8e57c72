"""routing_report on a hand-built model whose routing and experts are known exactly, on a
trained model, and the clustering scores (NMI, ARI) against hand-computed values."""

import math

import pytest
import torch

from smoe_ops.reward import (
    PreferenceData,
    SparseMoERewardModel,
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
