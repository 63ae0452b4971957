"""Privacy leakage, measured: a loss-threshold membership-inference attack on the global model.

The attacker holds the trained global model and a row, and guesses "member" (the row was in some
client's training data) when the model's loss on it is below a threshold (Yeom, Giacomelli,
Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting",
CSF 2018, https://arxiv.org/abs/1709.01604). Over every threshold at once this is summarised by
the attack's ROC AUC: the chance that a random member row has a lower loss than a random
non-member row, ties counting one half. 0.5 is a coin toss (nothing leaks through the losses);
1.0 separates members perfectly.

What is compared: ``rows`` member rows, drawn (seeded) from the training rows of the clients
whose update the server took in at least one round up to the scored weights' round (a crashed,
late or rejected client's rows never reached the model), and as many non-member rows from the
test split, which no client trained on and which come from the same distribution. Scored model: the run's published
weights (best on validation when the run kept them, else the final ones).

The AUC is the Mann-Whitney statistic computed from ranks (average ranks for ties), no sklearn:

    AUC = (R_m - n_m (n_m + 1) / 2) / (n_m n_n)

with R_m the sum of the member scores' ranks among all scores (score = -loss), n_m and n_n the
numbers of member and non-member rows.

Where it runs: ``privacy: {membership_inference: true, rows: 200}`` in a run config measures it
at the end of the run into ``summary.json`` (``mia_*`` fields); ``fedpeft privacy RUN`` measures
a finished run folder and writes ``privacy.json`` beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedpeft.client import forward_logits
from fedpeft.peft.base import load_trainable_state

_MIA_STREAM = 0x6D6961  # keeps the row draw apart from every other seeded draw of a run


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_auc(positives: Iterable[float], negatives: Iterable[float]) -> float:
    """The ROC AUC of scores where higher means "positive": P(pos > neg) + P(pos = neg) / 2."""
    pos = np.asarray(list(positives), dtype=np.float64)
    neg = np.asarray(list(negatives), dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("an AUC needs at least one positive and one negative score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("an AUC needs finite scores")
    ranks = average_ranks(np.concatenate([pos, neg]))
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def attack_auc(member_losses: Iterable[float], nonmember_losses: Iterable[float]) -> float:
    """AUC of the loss-threshold attack: a lower loss says "member"."""
    return roc_auc(-np.asarray(list(member_losses)), -np.asarray(list(nonmember_losses)))


@torch.no_grad()
def row_losses(job, data, rows: np.ndarray) -> np.ndarray:
    """The cross-entropy of the job's model (as the global model is scored) on each of ``rows``
    of ``data``, in the order given."""
    model, method = job.model, job.method
    model.eval()
    method.prepare_eval(model, None, None)
    rows = np.asarray(rows)
    order = np.argsort(data.lengths[rows].numpy(), kind="stable")  # little padding per batch
    losses = np.empty(len(rows), dtype=np.float64)
    size = job.config.eval_batch_size
    for start in range(0, len(rows), size):
        picked = order[start : start + size]
        batch = data.batch(rows[picked])
        method.condition(model, batch, rows[picked], training=False, cid=None)
        logits = forward_logits(model, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        losses[picked] = loss.numpy()
    return losses


def participants(history: list[dict[str, Any]], up_to: int | None = None) -> list[int]:
    """Clients whose update the server took in at least one round of a run (its metrics rows),
    up to round ``up_to`` (None: every round): sampled, and neither dropped (crashed, past the
    deadline) nor rejected, so the model saw their rows."""
    taken = set()
    for row in history:
        if up_to is not None and row["round"] > up_to:
            continue
        left_out = {
            int(entry["cid"])
            for entry in [*(row.get("clients_dropped") or []), *(row.get("clients_rejected") or [])]
        }
        taken.update(int(cid) for cid in row.get("clients", []) if int(cid) not in left_out)
    return sorted(taken)


def best_round(history: list[dict[str, Any]]) -> int | None:
    """The round whose weights ``best.safetensors`` holds: the first of the best on validation."""
    scored = [row for row in history if row.get("val_accuracy") is not None]
    return max(scored, key=lambda row: row["val_accuracy"])["round"] if scored else None


def membership_inference(job, clients: Iterable[int], rows: int, seed: int) -> dict[str, Any]:
    """The attack on the job's model as it is now: ``rows`` member rows (from ``clients``'
    training rows) against as many test rows; fewer on both sides when either pool is smaller."""
    pool = np.concatenate(
        [np.asarray(job.partition.train[cid], dtype=np.int64) for cid in clients] or [[]]
    ).astype(np.int64)
    n = min(rows, len(pool), len(job.test))
    if n < 1:
        raise ValueError("membership inference needs member and test rows; there are none")
    rng = np.random.default_rng([seed, _MIA_STREAM])
    members = np.sort(rng.choice(pool, size=n, replace=False))
    nonmembers = np.sort(rng.choice(len(job.test), size=n, replace=False))
    member_losses = row_losses(job, job.train, members)
    nonmember_losses = row_losses(job, job.test, nonmembers)
    return {
        "mia_auc": attack_auc(member_losses, nonmember_losses),
        "mia_rows": int(n),
        "mia_member_loss": float(member_losses.mean()),
        "mia_nonmember_loss": float(nonmember_losses.mean()),
    }


def at_run_end(job, history: list[dict[str, Any]], best_path: Path) -> dict[str, Any]:
    """The attack on the run's published weights (best on validation when kept and loadable, else
    the final ones, which the job's model holds when this is called), for the summary."""
    from safetensors.torch import load_file

    weights = "final"
    if best_path.is_file():
        try:
            load_trainable_state(job.model, load_file(str(best_path)))
            weights = "best"
        except ValueError:  # a method that reshapes its modules (AutoFedNLP) grew past them
            pass
    clients = participants(history, best_round(history) if weights == "best" else None)
    scores = membership_inference(job, clients, job.config.privacy.rows, job.config.seed)
    return {**scores, "mia_weights": weights}


def measure_run(run_path: Path, which: str | None = None, rows: int = 200) -> dict[str, Any]:
    """``fedpeft privacy RUN``: the attack on a finished run folder's weights (best on validation
    by default), written to ``privacy.json`` in it and returned."""
    import json

    from safetensors.torch import load_file

    from fedpeft.config import load_config
    from fedpeft.export import ExportError, weights_path
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir, write_json

    if rows < 1:
        raise ValueError(f"--rows: {rows}; the attack needs at least 1 member row")
    run = RunDir.open(Path(run_path))
    config = load_config(run.config_path)
    if config.method == "local":
        raise ExportError("method local trains no global model: there is nothing to attack")
    if config.method == "autofednlp":
        raise ExportError(
            "method autofednlp grows its adapters during the run; set "
            "privacy.membership_inference: true in its config to measure at the end of the run"
        )
    path = weights_path(run.path, which)
    if not run.metrics_path.is_file():
        raise ExportError(f"{run.metrics_path} does not exist: no round of the run finished")
    lines = run.metrics_path.read_text().splitlines()
    history = [json.loads(line) for line in lines if line.strip()]
    job = build_job(config)
    try:
        load_trainable_state(job.model, load_file(str(path)))
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from None
    weights = path.stem.replace("weights", "final")
    clients = participants(history, best_round(history) if weights == "best" else None)
    result = {
        **membership_inference(job, clients, rows, config.seed),
        "mia_weights": weights,
    }
    write_json(run.path / "privacy.json", result)
    return result
