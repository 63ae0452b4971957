"""Simulated faults in the embedded engine: crashes, stragglers, the deadline, the quorum and
its retries, the run stopping in one line, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft import cli
from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.engine.run import sample_clients
from fedpeft.faults import FaultPlan, plan_faults
from fedpeft.job import build_faults, build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

WALL = ("wall_time_s", "wall_time_total_s", "train_wall_s")


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _config(toy_data, **extra):
    base = {"rounds": 1, "num_clients": 4, "clients_per_round": 3, **extra}
    return build_config(tiny_config(toy_data, **base))


def _run(folder: Path, config, on_event=None):
    run = RunDir.create(folder, dump_config(config))
    summary = EmbeddedEngine(build_job(config), run, on_event=on_event).run()
    return _metrics(folder), summary


def _plan(config) -> FaultPlan:
    return build_faults(config)


# -- the plan ---------------------------------------------------------------------------------
def test_no_fault_configured_means_no_plan():
    assert plan_faults(0, 10) is None
    assert plan_faults(0, 10, straggler_fraction=0.5) is None  # factor 1: nobody is slower


def test_crashes_are_seeded_and_happen_at_the_configured_rate():
    plan = plan_faults(3, 100, crash_prob=0.3)
    draws = [plan.crashed(rnd, cid) for rnd in range(1, 21) for cid in range(100)]
    assert draws == [plan.crashed(rnd, cid) for rnd in range(1, 21) for cid in range(100)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert any(plan.crashed(1, c, 0) != plan.crashed(1, c, 1) for c in range(100))


def test_stragglers_are_a_fixed_seeded_share_of_clients():
    plan = plan_faults(0, 10, straggler_fraction=0.3, straggler_factor=4)
    assert len(plan.stragglers) == 3
    assert (
        plan.stragglers == plan_faults(0, 10, straggler_fraction=0.3, straggler_factor=4).stragglers
    )
    slow = plan.stragglers[0]
    fast = next(c for c in range(10) if c not in plan.stragglers)
    assert plan.client_time_s(slow, 2.0) == 8.0 and plan.client_time_s(fast, 2.0) == 2.0


def test_faults_are_refused_where_they_cannot_run(toy_data):
    with pytest.raises(ConfigError, match="autofednlp runs its own rounds"):
        _config(toy_data, method="autofednlp", num_clients=9, faults={"crash_prob": 0.1})
    assert _config(toy_data, engine="flower", faults={"deadline_s": 5}).engine == "flower"
    with pytest.raises(ConfigError, match="min_clients: 4 is more than clients_per_round"):
        _config(toy_data, faults={"min_clients": 4})


# -- the engine -------------------------------------------------------------------------------
def test_crashed_clients_train_nothing_and_only_their_download_counts(tmp_path, toy_data):
    config = _config(toy_data, faults={"crash_prob": 0.5}, seed=1)
    plan = _plan(config)
    clients = sample_clients(config.seed, 1, 4, 3)
    crashed = [c for c in clients if plan.crashed(1, c)]
    assert 0 < len(crashed) < 3, "the seed should crash some but not all clients"
    (row,), _ = _run(tmp_path / "crash", config)
    (clean,), _ = _run(tmp_path / "clean", _config(toy_data, seed=1))
    assert row["clients_dropped"] == [
        {"cid": c, "reason": "crashed", "attempt": 0} for c in crashed
    ]
    assert row["bytes_down"] == clean["bytes_down"]
    per_client = clean["bytes_up"] // 3
    assert row["bytes_up"] == per_client * (3 - len(crashed))
    assert row["accuracy"] is not None


def test_every_client_crashing_keeps_the_model(tmp_path, toy_data):
    config = _config(toy_data, faults={"crash_prob": 1.0})
    job = build_job(config)
    before = {k: v.clone() for k, v in job.initial_state.items()}
    EmbeddedEngine(job, RunDir.create(tmp_path / "r", dump_config(config))).run()
    (row,) = _metrics(tmp_path / "r")
    assert len(row["clients_dropped"]) == 3 and row["bytes_up"] == 0
    weights = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert all(torch.equal(weights[k], before[k]) for k in before)


def test_stragglers_stretch_simulated_time(tmp_path, toy_data):
    (clean,), _ = _run(tmp_path / "clean", _config(toy_data))
    slow = {"straggler_fraction": 1.0, "straggler_factor": 3.0}
    (row,), _ = _run(tmp_path / "slow", _config(toy_data, faults=slow))
    assert row["sim_time_s"] == pytest.approx(3 * clean["sim_time_s"])
    assert row["stragglers_in_round"] == clean["clients"]
    assert row["clients_dropped"] == []


def test_clients_past_the_deadline_are_dropped_and_the_round_is_capped(tmp_path, toy_data):
    (clean,), _ = _run(tmp_path / "clean", _config(toy_data))
    deadline = clean["sim_time_s"] / 2
    (row,), _ = _run(tmp_path / "late", _config(toy_data, faults={"deadline_s": deadline}))
    assert row["sim_time_s"] == pytest.approx(deadline)
    dropped = {d["cid"] for d in row["clients_dropped"]}
    assert dropped and all(d["reason"] == "deadline" for d in row["clients_dropped"])
    assert row["bytes_up"] == clean["bytes_up"]  # late replies were sent, just not used


def _seed_where(config_for_seed, wanted) -> int:
    for seed in range(200):
        config = config_for_seed(seed)
        if wanted(config, _plan(config)):
            return seed
    raise AssertionError("no seed gives the wanted faults")


def test_a_round_short_of_min_clients_is_retried_with_a_fresh_sample(tmp_path, toy_data):
    def make(seed):
        return _config(toy_data, seed=seed, faults={"crash_prob": 0.4, "min_clients": 3})

    def first_fails_second_passes(config, plan):
        first = sample_clients(config.seed, 1, 4, 3)
        second = plan.sample(1, 1, 4, 3)
        return any(plan.crashed(1, c, 0) for c in first) and not any(
            plan.crashed(1, c, 1) for c in second
        )

    seed = _seed_where(make, first_fails_second_passes)
    config = make(seed)
    (row,), _ = _run(tmp_path / "r", config)
    assert row["attempts"] == 2
    assert row["clients"] == _plan(config).sample(1, 1, 4, 3)
    assert {d["attempt"] for d in row["clients_dropped"]} == {0}
    crashed = len(row["clients_dropped"])
    assert row["bytes_up"] // (6 - crashed) * (6 - crashed) == row["bytes_up"]  # both attempts


def test_the_run_stops_in_one_line_when_retries_run_out(tmp_path, toy_data, capsys):
    def make(seed):
        faults = {"crash_prob": 0.5, "min_clients": 2, "retries": 0}
        return _config(toy_data, seed=seed, rounds=2, clients_per_round=2, faults=faults)

    def round_one_passes_round_two_fails(config, plan):
        ok = [
            sum(not plan.crashed(r, c) for c in sample_clients(config.seed, r, 4, 2)) >= 2
            for r in (1, 2)
        ]
        return ok == [True, False]

    seed = _seed_where(make, round_one_passes_round_two_fails)
    data = tiny_config(
        toy_data,
        seed=seed,
        rounds=2,
        num_clients=4,
        clients_per_round=2,
        faults={"crash_prob": 0.5, "min_clients": 2, "retries": 0},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    code = cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "round 2: fewer than faults.min_clients (2)" in err[0]
    assert [r["round"] for r in _metrics(tmp_path / "r")] == [1]
    assert json.loads((tmp_path / "r" / "checkpoint.json").read_text())["round"] == 1


def test_a_resumed_run_with_faults_equals_an_uninterrupted_one(tmp_path, toy_data):
    faults = {
        "crash_prob": 0.3,
        "straggler_fraction": 0.5,
        "straggler_factor": 2.5,
        "deadline_s": 1e9,
        "min_clients": 1,
    }
    config = _config(toy_data, rounds=3, faults=faults, seed=2)
    whole, _ = _run(tmp_path / "whole", config)

    def stop(kind, info):
        if kind == "round_start" and info["round"] == 2:
            raise KeyboardInterrupt

    run = RunDir.create(tmp_path / "part", dump_config(config))
    with pytest.raises(KeyboardInterrupt):
        EmbeddedEngine(build_job(config), run, on_event=stop).run()
    EmbeddedEngine(build_job(config), RunDir.open(tmp_path / "part")).run()
    resumed = _metrics(tmp_path / "part")
    strip = [{k: v for k, v in row.items() if k not in WALL} for row in whole]
    assert [{k: v for k, v in row.items() if k not in WALL} for row in resumed] == strip
    a = load_file(str(tmp_path / "whole" / "weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
