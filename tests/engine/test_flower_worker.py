"""The node worker that keeps a deployed SuperNode's model and rows across messages (no Flower
here: a sleeping process stands in for the SuperNode the worker watches)."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from multiprocessing.connection import Client

import numpy as np
import psutil
import pytest

from fedpeft.config import build_config, dump_config
from fedpeft.engine import flower
from fedpeft.engine.flower_worker import HOST_ENV, NodeWorker, WorkerError, runtime_dir
from fedpeft.peft.base import trainable_state
from tests.conftest import tiny_config


def sleeping_process():
    """A process that stands in for a SuperNode until killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


supernode = pytest.fixture(sleeping_process, name="supernode")
other_supernode = pytest.fixture(sleeping_process, name="other_supernode")


def start_host(watch: int) -> tuple[subprocess.Popen, str]:
    """A worker host watching ``watch``; (its process, its socket)."""
    sock = runtime_dir() / f"host-test-{secrets.token_hex(4)}.sock"
    sock.with_suffix(".key").write_text(secrets.token_hex(32))
    argv = [sys.executable, "-m", "fedpeft.engine.flower_worker", "--host", "--socket", str(sock)]
    argv += ["--key", str(sock.with_suffix(".key")), "--watch", str(watch)]
    host = subprocess.Popen(argv)
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return host, str(sock)


@pytest.fixture
def worker_host(monkeypatch):
    """A worker host the node workers of this test are forked from."""
    host, sock = start_host(os.getpid())
    monkeypatch.setenv(HOST_ENV, sock)
    yield host
    host.terminate()
    host.wait()
    assert not os.path.exists(sock)  # a stopped host removes its socket and key


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_one_worker_serves_every_message_until_its_supernode_ends(supernode, other_supernode):
    worker = NodeWorker(supernode=supernode.pid)
    pid = worker.call("ping", {})
    assert worker.spawn_s > 0  # this call started it
    again = NodeWorker(supernode=supernode.pid)
    assert again.call("ping", {}) == pid and again.spawn_s == 0.0  # found, not started
    other = NodeWorker(supernode=other_supernode.pid)
    other_pid = other.call("ping", {})
    assert other_pid != pid  # another node: another worker
    supernode.kill()
    supernode.wait()
    assert wait_gone(pid) and not worker.socket.exists()
    assert other.call("ping", {}) == other_pid  # the other node's goes on


def test_a_failed_request_is_one_line_and_the_worker_goes_on(supernode):
    worker = NodeWorker(supernode=supernode.pid)
    pid = worker.call("ping", {})
    with pytest.raises(WorkerError, match="ValueError: unknown request 'nonsense'"):
        worker.call("nonsense", {})
    assert worker.call("ping", {}) == pid


def test_the_worker_refuses_a_caller_without_its_key(supernode):
    worker = NodeWorker(supernode=supernode.pid)
    pid = worker.call("ping", {})
    with pytest.raises(Exception, match="digest|authentication|Authentication"):
        Client(str(worker.socket), family="AF_UNIX", authkey=b"not the key")
    assert worker.call("ping", {}) == pid
    mode = stat.S_IMODE(runtime_dir().stat().st_mode)
    assert mode == 0o700 and stat.S_IMODE(worker.key_path.stat().st_mode) == 0o600


def test_training_on_the_worker_equals_training_in_process(supernode, toy_data):
    """The same client step, on the worker and here: the same upload, bit for bit."""
    config = build_config(tiny_config(toy_data, engine="flower", num_clients=2))
    config_yaml = dump_config(config)
    job = flower.client_job(config_yaml)[0]
    state = {k: v.clone() for k, v in trainable_state(job.model).items()}
    arrays = {k: v.numpy() for k, v in state.items()}
    settings = {"round": 1, "cid": 1}
    expected, _, _ = flower.train_arrays(config_yaml, settings, arrays)
    flower._JOBS.clear()  # the worker builds its own job from the YAML
    sent, metrics = NodeWorker(supernode=supernode.pid).call(
        "train", {"config": config_yaml, "settings": settings, "arrays": arrays, "data_path": None}
    )
    assert sent.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(sent[name], expected[name]), name
    assert metrics["cid"] == 1 and metrics["worker-s"] > 0


def test_a_worker_host_forks_each_nodes_worker_in_a_session_of_its_own(
    worker_host, supernode, other_supernode
):
    worker = NodeWorker(supernode=supernode.pid)
    pid = worker.call("ping", {})
    other_pid = NodeWorker(supernode=other_supernode.pid).call("ping", {})
    assert other_pid != pid
    for forked in (pid, other_pid):
        assert psutil.Process(forked).ppid() == worker_host.pid
        assert os.getsid(forked) == forked  # as a worker started on its own
    assert NodeWorker(supernode=supernode.pid).call("ping", {}) == pid  # found, not forked again
    supernode.kill()
    supernode.wait()
    assert wait_gone(pid) and not worker.socket.exists()  # it still watches its node
    assert worker_host.poll() is None and alive(other_pid)


def test_training_on_a_forked_worker_equals_training_in_process(worker_host, supernode, toy_data):
    test_training_on_the_worker_equals_training_in_process(supernode, toy_data)
    assert psutil.Process(worker_host.pid).children()  # it was the host's child that trained


def test_without_a_reachable_host_the_worker_starts_on_its_own(monkeypatch, supernode):
    monkeypatch.setenv(HOST_ENV, str(runtime_dir() / "no-such-host.sock"))
    pid = NodeWorker(supernode=supernode.pid).call("ping", {})
    assert psutil.Process(pid).ppid() == os.getpid()


def test_a_worker_host_ends_with_the_process_it_watches(supernode):
    host, sock = start_host(supernode.pid)
    assert os.path.exists(sock)
    supernode.kill()
    supernode.wait()
    host.wait(timeout=30)
    assert not os.path.exists(sock) and not os.path.exists(sock.replace(".sock", ".key"))


def test_a_worker_stopped_with_its_node_leaves_no_files(supernode):
    worker = NodeWorker(supernode=supernode.pid)
    pid = worker.call("ping", {})
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not any(p.exists() for p in (worker.socket, worker.key_path, worker.log))


def test_a_model_built_ahead_is_the_one_the_nodes_job_trains(tmp_path, toy_data):
    """A worker builds the run's model once it has described its node's data; the node's job
    then takes that model, and the upload is the same as with a model built with the job."""
    import json

    from fedpeft.engine.flower_data import split_for_nodes

    config = build_config(tiny_config(toy_data, engine="flower", num_clients=2))
    _server, nodes = split_for_nodes(config, tmp_path / "data")
    config_yaml = dump_config(config)
    names = json.loads((nodes[1] / "labels.json").read_text())
    settings = {"round": 1, "cid": 1, "labels": json.dumps(names), "num-clients": 2}
    start = trainable_state(flower.client_job(config_yaml)[0].model)
    arrays = {k: v.numpy().copy() for k, v in start.items()}
    flower._JOBS.clear()
    flower._STORES.clear()
    expected, _, _ = flower.train_arrays(config_yaml, settings, arrays, str(nodes[1]))
    flower._JOBS.clear()
    flower._STORES.clear()
    flower.prebuild_model(config_yaml, len(names))
    ((model, _tokenizer),) = flower._MODELS.values()
    sent, _, _ = flower.train_arrays(config_yaml, settings, arrays, str(nodes[1]))
    assert flower._MODELS == {} and next(iter(flower._JOBS.values())).model is model
    assert sent.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(sent[name], expected[name]), name
