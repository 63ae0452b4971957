"""Plots: valid PNGs for runs and overlays, sensible axes, atomic writes."""

from pathlib import Path

import pytest
from matplotlib.ticker import MaxNLocator

from fedpeft import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_metrics(rounds: int, bytes_up: int, sim_time_s: float = 2.0, eval_every: int = 1):
    """Rows shaped like metrics.jsonl; rounds off the eval schedule have null accuracy."""
    rows = []
    for r in range(1, rounds + 1):
        evaluated = r % eval_every == 0
        acc = 0.25 + 0.5 * r / rounds
        rows.append(
            {
                "round": r,
                "train_loss": 1.5 / r,
                "accuracy": acc if evaluated else None,
                "macro_f1": acc - 0.05 if evaluated else None,
                "eval_loss": 1.0 / r if evaluated else None,
                "bytes_up": bytes_up,
                "bytes_down": 2 * bytes_up,
                "sim_time_s": sim_time_s,
                "wall_time_s": 0.5,
                "bytes_up_total": bytes_up * r,
                "bytes_down_total": 2 * bytes_up * r,
                "sim_time_total_s": sim_time_s * r,
                "wall_time_total_s": 0.5 * r,
                "clients": [0, 1],
            }
        )
    return rows


def assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000


def test_plot_run_writes_four_valid_pngs(tmp_path):
    paths = plots.plot_run(fake_metrics(5, 10_000), tmp_path / "plots", "toy run")
    names = [p.name for p in paths]
    assert names == [
        "accuracy_vs_round.png",
        "accuracy_vs_sim_time.png",
        "accuracy_vs_bytes.png",
        "loss_vs_round.png",
    ]
    for path in paths:
        assert_png(path)
    # nothing but the PNGs is left behind (no temp files)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)


def test_null_accuracy_rounds_are_skipped(tmp_path):
    metrics = fake_metrics(6, 1_000, eval_every=3)
    paths = plots.plot_run(metrics, tmp_path, "sparse eval")
    for path in paths:
        assert_png(path)
    xs, ys = plots._points(metrics, plots.VIEWS[0])
    assert xs == [3.0, 6.0]
    assert len(ys) == 2


def test_run_with_no_evaluation_yet_still_plots(tmp_path):
    metrics = fake_metrics(2, 1_000, eval_every=10)
    for path in plots.plot_run(metrics, tmp_path, "nothing evaluated"):
        assert_png(path)


def test_empty_metrics_still_plot(tmp_path):
    for path in plots.plot_run([], tmp_path, "just started"):
        assert_png(path)


def test_overlay_one_line_per_run(tmp_path):
    runs = [("full", fake_metrics(4, 400_000_000)), ("lora", fake_metrics(4, 1_000_000))]
    paths = plots.plot_overlay(runs, tmp_path)
    assert len(paths) == 4
    for path in paths:
        assert_png(path)


def test_cumulative_axes_fall_back_to_summing_steps():
    metrics = [
        {"round": 1, "bytes_up": 10, "bytes_down": 5, "sim_time_s": 3.0},
        {"round": 2, "bytes_up": 10, "bytes_down": 5, "sim_time_s": 4.0},
    ]
    assert plots._bytes(metrics) == [15.0, 30.0]
    assert plots._sim_time(metrics) == [3.0, 7.0]


@pytest.mark.parametrize(
    ("seconds", "unit"), [(30, "s"), (119, "s"), (600, "min"), (7199, "min"), (36_000, "h")]
)
def test_time_units(seconds, unit):
    assert plots._time_unit(seconds)[0] == unit


@pytest.mark.parametrize(("n", "unit"), [(5e5, "kB"), (3e7, "MB"), (2e10, "GB")])
def test_byte_units(n, unit):
    assert plots._bytes_unit(n)[0] == unit


def test_log_scale_only_past_two_decades():
    assert not plots._spans_decades([1.0, 50.0, 100.0])
    assert plots._spans_decades([1.0, 101.0])
    assert not plots._spans_decades([])
    assert not plots._spans_decades([0.0])


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "accuracy_vs_round.png"
    target.write_bytes(b"old")

    def broken_savefig(self, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(plots.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_run(fake_metrics(2, 100), tmp_path, "broken")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy_vs_round.png"]


def test_round_axes_have_integer_ticks():
    lines = [(None, fake_metrics(3, 1_000))]
    for view in plots.VIEWS:
        axis = plots.view_figure(lines, view, "ticks").axes[0].xaxis
        locator = axis.get_major_locator()
        is_integer = isinstance(locator, MaxNLocator) and locator._integer
        assert is_integer == (view.x_label == "round"), view.filename
        if view.x_label == "round":
            ticks = [t for t in locator() if 1 <= t <= 3]
            assert ticks and all(float(t).is_integer() for t in ticks)
    depth = [(None, [{**row, "depth": 2, "width": 8} for row in fake_metrics(3, 1_000)])]
    for ax in plots.depth_width_figure(depth, "layout").axes:
        assert isinstance(ax.yaxis.get_major_locator(), MaxNLocator)


def partition_summary(num_clients: int, num_labels: int) -> dict:
    clients = [
        {"client": k, "train_label_counts": [(k + label) % 7 + 1 for label in range(num_labels)]}
        for k in range(num_clients)
    ]
    return {
        "scheme": "dirichlet",
        "num_clients": num_clients,
        "num_labels": num_labels,
        "clients": clients,
    }


@pytest.mark.parametrize(("num_clients", "num_labels"), [(4, 4), (20, 4), (100, 20), (8, 12)])
def test_partition_legend_does_not_cover_the_title(tmp_path, num_clients, num_labels):
    names = [f"a long label name {i}" for i in range(num_labels)]
    fig = plots.partition_figure(partition_summary(num_clients, num_labels), names)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    ax = fig.axes[0]
    title = ax.title.get_window_extent(renderer)
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(title)
    assert not box.overlaps(ax.get_window_extent(renderer))
    path = plots.plot_partition(partition_summary(num_clients, num_labels), tmp_path / "p.png")
    assert_png(path)
