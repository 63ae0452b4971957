"""fedpeft's ClientApp executor beside a SuperNode in process isolation. The SuperNode here has
no SuperLink to reach; its runtime API, which the executor talks to, serves all the same. The
executor running the ClientApps of real runs is tested by every deployment test
(``test_flower_deploy.py``: the app is loaded once per node, whatever the number of messages)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import psutil
import pytest

from fedpeft.engine.flower_deploy import (
    executor_argv,
    flower_env,
    free_port,
    stop_process,
    supernode_argv,
    write_secret,
)
from fedpeft.engine.flower_executor import serve
from fedpeft.engine.flower_worker import NodeWorker


@pytest.fixture
def supernode(tmp_path):
    """A SuperNode (``--isolation process``) with its secret; (process, runtime port, secret)."""
    secret = write_secret(tmp_path / "secret")
    port = free_port()
    argv = supernode_argv(f"127.0.0.1:{free_port()}", port, None, None, secret=secret)
    with open(tmp_path / "supernode.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            env=flower_env(tmp_path / "flwr-home"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, tmp_path / "supernode.log"
        time.sleep(0.2)
    yield proc, port, secret
    stop_process(proc)


def executor(port: int, secret, parent: int) -> subprocess.Popen:
    return subprocess.Popen(
        executor_argv(port, secret, parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_nodes_secret_takes_tasks_and_another_is_refused_in_one_line(supernode, tmp_path):
    proc, port, secret = supernode
    asked = []
    # with the node's secret the executor polls (no task is pending) until told to stop
    serve(f"127.0.0.1:{port}", secret.read_bytes(), stop=lambda: asked.append(1) or len(asked) > 3)
    assert len(asked) == 4

    other = write_secret(tmp_path / "other-secret")
    refused = executor(port, other, proc.pid)
    _out, err = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert err.strip().splitlines() == [
        f"error: the SuperNode at 127.0.0.1:{port} refused the executor: its secret differs "
        "from the SuperNode's"
    ]


def test_an_unreadable_secret_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-secret"
    done = subprocess.run(
        executor_argv(free_port(), missing, 1), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot read the executor's secret: [Errno 2] No such file or directory: "
        f"'{missing}'"
    ]


def test_the_executor_starts_its_nodes_worker_and_ends_with_its_supernode(supernode):
    proc, port, secret = supernode
    serving = executor(port, secret, proc.pid)
    worker = NodeWorker(supernode=proc.pid)
    try:
        deadline = time.monotonic() + 60
        while not worker.socket.exists():  # the executor starts the node's worker at once
            assert serving.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        worker_pid = worker.call("ping", {})
        assert worker.spawn_s == 0.0  # found running: no message had to start it
        assert serving.poll() is None
        proc.kill()
        proc.wait()  # reaped, as a shell reaps it (a zombie's PID still exists)
        assert serving.wait(timeout=30) == 0  # the node is gone: it ends, quietly
        deadline = time.monotonic() + 30
        while psutil.pid_exists(worker_pid) and psutil.Process(worker_pid).status() != "zombie":
            assert time.monotonic() < deadline, "the node's worker outlived its node"
            time.sleep(0.2)
    finally:
        serving.kill()
    assert sys.executable in executor_argv(port, secret, proc.pid)  # this interpreter's fedpeft
