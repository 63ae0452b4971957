"""Benchmark: the FibecFed study (SPEC §4) — curriculum and sparse LoRA against LoRA FedAvg.

    python benchmarks/fibecfed.py                      # the whole grid, resumable (~3 h estimated)
    python benchmarks/fibecfed.py --only dataset=sst2  # one sitting's share; --part 2/3 splits more
    python benchmarks/fibecfed.py --report-only        # rewrite the page from the cells there are
    python benchmarks/fibecfed.py --quick              # tiny model, a small slice: plumbing only

Grid: sst2 and ag_news, Dirichlet label skew alpha 1 and 0.1, and per (dataset, skew) the runs

    fibecfed     every part on (curriculum, selected aggregation layers, sparse local update)
    lora         LoRA under FedAvg (the baseline; FedPETuning's lora)
    curriculum   the curriculum only (layer_selection and sparse off)
    sparse       the selected layers and the sparse update only (curriculum off)
    random       every part on, rows ranked randomly instead of by Fisher score
    full, adapter, prefix, bitfit   the other FedPETuning methods

The five LoRA-based runs use seeds 0 and 1 (their differences are the study's point); the other
FedPETuning methods one seed. Learning rates are the FedPETuning study's validation-only winners
(benchmarks/results/fedpetuning/lr_selection.json; FibecFed runs with LoRA's 1e-2): no lr phase
here. Setting as in the FedPETuning study: MiniLM-L6, 10 clients x 64 rows, 5 per round, 10
rounds, 1 local epoch, batch 32, max_seq_len 64, 200 validation rows, 400 test rows scored every
2 rounds. FibecFed: g0 0.5, root pacing, T_c 6 rounds, K 3 (re-scoring and layer re-selection),
N 3 of 6 layers, k 10% of the neurons, beta 0.9 (docs/fibecfed.md; all our choices).

Budget arithmetic (quiet 2-core machine, MiniLM-L6, batch 32 x seq 64: a LoRA train step ~1.0 s,
FedPETuning's docstring). Measured here on a loaded machine, as ratios to training on the same 64
rows: the vectorised Fisher pass ~1.2x (~2.4 s), the perturbation sensitivity on 64 rows ~0.85x
(~1.7 s). Per cell (ag_news; evaluation ~33 s as in the FedPETuning study):

    lora, adapter, prefix, bitfit   100 steps + eval                         ~133 s   (full ~163 s)
    fibecfed   curriculum ~95 steps + ~30 Fisher passes (each client re-scored every 3 rounds,
               ~3 times) x 2.4 s + 4 sensitivity rounds x 5 clients x 1.7 s + eval
               = 95 + 72 + 34 + 33                                           ~234 s
    curriculum 95 + 72 + 33 ~200 s;  sparse 100 + 72 + 34 + 33 ~239 s;  random ~234 s
    per (dataset, skew), seed 0: 907 (FibecFed runs) + 4 x 133 + 163       ~1,600 s
    seed 1 of the five LoRA-based runs: 907 + 133                         ~1,040 s
    ag_news, 2 skews: 2 x 2,640 = 5,280 s; sst2 (short rows: ~0.7)         ~3,700 s
    total ~8,980 s + job set-up and tokenisation                          ~2.6-3 h

Cells are run folders under ``--out`` (default ``benchmarks/results/fibecfed/``), named
``<dataset>/<run>-<skew>-s<seed>``; the page is ``<out>.md`` beside it, plots ``<out>_*.png``,
headline figures ``<out>.json``; missing cells show as "—".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import harness as h
from harness import DASH, Cell, Panel, Results, Study, headline, pct

# -- the grid ------------------------------------------------------------------------------------
# fmt: off
FIBECFED = {"g0": 0.5, "pacing": "root", "rounds_to_full": 6, "rescore_every": 3,
            "global_layers": 3, "top_neurons": 0.1, "beta": 0.9}
RUNS: dict[str, tuple[str, dict[str, Any]]] = {  # run -> (method, its settings or switches)
    "fibecfed": ("fibecfed", {}),
    "lora": ("lora", {"r": 8}),
    "curriculum": ("fibecfed", {"layer_selection": False, "sparse": False}),
    "sparse": ("fibecfed", {"curriculum": False}),
    "random": ("fibecfed", {"order": "random"}),
    "full": ("full", {}),
    "adapter": ("adapter", {"width": 64}),
    "prefix": ("prefix", {"num_virtual_tokens": 16}),
    "bitfit": ("bitfit", {}),
}
LORA_RUNS = ["fibecfed", "lora", "curriculum", "sparse", "random"]
LR = {"fibecfed": 1e-2, "lora": 1e-2, "curriculum": 1e-2, "sparse": 1e-2, "random": 1e-2,
      "full": 5e-4, "adapter": 1e-2, "prefix": 1e-2, "bitfit": 5e-3}  # FedPETuning's winners
SKEWS = {"a1": 1.0, "a0.1": 0.1}
COMMON: dict[str, Any] = {
    "model": "minilm", "rounds": 10, "local_epochs": 1, "batch_size": 32, "eval_batch_size": 128,
    "max_seq_len": 64, "optimizer": "adamw", "warmup_ratio": 0.1, "validation_size": 200,
    "max_test_samples": 400, "eval_every": 2, "partition": "dirichlet", "num_clients": 10,
    "clients_per_round": 5,
}
SETTINGS: dict[str, Any] = {
    "datasets": ["sst2", "ag_news"], "skews": list(SKEWS), "runs": list(RUNS),
    "seeds": {run: [0, 1] if run in LORA_RUNS else [0] for run in RUNS}, "rows_per_client": 64,
    "common": COMMON, "fibecfed": FIBECFED,
}
QUICK: dict[str, Any] = {  # tiny random BERT, a few dozen rows: plumbing, not accuracy
    **SETTINGS, "datasets": ["sst2"], "skews": ["a1"], "runs": [*LORA_RUNS, "bitfit"],
    "seeds": {run: [0] for run in RUNS}, "rows_per_client": 16,
    "common": {**COMMON, "model": "tiny", "rounds": 3, "batch_size": 8, "max_seq_len": 24,
               "num_clients": 4, "clients_per_round": 2, "validation_size": 24,
               "max_test_samples": 40, "eval_every": 1, "threads": 1},
    "fibecfed": {**FIBECFED, "rounds_to_full": 2, "rescore_every": 2, "global_layers": 1,
                 "sensitivity_rows": 8, "chunk_rows": 8},
}
TARGET_FRACTION = 0.95  # time-to-accuracy target: this share of LoRA FedAvg's accuracy
# fmt: on


def _settings(quick: bool) -> dict[str, Any]:
    return QUICK if quick else SETTINGS


# -- cells ---------------------------------------------------------------------------------------
def cell(dataset: str, run: str, skew: str, seed: int, quick: bool = False) -> Cell:
    keys = {"dataset": dataset, "run": run, "skew": skew, "seed": seed}
    folder = f"{dataset}/{run}-{skew}-s{seed}"
    return Cell(folder, keys, partial(cell_config, folder, keys, quick))


def grid(quick: bool = False) -> list[Cell]:
    """Seed 0 of everything first (a sitting cut short still covers the whole grid), then seed 1."""
    s = _settings(quick)
    seeds = sorted({seed for run in s["runs"] for seed in s["seeds"][run]})
    return [
        cell(d, run, k, seed, quick)
        for seed in seeds
        for d in s["datasets"]
        for k in s["skews"]
        for run in s["runs"]
        if seed in s["seeds"][run]
    ]


def _has_validation_split(dataset: str) -> bool:
    from fedpeft.paths import shared_data_dir

    return (shared_data_dir() / dataset / "validation.jsonl").is_file()


def cell_config(folder: str, keys: dict[str, Any], quick: bool, _lr: float | None) -> dict:
    """The run config of a cell, as a plain dict (validated by ``build_config``)."""
    s = _settings(quick)
    common, run = s["common"], keys["run"]
    train_rows = common["num_clients"] * s["rows_per_client"]
    if not _has_validation_split(keys["dataset"]):
        train_rows += common["validation_size"]  # held out of train by the job
    config = {**common, "name": folder.replace("/", "-"), "dataset": keys["dataset"]}
    config.update(alpha=SKEWS[keys["skew"]], seed=keys["seed"], lr=LR[run])
    method, settings = RUNS[run]
    config.update(max_train_samples=train_rows, method=method, lora={"r": 8})
    if method == "fibecfed":  # the study's FibecFed settings with the run's parts switched off
        config["fibecfed"] = {**s["fibecfed"], **settings}
    elif settings:
        config[method] = settings
    return config


# -- report --------------------------------------------------------------------------------------
def _skew_label(skew: str) -> str:
    return f"alpha {skew[1:]}"


def _spreads(r: Results, value) -> dict[tuple, h.Spread]:
    """(dataset, run, skew) -> the spread over seeds of ``value(cell, summary)`` (cells where it
    is None are left out)."""
    groups: dict[tuple, list[float]] = {}
    for cell, summary in r.found.items():
        figure = value(cell, summary)
        if figure is not None:
            groups.setdefault((cell.dataset, cell.run, cell.skew), []).append(float(figure))
    return {key: h.Spread(tuple(values)) for key, values in groups.items()}


def _time_to_target(accuracy: dict[tuple, h.Spread]):
    """(cell, summary) -> simulated seconds until test accuracy first reached the target of its
    (dataset, skew): TARGET_FRACTION of LoRA FedAvg's mean accuracy (None: not reached)."""

    def value(cell: Cell, summary: dict[str, Any]) -> float | None:
        base = accuracy.get((cell.dataset, "lora", cell.skew))
        if base is None:
            return None
        hit = h.first_reaching(summary["metrics"], TARGET_FRACTION * base.mean)
        return None if hit is None else hit["sim_time_total_s"]

    return value


def report(r: Results) -> tuple[list[str], dict[str, Any]]:
    s = _settings(r.quick)
    common = s["common"]
    accuracy = _spreads(r, lambda _cell, summary: headline(summary))
    up = _spreads(r, lambda _cell, m: m["bytes_up_per_round"] / m["clients_per_round"])
    sim = _spreads(r, lambda _cell, summary: summary["sim_time_total_s"])
    to_target = _spreads(r, _time_to_target(accuracy))
    lines = r.header("FibecFed: Fisher curriculum and sparse LoRA against LoRA FedAvg")
    lines += [
        f"Setting: {common['model']} (mean pooling), max_seq_len {common['max_seq_len']}, "
        f"{common['num_clients']} clients x {s['rows_per_client']} training rows, "
        f"{common['clients_per_round']} per round, {common['rounds']} rounds, 1 local epoch, batch "
        f"{common['batch_size']}, AdamW, FedAvg; {common['validation_size']} validation rows, "
        f"{common['max_test_samples']} test rows. Accuracy = test accuracy of the round best on "
        f"validation, mean ± std over seeds. FibecFed settings: {s['fibecfed']} (docs/fibecfed.md). "
        "Learning rates: the FedPETuning study's winners.",
        "",
        *h.cost_lines(r.found, lambda c: c.run),
        "### Accuracy (%)",
        "",
        *h.tables(
            s["datasets"],
            s["runs"],
            s["skews"],
            lambda d, run, k: _text(accuracy.get((d, run, k))),
            _skew_label,
            corner="run",
        ),
        "### Bytes up per client per round, and simulated time",
        "",
        "Mean over the run's rounds (round 1 of FibecFed uploads every layer, before any layer "
        "selection); simulated time includes the charged scoring passes (docs/cost_model.md). "
        f"Time to target: simulated seconds until test accuracy first reached {TARGET_FRACTION:.0%} "
        "of LoRA FedAvg's mean accuracy in the same dataset and skew ('no': never).",
        "",
        *h.tables(
            s["datasets"],
            s["runs"],
            s["skews"],
            lambda d, run, k: _cost_text(
                up.get((d, run, k)),
                sim.get((d, run, k)),
                to_target.get((d, run, k)),
                accuracy.get((d, run, k)),
            ),
            _skew_label,
            corner="run",
        ),
    ]
    checks = _checks(s, accuracy, up, to_target)
    lines += ["### Against the paper's claims", "", *checks.lines, ""]
    plot = _plot(r, s)
    if plot is not None:
        lines += [f"![accuracy against simulated time]({plot.name})", ""]
    data = {
        "runs": s["runs"],
        "cells": {
            d: {
                run: {
                    k: {
                        "accuracy": _dict(accuracy.get((d, run, k))),
                        "bytes_up_per_client_round": _dict(up.get((d, run, k))),
                        "sim_time_total_s": _dict(sim.get((d, run, k))),
                        "sim_time_to_target_s": _dict(to_target.get((d, run, k))),
                    }
                    for k in s["skews"]
                }
                for run in s["runs"]
            }
            for d in s["datasets"]
        },
        "checks": checks.data,
    }
    return lines, data


def _text(spread: h.Spread | None) -> str:
    return DASH if spread is None else spread.text()


def _dict(spread: h.Spread | None) -> dict[str, Any] | None:
    return None if spread is None else spread.as_dict()


def _cost_text(up, sim, to_target, accuracy) -> str:
    if up is None:
        return DASH
    target = "no" if to_target is None else h.duration(to_target.mean)
    if to_target is not None and accuracy is not None and to_target.n < accuracy.n:
        target += f" ({to_target.n} of {accuracy.n} seeds)"
    return f"{h.fmt_bytes(up.mean)}; {h.duration(sim.mean)}; to target {target}"


def _majority(pairs: list[tuple[float, float]], better) -> bool | None:
    """Whether ``better(ours, theirs)`` holds in most (dataset, skew) settings (None: none)."""
    if not pairs:
        return None
    return sum(better(a, b) for a, b in pairs) > len(pairs) / 2


def _pairs(spreads: dict, s: dict, ours: str, theirs: str) -> list[tuple[float, float]]:
    found = []
    for d in s["datasets"]:
        for k in s["skews"]:
            a, b = spreads.get((d, ours, k)), spreads.get((d, theirs, k))
            if a is not None and b is not None:
                found.append((a.mean, b.mean))
    return found


def _checks(s, accuracy, up, to_target) -> h.Checks:
    """The paper's claims (SPEC §4), each checked on the (dataset, skew) settings we ran."""
    checks = h.Checks()
    settings = len(s["datasets"]) * len(s["skews"])

    def add(name: str, claim: str, pairs, better, unit) -> None:
        agree = _majority(pairs, better) if len(pairs) == settings else None
        shown = ", ".join(f"{unit(a)} vs {unit(b)}" for a, b in pairs) or DASH
        checks.add(
            name,
            f"- {claim} Ours (per dataset and skew): {shown} — {h.verdict(agree)}.",
            agree,
            pairs=pairs,
        )

    add(
        "accuracy_vs_lora",
        "Paper: FibecFed is more accurate than LoRA FedAvg (up to +45.35 points).",
        _pairs(accuracy, s, "fibecfed", "lora"),
        lambda a, b: a >= b,
        pct,
    )
    add(
        "fewer_bytes_than_lora",
        "Expected by design: FibecFed uploads fewer bytes than LoRA FedAvg (N of the LoRA layers).",
        _pairs(up, s, "fibecfed", "lora"),
        lambda a, b: a < b,
        h.fmt_bytes,
    )
    add(
        "faster_to_target",
        "Paper: FibecFed fine-tunes faster (up to 98.61%); here: less simulated time to the target.",
        _pairs(to_target, s, "fibecfed", "lora"),
        lambda a, b: a < b,
        h.duration,
    )
    add(
        "fisher_beats_random_order",
        "Paper (ablation): Fisher ordering beats a random one.",
        _pairs(accuracy, s, "fibecfed", "random"),
        lambda a, b: a >= b,
        pct,
    )
    return checks


def _plot(r: Results, s: dict[str, Any]) -> Path | None:
    """Accuracy against simulated time, seed 0, the LoRA-based runs, one panel per setting."""
    panels = []
    for d in s["datasets"]:
        for k in s["skews"]:
            lines = {}
            for run in LORA_RUNS:
                found = r.select(dataset=d, run=run, skew=k, seed=0)
                if found:
                    summary = next(iter(found.values()))
                    xs, ys = h.curve(summary, lambda row: row["sim_time_total_s"])
                    lines[run] = (xs, [100 * y for y in ys])
            panels.append(Panel(f"{d}, {_skew_label(k)}", "simulated time (s)", lines))
    if not any(p.lines for p in panels):
        return None
    return h.line_panels(r.plot_path("acc_vs_sim_time"), panels)


STUDY = Study("fibecfed", ("dataset", "run", "skew", "seed"), grid, report)


def main(quick=False, out: Path | None = None, only=None, part=None, report_only=False) -> Path:
    """Run the selected cells, then rewrite the page from every cell."""
    return h.main(STUDY, quick, out, only, part, report_only)


if __name__ == "__main__":
    h.cli(STUDY, __doc__)
