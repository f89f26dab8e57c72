"""The report's PNG plots: valid files, written atomically, with and without categories,
and a clear error without matplotlib (that test runs whether or not it is installed)."""

import importlib.util
import os
import sys

import pytest
import torch

from smoe_ops.reward import PreferenceData, routing_report
from smoe_ops.reward import plots
from tests.test_reward_report import graded_routing, hand_built

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'smoe_ops[plots]')",
)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    # A blank or failed canvas compresses to a few hundred bytes; axes, labels, a colour
    # bar and text take several kilobytes.
    assert len(data) > 5000, f"{path} has only {len(data)} bytes"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (width, height)


def assert_no_leftovers(folder, expected):
    assert sorted(os.listdir(folder)) == sorted(expected)  # no temporary files remain


@needs_matplotlib
def test_plots_with_categories(tmp_path):
    model, data = hand_built(k=1)
    report = routing_report(model, data)
    heatmap = plots.plot_routing_heatmap(report, tmp_path / "heatmap.png")
    load = plots.plot_expert_load(report, str(tmp_path / "load.png"))  # str works too
    assert heatmap == tmp_path / "heatmap.png" and load == tmp_path / "load.png"
    assert_png(heatmap)
    assert_png(load)
    assert_no_leftovers(tmp_path, ["heatmap.png", "load.png"])


@needs_matplotlib
def test_heatmap_without_categories_samples_pairs(tmp_path):
    model, data = graded_routing()
    bare = routing_report(model, PreferenceData(data.context, data.chosen, data.rejected))
    path = plots.plot_routing_heatmap(bare, tmp_path / "heatmap.png", max_pairs=5)
    assert_png(path)
    rows = plots._sample_rows(bare, 5)
    # Evenly spaced: pairs 0, 2, 4, 5, 7 (linspace 0..7 rounded); grouped by top expert
    # (0: pairs 0, 7, 5 by weight 0.95, 0.95, 0.88; 1: pair 2; 2: pair 4).
    assert rows.tolist() == [0, 7, 5, 2, 4]
    assert plots._sample_rows(bare, 100).tolist()[:3] == [0, 7, 5]


@needs_matplotlib
def test_save_report_plots_replaces_files_atomically(tmp_path):
    model, data = graded_routing()
    report = routing_report(model, data)
    out_dir = tmp_path / "new" / "folder"  # created on demand
    paths = plots.save_report_plots(report, out_dir)
    assert [path.name for path in paths] == ["routing_heatmap.png", "expert_load.png"]
    for path in paths:
        assert_png(path)
    before = paths[1].read_bytes()
    paths[1].write_bytes(b"stale")
    plots.save_report_plots(report, out_dir)  # overwrites in place
    assert paths[1].read_bytes() == before
    assert_no_leftovers(out_dir, ["expert_load.png", "routing_heatmap.png"])


@needs_matplotlib
def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    model, data = hand_built(k=1)
    report = routing_report(model, data)
    target = tmp_path / "load.png"
    target.write_bytes(b"old")

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_expert_load(report, target)
    assert target.read_bytes() == b"old"
    assert_no_leftovers(tmp_path, ["load.png"])


@needs_matplotlib
def test_many_experts_stay_readable(tmp_path):
    # 40 experts: past the 32 labelled ticks, the plots still draw.
    from smoe_ops.reward import SparseMoERewardModel

    model = SparseMoERewardModel(6, 4, num_experts=40, k=3)
    gen = torch.Generator().manual_seed(0)
    data = PreferenceData(torch.randn(300, 6, generator=gen), torch.randn(300, 4, generator=gen),
                          torch.randn(300, 4, generator=gen))
    for path in plots.save_report_plots(routing_report(model, data), tmp_path):
        assert_png(path)


def test_plots_reject_bad_paths(tmp_path):
    model, data = hand_built(k=1)
    report = routing_report(model, data)
    with pytest.raises(ValueError, match="path must end in .png, got"):
        plots.plot_expert_load(report, tmp_path / "load.pdf")
    with pytest.raises(ValueError, match="folder of path does not exist"):
        plots.plot_routing_heatmap(report, tmp_path / "missing" / "heatmap.png")
    with pytest.raises(ValueError, match="max_pairs must be an integer >= 1, got 0"):
        plots.plot_routing_heatmap(report, tmp_path / "heatmap.png", max_pairs=0)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="out_dir must be a folder"):
        plots.save_report_plots(report, tmp_path / "file")
    assert_no_leftovers(tmp_path, ["file"])


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model, data = hand_built(k=1)
    report = routing_report(model, data)
    with pytest.raises(ImportError, match=r"pip install 'smoe_ops\[plots\]'"):
        plots.plot_expert_load(report, tmp_path / "load.png")
    assert_no_leftovers(tmp_path, [])
