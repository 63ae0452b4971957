"""A deployed SuperNode's worker: one process per node that keeps the model, the node's
tokenised rows and the clients' persistent state across messages.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives;
importing torch and transformers and building the job there cost seconds per message. So the
ClientApp (``fedpeft.engine.flower_client``) only relays: it hands the message's tensors and
settings to this worker over a Unix socket and returns the answer. fedpeft's executor starts the
worker when its node starts, so its imports are done before the first message; without the
executor the first message starts it; later ones find it. The worker serves one request at a time and ends when
its SuperNode's process is gone (a restarted node starts a fresh one) or after
``IDLE_S`` without a request.

On a host that runs several nodes (``fedpeft flower local``: a loopback federation) every
worker would pay the same imports (~6.6 CPU-seconds: torch, transformers, the engine). There a
*worker host* (``serve_host``) imports them once and forks each node's worker from itself: the
node's environment names it (``FEDPEFT_WORKER_HOST``: its socket), and a worker it forks is the
same program as one started on its own, in a session of its own, watching its SuperNode. Where
the host cannot be reached the worker is started on its own.

The socket and its key live in a folder only this user can open (``runtime_dir``); the key
authenticates every connection (``multiprocessing.connection``), so no other local user can
talk to the worker. Its log is ``<runtime_dir>/<name>.log``.

This module imports the standard library only at the top: the ClientApp side (``NodeWorker``)
must stay light. ``serve`` imports the engine when the worker starts.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

IDLE_S = 1800.0  # a worker with no request for this long ends
START_TIMEOUT_S = 300.0  # how long a ClientApp waits for a worker it started to listen
HOST_ENV = "FEDPEFT_WORKER_HOST"  # the socket of the worker host that forks this node's worker


class WorkerError(RuntimeError):
    """The node's worker failed the request (its one line), or could not be started."""


def process_age_s() -> float:
    """Seconds since this process started (from /proc; 0 where unknown)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def runtime_dir() -> Path:
    """Where the node's workers keep their sockets, keys and logs: private to this user."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / f"fedpeft-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def write_key(path: Path) -> Path:
    """A fresh random key (hex) in a new file only this user can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def remove_files(socket: Path) -> None:
    """A worker's (or the host's) socket, key and lock, and its log if it said nothing."""
    for path in (socket, *(socket.with_suffix(s) for s in (".key", ".lock"))):
        path.unlink(missing_ok=True)
    log = socket.with_suffix(".log")
    if log.is_file() and log.stat().st_size == 0:
        log.unlink(missing_ok=True)  # nothing said: nothing to keep


class NodeWorker:
    """The ClientApp's handle on its node's worker: one per SuperNode process, serving every
    run on the node (it keeps one run's job at a time: a node that alternates between runs
    rebuilds it). ``supernode``: the node's PID (default: this process's parent, as a
    ``flwr-clientapp`` process's is its node's)."""

    def __init__(self, supernode: int | None = None) -> None:
        self.supernode = supernode or os.getppid()
        key = hashlib.sha256(f"fedpeft-node-worker\0{self.supernode}".encode())
        self.name = key.hexdigest()[:20]
        folder = runtime_dir()
        self.socket = folder / f"{self.name}.sock"
        self.key_path = folder / f"{self.name}.key"
        self.log = folder / f"{self.name}.log"
        self.spawn_s = 0.0  # seconds this call spent starting the worker

    def warm(self) -> None:
        """Start the worker now if there is none (its imports done before the first message
        needs them): fedpeft's executor does so when its node starts."""
        self.call("ping", {})

    def call(self, kind: str, request: dict[str, Any]) -> Any:
        """Send one request, return the worker's answer (starting the worker if needed)."""
        with self._connect() as conn:
            conn.send((kind, request))
            status, answer = conn.recv()
        if status != "ok":
            raise WorkerError(str(answer))
        return answer

    def _connect(self):
        try:
            return Client(str(self.socket), family="AF_UNIX", authkey=self._key())
        except (OSError, EOFError):
            pass
        started = time.perf_counter()
        with open(runtime_dir() / f"{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp of the node starts the worker
            try:
                conn = Client(str(self.socket), family="AF_UNIX", authkey=self._key())
            except (OSError, EOFError):
                conn = self._start()
        self.spawn_s = time.perf_counter() - started
        return conn

    def _key(self) -> bytes:
        return bytes.fromhex(self.key_path.read_text())

    def _start(self):
        self.socket.unlink(missing_ok=True)
        self.key_path.unlink(missing_ok=True)
        write_key(self.key_path)
        pid = self._fork_from_host()
        if pid is None:  # no worker host: a process of its own
            argv = [sys.executable, "-m", "fedpeft.engine.flower_worker"]
            argv += ["--socket", str(self.socket), "--key", str(self.key_path)]
            argv += ["--watch", str(self.supernode)]
            with open(self.log, "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives this message's process
                )
            pid = proc.pid
            exited = lambda: proc.poll() is not None  # noqa: E731
        else:
            exited = lambda: not _alive(pid)  # noqa: E731 - the host reaps its children
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if exited():
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise WorkerError(f"the node's worker exited at start: {' '.join(tail)}")
            try:
                return Client(str(self.socket), family="AF_UNIX", authkey=self._key())
            except (OSError, EOFError):
                time.sleep(0.05)
        _kill(pid)
        raise WorkerError(f"the node's worker did not listen within {START_TIMEOUT_S:.0f}s")

    def _fork_from_host(self) -> int | None:
        """Ask the worker host named in the environment to fork this node's worker; its PID,
        or None where there is no host (or it cannot be reached: the worker starts on its own)."""
        host = os.environ.get(HOST_ENV)
        if not host:
            return None
        request = {
            "socket": str(self.socket),
            "key": str(self.key_path),
            "watch": self.supernode,
            "log": str(self.log),
            "env": dict(os.environ),  # the node's (the host's should match: imports read some)
        }
        try:
            key = bytes.fromhex(Path(host).with_suffix(".key").read_text())
            with Client(host, family="AF_UNIX", authkey=key) as conn:
                conn.send(request)
                status, answer = conn.recv()
        except (OSError, EOFError, ValueError, AuthenticationError) as err:
            print(f"fedpeft: the worker host {host} did not answer ({err}); starting the worker")
            return None
        if status != "ok":
            raise WorkerError(f"the worker host could not fork the node's worker: {answer}")
        return int(answer)


# -- the worker process ---------------------------------------------------------------------------
def handle(kind: str, request: dict[str, Any]) -> Any:
    """One request, answered by the engine's own client step (``fedpeft.engine.flower``)."""
    import json

    from fedpeft.engine import flower

    if kind == "ping":  # which process answers (tests, health checks)
        return os.getpid()
    if kind == "train":
        started = time.perf_counter()
        sent, metrics, _kept = flower.train_arrays(  # the store stays on this node
            request["config"], request["settings"], request["arrays"], request["data_path"]
        )
        metrics["worker-s"] = time.perf_counter() - started
        return sent, metrics
    if kind == "estimate":
        return flower.estimate_arrays(
            request["config"], request["settings"], request["arrays"], request["data_path"]
        )
    if kind == "describe":
        return flower.describe_node(request["node_config"], json.loads(request["labels"]))
    raise ValueError(f"unknown request {kind!r}")


def after(kind: str, request: dict[str, Any], answer: Any) -> None:
    """Work done once a request is answered, while the node waits for its next message: a
    node that described usable data builds the run's model for its first round."""
    import json

    from fedpeft.engine import flower

    if kind == "describe" and "config" in request and "error" not in answer:
        flower.prebuild_model(request["config"], len(json.loads(request["labels"])))


def serve(socket: Path, key: bytes, watch: int, idle_s: float = IDLE_S) -> None:
    """Answer requests on ``socket`` until the process ``watch`` (the SuperNode) is gone or no
    request came for ``idle_s`` seconds."""
    listener = Listener(str(socket), family="AF_UNIX", authkey=key)  # listen first, then import
    last = [time.monotonic()]

    def end(*_signal: object) -> None:
        remove_files(socket)
        os._exit(0)  # the listener's accept() does not wake for a closed socket

    def watchdog() -> None:
        while _alive(watch) and time.monotonic() - last[0] < idle_s:
            time.sleep(1.0)
        end()

    signal.signal(signal.SIGTERM, end)  # stopped with its node's processes: no files left
    threading.Thread(target=watchdog, daemon=True).start()
    from transformers.utils import logging as hf_logging

    from fedpeft.engine import flower  # noqa: F401 - the imports, once, before any request

    hf_logging.disable_progress_bar()  # its log keeps what needs saying, not loading bars

    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as err:  # no key, or it hung up
            print(f"fedpeft worker: refused a connection: {err}", flush=True)
            continue
        with conn:
            try:
                kind, request = conn.recv()
                last[0] = time.monotonic()
                try:
                    answer = ("ok", handle(kind, request))
                except Exception as err:  # noqa: BLE001 - the ClientApp reports it; we go on
                    print(f"fedpeft worker: {kind} failed: {err!r}", flush=True)
                    answer = ("error", f"{type(err).__name__}: {err}")
                conn.send(answer)
                if answer[0] == "ok":
                    try:
                        after(kind, request, answer[1])
                    except Exception as err:  # noqa: BLE001 - the next request builds it again
                        print(f"fedpeft worker: after {kind}: {err!r}", flush=True)
                last[0] = time.monotonic()
            except (OSError, EOFError) as err:
                print(f"fedpeft worker: a connection broke: {err}", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the worker host ------------------------------------------------------------------------------
def use_worker_host() -> bool:
    """Whether a program that runs several nodes here (``fedpeft flower local``) forks their
    workers from one worker host: yes unless ``FEDPEFT_NODE_FORK=0`` (each worker then imports
    the engine itself, as on a host of its own) or the nodes have no worker
    (``FEDPEFT_NODE_WORKER=0``)."""
    env = os.environ
    return env.get("FEDPEFT_NODE_FORK", "1") != "0" and env.get("FEDPEFT_NODE_WORKER", "1") != "0"


class WorkerHost:
    """A worker host (``serve_host``) as a process of its own, started by the program that runs
    this host's nodes and watching it; the nodes find it through ``HOST_ENV``. Its socket, key
    and log are in ``runtime_dir``. Start it early: it imports the engine while the rest starts."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.socket = runtime_dir() / f"host-{secrets.token_hex(8)}.sock"
        key = write_key(self.socket.with_suffix(".key"))
        argv = [sys.executable, "-m", "fedpeft.engine.flower_worker", "--host"]
        argv += ["--socket", str(self.socket), "--key", str(key), "--watch", str(os.getpid())]
        with open(self.socket.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the program, which stops it
            )

    def ready(self, timeout: float = 30.0) -> bool:
        """Whether it listens (it does before it imports: a fraction of a second)."""
        deadline = time.monotonic() + timeout
        while not self.socket.exists() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return self.socket.exists()

    def stop(self) -> None:
        """End it (the workers it forked end with their nodes) and remove its files."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        remove_files(self.socket)


def serve_host(socket: Path, key: bytes, watch: int) -> None:
    """Fork node workers on request (``NodeWorker._fork_from_host``) from this process, which
    imports the engine once, until the process ``watch`` (whoever started the host) is gone."""
    listener = Listener(str(socket), family="AF_UNIX", authkey=key)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers that end

    def end(*_signal: object) -> None:
        remove_files(socket)
        os._exit(0)

    def watchdog() -> None:
        while _alive(watch):
            time.sleep(1.0)
        end()

    signal.signal(signal.SIGTERM, end)
    threading.Thread(target=watchdog, daemon=True).start()
    from fedpeft.engine import flower  # noqa: F401 - the imports every worker shares

    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as err:
            print(f"fedpeft worker host: refused a connection: {err}", flush=True)
            continue
        with conn:
            try:
                request = conn.recv()
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _become_worker(listener, conn, request)  # never returns
                conn.send(("ok", pid))
            except (OSError, EOFError, KeyError, TypeError, ValueError) as err:
                print(f"fedpeft worker host: a request failed: {err!r}", flush=True)
                try:
                    conn.send(("error", f"{type(err).__name__}: {err}"))
                except (OSError, EOFError):
                    pass


def _become_worker(listener: Listener, conn: Any, request: dict[str, Any]) -> None:
    """In a child of the worker host: become the node's worker, as ``main`` would have started
    it (a session of its own, its log as stdout and stderr, the node's thread settings)."""
    code = 1
    try:
        conn.close()
        listener.close()  # the host's socket file stays: only the host's own listener is closed
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the host's; ``serve`` sets the worker's
        os.environ.update(request.get("env", {}))
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        random.seed()  # a fresh process's: the host's generators are no one's to share
        import numpy as np
        import torch

        np.random.seed()
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        key = bytes.fromhex(Path(request["key"]).read_text())
        serve(Path(request["socket"]), key, int(request["watch"]))
        code = 0
    except BaseException as err:  # noqa: BLE001 - said in the node's worker log, then gone
        print(f"fedpeft worker: could not start: {err!r}", flush=True)
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.engine.flower_worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True, help="file holding the hex key")
    parser.add_argument("--watch", type=int, required=True, help="end when this process ends")
    parser.add_argument("--idle-s", type=float, default=IDLE_S)
    parser.add_argument(
        "--host", action="store_true", help="be the worker host: fork node workers on request"
    )
    args = parser.parse_args(argv)
    key = bytes.fromhex(args.key.read_text())
    if args.host:
        serve_host(args.socket, key, args.watch)
    else:
        serve(args.socket, key, args.watch, args.idle_s)


if __name__ == "__main__":
    main()
