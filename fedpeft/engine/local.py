"""The embedded engine: one process, one resident frozen backbone, many simulated clients.

Each round the engine samples clients, and for each one swaps its received trainable state into
the shared model, trains locally, and takes the trained state back out. Memory therefore grows by
trainable states only, never by a model per client. Every message is really serialised (the bytes
counted are the bytes a network would carry), and simulated device time comes from the cost model.
A checkpoint after every round makes runs resumable with identical results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedpeft import cost, payload, quantize
from fedpeft.cache import cache_start_layer
from fedpeft.client import Evaluation, LocalResult, evaluate, train_local
from fedpeft.job import Job
from fedpeft.methods import ClientFit, ClientUpdate, RoundReport
from fedpeft.peft.base import (
    State,
    count_trainable,
    count_trainable_per_token,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_state,
)
from fedpeft.runs import (
    Checkpoint,
    RunDir,
    rng_state,
    set_rng_state,
    write_safetensors,
    write_text,
)
from fedpeft.summary import summarise


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of round ``rnd``: a seeded draw that does not depend on earlier rounds."""
    rng = np.random.default_rng([seed, rnd])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def client_seed(seed: int, rnd: int, cid: int, *stream: int) -> int:
    """``stream`` tells apart several fits of one client in one round (AutoFedNLP's trials)."""
    return int(np.random.SeedSequence([seed, rnd, cid, *stream]).generate_state(1)[0])


def train_client(
    job: Job, rnd: int, cid: int, received: State, stream: tuple[int, ...] = ()
) -> tuple[State, LocalResult, float]:
    """One client's local work, the same in every engine: load the received tensors into the
    job's model (already shaped by ``prepare_client``), train, and return what the method
    uploads, the training result and the simulated compute seconds on the client's device.

    With the activation cache the frozen bottom is skipped for rows already cached; the device is
    charged the top layers, plus one bottom forward for each row it had to compute (cache misses).
    """
    model, method = job.model, job.method
    load_trainable_state(model, received, strict=False)
    cache = job.caches.get("train")
    cached_from = cache_start_layer(model) if cache is not None else None
    misses_before = cache.stats.misses if cache is not None else 0
    result = train_local(
        model,
        job.train,
        job.partition.train[cid],
        job.training,
        seed=client_seed(job.config.seed, rnd, cid, *stream),
        extra_loss=lambda params: method.local_loss(params, received),
        after_backward=lambda trained: method.after_backward(trained, cid),
        forward=cache.logits if cached_from is not None else None,
    )
    sent = method.upload(rnd, cid, trainable_state(model))
    per_token, embeddings = count_trainable_per_token(model)
    seq_len = round(result.mean_seq_len) + job.extra_tokens
    flops = cost.train_flops(
        job.dims,
        seq_len,
        result.samples_seen,
        lowest_trainable_layer=lowest_trainable_layer(model, job.num_layers),
        trainable_params=per_token,
        embeddings_trainable=embeddings,
        extra_kv=job.extra_kv,
        cached_below=cached_from is not None,
    )
    if cached_from is not None:
        misses = cache.stats.misses - misses_before
        flops += misses * cached_from * cost.layer_forward_flops(job.dims, seq_len, job.extra_kv)
    device, _network = job.profiles[cid]
    return sent, result, cost.compute_time_s(flops, device)


def evaluate_global(job: Job, rnd: int, row: dict[str, Any]) -> None:
    """Score the job's model (holding the global state) on the test and validation rows into
    ``row``; rounds between ``eval_every`` get None so every row has the same keys."""
    config = job.config
    if rnd % config.eval_every and rnd != config.rounds:
        row.update(accuracy=None, macro_f1=None, eval_loss=None)
        return
    result = evaluate_split(job, "test")
    row.update(accuracy=result.accuracy, macro_f1=result.macro_f1, eval_loss=result.loss)
    if job.validation is not None:
        val = evaluate_split(job, "validation")
        row.update(val_accuracy=val.accuracy, val_macro_f1=val.macro_f1)
    if "train" in job.caches:
        stats = job.caches["train"].stats
        row.update(cache_hits=stats.hits, cache_misses=stats.misses)
        row.update(cache_mb=sum(c.nbytes for c in job.caches.values()) / 1e6)


def evaluate_split(job: Job, split: str) -> Evaluation:
    """The job's model as it is now on all rows of 'test' or 'validation' (through the cache)."""
    data = job.test if split == "test" else job.validation
    if data is None:
        raise ValueError(f"the job has no {split} rows")
    cache = job.caches.get(split)
    forward = cache.logits if cache is not None else None
    return evaluate(job.model, data, np.arange(len(data)), job.config.eval_batch_size, forward)


def personalized_scores(job: Job) -> dict[str, Any]:
    """The global model scored on each client's own test rows (mean, weighted, worst)."""
    accs, sizes = [], []
    for rows in job.partition.test:
        if len(rows) == 0:
            continue
        result = evaluate(job.model, job.test, rows, job.config.eval_batch_size)
        accs.append(result.accuracy)
        sizes.append(len(rows))
    if not accs:
        return {}
    return {
        "personalized_accuracy_mean": float(np.mean(accs)),
        "personalized_accuracy_weighted": float(np.average(accs, weights=sizes)),
        "personalized_accuracy_min": float(np.min(accs)),
    }


def metrics_row(report: RoundReport, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics.jsonl row of a round: its own figures plus running totals."""
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
        "train_wall_s": report.train_wall_s,
        **report.extra,
    }


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
        sent, result, compute_s = train_client(job, rnd, cid, received, stream)
        if int8:  # the update trained - received travels as int8 codes + scales;
            # the server adds it to its own exact copy of what it sent, so download
            # quantisation noise never accumulates in the global model
            up_blob = payload.encode(quantize.encode_update(sent, received))
            exact = {k: down[k] if k in down else t for k, t in received.items()}
            state = quantize.decode_update(payload.decode(up_blob), exact, sent)
            payload.check_matches(state, sent)
        else:
            up_blob = payload.encode(sent)
            state = payload.decode(up_blob, expected=sent)
        update = ClientUpdate(cid, state, result.num_samples, result)
        _device, network = job.profiles[cid]
        seconds = compute_s + cost.comm_time_s(len(up_blob), len(down_blob), network)
        wall = time.perf_counter() - started
        return ClientFit(update, len(up_blob), len(down_blob), seconds, wall)

    # -- one round ------------------------------------------------------------------------------
    def _round(self, rnd: int, global_state: State) -> tuple[State, RoundReport]:
        config = self.config
        if hasattr(self.method, "run_round"):  # the method drives its own round (AutoFedNLP)
            return self.method.run_round(rnd, global_state, _Runner(self))
        clients = sample_clients(config.seed, rnd, config.num_clients, config.clients_per_round)
        report = RoundReport(rnd, clients, train_loss=0.0)
        updates = []
        for i, cid in enumerate(clients):
            fit = self._client_round(rnd, cid, global_state)
            update = fit.update
            updates.append(update)
            report.bytes_up += fit.bytes_up
            report.bytes_down += fit.bytes_down
            report.client_sim_s.append(fit.sim_time_s)
            report.train_wall_s += fit.wall_s
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
        evaluate_global(self.job, rnd, row)

    def _personalized(self) -> dict[str, Any]:
        return personalized_scores(self.job)

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
        self._load(global_state)
        trainable = count_trainable(self.model)
        total = sum(p.numel() for p in self.model.parameters())
        for rnd in range(start + 1, config.rounds + 1):
            started = time.perf_counter()
            self.on_event("round_start", {"round": rnd})
            global_state, report = self._round(rnd, global_state)
            self._load(global_state)
            trainable = count_trainable(self.model)
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
            if "trial" in row:  # methods that search configurations record every trial
                trials = [r["trial"] for r in history if "trial" in r]
                write_text(
                    run_dir.path / "trials.jsonl", "".join(json.dumps(t) + "\n" for t in trials)
                )
            run_dir.write_summary(summarise(config, history, trainable, total))
            self.on_event("round_end", row)
        extra = self._personalized() if config.personalized_eval else {}
        summary = summarise(config, history, trainable, total, extra)
        run_dir.write_summary(summary)
        write_safetensors(run_dir.weights_path, global_state)
        return summary

    def _load(self, state: State) -> None:
        """Load a global state into the resident model, reshaped first if the method reshapes it."""
        if hasattr(self.method, "shape_model"):
            self.method.shape_model(self.model)
        load_trainable_state(self.model, state)

    @staticmethod
    def _metrics_row(report: RoundReport, history: list[dict[str, Any]]) -> dict[str, Any]:
        return metrics_row(report, history)


class _Runner:
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
