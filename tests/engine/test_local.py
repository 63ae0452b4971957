"""The embedded engine end to end on the tiny model: every method, outputs, accounting, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import payload
from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine, sample_clients
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]

from fedpeft import registry  # noqa: E402

PEFT_UNITS = [name for name, spec in registry.methods().items() if spec.system is None]


def run_once(folder: Path, **config) -> tuple[dict, RunDir]:
    cfg = build_config(config)
    run = RunDir.create(folder, dump_config(cfg))
    summary = EmbeddedEngine(build_job(cfg), run).run()
    return summary, run


def metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("method", PEFT_UNITS)
def test_two_rounds_per_method(tmp_path, toy_data, method):
    summary, run = run_once(
        tmp_path / method, **tiny_config(toy_data, method=method, target_accuracy=0.01)
    )
    rows = metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in (
            "train_loss",
            "accuracy",
            "macro_f1",
            "bytes_up",
            "bytes_down",
            "sim_time_s",
            "wall_time_s",
        ):
            assert row[key] is not None and row[key] >= 0, key
    assert rows[1]["bytes_up_total"] == rows[0]["bytes_up"] + rows[1]["bytes_up"]
    weights = load_file(str(run.weights_path))
    assert sum(t.numel() for t in weights.values()) == summary["trainable_params"]
    assert summary["rounds_to_target"] == 1 and summary["bytes_to_target"] > 0
    assert (run.path / "config.yaml").is_file()


def test_bytes_are_the_serialised_trainable_tensors(tmp_path, toy_data):
    config = tiny_config(toy_data, method="lora", rounds=1)
    summary, run = run_once(tmp_path / "r", **config)
    weights = load_file(str(run.weights_path))
    one_payload = len(payload.encode(weights))
    row = metrics(run)[0]
    assert row["bytes_up"] == 2 * one_payload  # 2 clients per round, same tensors each way
    assert row["bytes_down"] == 2 * one_payload
    full_summary, _ = run_once(tmp_path / "f", **{**config, "method": "full"})
    assert full_summary["bytes_up_total"] > 20 * summary["bytes_up_total"]


def test_same_seed_same_result_other_seed_differs(tmp_path, toy_data):
    a, _ = run_once(tmp_path / "a", **tiny_config(toy_data))
    b, _ = run_once(tmp_path / "b", **tiny_config(toy_data))
    c, _ = run_once(tmp_path / "c", **tiny_config(toy_data, seed=1))
    wa, wb, wc = (load_file(str(tmp_path / n / "weights.safetensors")) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_client_sampling_is_seeded_per_round():
    assert sample_clients(0, 3, 100, 10) == sample_clients(0, 3, 100, 10)
    assert sample_clients(0, 3, 100, 10) != sample_clients(0, 4, 100, 10)
    assert len(set(sample_clients(0, 1, 100, 10))) == 10


@pytest.mark.parametrize(
    "algorithm", ["fedprox", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean"]
)
def test_other_algorithms_run(tmp_path, toy_data, algorithm):
    summary, _ = run_once(tmp_path / algorithm, **tiny_config(toy_data, algorithm=algorithm))
    assert summary["rounds_completed"] == 2


def test_validation_and_personalised_scores(tmp_path, toy_data):
    summary, run = run_once(
        tmp_path / "v", **tiny_config(toy_data, validation_size=40, personalized_eval=True)
    )
    assert "val_accuracy" in metrics(run)[0]
    assert summary["best_val_round"] in (1, 2)
    assert 0 <= summary["personalized_accuracy_mean"] <= 1


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, toy_data):
    config = tiny_config(toy_data, rounds=4, algorithm="fedadam")
    reference, _ = run_once(tmp_path / "ref", **config)

    cfg = build_config(config)
    run = RunDir.create(tmp_path / "cut", dump_config(cfg))

    def stop_in_round_3(kind, info):
        if kind == "client" and info["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        EmbeddedEngine(build_job(cfg), run, on_event=stop_in_round_3).run()
    assert [r["round"] for r in metrics(run)] == [1, 2]
    resumed = EmbeddedEngine(build_job(cfg), run).run()
    assert [r["round"] for r in metrics(run)] == [1, 2, 3, 4]
    ref_w = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    got_w = load_file(str(run.weights_path))
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert resumed["final_accuracy"] == reference["final_accuracy"]
    assert resumed["bytes_up_total"] == reference["bytes_up_total"]


def test_kill_then_resume_from_the_command_line(tmp_path, toy_data):
    """A SIGKILL mid-run leaves completed rounds intact; --resume reaches the same weights."""
    config = tiny_config(toy_data, rounds=6, num_clients=4, clients_per_round=4)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(build_config(config)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "fedpeft.cli", "run"]
    subprocess.run(
        [*cli, str(cfg_path), "--out", str(tmp_path / "ref"), "--quiet"],
        check=True,
        env=env,
        capture_output=True,
    )

    proc = subprocess.Popen(
        [*cli, str(cfg_path), "--out", str(tmp_path / "cut"), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = tmp_path / "cut" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["round"] >= 2:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(pointer.read_text())["round"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) in (done - 1, done)  # the kill may land between checkpoint and metrics
    result = subprocess.run(
        [*cli, "--resume", str(tmp_path / "cut"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    ref_w = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    got_w = load_file(str(tmp_path / "cut" / "weights.safetensors"))
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 6
