"""The `smoe-ops` command line: train writes a loadable model, its summary and its
validation split; report reads them back; bad arguments fail with a message, not a trace."""

import json
import os
import subprocess
import sys

import pytest
import torch

from smoe_ops import cli
from smoe_ops.reward import PreferenceData, evaluate, load

SMALL = ["--pairs", "1200", "--epochs", "3", "--quiet"]


def test_train_synthetic_writes_model_summary_and_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--synthetic", "prompt_regions", "--out", str(out)] + SMALL) == 0
    printed = capsys.readouterr().out
    assert "val acc" in printed and "oracle" in printed

    summary = json.loads((out / "train.json").read_text())
    model = load(out / "model.safetensors")
    val = PreferenceData.load_safetensors(out / "val.safetensors")
    assert summary["train_pairs"] + len(val) == 1200
    assert len(summary["history"]) == summary["epochs"] >= 1
    # The summary's figure is the one the saved model and split give.
    assert summary["val_accuracy"] == pytest.approx(evaluate(model, val))
    assert model.config["num_experts"] == 8 and model.config["k"] == 2
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_train_feature_file_and_options(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = PreferenceData(torch.randn(300, 5, generator=gen), torch.randn(300, 3, generator=gen),
                          torch.randn(300, 3, generator=gen))
    path = tmp_path / "pairs.npz"
    data.save_npz(path)
    out = tmp_path / "run"
    argv = ["train", "--data", str(path), "--out", str(out), "--experts", "3", "--k", "1",
            "--score", "sigmoid", "--epochs", "2", "--val-fraction", "0", "--quiet"]
    assert cli.main(argv) == 0
    model = load(out / "model.safetensors")
    assert (model.config["num_experts"], model.config["k"], model.config["score"]) == (
        3, 1, "sigmoid")
    assert not (out / "val.safetensors").exists()  # no validation split was asked for


def test_train_user_mixture_sizes_the_user_table(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--synthetic", "user_types", "--objective", "user_mixture", "--experts",
            "4", "--out", str(out), "--pairs", "400", "--pairs-per-user", "10", "--epochs",
            "2", "--quiet"]
    assert cli.main(argv) == 0
    assert load(out / "model.safetensors").config["num_users"] == 40


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "missing.npz", "--out", "x"], "does not exist"),
    (["train", "--synthetic", "prompt_regions", "--out", "x", "--val-fraction", "1.5"],
     "--val-fraction"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, argv, message):
    argv = [str(tmp_path / a) if a in ("missing.npz", "x") else a for a in argv]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_wrong_suffix_names_the_expected_ones(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b\n")
    with pytest.raises(SystemExit, match=r"\.jsonl"):
        cli.main(["train", "--data", str(path), "--out", str(tmp_path / "run")])


def test_info_runs_as_a_module():
    # The console script `smoe-ops` is this module's main; run it the way a user would.
    done = subprocess.run([sys.executable, "-m", "smoe_ops.cli", "info"], capture_output=True,
                          text=True, timeout=120, check=True)
    info = json.loads(done.stdout)
    assert "version" in info
