"""Benchmark: reliability and security — faults, attackers, differential privacy, leakage.

    python benchmarks/robustness.py                       # the whole grid, resumable (~2.7 h planned)
    python benchmarks/robustness.py --only scenario=sign_flip,scale   # one sitting's share
    python benchmarks/robustness.py --report-only         # rewrite the page from the cells there are
    python benchmarks/robustness.py --quick               # tiny model, every scenario: plumbing only

Setting (the issue's): MiniLM-L6, ag_news, 20 clients x 96 rows with Dirichlet label skew alpha 1,
10 per round, 10 rounds, 1 local epoch, batch 32, max_seq_len 64, LoRA r 8 at its default lr (the
FedPETuning study's validation-only winner; no lr phase here), 200 server-held validation rows,
400 test rows scored every 2 rounds. The number published per cell is the harness's: the test
accuracy of the round best on validation. Every client is a phone on Wi-Fi (one profile, so the
deadline below means one thing), and every cell ends with the membership-inference attack
(``privacy: {membership_inference: true, rows: 200}``, fedpeft/privacy.py).

Scenarios (the ``scenario`` key; ``algorithm`` is the aggregation rule):

    clean        no faults, no attackers: fedavg (seeds 0, 1, 2: the noise band), and median,
                 trimmed_mean, krum, multi_krum, bulyan once each (what robustness costs)
    crash        20% of sampled clients crash after their download, every round (fedavg)
    straggler    30% of clients are stragglers (4x slower) and the server waits 14 simulated s
    sign_flip    30% of clients (6 of 20) send their update negated, under all six rules
    scale        30% send their update x 10, under all six rules
    label_flip   30% train on rotated labels, under fedavg and median
    dp_z0.5, dp_z1, dp_z2   DP-FedAvg (central, clip 1.0) at noise multipliers 0.5, 1 and 2
    (methods)    full, adapter, bitfit: clean and dp_z1, for the attack AUC with and without DP
                 (LoRA's are clean-fedavg-s0 and dp_z1)

Robust rules: trimmed mean drops 30% at each end (3 of 10); krum and multi-krum tolerate f = 3 (10
> 2f + 2); bulyan needs n >= 4f + 3, so with 10 replies it tolerates only f = 1 — 30% attackers are
beyond its guarantee by construction. With 6 attackers among 20 and 10 sampled, a round holds 3
on average and more than 3 in ~31% of rounds (hypergeometric). The deadline: a normal client's
simulated time on the phone profile is at most ~9.3 s (96 rows at seq 64: 9.1 s of compute, 0.2 s
of LoRA transfer; fedpeft/cost.py), a straggler's at least 4 x 4.5 s (rows padded to 32), so 14 s
drops every straggler and no one else. Epsilon: q = 10/20 per round, delta 1e-5, RDP accountant:
10 rounds give ~34 (z 0.5), ~11.5 (z 1) and ~4.4 (z 2).

Budget arithmetic (quiet 2-core machine, MiniLM-L6, batch 32 x seq 64: LoRA trains ~40 samples/s,
full ~30; evaluation ~90 rows/s). A cell:

    training     10 rounds x 10 clients x 96 rows = 9,600 samples     -> 240 s (full 320 s)
    evaluation   5 x (200 validation + 400 test) = 3,000 rows          ->  33 s
    attack       200 member + 200 test rows                            ->   5 s
    set-up       model, tokenisation                                   ->  10 s
    cell         ~290 s (full ~370 s; crash ~240 s)
    grid         3 clean fedavg + 5 clean robust + crash + straggler + 2 x 6 attacks
                 + 2 label_flip + 3 DP + 3 methods x 2 = 33 cells
                 -> 30 x 290 + 240 + 2 x 370 = 9,680 s = ~2.7 h

Cells are run folders under ``--out`` (default ``benchmarks/results/robustness/``), named
``<method>/<scenario>-<algorithm>-s<seed>``; the page is ``<out>.md`` beside it, its plot
``<out>_dp.png`` and headline figures ``<out>.json``; missing cells show as "—".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import harness as h
from harness import DASH, Cell, Panel, Results, Study, headline, pct

# -- the grid ------------------------------------------------------------------------------------
# fmt: off
RULES = ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"]
ROBUST = {"trim_ratio": 0.3, "num_byzantine": 3}
BULYAN_F = 1  # 10 replies: 4f + 3 <= 10
ATTACK_FRACTION = 0.3
DP_LEVELS = {"dp_z0.5": 0.5, "dp_z1": 1.0, "dp_z2": 2.0}
DP_FOR_METHODS = "dp_z1"
METHODS = {"lora": {"lora": {"r": 8}}, "full": {}, "adapter": {}, "bitfit": {}}
SCENARIOS: dict[str, dict[str, Any]] = {  # scenario -> its config keys (faults, attack, dp)
    "clean": {},
    "crash": {"faults": {"crash_prob": 0.2}},
    "straggler": {"faults": {"straggler_fraction": 0.3, "straggler_factor": 4.0,
                             "deadline_s": 14.0}},
    "sign_flip": {"attack": {"type": "sign_flip", "fraction": ATTACK_FRACTION}},
    "scale": {"attack": {"type": "scale", "fraction": ATTACK_FRACTION}},
    "label_flip": {"attack": {"type": "label_flip", "fraction": ATTACK_FRACTION}},
    **{name: {"dp": {"noise_multiplier": z, "clip_norm": 1.0}} for name, z in DP_LEVELS.items()},
}
COMMON: dict[str, Any] = {
    "model": "minilm", "dataset": "ag_news", "rounds": 10, "local_epochs": 1, "batch_size": 32,
    "eval_batch_size": 128, "max_seq_len": 64, "partition": "dirichlet", "alpha": 1.0,
    "validation_size": 200, "max_test_samples": 400, "eval_every": 2,
    "cost": {"devices": ["phone"], "networks": ["wifi"]},
    "privacy": {"membership_inference": True, "rows": 200},
}
SETTINGS: dict[str, Any] = {
    "clients": 20, "per_round": 10, "rows_per_client": 96, "clean_seeds": [0, 1, 2],
    "deadline_s": 14.0, "common": COMMON,
}
QUICK: dict[str, Any] = {  # tiny random BERT, a few rows: plumbing, not accuracy
    **SETTINGS, "clients": 10, "per_round": 7, "rows_per_client": 16, "clean_seeds": [0],
    "deadline_s": 0.03,  # tiny model: a normal client ~0.015 simulated s, a straggler > 0.05
    "common": {**COMMON, "model": "tiny", "rounds": 2, "batch_size": 8, "max_seq_len": 24,
               "validation_size": 24, "max_test_samples": 40, "eval_every": 1, "threads": 1,
               "privacy": {"membership_inference": True, "rows": 20}},
    "robust": {"trim_ratio": 0.3, "num_byzantine": 2},  # 7 replies: krum needs n > 2f + 2
}
# fmt: on


# -- cells ---------------------------------------------------------------------------------------
def cell(scenario: str, algorithm: str, method: str = "lora", seed: int = 0, quick: bool = False):
    keys = {"scenario": scenario, "algorithm": algorithm, "method": method, "seed": seed}
    folder = f"{method}/{scenario}-{algorithm}-s{seed}"
    return Cell(folder, keys, partial(cell_config, folder, keys, quick))


def grid(quick: bool = False) -> list[Cell]:
    """Every cell in run order: clean, faults, attacks, DP, then the other methods."""
    s, c = QUICK if quick else SETTINGS, partial(cell, quick=quick)
    cells = [c("clean", "fedavg", seed=seed) for seed in s["clean_seeds"]]
    cells += [c("clean", rule) for rule in RULES[1:]]
    cells += [c("crash", "fedavg"), c("straggler", "fedavg")]
    cells += [c(attack, rule) for attack in ("sign_flip", "scale") for rule in RULES]
    cells += [c("label_flip", rule) for rule in ("fedavg", "median")]
    cells += [c(level, "fedavg") for level in DP_LEVELS]
    cells += [
        c(sc, "fedavg", m) for m in METHODS if m != "lora" for sc in ("clean", DP_FOR_METHODS)
    ]
    return cells


def cell_config(folder: str, keys: dict[str, Any], quick: bool, lr: float | None) -> dict[str, Any]:
    """The run config of a cell, as a plain dict (validated by ``build_config``)."""
    s = QUICK if quick else SETTINGS
    common = s["common"]
    clients = s["clients"]
    config = {**common, "name": folder.replace("/", "-"), "seed": keys["seed"]}
    config.update(method=keys["method"], **METHODS[keys["method"]], algorithm=keys["algorithm"])
    config.update(num_clients=clients, clients_per_round=s["per_round"])
    config["max_train_samples"] = clients * s["rows_per_client"] + common["validation_size"]
    scenario = dict(SCENARIOS[keys["scenario"]])
    if keys["scenario"] == "straggler":
        scenario["faults"] = {**scenario["faults"], "deadline_s": s["deadline_s"]}
    config.update(scenario)
    if keys["algorithm"] != "fedavg":
        robust = dict(s.get("robust", ROBUST))
        if keys["algorithm"] == "bulyan":
            robust["num_byzantine"] = BULYAN_F
        config["robust"] = robust
    return config


# -- figures of a cell ---------------------------------------------------------------------------
def rejected(summary: dict[str, Any]) -> int:
    """Uploads the server's checks rejected over the run."""
    return sum(len(row.get("clients_rejected") or []) for row in summary["metrics"])


def dropped(summary: dict[str, Any]) -> int:
    """Clients dropped (crashed, or later than the deadline) over the run."""
    return sum(len(row.get("clients_dropped") or []) for row in summary["metrics"])


def _clean(r: Results) -> h.Spread | None:
    """Clean LoRA FedAvg accuracy over its seeds: the reference of "accuracy lost"."""
    values = [
        headline(v)
        for v in r.select(scenario="clean", algorithm="fedavg", method="lora").values()
        if headline(v) is not None
    ]
    return h.Spread(tuple(values)) if values else None


def _lost(summary: dict[str, Any] | None, clean: h.Spread | None) -> float | None:
    """Points of accuracy lost against the clean run's mean (positive: worse)."""
    if summary is None or clean is None or headline(summary) is None:
        return None
    return 100 * (clean.mean - headline(summary))


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return DASH if value is None else fmt.format(value)


def figures(summary: dict[str, Any] | None, clean: h.Spread | None) -> dict[str, Any] | None:
    """A cell's figures for the page and the JSON (None: not finished)."""
    if summary is None:
        return None
    return {
        "accuracy": headline(summary),
        "final_accuracy": summary.get("final_accuracy"),
        "lost_points": _lost(summary, clean),
        "rounds_completed": summary["rounds_completed"],
        "rounds_planned": summary["rounds_planned"],
        "updates_rejected": rejected(summary),
        "clients_dropped": dropped(summary),
        "epsilon": summary.get("epsilon"),
        "mia_auc": summary.get("mia_auc"),
    }


def _row(label: str, algorithm: str, f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return [label, algorithm, *[DASH] * 7]
    return [
        label,
        algorithm,
        pct(f["accuracy"]),
        pct(f["final_accuracy"]),
        _num(f["lost_points"], "{:+.1f}"),
        f"{f['rounds_completed']}/{f['rounds_planned']}",
        str(f["updates_rejected"]),
        str(f["clients_dropped"]),
        _num(f["mia_auc"], "{:.3f}"),
    ]


# -- report --------------------------------------------------------------------------------------
def report(r: Results) -> tuple[list[str], dict[str, Any]]:
    """The page (lines) and its headline figures from whatever cells are finished."""
    s = QUICK if r.quick else SETTINGS
    common = s["common"]
    clean = _clean(r)
    fig = {c.folder: figures(r.found.get(c), clean) for c in r.expected()}
    lines = r.header("Robustness: faults, attackers, differential privacy and leakage")
    lines += [
        f"Setting: {common['model']}, {common['dataset']}, {s['clients']} clients x "
        f"{s['rows_per_client']} rows (Dirichlet alpha {common['alpha']}), {s['per_round']} per "
        f"round, {common['rounds']} rounds, LoRA r 8 at its default lr; "
        f"{common['validation_size']} validation and {common['max_test_samples']} test rows. "
        "Accuracy = test accuracy of the round best on validation; final = the last round's; "
        "lost = points below the clean LoRA FedAvg mean"
        + (f" ({clean.text()})" if clean else "")
        + "; rejected = uploads the server's checks refused (Krum-style rules leave updates out "
        "without rejecting them); dropped = crashed or past the deadline; attack AUC = the "
        "loss-threshold membership-inference attack on the published model (0.5: no leak).",
        "",
        *h.cost_lines(r.found, lambda c: c.method),
        "Resolution: the binomial 95% interval of one accuracy is about "
        f"±{h.half_width(0.85, common['max_test_samples']):.1f} points at 85% on "
        f"{common['max_test_samples']} test rows.",
        "",
        "### Faults and attackers (LoRA)",
        "",
    ]
    header = ["scenario", "rule", "accuracy", "final", "lost", "rounds", "rejected", "dropped"]
    header.append("attack AUC")
    body = [
        _row(c.scenario + ("" if c.seed == 0 else f" (seed {c.seed})"), c.algorithm, fig[c.folder])
        for c in r.expected()
        if c.method == "lora" and c.scenario not in DP_LEVELS
    ]
    lines += [*h.table(header, body), ""]
    lines += ["### Differential privacy (DP-FedAvg, LoRA, fedavg)", ""]
    dp_rows = []
    for level, z in DP_LEVELS.items():
        f = fig.get(f"lora/{level}-fedavg-s0")
        dp_rows.append(
            [
                f"{z:g}",
                DASH if f is None else _num(f["epsilon"], "{:.2f}"),
                DASH if f is None else pct(f["accuracy"]),
                DASH if f is None else _num(f["lost_points"], "{:+.1f}"),
                DASH if f is None else _num(f["mia_auc"], "{:.3f}"),
            ]
        )
    delta = "delta 1e-5"
    lines += [
        *h.table(
            ["noise multiplier", f"epsilon ({delta})", "accuracy", "lost", "attack AUC"], dp_rows
        ),
        "",
        "### Membership inference with and without DP",
        "",
        f"Attack AUC on {common['privacy']['rows']} member rows (training rows of clients that "
        f"took part) against as many test rows; with DP = noise multiplier "
        f"{DP_LEVELS[DP_FOR_METHODS]:g}. Mean losses member / non-member in brackets.",
        "",
    ]
    mia_rows = []
    for method in METHODS:
        row = [method]
        for scenario in ("clean", DP_FOR_METHODS):
            summary = r.found.get(_find(r, method, scenario))
            if summary is None or summary.get("mia_auc") is None:
                row += [DASH, DASH]
                continue
            row += [
                f"{summary['mia_auc']:.3f} ({summary['mia_member_loss']:.3f} / "
                f"{summary['mia_nonmember_loss']:.3f})",
                pct(headline(summary)),
            ]
        mia_rows.append(row)
    lines += [
        *h.table(["method", "AUC, no DP", "accuracy", "AUC, DP", "accuracy"], mia_rows),
        "",
    ]
    checks = _checks(r, fig)
    lines += ["### Against the issue's expectations", "", *checks.lines, ""]
    plot = _plot(r, fig)
    lines += [f"![accuracy against epsilon]({plot.name})", ""]
    data = {
        "clean": None if clean is None else clean.as_dict(),
        "cells": fig,
        "checks": checks.data,
    }
    return lines, data


def _find(r: Results, method: str, scenario: str) -> Cell | None:
    folder = f"{method}/{scenario}-fedavg-s0"
    return next((c for c in r.cells if c.folder == folder), None)


def _checks(r: Results, fig: dict[str, Any]) -> h.Checks:
    checks = h.Checks()
    done = [f for f in fig.values() if f is not None]
    complete = [f for f in done if f["rounds_completed"] == f["rounds_planned"]]
    agree = None if len(done) < len(fig) else len(complete) == len(done)
    checks.add(
        "every_run_completes",
        f"- Expected: every run completes. Ours: {len(complete)} of {len(done)} finished cells "
        f"ran all their rounds ({len(fig) - len(done)} missing) — {h.verdict(agree)}.",
        agree,
        complete=len(complete),
        finished=len(done),
    )
    lost = {rule: (fig.get(f"lora/sign_flip-{rule}-s0") or {}).get("lost_points") for rule in RULES}
    robust = {rule: v for rule, v in lost.items() if rule != "fedavg"}
    known = lost["fedavg"] is not None and all(v is not None for v in robust.values())
    agree = None
    if known:
        agree = lost["fedavg"] > 10 and all(v <= 2 for v in robust.values())
    checks.add(
        "robust_rules_hold_sign_flip",
        "- Expected: against 30% sign-flip attackers robust rules stay within 2 points of clean "
        "accuracy where fedavg loses more than 10. Ours, points lost: "
        + ", ".join(f"{rule} {_num(v, '{:+.1f}')}" for rule, v in lost.items())
        + f" — {h.verdict(agree)}.",
        agree,
        lost_points=lost,
    )
    dp = {level: (fig.get(f"lora/{level}-fedavg-s0") or {}) for level in DP_LEVELS}
    known = all(
        f.get("epsilon") is not None and f.get("lost_points") is not None for f in dp.values()
    )
    good = [
        level for level, f in dp.items() if known and f["epsilon"] < 10 and f["lost_points"] < 5
    ]
    agree = None if not known else bool(good)
    checks.add(
        "dp_epsilon_under_10_costs_under_5",
        "- Expected: a noise level with epsilon under 10 that costs under 5 points. Ours: "
        + ", ".join(
            f"z {DP_LEVELS[level]:g}: epsilon {_num(f.get('epsilon'), '{:.2f}')}, "
            f"{_num(f.get('lost_points'), '{:+.1f}')} points"
            for level, f in dp.items()
        )
        + f" — {h.verdict(agree)}.",
        agree,
        levels_meeting_it=good,
    )
    aucs = {}
    for method in METHODS:
        pair = [r.found.get(_find(r, method, sc)) for sc in ("clean", DP_FOR_METHODS)]
        aucs[method] = [None if p is None else p.get("mia_auc") for p in pair]
    known = all(a is not None and b is not None for a, b in aucs.values())
    agree = None
    if known:
        agree = all(abs(b - 0.5) < abs(a - 0.5) for a, b in aucs.values())
    checks.add(
        "dp_brings_mia_auc_towards_half",
        "- Expected: DP brings the membership-inference AUC towards 0.5. Ours (no DP -> DP): "
        + ", ".join(f"{m} {_num(a, '{:.3f}')} -> {_num(b, '{:.3f}')}" for m, (a, b) in aucs.items())
        + f" — {h.verdict(agree)}.",
        agree,
        auc=aucs,
    )
    return checks


def _plot(r: Results, fig: dict[str, Any]) -> Path:
    """LoRA accuracy against epsilon at the three noise levels, the clean run as epsilon = inf."""
    points = []
    for level in DP_LEVELS:
        f = fig.get(f"lora/{level}-fedavg-s0")
        if f is not None and f["epsilon"] is not None and f["accuracy"] is not None:
            points.append((f["epsilon"], 100 * f["accuracy"]))
    points.sort()
    lines = {"DP-FedAvg (LoRA)": ([x for x, _ in points], [y for _, y in points])}
    clean = _clean(r)
    if clean is not None and points:
        xs = [points[0][0], points[-1][0]]
        lines["clean (no DP)"] = (xs, [100 * clean.mean] * 2)
    panel = Panel("accuracy against privacy", "epsilon (delta 1e-5)", lines, xscale="log")
    return h.line_panels(r.plot_path("dp"), [panel])


STUDY = Study("robustness", ("scenario", "algorithm", "method", "seed"), grid, report)


def main(quick=False, out: Path | None = None, only=None, part=None, report_only=False) -> Path:
    """Run the selected cells, then rewrite the report from every cell."""
    return h.main(STUDY, quick, out, only, part, report_only)


if __name__ == "__main__":
    h.cli(STUDY, __doc__)
