"""fedpeft's ClientApp, light to import: Flower starts a fresh ``flwr-clientapp`` process for
every message a SuperNode receives, so this module imports Flower and the standard library only.

In a deployment the work is done by the node's worker (``fedpeft.engine.flower_worker``): a
process that loads the model and the node's rows once and keeps them, with the clients'
persistent state, across messages. The ClientApp hands it the message's tensors and settings and
returns its answer; it starts the worker when there is none. In simulation (``FlowerEngine``)
the ClientApps live in Flower's long-lived simulation workers, so they train in process.

Under secure aggregation (``flower.secagg``, deployment only) Flower's ``secaggplus_mod`` answers
a SecAgg+ round's key exchanges and masks what the train handler returns: the client's update
(trained minus received) as a legacy FitRes (``fedpeft.engine.flower_secagg`` is the server).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedpeft.engine import flower_executor
from fedpeft.engine.flower_arrays import pack, packed, unpack

CONFIG_KEY = "fedpeft-config"  # run-config key holding the run's YAML
SIMULATION_KEY = "fedpeft-simulation"  # run-config key: the run is simulated (FlowerEngine)
DATA_PATH = "data-path"  # node-config key: the node's own rows
STORE_RECORD = "store"  # simulation: the client's persistent tensors, to it and back
ESTIMATE_KEY = "estimate"  # a query's config key: estimate one round's simulated seconds
# A SecAgg+ round's FitIns config and FitRes metrics (``fedpeft.engine.flower_secagg``)
SECAGG_NAMES = "secagg-names"  # the tensors' names, in the order of the FitIns' arrays
SECAGG_CLIPPING = "secagg-clipping-range"  # SecAgg+ clips update entries to +-this
SECAGG_METRICS = "fedpeft"  # the client's figures as JSON (a legacy FitRes holds scalars only)
SECAGG_CLIPPED = "secagg-clipped"  # how many of the update's entries SecAgg+ clips


def training_inputs(msg: Message) -> tuple[dict, dict | None, dict[str, Any]]:
    """A training message's tensors, the client's store when it travels with them (simulation),
    and its settings."""
    carried = None
    if STORE_RECORD in msg.content.array_records:
        carried = unpack(msg.content[STORE_RECORD])
    return unpack(msg.content["arrays"]), carried, dict(msg.content["config"])


def training_reply(msg: Message, sent: dict, metrics: dict, kept: dict | None) -> Message:
    """The answer to a training message: the upload, the figures and the store when it
    travels, the tensors in the form they came (``flower_arrays``)."""
    one = packed(msg.content["arrays"])
    content = RecordDict({"arrays": pack(sent, one), "metrics": MetricRecord(metrics)})
    if kept is not None:
        content[STORE_RECORD] = pack(kept, one)
    return Message(content, reply_to=msg)


def use_worker() -> bool:
    """Whether a deployed node's messages go to its worker: yes unless ``FEDPEFT_NODE_WORKER=0``
    is set where the SuperNode runs (each message then imports the engine and builds the job in
    its own process, as before the worker existed: the benchmark's baseline, and a way to rule
    the worker out when something goes wrong)."""
    return os.environ.get("FEDPEFT_NODE_WORKER", "1") != "0"


def node_train(
    context: Context,
    settings: dict[str, Any],
    arrays: dict[str, np.ndarray],
    carried: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray] | None]:
    """``fedpeft.engine.flower.train_arrays`` for this node: on its worker (deployment), else
    in this process (simulation, ``FEDPEFT_NODE_WORKER=0``). Returns the upload, the figures
    and the client's store when it was ``carried`` in the message (simulation)."""
    config = str(context.run_config[CONFIG_KEY])
    path = context.node_config.get(DATA_PATH)
    data_path = str(path) if path else None
    if context.run_config.get(SIMULATION_KEY, False) or not use_worker():
        from fedpeft.engine.flower import train_arrays

        return train_arrays(config, settings, arrays, data_path, carried)
    from fedpeft.engine.flower_worker import NodeWorker, process_age_s

    # seconds before this call: in fedpeft's executor, from taking the task (the message's pull,
    # the app's installation the first time); in Flower's own ClientApp process, from its start
    # (interpreter, Flower's imports, the app's installation)
    started = flower_executor.task_age_s()
    if started is None:
        started = process_age_s()
    request = {"config": config, "settings": settings, "arrays": arrays, "data_path": data_path}
    worker = NodeWorker(flower_executor.node_pid)
    before = time.perf_counter()
    sent, metrics = worker.call("train", request)
    metrics["start-s"] = started
    metrics["load-s"] = float(metrics["load-s"]) + worker.spawn_s
    metrics["relay-s"] = time.perf_counter() - before - float(metrics["worker-s"])
    return sent, metrics, None


def update_of(
    trained: dict[str, np.ndarray], received: dict[str, np.ndarray], names: list[str]
) -> list[np.ndarray]:
    """A client's upload under SecAgg+: trained minus received, tensor by tensor in ``names``
    order, in float64 (the difference of two float32 weights is exact there)."""
    return [
        np.asarray(trained[name], np.float64) - np.asarray(received[name], np.float64)
        for name in names
    ]


def secagg_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's training message (legacy FitIns: the global tensors in the order of
    its ``SECAGG_NAMES``): train, and answer with a FitRes whose parameters are the update and
    whose weight is the client's row count; ``secaggplus_mod`` masks both."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    settings = dict(fitins.config)
    names = json.loads(str(settings.pop(SECAGG_NAMES)))
    clipping = float(settings.pop(SECAGG_CLIPPING))
    received = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    trained, metrics, _kept = node_train(context, settings, received)
    update = update_of(trained, received, names)
    metrics[SECAGG_CLIPPED] = sum(int(np.count_nonzero(np.abs(u) > clipping)) for u in update)
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(update),
        int(metrics["num-samples"]),
        {SECAGG_METRICS: json.dumps(metrics)},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; every other message
    passes untouched (Flower's mod takes any training message for one of its stages)."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def estimate(msg: Message, config: str, data_path: str) -> Message:
    """The node's bound on one round's simulated seconds from the tensors in ``msg``
    (``fedpeft.engine.flower.estimate_arrays``), on its worker unless it is turned off."""
    settings = dict(msg.content["config"])
    arrays = unpack(msg.content["arrays"])
    request = {"config": config, "settings": settings, "arrays": arrays, "data_path": data_path}
    if use_worker():
        from fedpeft.engine.flower_worker import NodeWorker

        answer = NodeWorker(flower_executor.node_pid).call("estimate", request)
    else:
        from fedpeft.engine.flower import estimate_arrays

        answer = estimate_arrays(config, settings, arrays, data_path)
    return Message(RecordDict({ESTIMATE_KEY: ConfigRecord(answer)}), reply_to=msg)


def make_client_app() -> ClientApp:
    app = ClientApp(mods=[secure_aggregation])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if RECORD_KEY_CONFIGS in msg.content.config_records:  # SecAgg+'s masked-vector stage
            return secagg_train(msg, context)
        arrays, carried, settings = training_inputs(msg)
        return training_reply(msg, *node_train(context, settings, arrays, carried))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        config = str(context.run_config[CONFIG_KEY])
        path = context.node_config.get(DATA_PATH)
        if ESTIMATE_KEY in msg.content["config"]:  # a round-driving method plans its budget
            return estimate(msg, config, str(path or ""))
        node_config = {k: str(v) for k, v in context.node_config.items()}
        labels = str(msg.content["config"]["labels"])
        if use_worker():
            from fedpeft.engine.flower_worker import NodeWorker

            # with the run's config: the worker builds the model once it has answered
            request = {"node_config": node_config, "labels": labels, "config": config}
            answer = NodeWorker(flower_executor.node_pid).call("describe", request)
        else:
            import json

            from fedpeft.engine.flower import describe_node

            answer = describe_node(node_config, json.loads(labels))
        if "error" in answer:
            note = f"node {answer['name']}: {answer['error']}; it takes no part in the run"
            print(note, file=sys.stderr, flush=True)
        return Message(RecordDict({"data": ConfigRecord(answer)}), reply_to=msg)

    return app


client_app = make_client_app()
