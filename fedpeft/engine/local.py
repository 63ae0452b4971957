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

import logging
import time
from typing import Any

from fedpeft import cost, payload, quantize
from fedpeft.client import Evaluation
from fedpeft.engine.run import (
    ProgressHook,
    RunState,
    aggregate_round,
    attempt_clients,
    attempt_time_s,
    before_round,
    check_upload,
    client_seed,
    client_upload,
    end_attempts,
    estimate_client_time_s,
    evaluate_split,
    expected_upload,
    finish_round,
    finish_run,
    max_attempts,
    record_attackers,
    round_failed,
    sample_clients,
    settle_client,
    short_of_quorum,
    start_faults,
    start_run,
)
from fedpeft.job import Job
from fedpeft.methods.base import ClientFit, ClientRunner, ClientUpdate, RoundDriver, RoundReport
from fedpeft.peft.base import State, load_trainable_state
from fedpeft.runs import RunDir

log = logging.getLogger("fedpeft.engine")

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
        self.dp_noised: list[tuple[int, bool]] = []  # local DP: (client, clipped) this round

    # -- one client -------------------------------------------------------------------------
    def _client_round(
        self,
        rnd: int,
        cid: int,
        global_state: State,
        stream: tuple[int, ...] = (),
        crashed: bool = False,
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
        if crashed:  # a simulated crash after the download: nothing trained, nothing sent
            _device, network = job.profiles[cid]
            seconds = cost.comm_time_s(0, len(down_blob), network)
            return ClientFit(None, 0, len(down_blob), seconds, time.perf_counter() - started)
        record_attackers(job, self.run_dir)
        work, clipped = client_upload(job, rnd, cid, received, self.state.store.of(cid), stream)
        if clipped is not None:  # local DP: the upload left the client randomised
            self.dp_noised.append((cid, clipped))
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
        job = self.job
        if isinstance(self.method, RoundDriver):  # the method drives its own round (AutoFedNLP)
            return self.method.run_round(rnd, global_state, _Runner(self))
        report = RoundReport(rnd, [], train_loss=0.0)
        self.dp_noised = []
        start_faults(job, report)
        for attempt in range(max_attempts(job)):
            clients = attempt_clients(job, rnd, attempt)
            updates = self._attempt(rnd, attempt, clients, global_state, report)
            if not short_of_quorum(job, rnd, updates):
                break
        else:
            raise round_failed(job, rnd, self.run_dir)
        history = self.state.history
        end_attempts(job, report, clients, attempt + 1, updates, history, self.dp_noised)
        return aggregate_round(job, rnd, global_state, updates, report, history), report

    def _attempt(
        self,
        rnd: int,
        attempt: int,
        clients: list[int],
        global_state: State,
        report: RoundReport,
    ) -> list[ClientUpdate]:
        """One sample of clients trained and checked: their usable updates. Bytes and simulated
        time go into ``report``; a retry's time adds to the round's."""
        plan = self.job.faults
        updates, times = [], []
        for i, cid in enumerate(clients):
            crashed = plan is not None and plan.crashed(rnd, cid, attempt)
            fit = self._client_round(rnd, cid, global_state, crashed=crashed)
            report.train_wall_s += fit.wall_s
            update, seconds = settle_client(
                self.job, report, attempt, cid, fit, crashed, self.on_event
            )
            times.append(seconds)
            if update is None:
                continue
            updates.append(update)
            self.on_event(
                "client",
                {"round": rnd, "done": i + 1, "of": len(clients), "loss": update.result.mean_loss},
            )
        report.sim_time_s += attempt_time_s(self.job, times)
        return updates

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        job, run_dir = self.job, self.run_dir
        self.state = state = start_run(job, run_dir, self.on_event)
        self._load(state.global_state)
        stopped = None
        for rnd in range(state.done + 1, self.config.rounds + 1):
            halt, stopped = before_round(job, state.history, rnd, self.on_event)
            if halt:  # converged (finish_run records it, also when resumed) or out of budget
                break
            started = time.perf_counter()
            self.on_event("round_start", {"round": rnd})
            state.global_state, report = self._round(rnd, state.global_state)
            self._load(state.global_state)
            finish_round(job, run_dir, state, report, started, self.on_event)
        return finish_run(job, run_dir, state, stopped)

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

    def client_time_s(self, cid: int, state: State) -> float:
        return estimate_client_time_s(self.engine.job, cid, state)

    def report(self, kind: str, info: dict[str, Any]) -> None:
        self.engine.on_event(kind, info)
