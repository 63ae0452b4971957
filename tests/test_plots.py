"""Plots: valid PNGs for runs and overlays, sensible axes, atomic writes."""

from pathlib import Path

import pytest

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
