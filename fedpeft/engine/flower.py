"""The Flower engine: the embedded engine's run, with Flower 1.41 carrying the messages.

The server side is a Flower ``Strategy`` (``FedpeftStrategy``): fedpeft samples the round's
clients (``sample_clients``), the federated method decides what each one receives and combines
the uploads (``method.download`` / ``method.aggregate``, i.e. ``fedpeft.algorithms``), and the
server evaluates and writes the same run folder as the embedded engine. The client side is a
``ClientApp`` that runs ``train_client``, the embedded engine's own per-client step. Only the
trainable tensors travel, as ``ArrayRecord``s; the bytes counted are the safetensors encoding of
those tensors (``fedpeft.payload``), exactly what the embedded engine counts, so the two engines
report the same traffic.

In simulation, messages carry the logical client id, so any node can serve any client: the
server spreads a round's clients over the connected nodes in turn, and a client trains
identically wherever it runs. In a deployment each node owns its rows and is one client
(``fedpeft.engine.flower_data``): the nodes describe their data before round 1 and each round
samples among them. A round waits at most ``flower.round_timeout_s``; clients that do not
answer in time (a node died, a reply failed) are left out of the aggregate and listed in the
metrics row as ``clients_failed``.

Two ways to run it (docs/flower.md), both ``flwr run`` submitting ``fedpeft.engine.flower_app``:
``FlowerEngine`` (``engine: flower``) to a SuperLink it starts in simulation mode, one simulated
SuperNode per client; ``fedpeft flower ...`` to a SuperLink with real SuperNodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Flower and Ray read these when imported: no telemetry, no update check (both would try the
# network). Set before any flwr import; subprocesses (Ray workers, SuperNodes) inherit them.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
os.environ.update(FLOWER_ENV)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.proto.node_pb2 import NodeInfo  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402

from fedpeft import cost, faults, payload, quantize  # noqa: E402
from fedpeft.client import Evaluation, LocalResult  # noqa: E402
from fedpeft.config import ConfigError, RunConfig, build_config  # noqa: E402
from fedpeft.data.sources import DataError  # noqa: E402
from fedpeft.engine import run as skeleton  # noqa: E402
from fedpeft.engine.flower_arrays import pack, packing, unpack  # noqa: E402
from fedpeft.engine.flower_client import (  # noqa: E402, F401
    CONFIG_KEY,
    ESTIMATE_KEY,
    SIMULATION_KEY,
    STORE_RECORD,
    training_inputs,
    training_reply,
)
from fedpeft.engine.flower_store import NodeStore, state_folder  # noqa: E402
from fedpeft.engine.run import ProgressHook, RunState  # noqa: E402
from fedpeft.job import Job, build_job, build_model  # noqa: E402
from fedpeft.methods.base import (  # noqa: E402
    ClientFit,
    ClientRunner,
    ClientUpdate,
    RoundDriver,
    RoundReport,
)
from fedpeft.peft.base import State, load_trainable_state  # noqa: E402
from fedpeft.runs import RunDir, rng_state, set_rng_state  # noqa: E402

log = logging.getLogger("fedpeft.flower")
LOG_PREFIX = "fedpeft "  # how the ServerApp's own lines start in the run's log (``show_log``)


def show_log() -> None:
    """Send the server's notes (nodes that take no part, rejoin, wait) to stderr, which a
    deployed ServerApp's log carries to ``flwr run --stream`` and ``fedpeft flower local``."""
    if not any(getattr(h, "fedpeft", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_PREFIX + "%(levelname)s: %(message)s"))
        handler.fedpeft = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


RUN_DIR_KEY = "run-dir"  # run-config key holding the run folder's path on the SuperLink host


def check_supported(config: RunConfig, simulation: bool = True) -> None:
    """Refuse, in one line, a config the Flower engine cannot run on this machine: called before
    any run folder is written. (What no machine could run, e.g. a method without Flower support,
    is refused by the config itself.) ``simulation``: the resources of Flower's simulation."""
    from fedpeft import registry

    if "flower" not in registry.get(config.method).engines:
        raise ConfigError(f"engine: flower does not run {config.method} yet (use engine: embedded)")
    if simulation and config.flower.secagg.enabled:  # one node may serve several clients there
        raise ConfigError(
            "flower.secagg.enabled: SecAgg+ runs in a deployment only (fedpeft flower local / "
            "prepare); in simulation the server process holds every client's rows anyway"
        )
    if not simulation:
        if config.personalized_eval:  # the server would score nothing and say nothing
            raise ConfigError(
                "personalized_eval: a deployment's server holds no client's test rows; "
                "set personalized_eval: false (or run it in simulation, engine: flower)"
            )
        if config.privacy.membership_inference:  # its members are rows only the nodes hold
            raise ConfigError(
                "privacy.membership_inference: a deployment's server holds no client's training "
                "rows to attack; set it to false (or run it in simulation, engine: flower)"
            )
        return
    if config.activation_cache.enabled:  # misses are charged per process, not per client
        raise ConfigError(
            "activation_cache.enabled: in Flower simulation any process may serve any client, "
            "so a cache per process would charge a client's rows again where another process "
            "cached them; set activation_cache.enabled=false (a deployment, one node per "
            "client, or the embedded engine keeps it)"
        )
    cores = os.cpu_count() or 1
    if config.flower.num_cpus != int(config.flower.num_cpus):  # `flwr run` takes whole cores
        raise ConfigError(
            f"flower.num_cpus: {config.flower.num_cpus:g}, but Flower's simulation reserves "
            "whole cores per client; set 1, 2, ..."
        )
    if config.flower.num_cpus > cores:
        raise ConfigError(
            f"flower.num_cpus: {config.flower.num_cpus:g} cores per client, but this machine "
            f"has {cores}"
        )
    if config.flower.num_gpus and not torch.cuda.is_available():
        raise ConfigError("flower.num_gpus: no GPU is visible here; set flower.num_gpus=0")


def to_state(record: ArrayRecord) -> State:
    """ArrayRecord (packed or not, ``flower_arrays``) -> torch tensors."""
    return {name: torch.from_numpy(array) for name, array in unpack(record).items()}


def from_state(state: State) -> ArrayRecord:
    """torch tensors -> an ArrayRecord, packed unless turned off (``flower_arrays``)."""
    arrays = {name: t.detach().contiguous().numpy() for name, t in state.items()}
    return pack(arrays, packing())


# -- client side ----------------------------------------------------------------------------------
_JOBS: dict[str, Job] = {}  # one job per process: the model and data load once, not per message
_MODELS: dict[str, tuple] = {}  # a model built ahead of its job (``prebuild_model``), by config
_STORES: dict[str, NodeStore] = {}  # deployment: the clients' persistent tensors on this node


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


def prebuild_model(config_yaml: str, num_labels: int) -> None:
    """Build the run's model (backbone, head, method; the same for every client of the run:
    seeded by the config) ahead of the job that takes it: a node's worker does so once it has
    described its data, while the server admits the nodes."""
    key = _key(config_yaml, num_labels)
    if key not in _MODELS and not _JOBS:
        _MODELS.clear()
        _MODELS[key] = build_model(build_config(yaml.safe_load(config_yaml)), num_labels)


def client_job(config_yaml: str, node: tuple | None = None) -> tuple[Job, float, float]:
    """The process's job for this config, plus where a first message's time went: seconds from
    process start to now (interpreter, imports) and seconds building the job (0, 0 when cached).
    ``node``: (data path, client id, clients, label names) on a node that owns its data."""
    key = _key(config_yaml, node)
    if key in _JOBS:
        return _JOBS[key], 0.0, 0.0
    started = time.time()
    since_start = started - psutil.Process().create_time()
    _JOBS.clear()
    _STORES.clear()
    config = build_config(yaml.safe_load(config_yaml))
    if node is None:
        _JOBS[key] = build_job(config)
    else:
        from fedpeft.engine import flower_data

        path, cid, num_clients, names = node
        rows = flower_data.read_node_rows(path, list(names))
        built = _MODELS.pop(_key(config_yaml, len(names)), None)
        _JOBS[key] = flower_data.node_job(config, rows, cid, num_clients, built)
    return _JOBS[key], since_start, time.time() - started


Arrays = dict[str, np.ndarray]  # tensors as they travel between a ClientApp and its node worker


def arrays_to_state(arrays: Arrays) -> State:
    """numpy arrays -> torch tensors (copied: received buffers can be read-only)."""
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in arrays.items()}


def train_arrays(
    config_yaml: str,
    settings: dict[str, Any],
    arrays: Arrays,
    data_path: str | None = None,
    carried: Arrays | None = None,
) -> tuple[Arrays, dict[str, Any], Arrays | None]:
    """One client's round as plain data: the received tensors and the message's settings in,
    the upload and its figures out. On a node started with its own data (``data_path``) the
    client is that data. The ClientApp runs it in process (simulation) or on the node's worker
    (deployment, ``fedpeft.engine.flower_worker``). The client's persistent tensors
    (``fedpeft.engine.flower_store``): ``carried`` in and out with the message (simulation;
    the third value), else kept on this node (None)."""
    rnd, cid = int(settings["round"]), int(settings["cid"])
    node = None
    if data_path is not None:
        names = tuple(json.loads(str(settings["labels"])))
        node = (data_path, cid, int(settings["num-clients"]), names)
    job, start_s, load_s = client_job(config_yaml, node)
    received = arrays_to_state(arrays)
    if "dtypes" in settings:  # an int8 download: codes and scales back to weights
        dtypes = {
            name: getattr(torch, d) for name, d in json.loads(str(settings["dtypes"])).items()
        }
        received = quantize.unpack_int8(received, dtypes)
    if "method" in settings:  # the server's decisions this client trains under
        job.method.load_client_settings(json.loads(str(settings["method"])))
    job.method.prepare_client(job.model, rnd, cid)
    started = time.perf_counter()
    if carried is not None:
        store = arrays_to_state(carried)
    else:
        key = _key(config_yaml, node)
        if key not in _STORES:
            _STORES.clear()
            _STORES[key] = NodeStore(state_folder(data_path, key))
        store = _STORES[key].load(cid, rnd)
    # as in the embedded engine: a simulated attacker poisons, local DP randomises the upload
    stream = tuple(json.loads(str(settings["stream"]))) if "stream" in settings else ()
    work, clipped = skeleton.client_upload(job, rnd, cid, received, store, stream)
    kept = None
    if carried is not None:
        kept = {name: t.detach().contiguous().numpy() for name, t in store.items()}
    else:
        _STORES[key].save(cid, rnd, store)
    sent, result, compute_s = work.sent, work.result, work.compute_s
    if job.config.quantize == "int8":  # the update travels as int8 codes + scales
        sent = quantize.encode_update(sent, received)
    train_s = time.perf_counter() - started
    metrics = {f"m.{key}": value for key, value in work.metrics.items()}
    if clipped is not None:  # local DP: the upload is randomised; was its update clipped?
        metrics["dp-clipped"] = int(clipped)
    metrics.update(
        {
            "cid": cid,
            "num-samples": result.num_samples,
            "steps": result.steps,
            "mean-loss": result.mean_loss,
            "samples-seen": result.samples_seen,
            "tokens-seen": result.tokens_seen,
            "compute-s": compute_s,
            "start-s": start_s,
            "load-s": load_s,
            "train-s": train_s,
        }
    )
    out = {name: tensor.detach().contiguous().numpy() for name, tensor in sent.items()}
    return out, metrics, kept


def estimate_arrays(
    config_yaml: str, settings: dict[str, Any], arrays: Arrays, data_path: str
) -> dict[str, Any]:
    """A node's cost-model bound on its client's simulated seconds for one round from the
    tensors received (``skeleton.estimate_client_time_s`` on its own rows and profile): how a
    deployed round-driving method (AutoFedNLP) plans its budgets without the clients' rows."""
    cid = int(settings["cid"])
    names = tuple(json.loads(str(settings["labels"])))
    node = (data_path, cid, int(settings["num-clients"]), names)
    job, _start, _load = client_job(config_yaml, node)
    if "method" in settings:
        job.method.load_client_settings(json.loads(str(settings["method"])))
    job.method.prepare_client(job.model, 0, cid)
    seconds = skeleton.estimate_client_time_s(job, cid, arrays_to_state(arrays))
    return {"cid": cid, "seconds": seconds}


def train_on_message(msg: Message, config_yaml: str, data_path: str | None = None) -> Message:
    """``train_arrays`` on a Flower message, in this process."""
    arrays, carried, settings = training_inputs(msg)
    return training_reply(msg, *train_arrays(config_yaml, settings, arrays, data_path, carried))


def describe_node(node_config: dict, labels: list[str]) -> dict[str, Any]:
    """A node's answer to the server's question before round 1: its name, row count and label
    histogram, or the one line saying why its data cannot be used (it then takes no part)."""
    from fedpeft.engine import flower_data

    path = node_config.get(flower_data.DATA_PATH)
    name = str(node_config.get(flower_data.NAME) or (Path(str(path)).name if path else "node"))
    try:
        if not path:
            raise DataError("started without its data (--node-config 'data-path=\"FOLDER\"')")
        rows = flower_data.read_node_rows(str(path), labels)
        counts = np.bincount(rows.labels, minlength=len(labels)).tolist()
        return {"name": name, "rows": len(rows), "label-counts": counts}
    except (DataError, OSError) as err:  # the ClientApp says it in the node's log
        return {"name": name, "error": str(err)}


# -- server side ----------------------------------------------------------------------------------
class SimulationFailed(RuntimeError):
    """A simulated run's Flower processes ended before the run did (a process died, e.g. the
    SuperLink): said in one line; the complete rounds are kept and the run can be resumed."""


class Interrupted(Exception):
    """The run was stopped before its end (a progress hook raised): every process it started
    has been stopped, and only complete rounds are recorded."""


REPLY_POLL_S = 0.2  # how often the ServerApp asks the SuperLink for the replies it awaits
NODES_POLL_S = 0.2  # how often it asks which nodes are connected, while it waits for them


class PromptGrid(Grid):
    """The ServerApp's grid, collecting replies every ``poll_s``. Flower 1.41's deployment grid
    asks the SuperLink for them every 3 s, so each exchange (a round, a question to the nodes)
    waited up to 3 s after its last reply arrived; the requests go to the SuperLink on the same
    host. Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        self.inner, self.poll_s = grid, poll_s

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """As Flower's: push, then pull until every reply is in or ``timeout`` s have passed."""
        return self.receive(self.push_messages(messages), timeout)

    def receive(self, ids: Iterable[str], timeout: float | None = None) -> list[Message]:
        """The replies to the messages ``ids`` (pushed earlier), pulled until every one is in
        or ``timeout`` s have passed."""
        waiting = set(ids)
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if waiting:
                time.sleep(self.poll_s)
        return replies


def connected_nodes(grid: Grid, minimum: int, wait_s: float | None = None) -> list[int]:
    """The connected SuperNodes (sorted), once at least ``minimum`` are there; after ``wait_s``
    seconds (None: no limit) whatever is connected, possibly none."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    said = None
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if deadline is not None and time.monotonic() > deadline:
            break
        if len(nodes) != said:
            log.info("waiting for SuperNodes: %d of %d connected", len(nodes), minimum)
            said = len(nodes)
        time.sleep(NODES_POLL_S)
    return nodes


class FedpeftStrategy(Strategy):
    """A fedpeft round as a Flower strategy (see the module docstring).

    Flower's round ``r`` is fedpeft's round ``first_round + r - 1`` (so resumed runs continue
    their numbering). ``finish_round`` is the strategy's ``evaluate_fn``: it evaluates the new
    global state on the server and writes the metrics row, checkpoint and summary. A plain
    round is played by ``flower_round`` with the strategy's parts (``send``, ``aggregate_train``,
    ``finish``), so the next round's messages can go out before this one is evaluated; SecAgg+
    rounds use Flower's workflow (``fedpeft.engine.flower_secagg``).
    """

    def __init__(
        self,
        job: Job,
        run_dir: RunDir,
        state: RunState,
        min_nodes: int,
        on_event: ProgressHook,
        nodes: list[dict] | None = None,
    ) -> None:
        self.job, self.config, self.method = job, job.config, job.method
        # Node-owned data: client k is the node named nodes[k]["name"]; owners maps each client
        # to the node id that answers for it now (a restarted node gets a new id: ``rejoin``).
        self.owners = None if nodes is None else {k: d["node"] for k, d in enumerate(nodes)}
        self.client_of = {} if nodes is None else {d["name"]: k for k, d in enumerate(nodes)}
        self.asked = {d["node"] for d in nodes or []}  # node ids that have described their data
        self.run_dir = run_dir
        self.state = state
        self.first_round = state.done + 1
        self.min_nodes = min_nodes
        self.on_event = on_event
        self.report = RoundReport(0, [], train_loss=0.0)
        self.grid: Grid | None = None
        self.nodes: list[int] = []  # the nodes this round's clients are spread over
        self.clients: list[int] = []  # the current attempt's clients
        self.crashed: set[int] = set()  # this attempt's simulated crashes (``faults``)
        self.noised: list[tuple[int, bool]] = []  # local DP: (client, clipped), this round
        self.formed = False  # whether min_nodes were connected once
        self.failed: list[int] = []
        self.down_bytes: dict[int, int] = {}
        self.downloads: dict[int, tuple[State, State]] = {}  # this round: (sent, as received)
        self.node_of: dict[int, int] = {}  # this round's client -> node
        self.suspects: set[int] = set()  # nodes that missed the last round's deadline
        self.client_wall: dict[str, list[float]] = {}  # clients' own timings, this round
        self.started = self.sent_at = 0.0
        self.in_flight: tuple[int, list[str]] | None = None  # a round's pushed message ids
        # Simulation: the server keeps the clients' stores and sends each its own (a deployed
        # node keeps its own: ``fedpeft.engine.flower_store``)
        self.carry_store = nodes is None

    @property
    def global_state(self) -> State:
        return self.state.global_state

    def summary(self) -> None:
        if self.formed:  # ``start`` runs once per round: say it once
            return
        log.info(
            "fedpeft %s (%s) over Flower: %d clients, %d per round",
            self.method.name,
            self.config.algorithm,
            self.config.num_clients,
            self.config.clients_per_round,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.first_round + server_round - 1
        self.begin_round(rnd, grid)
        self.clients = self._sample(rnd, 0)
        self.sent_at = time.perf_counter()
        return self._messages(rnd, 0)

    def begin_round(self, rnd: int, grid: Grid, announce: bool = True) -> None:
        """A round's start: the federation formed (or what is left of it), the nodes to use.
        ``announce=False``: a round sent ahead (``flower_round``), announced when it begins."""
        self.started = time.perf_counter()
        if announce:
            self.on_event("round_start", {"round": rnd})
        if not self.formed:  # the federation forms: wait for min_nodes
            connected = connected_nodes(grid, self.min_nodes)
            self.formed = True
        else:  # nodes may have died: go on with those left, none after a round's timeout
            connected = connected_nodes(grid, 1, self.config.flower.round_timeout_s)
        if self.owners is not None:
            self.rejoin(grid, connected)
        # A node that just missed a deadline gets no clients this round (it may be dead; the
        # SuperLink only notices after its heartbeats lapse); it is used again afterwards.
        self.nodes = [n for n in connected if n not in self.suspects] or connected
        self.grid = grid
        self.report = RoundReport(rnd, [], train_loss=0.0)
        skeleton.start_faults(self.job, self.report)
        self.failed, self.noised = [], []
        self.client_wall = {"start-s": [], "load-s": [], "train-s": [], "relay-s": []}

    def _sample(self, rnd: int, attempt: int) -> list[int]:
        """The clients of an attempt, drawn as the embedded engine draws them; with nodes that
        own their data, among the nodes still connected."""
        clients = skeleton.attempt_clients(self.job, rnd, attempt)
        if self.owners is not None:  # a node is a client: sample among the nodes still there
            alive = [cid for cid, node in self.owners.items() if node in self.nodes]
            if len(alive) < len(self.owners):
                size = min(self.config.clients_per_round, len(alive))
                draw = np.random.default_rng([self.config.seed, rnd]).choice(alive, size, False)
                clients = sorted(int(cid) for cid in draw)
        return clients

    def _messages(
        self, rnd: int, attempt: int, state: State | None = None, stream: tuple[int, ...] = ()
    ) -> list[Message]:
        """What each client of the attempt receives, from ``state`` (the global state unless
        a round-driving method trains another). A client that ``faults`` crashes gets its
        download counted and no message (it would send nothing back), as embedded. ``stream``:
        the random stream a round-driving method trains the clients in."""
        state = self.global_state if state is None else state
        plan = self.job.faults
        self.down_bytes, self.node_of, self.downloads, self.crashed = {}, {}, {}, set()
        messages = []
        settings: dict[str, Any] = {}
        if self.owners is not None:  # each client is a node: only connected ones can train
            settings = {
                "num-clients": self.config.num_clients,
                "labels": json.dumps(self.job.label_names),
            }
            targets = [(cid, self.owners[cid]) for cid in self.clients]
        else:  # any node serves any client: spread them in turn
            nodes = self.nodes
            targets = [
                (c, nodes[i % len(nodes)]) for i, c in enumerate(self.clients if nodes else [])
            ]
        decided = self.method.client_settings()
        if decided:  # what the method decided on the server, for the clients' own copies
            settings["method"] = json.dumps(decided)
        if stream:
            settings["stream"] = json.dumps(list(stream))
        int8_down = self.config.quantize == "int8" and self.config.quantize_download
        for cid, node in targets:
            down = self.method.download(rnd, cid, state)
            sent, extra = down, {}
            if int8_down:  # what the client rebuilds from int8 codes is what it trains from
                sent = quantize.pack_int8(down)
                extra = {"dtypes": json.dumps({k: str(t.dtype)[6:] for k, t in down.items()})}
            blob = payload.encode(sent)
            self.down_bytes[cid] = len(blob)
            if plan is not None and plan.crashed(rnd, cid, attempt):
                self.crashed.add(cid)
                continue
            received = down
            if int8_down:
                dtypes = {k: t.dtype for k, t in down.items()}
                received = quantize.unpack_int8(payload.decode(blob), dtypes)
            self.downloads[cid] = (down, received)
            content = RecordDict(
                {
                    "arrays": from_state(sent),
                    "config": ConfigRecord({"round": rnd, "cid": cid, **settings, **extra}),
                }
            )
            if self.carry_store:  # not traffic: a deployed client's store never leaves it
                content[STORE_RECORD] = from_state(self.state.store.of(cid))
            self.node_of[cid] = node
            messages.append(
                Message(
                    content,
                    node,
                    MessageType.TRAIN,
                    ttl=self.config.flower.round_timeout_s,
                    group_id=str(rnd),
                )
            )
        return messages

    def rejoin(self, grid: Grid, connected: list[int]) -> None:
        """Map by name the nodes that connected since the last round: a node restarted (a new
        Flower node id) answers for its client again; a node the run did not start with takes
        no part (the run's clients are fixed when it starts)."""
        new = [node for node in connected if node not in self.asked]
        if not new or self.owners is None:
            return
        self.asked.update(new)
        for d in describe_nodes(grid, new, self.job):
            cid = self.client_of.get(d["name"])
            if cid is None:
                log.warning(
                    "node %s takes no part: it joined after the run started (its clients are "
                    "the nodes that described their data before round 1)",
                    d["name"],
                )
                continue
            log.info("node %s rejoined (node id %d): client %d", d["name"], d["node"], cid)
            self.owners[cid] = d["node"]

    def _fit(self, reply: Message, sent: State | None = None) -> ClientFit:
        """A client's reply as the embedded engine's ``ClientFit``: its checked update (None
        when the upload is unusable, with the reason), bytes and simulated seconds; ``sent``:
        what it was sent (the global state unless a round-driving method trains another)."""
        metrics = dict(reply.content["metrics"])
        cid = int(metrics["cid"])
        try:
            blob = payload.encode(to_state(reply.content["arrays"]))
        except Exception as err:  # noqa: BLE001 - whatever a node sent, the round goes on
            return self.client_fit(metrics, None, 0, f"arrays do not convert to tensors: {err}")
        base = self.global_state if sent is None else sent
        expected = skeleton.expected_upload(self.job, self.report.rnd, cid, base)
        if self.config.quantize == "int8" and cid in self.downloads:
            state, reason = self._int8_update(blob, cid, expected)
        else:
            state, reason = skeleton.check_upload(blob, expected)
        return self.client_fit(metrics, state, len(blob), reason)

    def client_fit(
        self, metrics: dict[str, Any], state: State | None, bytes_up: int, reason: str | None
    ) -> ClientFit:
        """A client's figures (``train_arrays``' metrics) and its checked upload ``state``
        (None: unusable, for ``reason``) as a ``ClientFit``, with its simulated seconds."""
        cid = int(metrics["cid"])
        down = self.down_bytes[cid]
        _device, network = self.job.profiles[cid]
        if "dp-clipped" in metrics:  # local DP: a randomised upload left the client
            self.noised.append((cid, bool(metrics["dp-clipped"])))
        seconds = float(metrics["compute-s"]) + cost.comm_time_s(bytes_up, down, network)
        for key in self.client_wall:  # relay-s: only where a node's worker trained
            if key in metrics:
                self.client_wall[key].append(float(metrics[key]))
        if state is None:
            return ClientFit(None, bytes_up, down, seconds, 0.0, reason)
        result = LocalResult(
            int(metrics["num-samples"]),
            int(metrics["steps"]),
            float(metrics["mean-loss"]),
            int(metrics["samples-seen"]),
            int(metrics["tokens-seen"]),
        )
        reported = {key[2:]: value for key, value in metrics.items() if key.startswith("m.")}
        update = ClientUpdate(cid, state, result.num_samples, result, reported)
        return ClientFit(update, bytes_up, down, seconds, 0.0)

    def _settle(self, attempt: int, replies: Iterable[Message]) -> list[ClientUpdate]:
        """An attempt's replies, checked client by client in sampled order (``settle``)."""
        answers = self.answers(replies)
        fits = {
            cid: self._fit(answers[cid])
            for cid in self.clients
            if cid in answers and cid in self.node_of and cid not in self.crashed
        }
        return self.settle(attempt, fits)

    def answers(self, replies: Iterable[Message]) -> dict[int, Message]:
        """The replies that carry an answer, by client; in simulation each client's store
        comes back with it and is kept (``fedpeft.engine.flower_store``)."""
        answers: dict[int, Message] = {}
        for reply in replies:
            if reply.has_error():
                log.warning("a client failed: %s", reply.error.reason)
                continue
            cid = int(reply.content["metrics"]["cid"])
            answers[cid] = reply
            if self.carry_store and STORE_RECORD in reply.content.array_records:
                kept = self.state.store.of(cid)  # the client's store as it ended its training
                kept.clear()
                kept.update(to_state(reply.content[STORE_RECORD]))
        return answers

    def settle(self, attempt: int, fits: dict[int, ClientFit]) -> list[ClientUpdate]:
        """An attempt's fits, client by client in sampled order (the embedded engine's, so
        the float sums match it exactly): crashed, late and rejected clients are recorded as
        embedded (``skeleton.settle_client``); a client without a fit (its node died, its
        ClientApp failed, it timed out) is listed in ``clients_failed``."""
        report = self.report
        updates, times = [], []
        for i, cid in enumerate(self.clients):
            crashed = cid in self.crashed
            if crashed:
                _device, network = self.job.profiles[cid]
                down = self.down_bytes[cid]
                fit = ClientFit(None, 0, down, cost.comm_time_s(0, down, network), 0.0)
            elif cid in fits:
                fit = fits[cid]
            else:
                self.failed.append(cid)
                report.bytes_down += self.down_bytes.get(cid, 0)
                continue
            update, seconds = skeleton.settle_client(
                self.job, report, attempt, cid, fit, crashed, self.on_event
            )
            times.append(seconds)
            if update is not None:
                updates.append(update)
                info = {"round": report.rnd, "done": i + 1, "of": len(self.clients)}
                self.on_event("client", {**info, "loss": update.result.mean_loss})
        report.sim_time_s += skeleton.attempt_time_s(self.job, times)
        return updates

    def _int8_update(self, blob: bytes, cid: int, expected: State) -> tuple[State | None, str]:
        """An int8 update (``fedpeft.quantize``) added back to the server's exact copy of what
        it sent, so download quantisation never accumulates in the global model; as embedded."""
        state, reason = skeleton.check_upload(blob, None)
        if state is None:
            return None, reason
        down, received = self.downloads[cid]
        exact = {k: down[k] if k in down else t for k, t in received.items()}
        try:
            rebuilt = quantize.decode_update(state, exact, expected)
        except (KeyError, ValueError, RuntimeError) as err:
            return None, f"int8 update does not fit: {err}"
        return skeleton.check_upload(payload.encode(rebuilt), expected)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's updates, aggregated as embedded. An attempt short of
        ``faults.min_clients`` is retried here with the embedded engine's fresh sample, until
        the last one fails the run (``faults.RoundFailed``)."""
        report, job = self.report, self.job
        rnd = report.rnd
        attempt = 0
        updates = self._settle(attempt, replies)
        while skeleton.short_of_quorum(job, rnd, updates):
            attempt += 1
            if attempt >= skeleton.max_attempts(job):
                raise skeleton.round_failed(job, rnd, self.run_dir)
            self.clients = self._sample(rnd, attempt)
            messages = self._messages(rnd, attempt)
            timeout = self.config.flower.round_timeout_s
            answers = self.grid.send_and_receive(messages, timeout=timeout) if messages else []
            updates = self._settle(attempt, answers)
        self.record_clients(attempt, updates)
        if not updates:
            log.warning("round %d: no usable update; the global state is unchanged", rnd)
            return None, None
        self.state.global_state = skeleton.aggregate_round(
            job, rnd, self.global_state, updates, report, self.state.history
        )
        metrics = MetricRecord({"train-loss": report.train_loss, "clients": len(updates)})
        return ArrayRecord.from_torch_state_dict(self.global_state), metrics

    def record_clients(self, attempt: int, updates: list[ClientUpdate]) -> None:
        """The round's record of its clients once its last attempt is in."""
        report = self.report
        report.train_wall_s = time.perf_counter() - self.sent_at  # waiting on the clients
        history = self.state.history
        skeleton.end_attempts(
            self.job, report, self.clients, attempt + 1, updates, history, self.noised
        )
        self.suspects = {self.node_of[cid] for cid in self.failed if cid in self.node_of}
        report.extra["clients_failed"] = self.failed
        self.record_wall(report)

    def record_wall(self, report: RoundReport) -> None:
        """Where a client's wall time went (means over the answers): starting a process and
        loading the job (0 when the process had it already), handing the message to the
        node's worker and back (deployment), then training."""
        for key, values in self.client_wall.items():
            name = "client_" + key.replace("-s", "_s")
            report.extra[name] = sum(values) / len(values) if values else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (finish_round), as embedded

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def finish_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the new global state and write the round's row, checkpoint and summary."""
        if server_round == 0:
            return None  # Flower's look at the starting weights; fedpeft rows start at round 1
        row = self.finish(self.report, self.started)
        scores = {k: row[k] for k in ("accuracy", "macro_f1") if row.get(k) is not None}
        return MetricRecord(scores)

    def finish(self, report: RoundReport, started: float) -> dict[str, Any]:
        """Round ``report.rnd``'s evaluation of the global state, its row, checkpoint and summary."""
        load_trainable_state(self.job.model, self.global_state)
        return skeleton.finish_round(
            self.job, self.run_dir, self.state, report, started, self.on_event
        )

    # -- rounds sent ahead (``flower_round``) -------------------------------------------------
    def send(self, rnd: int, grid: PromptGrid) -> None:
        """Round ``rnd``'s first attempt out: its clients sampled, their messages pushed."""
        self.clients = self._sample(rnd, 0)
        self.sent_at = time.perf_counter()
        self.in_flight = (rnd, list(grid.push_messages(self._messages(rnd, 0))))

    def can_send_ahead(self, rnd: int) -> bool:
        """Whether round ``rnd + 1``'s messages may go out before round ``rnd`` is evaluated
        (``flower.send_ahead``, and the round is sure to run: ``skeleton.next_round_certain``)."""
        return self.config.flower.send_ahead and skeleton.next_round_certain(
            self.job, self.state.history, rnd
        )


def flower_round(strategy: FedpeftStrategy, grid: PromptGrid) -> None:
    """One fedpeft round (``strategy.first_round``) over Flower. Its messages went out already
    when the round before could send them ahead; once its replies are aggregated, the next
    round's messages go out *before* this round is evaluated (when that round is sure to run:
    ``can_send_ahead``), so the clients train while the server evaluates and writes the round.
    The same clients, tensors and weights as one round after the other (what the clients are
    sent never depends on the evaluation); a round's wall time starts when the round before it
    is recorded, its clients may have started earlier."""
    rnd = strategy.first_round
    timeout = strategy.config.flower.round_timeout_s
    strategy.summary()  # once, as the federation forms
    if strategy.in_flight is not None and strategy.in_flight[0] == rnd:
        strategy.started = strategy.sent_at = time.perf_counter()
        strategy.on_event("round_start", {"round": rnd})
    else:
        strategy.begin_round(rnd, grid)
        strategy.send(rnd, grid)
    replies = grid.receive(strategy.in_flight[1], timeout)
    strategy.in_flight = None
    strategy.aggregate_train(1, replies)
    report, started = strategy.report, strategy.started
    if not strategy.can_send_ahead(rnd):
        strategy.finish(report, started)
        return
    before = rng_state()  # the checkpoint keeps the random state as round ``rnd`` left it
    strategy.begin_round(rnd + 1, grid, announce=False)
    strategy.send(rnd + 1, grid)
    after = rng_state()
    set_rng_state(before)
    strategy.finish(report, started)
    set_rng_state(after)


class FlowerRunner(ClientRunner):
    """The ``ClientRunner`` a round-driving method (AutoFedNLP) gets on Flower: its clients'
    fits go out as Flower messages, all of a sub-round's at once, spread over the nodes as any
    round's; the server scores and plans (cost model) with its own copy of the job."""

    def __init__(self, strategy: FedpeftStrategy, grid: Grid) -> None:
        self.strategy, self.grid = strategy, grid
        self.job = strategy.job
        self.model = strategy.job.model
        self.num_clients = strategy.config.num_clients
        self.seed = strategy.config.seed

    def fit(self, rnd: int, cid: int, state: State, stream: tuple[int, ...] = ()) -> ClientFit:
        return self.fit_many(rnd, [cid], state, stream)[0]

    def fit_many(
        self, rnd: int, cids: list[int], state: State, stream: tuple[int, ...] = ()
    ) -> list[ClientFit]:
        strategy = self.strategy
        strategy.clients = list(cids)
        messages = strategy._messages(rnd, 0, state, stream)
        started = time.perf_counter()
        timeout = strategy.config.flower.round_timeout_s
        replies = self.grid.send_and_receive(messages, timeout=timeout) if messages else []
        wall = time.perf_counter() - started
        answers = strategy.answers(replies)
        fits = []
        for cid in cids:
            if cid in answers:
                fit = strategy._fit(answers[cid], state)
            else:  # its node died or timed out: no update, its download counted
                strategy.failed.append(cid)
                down = strategy.down_bytes.get(cid, 0)
                fit = ClientFit(None, 0, down, 0.0, 0.0, "no answer from its node")
            fits.append(replace(fit, wall_s=wall / len(cids)))
        return fits

    def evaluate(self, state: State, split: str) -> Evaluation:
        load_trainable_state(self.model, state)
        return skeleton.evaluate_split(self.job, split)

    def client_time_s(self, cid: int, state: State) -> float:
        return self.client_times_s([cid], state)[0]

    def client_times_s(self, cids: list[int], state: State) -> list[float]:
        """The cost model's bounds for clients ``cids``; in a deployment each node computes
        its own on its own rows (the server holds none), all asked at once."""
        strategy = self.strategy
        if strategy.owners is None:
            return [skeleton.estimate_client_time_s(self.job, cid, state) for cid in cids]
        settings: dict[str, Any] = {
            ESTIMATE_KEY: 1,
            "num-clients": strategy.config.num_clients,
            "labels": json.dumps(self.job.label_names),
        }
        decided = strategy.method.client_settings()
        if decided:
            settings["method"] = json.dumps(decided)
        timeout = strategy.config.flower.round_timeout_s
        questions = [
            Message(
                RecordDict(
                    {
                        "arrays": from_state(state),
                        "config": ConfigRecord({**settings, "cid": cid}),
                    }
                ),
                strategy.owners[cid],
                MessageType.QUERY,
                ttl=timeout,
            )
            for cid in cids
        ]
        seconds: dict[int, float] = {}
        for reply in self.grid.send_and_receive(questions, timeout=timeout):
            if not reply.has_error() and ESTIMATE_KEY in reply.content.config_records:
                answer = reply.content[ESTIMATE_KEY]
                seconds[int(answer["cid"])] = float(answer["seconds"])
        missing = [cid for cid in cids if cid not in seconds]
        if missing:
            raise RuntimeError(f"the nodes of clients {missing} did not estimate a round's time")
        return [seconds[cid] for cid in cids]

    def report(self, kind: str, info: dict[str, Any]) -> None:
        self.strategy.on_event(kind, info)


def driver_round(strategy: FedpeftStrategy, grid: Grid) -> None:
    """One round of a method that drives its rounds itself (``RoundDriver``: AutoFedNLP's trial
    period), its clients' work carried by Flower; recorded, evaluated and checkpointed as any
    round."""
    rnd = strategy.first_round
    strategy.begin_round(rnd, grid)
    new_state, report = strategy.method.run_round(
        rnd, strategy.global_state, FlowerRunner(strategy, grid)
    )
    strategy.state.global_state = new_state
    report.extra["clients_failed"] = sorted(set(strategy.failed))
    strategy.record_wall(report)
    strategy.report = report
    strategy.finish_round(1, ArrayRecord())


RoundPlayer = Callable[[FedpeftStrategy, Grid], None]


@dataclass
class ServerStart:
    """A deployed server before its job: the config and label names, which are all it needs to
    ask the nodes about their data, and ``build``, which makes the job (model, test and
    validation rows) while they answer."""

    config: RunConfig
    label_names: list[str]
    build: Callable[[], Job]


def serve(
    grid: Grid,
    job: Job | ServerStart,
    run_dir: RunDir,
    min_nodes: int = 1,
    on_event: ProgressHook | None = None,
    node_data: bool = False,
    play_round: RoundPlayer = flower_round,
) -> dict[str, Any]:
    """Run (or resume) the job's remaining rounds over ``grid``; returns the final summary.
    With ``node_data`` each node trains on its own rows: the nodes describe their data first
    and become the run's clients (``fedpeft.engine.flower_data``; ``job`` may then be a
    ``ServerStart``, built while they answer). ``play_round`` runs one
    round (``flower_round``; ``fedpeft.engine.flower_secagg`` runs it under SecAgg+).
    Stopping a run is stopping its process: a round is recorded only once its checkpoint is
    complete."""
    on_event = on_event or (lambda _kind, _info: None)
    grid = PromptGrid(grid)  # replies collected every 0.2 s, not Flower's 3 s
    nodes = None
    if node_data:
        job, nodes = admit_nodes(grid, job, run_dir, min_nodes)
    config = job.config
    state = skeleton.start_run(job, run_dir, on_event)
    if isinstance(job.method, RoundDriver):  # its rounds, shaped as its state says
        job.method.shape_model(job.model)
        play_round = driver_round
    load_trainable_state(job.model, state.global_state)
    strategy = FedpeftStrategy(job, run_dir, state, min_nodes, on_event, nodes)
    skeleton.record_attackers(job, run_dir)
    stopped = None
    # One Flower ``start`` per round, so the run can end early as embedded: converged
    # (early_stop), out of privacy budget (dp.max_epsilon) or short of clients (faults).
    while state.done < config.rounds:
        halt, stopped = skeleton.before_round(job, state.history, state.done + 1, on_event)
        if halt:
            break
        strategy.first_round = done = state.done + 1
        try:
            play_round(strategy, grid)
        except faults.RoundFailed as err:  # the simulating fedpeft says it in one line
            log.error("%s", err)
            on_event("round_failed", {"text": str(err)})
            raise
        if state.done < done:  # nothing recorded: never loop on a round that cannot finish
            raise RuntimeError(f"round {done} ended without being recorded")
    return skeleton.finish_run(job, run_dir, state, stopped)


def describe_nodes(grid: Grid, nodes: list[int], job: Job) -> list[dict]:
    """Ask ``nodes`` to describe their data; the answers of those that can take part (name, rows,
    label counts, node id). A node that cannot is named in a warning and left out."""
    timeout = job.config.flower.round_timeout_s
    return descriptions(grid, ask_to_describe(grid, nodes, job.label_names, timeout), timeout)


def ask_to_describe(grid: Grid, nodes: list[int], labels: list[str], timeout: float) -> list[str]:
    """Send ``nodes`` the question (the label names); the messages' ids."""
    question = ConfigRecord({"labels": json.dumps(labels)})
    messages = [
        Message(RecordDict({"config": question}), node, MessageType.QUERY, ttl=timeout)
        for node in nodes
    ]
    return list(grid.push_messages(messages)) if messages else []


def descriptions(grid: Grid, asked: list[str], timeout: float) -> list[dict]:
    """The answers to ``ask_to_describe`` of the nodes that can take part."""
    prompt = grid if isinstance(grid, PromptGrid) else PromptGrid(grid)
    described = []
    for reply in prompt.receive(asked, timeout=timeout) if asked else []:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not describe its data: %s", node, reply.error.reason)
            continue
        record = reply.content["data"]
        if "error" in record:
            log.warning("node %s takes no part: %s", record["name"], record["error"])
            continue
        counts = [int(c) for c in record["label-counts"]]
        described.append(
            {
                "name": str(record["name"]),
                "rows": int(record["rows"]),
                "label_counts": counts,
                "node": node,
            }
        )
    return described


def admit_nodes(
    grid: Grid, job: Job | ServerStart, run_dir: RunDir, min_nodes: int
) -> tuple[Job, list[dict]]:
    """Ask every connected node (once ``min_nodes`` are) to describe its data; those that can
    take part become the clients, in the order of their names (client k is the k-th answer
    returned). Returns the server's job for them; writes the run's partition.json. Given a
    ``ServerStart``, the server's job is built while the nodes answer."""
    from fedpeft.engine import flower_data
    from fedpeft.runs import write_json

    nodes = connected_nodes(grid, min_nodes)
    timeout = job.config.flower.round_timeout_s
    asked = ask_to_describe(grid, nodes, job.label_names, timeout)
    if isinstance(job, ServerStart):
        job = job.build()
    described = descriptions(grid, asked, timeout)
    if not described:
        raise DataError("no SuperNode has usable data: see each node's log")
    described.sort(key=lambda d: (d["name"], d["node"]))
    for cid, d in enumerate(described):
        log.info("client %d: node %s, %d rows", cid, d["name"], d["rows"])
    job = flower_data.admit_nodes(job, described)
    write_json(run_dir.path / "partition.json", flower_data.nodes_summary(job, described))
    return job, described


# -- processes and simulation ----------------------------------------------------------------------
def stop_leftovers(processes: list[psutil.Process], grace_s: float = 10.0) -> None:
    """Wait ``grace_s`` for processes to end (TERM-ed SuperLinks, nodes and Ray's workers take
    a few seconds), then end the rest by PID."""
    _gone, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


class FlowerEngine:
    """``engine: flower``: the run on Flower's simulation runtime, the way Flower 1.41 runs
    simulations: ``flwr run`` submits the run's app to a SuperLink started with ``--simulation``.

    fedpeft starts that SuperLink on a free loopback port (its own session, so Ctrl-C reaches
    fedpeft alone) and runs ``flwr run APP fedpeft --stream`` with the federation config (one
    simulated SuperNode per client, ``flower.num_cpus``/``num_gpus`` per client); the SuperLink
    starts a ``flwr-simulation`` process that runs the ServerApp (``flower_app``: it builds the
    job from the run's YAML and writes the run folder) and the ClientApps in Ray actors. The
    ServerApp's progress events come back through the run's folder (``flower_events``). When the run ends,
    or on Ctrl-C, every process started is stopped by PID. Work files: ``RUN/flower/``.
    """

    def __init__(self, job: Job, run: RunDir, on_event: ProgressHook | None = None):
        check_supported(job.config)
        self.job = job
        self.run_dir = run
        self.config = job.config
        self.on_event = on_event or (lambda _kind, _info: None)
        self.work = run.path / "flower"

    def federation_config(self) -> str:
        """``flwr run --federation-config``: the simulated federation and Ray's resources."""
        settings = self.config.flower
        pairs = {
            "num-supernodes": self.config.num_clients,
            "client-resources-num-cpus": int(settings.num_cpus),
            "client-resources-num-gpus": float(settings.num_gpus),
            "init-args-num-cpus": os.cpu_count() or 1,
            "init-args-log-to-driver": "false",
        }
        if settings.num_gpus:
            pairs["init-args-num-gpus"] = torch.cuda.device_count()
        return " ".join(f"{key}={value}" for key, value in pairs.items())

    @staticmethod
    def ray_env() -> dict[str, str]:
        """Ray, started by the simulation process: its services on loopback only (no cluster
        address lookup), its object store at ~256 MiB (messages are small; Ray's default is
        30% of RAM). Ray applies the proportion to the memory *available* when it starts, and
        refuses a store under 75 MiB: the proportion is taken of what is available now, so a
        busy machine still gets ~256 MiB, not a store too small to start."""
        available = psutil.virtual_memory().available
        return {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": f"{min(0.3, 256 * 2**20 / available):.6f}",
        }

    def run(self) -> dict[str, Any]:
        """The whole run; Ctrl-C (SIGINT) stops every process it started within seconds, keeping
        only complete rounds, and raises KeyboardInterrupt. A progress hook that raises stops
        the run at the next round boundary (``flower_events``) and its error is raised here."""
        from fedpeft.engine.flower_deploy import FlowerError, LocalFederation, write_app
        from fedpeft.engine.flower_events import EngineEvents

        app = write_app(self.work / "app", self.config, self.run_dir.path, simulation=True)
        round_failed: list[str] = []  # faults.min_clients ended the run: its one line

        def hand_over(kind: str, info: dict[str, Any]) -> None:
            if kind == "round_failed":  # raised here, after the run
                round_failed.append(str(info["text"]))
            else:
                self.on_event(kind, info)

        def echo(line: str) -> None:  # runs in the thread reading flwr's output
            if line.startswith(LOG_PREFIX + "WARNING") and not events.stopped.is_set():
                hand_over("note", {"text": line[len(LOG_PREFIX) :].rstrip()})  # a client failed

        sim = LocalFederation(self.work, num_nodes=0, simulation=True, env=self.ray_env())
        extra = ["--federation-config", self.federation_config()]
        with EngineEvents(self.work, hand_over) as events:
            try:
                with sim:  # every process it started is stopped by PID on the way out
                    sim.run(app, None, echo, extra, stop=events.stopped)
            except (Interrupted, FlowerError) as err:
                events.finish()
                if events.failure:
                    raise events.failure[0] from None
                if round_failed:
                    raise faults.RoundFailed(round_failed[0]) from None
                log.debug("flwr run: %s", err)
                raise SimulationFailed(
                    f"the Flower simulation stopped before the run ended (its logs: {self.work})"
                ) from None
            events.finish()
        if events.failure:  # the run ended as the hook raised: the hook's error all the same
            raise events.failure[0]
        if round_failed:
            raise faults.RoundFailed(round_failed[0])
        if not self.run_dir.summary_path.is_file():
            raise SimulationFailed(
                f"the Flower simulation ended without finishing the run (its logs: {self.work})"
            )
        return json.loads(self.run_dir.summary_path.read_text())
