"""fedpeft's ClientApp, light to import: Flower starts a fresh ``flwr-clientapp`` process for
every message a SuperNode receives, so this module imports Flower and the standard library only.

In a deployment the work is done by the node's worker (``fedpeft.engine.flower_worker``): a
process that loads the model and the node's rows once and keeps them, with the clients'
persistent state, across messages. The ClientApp hands it the message's tensors and settings and
returns its answer; it starts the worker when there is none. In simulation (``FlowerEngine``)
the ClientApps live in Flower's long-lived simulation workers, so they train in process.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

CONFIG_KEY = "fedpeft-config"  # run-config key holding the run's YAML
SIMULATION_KEY = "fedpeft-simulation"  # run-config key: the run is simulated (FlowerEngine)
DATA_PATH = "data-path"  # node-config key: the node's own rows


def _record(arrays: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def use_worker() -> bool:
    """Whether a deployed node's messages go to its worker: yes unless ``FEDPEFT_NODE_WORKER=0``
    is set where the SuperNode runs (each message then imports the engine and builds the job in
    its own process, as before the worker existed: the benchmark's baseline, and a way to rule
    the worker out when something goes wrong)."""
    return os.environ.get("FEDPEFT_NODE_WORKER", "1") != "0"


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = str(context.run_config[CONFIG_KEY])
        path = context.node_config.get(DATA_PATH)
        if context.run_config.get(SIMULATION_KEY, False) or not use_worker():
            from fedpeft.engine.flower import train_on_message

            return train_on_message(msg, config, str(path) if path else None)
        from fedpeft.engine.flower_worker import NodeWorker, process_age_s

        started = process_age_s()  # interpreter, Flower's imports, the app's installation
        arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
        request = {
            "config": config,
            "settings": dict(msg.content["config"]),
            "arrays": arrays,
            "data_path": str(path) if path else None,
        }
        worker = NodeWorker(config, str(path) if path else "")
        before = time.perf_counter()
        sent, metrics = worker.call("train", request)
        metrics["start-s"] = started
        metrics["load-s"] = float(metrics["load-s"]) + worker.spawn_s
        metrics["relay-s"] = time.perf_counter() - before - float(metrics["worker-s"])
        content = RecordDict({"arrays": _record(sent), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        config = str(context.run_config[CONFIG_KEY])
        path = context.node_config.get(DATA_PATH)
        node_config = {k: str(v) for k, v in context.node_config.items()}
        labels = str(msg.content["config"]["labels"])
        if use_worker():
            from fedpeft.engine.flower_worker import NodeWorker

            request = {"node_config": node_config, "labels": labels}
            answer = NodeWorker(config, str(path) if path else "").call("describe", request)
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
