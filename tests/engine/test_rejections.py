"""A bad upload drops that client, not the run: one test per reason per engine.

The server checks every upload against the names, shapes and dtypes the method asked that client
for (its ``upload`` selection applied to the global state), and for NaN/Inf. A rejected client is
logged, listed in the metrics row's ``clients_rejected`` with its reason, and left out of the
aggregate; the round goes on with the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedpeft.engine.local as local
from fedpeft import payload
from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.engine.run import RunState, sample_clients
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

BAD = 1  # position of the bad client among the round's sampled clients


def _first_float(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)


def nan(state):
    key = _first_float(state)
    bad = state[key].clone()
    bad[0, 0] = float("nan")
    return {**state, key: bad}


def inf(state):
    key = _first_float(state)
    bad = state[key].clone()
    bad.view(-1)[-1] = float("inf")
    return {**state, key: bad}


def missing(state):
    key = sorted(state)[0]
    return {k: v for k, v in state.items() if k != key}


def unexpected(state):
    return {**state, "bert.embeddings.word_embeddings.weight": torch.zeros(3, 3)}


def shape(state):
    key = _first_float(state)
    return {**state, key: state[key][:-1].clone()}


def dtype(state):
    key = _first_float(state)
    return {**state, key: state[key].to(torch.float64)}


CORRUPTIONS = {
    "NaN or inf": nan,
    "holds NaN or inf ": inf,
    "lacks tensor": missing,
    "unexpected tensor": unexpected,
    "expected torch.float32": shape,
    "torch.float64": dtype,
}
REASONS = {  # what the reason line says, per corruption
    "NaN or inf": "NaN or inf",
    "holds NaN or inf ": "NaN or inf",
    "lacks tensor": "lacks tensor",
    "unexpected tensor": "unexpected tensor",
    "expected torch.float32": "expected torch.float32",
    "torch.float64": "torch.float64",
}


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _config(toy_data, **extra):
    return build_config(
        tiny_config(toy_data, rounds=1, num_clients=4, clients_per_round=3, **extra)
    )


def _bad_cid(config) -> int:
    return sample_clients(config.seed, 1, config.num_clients, config.clients_per_round)[BAD]


@pytest.mark.parametrize("reason", [*CORRUPTIONS, "does not decode"])
def test_embedded_engine_drops_a_bad_update_and_goes_on(monkeypatch, tmp_path, toy_data, reason):
    config = _config(toy_data)
    bad_cid = _bad_cid(config)
    calls = []
    honest = local.encode_upload

    def tampered(state):
        calls.append(1)
        if len(calls) - 1 != BAD:
            return honest(state)
        if reason == "does not decode":
            return np.random.default_rng(0).bytes(200)
        return honest(CORRUPTIONS[reason](state))

    monkeypatch.setattr(local, "encode_upload", tampered)
    run = RunDir.create(tmp_path / "r", dump_config(config))
    EmbeddedEngine(build_job(config), run).run()
    (row,) = _metrics(tmp_path / "r")
    assert [r["cid"] for r in row["clients_rejected"]] == [bad_cid]
    expected = REASONS.get(reason, reason)
    assert expected in row["clients_rejected"][0]["reason"]
    assert row["accuracy"] is not None and np.isfinite(row["train_loss"])
    weights = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_embedded_engine_survives_a_round_where_every_update_is_bad(
    monkeypatch, tmp_path, toy_data
):
    config = _config(toy_data)
    monkeypatch.setattr(local, "encode_upload", lambda state: b"garbage")
    job = build_job(config)
    before = {k: v.clone() for k, v in job.initial_state.items()}
    EmbeddedEngine(job, RunDir.create(tmp_path / "r", dump_config(config))).run()
    (row,) = _metrics(tmp_path / "r")
    assert len(row["clients_rejected"]) == 3
    weights = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert all(torch.equal(weights[k], before[k]) for k in before)


# -- Flower: the strategy's checks, fed replies as a SuperNode would send them ---------------------
class _Grid:
    def get_node_ids(self):
        return [11, 12]


@pytest.fixture()
def flower_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    yield


@pytest.mark.parametrize("reason", list(CORRUPTIONS))
def test_flower_engine_drops_a_bad_update_and_goes_on(tmp_path, toy_data, flower_identity, reason):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedpeft.engine.flower import FedpeftStrategy, to_state, train_on_message

    config = _config(toy_data)
    bad_cid = _bad_cid(config)
    job = build_job(config)
    run = RunDir.create(tmp_path / "r", dump_config(config))
    state = RunState({k: v.clone() for k, v in job.initial_state.items()}, [], 0)
    strategy = FedpeftStrategy(job, run, state, 1, lambda *_: None)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid()))
    replies = []
    for msg in messages:
        reply = train_on_message(msg, dump_config(config))
        cid = int(reply.content["metrics"]["cid"])
        if cid == bad_cid:
            bad = CORRUPTIONS[reason](to_state(reply.content["arrays"]))
            content = RecordDict(
                {
                    "arrays": ArrayRecord.from_torch_state_dict(bad),
                    "metrics": MetricRecord(dict(reply.content["metrics"])),
                }
            )
            reply = Message(content, reply_to=msg)
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    strategy.finish_round(1, ArrayRecord())
    (row,) = _metrics(tmp_path / "r")
    assert [r["cid"] for r in row["clients_rejected"]] == [bad_cid]
    assert REASONS[reason] in row["clients_rejected"][0]["reason"]
    assert bad_cid not in row.get("clients_failed", [])
    assert all(torch.isfinite(t).all() for t in strategy.global_state.values())
    assert strategy.global_state.keys() == job.initial_state.keys()
    # the good clients were averaged: the state moved
    assert any(
        not torch.equal(strategy.global_state[k], job.initial_state[k]) for k in job.initial_state
    )
    assert payload.decode(payload.encode(strategy.global_state))
