"""Node-owned data in a Flower deployment: each SuperNode trains on its own rows only.

The server's dataset folder holds test and validation rows and no train.jsonl; each SuperNode is
started on its own folder (``--node-config data-path=...``). Processes run on 127.0.0.1 and are
stopped by PID when the federation exits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import build_config
from fedpeft.data.sources import DataError
from fedpeft.engine.flower_data import node_job, read_label_names, read_node_rows, split_for_nodes
from fedpeft.engine.flower_deploy import LocalFederation, write_app
from fedpeft.engine.run import train_client
from fedpeft.job import load_data
from tests.conftest import _rows, tiny_config

LABELS = ["sports", "business", "tech", "world"]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path.parent / "labels.json").write_text(json.dumps(LABELS))


def test_split_for_nodes_gives_each_node_its_share_and_the_server_no_training_rows(
    tmp_path, toy_data
):
    config = build_config(tiny_config(toy_data, num_clients=3, partition="dirichlet"))
    server_config, nodes = split_for_nodes(config, tmp_path / "data")
    _splits, train, test, validation = load_data(config)
    names = read_label_names(Path(server_config.dataset))
    shares = [read_node_rows(node, names) for node in nodes]
    assert [node.name for node in nodes] == ["node-000", "node-001", "node-002"]
    assert sum(len(s) for s in shares) == len(train)
    assert sorted(t for s in shares for t in s.texts) == sorted(train.texts)
    server = Path(server_config.dataset)
    assert not (server / "train.jsonl").exists()
    assert len((server / "test.jsonl").read_text().splitlines()) == len(test)
    assert server_config.validation_size == len(validation)
    bad = tmp_path / "bad" / "train.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "a", "label": 0}\nnot json\n')
    with pytest.raises(DataError, match="train.jsonl:2: malformed JSON"):
        read_node_rows(bad.parent, names)
    with pytest.raises(DataError, match="missing"):
        read_node_rows(tmp_path / "nowhere", names)


def test_nodes_train_only_their_own_rows_weighted_by_row_counts(tmp_path):
    """Two nodes of 40 and 120 rows and one with malformed data; the server has no train.jsonl.
    The run's global weights are the row-weighted mean of what each node trains on its own
    rows (recomputed here from the node folders), and the malformed node takes no part."""
    server = tmp_path / "server"
    write_rows(server / "test.jsonl", _rows(60, seed=2))
    write_rows(server / "validation.jsonl", _rows(40, seed=3))
    alice, bob, carol = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    write_rows(alice / "train.jsonl", _rows(40, seed=11))
    write_rows(bob / "train.jsonl", _rows(120, seed=12))
    write_rows(carol / "train.jsonl", [{"text": "fine", "label": 0}])
    (carol / "train.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "broken"\n')
    flower = {"insecure": True, "min_nodes": 3, "round_timeout_s": 300}
    raw = tiny_config(server, engine="flower", num_clients=3, clients_per_round=3, rounds=1)
    config = build_config({**raw, "flower": flower})
    run = tmp_path / "run"
    app = write_app(tmp_path / "app", config, run)
    with LocalFederation(tmp_path / "fed", 3, node_data=[alice, bob, carol]) as federation:
        run_log = federation.run(app, timeout=600)
        carol_log = federation.logs[federation.nodes[2].pid].read_text()
    assert not (server / "train.jsonl").exists()
    assert "node carol: " in carol_log and "it takes no part" in carol_log
    # and the server says so in the run's log (what flwr run --stream shows)
    said = [line for line in run_log.splitlines() if "node carol takes no part" in line]
    assert said and said[0].startswith("fedpeft WARNING: node carol takes no part: "), run_log

    partition = json.loads((run / "partition.json").read_text())
    assert [(c["name"], c["train_size"]) for c in partition["clients"]] == [
        ("alice", 40),
        ("bob", 120),
    ]
    names = read_label_names(server)
    rows = [read_node_rows(alice, names), read_node_rows(bob, names)]
    for client, own in zip(partition["clients"], rows, strict=True):
        assert client["train_label_counts"] == np.bincount(own.labels, minlength=4).tolist()
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == [0, 1] and row["clients_failed"] == []
    assert row["val_accuracy"] is not None

    uploads = []
    for cid, own in enumerate(rows):  # what each node trains on its own rows in round 1
        two = build_config({**raw, "num_clients": 2, "clients_per_round": 2})
        job = node_job(two, own, cid, 2)
        uploads.append(train_client(job, 1, cid, dict(job.initial_state), {}).sent)
    got = load_file(str(run / "weights.safetensors"))
    for name, tensor in got.items():
        expected = (40 * uploads[0][name] + 120 * uploads[1][name]) / 160
        assert torch.allclose(tensor, expected, atol=1e-5), name
        unweighted = (uploads[0][name] + uploads[1][name]) / 2
        if not torch.allclose(unweighted, expected, atol=1e-4):
            assert not torch.allclose(tensor, unweighted, atol=1e-5), name
