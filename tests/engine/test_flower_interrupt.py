"""Ctrl-C on the Flower engine, as a user gives it: SIGINT to the terminal's process group.

Each run is a ``fedpeft`` process in a session of its own; the test waits for round 1 to be
recorded, sends SIGINT to that whole process group (what Ctrl-C does), and checks that the run
stops within seconds, records only complete rounds, prints the resume command once, leaves no
process behind, and that the printed command resumes on the same engine to the weights of an
uninterrupted run (the embedded engine's: ``test_flower.py`` ties the two engines together).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

STOP_WITHIN_S = 30.0  # generous: two other jobs share this machine's cores in CI


def job_config(dataset: Path, clients: int) -> dict:
    # every client in every round, long enough local work that Ctrl-C lands mid-round
    return tiny_config(
        dataset,
        engine="flower",
        num_clients=clients,
        clients_per_round=clients,
        rounds=3,
        local_epochs=8,
        flower={"insecure": True, "min_nodes": 2, "round_timeout_s": 300},
    )


def fedpeft(*argv: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedpeft.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        # A terminal's foreground job takes Ctrl-C; a job a script started in the background
        # inherits SIGINT ignored (and Python then keeps it ignored): restore the default, so
        # the test sends what a user's Ctrl-C delivers wherever the suite itself was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def interrupt_after_round_1(
    proc: subprocess.Popen, run: Path, sig: signal.Signals = signal.SIGINT
) -> tuple[int, str, float, list]:
    """Wait for round 1's row, then Ctrl-C (SIGINT to the process group) or ``kill PID``
    (SIGTERM to fedpeft alone); (exit status, stderr, seconds to stop, processes)."""
    deadline = time.monotonic() + 600
    while not rows(run):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no round 1 (status {proc.returncode}): {err[-2000:]}")
        time.sleep(0.2)
    family = descendants(proc.pid)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, sig)
    sent = time.monotonic()
    try:
        _out, err = proc.communicate(timeout=120)
    finally:
        for member in [*family, *descendants(proc.pid)]:  # never leave a process behind
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
    return proc.returncode, err, time.monotonic() - sent, family


def assert_stopped(family: list[psutil.Process]) -> None:
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left running: {[(p.pid, p.cmdline()[:3]) for p in alive]}"


def assert_only_complete_rounds(run: Path, clients: int) -> None:
    recorded = rows(run)
    assert [r["round"] for r in recorded] == list(range(1, len(recorded) + 1))
    for row in recorded:
        assert len(row["clients"]) == clients and row["clients_failed"] == [], row
        assert row["bytes_up"] > 0 and row["train_loss"] == row["train_loss"], row  # not NaN


def reference(tmp_path: Path, config: dict) -> dict:
    uninterrupted = build_config({**config, "engine": "embedded"})
    run = RunDir.create(tmp_path / "reference", dump_config(uninterrupted))
    summary = EmbeddedEngine(build_job(uninterrupted), run).run()
    return {"summary": summary, "weights": load_file(str(run.weights_path))}


def assert_same_result(run: Path, expected: dict) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and [r["round"] for r in rows(run)] == [1, 2, 3]
    assert summary["bytes_up_total"] == expected["summary"]["bytes_up_total"]
    assert summary["bytes_down_total"] == expected["summary"]["bytes_down_total"]
    got = load_file(str(run / "weights.safetensors"))
    assert got.keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        assert torch.allclose(tensor, got[name], atol=1e-5), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_in_simulation_then_resume(tmp_path, toy_data, sig):
    config = job_config(toy_data, clients=4)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = fedpeft("run", "job.yaml", "--out", str(run), "--quiet", cwd=tmp_path)
    status, err, seconds, family = interrupt_after_round_1(proc, run, sig)
    assert status == 130, err[-2000:]
    assert seconds < STOP_WITHIN_S, f"took {seconds:.1f}s to stop"
    assert err.count("--resume") == 1 and f"fedpeft run --resume {run}" in err, err[-2000:]
    assert_stopped(family)
    assert_only_complete_rounds(run, 4)
    if sig == signal.SIGTERM:  # resuming is the same after either; the suite does it once
        return

    resumed = fedpeft("run", "--resume", str(run), "--quiet", cwd=tmp_path)
    _out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["engine"] == "flower"
    assert_same_result(run, reference(tmp_path, config))


def test_ctrl_c_in_a_local_deployment_then_resume(tmp_path, toy_data):
    config = job_config(toy_data, clients=2)  # one SuperNode per client, on its own rows
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = fedpeft("flower", "local", "job.yaml", "--out", str(run), cwd=tmp_path)
    status, err, seconds, family = interrupt_after_round_1(proc, run)
    assert status == 130, err[-2000:]
    assert seconds < STOP_WITHIN_S, f"took {seconds:.1f}s to stop"
    hint = f"fedpeft flower local --resume {run}"
    assert err.count("--resume") == 1 and hint in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert_stopped(family)
    assert_only_complete_rounds(run, 2)

    # `fedpeft run --resume` of a deployed run continues on a local deployment, not embedded
    resumed = fedpeft("run", "--resume", str(run), cwd=tmp_path)
    _out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert "started with fedpeft flower local" in err
    assert_same_result(run, reference(tmp_path, config))


def test_a_killed_superlink_fails_the_run_in_one_line_and_resume_finishes_it(tmp_path, toy_data):
    """The SuperLink dies mid-run (SIGKILL): fedpeft stops every process it started, says so in
    one line with the resume command, and keeps only complete rounds; resumed, the run ends
    where an uninterrupted one does."""
    config = job_config(toy_data, clients=4)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = fedpeft("run", "job.yaml", "--out", str(run), "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 600
    while not rows(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    family = descendants(proc.pid)
    superlinks = [p for p in family if "flower-superlink" in " ".join(p.cmdline())]
    assert len(superlinks) == 1, [p.cmdline() for p in family]
    superlinks[0].kill()
    try:
        _out, err = proc.communicate(timeout=180)
    finally:
        for member in [*family, *descendants(proc.pid)]:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode not in (0, 130), err[-2000:]
    assert "Traceback" not in err and f"fedpeft run --resume {run}" in err, err[-2000:]
    assert_stopped(family)
    assert_only_complete_rounds(run, 4)

    resumed = fedpeft("run", "--resume", str(run), "--quiet", cwd=tmp_path)
    _out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert_same_result(run, reference(tmp_path, config))
