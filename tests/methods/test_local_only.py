"""Personalisation baselines: local-only training, and FedAvg followed by local fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


def _run(folder, **config):
    cfg = build_config(config)
    job = build_job(cfg)
    summary = EmbeddedEngine(job, RunDir.create(folder, dump_config(cfg))).run()
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return job, summary, rows


def test_local_only_keeps_one_module_per_client_and_sends_nothing(tmp_path, toy_data):
    job, summary, rows = _run(
        tmp_path / "r",
        **tiny_config(toy_data, method="local", personalized_eval=True, rounds=3, lr=5e-2),
    )
    final = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in job.initial_state.items())  # never aggregated
    empty = rows[0]["bytes_up"] / len(rows[0]["clients"])
    assert empty < 64  # an empty safetensors message per client
    store = RunDir(tmp_path / "r").load_checkpoint().extra["store"]
    trained = {c for r in rows for c in r["clients"]}
    assert {int(c) for c in store} == trained
    assert summary["personalized_accuracy_mean"] is not None


def test_local_only_needs_personalised_scores(toy_data):
    with pytest.raises(ConfigError, match="personalized_eval"):
        build_config(tiny_config(toy_data, method="local"))


def test_local_finetuning_changes_the_personalised_score_only(tmp_path, toy_data):
    base = tiny_config(toy_data, method="adapter", personalized_eval=True, rounds=2)
    _job, plain, _rows = _run(tmp_path / "a", **base)
    _job, tuned, _rows = _run(tmp_path / "b", **base, personalized_finetune_epochs=2)
    assert tuned["test_accuracy_at_best_val"] == plain["test_accuracy_at_best_val"]
    a = load_file(str(tmp_path / "a" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the global model is untouched
    assert tuned["personalized_accuracy_mean"] != plain["personalized_accuracy_mean"]
