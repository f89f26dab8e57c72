"""PreferenceData (validation, indexing, split, npz round trip) and the prompt_regions
generator (shapes, seeding, labels consistent with the truth, the oracle accuracy)."""

import numpy as np
import pytest
import safetensors.torch
import torch

from smoe_ops.reward import PreferenceData
from smoe_ops.reward.synthetic import prompt_regions, user_types


def make_data(num_pairs=10, context_dim=3, response_dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PreferenceData(
        torch.randn(num_pairs, context_dim, generator=gen),
        torch.randn(num_pairs, response_dim, generator=gen),
        torch.randn(num_pairs, response_dim, generator=gen),
        user_ids=torch.arange(num_pairs),
        categories=torch.arange(num_pairs) % 3,
    )


def test_fields_dtypes_and_defaults():
    data = PreferenceData(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2),
                          torch.zeros(4, 2))
    assert len(data) == 4 and data.context_dim == 3 and data.response_dim == 2
    assert data.context.dtype == torch.float32  # float64 input is stored as float32
    assert data.user_ids.tolist() == [-1] * 4 and data.categories.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(context=torch.zeros(4)), ValueError, r"context must be 2-d.*got shape \(4,\)"),
        (dict(chosen=torch.zeros(3, 2)), ValueError, "chosen has 3 rows, expected 4"),
        (dict(rejected=torch.zeros(4, 5)), ValueError, "rejected has 5 features, expected 2"),
        (dict(chosen=torch.zeros(4, 2, dtype=torch.int64)), TypeError,
         "chosen must be floating point, got torch.int64"),
        (dict(user_ids=torch.zeros(5, dtype=torch.int64)), ValueError,
         r"user_ids must have shape \(4,\), got \(5,\)"),
        (dict(categories=torch.zeros(4)), TypeError,
         "categories must be an integer tensor, got torch.float32"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    args = dict(context=torch.zeros(4, 3), chosen=torch.zeros(4, 2), rejected=torch.zeros(4, 2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        PreferenceData(**args)


def test_indexing_and_split():
    data = make_data(10)
    subset = data[torch.tensor([7, 2])]
    assert subset.user_ids.tolist() == [7, 2]
    assert torch.equal(subset.chosen[0], data.chosen[7])
    assert data[3].user_ids.tolist() == [3] and data[-1].user_ids.tolist() == [9]
    assert len(data[2:5]) == 3 and len(data[[0, 1]]) == 2

    first, second = data.split(0.7, seed=1)
    assert (len(first), len(second)) == (7, 3)
    # A partition: every pair once, the same seed the same partition, another seed another.
    assert sorted(first.user_ids.tolist() + second.user_ids.tolist()) == list(range(10))
    assert torch.equal(data.split(0.7, seed=1)[0].user_ids, first.user_ids)
    assert not torch.equal(data.split(0.7, seed=2)[0].user_ids, first.user_ids)
    with pytest.raises(ValueError, match="fraction must be in"):
        data.split(1.5)


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_file_round_trip_and_missing_keys(tmp_path, suffix):
    data = make_data(6)
    path = tmp_path / f"pairs.{suffix}"
    getattr(data, f"save_{suffix}")(path)
    loaded = getattr(PreferenceData, f"load_{suffix}")(path)
    for name in ("context", "chosen", "rejected", "user_ids", "categories"):
        assert torch.equal(getattr(loaded, name), getattr(data, name)), name

    bad = tmp_path / f"bad.{suffix}"
    if suffix == "npz":
        np.savez(bad, context=np.zeros((2, 3), np.float32))
    else:
        safetensors.torch.save_file({"context": torch.zeros(2, 3)}, bad)
    expected = rf"bad.{suffix} lacks the array\(s\) \['chosen', 'rejected'\]"
    with pytest.raises(ValueError, match=expected):
        getattr(PreferenceData, f"load_{suffix}")(bad)


def test_unreadable_safetensors_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors"):
        PreferenceData.load_safetensors(path)


def test_prompt_regions_shapes_and_seeding():
    gen = prompt_regions(300, num_clusters=4, context_dim=6, response_dim=5, seed=3)
    assert len(gen.data) == 300 and gen.data.context_dim == 6 and gen.data.response_dim == 5
    assert gen.true_rewards.shape == (4, 5)
    assert torch.allclose(gen.true_rewards.norm(dim=1), torch.ones(4))
    # conflict: cluster 1 wants the exact opposite of cluster 0.
    assert torch.equal(gen.true_rewards[1], -gen.true_rewards[0])
    assert set(gen.data.categories.tolist()) == {0, 1, 2, 3}
    again = prompt_regions(300, num_clusters=4, context_dim=6, response_dim=5, seed=3)
    assert torch.equal(again.data.chosen, gen.data.chosen)
    other = prompt_regions(300, num_clusters=4, context_dim=6, response_dim=5, seed=4)
    assert not torch.equal(other.data.chosen, gen.data.chosen)
    no_conflict = prompt_regions(10, conflict=False, seed=3)
    assert not torch.allclose(no_conflict.true_rewards[1], -no_conflict.true_rewards[0])


def test_labels_follow_the_true_reward():
    # Nearly deterministic labels: the chosen response has the higher true reward.
    gen = prompt_regions(2000, temperature=1e-3, seed=0)
    data = gen.data
    true_margin = ((data.chosen - data.rejected) * gen.true_rewards[data.categories]).sum(1)
    assert (true_margin > 0).float().mean() > 0.99
    assert gen.oracle_accuracy() > 0.99
    # All labels flipped half the time: nothing to learn, the oracle is at chance.
    coin = prompt_regions(2000, label_noise=0.5, seed=0)
    assert coin.oracle_accuracy() == pytest.approx(0.5)


def test_oracle_accuracy_matches_sampled_labels():
    # The closed form against the agreement rate of many sampled labels (same pairs).
    gen = prompt_regions(20000, temperature=0.5, label_noise=0.1, seed=0)
    data = gen.data
    true_margin = ((data.chosen - data.rejected) * gen.true_rewards[data.categories]).sum(1)
    agreement = (true_margin > 0).float().mean().item()
    # 20000 Bernoulli draws: standard error about 0.003.
    assert agreement == pytest.approx(gen.oracle_accuracy(), abs=0.015)
    assert 0.6 < gen.oracle_accuracy() < 0.9


def test_prompt_regions_bad_arguments():
    with pytest.raises(ValueError, match="num_clusters >= 1"):
        prompt_regions(10, num_clusters=0)
    with pytest.raises(ValueError, match="label_noise=0.7"):
        prompt_regions(10, label_noise=0.7)
    gen = prompt_regions(10, seed=0)
    with pytest.raises(ValueError, match="categories must hold the true cluster"):
        gen.oracle_accuracy(PreferenceData(gen.data.context, gen.data.chosen,
                                           gen.data.rejected))


def test_user_types_structure():
    gen = user_types(12, 30, num_types=4, context_dim=6, response_dim=5, seed=1)
    data = gen.data
    assert len(data) == 360 and gen.true_rewards.shape == (4, 5)
    # Pairs grouped by user; every pair's category is its user's type.
    assert data.user_ids.tolist() == [u for u in range(12) for _ in range(30)]
    assert torch.equal(data.categories, gen.user_types[data.user_ids])
    # Pure types: each user's reward vector is exactly its type's.
    assert torch.equal(gen.user_mixtures.sum(1), torch.ones(12))
    assert torch.equal(gen.user_rewards, gen.true_rewards[gen.user_types])
    assert torch.equal(gen.true_rewards[1], -gen.true_rewards[0])

    mixed = user_types(50, 2, num_types=4, types_per_user=2, seed=1)
    assert ((mixed.user_mixtures > 0).sum(1) == 2).all()
    torch.testing.assert_close(mixed.user_mixtures.sum(1), torch.ones(50))
    torch.testing.assert_close(mixed.user_rewards, mixed.user_mixtures @ mixed.true_rewards)
    again = user_types(50, 2, num_types=4, types_per_user=2, seed=1)
    assert torch.equal(again.data.chosen, mixed.data.chosen)


def test_user_types_labels_and_oracle():
    gen = user_types(40, 100, temperature=1e-3, seed=0)
    data = gen.data
    true_margin = ((data.chosen - data.rejected) * gen.user_rewards[data.user_ids]).sum(1)
    assert (true_margin > 0).float().mean() > 0.99 and gen.oracle_accuracy() > 0.99
    # Same prompt distribution for every type: the context says nothing about the type.
    by_type = [data.context[data.categories == t].mean(0) for t in range(4)]
    assert max(float(mean.abs().max()) for mean in by_type) < 0.25
    noisy = user_types(40, 100, temperature=0.5, label_noise=0.1, seed=0)
    margin = ((noisy.data.chosen - noisy.data.rejected)
              * noisy.user_rewards[noisy.data.user_ids]).sum(1)
    # 4000 Bernoulli draws: standard error about 0.007.
    assert (margin > 0).float().mean().item() == pytest.approx(noisy.oracle_accuracy(),
                                                               abs=0.03)


def test_user_types_imbalanced_types():
    gen = user_types(2000, 1, num_types=4, type_probs=[0.7, 0.2, 0.1, 0.0], seed=0)
    shares = torch.bincount(gen.user_types, minlength=4).double() / 2000
    # 2000 draws: standard error at most 0.011.
    torch.testing.assert_close(shares, torch.tensor([0.7, 0.2, 0.1, 0.0],
                                                    dtype=torch.float64), atol=0.04, rtol=0)
    mixed = user_types(200, 1, num_types=4, types_per_user=2, type_probs=[1, 1, 0, 0],
                       seed=0)
    assert ((mixed.user_mixtures[:, 2:] == 0).all() and (mixed.user_mixtures[:, :2] > 0).all())


def test_user_types_bad_arguments():
    with pytest.raises(ValueError, match=r"type_probs must be \[num_types=4\] non-negative"):
        user_types(3, 2, type_probs=[1.0, -1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least types_per_user=2 positive"):
        user_types(3, 2, types_per_user=2, type_probs=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"types_per_user must be in \[1, num_types=4\], got 5"):
        user_types(3, 2, types_per_user=5)
    with pytest.raises(ValueError, match="user_types: need temperature > 0"):
        user_types(3, 2, temperature=0.0)
    gen = user_types(3, 2, seed=0)
    with pytest.raises(ValueError, match="user_ids must hold the user of every pair"):
        gen.oracle_accuracy(PreferenceData(gen.data.context, gen.data.chosen,
                                           gen.data.rejected))
