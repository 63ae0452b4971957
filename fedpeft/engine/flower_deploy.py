"""Deploying a fedpeft run on Flower: the app folder, TLS certificates and SuperNode keys, the
SuperLink/SuperNode commands, and a federation of local processes for tests and benchmarks.

A deployment is a SuperLink (``flower-superlink``), one SuperNode per client process
(``flower-supernode``), and ``flwr run APP CONNECTION`` submitting the app that
``fedpeft flower prepare`` writes. Security is on unless ``flower.insecure`` is set: the
SuperLink serves TLS with a certificate signed by our CA, SuperNodes and the flwr CLI trust that
CA, and only SuperNodes whose public keys were registered (``flwr supernode register``) may join.
Runtime dependency installation stays off everywhere (fedpeft must already be installed on every
host), and ``FLOWER_ENV`` turns off Flower's telemetry and update check.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.config import ConfigError, RunConfig, dump_config
from fedpeft.engine.flower import (
    CONFIG_KEY,
    FLOWER_ENV,
    RUN_DIR_KEY,
    SIMULATION_KEY,
    Interrupted,
    check_supported,
    stop_leftovers,
)
from fedpeft.engine.flower_data import DATA_PATH, NAME
from fedpeft.engine.flower_worker import HOST_ENV, WorkerHost, use_worker_host

CONNECTION = "fedpeft"  # the SuperLink connection's name in the app's flwr-home/config.toml


# -- the app folder ---------------------------------------------------------------------------
def write_app(
    app_dir: Path,
    config: RunConfig,
    run_dir: Path,
    ca_cert: Path | None = None,
    simulation: bool = False,
) -> Path:
    """A Flower app folder for this run: pyproject.toml naming fedpeft's ServerApp/ClientApp,
    with the run's YAML and run folder in its run config, plus the flwr CLI's connection to
    ``flower.superlink`` (trusting ``ca_cert``; without it, an insecure connection). With
    ``simulation`` the ServerApp builds the whole job (every client's rows, as the embedded
    engine does) instead of asking nodes for their data."""
    check_supported(config, simulation=simulation)
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "project": {
            "name": "fedpeft-run",
            "version": "1.0.0",
            "description": f"fedpeft run {config.run_name()} on Flower",
            "license": "Apache-2.0",
            # Empty on purpose: runtime installation is off; every host has fedpeft installed.
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedpeft",
                    "components": {
                        "serverapp": "fedpeft.engine.flower_app:server_app",
                        "clientapp": "fedpeft.engine.flower_client:client_app",
                    },
                    "config": {
                        CONFIG_KEY: dump_config(config),
                        RUN_DIR_KEY: str(Path(run_dir).resolve()),
                        SIMULATION_KEY: simulation,
                    },
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    ca = str(ca_cert) if ca_cert else None
    write_connection(app_dir / "flwr-home", config.flower.superlink, ca)
    return app_dir


def write_connection(flwr_home: Path, address: str, root_certificates: str | None) -> Path:
    """The flwr CLI's config.toml with one SuperLink connection, ``fedpeft``."""
    connection: dict[str, object] = {"address": address}
    if root_certificates:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        connection["insecure"] = True
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    doc = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    path.write_text(tomli_w.dumps(doc))
    return path


# -- certificates and keys ------------------------------------------------------------------------
@dataclass
class Credentials:
    """TLS and node-authentication files: ``fedpeft flower certs`` writes them."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)  # private; the public key is KEY.pub


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(subject: str, public_key, issuer: str, signer, *, ca: bool, hosts=()) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_credentials(
    folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), num_nodes: int = 2
) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts`` signed by it, and ``num_nodes`` SuperNode key
    pairs (ECDSA P-384, OpenSSH format, as ``flower-supernode`` and ``flwr supernode`` expect).
    Paths come back absolute: the processes they are handed to run in other folders."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    creds = Credentials(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")
    creds.ca_cert.write_bytes(
        _certificate("fedpeft CA", ca_key.public_key(), "fedpeft CA", ca_key, ca=True)
    )
    creds.server_cert.write_bytes(
        _certificate(
            "fedpeft SuperLink",
            server_key.public_key(),
            "fedpeft CA",
            ca_key,
            ca=False,
            hosts=hosts,
        )
    )
    creds.server_key.write_bytes(_pem_key(server_key))
    for i in range(1, num_nodes + 1):
        creds.node_keys.append(make_node_key(folder / f"supernode-{i}"))
    for secret in (creds.server_key, *creds.node_keys):
        secret.chmod(0o600)
    return creds


def read_credentials(folder: Path) -> Credentials:
    """The files ``make_credentials`` wrote into ``folder`` (as absolute paths)."""
    folder = Path(folder).resolve()
    creds = Credentials(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")
    creds.node_keys = sorted(p.with_suffix("") for p in folder.glob("supernode-*.pub"))
    missing = [p for p in (creds.ca_cert, creds.server_cert, creds.server_key) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{missing[0]} not found: run `fedpeft flower certs {folder}` first "
            "(or set flower.insecure=true for a loopback test)"
        )
    return creds


def make_node_key(path: Path) -> Path:
    """A SuperNode key pair: ``path`` (private) and ``path.pub`` (what the SuperLink registers)."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(path.name + ".pub").write_bytes(public + b"\n")
    return path


# -- commands -------------------------------------------------------------------------------------
def superlink_argv(
    host: str, port: int, creds: Credentials | None, simulation: bool = False
) -> list[str]:
    """A SuperLink; with ``simulation`` it runs each submitted app on Flower's simulation
    runtime (a ``flwr-simulation`` process with simulated SuperNodes) instead of real nodes."""
    argv = ["flower-superlink", "--host", host, "--port", str(port)]
    argv.append("--disable-runtime-dependency-installation")
    if simulation:
        argv.append("--simulation")
    if creds is None:
        return argv + ["--insecure"]
    return argv + [
        "--ssl-certfile",
        str(creds.server_cert),
        "--ssl-keyfile",
        str(creds.server_key),
        "--ssl-ca-certfile",
        str(creds.ca_cert),
        "--enable-supernode-auth",
    ]


def supernode_argv(
    superlink: str,
    runtime_port: int,
    ca_cert: Path | None,
    key: Path | None,
    data: str | Path | None = None,
    name: str | None = None,
    secret: Path | None = None,
) -> list[str]:
    """A SuperNode; ``runtime_port`` is its local port for its ClientApps; ``data`` its own
    training rows and ``name`` how the run names it (``fedpeft.engine.flower_data``). With
    ``secret`` (a file) its ClientApps run in fedpeft's executor (``executor_argv``, given the
    same file), else in a Flower process per message."""
    argv = ["flower-supernode", "--superlink", superlink, "--port", str(runtime_port)]
    if secret is not None:
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    argv += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    if data is not None:
        pairs = [f'{DATA_PATH}="{data}"'] + ([f'{NAME}="{name}"'] if name else [])
        argv += ["--node-config", " ".join(pairs)]
    return argv


def executor_argv(runtime_port: int, secret: Path, supernode_pid: int | str) -> list[str]:
    """fedpeft's ClientApp executor for the SuperNode on ``runtime_port`` (on the same host,
    ``fedpeft.engine.flower_executor``); it ends when the SuperNode's process does."""
    if isinstance(supernode_pid, int):  # a local federation: this interpreter's fedpeft
        command = [sys.executable, "-m", "fedpeft.cli", "flower", "executor"]
    else:
        command = ["fedpeft", "flower", "executor"]
    return [
        *command,
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        str(supernode_pid),
    ]


def use_executor() -> bool:
    """Whether local SuperNodes run their ClientApps in fedpeft's executor: yes unless
    ``FEDPEFT_NODE_EXECUTOR=0`` (Flower's process per message: the benchmark's baseline)."""
    return os.environ.get("FEDPEFT_NODE_EXECUTOR", "1") != "0"


def write_secret(path: Path) -> Path:
    """A fresh random secret for a SuperNode and its executor, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(32))
    return path


def deployment_commands(app_dir: Path, config: RunConfig, creds: Credentials | None) -> str:
    """The commands a user runs for a real deployment of the app in ``app_dir``."""
    host, _, port = config.flower.superlink.rpartition(":")
    home = f"FLWR_HOME={shlex.quote(str((app_dir / 'flwr-home').resolve()))}"
    keys = creds.node_keys if creds else [None]
    lines = ["# 1. on the SuperLink host", shlex.join(superlink_argv(host, int(port), creds))]
    if creds:
        lines += ["# 2. register each SuperNode's public key (from where you run flwr)"]
        lines += [f"{home} flwr supernode register {k}.pub {CONNECTION}" for k in keys]
    lines += [
        "# 3. on each client host: one SuperNode per client, on that host's own rows, and",
        "#    fedpeft's executor, which runs the node's ClientApps in one long-lived process",
        "#    (both read the secret file: random bytes only that host's user can read)",
        "(umask 077; head -c 32 /dev/urandom > /path/to/its/secret)",
    ]
    for i, key in enumerate(keys, start=1):
        ca = creds.ca_cert if creds else None
        secret = Path("/path/to/its/secret")
        argv = supernode_argv(
            config.flower.superlink, 9094, ca, key, "/path/to/its/data", f"node-{i}", secret
        )
        lines.append(shlex.join(argv) + " &")
        lines.append(shlex.join(executor_argv(9094, secret, "$!")).replace("'$!'", "$!"))
    lines += ["# 4. start the run; the run folder is written on the SuperLink host"]
    lines.append(f"{home} flwr run {shlex.quote(str(app_dir))} {CONNECTION} --stream")
    return "\n".join(lines) + "\n"


# -- local processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: this venv's commands first, no network side-trips."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def session_members(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (our processes start sessions of their own, so this
    finds their descendants even once their parent has died and they were re-parented)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started and everything it started, each by PID: TERM, then KILL.
    A process started in a session of its own takes the rest of its session with it (a
    SuperLink killed from outside leaves its ServerApp and Ray's workers orphaned)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    known = {member.pid for member in family}
    if proc.pid != os.getsid(0):  # never our own session
        family += [m for m in session_members(proc.pid) if m.pid not in known]
    for member in family:
        try:
            member.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    stop_leftovers(family, timeout)
    if proc.poll() is None:
        proc.wait(timeout=timeout)


class FlowerError(RuntimeError):
    """A Flower process or command that failed, said in one line (details in the log named)."""


class LocalFederation:
    """A SuperLink and SuperNodes as processes on 127.0.0.1 with free ports.

    For tests, benchmarks and ``fedpeft flower local``; with ``creds`` it runs with TLS and
    node authentication, registering the first ``num_nodes`` keys. Logs go to ``work``; every
    process (and its children) is stopped by PID when the context exits.
    """

    def __init__(
        self,
        work: Path,
        num_nodes: int = 2,
        creds: Credentials | None = None,
        node_data: list[Path] | None = None,
        simulation: bool = False,
        env: dict[str, str] | None = None,
        host: WorkerHost | None = None,
    ):
        self.work = Path(work)
        self.num_nodes = num_nodes
        self.node_data = node_data or []  # node i's own rows: node_data[i]
        self.creds = creds
        self.simulation = simulation  # a simulation SuperLink: no SuperNodes to start
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = self.work / "flwr-home"
        self.env = {**flower_env(self.flwr_home), **(env or {})}
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.executors: list[subprocess.Popen] = []  # node i's ClientApp executor (if any)
        self.host = host  # the nodes' workers are forked from it (one is started if None)
        self.run_ended = False  # the last run() saw its run end (not stopped, not failed)
        self.logs: dict[int, Path] = {}
        # every process seen under ours while a run went on: one whose parent dies (a SuperLink
        # killed from outside) is re-parented away from our tree, and still stopped on exit
        self.seen: dict[int, psutil.Process] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            ca = self.creds.ca_cert if self.creds else None
            write_connection(self.flwr_home, self.address, str(ca) if ca else None)
            if self.num_nodes > 0 and (self.host is not None or use_worker_host()):
                self.start_worker_host()
            argv = superlink_argv("127.0.0.1", self.port, self.creds, self.simulation)
            self.superlink = self._spawn(argv, "superlink")
            self._wait_for_port()
            keys = self.creds.node_keys[: self.num_nodes] if self.creds else [None] * self.num_nodes
            for i, key in enumerate(keys):
                if key is not None:
                    self.register(key)
                self.start_node(key, self.node_data[i] if i < len(self.node_data) else None)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # The SuperLink (and the ServerApp process it started) first: a ServerApp that outlived
        # its nodes could record a round whose clients were stopped under it. Once the run has
        # ended there is nothing left to record: every process at once, and those that take more
        # than a second over it (a SuperLink's shutdown takes 2-3 s) are killed.
        rest = [*self.nodes, *self.executors, *([self.host.proc] if self.host else [])]
        ended = self.run_ended and exc[0] is None
        if self.superlink is not None and ended:
            rest.insert(0, self.superlink)
        elif self.superlink is not None:
            stop_process(self.superlink)
        # then every node, executor and the workers' host at once
        grace = 1.0 if ended else 10.0
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda proc: stop_process(proc, grace), rest))
        if self.host is not None:
            self.host.stop()  # its files
        orphans = [p for p in self.seen.values() if _running(p)]
        for orphan in orphans:
            try:
                orphan.terminate()
            except psutil.NoSuchProcess:
                pass
        stop_leftovers(orphans)
        self.seen = {}
        self.nodes = []
        self.executors = []
        self.superlink = None
        self.host = None
        self.run_ended = False

    def remember(self) -> None:
        """Note every process now under the SuperLink and the nodes (see ``seen``)."""
        for proc in [self.superlink, *self.nodes, *self.executors, self.host and self.host.proc]:
            if proc is None:
                continue
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                continue

    def _spawn(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches fedpeft alone, which then stops
            # every process in order (see __exit__).
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or self.env,
                cwd=self.work,
                start_new_session=True,
            )
        self.logs[proc.pid] = log
        return proc

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise FlowerError(f"flower-superlink exited; see {self.work / 'superlink.log'}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise FlowerError(f"flower-superlink did not listen within {timeout:.0f}s")

    # -- nodes ------------------------------------------------------------------------------------
    def start_worker_host(self) -> None:
        """The process the nodes' workers are forked from, unless one was given: it imports the
        engine once for all of them (the nodes find it in their environment)."""
        if self.host is None:
            self.host = WorkerHost(self.node_env())
        if not self.host.ready():  # the workers start on their own, as on separate hosts
            log = self.host.socket.with_suffix(".log")
            print(f"fedpeft: the worker host did not start; see {log}")
            self.host.stop()
            self.host = None

    def start_node(self, key: Path | None = None, data: Path | None = None) -> subprocess.Popen:
        """One more SuperNode (authenticating with ``key`` when given) on its own ``data``."""
        ca = self.creds.ca_cert if self.creds else None
        name = Path(data).name if data is not None else None
        number = len(self.nodes) + 1
        secret = write_secret(self.work / f"supernode-{number}.secret") if use_executor() else None
        port = free_port()
        argv = supernode_argv(
            self.address, port, ca, key, data and Path(data).resolve(), name, secret
        )
        env = self.node_env()
        proc = self._spawn(argv, f"supernode-{number}", env)
        self.nodes.append(proc)
        if secret is not None:
            argv = executor_argv(port, secret, proc.pid)
            # into the node's log, where Flower's own ClientApp processes write theirs
            self.executors.append(self._spawn(argv, f"supernode-{number}", env))
        return proc

    def node_env(self) -> dict[str, str]:
        """A node's environment: its share of this host's cores for torch (the nodes of a
        loopback federation train at the same time; each taking every core would oversubscribe
        them), unless ``OMP_NUM_THREADS`` is set (not empty) already; and the worker host."""
        env = dict(self.env)
        if self.host is not None:
            env[HOST_ENV] = str(self.host.socket)
        if not env.get("OMP_NUM_THREADS"):
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, self.num_nodes)))
        return env

    def register(self, key: Path) -> None:
        """Register a SuperNode's public key (``KEY.pub``) with the SuperLink."""
        self.flwr(["supernode", "register", f"{key}.pub", CONNECTION], timeout=60)

    def flwr(self, args: list[str], timeout: float) -> str:
        """Run the flwr CLI against this federation; its output, or FlowerError."""
        try:
            done = subprocess.run(
                ["flwr", *args],
                env=self.env,
                cwd=self.work,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as err:
            raise FlowerError(f"flwr {args[0]} took more than {timeout:.0f}s") from err
        if done.returncode != 0:
            raise FlowerError(
                f"flwr {' '.join(args)} failed: {done.stdout[-800:]}{done.stderr[-800:]}"
            )
        return done.stdout

    def run(
        self,
        app_dir: Path,
        timeout: float | None = 600.0,
        echo=None,
        extra: list[str] | None = None,
        stop: threading.Event | None = None,
        finished: Callable[[], bool] | None = None,
    ) -> str:
        """Submit the app with ``flwr run`` (plus ``extra`` arguments) and wait until the run
        ends (at most ``timeout`` seconds); returns its log, also written to ``flwr-run.log``.
        ``echo`` is called with each line as it arrives; once ``stop`` is set the CLI is stopped
        and ``Interrupted`` raised. Once ``finished()`` says the ServerApp wrote its last file,
        the run is over: the CLI is stopped rather than waited for (Flower takes seconds to
        notice that the ServerApp ended)."""
        argv = ["flwr", "run", str(app_dir), CONNECTION, "--stream", *(extra or [])]
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: list[str] = []

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if echo is not None:
                    echo(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        done_early = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ticks = 0
            while proc.poll() is None:
                if stop is not None and stop.is_set():
                    raise Interrupted("the run was stopped")
                if finished is not None and finished():
                    done_early = True
                    stop_process(proc)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FlowerError(f"flwr run took more than {timeout:.0f}s")
                if ticks % 10 == 0:
                    self.remember()
                ticks += 1
                time.sleep(0.2)
        except BaseException:  # Ctrl-C too: the CLI is in a session of its own, stop it here
            stop_process(proc)
            raise
        finally:
            reader.join(timeout=10)
            (self.work / "flwr-run.log").write_text("".join(lines))
        output = "".join(lines)
        if proc.returncode != 0 and not done_early:
            raise FlowerError(f"flwr run failed: {output[-800:]}")
        self.run_ended = True
        return output
