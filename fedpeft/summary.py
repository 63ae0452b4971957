"""Headline figures of a run, derived from its per-round metrics (the same for every engine).

The number fedpeft publishes for a run is ``test_accuracy_at_best_val``: the test accuracy of
the round whose *validation* accuracy is best (ties: the earliest such round). A round is never
picked by looking at test accuracy; the maximum over test rounds is kept only as
``oracle_best_test_accuracy``, a name that says it is an oracle, and no table shows it. Without
validation rows (``validation_size: 0``) the headline falls back to the final round's test
accuracy and says so (``headline_source``).

Rounds, bytes and simulated time *to a target* use test accuracy, as before: they answer "when
did the global model first reach X on the test set", not "which round do we publish".
"""

from __future__ import annotations

from typing import Any

from fedpeft.config import RunConfig


def _first_reaching(history: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    if target is None:
        return None
    for row in history:
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return row
    return None


def summarise(
    config: RunConfig,
    history: list[dict[str, Any]],
    trainable_params: int,
    total_params: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    evaluated = [row for row in history if row.get("accuracy") is not None]
    best = max(evaluated, key=lambda row: row["accuracy"], default=None)
    final = evaluated[-1] if evaluated else None
    last = history[-1] if history else {}
    rounds = len(history)
    hit = _first_reaching(history, config.target_accuracy)
    summary: dict[str, Any] = {
        "name": config.run_name(),
        "method": config.method,
        "dataset": config.dataset,
        "algorithm": config.algorithm,
        "partition": config.partition,
        "alpha": config.alpha,
        "num_clients": config.num_clients,
        "clients_per_round": config.clients_per_round,
        "rounds_planned": config.rounds,
        "rounds_completed": rounds,
        "complete": rounds == config.rounds,
        "oracle_best_test_accuracy": best["accuracy"] if best else None,
        "oracle_best_test_round": best["round"] if best else None,
        "final_accuracy": final["accuracy"] if final else None,
        "final_macro_f1": final["macro_f1"] if final else None,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "bytes_up_per_round": last.get("bytes_up_total", 0) / rounds if rounds else 0,
        "bytes_down_per_round": last.get("bytes_down_total", 0) / rounds if rounds else 0,
        "bytes_up_total": last.get("bytes_up_total", 0),
        "bytes_down_total": last.get("bytes_down_total", 0),
        "sim_time_total_s": last.get("sim_time_total_s", 0.0),
        "wall_time_total_s": last.get("wall_time_total_s", 0.0),
        "target_accuracy": config.target_accuracy,
        "rounds_to_target": hit["round"] if hit else None,
        "sim_time_to_target_s": hit["sim_time_total_s"] if hit else None,
        "bytes_to_target": hit["bytes_up_total"] + hit["bytes_down_total"] if hit else None,
    }
    with_val = [row for row in evaluated if row.get("val_accuracy") is not None]
    if with_val:
        chosen = max(with_val, key=lambda row: row["val_accuracy"])  # first of equals
        summary.update(
            best_val_accuracy=chosen["val_accuracy"],
            best_val_round=chosen["round"],
            test_accuracy_at_best_val=chosen["accuracy"],
            test_macro_f1_at_best_val=chosen["macro_f1"],
            headline_source="test accuracy at the round best on validation",
        )
    else:
        summary.update(
            best_val_accuracy=None,
            best_val_round=None,
            test_accuracy_at_best_val=None,
            test_macro_f1_at_best_val=None,
            headline_source="final round's test accuracy (no validation rows)",
        )
    summary.update(extra or {})
    return summary


def headline(summary: dict[str, Any]) -> float | None:
    """The accuracy every table shows: test accuracy at the best-on-validation round, else (no
    validation) the final round's test accuracy. Never the maximum over test rounds."""
    value = summary.get("test_accuracy_at_best_val")
    if value is None and summary.get("best_val_round") is None:
        value = summary.get("final_accuracy")
    return value
