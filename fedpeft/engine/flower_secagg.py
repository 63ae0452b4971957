"""A deployed fedpeft round under secure aggregation: Flower's SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
https://eprint.iacr.org/2020/704), ``flower.secagg`` in the config, docs/privacy.md.

The round samples and sends as every Flower round does (``FedpeftStrategy.configure_train``);
Flower's ``SecAggPlusWorkflow`` then carries it in four exchanges with the sampled nodes (keys,
key shares, masked vectors, unmasking). Client k, holding n_k rows, receives the global
trainable tensors w (in a fixed name order), trains them to w_k and uploads its *update*
d_k = w_k - w (``flower_client.update_of``), weighted by n_k and masked: the server learns only

    mean = sum_k n_k d_k / sum_k n_k

and sets w + mean (``apply_mean_update``), which is FedAvg: sum_k (n_k / n) w_k = w + mean.
The method's aggregation receives that one state with weight n = sum_k n_k, so FedProx (its
term is the client's) and the server optimisers (one step from the mean) run unchanged; rules
that need one client's update are refused by the config.

Flower quantises each weighted update: values n_k d_k / max_weight are clipped to
+-``clipping_range`` and stochastically rounded to ``quantization_range`` levels, so the mean
differs from the exact one by about 2 clipping_range / quantization_range per client (4e-6 at
the defaults). Updates are small, which is why deltas travel rather than weights; ``max_weight``
is the largest row count among the run's clients, so n_k / max_weight <= 1. A client reports
how many of its update's entries exceeded the clipping range (``secagg_clipped`` in the row).

Bytes: the download is counted as in any round (the tensors' safetensors encoding); the upload
is one masked vector per client: its weight and one int64 array per tensor, as Flower encodes
them (``masked_bytes``). The protocol's key exchanges are not counted.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedpeft.client import LocalResult
from fedpeft.config import ConfigError
from fedpeft.engine import run as skeleton
from fedpeft.engine.flower import FedpeftStrategy
from fedpeft.engine.flower_arrays import unpack
from fedpeft.engine.flower_client import (
    SECAGG_CLIPPED,
    SECAGG_CLIPPING,
    SECAGG_METRICS,
    SECAGG_NAMES,
)
from fedpeft.methods.base import ClientUpdate
from fedpeft.methods.fedpetuning import FedPETuning
from fedpeft.peft.base import State

log = logging.getLogger("fedpeft.flower")


# -- the maths ------------------------------------------------------------------------------------
def apply_mean_update(global_state: State, names: list[str], mean: list[np.ndarray]) -> State:
    """The global state plus the clients' weighted mean update (``mean``, in ``names`` order),
    summed in float64 and cast back to each tensor's dtype; raises ValueError when ``mean``
    does not fit the tensors."""
    if len(mean) != len(names):
        raise ValueError(f"the mean update has {len(mean)} tensors, the model {len(names)}")
    new_state = dict(global_state)
    for name, update in zip(names, mean, strict=True):
        tensor = global_state[name]
        if tuple(update.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{name}: the mean update's shape {update.shape} is not {tuple(tensor.shape)}"
            )
        summed = tensor.detach().to(torch.float64) + torch.from_numpy(np.asarray(update))
        new_state[name] = summed.to(tensor.dtype)
    return new_state


def masked_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of one client's masked vector as Flower sends it: its quantised weight, then one
    int64 array per tensor, each in numpy's ``.npy`` encoding."""
    arrays = [np.zeros(1, np.int64), *(np.zeros(shape, np.int64) for shape in shapes)]
    return sum(len(ndarray_to_bytes(array)) for array in arrays)


# -- the round ------------------------------------------------------------------------------------
class SecAggRound(LegacyStrategy):
    """The legacy Flower strategy ``SecAggPlusWorkflow`` drives for one fedpeft round: its
    ``configure_fit`` is the round's sampling and downloads (``FedpeftStrategy``), its
    ``aggregate_fit`` records the clients that took part and applies their mean update."""

    def __init__(self, strategy: FedpeftStrategy, grid: Grid) -> None:
        self.strategy = strategy
        self.grid = grid
        self.names: list[str] = []
        self.aggregated = False

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        messages = self.strategy.configure_train(1, ArrayRecord(), ConfigRecord(), self.grid)
        clipping = float(self.strategy.config.flower.secagg.clipping_range)
        run_id = self.grid.run.run_id
        pairs = []
        for message in messages:
            arrays = unpack(message.content["arrays"])
            self.names = list(arrays.keys())  # every client of a plain method gets the same
            settings = dict(message.content["config"])
            settings.update({SECAGG_NAMES: json.dumps(self.names), SECAGG_CLIPPING: clipping})
            tensors = ndarrays_to_parameters([arrays[name] for name in self.names])
            node = message.metadata.dst_node_id
            pairs.append((GridClientProxy(node, self.grid, run_id), FitIns(tensors, settings)))
        return pairs

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """``results``: the clients whose masked vectors are in the sum, each FitRes holding
        the unmasked weighted mean update and the client's own figures."""
        strategy = self.strategy
        self.aggregated = True
        global_state = strategy.global_state
        up = masked_bytes([tuple(global_state[name].shape) for name in self.names])
        reported = [json.loads(str(res.metrics[SECAGG_METRICS])) for _proxy, res in results]
        clipped = sum(int(metrics.pop(SECAGG_CLIPPED, 0)) for metrics in reported)
        # the order of the fits does not matter: ``settle`` takes them in sampled order
        fits = {int(m["cid"]): strategy.client_fit(m, {}, up, None) for m in reported}
        updates = strategy.settle(0, fits)  # each state empty: SecAgg+ hides it
        strategy.record_clients(0, updates)
        report = strategy.report
        report.extra["secagg_clipped"] = clipped
        if clipped:
            log.warning(
                "round %d: %d update entries were clipped to +-%g (flower.secagg.clipping_range)",
                report.rnd,
                clipped,
                strategy.config.flower.secagg.clipping_range,
            )
        if not updates or not results:
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)
        try:
            mean_state = apply_mean_update(global_state, self.names, mean)
        except ValueError as err:  # a node sent a malformed vector: no one's is usable
            log.warning("round %d: the masked sum is unusable (%s); no update", report.rnd, err)
            return None, {}
        combined = ClientUpdate(-1, mean_state, sum(u.num_samples for u in updates), total(updates))
        job, history = strategy.job, strategy.state.history
        strategy.state.global_state = skeleton.aggregate_round(
            job, report.rnd, global_state, [combined], report, history
        )
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager) -> list:
        return []  # the server evaluates the global model itself (finish_round)

    def aggregate_evaluate(self, server_round, results, failures) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def total(updates: list[ClientUpdate]) -> LocalResult:
    """The clients' training figures added up (their mean loss weighted by samples seen)."""
    return LocalResult(
        sum(u.result.num_samples for u in updates),
        sum(u.result.steps for u in updates),
        skeleton.weighted_train_loss(updates),
        sum(u.result.samples_seen for u in updates),
        sum(u.result.tokens_seen for u in updates),
    )


def max_weight(strategy: FedpeftStrategy) -> float:
    """SecAgg+'s bound on a client's weight: the largest row count among the run's clients."""
    return float(max([client.num_rows for client in strategy.job.clients] + [1]))


def check_method(strategy: FedpeftStrategy) -> None:
    """Refuse, in one line, a method whose aggregation is not the algorithm's over plain
    uploads (``FedPETuning``: every plain PEFT unit, and C2A): its rounds need more than the
    weighted mean update."""
    if not isinstance(strategy.method, FedPETuning):
        raise ConfigError(
            f"flower.secagg.enabled: method {strategy.config.method} does not aggregate a "
            "weighted mean of its uploads; SecAgg+ cannot carry it"
        )


def secagg_round(strategy: FedpeftStrategy, grid: Grid) -> None:
    """One fedpeft round under SecAgg+ (``serve``'s ``play_round``): the workflow's four
    exchanges, then the round's evaluation, row and checkpoint as in every round. A round the
    protocol halts (fewer clients than the reconstruction threshold) keeps the global state
    and lists its clients in ``clients_failed``."""
    check_method(strategy)
    settings = strategy.config.flower.secagg
    strategy.summary()
    legacy = SecAggRound(strategy, grid)
    context = LegacyContext(Context(grid.run.run_id, 0, {}, RecordDict(), {}), strategy=legacy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: strategy.first_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        settings.num_shares,
        settings.reconstruction_threshold,
        max_weight=max_weight(strategy),
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        timeout=strategy.config.flower.round_timeout_s,
    )
    workflow(grid, context)
    if not legacy.aggregated:  # halted: too few clients answered to unmask the sum
        log.warning(
            "round %d: SecAgg+ halted (fewer clients than it needs); no update",
            strategy.first_round,
        )
        strategy.aggregate_train(1, [])
    strategy.finish_round(1, ArrayRecord())
