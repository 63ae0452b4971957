"""Reports from fake run folders: loading, the comparison table, incomplete runs, errors."""

import json
from pathlib import Path

import pytest
import yaml

from fedpeft.report import (
    ReportError,
    comparison_table,
    human_count,
    human_duration,
    load_run,
    report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metric_rows(
    rounds: int,
    bytes_up: int,
    accuracies: list[float | None],
    val_accuracies: list[float | None] | None = None,
) -> list[dict]:
    rows = []
    vals = val_accuracies or [None] * rounds
    for r, acc, val in zip(range(1, rounds + 1), accuracies, vals, strict=True):
        rows.append(
            {
                "round": r,
                "train_loss": 1.0 / r,
                "accuracy": acc,
                "macro_f1": None if acc is None else acc - 0.1,
                "eval_loss": None if acc is None else 0.5,
                "bytes_up": bytes_up,
                "bytes_down": bytes_up,
                "sim_time_s": 30.0,
                "wall_time_s": 2.0,
                "bytes_up_total": bytes_up * r,
                "bytes_down_total": bytes_up * r,
                "sim_time_total_s": 30.0 * r,
                "wall_time_total_s": 2.0 * r,
                "clients": [0, 3],
                **({"val_accuracy": val} if val_accuracies is not None else {}),
            }
        )
    return rows


def make_run(
    root: Path,
    name: str,
    method: str,
    bytes_up: int,
    accuracies: list[float | None],
    planned_rounds: int | None = None,
    finished: bool = True,
    trainable: int = 150_000,
    target: float | None = 0.6,
    val_accuracies: list[float | None] | None = None,
    old_format: bool = False,
    dataset: str = "ag_news",
    model: str = "tiny",
) -> Path:
    """A run folder as the trainer writes it; ``finished=False`` leaves out summary.json.

    ``old_format``: the summary of older fedpeft versions (``best_accuracy``/``best_round``, the
    maximum over test rounds, and no validation keys)."""
    folder = root / name
    folder.mkdir(parents=True)
    rounds = len(accuracies)
    config = {
        "name": name,
        "model": model,
        "dataset": dataset,
        "method": method,
        "algorithm": "fedavg",
        "partition": "dirichlet",
        "alpha": 0.5,
        "num_clients": 20,
        "clients_per_round": 4,
        "rounds": planned_rounds or rounds,
        "seed": 0,
        "target_accuracy": target,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = metric_rows(rounds, bytes_up, accuracies, val_accuracies)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if finished:
        evaluated = [(acc, r) for r, acc in enumerate(accuracies, start=1) if acc is not None]
        best_acc, best_round = max(evaluated, key=lambda pair: pair[0])
        reached = next((r for r, acc in enumerate(accuracies, 1) if acc and acc >= target), None)
        vals = val_accuracies or [None] * rounds
        with_val = [
            (val, r, acc)
            for r, (acc, val) in enumerate(zip(accuracies, vals, strict=True), 1)
            if acc is not None and val is not None
        ]
        chosen = max(with_val, key=lambda triple: triple[0]) if with_val else None
        if old_format:
            scores = {"best_accuracy": best_acc, "best_round": best_round}
        else:
            scores = {
                "oracle_best_test_accuracy": best_acc,
                "oracle_best_test_round": best_round,
                "best_val_accuracy": chosen[0] if chosen else None,
                "best_val_round": chosen[1] if chosen else None,
                "test_accuracy_at_best_val": chosen[2] if chosen else None,
                "complete": True,
            }
        summary = {
            "name": name,
            "method": method,
            "dataset": dataset,
            "algorithm": "fedavg",
            "partition": "dirichlet",
            "alpha": 0.5,
            "num_clients": 20,
            "rounds_completed": rounds,
            **scores,
            "final_accuracy": evaluated[-1][0],
            "final_macro_f1": evaluated[-1][0] - 0.1,
            "trainable_params": trainable,
            "total_params": 110_000_000,
            "bytes_up_per_round": bytes_up,
            "bytes_down_per_round": bytes_up,
            "bytes_up_total": bytes_up * rounds,
            "bytes_down_total": bytes_up * rounds,
            "sim_time_total_s": 30.0 * rounds,
            "wall_time_total_s": 2.0 * rounds,
            "target_accuracy": target,
            "rounds_to_target": reached,
            "sim_time_to_target_s": None if reached is None else 30.0 * reached,
            "bytes_to_target": None if reached is None else 2 * bytes_up * reached,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def table_rows(table: str) -> list[list[str]]:
    """Body rows of a markdown table, split into stripped cells."""
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


@pytest.fixture
def two_runs(tmp_path):
    full = make_run(
        tmp_path,
        "full-ft",
        "full",
        100_000_000,
        [0.4, 0.55, 0.7],
        trainable=110_000_000,
        val_accuracies=[0.45, 0.6, 0.68],
    )
    lora = make_run(
        tmp_path,
        "lora-r8",
        "lora",
        1_000_000,
        [None, 0.5, 0.65],
        val_accuracies=[None, 0.6, 0.55],
    )
    return full, lora


def test_load_finished_run(two_runs):
    run = load_run(two_runs[1])
    assert run.name == "lora-r8"
    assert run.complete
    assert run.summary["test_accuracy_at_best_val"] == 0.5
    assert run.config["method"] == "lora"
    assert [row["round"] for row in run.metrics] == [1, 2, 3]


def test_table_one_row_per_run_with_right_numbers(two_runs):
    table = comparison_table([load_run(path) for path in two_runs])
    full, lora = table_rows(table)
    assert full["run"] == "full-ft"
    assert lora["run"] == "lora-r8"
    assert lora["method"] == "lora"
    assert lora["partition"] == "dirichlet(0.5)"
    assert lora["clients (round/total)"] == "4/20"
    assert lora["rounds"] == "3"
    # the round best on validation (2), not the best test round (3: 65%)
    assert lora["test acc @ best val"] == "50.0% (r2)"
    assert full["test acc @ best val"] == "70.0% (r3)"
    assert "65.0% (r3)" not in table
    assert lora["final acc"] == "65.0%"
    assert lora["macro-F1"] == "55.0%"
    assert lora["trainable params"] == "150k"
    assert full["trainable params"] == "110M"
    assert lora["MB up/round"] == "1.00"
    assert full["MB up/round"] == "100"
    # full uploads 100x the bytes of lora per round
    assert lora["comm. saving vs full"] == "100x"
    assert full["comm. saving vs full"] == "1.0x"
    assert lora["rounds to target"] == "3"
    assert lora["sim time to target"] == "90.0 s"
    assert full["rounds to target"] == "3"
    assert lora["wall time"] == "6.0 s"


def test_no_full_run_means_an_estimated_saving(tmp_path):
    lora = make_run(tmp_path, "lora", "lora", 1_000_000, [0.3, 0.4])
    (row,) = table_rows(comparison_table([load_run(lora)]))
    # full fine-tuning of the 110M-parameter model: 110M x 4 bytes from each of the 2 clients
    assert row["comm. saving vs full"] == "880x (est.)"
    assert row["rounds to target"] == "not reached"
    assert row["test acc @ best val"] == "40.0% (no validation)"
    markdown = report([lora])
    assert "comm. saving vs full (est.)" in markdown and "not measured" in markdown


def test_old_run_folder_never_shows_the_best_test_round(tmp_path):
    """Older summaries kept the maximum over test rounds as best_accuracy; it is not shown."""
    old = make_run(tmp_path, "old", "lora", 1_000, [0.3, 0.7, 0.6], old_format=True)
    table = comparison_table([load_run(old)])
    (row,) = table_rows(table)
    assert row["test acc @ best val"] == "60.0% (no validation)"
    assert "70.0%" not in table


def test_old_run_folder_with_validation_in_metrics(tmp_path):
    old = make_run(
        tmp_path,
        "old-val",
        "lora",
        1_000,
        [0.3, 0.7, 0.6],
        val_accuracies=[0.5, 0.4, 0.45],
        old_format=True,
    )
    (row,) = table_rows(comparison_table([load_run(old)]))
    assert row["test acc @ best val"] == "30.0% (r1)"


def test_report_warns_about_different_datasets_and_models(tmp_path):
    a = make_run(tmp_path, "a", "lora", 1_000, [0.3])
    b = make_run(tmp_path, "b", "lora", 1_000, [0.3], dataset="sst2", model="minilm")
    markdown = report([a, b])
    warnings = [line for line in markdown.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2
    assert "datasets (ag_news, sst2)" in warnings[0]
    assert "models (minilm, tiny)" in warnings[1]
    assert not [line for line in report([a]).splitlines() if line.startswith("Warning:")]


def test_incomplete_run_is_flagged_and_derived_from_metrics(tmp_path):
    folder = make_run(
        tmp_path,
        "killed",
        "lora",
        2_000_000,
        [0.3, None, 0.62, 0.61],
        planned_rounds=10,
        finished=False,
    )
    run = load_run(folder)
    assert not run.complete
    assert run.summary is None
    (row,) = table_rows(comparison_table([run]))
    assert row["run"] == "killed (incomplete)"
    assert row["rounds"] == "4/10"
    assert row["test acc @ best val"] == "61.0% (no validation)"
    assert row["final acc"] == "61.0%"
    assert row["MB up/round"] == "2.00"
    assert row["trainable params"] == "—"
    assert row["rounds to target"] == "3"
    assert row["sim time to target"] == "90.0 s"
    assert row["wall time"] == "8.0 s"


def test_run_with_only_config_loads(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: fresh\nmethod: prefix\nrounds: 5\n")
    run = load_run(folder)
    assert run.metrics == []
    assert not run.complete
    (row,) = table_rows(comparison_table([run]))
    assert row["rounds"] == "0/5"
    assert row["test acc @ best val"] == "—"


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ReportError, match="not a fedpeft run folder") as info:
        load_run(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_metrics_line_names_file_and_line(two_runs):
    metrics = two_runs[0] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = '{"round": 2, "accuracy": '
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl:2: not valid JSON"):
        load_run(two_runs[0])


def test_non_object_metrics_line_is_an_error(two_runs):
    metrics = two_runs[1] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "[1, 2]\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl:4: expected a JSON object"):
        load_run(two_runs[1])


def test_half_written_last_line_of_running_run_is_skipped(tmp_path):
    folder = make_run(
        tmp_path, "running", "lora", 1_000, [0.3, 0.4], planned_rounds=5, finished=False
    )
    metrics = folder / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "acc')
    assert len(load_run(folder).metrics) == 2


def test_malformed_summary_is_an_error(two_runs):
    (two_runs[0] / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"summary\.json"):
        load_run(two_runs[0])


def test_report_writes_markdown_and_plots(two_runs, tmp_path):
    out = tmp_path / "report"
    markdown = report(list(two_runs), out)
    assert (out / "report.md").read_text() == markdown
    assert len(table_rows(markdown)) == 2
    assert "Target accuracy: 60.0%." in markdown
    for name in ("accuracy_vs_round", "accuracy_vs_sim_time", "accuracy_vs_bytes"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 2000
        assert f"({name}.png)" in markdown


def test_report_without_out_dir_writes_nothing(two_runs, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    markdown = report(list(two_runs), None)
    assert "| full-ft |" in markdown
    assert "incomplete" not in markdown.lower()
    assert sorted(tmp_path.rglob("*")) == before


def test_report_lists_incomplete_runs(two_runs, tmp_path):
    killed = make_run(tmp_path, "killed", "lora", 1_000, [0.2], planned_rounds=9, finished=False)
    markdown = report([*two_runs, killed])
    assert "Incomplete" in markdown
    assert "killed (incomplete)" in markdown


def test_report_of_nothing_is_an_error():
    with pytest.raises(ReportError):
        report([], None)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "—"),
        (950, "950"),
        (150_000, "150k"),
        (1_234_567, "1.2M"),
        (7e9, "7.0B"),
        (12_500, "12k"),
    ],
)
def test_human_count(n, text):
    assert human_count(n) == text


@pytest.mark.parametrize(("s", "text"), [(42, "42.0 s"), (300, "5.0 min"), (10_800, "3.0 h")])
def test_human_duration(s, text):
    assert human_duration(s) == text


def test_summary_written_mid_run_is_incomplete(tmp_path):
    """The trainer rewrites summary.json after every round; "complete": false is not finished."""
    folder = make_run(tmp_path, "midway", "lora", 1_000, [0.3, 0.4], planned_rounds=6)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    run = load_run(folder)
    assert not run.complete
    (row,) = table_rows(comparison_table([run]))
    assert row["run"] == "midway (incomplete)" and row["rounds"] == "2/6"
