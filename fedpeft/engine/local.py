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
from collections import Counter
from dataclasses import replace
from typing import Any

from fedpeft import attacks, cost, faults, payload, quantize
from fedpeft.algorithms import dp
from fedpeft.client import Evaluation
from fedpeft.engine.run import (
    ProgressHook,
    RunState,
    check_upload,
    client_seed,
    converged,
    estimate_client_time_s,
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
        self.dp_clip_norm = job.dp.clip_norm if job.dp is not None else None
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
        plan = job.attack  # a simulated attacker poisons its labels or its upload
        attacking = plan is not None and cid in plan.attackers
        if plan is not None and not (self.run_dir.path / "attackers.json").is_file():
            write_json(self.run_dir.path / "attackers.json", plan.record())
        trainer = job
        if attacking and plan.kind == "label_flip":
            trainer = replace(job, train=attacks.flip_labels(job.train, len(job.label_names)))
        work = train_client(trainer, rnd, cid, received, self.state.store.of(cid), stream)
        if job.dp is not None and job.dp.local:  # the client randomises its own upload
            work.sent, clipped = job.dp.randomize(received, work.sent, rnd, cid)
            self.dp_noised.append((cid, clipped))
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
        config, plan = self.config, self.job.faults
        if isinstance(self.method, RoundDriver):  # the method drives its own round (AutoFedNLP)
            return self.method.run_round(rnd, global_state, _Runner(self))
        report = RoundReport(rnd, [], train_loss=0.0)
        self.dp_noised = []
        if plan is not None:
            report.extra.update(clients_dropped=[], stragglers_in_round=[])
        attempts = 1 + (plan.retries if plan is not None and plan.min_clients else 0)
        for attempt in range(attempts):
            if attempt == 0:
                clients = sample_clients(
                    config.seed, rnd, config.num_clients, config.clients_per_round
                )
            else:
                clients = plan.sample(rnd, attempt, config.num_clients, config.clients_per_round)
            updates = self._attempt(rnd, attempt, clients, global_state, report)
            if plan is None or len(updates) >= plan.min_clients:
                break
            log.warning(
                "round %d: %d usable update(s), faults.min_clients is %d",
                rnd,
                len(updates),
                plan.min_clients,
            )
        else:
            raise faults.RoundFailed(
                f"round {rnd}: fewer than faults.min_clients ({plan.min_clients}) usable updates "
                f"after {attempts} attempt(s); the run stops, its {rnd - 1} finished round(s) "
                f"kept in {self.run_dir.path}"
            )
        report.clients = clients
        if plan is not None:
            report.extra["attempts"] = attempt + 1
        if self.job.attack is not None:
            attackers = set(self.job.attack.attackers)
            report.extra["attackers_in_round"] = [c for c in clients if c in attackers]
        report.train_loss = weighted_train_loss(updates)
        if self.job.dp is not None and self.job.dp.local:
            report.extra.update(self._local_dp_row())
        elif self.job.dp is not None:  # counted whether or not the round releases anything
            report.extra.update(epsilon=self.job.dp.epsilon_after(rnd), dp_delta=self.job.dp.delta)
        if not updates:  # every upload was rejected: the round goes on, the model stays
            return global_state, report
        if self.job.dp is not None and not self.job.dp.local:
            return self._dp_aggregate(rnd, global_state, updates, report), report
        return self.method.aggregate(rnd, global_state, updates), report

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
            report.bytes_up += fit.bytes_up
            report.bytes_down += fit.bytes_down
            report.train_wall_s += fit.wall_s
            seconds = fit.sim_time_s
            if plan is not None:
                seconds = plan.client_time_s(cid, seconds)
                if cid in plan.stragglers:
                    report.extra["stragglers_in_round"].append(cid)
            times.append(seconds)
            report.client_sim_s.append(seconds)
            dropped = "crashed" if crashed else None
            if plan is not None and not crashed and plan.late(seconds):
                dropped = f"deadline ({seconds:.1f} s > {plan.deadline_s:g} s)"
            if dropped is not None:
                log.warning("round %d: client %d dropped: %s", rnd, cid, dropped)
                entry = {"cid": cid, "reason": dropped.split(" ")[0], "attempt": attempt}
                if dropped != "crashed":
                    entry["detail"] = dropped
                report.extra["clients_dropped"].append(entry)
                self.on_event("dropped", {"round": rnd, "cid": cid, "reason": dropped})
                continue
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
        seconds = cost.round_time_s(times)
        report.sim_time_s += plan.round_time_s(seconds) if plan is not None else seconds
        return updates

    def _dp_aggregate(
        self, rnd: int, global_state: State, updates: list[ClientUpdate], report: RoundReport
    ) -> State:
        """DP-FedAvg (``fedpeft/algorithms/dp.py``) in place of the method's aggregation."""
        plan = self.job.dp
        new_state, done = dp.dp_fedavg(
            global_state,
            [u.state for u in updates],
            clip_norm=self.dp_clip_norm,
            noise_multiplier=plan.noise_multiplier,
            generator=dp.round_generator(plan.seed, rnd),
            adaptive=plan.adaptive,
            target_quantile=plan.target_quantile,
            clip_lr=plan.clip_lr,
            count_std=plan.count_noise,
        )
        self.dp_clip_norm = done.next_clip_norm
        report.extra.update(
            dp_clip_norm=done.clip_norm,
            dp_noise_std=done.noise_std,
            dp_clipped_fraction=done.clipped_fraction,
            dp_clip_norm_next=done.next_clip_norm,
        )
        return new_state

    def _local_uploads(self) -> Counter:
        """Local DP: how many randomised uploads each client has sent in the finished rounds."""
        rows = self.state.history
        return Counter(cid for row in rows for cid in row.get("dp_noised_clients", []))

    def _local_dp_row(self) -> dict:
        """Local DP's fields of a metrics row: who sent a randomised upload this round (crashed
        clients sent none; late and rejected ones did) and the worst client's epsilon."""
        plan = self.job.dp
        uploads = self._local_uploads() + Counter(cid for cid, _ in self.dp_noised)
        clipped = [c for _, c in self.dp_noised]
        return {
            "epsilon": plan.local_epsilon_after(max(uploads.values(), default=0)),
            "dp_delta": plan.delta,
            "dp_mode": "local",
            "dp_noised_clients": [cid for cid, _ in self.dp_noised],
            "dp_noise_std": plan.noise_multiplier * plan.clip_norm,
            "dp_clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
        }

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        job, run_dir = self.job, self.run_dir
        self.state = state = start_run(job, run_dir, self.on_event)
        self._load(state.global_state)
        stopped = None
        if job.dp is not None:  # the adaptive clip norm lives in the metrics rows
            last = state.history[-1] if state.history else {}
            self.dp_clip_norm = last.get("dp_clip_norm_next", job.dp.clip_norm)
        stop = self.config.early_stop
        for rnd in range(state.done + 1, self.config.rounds + 1):
            if stop is not None and converged(state.history, stop.patience, stop.min_delta):
                break  # finish_run records it (also when a converged run is resumed)
            stopped = self._privacy_spent(rnd)
            if stopped is not None:
                break
            started = time.perf_counter()
            self.on_event("round_start", {"round": rnd})
            state.global_state, report = self._round(rnd, state.global_state)
            self._load(state.global_state)
            finish_round(job, run_dir, state, report, started, self.on_event)
        return finish_run(job, run_dir, state, stopped)

    def _privacy_spent(self, rnd: int) -> str | None:
        """Why round ``rnd`` must not run (it would exceed dp.max_epsilon), else None."""
        plan = self.job.dp
        if plan is None or plan.max_epsilon is None:
            return None
        if plan.local:  # any client may be sampled: the one with most uploads could pass it
            after = plan.local_epsilon_after(max(self._local_uploads().values(), default=0) + 1)
            what = "a client's epsilon could reach"
        else:
            after, what = plan.epsilon_after(rnd), "epsilon would reach"
        if after <= plan.max_epsilon:
            return None
        text = (
            f"stopped before round {rnd}: {what} {after:.3g} > dp.max_epsilon "
            f"{plan.max_epsilon:g} (delta {plan.delta:g})"
        )
        log.warning(text)
        self.on_event("note", {"text": text})
        return text

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
