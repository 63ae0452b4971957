"""The Flower engine deployed: a SuperLink and SuperNodes as real processes on 127.0.0.1.

Each test starts its own federation on free ports and stops every process by PID on the way out
(``LocalFederation``'s exit runs even when the test fails). Each SuperNode's ClientApps run in
fedpeft's executor, which hands them to the node's worker (the tiny model, loaded once).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from fedpeft.config import build_config, dump_config
from fedpeft.engine.flower_data import split_for_nodes
from fedpeft.engine.flower_deploy import (
    LocalFederation,
    make_credentials,
    make_node_key,
    write_app,
)
from fedpeft.engine.flower_worker import NodeWorker
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


def deploy_config(dataset: Path, **flower) -> dict:
    settings = {"insecure": True, "min_nodes": 2, "round_timeout_s": 300, **flower}
    return tiny_config(dataset, engine="flower", num_clients=2, flower=settings)


def deployed(tmp_path: Path, raw: dict) -> tuple[Path, list[Path]]:
    """The app of a run whose 2 nodes each own one client's rows; returns it and their data."""
    server_config, nodes = split_for_nodes(build_config(raw), tmp_path / "data")
    return write_app(tmp_path / "app", server_config, tmp_path / "run"), nodes


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def family(proc) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def assert_all_stopped(pids: list[int]) -> None:
    alive = [
        pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    assert alive == [], f"processes left running: {alive}"


def test_two_supernodes_two_rounds(tmp_path, toy_data):
    """Two SuperNodes run FibecFed (LoRA underneath) for two rounds: every process stops, the
    server's layer choice reaches the nodes, the local LoRA layer stays there (round 2 uploads
    less than round 1), and each node keeps its own client's state in its own folder, one file
    per round it trained."""
    raw = deploy_config(toy_data)
    raw.update(method="fibecfed", fibecfed={"rescore_every": 1, "global_layers": 1})
    app, data = deployed(tmp_path, raw)
    with LocalFederation(tmp_path / "fed", num_nodes=2, node_data=data) as federation:
        federation.run(app, timeout=600)
        host = federation.host
        started = [*federation.nodes, *federation.executors, host.proc]
        pids = [p.pid for proc in [federation.superlink, *started] for p in family(proc)]
        node_logs = [federation.logs[node.pid].read_text() for node in federation.nodes]
        workers = psutil.Process(host.proc.pid).children()
        handles = [NodeWorker(node.pid) for node in federation.nodes]
        sockets = [path for h in handles for path in (h.socket, h.key_path, h.log)]
    assert_all_stopped(pids)
    # each node's worker was forked from the one worker host, and none left a file behind (its
    # log neither: it had nothing to say)
    assert len(workers) == 2 and all(w.pid in pids for w in workers)
    assert sockets and not any(path.exists() for path in [host.socket, *sockets])
    # each node's messages (its description, then its training rounds) ran in one long-lived
    # executor process: the ClientApp was loaded once per node, not once per message
    assert [log.count("Loading ClientApp") for log in node_logs] == [1, 1]
    first, second = rows = metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_failed"] == [] and r["accuracy"] is not None for r in rows)
    assert second["bytes_up_total"] == first["bytes_up"] + second["bytes_up"] > 0
    assert len(first["aggregated_layers"]) > len(second["aggregated_layers"]) == 1
    assert 0 < second["bytes_up"] < first["bytes_up"]
    for cid in first["clients"]:
        kept = sorted(p.name for p in (data[cid] / ".fedpeft-state").rglob("*.safetensors"))
        assert kept == [f"c{cid}-r{r}.safetensors" for r in (1, 2) if cid in rows[r - 1]["clients"]]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and (tmp_path / "run" / "weights.safetensors").is_file()


def test_autofednlp_deployed_plans_on_the_nodes_and_trains_disjoint_trial_groups(
    tmp_path, toy_data
):
    """AutoFedNLP on three SuperNodes, one trial group each: the nodes estimate their round
    times on their own rows for the budget (the server holds none), each candidate's
    sub-rounds go to its own node, and the period's winner is recorded as embedded does."""
    raw = deploy_config(toy_data, min_nodes=3)
    raw.update(
        method="autofednlp",
        num_clients=3,
        clients_per_round=1,
        rounds=1,
        validation_size=40,
        autofednlp={"rounds_per_period": 1, "start_depth": 1},
        cost={"devices": ["jetson_tx2"], "networks": ["reference_1mbps"]},
    )
    app, data = deployed(tmp_path, raw)
    with LocalFederation(tmp_path / "fed", num_nodes=3, node_data=data) as federation:
        federation.run(app, timeout=600)
    (row,) = metrics(tmp_path / "run")
    trial = row["trial"]
    assert trial["tau_s"] > 0 and trial["winner"] in [c["name"] for c in trial["candidates"]]
    groups = [set(c["clients"]) for c in trial["candidates"]]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == len(groups)
    assert all(c["rounds"] >= 1 for c in trial["candidates"])  # R = 1 at the start shape
    assert row["clients_failed"] == [] and (row["depth"], row["width"]) == (
        next(c for c in trial["candidates"] if c["name"] == trial["winner"])["depth"],
        next(c for c in trial["candidates"] if c["name"] == trial["winner"])["width"],
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"]


def test_faults_dp_and_attackers_deployed_as_on_the_embedded_engine(tmp_path, toy_data):
    """Three SuperNodes under simulated crashes, central DP and a sign-flipping attacker node:
    the server draws the crashes and clips and noises, the attacker node poisons its own
    upload, and the run ends on the embedded engine's weights, dropped clients, attackers and
    epsilon for the same partition."""
    raw = deploy_config(toy_data, min_nodes=3)
    raw.update(
        num_clients=3,
        clients_per_round=3,
        rounds=2,
        faults={"crash_prob": 0.3, "min_clients": 1},
        dp={"noise_multiplier": 0.5, "clip_norm": 0.05},
        attack={"type": "sign_flip", "fraction": 0.34},
    )
    app, data = deployed(tmp_path, raw)
    with LocalFederation(tmp_path / "fed", num_nodes=3, node_data=data) as federation:
        federation.run(app, timeout=600)
    config = build_config({**raw, "engine": "embedded"})
    run = RunDir.create(tmp_path / "embedded", dump_config(config))
    EmbeddedEngine(build_job(config), run).run()
    deployed_rows, embedded_rows = metrics(tmp_path / "run"), metrics(tmp_path / "embedded")
    for key in ("clients", "clients_dropped", "attackers_in_round", "epsilon", "bytes_up"):
        assert [r[key] for r in deployed_rows] == [r[key] for r in embedded_rows], key
    assert any(r["clients_dropped"] for r in deployed_rows)  # a crash happened
    assert deployed_rows[0]["attackers_in_round"]  # and the attacker took part
    got = load_file(str(tmp_path / "run" / "weights.safetensors"))
    want = load_file(str(tmp_path / "embedded" / "weights.safetensors"))
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    assert (tmp_path / "run" / "attackers.json").is_file()


def test_tls_and_node_auth_refuse_an_unregistered_node(tmp_path, toy_data):
    creds = make_credentials(tmp_path / "creds", num_nodes=2)
    app, data = deployed(tmp_path, deploy_config(toy_data, insecure=False))
    with LocalFederation(tmp_path / "fed", 2, creds=creds, node_data=data) as federation:
        stranger = federation.start_node(make_node_key(tmp_path / "stranger"))
        federation.run(app, timeout=600)
        assert stranger.wait(timeout=120) != 0  # the SuperLink does not know its key
        log = federation.logs[stranger.pid].read_text()
        assert "Failed to activate SuperNode" in log
        listed = json.loads(
            federation.flwr(["supernode", "list", "fedpeft", "--format", "json"], 60)
        )
        pids = [p.pid for proc in [federation.superlink, *federation.nodes] for p in family(proc)]
    assert len(listed["nodes"]) == 2
    assert "https://127.0.0.1" in (tmp_path / "fed" / "superlink.log").read_text()
    assert [r["round"] for r in metrics(tmp_path / "run")] == [1, 2]
    assert_all_stopped(pids)


def kill_when_busy(federation: LocalFederation, node, stop: threading.Event) -> None:
    """SIGKILL a SuperNode (and its ClientApp) once it has taken a training message."""
    log = federation.logs[node.pid]
    while not stop.is_set():
        if "Receiving: train message" in log.read_text():
            for proc in family(node):
                proc.kill()
            return
        time.sleep(0.2)


def test_a_dead_node_times_out_its_round_and_the_run_goes_on(tmp_path, toy_data):
    app, data = deployed(tmp_path, deploy_config(toy_data, round_timeout_s=60))
    stop = threading.Event()
    with LocalFederation(tmp_path / "fed", num_nodes=2, node_data=data) as federation:
        victim = federation.nodes[1]
        killer = threading.Thread(target=kill_when_busy, args=(federation, victim, stop))
        killer.start()
        try:
            federation.run(app, timeout=600)
        finally:
            stop.set()
            killer.join()
        assert victim.poll() is not None
    first, second = metrics(tmp_path / "run")
    assert len(first["clients_failed"]) == 1  # the dead node's client; the other one counted
    assert first["clients_failed"][0] in first["clients"]
    assert first["bytes_up"] > 0 and first["accuracy"] is not None
    # round 2 samples among the nodes still there: the one that answered
    assert second["clients"] == [c for c in first["clients"] if c not in first["clients_failed"]]
    assert second["clients_failed"] == []
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"]


def kill_and_restart(federation: LocalFederation, data: Path, stop: threading.Event) -> None:
    """SIGKILL node 2 once it has taken a training message, then start it again on its data:
    a new process, so the SuperLink gives it a new node id."""
    kill_when_busy(federation, federation.nodes[1], stop)
    if not stop.is_set():
        federation.start_node(None, data)


def test_a_restarted_node_rejoins_and_is_sampled_again(tmp_path, toy_data):
    app, data = deployed(tmp_path, deploy_config(toy_data, round_timeout_s=45))
    stop = threading.Event()
    notes: list[str] = []
    with LocalFederation(tmp_path / "fed", num_nodes=2, node_data=data) as federation:
        victim = federation.nodes[1]
        killer = threading.Thread(target=kill_and_restart, args=(federation, data[1], stop))
        killer.start()
        try:
            federation.run(app, timeout=600, echo=notes.append)
        finally:
            stop.set()
            killer.join()
        assert victim.poll() is not None and len(federation.nodes) == 3
        restarted_log = federation.logs[federation.nodes[2].pid].read_text()
    first, second = metrics(tmp_path / "run")
    assert first["clients"] == [0, 1] and first["clients_failed"] == [1]  # node-001 was killed
    # round 2: the restarted node-001 (a new node id) answers for client 1 again
    assert second["clients"] == [0, 1] and second["clients_failed"] == [], second
    assert "Receiving: train message" in restarted_log
    assert any(n.startswith("fedpeft INFO: node node-001 rejoined") for n in notes), notes
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"]
