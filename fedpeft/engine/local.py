"""The embedded engine: one process, one resident frozen backbone, many simulated clients.

Each round the engine samples clients, and for each one swaps its received trainable state into
the shared model, trains locally, and takes the trained state back out. Memory therefore grows by
trainable states only, never by a model per client. Every message is really serialised (the bytes
counted are the bytes a network would carry), every upload is checked against what the method
asked for (a bad one drops that client, not the run), and simulated device time comes from the
cost model. A checkpoint after every round makes runs resumable with identical results; the run
skeleton (``engine/run.py``) is shared with the Flower engine.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fedpeft import attacks, cost, payload, quantize
from fedpeft.client import Evaluation
from fedpeft.engine.run import (
    ProgressHook,
    RunState,
    check_upload,
    client_seed,
    evaluate_split,
    expected_upload,
    finish_round,
    finish_run,
    reject,
    sample_clients,
    start_run,
    train_client,
    weighted_train_loss,
)
from fedpeft.job import Job
from fedpeft.methods.base import ClientFit, ClientRunner, ClientUpdate, RoundDriver, RoundReport
from fedpeft.peft.base import State, load_trainable_state
from fedpeft.runs import RunDir, write_json

__all__ = ["EmbeddedEngine", "client_seed", "encode_upload", "sample_clients"]


def encode_upload(state: State) -> bytes:
    """The bytes a client sends (a seam where tests put corrupted uploads)."""
    return payload.encode(state)


class EmbeddedEngine:
    def __init__(self, job: Job, run: RunDir, on_event: ProgressHook | None = None):
        self.job = job
        self.run_dir = run
        self.config = job.config
        self.model = job.model
        self.method = job.method
        self.on_event = on_event or (lambda _kind, _info: None)
        self.state: RunState | None = None

    # -- one client -------------------------------------------------------------------------
    def _client_round(
        self, rnd: int, cid: int, global_state: State, stream: tuple[int, ...] = ()
    ) -> ClientFit:
        job, method, config = self.job, self.method, self.config
        started = time.perf_counter()
        method.prepare_client(self.model, rnd, cid)
        down = method.download(rnd, cid, global_state)
        int8 = config.quantize == "int8"
        if int8 and config.quantize_download:
            down_blob = payload.encode(quantize.pack_int8(down))
            received = quantize.unpack_int8(
                payload.decode(down_blob), {k: t.dtype for k, t in down.items()}
            )
        else:
            down_blob = payload.encode(down)
            received = payload.decode(down_blob)
        plan = job.attack  # a simulated attacker poisons its labels or its upload
        attacking = plan is not None and cid in plan.attackers
        if plan is not None and not (self.run_dir.path / "attackers.json").is_file():
            write_json(self.run_dir.path / "attackers.json", plan.record())
        trainer = job
        if attacking and plan.kind == "label_flip":
            trainer = replace(job, train=attacks.flip_labels(job.train, len(job.label_names)))
        work = train_client(trainer, rnd, cid, received, self.state.store.of(cid), stream)
        if attacking and plan.kind in attacks.UPDATE_ATTACKS:
            work.sent = attacks.poison_update(plan, work.sent, received, rnd, cid, *stream)
        expected = expected_upload(job, rnd, cid, global_state)
        if int8:  # the update trained - received travels as int8 codes + scales;
            # the server adds it to its own exact copy of what it sent, so download
            # quantisation noise never accumulates in the global model
            up_blob = encode_upload(quantize.encode_update(work.sent, received))
            state, reason = check_upload(up_blob, None)
            if state is not None:
                exact = {k: down[k] if k in down else t for k, t in received.items()}
                try:
                    rebuilt = quantize.decode_update(state, exact, expected)
                except (KeyError, ValueError, RuntimeError) as err:
                    state, reason = None, f"int8 update does not fit: {err}"
                else:
                    state, reason = check_upload(payload.encode(rebuilt), expected)
        else:
            up_blob = encode_upload(work.sent)
            state, reason = check_upload(up_blob, expected)
        _device, network = job.profiles[cid]
        seconds = work.compute_s + cost.comm_time_s(len(up_blob), len(down_blob), network)
        wall = time.perf_counter() - started
        update = None
        if state is not None:
            update = ClientUpdate(cid, state, work.result.num_samples, work.result, work.metrics)
        return ClientFit(update, len(up_blob), len(down_blob), seconds, wall, reason)

    # -- one round ------------------------------------------------------------------------------
    def _round(self, rnd: int, global_state: State) -> tuple[State, RoundReport]:
        config = self.config
        if isinstance(self.method, RoundDriver):  # the method drives its own round (AutoFedNLP)
            return self.method.run_round(rnd, global_state, _Runner(self))
        clients = sample_clients(config.seed, rnd, config.num_clients, config.clients_per_round)
        report = RoundReport(rnd, clients, train_loss=0.0)
        if self.job.attack is not None:
            attackers = set(self.job.attack.attackers)
            report.extra["attackers_in_round"] = [c for c in clients if c in attackers]
        updates = []
        for i, cid in enumerate(clients):
            fit = self._client_round(rnd, cid, global_state)
            report.bytes_up += fit.bytes_up
            report.bytes_down += fit.bytes_down
            report.client_sim_s.append(fit.sim_time_s)
            report.train_wall_s += fit.wall_s
            if fit.update is None:
                reject(report, cid, fit.rejected or "rejected", self.on_event)
                continue
            updates.append(fit.update)
            self.on_event(
                "client",
                {
                    "round": rnd,
                    "done": i + 1,
                    "of": len(clients),
                    "loss": fit.update.result.mean_loss,
                },
            )
        report.train_loss = weighted_train_loss(updates)
        report.sim_time_s = cost.round_time_s(report.client_sim_s)
        if not updates:  # every upload was rejected: the round goes on, the model stays
            return global_state, report
        return self.method.aggregate(rnd, global_state, updates), report

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        job, run_dir = self.job, self.run_dir
        self.state = state = start_run(job, run_dir, self.on_event)
        self._load(state.global_state)
        for rnd in range(state.done + 1, self.config.rounds + 1):
            started = time.perf_counter()
            self.on_event("round_start", {"round": rnd})
            state.global_state, report = self._round(rnd, state.global_state)
            self._load(state.global_state)
            finish_round(job, run_dir, state, report, started, self.on_event)
        return finish_run(job, run_dir, state)

    def _load(self, state: State) -> None:
        """Load a global state into the resident model, reshaped first if the method reshapes it."""
        if isinstance(self.method, RoundDriver):
            self.method.shape_model(self.model)
        load_trainable_state(self.model, state)


class _Runner(ClientRunner):
    """The ``ClientRunner`` a round-driving method gets: fits and scores on this engine."""

    def __init__(self, engine: EmbeddedEngine):
        self.engine = engine
        self.model = engine.model
        self.num_clients = engine.config.num_clients
        self.seed = engine.config.seed

    def fit(self, rnd: int, cid: int, state: State, stream: tuple[int, ...] = ()) -> ClientFit:
        return self.engine._client_round(rnd, cid, state, stream)

    def evaluate(self, state: State, split: str) -> Evaluation:
        load_trainable_state(self.model, state)
        return evaluate_split(self.engine.job, split)
