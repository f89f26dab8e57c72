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


def test_report_reads_what_train_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--synthetic", "prompt_regions", "--out", str(out)] + SMALL)
    capsys.readouterr()
    argv = ["report", "--model", str(out / "model.safetensors"), "--data",
            str(out / "val.safetensors"), "--out", str(out / "report"), "--top", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Routing report") and "### Expert 7" in printed
    written = json.loads((out / "report" / "report.json").read_text())
    assert written["num_experts"] == 8 and len(written["cards"]) == 8
    assert (out / "report" / "report.md").read_text().startswith("# Routing report")
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib")
    for name in ("routing_heatmap.png", "expert_load.png"):
        assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_json_and_jsonl_end_to_end(tmp_path, capsys):
    # Text pairs through the dependency-free hashing encoder: train, then report as JSON.
    records = [{"prompt": f"question {i % 7}", "chosen": f"short answer {i}",
                "rejected": f"a much longer and wandering answer {i}",
                "user_id": f"user{i % 5}", "category": i % 2} for i in range(120)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--data", str(path), "--encoder", "hashing", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(out), "--experts", "2", "--k", "1",
            "--epochs", "2", "--quiet"]
    assert cli.main(argv) == 0
    assert json.loads((out / "train.json").read_text())["data"]["encoder"].startswith("hash")
    capsys.readouterr()
    argv = ["report", "--model", str(out / "model.safetensors"), "--data", str(path),
            "--encoder", "hashing", "--cache-dir", str(tmp_path / "cache"), "--json",
            "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_pairs"] == 120 and report["categories"] == [0, 1]


def test_report_of_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["report", "--model", str(tmp_path / "none.safetensors"), "--data",
                  str(tmp_path / "none.npz")])


def test_demo_writes_every_artifact_and_prints_the_tables(tmp_path, capsys):
    # A small demo (the real one is the README's main job): every act runs.
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--pairs", "2000", "--train-users", "40",
            "--held-out-users", "12", "--resamples", "2", "--cost-batch", "64",
            "--cost-users", "50"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for heading in ("## prompt regions", "## few-shot personalization", "## inference cost"):
        assert heading in printed
    assert "| map |" in printed and "per-user oracle" in printed
    for name in ("model.safetensors", "user_model.safetensors", "report.md", "report.json",
                 "routing_heatmap.png", "expert_load.png", "demo.md", "demo.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "profiles").glob("user_*.safetensors"))) == 3
    summary = json.loads((out / "demo.json").read_text())
    regions = summary["prompt_regions"]
    # 2000 pairs are enough for the sparse MoE to beat the single head on conflicting
    # clusters; the exact figures are the acceptance script's business.
    assert regions["sparse_moe"] > regions["single_head"]
    assert summary["user_types"]["shots"] == [0, 1, 2, 4, 8, 16]
    assert summary["inference_cost"]["personalize_seconds"] > 0
    assert load(out / "model.safetensors").num_experts == 8
