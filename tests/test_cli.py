"""The command line: one-line errors with exit status 2, a run, and a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.progress import RoundClock, format_eta
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


def test_resume_raises_rounds_of_a_finished_run(tmp_path, toy_data):
    path = write_config(tmp_path, tiny_config(toy_data, rounds=1))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    before = (out / "config.yaml").read_text()
    assert main(["run", "--resume", str(out), "--set", "rounds=2", "--quiet"]) == 0
    after = (out / "config.yaml").read_text()
    assert after == before.replace("rounds: 1\n", "rounds: 2\n") and after != before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["complete"]
    # the same as a run planned with two rounds from the start
    straight = tmp_path / "straight"
    path2 = write_config(tmp_path, tiny_config(toy_data, rounds=2))
    assert main(["run", str(path2), "--out", str(straight), "--quiet"]) == 0
    a, b = (
        load_file(str(out / "weights.safetensors")),
        load_file(str(straight / "weights.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_changes_in_one_line(tmp_path, toy_data, capsys):
    path = write_config(tmp_path, tiny_config(toy_data, rounds=2))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    before = (out / "config.yaml").read_text()
    for change, key in (("lr=0.1", "'lr'"), ("lora.r=4", "'lora.r'")):
        assert main(["run", "--resume", str(out), "--set", "rounds=3", "--set", change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --resume cannot change " + key) and "\n" not in err
    assert main(["run", "--resume", str(out), "--set", "rounds=1"]) == 2
    assert "completed 2 rounds" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before
    # setting a key to the value it has changes nothing and is allowed
    assert main(["run", "--resume", str(out), "--set", "rounds=2", "--quiet"]) == 0


def test_duplicate_yaml_key_names_key_and_line(tmp_path, toy_data, capsys):
    text = yaml.safe_dump(tiny_config(toy_data), sort_keys=False)
    path = tmp_path / "dup.yaml"
    path.write_text(text + "lora:\n  r: 4\n  r: 8\n")
    lines = len(text.splitlines())
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: config file {path}: key 'r' appears twice (lines {lines + 2} and {lines + 3})"
    )


def test_missing_model_folder_is_named(tmp_path, toy_data, capsys):
    path = write_config(tmp_path, {**tiny_config(toy_data), "model": "./models/mini"})
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model folder ./models/mini does not exist"


def test_quiet_hides_model_loading_bars(tmp_path, toy_data):
    from transformers.utils import logging as hf_logging

    path = write_config(tmp_path, tiny_config(toy_data, rounds=1))
    try:
        assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_eta_from_round_times():
    now = [0.0]
    clock = RoundClock(rounds=5, clients_per_round=4, now=lambda: now[0])
    assert clock.remaining_s() is None and format_eta(None) == ""
    clock.round_start()
    now[0] = 10.0
    clock.client(2)  # half the clients in 10 s: a round takes ~20 s, five of them 100 s
    assert clock.remaining_s() == pytest.approx(90.0)
    now[0] = 20.0
    clock.round_end()
    assert clock.remaining_s() == pytest.approx(80.0)
    clock.round_start()
    now[0] = 25.0
    assert clock.remaining_s() == pytest.approx(75.0)  # 4 rounds of 20 s, 5 s into one
    resumed = RoundClock(rounds=5, clients_per_round=4)
    resumed.resume(5)
    assert resumed.remaining_s() == 0.0
    assert [format_eta(s) for s in (42, 185, 4500)] == ["eta 42s", "eta 3m05s", "eta 1h15m"]


def test_help_points_to_list_and_bench_quick_folder(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "fedpeft list" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with --quick, under runs/" in text


def test_list_shows_methods_algorithms_and_profiles(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in (
        "lora:",
        "r = 8",
        "rank of the update",
        "fedadam",
        "jetson_tx2",
        "lte",
        "datasets",
    ):
        assert word in text, word
