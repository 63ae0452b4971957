"""The study harness: resumable cells, learning rate chosen on validation, report helpers.

A study (``benchmarks/<name>.py``) declares a ``Study``: its filter keys, a ``grid(quick)`` that
lists every ``Cell`` in run order, and a ``report(results)`` that turns the finished cells into
page lines plus the headline figures programs read. ``main(study, ...)`` does the rest:

    fedpeft bench NAME                      # every cell, resumable
    fedpeft bench NAME --only KEY=V1,V2     # cells matching the study's declared keys
    fedpeft bench NAME --part 2/3           # every 3rd cell from the 2nd: sittings side by side
    fedpeft bench NAME --report-only        # rewrite the page from the cells there are

Every cell is an ordinary run folder under ``out``. A cell whose ``summary.json`` says complete
(and whose config still agrees with the grid on the keys the grid sets) is skipped; an unfinished
one resumes from its checkpoint, or restarts cleanly when it has none or its config changed. A
finished cell keeps only config.yaml, metrics.jsonl and summary.json, so the folder can be
committed. One failing cell is reported and left for the next sitting.

Learning rate. A cell with ``lr`` set is a candidate of its ``lr_group``; it is scored on
``best_val_accuracy`` (the server-held validation rows), never on test. A study cell with an
``lr_group`` runs with that group's winner (``lr_selection.json``); the lr cells a sitting's study
cells need run first.

The page is ``<out>.md`` beside ``out``, its plots ``<out>_*.png``, and the headline figures
``<out>.json`` (``write_headline_json``). The number published per cell is ``headline(summary)``:
the test accuracy of the round best on validation.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpeft.config import build_config, dump_config
from fedpeft.report import load_run
from fedpeft.runs import RunDir, RunDirError, write_text
from fedpeft.summary import headline as summary_headline

DASH = "—"
LR_SELECTION_FILE = "lr_selection.json"


# -- cells and studies ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Cell:
    """One run of a study. ``folder``: where it lives under ``out`` (its identity); ``keys``: what
    ``--only`` filters on and reports group by (``cell.method`` reads ``keys["method"]``);
    ``config(lr)``: its run config as a plain dict, given its lr (its own ``lr`` for an lr cell,
    its group's winner for a study cell, None when it has no ``lr_group``)."""

    folder: str
    keys: Mapping[str, Any]
    config: Callable[[float | None], dict[str, Any]] = field(repr=False)
    lr_group: str | None = None
    lr: float | None = None  # set: an lr-selection candidate of ``lr_group``

    @property
    def is_lr(self) -> bool:
        return self.lr is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "keys":
            raise AttributeError(name)
        try:
            return self.keys[name]
        except KeyError:
            raise AttributeError(f"cell {self.folder} has no key '{name}'") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and other.folder == self.folder

    def __hash__(self) -> int:
        return hash(self.folder)

    def matches(self, only: Mapping[str, Collection[str]]) -> bool:
        """Whether the cell passes ``--only`` filters (values compared as text; a key the cell
        does not have does not exclude it)."""
        return all(str(self.keys[k]) in values for k, values in only.items() if k in self.keys)

    def differs_only_by(self, key: str) -> tuple[tuple[str, Any], ...]:
        """The cell's keys without ``key``: cells with equal tuples differ only by ``key``."""
        return tuple((k, v) for k, v in self.keys.items() if k != key)


@dataclass
class Study:
    """What a study file declares. ``grid(quick)``: every cell, in run order; ``report(results)``:
    the page's lines and the headline figures (a JSON-able dict). Optional: ``out(quick)``, the
    cells' default folder (``benchmarks/results/<name>``; quick: ``runs/<name>_quick``), and
    ``stem(out)``, the name of the page, JSON and plots beside that folder (its name)."""

    name: str
    keys: tuple[str, ...]
    grid: Callable[[bool], list[Cell]]
    report: Callable[[Results], tuple[list[str], dict[str, Any]]]
    out: Callable[[bool], Path] | None = None
    stem: Callable[[Path], str] | None = None

    def default_out(self, quick: bool) -> Path:
        if self.out is not None:
            return Path(self.out(quick))
        return Path(f"runs/{self.name}_quick" if quick else f"benchmarks/results/{self.name}")

    def page_stem(self, out: Path) -> str:
        return out.name if self.stem is None else self.stem(out)


@dataclass
class Results:
    """What a report is written from: the grid and the cells finished under ``out``."""

    study: Study
    out: Path
    quick: bool
    cells: list[Cell]
    found: dict[Cell, dict[str, Any]]  # finished cells -> summary, plus "metrics" (per round)
    selection: dict[str, Any]  # lr_selection.json's content

    @property
    def page(self) -> Path:
        return self.out.parent / f"{self.study.page_stem(self.out)}.md"

    @property
    def json_path(self) -> Path:
        return self.out.parent / f"{self.study.page_stem(self.out)}.json"

    def plot_path(self, suffix: str) -> Path:
        return self.out.parent / f"{self.study.page_stem(self.out)}_{suffix}.png"

    @property
    def command(self) -> str:
        command = f"fedpeft bench {self.study.name}" + (" --quick" if self.quick else "")
        if self.out != self.study.default_out(False) and not self.quick:
            command += f" --out {self.out}"
        return command

    def expected(self, lr: bool = False) -> list[Cell]:
        """The grid's study cells (``lr=True``: its lr-selection cells)."""
        return [c for c in self.cells if c.is_lr == lr]

    def missing(self, lr: bool = False) -> list[Cell]:
        return [c for c in self.expected(lr) if c not in self.found]

    def select(self, lr: bool = False, **where: Any) -> dict[Cell, dict[str, Any]]:
        """Finished cells whose keys match ``where`` (a value, or a list/set/tuple of values)."""

        def ok(cell: Cell) -> bool:
            for key, wanted in where.items():
                value = cell.keys.get(key)
                if isinstance(wanted, list | set | tuple | frozenset):
                    if value not in wanted:
                        return False
                elif value != wanted:
                    return False
            return True

        return {c: v for c, v in self.found.items() if c.is_lr == lr and ok(c)}

    def index(self, keys: Iterable[str], lr: bool = False, **where: Any) -> dict[tuple, dict]:
        """Finished cells matching ``where``, by the tuple of their ``keys`` values."""
        keys = tuple(keys)
        return {tuple(c.keys.get(k) for k in keys): v for c, v in self.select(lr, **where).items()}

    def header(self, title: str, quick_note: str | None = None) -> list[str]:
        """The page's opening: title, the command that rewrites it, which cells are missing and,
        in quick mode, that the figures check plumbing only."""
        lines = [
            f"## {title}" + (" (quick)" if self.quick else ""),
            "",
            f"Command: `{self.command}` (resumable; split sittings with `--only KEY=V` / "
            "`--part I/N`, rewrite this page with `--report-only`). Grid and budget: "
            f"`benchmarks/{self.study.name}.py`.",
            "",
            *self.cells_line(),
        ]
        if self.quick:
            note = quick_note or (
                "Quick mode: the tiny random BERT on a few dozen rows per dataset — the figures "
                "check the plumbing only and say nothing about the methods."
            )
            lines += [note, ""]
        return lines

    def cells_line(self) -> list[str]:
        """How many cells are finished and which are missing, as one paragraph."""
        expected, missing = self.expected(), self.missing()
        lr_expected, lr_missing = self.expected(lr=True), self.missing(lr=True)
        names = ", ".join(c.folder for c in missing[:8]) + (", ..." if len(missing) > 8 else "")
        text = (
            f"Cells finished: {len(expected) - len(missing)} of {len(expected)} study cells, "
            f"{len(lr_expected) - len(lr_missing)} of {len(lr_expected)} lr-selection cells. "
            f"Missing: {len(missing)} study cells" + (f" ({names})" if missing else "")
        )
        return [text + f", {len(lr_missing)} lr cells; missing values show as {DASH}.", ""]


def parse_only(pairs: list[str] | None, keys: Iterable[str]) -> dict[str, set[str]]:
    """``["dataset=rte,sst2", "method=lora"]`` -> {"dataset": {"rte", "sst2"}, "method": {"lora"}};
    ``keys``: the study's declared filter keys."""
    keys = tuple(keys)
    only: dict[str, set[str]] = {}
    for pair in pairs or []:
        key, sep, values = pair.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--only expects KEY=V1[,V2] with KEY {'|'.join(keys)}, got '{pair}'")
        only.setdefault(key, set()).update(v.strip() for v in values.split(",") if v.strip())
    return only


def parse_part(part: str | None) -> tuple[int, int]:
    if not part:
        return 1, 1
    index, sep, total = part.partition("/")
    if not (sep and index.isdigit() and total.isdigit() and 1 <= int(index) <= int(total)):
        raise ValueError(f"--part expects I/N with 1 <= I <= N, got '{part}'")
    return int(index), int(total)


# -- one cell ------------------------------------------------------------------------------------
def _differs(stored: Any, wanted: Any) -> bool:
    """Whether ``stored`` disagrees with ``wanted`` on a key ``wanted`` has (the grid's own keys:
    a default the package adds later must not make every finished cell stale)."""
    if isinstance(wanted, dict):
        if not isinstance(stored, dict):
            return True
        return any(_differs(stored.get(key), value) for key, value in wanted.items())
    return stored != wanted


def cell_state(folder: Path, config_yaml: str, grid_keys: set[str] | None = None) -> str:
    """'done', 'missing', 'resumable', 'broken' (restart) or 'stale' (config changed: restart).

    ``grid_keys``: the top-level keys the study sets; only they are compared (all when None).
    """
    if not folder.exists():
        return "missing"
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        return "broken"
    try:
        stored = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        return "broken"
    wanted = yaml.safe_load(config_yaml)
    if grid_keys is not None:
        wanted = {key: value for key, value in wanted.items() if key in grid_keys}
    if _differs(stored, wanted):
        return "stale"
    summary_path = folder / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except json.JSONDecodeError:
        summary = {}
    if summary.get("complete"):
        return "done"
    try:
        if RunDir(folder).load_checkpoint() is not None:
            return "resumable"
    except (RunDirError, OSError, KeyError, ValueError):
        pass
    return "broken"


def _tidy(folder: Path) -> None:
    """A finished cell keeps config.yaml, metrics.jsonl and summary.json: small enough to commit."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    for name in ("checkpoint.json", "weights.safetensors", "best.safetensors"):
        (folder / name).unlink(missing_ok=True)


def run_cell(cell: Cell, folder: Path, config: dict[str, Any]) -> str:
    """Run (or skip, resume, restart) one cell; returns what happened."""
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job

    cfg = build_config(config)
    config_yaml = dump_config(cfg)
    state = cell_state(folder, config_yaml, set(config))
    if state == "done":
        _tidy(folder)
        return "skipped (done)"
    if state in ("broken", "stale"):
        shutil.rmtree(folder)
    started = time.perf_counter()
    run = RunDir.open(folder) if state == "resumable" else RunDir.create(folder, config_yaml)
    summary = EmbeddedEngine(build_job(cfg), run).run()
    _tidy(folder)
    score = summary.get("best_val_accuracy") if cell.is_lr else headline(summary)
    verb = {"resumable": "resumed", "missing": "ran"}.get(state, f"redid ({state})")
    scored = f"{'val' if cell.is_lr else 'test'} acc {DASH if score is None else f'{score:.3f}'}"
    return f"{verb} in {time.perf_counter() - started:.0f} s, {scored}"


# -- learning rate -------------------------------------------------------------------------------
def _finished_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("complete") else None


def select_lrs(out: Path, cells: Iterable[Cell]) -> dict[str, Any]:
    """Winners of the finished lr cells: best *validation* accuracy per group (test unread). A
    group has a winner once every one of its candidates is finished."""
    table: dict[str, dict[str, float | None]] = {}
    for cell in cells:
        if not cell.is_lr:
            continue
        summary = _finished_summary(out / cell.folder)
        score = summary.get("best_val_accuracy") if summary else None
        table.setdefault(str(cell.lr_group), {})[f"{cell.lr:g}"] = score
    winners = {}
    for group, scores in table.items():
        if scores and all(v is not None for v in scores.values()):
            winners[group] = float(max(scores, key=lambda lr: scores[lr]))
    return {"winners": winners, "validation_accuracy": table, "scored_on": "validation"}


def lr_for(cell: Cell, winners: Mapping[str, float]) -> float | None:
    """The lr a cell runs with: its own for an lr cell, else its group's winner (None: none yet,
    or the cell has no group)."""
    if cell.is_lr:
        return cell.lr
    return None if cell.lr_group is None else winners.get(str(cell.lr_group))


def lr_candidates(cells: Iterable[Cell]) -> dict[str, list[float]]:
    """Group -> its candidate lrs, in grid order."""
    grid: dict[str, list[float]] = {}
    for cell in cells:
        if cell.is_lr:
            grid.setdefault(str(cell.lr_group), []).append(cell.lr)
    return grid


# -- a sitting -----------------------------------------------------------------------------------
def sitting(
    cells: list[Cell], only: Mapping[str, Collection[str]], index: int = 1, total: int = 1
) -> list[Cell]:
    """The cells one sitting runs, lr cells first: the study cells matching ``only``, every
    ``total``-th from the ``index``-th, and the lr cells they need; when ``only`` leaves no study
    cell (``phase=lr``), the lr cells matching it."""
    selected = [c for c in cells if c.matches(only)]
    study = [c for c in selected if not c.is_lr][index - 1 :: total]
    needed = {c.lr_group for c in study if c.lr_group is not None}
    only_lr = not any(not c.is_lr for c in selected)
    lr_cells = [
        c for c in cells if c.is_lr and (c.lr_group in needed or (only_lr and c in selected))
    ]
    return lr_cells + study


def run_cells(out: Path, cells: list[Cell], todo: list[Cell], label: str = "") -> list[str]:
    """Run ``todo`` (lr cells first) under ``out``; ``cells`` is the whole grid, whose lr cells
    decide the winners. Returns one line per cell, also printed as it finishes."""
    lr_count = sum(c.is_lr for c in todo)
    print(f"{label}: {len(todo)} cells ({lr_count} lr selection) under {out}")
    has_lr = any(c.is_lr for c in cells)
    lines = []
    for i, cell in enumerate(todo, 1):
        if has_lr and i == lr_count + 1:  # the lr phase is over: record its winners
            write_json(out / LR_SELECTION_FILE, select_lrs(out, cells))
        lr = lr_for(cell, select_lrs(out, cells)["winners"] if has_lr else {})
        if not cell.is_lr and cell.lr_group is not None and lr is None:
            what = f"no lr selected yet for {cell.lr_group}"
        else:
            try:
                what = run_cell(cell, out / cell.folder, cell.config(lr))
            except Exception:  # one failing cell must not end a sitting of hours
                what = "FAILED (left for the next sitting):\n" + traceback.format_exc(limit=3)
        lines.append(f"  [{i}/{len(todo)}] {cell.folder}: {what}")
        print(lines[-1], flush=True)
    return lines


def load_cells(out: Path, cells: Iterable[Cell]) -> dict[Cell, dict[str, Any]]:
    """Finished cells (in grid order) -> summary plus ``metrics``, the per-round rows."""
    found = {}
    for cell in cells:
        folder = out / cell.folder
        if not (folder / "summary.json").is_file():
            continue
        record = load_run(folder)
        if record.summary and record.summary.get("complete"):
            found[cell] = {**record.summary, "metrics": record.metrics}
    return found


def write_report(study: Study, out: Path, quick: bool, cells: list[Cell]) -> Path:
    """The page and the headline JSON from whatever cells are finished (the rest shows as —).
    A page is not replaced by one without any finished cell (their folder may be elsewhere)."""
    found = load_cells(out, cells)
    results = Results(study, out, quick, cells, found, select_lrs(out, cells))
    if not found and results.page.is_file():
        print(f"no finished cells under {out}: {results.page} left as it is")
        return results.page
    lines, data = study.report(results)
    results.page.parent.mkdir(parents=True, exist_ok=True)
    write_text(results.page, "\n".join(lines) + "\n")
    summary = {
        "study": study.name,
        "quick": quick,
        "headline": "test_accuracy_at_best_val",
        "cells": {
            "study": len(results.expected()),
            "study_missing": len(results.missing()),
            "lr": len(results.expected(lr=True)),
            "lr_missing": len(results.missing(lr=True)),
        },
    }
    write_headline_json(results.json_path, {**summary, **data})
    return results.page


def main(
    study: Study,
    quick: bool = False,
    out: Path | None = None,
    only: list[str] | None = None,
    part: str | None = None,
    report_only: bool = False,
) -> Path:
    """Run a sitting's cells (lr selection first), then rewrite the page from every cell."""
    out = Path(out or study.default_out(quick))
    filters = parse_only(only, study.keys)
    index, total = parse_part(part)
    cells = study.grid(quick)
    started = time.perf_counter()
    if not report_only:
        run_cells(out, cells, sitting(cells, filters, index, total), study.name)
    if any(c.is_lr for c in cells):  # every group's winner, whatever --only ran
        write_json(out / LR_SELECTION_FILE, select_lrs(out, cells))
    page = write_report(study, out, quick, cells)
    print(f"sitting: {duration(time.perf_counter() - started)}")
    print(f"report: {page}")
    return page


def cli(study: Study, doc: str | None = None) -> None:
    """``python benchmarks/<study>.py [--quick] [--out DIR] [--only K=V] [--part I/N] ...``."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or study.name).splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--only", action="append", metavar="KEY=V1[,V2]")
    parser.add_argument("--part", metavar="I/N")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out) if args.out else None
    main(study, args.quick, out, args.only, args.part, args.report_only)


# -- files ---------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    from fedpeft.runs import write_json as atomic_json

    atomic_json(path, data)


def write_headline_json(path: Path, data: Mapping[str, Any]) -> Path:
    """A study's headline figures beside its page, for programs: strict JSON (no NaN), written
    atomically, keys in the order given."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
    return path


# -- figures of a cell ---------------------------------------------------------------------------
def headline(summary: Mapping[str, Any] | None) -> float | None:
    """The accuracy a study publishes for a cell: test accuracy at the round best on validation;
    without validation rows, the final round's test accuracy. Never a maximum over test rounds."""
    return None if summary is None else summary_headline(dict(summary))


def per_client_round(summary: Mapping[str, Any]) -> float:
    """Bytes one client sends and receives in one round."""
    up_down = summary["bytes_up_per_round"] + summary["bytes_down_per_round"]
    return up_down / summary["clients_per_round"]


def cell_figures(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A cell's headline figures for the JSON: accuracy, bytes per client per round, trainable
    parameters (None for a missing cell)."""
    if summary is None:
        return None
    return {
        "accuracy": headline(summary),
        "bytes_per_client_round": per_client_round(summary),
        "trainable_params": summary["trainable_params"],
    }


def curve(summary: Mapping[str, Any], x: Callable[[dict[str, Any]], float]) -> tuple[list, list]:
    """A cell's test accuracy (%) per evaluated round against ``x(row)``, for a ``Panel``."""
    rows = [row for row in summary["metrics"] if row.get("accuracy") is not None]
    return [x(row) for row in rows], [100 * row["accuracy"] for row in rows]


def cumulative_mb(row: Mapping[str, Any]) -> float:
    """Megabytes exchanged (up and down, all clients) by the end of a round: an x for ``curve``."""
    return (row["bytes_up_total"] + row["bytes_down_total"]) / 1e6


def first_reaching(metrics: list[dict[str, Any]], target: float | None) -> dict | None:
    """The first round whose test accuracy reached ``target`` (None: never, or no target)."""
    if target is None:
        return None
    for row in metrics:
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return row
    return None


# -- seeds ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Mean and spread of one figure over seeds; ``std`` is the sample std (n - 1), None for one."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def text(self, scale: float = 100, digits: int = 1) -> str:
        """``80.0 ± 10.0 (70.0-90.0, n=3)``; one seed: ``80.0 (n=1)``."""
        mean = f"{scale * self.mean:.{digits}f}"
        if self.std is None:
            return f"{mean} (n=1)"
        lo, hi = f"{scale * self.min:.{digits}f}", f"{scale * self.max:.{digits}f}"
        return f"{mean} ± {scale * self.std:.{digits}f} ({lo}-{hi}, n={self.n})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "n": self.n,
        }


def by_seed(
    found: Mapping[Cell, Mapping[str, Any]],
    value: str | Callable[[Mapping[str, Any]], float | None] = headline,
    seed_key: str = "seed",
) -> dict[tuple[tuple[str, Any], ...], Spread]:
    """Cells that differ only by ``seed_key``, grouped (by their other keys, in grid order), with
    the mean and spread of ``value``: a summary field's name or a function of the summary.
    Cells where the value is missing are left out; a group with no value is absent."""
    read = value if callable(value) else (lambda summary: summary.get(value))
    groups: dict[tuple[tuple[str, Any], ...], list[float]] = {}
    for cell, summary in found.items():
        figure = read(summary)
        if figure is not None:
            groups.setdefault(cell.differs_only_by(seed_key), []).append(float(figure))
    return {key: Spread(tuple(values)) for key, values in groups.items()}


# -- text ----------------------------------------------------------------------------------------
def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: float | None) -> str:
    if n is None:
        return DASH
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def half_width(accuracy: float, rows: int) -> float:
    """Half-width in points of the normal-approximation 95% interval of an accuracy on ``rows``."""
    return 100 * 1.96 * (accuracy * (1 - accuracy) / rows) ** 0.5


VERDICTS = {True: "agrees", False: "differs", None: "undecided"}


def verdict(agree: bool | None) -> str:
    """A check against the paper, as the page says it."""
    return {True: "**agrees**", False: "**differs**", None: "undecided (cells missing)"}[agree]


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A markdown table: header line, rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def tables(
    titles: Iterable[Any],
    rows: Iterable[Any],
    columns: Iterable[Any],
    text: Callable[[Any, Any, Any], str],
    column_label: Callable[[Any], str] = str,
    corner: str = "method",
) -> list[str]:
    """One rows x columns table per title (e.g. per dataset, methods x skews), each under its
    **title**; ``text(title, row, column)`` fills a cell."""
    rows, columns = list(rows), list(columns)
    lines: list[str] = []
    for title in titles:
        body = [[str(row), *(text(title, row, col) for col in columns)] for row in rows]
        header = [corner, *map(column_label, columns)]
        lines += [f"**{title}**", "", *table(header, body), ""]
    return lines


def lr_table(results: Results, groups: list[str], intro: str) -> list[str]:
    """Validation accuracy per candidate lr and group, the winner in bold."""
    selection, grid = results.selection, lr_candidates(results.cells)
    width = max(len(grid.get(g, [])) for g in groups)
    rows = []
    for group in groups:
        scores = selection["validation_accuracy"].get(group, {})
        winner = selection["winners"].get(group)
        row = []
        for lr in grid.get(group, []):
            text = f"{lr:g}: {pct(scores.get(f'{lr:g}'))}"
            row.append(f"**{text}**" if winner == lr else text)
        row += [""] * (width - len(row))
        rows.append([group, *row, DASH if winner is None else f"{winner:g}"])
    header = ["method", *(f"lr {i + 1}" for i in range(width)), "chosen"]
    return ["### Learning rate chosen on validation", "", intro, "", *table(header, rows), ""]


def comm_table(
    summaries: Mapping[str, Mapping[str, Any] | None],
    reference: str,
    intro: str,
    paper_params: Mapping[str, float] | None = None,
    paper_saving: Mapping[str, str] | None = None,
) -> list[str]:
    """Trainable parameters and bytes per client per round of one cell per method, and the saving
    against ``reference`` (its bytes / the method's); the paper's columns when given."""
    ref = summaries.get(reference)
    rows = []
    for method, ours in summaries.items():
        per_client = per_client_round(ours) if ours else None
        row = [
            method,
            count(ours["trainable_params"]) if ours else DASH,
            f"{100 * ours['trainable_params'] / ours['total_params']:.2f}%" if ours else DASH,
        ]
        if paper_params is not None:
            row.append(count(paper_params.get(method)))
        row += [
            fmt_bytes(per_client),
            f"{per_client_round(ref) / per_client:.0f}x" if ours and ref else DASH,
        ]
        if paper_saving is not None:
            row.append(paper_saving.get(method, "1x" if method == reference else DASH))
        rows.append(row)
    header = ["method", "trainable (ours)", "share of model"]
    header += ["trainable (paper)"] if paper_params is not None else []
    header += ["bytes / client / round", f"saving vs {reference} (ours)"]
    header += [f"saving vs {reference} (paper)"] if paper_saving is not None else []
    title = "### Trainable parameters and communication"
    return [title, "", intro, "", *table(header, rows), ""]


def cost_lines(found: Mapping[Cell, Mapping[str, Any]], group: Callable[[Cell], str]) -> list[str]:
    """What the finished cells cost: median wall time per ``group(cell)``, from their summaries."""
    groups: dict[str, list[float]] = {}
    for cell, summary in found.items():
        wall = summary.get("wall_time_total_s")
        if wall:
            groups.setdefault(group(cell), []).append(wall)
    if not groups:
        return []
    parts = [
        f"{key} {sorted(walls)[len(walls) // 2]:.0f} s (n={len(walls)})"
        for key, walls in sorted(groups.items())
    ]
    total = sum(w for walls in groups.values() for w in walls)
    return [
        "Measured cost, median wall time of a cell: "
        + ", ".join(parts)
        + f". All {sum(len(w) for w in groups.values())} finished cells: {duration(total)} "
        "of run time together (sittings may run parts side by side; see BENCHMARKS.md for how "
        "this grid was run).",
        "",
    ]


# -- checks against a paper -----------------------------------------------------------------------
class Checks:
    """A study's checks against its paper: the page's lines and, by name, each check's verdict
    ("agrees", "differs", "undecided") and figures for the headline JSON."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.data: dict[str, Any] = {}

    def add(self, name: str, line: str, agree: bool | None, **figures: Any) -> None:
        self.lines.append(line)
        self.data[name] = {"verdict": VERDICTS[agree], **figures}


# -- plots ---------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One subplot of lines: ``lines`` maps a label to its (xs, ys); empty series are skipped."""

    title: str
    xlabel: str
    lines: Mapping[str, tuple[Iterable[float], Iterable[float]]]
    xticks: tuple[list[float], list[str]] | None = None
    xscale: str | None = None


def line_panels(path: Path, panels: list[Panel], ylabel: str = "test accuracy (%)") -> Path:
    """Panels side by side, points marked, one legend; saved atomically to ``path``."""
    fig = figure(len(panels))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, (xs, ys) in panel.lines.items():
            xs, ys = list(xs), list(ys)
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
        if panel.xticks is not None:
            ax.set_xticks(*panel.xticks)
        if panel.xscale is not None:
            ax.set_xscale(panel.xscale)
        label(ax, panel.title, panel.xlabel, ylabel)
    return finish(fig, path)


def figure(panels: int, width: float = 4.2, height: float = 3.6) -> Figure:
    """A figure of ``panels`` subplots side by side, drawn without a display."""
    fig = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(fig)
    return fig


def label(ax, title: str, xlabel: str, ylabel: str = "test accuracy (%)") -> None:
    """Title, axis labels and grid of one subplot."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def finish(fig: Figure, path: Path) -> Path:
    """One legend (on the first subplot with lines), tight layout, atomic save."""
    if any(ax.lines for ax in fig.axes):
        next(ax for ax in fig.axes if ax.lines).legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path
