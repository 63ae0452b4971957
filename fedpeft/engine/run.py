"""The one run skeleton both engines share: a client's local step, upload checks, resume, the end
of a round (metrics row, evaluation, best weights, checkpoint) and the end of a run.

The embedded engine (``engine/local.py``) and the Flower engine (``engine/flower.py``) differ only
in how messages travel and who drives the rounds; everything a run records is written here, so
the two engines produce the same run folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedpeft import attacks, cost, faults, payload
from fedpeft.algorithms import dp
from fedpeft.cache import cache_start_layer
from fedpeft.client import Evaluation, LocalResult, evaluate, train_local
from fedpeft.job import Job
from fedpeft.methods.base import ClientFit, ClientSession, ClientUpdate, RoundReport
from fedpeft.peft.base import (
    State,
    count_trainable,
    count_trainable_per_token,
    load_trainable_state,
    lowest_trainable_layer,
    trainable_parameters,
    trainable_state,
)
from fedpeft.runs import (
    Checkpoint,
    RunDir,
    rng_state,
    set_rng_state,
    write_json,
    write_safetensors,
    write_text,
)
from fedpeft.summary import summarise

log = logging.getLogger("fedpeft.run")
ProgressHook = Callable[[str, dict[str, Any]], None]


# -- who trains, with which seed ------------------------------------------------------------------
def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of round ``rnd``: a seeded draw that does not depend on earlier rounds."""
    rng = np.random.default_rng([seed, rnd])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def client_seed(seed: int, rnd: int, cid: int, *stream: int) -> int:
    """``stream`` tells apart several fits of one client in one round (AutoFedNLP's trials)."""
    return int(np.random.SeedSequence([seed, rnd, cid, *stream]).generate_state(1)[0])


# -- one client's local step ----------------------------------------------------------------------
@dataclass
class ClientWork:
    """What a client's local step produced, before it is encoded and sent."""

    sent: State
    result: LocalResult
    compute_s: float
    metrics: dict[str, Any]


class ClientStore:
    """Each client's persistent tensors (``ClientSession.store``), kept between its rounds.

    In the embedded engine they live here, keyed by client, and go into every checkpoint; a
    client only ever sees its own entry.
    """

    def __init__(self) -> None:
        self._states: dict[int, State] = {}

    def of(self, cid: int) -> State:
        return self._states.setdefault(cid, {})

    def get(self, cid: int) -> State | None:
        return self._states.get(cid)

    def state_dict(self) -> dict[str, State]:
        return {str(cid): dict(state) for cid, state in self._states.items() if state}

    def load_state_dict(self, state: dict[str, State]) -> None:
        self._states = {int(cid): dict(tensors) for cid, tensors in state.items()}


def reset_untouched(job: Job, received: State) -> None:
    """Give every trainable tensor the client did not receive its initial value, so nothing of the
    previous client's training stays in the resident model."""
    params = trainable_parameters(job.model)
    untouched = {
        name: job.initial_state[name]
        for name in params.keys() - received.keys()
        if name in job.initial_state and job.initial_state[name].shape == params[name].shape
    }
    if untouched:
        load_trainable_state(job.model, untouched, strict=False)


def train_client(
    job: Job,
    rnd: int,
    cid: int,
    received: State,
    store: State,
    stream: tuple[int, ...] = (),
) -> ClientWork:
    """One client's local work, the same in every engine: load the received tensors into the
    job's model (already shaped by ``prepare_client``), let the method prepare the session, train,
    and return what the method uploads, the training result, the simulated compute seconds on the
    client's device and the metrics the client reports.

    With the activation cache the frozen bottom is skipped for rows already cached; the device is
    charged the top layers, plus one bottom forward for each row it had to compute (cache misses).
    """
    model, method = job.model, job.method
    reset_untouched(job, received)
    load_trainable_state(model, received, strict=False)
    cache = job.caches.get("train")
    cached_from = cache_start_layer(model) if cache is not None else None
    misses_before = cache.stats.misses if cache is not None else 0

    def forward(batch, rows):
        if cached_from is not None:
            return cache.logits(model, batch, rows)
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    session = ClientSession(
        rnd=rnd,
        cid=cid,
        model=model,
        data=job.train,
        rows=job.partition.train[cid],
        received=received,
        store=store,
        context=job.clients[cid],
        forward=forward,
    )
    method.begin_client(session)
    result = train_local(
        model,
        job.train,
        session.rows,
        job.training,
        seed=client_seed(job.config.seed, rnd, cid, *stream),
        extra_loss=lambda params: method.local_loss(params, received),
        after_backward=lambda trained: method.after_backward(trained, cid),
        forward=(lambda _model, batch, rows: forward(batch, rows)) if cached_from else None,
        condition=lambda batch, rows: method.condition(model, batch, rows, training=True, cid=cid),
        masks=session.masks,
    )
    method.end_client(session)
    sent = method.upload(rnd, cid, trainable_state(model))
    seq_len = round(result.mean_seq_len) + job.extra_tokens
    misses = cache.stats.misses - misses_before if cache is not None else 0
    flops = local_flops(job, seq_len, result.samples_seen, cached_from, misses)
    flops += session.extra_flops
    device, _network = job.profiles[cid]
    metrics = json.loads(json.dumps(session.metrics))  # what can travel: plain numbers
    return ClientWork(sent, result, cost.compute_time_s(flops, device), metrics)


def client_upload(
    job: Job,
    rnd: int,
    cid: int,
    received: State,
    store: State,
    stream: tuple[int, ...] = (),
) -> tuple[ClientWork, bool | None]:
    """``train_client`` as a client of this run does it, in every engine: a simulated attacker
    (``job.attack``) trains on flipped labels or poisons what it sends, and under local DP the
    client clips and noises its upload first. Returns the work (``sent``: what goes on the wire)
    and, under local DP, whether the update was clipped (else None)."""
    plan = job.attack
    attacking = plan is not None and cid in plan.attackers
    trainer = job
    if attacking and plan.kind == "label_flip":
        trainer = replace(job, train=attacks.flip_labels(job.train, len(job.label_names)))
    work = train_client(trainer, rnd, cid, received, store, stream)
    clipped = None
    if job.dp is not None and job.dp.local:  # the client randomises its own upload
        work.sent, clipped = job.dp.randomize(received, work.sent, rnd, cid)
    if attacking and plan.kind in attacks.UPDATE_ATTACKS:
        work.sent = attacks.poison_update(plan, work.sent, received, rnd, cid, *stream)
    return work, clipped


def record_attackers(job: Job, run_dir: RunDir) -> None:
    """Write the run's attackers (``attackers.json``) once, before any of them sends anything."""
    path = run_dir.path / "attackers.json"
    if job.attack is not None and not path.is_file():
        write_json(path, job.attack.record())


def local_flops(
    job: Job, seq_len: int, samples: int, cached_from: int | None, misses: int
) -> float:
    """FLOPs of a local pass over ``samples`` sequences of ``seq_len`` tokens with the job's model
    as shaped now: the trainable top (forward and backward) and the frozen layers below it, or,
    with the activation cache (``cached_from``: its start layer), only one bottom forward for each
    of the ``misses`` rows it had to compute."""
    model = job.model
    per_token, embeddings = count_trainable_per_token(model)
    flops = cost.train_flops(
        job.dims,
        seq_len,
        samples,
        lowest_trainable_layer=lowest_trainable_layer(model, job.num_layers),
        trainable_params=per_token,
        embeddings_trainable=embeddings,
        extra_kv=job.extra_kv,
        cached_below=cached_from is not None,
    )
    if cached_from is not None:
        flops += misses * cached_from * cost.layer_forward_flops(job.dims, seq_len, job.extra_kv)
    return flops


def estimate_client_time_s(job: Job, cid: int, state: State) -> float:
    """An upper bound, from the cost model alone (nothing trains), on client ``cid``'s simulated
    seconds for one local round from ``state`` with the model as shaped now: its local pass (the
    epochs or steps it would run, every sequence as long as its longest row, every cached row a
    miss, as in the first round of a configuration) plus ``state`` sent down and back up as
    float tensors. Methods that plan in simulated time (AutoFedNLP's trial budget) use it."""
    model, training = job.model, job.training
    load_trainable_state(model, state, strict=False)
    rows = job.partition.train[cid]
    if len(rows) == 0:
        samples, seq_len = 0, 1
    else:
        steps = training.num_steps(len(rows))
        samples = steps * min(training.batch_size, len(rows))
        seq_len = int(job.train.lengths[rows].max()) + job.extra_tokens
    cached_from = cache_start_layer(model) if "train" in job.caches else None
    flops = local_flops(job, seq_len, samples, cached_from, misses=min(samples, len(rows)))
    device, network = job.profiles[cid]
    blob = len(payload.encode(state))
    return cost.compute_time_s(flops, device) + cost.comm_time_s(blob, blob, network)


# -- the server's check of an upload --------------------------------------------------------------
def expected_upload(job: Job, rnd: int, cid: int, global_state: State) -> State:
    """The names, shapes and dtypes the method asked this client for (its upload selection
    applied to the server's state)."""
    return job.method.upload(rnd, cid, global_state)


def check_upload(blob: bytes, expected: State) -> tuple[State | None, str | None]:
    """(decoded state, None) for a usable upload, else (None, the reason in one line)."""
    try:
        return payload.decode(blob, expected=expected), None
    except payload.PayloadError as err:
        return None, str(err)


def weighted_train_loss(updates: list[ClientUpdate]) -> float:
    """The round's training loss: clients' mean losses weighted by the samples they saw."""
    samples = sum(u.result.samples_seen for u in updates)
    if not samples:
        return float("nan")
    return sum(u.result.mean_loss * u.result.samples_seen for u in updates) / samples


def reject(report: RoundReport, cid: int, reason: str, on_event: ProgressHook) -> None:
    log.warning("round %d: client %d's update rejected: %s", report.rnd, cid, reason)
    report.rejected.append({"cid": cid, "reason": reason})
    on_event("rejected", {"round": report.rnd, "cid": cid, "reason": reason})


# -- a round's clients under faults, attacks and DP (both engines) --------------------------------
def attempt_clients(job: Job, rnd: int, attempt: int) -> list[int]:
    """The clients of attempt ``attempt`` of round ``rnd``: the round's draw, then, for a retry
    (``faults.min_clients``), a fresh seeded one."""
    config = job.config
    if attempt == 0:
        return sample_clients(config.seed, rnd, config.num_clients, config.clients_per_round)
    return job.faults.sample(rnd, attempt, config.num_clients, config.clients_per_round)


def max_attempts(job: Job) -> int:
    """How many samples a round may try before it fails (``faults.retries`` + 1 with a quorum)."""
    plan = job.faults
    return 1 + (plan.retries if plan is not None and plan.min_clients else 0)


def short_of_quorum(job: Job, rnd: int, updates: list[ClientUpdate]) -> bool:
    """Whether an attempt ended with fewer usable updates than ``faults.min_clients``."""
    plan = job.faults
    if plan is None or len(updates) >= plan.min_clients:
        return False
    log.warning(
        "round %d: %d usable update(s), faults.min_clients is %d",
        rnd,
        len(updates),
        plan.min_clients,
    )
    return True


def round_failed(job: Job, rnd: int, run_dir: RunDir) -> faults.RoundFailed:
    """The one-line error of a round that every attempt left short of ``faults.min_clients``."""
    return faults.RoundFailed(
        f"round {rnd}: fewer than faults.min_clients ({job.faults.min_clients}) usable updates "
        f"after {max_attempts(job)} attempt(s); the run stops, its {rnd - 1} finished round(s) "
        f"kept in {run_dir.path}"
    )


def start_faults(job: Job, report: RoundReport) -> None:
    """The fault fields every row of a run with ``faults`` carries."""
    if job.faults is not None:
        report.extra.update(clients_dropped=[], stragglers_in_round=[])


def settle_client(
    job: Job,
    report: RoundReport,
    attempt: int,
    cid: int,
    fit: ClientFit,
    crashed: bool,
    on_event: ProgressHook,
) -> tuple[ClientUpdate | None, float]:
    """One client's fit as the round records it: its bytes, its simulated seconds (stretched
    for a straggler), and whether the server uses its update: not when it crashed or missed
    ``faults.deadline_s`` (``clients_dropped``) or its upload was rejected. Returns (the usable
    update or None, the client's simulated seconds)."""
    plan = job.faults
    report.bytes_up += fit.bytes_up
    report.bytes_down += fit.bytes_down
    seconds = fit.sim_time_s
    if plan is not None:
        seconds = plan.client_time_s(cid, seconds)
        if cid in plan.stragglers:
            report.extra["stragglers_in_round"].append(cid)
    report.client_sim_s.append(seconds)
    dropped = "crashed" if crashed else None
    if plan is not None and not crashed and plan.late(seconds):
        dropped = f"deadline ({seconds:.1f} s > {plan.deadline_s:g} s)"
    if dropped is not None:
        log.warning("round %d: client %d dropped: %s", report.rnd, cid, dropped)
        entry = {"cid": cid, "reason": dropped.split(" ")[0], "attempt": attempt}
        if dropped != "crashed":
            entry["detail"] = dropped
        report.extra["clients_dropped"].append(entry)
        on_event("dropped", {"round": report.rnd, "cid": cid, "reason": dropped})
        return None, seconds
    if fit.update is None:
        reject(report, cid, fit.rejected or "rejected", on_event)
        return None, seconds
    return fit.update, seconds


def attempt_time_s(job: Job, times: list[float]) -> float:
    """An attempt lasts as long as its slowest client, at most ``faults.deadline_s``."""
    seconds = cost.round_time_s(times)
    return job.faults.round_time_s(seconds) if job.faults is not None else seconds


def local_uploads(history: list[dict[str, Any]]) -> Counter:
    """Local DP: how many randomised uploads each client has sent in the finished rounds."""
    return Counter(cid for row in history for cid in row.get("dp_noised_clients", []))


def end_attempts(
    job: Job,
    report: RoundReport,
    clients: list[int],
    attempts: int,
    updates: list[ClientUpdate],
    history: list[dict[str, Any]],
    noised: list[tuple[int, bool]],
) -> None:
    """The round's record once its last attempt is in: its clients, attempts, attackers, loss,
    and its privacy (``noised``: local DP's (client, clipped) of each randomised upload sent
    this round: crashed clients sent none, late and rejected ones did)."""
    report.clients = clients
    if job.faults is not None:
        report.extra["attempts"] = attempts
    if job.attack is not None:
        attackers = set(job.attack.attackers)
        report.extra["attackers_in_round"] = [c for c in clients if c in attackers]
    report.train_loss = weighted_train_loss(updates)
    plan = job.dp
    if plan is not None and plan.local:
        uploads = local_uploads(history) + Counter(cid for cid, _ in noised)
        clipped = [c for _, c in noised]
        report.extra.update(
            epsilon=plan.local_epsilon_after(max(uploads.values(), default=0)),
            dp_delta=plan.delta,
            dp_mode="local",
            dp_noised_clients=[cid for cid, _ in noised],
            dp_noise_std=plan.noise_multiplier * plan.clip_norm,
            dp_clipped_fraction=sum(clipped) / len(clipped) if clipped else None,
        )
    elif plan is not None:  # counted whether or not the round releases anything
        report.extra.update(epsilon=plan.epsilon_after(report.rnd), dp_delta=plan.delta)


def dp_clip_norm(job: Job, history: list[dict[str, Any]]) -> float | None:
    """Central DP's clip norm for the next round: adaptive clipping keeps it in the rows (a
    round without updates keeps the one before)."""
    if job.dp is None:
        return None
    kept = [row["dp_clip_norm_next"] for row in history if "dp_clip_norm_next" in row]
    return kept[-1] if kept else job.dp.clip_norm


def aggregate_round(
    job: Job,
    rnd: int,
    global_state: State,
    updates: list[ClientUpdate],
    report: RoundReport,
    history: list[dict[str, Any]],
) -> State:
    """The next global state: the method's aggregation, or DP-FedAvg (``algorithms/dp.py``)
    with central DP, clipped to the clip norm of ``dp_clip_norm`` (the row records the next)."""
    if not updates:  # every upload was dropped or rejected: the round goes on, the model stays
        return global_state
    plan = job.dp
    if plan is None or plan.local:
        return job.method.aggregate(rnd, global_state, updates)
    new_state, done = dp.dp_fedavg(
        global_state,
        [u.state for u in updates],
        clip_norm=dp_clip_norm(job, history),
        noise_multiplier=plan.noise_multiplier,
        generator=dp.round_generator(plan.seed, rnd),
        adaptive=plan.adaptive,
        target_quantile=plan.target_quantile,
        clip_lr=plan.clip_lr,
        count_std=plan.count_noise,
    )
    report.extra.update(
        dp_clip_norm=done.clip_norm,
        dp_noise_std=done.noise_std,
        dp_clipped_fraction=done.clipped_fraction,
        dp_clip_norm_next=done.next_clip_norm,
    )
    return new_state


def before_round(
    job: Job, history: list[dict[str, Any]], rnd: int, on_event: ProgressHook
) -> tuple[bool, str | None]:
    """Whether round ``rnd`` must not run, and why for the summary: the run converged
    (``early_stop``: ``finish_run`` records it) or the round would pass ``dp.max_epsilon``."""
    stop = job.config.early_stop
    if stop is not None and converged(history, stop.patience, stop.min_delta):
        return True, None
    plan = job.dp
    if plan is None or plan.max_epsilon is None:
        return False, None
    if plan.local:  # any client may be sampled: the one with most uploads could pass it
        after = plan.local_epsilon_after(max(local_uploads(history).values(), default=0) + 1)
        what = "a client's epsilon could reach"
    else:
        after, what = plan.epsilon_after(rnd), "epsilon would reach"
    if after <= plan.max_epsilon:
        return False, None
    text = (
        f"stopped before round {rnd}: {what} {after:.3g} > dp.max_epsilon "
        f"{plan.max_epsilon:g} (delta {plan.delta:g})"
    )
    log.warning(text)
    on_event("note", {"text": text})
    return True, text


# -- evaluation -----------------------------------------------------------------------------------
def _condition(job: Job, cid: int | None):
    model, method = job.model, job.method
    return lambda batch, rows: method.condition(model, batch, rows, training=False, cid=cid)


def evaluate_split(job: Job, split: str) -> Evaluation:
    """The job's model as it is now (the global state) on all rows of 'test' or 'validation'."""
    data = job.test if split == "test" else job.validation
    if data is None:
        raise ValueError(f"the job has no {split} rows")
    job.method.prepare_eval(job.model, None, None)
    cache = job.caches.get(split)
    forward = cache.logits if cache is not None else None
    groups = job.test_groups if split == "test" else None
    return evaluate(
        job.model,
        data,
        np.arange(len(data)),
        job.config.eval_batch_size,
        forward,
        condition=_condition(job, None),
        groups=groups,
    )


def evaluate_global(job: Job, rnd: int, row: dict[str, Any]) -> None:
    """Score the job's model (holding the global state) on the test and validation rows into
    ``row``; rounds between ``eval_every`` get None so every row has the same keys."""
    config = job.config
    if rnd % config.eval_every and rnd != config.rounds:
        row.update(accuracy=None, macro_f1=None, eval_loss=None)
        if job.validation is not None:
            row.update(val_accuracy=None, val_macro_f1=None)
        return
    result = evaluate_split(job, "test")
    row.update(accuracy=result.accuracy, macro_f1=result.macro_f1, eval_loss=result.loss)
    if result.group_accuracy is not None:
        row.update(
            group_accuracy=result.group_accuracy,
            group_accuracy_mean=float(np.mean(list(result.group_accuracy.values()))),
        )
    if job.validation is not None:
        val = evaluate_split(job, "validation")
        row.update(val_accuracy=val.accuracy, val_macro_f1=val.macro_f1)
    if "train" in job.caches:
        stats = job.caches["train"].stats
        row.update(cache_hits=stats.hits, cache_misses=stats.misses)
        row.update(cache_mb=sum(c.nbytes for c in job.caches.values()) / 1e6)


def finetune(job: Job, cid: int) -> None:
    """Client ``cid`` fine-tunes the model as it is now on its own training rows (the
    "federated, then local fine-tuning" personalisation baseline); seeded like a round after the
    last one, so it is reproducible."""
    rows = job.partition.train[cid]
    if len(rows) == 0:
        return
    training = replace(job.training, epochs=job.config.personalized_finetune_epochs, steps=None)
    train_local(
        job.model,
        job.train,
        rows,
        training,
        seed=client_seed(job.config.seed, job.config.rounds + 1, cid, 1),
        condition=lambda batch, batch_rows: job.method.condition(
            job.model, batch, batch_rows, training=True, cid=cid
        ),
    )


def personalized_scores(job: Job, global_state: State, store: ClientStore) -> dict[str, Any]:
    """Each client's own test rows, scored with the model as the method personalises it for that
    client (its persistent tensors, its conditioning): mean, weighted and worst accuracy, and per
    group for natural partitions."""
    accs, sizes, groups = [], [], []
    for cid, rows in enumerate(job.partition.test):
        if len(rows) == 0:
            continue
        load_trainable_state(job.model, global_state)
        job.method.prepare_eval(job.model, cid, store.get(cid))
        if job.config.personalized_finetune_epochs:
            finetune(job, cid)
        result = evaluate(
            job.model, job.test, rows, job.config.eval_batch_size, condition=_condition(job, cid)
        )
        accs.append(result.accuracy)
        sizes.append(len(rows))
        groups.append(job.clients[cid].group)
    load_trainable_state(job.model, global_state)
    if not accs:
        return {}
    scores = {
        "personalized_accuracy_mean": float(np.mean(accs)),
        "personalized_accuracy_weighted": float(np.average(accs, weights=sizes)),
        "personalized_accuracy_min": float(np.min(accs)),
    }
    if any(g is not None for g in groups):
        per_group: dict[str, list[float]] = {}
        for acc, group in zip(accs, groups, strict=True):
            per_group.setdefault(str(group), []).append(acc)
        scores["personalized_group_accuracy"] = {g: float(np.mean(v)) for g, v in per_group.items()}
        scores["personalized_group_accuracy_mean"] = float(
            np.mean([np.mean(v) for v in per_group.values()])
        )
    return scores


# -- the run: start or resume, end of round, end of run -------------------------------------------
@dataclass
class RunState:
    """What a run carries from round to round (all of it goes into each checkpoint)."""

    global_state: State
    history: list[dict[str, Any]]
    done: int  # rounds completed
    store: ClientStore = field(default_factory=ClientStore)
    best_val: float | None = None


def _note(on_event: ProgressHook, text: str) -> None:
    log.info(text)
    on_event("note", {"text": text})


def start_run(job: Job, run_dir: RunDir, on_event: ProgressHook) -> RunState:
    """A fresh run's starting state, or the last checkpoint's (method, RNG, client store, caches)."""
    if job.validation is None:
        _note(
            on_event,
            "no validation rows (validation_size: 0): the headline is the final round's test "
            "accuracy",
        )
    ckpt = run_dir.load_checkpoint()
    if ckpt is None:
        return RunState(trainable_state(job.model), [], 0)
    state = RunState(ckpt.global_state, ckpt.history, ckpt.round)
    job.method.load_state_dict(ckpt.method_state)
    state.store.load_state_dict(ckpt.extra.get("store", {}))
    for split, cache_state in ckpt.extra.get("caches", {}).items():
        if split in job.caches:
            job.caches[split].load_state_dict(cache_state, job.model)
    set_rng_state(ckpt.rng)
    vals = [row["val_accuracy"] for row in state.history if row.get("val_accuracy") is not None]
    state.best_val = max(vals) if vals else None
    run_dir.write_metrics(state.history)
    on_event("resume", {"round": state.done})
    return state


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
        "clients_rejected": report.rejected,
        **report.extra,
    }


def _checkpoint_extra(job: Job, state: RunState) -> dict[str, Any]:
    caches = {split: cache.state_dict() for split, cache in job.caches.items()}
    return {"store": state.store.state_dict(), "caches": caches}


def finish_round(
    job: Job,
    run_dir: RunDir,
    state: RunState,
    report: RoundReport,
    started: float,
    on_event: ProgressHook,
) -> dict[str, Any]:
    """After aggregation (the job's model holds the new global state): evaluate, record the
    round, keep the best-on-validation weights, checkpoint, rewrite metrics and summary."""
    history = state.history
    report.extra.update(job.method.round_metrics(report.rnd))
    row = metrics_row(report, history)
    evaluate_global(job, report.rnd, row)
    wall = time.perf_counter() - started
    previous = history[-1]["wall_time_total_s"] if history else 0.0
    row.update(wall_time_s=wall, wall_time_total_s=previous + wall)
    history.append(row)
    state.done = report.rnd
    val = row.get("val_accuracy")
    if val is not None and (state.best_val is None or val > state.best_val):
        state.best_val = val
        write_safetensors(run_dir.best_path, state.global_state)
    run_dir.save_checkpoint(
        Checkpoint(
            report.rnd,
            state.global_state,
            job.method.state_dict(),
            history,
            rng_state(),
            _checkpoint_extra(job, state),
        )
    )
    run_dir.write_metrics(history)
    if "trial" in row:  # methods that search configurations record every trial
        trials = [r["trial"] for r in history if "trial" in r]
        write_text(run_dir.path / "trials.jsonl", "".join(json.dumps(t) + "\n" for t in trials))
    extra = {**_privacy(history), **early_stop_fields(job, history)}
    run_dir.write_summary(summarise(job.config, history, *_param_counts(job), extra))
    on_event("round_end", row)
    return row


def _param_counts(job: Job) -> tuple[int, int]:
    return count_trainable(job.model), sum(p.numel() for p in job.model.parameters())


def _privacy(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The (epsilon, delta) a DP run has spent so far, for the summary."""
    last = history[-1] if history else {}
    if "epsilon" not in last:
        return {}
    return {
        "epsilon": last["epsilon"],
        "dp_delta": last["dp_delta"],
        "dp_mode": last.get("dp_mode", "central"),
    }


def next_round_certain(job: Job, history: list[dict[str, Any]], rnd: int) -> bool:
    """Whether round ``rnd + 1`` runs whatever round ``rnd``'s evaluation says (``history``: the
    rounds before ``rnd``): it is within the run's rounds, no privacy budget can stop it
    (``dp.max_epsilon``), and ``early_stop`` cannot end the run after round ``rnd`` (its
    patience has not run out even if round ``rnd`` gains nothing on validation)."""
    config = job.config
    if rnd + 1 > config.rounds:
        return False
    if job.dp is not None and job.dp.max_epsilon is not None:
        return False
    stop = config.early_stop
    if stop is None:
        return True
    best, best_round = last_gain(history, stop.min_delta)
    return best is None or rnd - best_round < stop.patience


def last_gain(history: list[dict[str, Any]], min_delta: float = 0.0) -> tuple[float | None, int]:
    """The best validation accuracy so far and the round of the last one that beat every
    earlier one by more than ``min_delta`` (None, 0: no validation score yet)."""
    best, best_round = None, 0
    for row in history:
        val = row.get("val_accuracy")
        if val is not None and (best is None or val > best + min_delta):
            best, best_round = val, row["round"]
    return best, best_round


def converged(history: list[dict[str, Any]], patience: int, min_delta: float = 0.0) -> str | None:
    """Why a run has converged (``early_stop``), else None: ``patience`` rounds have passed since
    the last round whose validation accuracy beat every earlier one by more than ``min_delta``."""
    best, best_round = last_gain(history, min_delta)
    if best is None or not history or history[-1]["round"] - best_round < patience:
        return None
    return (
        f"converged after round {history[-1]['round']}: no validation gain over {min_delta:g} "
        f"in {patience} rounds since round {best_round} ({best:.4f})"
    )


def early_stop_fields(job: Job, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's record of a run under ``early_stop``: whether it converged before its cap
    (``rounds``) and whether it hit the cap; a converged run is complete."""
    settings = job.config.early_stop
    if settings is None:
        return {}
    reason = converged(history, settings.patience, settings.min_delta)
    done = len(history)
    return {
        "converged": reason is not None,
        "cap_hit": reason is None and done >= job.config.rounds,
        "complete": reason is not None or done >= job.config.rounds,
        **({"stopped": reason} if reason is not None else {}),
    }


def finish_run(
    job: Job, run_dir: RunDir, state: RunState, stopped: str | None = None
) -> dict[str, Any]:
    """The final summary (with personalised scores when asked) and the final weights;
    ``stopped`` says why a run ended before its last round (e.g. its privacy budget)."""
    load_trainable_state(job.model, state.global_state)
    counts = _param_counts(job)
    extra = _privacy(state.history)
    extra.update(early_stop_fields(job, state.history))
    if stopped is not None:
        extra["stopped"] = stopped
    if job.config.privacy.membership_inference and state.history:
        from fedpeft.privacy import at_run_end

        extra.update(at_run_end(job, state.history, run_dir.best_path))
        load_trainable_state(job.model, state.global_state)
    if job.config.personalized_eval:
        extra.update(personalized_scores(job, state.global_state, state.store))
    summary = summarise(job.config, state.history, *counts, extra)
    run_dir.write_summary(summary)
    write_safetensors(run_dir.weights_path, state.global_state)
    return summary
