"""PNG plots of a `RoutingReport`: where the pairs go, and how evenly the experts are used.

    from smoe_ops.reward.plots import save_report_plots
    paths = save_report_plots(routing_report(model, data), "report/")

matplotlib is optional (`pip install 'smoe_ops[plots]'`) and imported only when a plot is
drawn. The figures are drawn on matplotlib's Agg canvas through the object API, never
through pyplot, so plotting neither needs a display nor changes the backend of a user's
own pyplot session (a notebook keeps its inline figures). Every PNG is written to a
temporary file in the target folder and then moved over the target with os.replace, so
a reader never sees half a file and an interrupted write leaves the old one.
"""

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union
import uuid

import torch

from smoe_ops.reward.report import RoutingReport

if TYPE_CHECKING:  # annotations only: matplotlib is optional at run time
    import matplotlib.axes
    import matplotlib.figure

__all__ = ["plot_expert_load", "plot_routing_heatmap", "save_report_plots"]

logger = logging.getLogger("smoe_ops")

PathLike = Union[str, os.PathLike]

# Above this many experts (or categories) not every tick gets a label: they would overlap.
_MAX_LABELLED_TICKS = 32
# Above this many cells the heatmap's cells are too small to carry their value as text.
_MAX_ANNOTATED_CELLS = 256


def _new_figure(width: float, height: float) -> "matplotlib.figure.Figure":
    """A matplotlib Figure on an Agg canvas; ImportError naming the extra without it."""
    try:
        # The top package first: it fails when matplotlib is absent even if a submodule
        # was cached in sys.modules.
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "smoe_ops.reward.plots needs matplotlib, which is not installed; install it "
            "with: pip install 'smoe_ops[plots]'"
        ) from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_path(caller: str, path: PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{caller}: path must end in .png, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"{caller}: the folder of path does not exist: {str(path.parent)!r}")
    return path


def _save_atomically(figure: "matplotlib.figure.Figure", path: Path) -> Path:
    """Write `figure` as a PNG to a temporary file beside `path`, then move it onto `path`
    (os.replace is atomic within one file system, hence the same folder)."""
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open rather than tempfile.mkstemp: mkstemp's mode 0600 would survive the replace
    # and hide the plot from other users; 0666 here is reduced by the umask as usual.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            figure.savefig(file, format="png", dpi=100)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", path)
    return path


def _expert_ticks(axes: "matplotlib.axes.Axes", num_experts: int) -> None:
    """One x tick per expert, labelled by id; past 32 experts, matplotlib's own integer
    ticks (one label per expert would overlap)."""
    if num_experts <= _MAX_LABELLED_TICKS:
        axes.set_xticks(range(num_experts), [str(expert) for expert in range(num_experts)])


def _sample_rows(report: RoutingReport, max_pairs: int) -> torch.Tensor:
    """Indices of up to max_pairs pairs, evenly spaced over the data (deterministic), in
    the order of their top expert, then of descending weight on it."""
    num_pairs = report.num_pairs
    if num_pairs <= max_pairs:
        sample = torch.arange(num_pairs)
    else:
        sample = torch.linspace(0, num_pairs - 1, max_pairs).round().long().unique()
    top = report.top_expert[sample]
    top_weight = report.routing_weights[sample].gather(1, top[:, None])[:, 0]
    # Sort by weight first, then stably by expert: blocks per expert, strongest on top.
    by_weight = torch.sort(top_weight, descending=True, stable=True).indices
    by_expert = torch.sort(top[by_weight], stable=True).indices
    return sample[by_weight[by_expert]]


def plot_routing_heatmap(report: RoutingReport, path: PathLike,
                         max_pairs: int = 200) -> Path:
    """Draw where the pairs are routed, as a PNG at `path` (its folder must exist).

    With known categories: the [C, K] specialization matrix (mean routing weight of each
    expert over each category's pairs; with k = 1 the fraction of the category routed
    there). Without: the [S, K] routing weights of S <= max_pairs pairs, evenly spaced over
    the data and sorted by their top expert, so a specialized router shows as blocks.
    Returns the path written.
    """
    path = _png_path("plot_routing_heatmap", path)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"plot_routing_heatmap: max_pairs must be an integer >= 1, got "
                         f"{max_pairs!r}")
    num_experts = report.num_experts
    if report.specialization is not None:
        matrix = report.specialization.float()
        row_labels = [str(category) for category in report.categories]
        title = "Mean routing weight by known category"
        row_name = "category"
    else:
        rows = _sample_rows(report, max_pairs)
        matrix = report.routing_weights[rows].float()
        row_labels = None
        title = f"Routing weights of {len(rows)} of {report.num_pairs} pairs"
        row_name = "sampled pairs, sorted by top expert"
    num_rows = matrix.shape[0]
    width = min(4.0 + 0.45 * num_experts, 20.0)
    height = min(3.0 + (0.4 * num_rows if row_labels else 0.02 * num_rows), 14.0)
    figure = _new_figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label="routing weight")
    axes.set_title(title)
    axes.set_xlabel("expert")
    axes.set_ylabel(row_name)
    _expert_ticks(axes, num_experts)
    if row_labels is not None:
        if num_rows <= _MAX_LABELLED_TICKS:
            axes.set_yticks(range(num_rows), row_labels)
        if num_rows * num_experts <= _MAX_ANNOTATED_CELLS:
            _annotate(axes, matrix)
    return _save_atomically(figure, path)


def _annotate(axes: "matplotlib.axes.Axes", matrix: torch.Tensor) -> None:
    for row, values in enumerate(matrix.tolist()):
        for column, value in enumerate(values):
            # Dark text on the bright end of viridis, light text on the dark end.
            color = "black" if value > 0.6 else "white"
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color=color)


def plot_expert_load(report: RoutingReport, path: PathLike) -> Path:
    """Draw each expert's load (fraction of the P * k routed slots) as a bar chart with
    the uniform load 1/K as a line, as a PNG at `path` (its folder must exist). Dead
    experts are marked (up to 32 experts; beyond, their zero bars show it). Returns the
    path written."""
    path = _png_path("plot_expert_load", path)
    num_experts = report.num_experts
    load = report.load.tolist()
    figure = _new_figure(min(4.0 + 0.35 * num_experts, 20.0), 4.0)
    axes = figure.add_subplot()
    axes.bar(range(num_experts), load, color="tab:blue", label="load")
    axes.axhline(1.0 / num_experts, color="tab:red", linestyle="--",
                 label=f"uniform 1/K = {1.0 / num_experts:.3f}")
    if num_experts <= _MAX_LABELLED_TICKS:
        for expert in report.dead_experts:
            axes.annotate("dead", (expert, 0.0), ha="center", va="bottom", color="tab:red",
                          fontsize=8)
    axes.set_ylim(0.0, max(max(load), 1.0 / num_experts) * 1.15)
    axes.set_title(f"Expert load ({report.num_pairs} pairs, k = {report.k}, "
                   f"{len(report.dead_experts)} dead)")
    axes.set_xlabel("expert")
    axes.set_ylabel("fraction of routed slots")
    _expert_ticks(axes, num_experts)
    axes.legend(loc="upper right")
    return _save_atomically(figure, path)


def save_report_plots(report: RoutingReport, out_dir: PathLike) -> list[Path]:
    """Write routing_heatmap.png and expert_load.png into `out_dir` (created if missing);
    returns their paths, in that order."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"save_report_plots: out_dir must be a folder, got the file "
                         f"{str(out_dir)!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_routing_heatmap(report, out_dir / "routing_heatmap.png"),
            plot_expert_load(report, out_dir / "expert_load.png")]
