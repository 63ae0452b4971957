"""Accuracy curves of one run, or of several runs side by side, as PNG files.

Three views answer the questions a federated PEFT study asks: how many rounds, how much simulated
device time and how many bytes on the wire it takes to reach an accuracy; a fourth shows the
training loss per round. Figures are drawn on an Agg canvas directly, without pyplot, so nothing
opens a window, the global backend is left alone, and no figure outlives the call. Files are
written to a temporary name and renamed, so a killed process never leaves half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Metrics = list[dict[str, Any]]
Unit = tuple[str, float]  # (label, divisor applied to raw values)

ACCURACY_VS_ROUND = "accuracy_vs_round.png"
ACCURACY_VS_SIM_TIME = "accuracy_vs_sim_time.png"
ACCURACY_VS_BYTES = "accuracy_vs_bytes.png"
LOSS_VS_ROUND = "loss_vs_round.png"
DEPTH_WIDTH = "depth_width.png"  # only for runs whose metrics carry depth (AutoFedNLP)

_LOG_SPAN = 100.0  # switch an axis to log scale when it spans more than two decades
_MARKERS_UP_TO = 40  # draw point markers while a line has this many points or fewer


def _rounds(metrics: Metrics) -> list[float | None]:
    return [row.get("round") for row in metrics]


def _cumulative(
    metrics: Metrics, total_keys: tuple[str, ...], step_keys: tuple[str, ...]
) -> list[float | None]:
    """Per row, the logged running total; older logs without totals are summed from the steps."""
    values: list[float | None] = []
    running = 0.0
    for row in metrics:
        running += sum(float(row.get(key) or 0) for key in step_keys)
        totals = [row.get(key) for key in total_keys]
        values.append(float(sum(totals)) if all(t is not None for t in totals) else running)
    return values


def _sim_time(metrics: Metrics) -> list[float | None]:
    return _cumulative(metrics, ("sim_time_total_s",), ("sim_time_s",))


def _bytes(metrics: Metrics) -> list[float | None]:
    return _cumulative(metrics, ("bytes_up_total", "bytes_down_total"), ("bytes_up", "bytes_down"))


def _time_unit(largest_s: float) -> Unit:
    """Seconds up to two minutes, minutes up to two hours, hours beyond."""
    if largest_s < 120:
        return "s", 1.0
    if largest_s < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _bytes_unit(largest: float) -> Unit:
    """Decimal units, as network links are quoted; kB only for toy models."""
    if largest < 1e6:
        return "kB", 1e3
    if largest < 1e9:
        return "MB", 1e6
    return "GB", 1e9


@dataclass(frozen=True)
class _View:
    """One figure: which column against which, and how to label and scale the x axis."""

    filename: str
    x_of: Callable[[Metrics], list[float | None]]
    x_label: str
    y_key: str
    y_label: str
    y_scale: float = 1.0
    unit_of: Callable[[float], Unit] | None = None
    log_x_allowed: bool = False


VIEWS = (
    _View(ACCURACY_VS_ROUND, _rounds, "round", "accuracy", "test accuracy (%)", 100.0),
    _View(
        ACCURACY_VS_SIM_TIME,
        _sim_time,
        "simulated time",
        "accuracy",
        "test accuracy (%)",
        100.0,
        unit_of=_time_unit,
    ),
    _View(
        ACCURACY_VS_BYTES,
        _bytes,
        "bytes exchanged (up + down)",
        "accuracy",
        "test accuracy (%)",
        100.0,
        unit_of=_bytes_unit,
        log_x_allowed=True,
    ),
    _View(LOSS_VS_ROUND, _rounds, "round", "train_loss", "train loss"),
)


def _points(metrics: Metrics, view: _View) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of a view; rounds without a value (not evaluated) are skipped."""
    xs, ys = [], []
    for x, row in zip(view.x_of(metrics), metrics, strict=True):
        y = row.get(view.y_key)
        if x is None or y is None:
            continue
        xs.append(float(x))
        ys.append(float(y) * view.y_scale)
    return xs, ys


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > _LOG_SPAN


def _save_atomic(fig: Figure, path: Path) -> None:
    """Write beside the target and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _draw(lines: list[tuple[str | None, Metrics]], view: _View, title: str, path: Path) -> None:
    _save_atomic(view_figure(lines, view, title), path)


def view_figure(lines: list[tuple[str | None, Metrics]], view: _View, title: str) -> Figure:
    """One figure for one view; x units (and log scale) are chosen over all lines together."""
    series = [(label, _points(metrics, view)) for label, metrics in lines]
    all_x = [x for _, (xs, _) in series for x in xs]
    unit_label, divisor = view.unit_of(max(all_x, default=0.0)) if view.unit_of else ("", 1.0)
    log_x = view.log_x_allowed and _spans_decades(all_x)

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in series:
        if log_x:  # a log axis cannot show x = 0
            ys = [y for x, y in zip(xs, ys, strict=True) if x > 0]
            xs = [x for x in xs if x > 0]
        marker = "o" if len(xs) <= _MARKERS_UP_TO else None
        ax.plot([x / divisor for x in xs], ys, marker=marker, markersize=3, label=label)
    if not all_x:
        ax.text(0.5, 0.5, "no values logged yet", transform=ax.transAxes, ha="center")
    if log_x:
        ax.set_xscale("log")
    if view.x_of is _rounds:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 2.5
    ax.set_xlabel(f"{view.x_label} ({unit_label})" if unit_label else view.x_label)
    ax.set_ylabel(view.y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(label for label, _ in lines):
        ax.legend(fontsize="small")
    return fig


def _plot_views(lines: list[tuple[str | None, Metrics]], out_dir: Path, title: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for view in VIEWS:
        path = out_dir / view.filename
        _draw(lines, view, title, path)
        paths.append(path)
    if any(row.get("depth") is not None for _, metrics in lines for row in metrics):
        paths.append(_draw_depth_width(lines, out_dir / DEPTH_WIDTH, title))
    return paths


def _draw_depth_width(lines: list[tuple[str | None, Metrics]], path: Path, title: str) -> Path:
    _save_atomic(depth_width_figure(lines, title), path)
    return path


def depth_width_figure(lines: list[tuple[str | None, Metrics]], title: str) -> Figure:
    """Adapter depth and width against simulated time, for runs that change them (AutoFedNLP)."""
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    largest = max((x or 0.0 for _, m in lines for x in _sim_time(m)), default=0.0)
    unit_label, divisor = _time_unit(largest)
    for label, metrics in lines:
        points = [
            (x / divisor, row["depth"], row.get("width"))
            for x, row in zip(_sim_time(metrics), metrics, strict=True)
            if x is not None and row.get("depth") is not None
        ]
        if not points:
            continue
        xs = [0.0] + [p[0] for p in points]
        depths = [points[0][1]] + [p[1] for p in points]
        widths = [points[0][2]] + [p[2] for p in points]
        top.step(xs, depths, where="post", label=label)
        bottom.step(xs, widths, where="post", label=label)
    top.set_ylabel("adapter depth")
    bottom.set_ylabel("adapter width")
    bottom.set_xlabel(f"simulated time ({unit_label})")
    top.set_title(title)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers and units are counts
    if any(label for label, _ in lines):
        top.legend(fontsize="small")
    return fig


def plot_run(metrics: Metrics, out_dir: Path, title: str) -> list[Path]:
    """Accuracy against rounds, simulated time and bytes, plus train loss per round.

    Returns the four PNG paths (accuracy views first, then ``loss_vs_round.png``).
    """
    return _plot_views([(None, metrics)], out_dir, title)


def plot_overlay(
    runs: list[tuple[str, Metrics]], out_dir: Path, title: str = "run comparison"
) -> list[Path]:
    """The same four views with one labelled line per run, for comparing methods or settings."""
    return _plot_views(list(runs), out_dir, title)


PARTITION_MAX_CLIENTS = 100
PARTITION_MAX_LEGEND = 20  # more labels than this get no legend


def partition_figure(summary: dict[str, Any], label_names: list[str] | None = None) -> Figure:
    """One stacked bar of train label counts per client (the first 100), from
    ``partition_summary``; the legend sits below the axes, clear of the title."""
    clients = summary["clients"][:PARTITION_MAX_CLIENTS]
    num_labels = summary["num_labels"]
    names = label_names or [str(i) for i in range(num_labels)]
    fig = Figure(figsize=(max(6.0, 0.12 * len(clients) + 3), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(clients)))
    bottom = [0.0] * len(clients)
    for label in range(num_labels):
        heights = [float(c["train_label_counts"][label]) for c in clients]
        ax.bar(positions, heights, bottom=bottom, width=0.9, label=names[label])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    shown = (
        f"first {len(clients)} of {summary['num_clients']}"
        if summary["num_clients"] > len(clients)
        else f"{len(clients)}"
    )
    ax.set_title(f"{summary['scheme']} partition: train labels per client ({shown} clients)")
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if num_labels <= PARTITION_MAX_LEGEND:
        fig.legend(fontsize="small", ncols=min(num_labels, 5), loc="outside lower center")
    return fig


def plot_partition(
    summary: dict[str, Any], path: Path, label_names: list[str] | None = None
) -> Path:
    """Save ``partition_figure`` as a PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(partition_figure(summary, label_names), path)
    return path
