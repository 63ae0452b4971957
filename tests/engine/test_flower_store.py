"""A client's persistent tensors on a deployed node (``fedpeft.engine.flower_store``): kept in
files, found again by a restarted node, replayed from the right version by a resumed SuperLink."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from fedpeft.client import LocalResult
from fedpeft.config import build_config, dump_config
from fedpeft.engine import flower
from fedpeft.engine.flower_data import split_for_nodes
from fedpeft.engine.flower_store import STATE_FOLDER, NodeStore
from fedpeft.job import build_job
from fedpeft.methods.base import ClientUpdate
from fedpeft.peft.base import trainable_state
from tests.conftest import tiny_config


def test_a_new_node_store_finds_the_version_before_each_round(tmp_path):
    store = NodeStore(tmp_path / "state")
    for rnd in (1, 2, 4, 6):
        store.save(3, rnd, {"m": torch.full((2,), float(rnd))})
    store.save(5, 2, {"m": torch.zeros(1)})
    restarted = NodeStore(tmp_path / "state")  # a new process: only the files
    assert restarted.load(3, 7)["m"].tolist() == [6.0, 6.0]
    assert restarted.load(3, 5)["m"].tolist() == [4.0, 4.0]  # a replayed round 5
    assert restarted.load(3, 1) == {}  # before its first round: nothing
    assert restarted.load(5, 3)["m"].tolist() == [0.0]  # clients do not mix
    # three versions per client stay (rounds 2, 4, 6); round 1's is gone
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["c3-r2.safetensors", "c3-r4.safetensors", "c3-r6.safetensors"] + [
        "c5-r2.safetensors"
    ]


def test_replaying_a_round_drops_the_lost_timeline(tmp_path):
    store = NodeStore(tmp_path / "state")
    for rnd in (1, 2, 3):
        store.save(0, rnd, {"m": torch.full((1,), float(rnd))})
    assert store.load(0, 3)["m"].tolist() == [2.0]  # memory holds round 3: files answer
    store.save(0, 2, {"m": torch.full((1,), 20.0)})  # the SuperLink resumed after round 1
    assert store.load(0, 3)["m"].tolist() == [20.0]
    assert NodeStore(tmp_path / "state").load(0, 9)["m"].tolist() == [20.0]
    assert not (tmp_path / "state" / "c0-r3.safetensors").exists()


def test_a_method_that_keeps_nothing_writes_nothing(tmp_path):
    store = NodeStore(tmp_path / "state")
    store.save(0, 1, {})
    assert store.load(0, 2) == {} and not (tmp_path / "state").exists()


def fibecfed_yaml(toy_data) -> str:
    raw = tiny_config(
        toy_data,
        engine="flower",
        method="fibecfed",
        num_clients=2,
        clients_per_round=2,
        rounds=3,
        fibecfed={"rescore_every": 2, "rounds_to_full": 3, "global_layers": 1},
        flower={"insecure": True, "min_nodes": 2},
    )
    return dump_config(build_config(raw))


def node_rounds(config_yaml: str, data: Path, restart_before: int = 0, forget=False) -> list:
    """Client 1's uploads for rounds 1-3 on its node, with the server's decisions in between
    from a FibecFed that aggregates only this client. ``restart_before``: the node's processes
    die before that round (nothing in memory); ``forget``: and its state folder is lost."""
    flower._JOBS.clear()
    flower._STORES.clear()
    server = build_job(build_config(yaml.safe_load(config_yaml)))
    state = {k: v.clone() for k, v in trainable_state(server.model).items()}
    uploads = []
    for rnd in (1, 2, 3):
        if rnd == restart_before:
            flower._JOBS.clear()
            flower._STORES.clear()
            if forget:
                shutil.rmtree(data / STATE_FOLDER)
        settings = {
            "round": rnd,
            "cid": 1,
            "num-clients": 2,
            "labels": json.dumps(server.label_names),
            "method": json.dumps(server.method.client_settings()),
        }
        arrays = {k: v.numpy() for k, v in state.items()}
        sent, metrics, kept = flower.train_arrays(config_yaml, settings, arrays, str(data))
        assert kept is None  # deployed: the store stays on the node
        uploads.append(sent)
        update = {k: torch.from_numpy(np.array(v)) for k, v in sent.items()}
        reported = {k[2:]: v for k, v in metrics.items() if k.startswith("m.")}
        result = LocalResult(int(metrics["num-samples"]), 1, 0.0, 0, 0)
        client = ClientUpdate(1, update, result.num_samples, result, reported)
        state = {**state, **server.method.aggregate(rnd, state, [client])}
    return uploads


def test_a_restarted_node_trains_from_its_stored_fibecfed_state(tmp_path, toy_data):
    """FibecFed keeps scores, momenta and its non-global LoRA tensors on the node; a node whose
    processes die between rounds 2 and 3 reads them back from its folder and uploads exactly
    what a node that never stopped uploads (and without the folder, something else)."""
    config_yaml = fibecfed_yaml(toy_data)
    _server, nodes = split_for_nodes(build_config(yaml.safe_load(config_yaml)), tmp_path / "d")
    steady = node_rounds(config_yaml, nodes[1])
    files = sorted(p.name for p in (nodes[1] / STATE_FOLDER).rglob("c1-r*.safetensors"))
    assert files == ["c1-r1.safetensors", "c1-r2.safetensors", "c1-r3.safetensors"]
    assert set(steady[2]) != set(steady[0])  # round 3 keeps a local layer: it is not uploaded
    restarted = node_rounds(config_yaml, nodes[1], restart_before=3)
    amnesiac = node_rounds(config_yaml, nodes[1], restart_before=3, forget=True)
    assert steady[2].keys() == restarted[2].keys() == amnesiac[2].keys()
    for name in steady[2]:
        assert np.array_equal(steady[2][name], restarted[2][name]), name
    assert any(not np.array_equal(steady[2][n], amnesiac[2][n]) for n in steady[2])
