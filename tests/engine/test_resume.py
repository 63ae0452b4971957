"""Resume is exact with the activation cache on: a run interrupted after its first round and
resumed ends with the same weights, simulated time and cache counters as an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import Job, build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


def _rows(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


def _run(folder: Path, config: dict, stop_before: int | None = None) -> tuple[Job, RunDir]:
    """Run ``config`` in ``folder``; with ``stop_before``, interrupt the run as round
    ``stop_before`` starts (its checkpoint holds the rounds before), then resume it in a fresh
    job (a new model and new, empty caches, as after a restart)."""
    cfg = build_config(config)
    run = RunDir.create(folder, dump_config(cfg))
    if stop_before is not None:

        def crash(kind, info):
            if kind == "round_start" and info["round"] == stop_before:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            EmbeddedEngine(build_job(cfg), run, on_event=crash).run()
        assert len(_rows(run)) == stop_before - 1
    job = build_job(cfg)
    EmbeddedEngine(job, run).run()
    return job, run


def _no_wall(value):
    """A trial record without its wall-clock seconds (the one thing a rerun may change)."""
    if isinstance(value, dict):
        return {k: _no_wall(v) for k, v in value.items() if k != "train_wall_s"}
    if isinstance(value, list):
        return [_no_wall(v) for v in value]
    return value


def _cache_state(job: Job) -> dict:
    return {
        split: (asdict(cache.stats), cache.nbytes, list(cache._stores))
        for split, cache in job.caches.items()
    }


def _assert_same_run(ref: tuple[Job, RunDir], got: tuple[Job, RunDir]) -> None:
    (ref_job, ref_run), (job, run) = ref, got
    a, b = load_file(str(ref_run.weights_path)), load_file(str(run.weights_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("sim_time_s", "sim_time_total_s", "cache_hits", "cache_misses", "cache_mb", "accuracy")
    ref_rows, rows = _rows(ref_run), _rows(run)
    assert len(ref_rows) == len(rows)
    for ref_row, row in zip(ref_rows, rows, strict=True):
        assert {k: row[k] for k in keys} == {k: ref_row[k] for k in keys}, row["round"]
        assert _no_wall(row.get("trial")) == _no_wall(ref_row.get("trial"))
    assert _cache_state(job) == _cache_state(ref_job)  # every counter, byte and LRU order


def _autofednlp(toy_data: Path) -> dict:
    return tiny_config(
        toy_data,
        method="autofednlp",
        num_clients=12,
        clients_per_round=1,
        rounds=3,
        validation_size=40,
        # depth 0 -> 1: the shallow (head only, cache from layer 2) and deep (cache from layer 1)
        # candidates keep two stores side by side; tau gives every candidate >= 3 rounds
        autofednlp={"tau": 0.035, "start_depth": 0, "depth_jump_from_zero": 1},
        activation_cache={"enabled": True, "dtype": "fp16", "max_bytes": 150_000},
        cost={"devices": ["raspberry_pi4"], "networks": ["reference_1mbps"]},
    )


def test_autofednlp_with_cache_resumes_exactly(tmp_path, toy_data):
    config = _autofednlp(toy_data)
    ref = _run(tmp_path / "ref", config)
    got = _run(tmp_path / "cut", config, stop_before=2)
    _assert_same_run(ref, got)

    # the scenario is the one described: several rounds per candidate, hits, bound evictions
    trials = [json.loads(line) for line in (ref[1].path / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3
    assert all(c["rounds"] >= 3 for t in trials for c in t["candidates"])
    stats = ref[0].caches["train"].stats
    assert stats.hits > stats.misses > 0 and stats.evictions > 0


def test_lora_with_a_frozen_bottom_resumes_exactly(tmp_path, toy_data):
    config = tiny_config(
        toy_data,
        method="lora",
        lora={"depth": 1},
        rounds=3,
        local_epochs=2,
        activation_cache={"enabled": True, "dtype": "fp16"},
        cost={"devices": ["raspberry_pi4"], "networks": ["reference_1mbps"]},
    )
    ref = _run(tmp_path / "ref", config)
    got = _run(tmp_path / "cut", config, stop_before=2)
    _assert_same_run(ref, got)
    assert ref[0].caches["train"].stats.hits > 0
