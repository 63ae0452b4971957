"""The Flower app that ``flwr run`` submits: ``server_app`` and ``client_app`` for any fedpeft run,
deployed (SuperNodes that own their data) or simulated (``FlowerEngine``: the run config's
``fedpeft-simulation`` is true, the ServerApp builds the whole job and reports its progress
through the run folder, ``fedpeft.engine.flower_events``).

``fedpeft flower prepare`` writes an app folder whose pyproject.toml names these two objects and
carries the run in its run config: the resolved YAML (``fedpeft-config``) and the run folder on
the SuperLink's host (``run-dir``). The ServerApp (``flwr-serverapp``, started by the SuperLink)
writes that run folder, resuming it if it already holds finished rounds. It holds only test and
validation rows (the config's ``dataset``); each SuperNode owns its training rows
(``--node-config "data-path=..."``, ``fedpeft.engine.flower_data``) and is one client. A
SuperNode's ClientApps (``fedpeft.engine.flower_client``, light to import) run in fedpeft's
long-lived executor beside it (``fedpeft.engine.flower_executor``), or in a ``flwr-clientapp``
process per message (Flower's default); either hands the message to the node's worker: a
process that builds the node's job from the YAML and its own rows once and trains
(``fedpeft.engine.flower_worker``).
With ``flower.secagg.enabled`` each round runs under SecAgg+ (``fedpeft.engine.flower_secagg``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import build_config
from fedpeft.engine.flower import (
    CONFIG_KEY,
    RUN_DIR_KEY,
    SIMULATION_KEY,
    ServerStart,
    check_supported,
    flower_round,
    serve,
    show_log,
)
from fedpeft.engine.flower_data import server_job, server_label_names
from fedpeft.engine.flower_events import ServerEvents, Stopped
from fedpeft.job import build_job
from fedpeft.runs import RunDir

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    show_log()
    config_yaml = str(context.run_config[CONFIG_KEY])
    config = build_config(yaml.safe_load(config_yaml))
    simulation = bool(context.run_config.get(SIMULATION_KEY, False))
    check_supported(config, simulation=simulation)
    path = Path(str(context.run_config[RUN_DIR_KEY]))
    if (path / "config.yaml").is_file():
        run_dir = RunDir.open(path)
    else:
        run_dir = RunDir.create(path, config_yaml)
    if simulation:  # one simulated SuperNode per client; the server's job holds every client
        events = ServerEvents(path / "flower")  # to the FlowerEngine that started the run
        try:
            serve(grid, build_job(config), run_dir, config.num_clients, on_event=events)
        except Stopped as stopped:  # the complete rounds are recorded; nothing else is
            print(f"fedpeft: {stopped}", flush=True)
    else:  # the nodes are asked about their data first; the server's job builds meanwhile
        start = ServerStart(config, server_label_names(config), lambda: server_job(config))
        play_round = flower_round
        if config.flower.secagg.enabled:  # the server sees only the clients' masked sum
            from fedpeft.engine.flower_secagg import secagg_round as play_round
        min_nodes = config.flower.min_nodes
        serve(grid, start, run_dir, min_nodes, node_data=True, play_round=play_round)


from fedpeft.engine.flower_client import client_app  # noqa: E402, F401 - the app's ClientApp
