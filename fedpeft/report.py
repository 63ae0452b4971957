"""Read run folders back and compare them in one markdown table (plus overlay plots).

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one object per round) and, once the run has
finished, ``summary.json``. Reports must also work on a run that is still going or was killed, so
every figure in the table falls back from the summary to what metrics and config say so far, and
such runs are flagged "incomplete". Problems are one line that names the file (``ReportError``).

The accuracy a table shows is ``fedpeft.summary.headline``: test accuracy at the round that is best
on validation, or the final round's when a run had no validation (said in the cell). The maximum
over test rounds (``oracle_best_test_accuracy``, ``best_accuracy`` in older run folders) picks a
round by looking at the test set, so no table shows it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedpeft.plots import plot_overlay

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"

_DASH = "—"


class ReportError(ValueError):
    """A run folder that cannot be read, said in one line that names the file."""


@dataclass
class RunRecord:
    """One run as read from disk; ``summary`` is None until the run has finished."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    complete: bool


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not valid YAML") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping of keys to values")
    return data


def _read_metrics(path: Path, run_finished: bool) -> list[dict[str, Any]]:
    """One object per line. An unterminated last line of an unfinished run is still being
    written by the trainer, so it is skipped rather than reported as corrupt."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            in_flight = number == len(lines) and not text.endswith("\n") and not run_finished
            if in_flight:
                break
            raise ReportError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def load_run(path: Path) -> RunRecord:
    """Read a run folder; raises ReportError when ``path`` is not one or a file is malformed."""
    path = Path(path)
    if not (path / METRICS_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        raise ReportError(f"{path}: not a fedpeft run folder (no {METRICS_FILE} or {CONFIG_FILE})")
    config = _read_config(path / CONFIG_FILE)
    summary = _read_summary(path / SUMMARY_FILE)
    # the trainer rewrites summary.json after every round; "complete" says whether it is final
    complete = summary is not None and summary.get("complete", True) is not False
    metrics = _read_metrics(path / METRICS_FILE, run_finished=complete)
    name = (summary or {}).get("name") or config.get("name") or path.name
    return RunRecord(path, str(name), config, metrics, summary, complete=complete)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _last_value(metrics: list[dict[str, Any]], key: str) -> Any:
    return next((row[key] for row in reversed(metrics) if row.get(key) is not None), None)


def _mean(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in metrics if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def _sum(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in metrics if row.get(key) is not None]
    return sum(values) if values else None


def _derived_target(
    metrics: list[dict[str, Any]], target: float | None
) -> tuple[int | None, float | None]:
    """First round (and simulated time) at which accuracy reached the target, if it did."""
    if target is None:
        return None, None
    sim_time = 0.0
    for row in metrics:
        sim_time += row.get("sim_time_s") or 0.0
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return row.get("round"), _first(row.get("sim_time_total_s"), sim_time)
    return None, None


def run_facts(run: RunRecord) -> dict[str, Any]:
    """The summary's fields, each filled from metrics and config when the summary lacks it.

    Also adds ``rounds_planned`` and ``clients_per_round`` from the config.
    """
    summary, config, metrics = run.summary or {}, run.config, run.metrics
    evaluated = [row for row in metrics if row.get("accuracy") is not None]
    with_val = [row for row in evaluated if row.get("val_accuracy") is not None]
    chosen = max(with_val, key=lambda row: row["val_accuracy"], default=None)  # first of equals
    clients = [len(row["clients"]) for row in metrics if isinstance(row.get("clients"), list)]
    target = _first(summary.get("target_accuracy"), config.get("target_accuracy"))
    rounds_to_target, time_to_target = _derived_target(metrics, target)
    derived = {
        "name": run.name,
        "method": config.get("method"),
        "dataset": config.get("dataset"),
        "algorithm": config.get("algorithm"),
        "partition": config.get("partition"),
        "alpha": config.get("alpha"),
        "num_clients": config.get("num_clients"),
        "rounds_completed": _first(_last_value(metrics, "round"), 0),
        "best_val_accuracy": chosen["val_accuracy"] if chosen else None,
        "best_val_round": chosen.get("round") if chosen else None,
        "test_accuracy_at_best_val": chosen["accuracy"] if chosen else None,
        "final_accuracy": _last_value(metrics, "accuracy"),
        "final_macro_f1": _last_value(metrics, "macro_f1"),
        "bytes_up_per_round": _mean(metrics, "bytes_up"),
        "bytes_down_per_round": _mean(metrics, "bytes_down"),
        "bytes_up_total": _first(_last_value(metrics, "bytes_up_total"), _sum(metrics, "bytes_up")),
        "bytes_down_total": _first(
            _last_value(metrics, "bytes_down_total"), _sum(metrics, "bytes_down")
        ),
        "sim_time_total_s": _first(
            _last_value(metrics, "sim_time_total_s"), _sum(metrics, "sim_time_s")
        ),
        "wall_time_total_s": _first(
            _last_value(metrics, "wall_time_total_s"), _sum(metrics, "wall_time_s")
        ),
        "target_accuracy": target,
        "rounds_to_target": rounds_to_target,
        "sim_time_to_target_s": time_to_target,
        "total_params": None,
        "uploading_clients_per_round": sum(clients) / len(clients) if clients else None,
    }
    # A finished run's summary is authoritative, nulls included ("target not reached").
    facts = {key: summary[key] if key in summary else value for key, value in derived.items()}
    for key, value in summary.items():
        facts.setdefault(key, value)
    facts["rounds_planned"] = config.get("rounds")
    facts["clients_per_round"] = config.get("clients_per_round")
    facts["model"] = config.get("model")
    if facts.get("uploading_clients_per_round") is None:
        facts["uploading_clients_per_round"] = facts["clients_per_round"]
    return facts


def human_count(n: float | None) -> str:
    """Parameter counts as people say them: 950, 150k, 1.2M, 7.0B."""
    if n is None:
        return _DASH
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            scaled = n / limit
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{n:.0f}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return _DASH
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _megabytes(n: float | None) -> str:
    if n is None:
        return _DASH
    mb = n / 1e6
    if mb >= 100:
        return f"{mb:.0f}"
    if mb >= 1:
        return f"{mb:.2f}"
    return f"{mb:.3g}"


def _percent(fraction: float | None) -> str:
    return _DASH if fraction is None else f"{100 * fraction:.1f}%"


def _ratio(reference: float | None, value: float | None) -> str:
    """How many times fewer bytes than the reference: 140x, 3.5x, 1.0x."""
    if not reference or not value:
        return _DASH
    ratio = reference / value
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _partition(facts: dict[str, Any]) -> str:
    """Alpha only means something for the skewed partitions."""
    partition = facts.get("partition") or _DASH
    if partition in ("dirichlet", "quantity") and facts.get("alpha") is not None:
        return f"{partition}({facts['alpha']:g})"
    return str(partition)


def _clients(facts: dict[str, Any]) -> str:
    total, per_round = facts.get("num_clients"), facts.get("clients_per_round")
    if total is None:
        return _DASH
    return f"{per_round}/{total}" if per_round is not None else str(total)


def _rounds(facts: dict[str, Any], complete: bool) -> str:
    done, planned = facts.get("rounds_completed"), facts.get("rounds_planned")
    if not complete and planned is not None:
        return f"{done}/{planned}"
    return str(done)


def _headline(facts: dict[str, Any]) -> str:
    """Test accuracy at the best-on-validation round, with that round; else the final one."""
    from fedpeft.summary import headline

    value = _percent(headline(facts))
    if value == _DASH:
        return value
    round_ = facts.get("best_val_round")
    return f"{value} (r{round_})" if round_ is not None else f"{value} (no validation)"


def _to_target(facts: dict[str, Any]) -> tuple[str, str]:
    if facts.get("target_accuracy") is None:
        return _DASH, _DASH
    if facts.get("rounds_to_target") is None:
        return "not reached", _DASH
    return str(facts["rounds_to_target"]), human_duration(facts.get("sim_time_to_target_s"))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


HEADLINE_COLUMN = "test acc @ best val"
_HEADER = (
    "run",
    "method",
    "algorithm",
    "partition",
    "clients (round/total)",
    "rounds",
    HEADLINE_COLUMN,
    "final acc",
    "macro-F1",
    "trainable params",
    "MB up/round",
    "comm. saving vs full",
    "rounds to target",
    "sim time to target",
    "wall time",
)


def _reference_full(facts_by_run: list[dict[str, Any]]) -> float | None:
    """Upload per round of the first ``full`` fine-tuning run in the set, the baseline."""
    for facts in facts_by_run:
        if facts.get("method") == "full" and facts.get("bytes_up_per_round"):
            return facts["bytes_up_per_round"]
    return None


FP32_BYTES = 4


def estimated_full_upload(facts: dict[str, Any]) -> float | None:
    """Bytes per round full fine-tuning of the run's model would upload: every parameter of
    backbone and head (``total_params``) in fp32 from each client that uploaded."""
    total, clients = facts.get("total_params"), facts.get("uploading_clients_per_round")
    if not total or not clients:
        return None
    return total * FP32_BYTES * clients


def _saving(facts: dict[str, Any], full_up: float | None) -> str:
    """Measured against the set's full run, else estimated from the run's parameter count."""
    if full_up is not None:
        return _ratio(full_up, facts.get("bytes_up_per_round"))
    ratio = _ratio(estimated_full_upload(facts), facts.get("bytes_up_per_round"))
    return ratio if ratio == _DASH else f"{ratio} (est.)"


def comparison_table(runs: list[RunRecord]) -> str:
    """A markdown table, one row per run, with savings relative to the ``full`` run if present
    (else estimated from each run's parameter count, marked "est.")."""
    all_facts = [run_facts(run) for run in runs]
    full_up = _reference_full(all_facts)
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for run, facts in zip(runs, all_facts, strict=True):
        name = run.name if run.complete else f"{run.name} (incomplete)"
        rounds_to, time_to = _to_target(facts)
        row = (
            name,
            facts.get("method") or _DASH,
            facts.get("algorithm") or _DASH,
            _partition(facts),
            _clients(facts),
            _rounds(facts, run.complete),
            _headline(facts),
            _percent(facts.get("final_accuracy")),
            _percent(facts.get("final_macro_f1")),
            human_count(facts.get("trainable_params")),
            _megabytes(facts.get("bytes_up_per_round")),
            _saving(facts, full_up),
            rounds_to,
            time_to,
            human_duration(facts.get("wall_time_total_s")),
        )
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(lines) + "\n"


def mismatch_warnings(runs: list[RunRecord]) -> list[str]:
    """One line for each of dataset and model on which the compared runs differ."""
    warnings = []
    all_facts = [run_facts(run) for run in runs]
    for key, what in (("dataset", "datasets"), ("model", "models")):
        values = sorted({str(f.get(key)) for f in all_facts if f.get(key) is not None})
        if len(values) > 1:
            warnings.append(
                f"Warning: these runs use different {what} ({', '.join(values)}); "
                "their figures are not comparable."
            )
    return warnings


def _notes(runs: list[RunRecord]) -> list[str]:
    notes = mismatch_warnings(runs)
    all_facts = [run_facts(run) for run in runs]
    notes.append(
        f"{HEADLINE_COLUMN}: test accuracy at the round with the best validation accuracy "
        "(round in brackets); runs without validation show their final round's test accuracy."
    )
    if _reference_full(all_facts) is None and any(
        estimated_full_upload(f) and f.get("bytes_up_per_round") for f in all_facts
    ):
        notes.append(
            "comm. saving vs full (est.): no full fine-tuning run is in this report, so its "
            "upload is estimated as every parameter of backbone and head in fp32 from each "
            "client, not measured."
        )
    targets = sorted({f["target_accuracy"] for f in all_facts if f["target_accuracy"]})
    if targets:
        notes.append("Target accuracy: " + ", ".join(_percent(t) for t in targets) + ".")
    incomplete = [run.name for run in runs if not run.complete]
    if incomplete:
        notes.append(
            "Incomplete (still running or stopped before its last round; figures so far): "
            + ", ".join(incomplete)
            + "."
        )
    return notes


def _unique_labels(runs: list[RunRecord]) -> list[str]:
    """Run names as plot labels, numbered where two runs share a name."""
    seen: dict[str, int] = {}
    labels = []
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        labels.append(run.name if seen[run.name] == 1 else f"{run.name} ({seen[run.name]})")
    return labels


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def report(paths: list[Path], out_dir: Path | None = None) -> str:
    """Load the runs and return the markdown report.

    With ``out_dir``, also write ``report.md`` and the overlay plots there (linked from the report).
    """
    if not paths:
        raise ReportError("no run folders given")
    runs = [load_run(Path(path)) for path in paths]
    parts = ["# fedpeft report", "", comparison_table(runs)]
    notes = _notes(runs)
    if notes:
        parts += ["\n".join(notes), ""]
    if out_dir is not None:
        out_dir = Path(out_dir)
        labelled = [
            (label, run.metrics) for label, run in zip(_unique_labels(runs), runs, strict=True)
        ]
        for plot in plot_overlay(labelled, out_dir):
            parts += [f"![{plot.stem.replace('_', ' ')}]({plot.name})", ""]
    markdown = "\n".join(parts)
    if out_dir is not None:
        _write_atomic(out_dir / REPORT_FILE, markdown)
    return markdown
