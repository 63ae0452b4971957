"""The command line: one-line errors with exit status 2, a run, and a report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedpeft.cli import main
from tests.conftest import tiny_config


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"lr": "fast"}, "lr:"),
        ({"dataset": "/no/such/folder"}, "/no/such/folder"),
        ({"model": "/no/such/model"}, "/no/such/model"),
        ({"partition": "natural", "partition_field": "colour"}, "colour"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, toy_data, capsys, change, message):
    path = write_config(tmp_path, {**tiny_config(toy_data), **change})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_bad_override_and_missing_config(tmp_path, toy_data, capsys):
    path = write_config(tmp_path, tiny_config(toy_data))
    assert main(["run", str(path), "--set", "lora.rank=4"]) == 2
    assert "unknown config key 'lora.rank'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_run_then_report_then_refuse_overwrite(tmp_path, toy_data, capsys):
    path = write_config(tmp_path, tiny_config(toy_data))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| run |" in printed and str(out) in printed
    for name in (
        "metrics.jsonl",
        "summary.json",
        "weights.safetensors",
        "partition.json",
        "partition.png",
        "accuracy_vs_round.png",
        "accuracy_vs_sim_time.png",
        "accuracy_vs_bytes.png",
    ):
        assert (out / name).is_file(), name
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["report", str(tmp_path)]) == 2


def test_resume_of_a_finished_run_changes_nothing(tmp_path, toy_data):
    path = write_config(tmp_path, tiny_config(toy_data))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert (out / "metrics.jsonl").read_text() == before
