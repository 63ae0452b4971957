"""The embedded engine: one process, one resident frozen backbone, many simulated clients.

Each round the engine samples clients, and for each one swaps its received trainable state into
the shared model, trains locally, and takes the trained state back out. Memory therefore grows by
trainable states only, never by a model per client. Every message is really serialised (the bytes
counted are the bytes a network would carry), and simulated device time comes from the cost model.
A checkpoint after every round makes runs resumable with identical results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpeft import cost, payload
from fedpeft.client import evaluate, train_local
from fedpeft.job import Job
from fedpeft.methods import ClientUpdate
from fedpeft.peft.base import (
    State,
    count_trainable,
    count_trainable_per_token,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_state,
)
from fedpeft.runs import Checkpoint, RunDir, rng_state, set_rng_state, write_safetensors
from fedpeft.summary import summarise


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of round ``rnd``: a seeded draw that does not depend on earlier rounds."""
    rng = np.random.default_rng([seed, rnd])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def client_seed(seed: int, rnd: int, cid: int) -> int:
    return int(np.random.SeedSequence([seed, rnd, cid]).generate_state(1)[0])


@dataclass
class RoundReport:
    """What one round did; the engine turns it into a metrics row."""

    rnd: int
    clients: list[int]
    train_loss: float
    bytes_up: int = 0
    bytes_down: int = 0
    sim_time_s: float = 0.0
    client_sim_s: list[float] = field(default_factory=list)


ProgressHook = Callable[[str, dict[str, Any]], None]


class EmbeddedEngine:
    def __init__(self, job: Job, run: RunDir, on_event: ProgressHook | None = None):
        self.job = job
        self.run_dir = run
        self.config = job.config
        self.model = job.model
        self.method = job.method
        self.on_event = on_event or (lambda _kind, _info: None)

    # -- one client -------------------------------------------------------------------------
    def _client_round(
        self, rnd: int, cid: int, global_state: State
    ) -> tuple[ClientUpdate, int, int, float]:
        job, method = self.job, self.method
        method.prepare_client(self.model, rnd, cid)
        down_blob = payload.encode(method.download(rnd, cid, global_state))
        received = payload.decode(down_blob)
        load_trainable_state(self.model, received, strict=False)
        result = train_local(
            self.model,
            job.train,
            job.partition.train[cid],
            job.training,
            seed=client_seed(self.config.seed, rnd, cid),
            extra_loss=lambda params: method.local_loss(params, received),
            after_backward=lambda model: method.after_backward(model, cid),
        )
        sent = method.upload(rnd, cid, trainable_state(self.model))
        up_blob = payload.encode(sent)
        update = ClientUpdate(
            cid, payload.decode(up_blob, expected=sent), result.num_samples, result
        )
        device, network = job.profiles[cid]
        per_token, embeddings = count_trainable_per_token(self.model)
        flops = cost.train_flops(
            job.dims,
            round(result.mean_seq_len) + job.extra_tokens,
            result.samples_seen,
            lowest_trainable_layer=lowest_trainable_layer(self.model, job.num_layers),
            trainable_params=per_token,
            embeddings_trainable=embeddings,
            extra_kv=job.extra_kv,
        )
        seconds = cost.compute_time_s(flops, device) + cost.comm_time_s(
            len(up_blob), len(down_blob), network
        )
        return update, len(up_blob), len(down_blob), seconds

    # -- one round ------------------------------------------------------------------------------
    def _round(self, rnd: int, global_state: State) -> tuple[State, RoundReport]:
        config = self.config
        clients = sample_clients(config.seed, rnd, config.num_clients, config.clients_per_round)
        report = RoundReport(rnd, clients, train_loss=0.0)
        updates = []
        for i, cid in enumerate(clients):
            update, up, down, seconds = self._client_round(rnd, cid, global_state)
            updates.append(update)
            report.bytes_up += up
            report.bytes_down += down
            report.client_sim_s.append(seconds)
            self.on_event(
                "client",
                {"round": rnd, "done": i + 1, "of": len(clients), "loss": update.result.mean_loss},
            )
        samples = sum(u.result.samples_seen for u in updates)
        report.train_loss = (
            sum(u.result.mean_loss * u.result.samples_seen for u in updates) / samples
        )
        report.sim_time_s = cost.round_time_s(report.client_sim_s)
        new_global = self.method.aggregate(rnd, global_state, updates)
        return new_global, report

    def _evaluate(self, rnd: int, row: dict[str, Any]) -> None:
        job, config = self.job, self.config
        if rnd % config.eval_every and rnd != config.rounds:
            row.update(accuracy=None, macro_f1=None, eval_loss=None)
            return
        result = evaluate(self.model, job.test, np.arange(len(job.test)), config.eval_batch_size)
        row.update(accuracy=result.accuracy, macro_f1=result.macro_f1, eval_loss=result.loss)
        if job.validation is not None:
            val = evaluate(
                self.model, job.validation, np.arange(len(job.validation)), config.eval_batch_size
            )
            row.update(val_accuracy=val.accuracy, val_macro_f1=val.macro_f1)

    def _personalized(self) -> dict[str, Any]:
        job = self.job
        accs, sizes = [], []
        for rows in job.partition.test:
            if len(rows) == 0:
                continue
            result = evaluate(self.model, job.test, rows, self.config.eval_batch_size)
            accs.append(result.accuracy)
            sizes.append(len(rows))
        if not accs:
            return {}
        return {
            "personalized_accuracy_mean": float(np.mean(accs)),
            "personalized_accuracy_weighted": float(np.average(accs, weights=sizes)),
            "personalized_accuracy_min": float(np.min(accs)),
        }

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, run_dir = self.config, self.run_dir
        ckpt = run_dir.load_checkpoint()
        if ckpt is None:
            global_state, history, start = trainable_state(self.model), [], 0
        else:
            global_state, history, start = ckpt.global_state, ckpt.history, ckpt.round
            self.method.load_state_dict(ckpt.method_state)
            set_rng_state(ckpt.rng)
            run_dir.write_metrics(history)
            self.on_event("resume", {"round": start})
        load_trainable_state(self.model, global_state)
        trainable = count_trainable(self.model)
        total = sum(p.numel() for p in self.model.parameters())
        for rnd in range(start + 1, config.rounds + 1):
            started = time.perf_counter()
            self.on_event("round_start", {"round": rnd})
            global_state, report = self._round(rnd, global_state)
            load_trainable_state(self.model, global_state)
            row = self._metrics_row(report, history)
            self._evaluate(rnd, row)
            wall = time.perf_counter() - started
            previous = history[-1]["wall_time_total_s"] if history else 0.0
            row.update(wall_time_s=wall, wall_time_total_s=previous + wall)
            history.append(row)
            run_dir.save_checkpoint(
                Checkpoint(rnd, global_state, self.method.state_dict(), history, rng_state())
            )
            run_dir.write_metrics(history)
            run_dir.write_summary(summarise(config, history, trainable, total))
            self.on_event("round_end", row)
        extra = self._personalized() if config.personalized_eval else {}
        summary = summarise(config, history, trainable, total, extra)
        run_dir.write_summary(summary)
        write_safetensors(run_dir.weights_path, global_state)
        return summary

    @staticmethod
    def _metrics_row(report: RoundReport, history: list[dict[str, Any]]) -> dict[str, Any]:
        last = history[-1] if history else {}
        return {
            "round": report.rnd,
            "clients": report.clients,
            "train_loss": report.train_loss,
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "sim_time_s": report.sim_time_s,
            "bytes_up_total": last.get("bytes_up_total", 0) + report.bytes_up,
            "bytes_down_total": last.get("bytes_down_total", 0) + report.bytes_down,
            "sim_time_total_s": last.get("sim_time_total_s", 0.0) + report.sim_time_s,
        }
