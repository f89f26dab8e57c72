"""benchmarks/gpu_check.py, the benchmark half of the one-shot GPU check, run here on the CPU
at shapes / 64 (--smoke): a device run is rare and short, so a mistake in the script must
show up in CI, not on the card. Its figures are not checked: they mean nothing on a CPU."""

import re

from benchmarks import gpu_check

OPS = ["route", "dispatch", "permute", "unpermute", "grouped_mm up", "grouped_mm up, staged",
       "swiglu", "grouped_mm dx", "grouped_mm dw", "moe_ffn fwd+bwd"]


def test_every_row_of_the_gpu_table_runs(capsys, monkeypatch):
    # main() sets the module's device, smoke flag and shapes: restored after the test.
    for name in ("DEVICE", "SMOKE", "MODELS"):
        monkeypatch.setattr(gpu_check, name, getattr(gpu_check, name))
    monkeypatch.setattr(gpu_check, "MODELS", dict(gpu_check.MODELS))
    gpu_check.main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "left out for time" not in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")][1:]
    assert {row[0].lstrip("| ") for row in rows} == set(OPS)
    # Every model and routing appears; each row has its 11 columns and a finite time.
    assert {row[1] for row in rows} == {"deepseek-v3", "qwen3", "olmoe", "mixtral"}
    assert {"uniform", "skewed"} <= {row[3] for row in rows}
    for row in rows:
        assert len(row) == 11 and re.fullmatch(r"\d+\.\d{3}", row[4]), row
