"""Benchmark: AutoFedNLP against fixed-configuration baselines, by time-to-accuracy (SPEC §2).

For each dataset, every method runs in this one process under the same cost model: Jetson TX2
clients (per-batch latency from FLOPs, growing with depth) on the reference's 1 MB/s link.

    vanilla      full fine-tuning, FedAvg
    ftq          full fine-tuning, int8 updates up and int8 weights down
    lf_d<k>      layer freezing: train the top k layers (+ head); LF_oracle = the best k of the sweep
    adapter_d<d>w<w>  fixed bottleneck adapters; "best fixed adapter" = the best of the grid
    autofednlp   trial groups choose (depth, width) during the run

Time-to-target = simulated time until the global test accuracy first reaches the target, which is
``TARGET_FRACTION`` of the best accuracy vanilla fine-tuning reaches in its budget (the paper's
"99% of converged accuracy", with vanilla as the reference). A separate micro-benchmark times local
training of the same client rows with and without the activation cache, per configuration.

    fedpeft bench autofednlp [--quick] [--out benchmarks/results]    # both datasets side by side
    fedpeft bench autofednlp --only dataset=ag_news --only run=vanilla,ftq   # a sitting's share
    fedpeft bench autofednlp --report-only                            # rewrite the page

Every run is a resumable cell of the shared harness (``benchmarks/harness.py``) under
``<out>/autofednlp_runs/<dataset>/<run>``: a finished run is skipped (delete its folder to redo
it), an interrupted one resumes from its checkpoint. The cache micro-benchmark runs in a sitting
without ``--only``/``--part``/``--report-only`` and is kept in ``cache_speedup.json`` beside the
runs (delete it to measure again). The page is ``<out>/autofednlp.md``, its figures
``<out>/autofednlp.json`` and ``<out>/autofednlp_<dataset>.json``; a dataset's section waits
until all its runs are finished. "best acc" is the best test accuracy over rounds and the targets
derive from vanilla's (the reference's definition of time-to-accuracy); the JSON also carries each
run's test accuracy at its best-on-validation round (``accuracy``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import harness as h
import numpy as np
import torch

from fedpeft.cache import ActivationCache
from fedpeft.config import build_config
from fedpeft.job import build_job
from fedpeft.peft import adapter as adapter_unit
from fedpeft.plots import plot_overlay

TARGET_FRACTION = 0.99
COST = {"devices": ["jetson_tx2"], "networks": ["reference_1mbps"]}
CACHE_FILE = "cache_speedup.json"


@dataclass
class Setting:
    """One dataset's setting and the budget of each method (rounds; periods for autofednlp)."""

    dataset: str
    partition: str
    alpha: float
    common: dict[str, Any]
    rounds: dict[str, int]
    tau: float
    lf_depths: list[int]
    adapter_grid: list[tuple[int, int]]
    extra_runs: list[str] = field(default_factory=list)


def _common(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "model": "tiny",
            "num_clients": 12,
            "clients_per_round": 2,
            "max_train_samples": 260,
            "max_test_samples": 60,
            "validation_size": 40,
            "max_seq_len": 24,
            "batch_size": 8,
            "cost": COST,
        }
    return {
        "model": "minilm",
        "num_clients": 100,
        "clients_per_round": 5,
        "max_train_samples": 2200,  # 200 go to the server's validation split, 2000 to clients
        "validation_size": 200,
        "max_test_samples": 400,
        "max_seq_len": 40,
        "batch_size": 8,
        "local_epochs": 1,
        "eval_batch_size": 200,
        "cost": COST,
        "threads": 1,  # the two datasets run side by side, one core each
    }


def settings(quick: bool) -> list[Setting]:
    common = _common(quick)
    if quick:
        rounds = {"vanilla": 2, "ftq": 2, "lf": 2, "adapter": 2, "autofednlp": 2}
        return [
            Setting("ag_news", "dirichlet", 10.0, common, rounds, 1e-3, [1], [(1, 8)]),
        ]
    rounds = {"vanilla": 10, "ftq": 10, "lf": 12, "adapter": 16, "autofednlp": 10}
    return [
        Setting(
            "ag_news",
            "dirichlet",
            10.0,
            common,
            rounds,
            tau=0.05,
            lf_depths=[1, 2],
            adapter_grid=[(1, 8), (2, 16), (4, 32)],
        ),
        Setting(
            "20newsgroups",
            "iid",
            1.0,
            common,
            rounds,
            tau=0.05,
            lf_depths=[1, 2],
            adapter_grid=[(1, 8), (2, 16), (4, 32)],
        ),
    ]


def method_configs(study: Setting) -> dict[str, dict[str, Any]]:
    """Run name -> config dict, every run on the same data, clients and cost model."""
    base = {
        **study.common,
        "dataset": study.dataset,
        "partition": study.partition,
        "alpha": study.alpha,
        "optimizer": "adamw",
        "eval_every": 1,
    }
    cache = {"enabled": True, "dtype": "fp16"}
    full_lr, peft_lr = 5e-5, 2e-3
    runs = {
        "vanilla": {**base, "method": "full", "lr": full_lr, "rounds": study.rounds["vanilla"]},
        "ftq": {
            **base,
            "method": "full",
            "lr": full_lr,
            "rounds": study.rounds["ftq"],
            "quantize": "int8",
            "quantize_download": True,
        },
    }
    for depth in study.lf_depths:
        runs[f"lf_d{depth}"] = {
            **base,
            "method": "full",
            "full": {"depth": depth},
            "lr": 1e-4,
            "rounds": study.rounds["lf"],
            "activation_cache": cache,
        }
    for depth, width in study.adapter_grid:
        runs[f"adapter_d{depth}w{width}"] = {
            **base,
            "method": "adapter",
            "adapter": {"depth": depth, "width": width},
            "lr": peft_lr,
            "rounds": study.rounds["adapter"],
            "activation_cache": cache,
        }
    auto = {
        **base,
        "method": "autofednlp",
        "lr": peft_lr,
        "rounds": study.rounds["autofednlp"],
        "autofednlp": {"tau": study.tau},
        "activation_cache": cache,
    }
    runs["autofednlp"] = auto
    if "autofednlp_nocache" in study.extra_runs:
        runs["autofednlp_nocache"] = {**auto, "activation_cache": {"enabled": False}}
    return runs


def _named(config: dict[str, Any], name: str, lr: float | None) -> dict[str, Any]:
    return {**config, "name": name}


def grid(quick: bool = False) -> list[h.Cell]:
    """Every run of every dataset, as harness cells ``<dataset>/<run>`` (no lr selection)."""
    return [
        h.Cell(
            f"{study.dataset}/{name}",
            {"dataset": study.dataset, "run": name},
            partial(_named, config, name),
        )
        for study in settings(quick)
        for name, config in method_configs(study).items()
    ]


def _run_dataset(job: tuple[bool, Path, str]) -> None:
    """One dataset's cells, in a worker process of its own."""
    quick, runs, dataset = job
    torch.set_num_threads(1)
    cells = grid(quick)
    h.run_cells(runs, cells, h.sitting(cells, {"dataset": {dataset}}), f"autofednlp {dataset}")


def time_to_target(metrics: list[dict[str, Any]], target: float) -> float | None:
    for row in metrics:
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return row["sim_time_total_s"]
    return None


def _fmt_time(seconds: float | None, total: float) -> str:
    if seconds is None:
        return f"not reached (> {total / 60:.1f} min)"
    return f"{seconds / 60:.2f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _ratio(reference: float | None, reference_total: float, ours: float | None) -> str:
    if ours is None:
        return "—"
    if reference is None:  # never reached: its whole run is a lower bound, if it ran long enough
        return f"> {reference_total / ours:.0f}x" if reference_total >= ours else "—"
    ratio = reference / ours
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def summarise_study(
    study: Setting, runs: dict[str, dict[str, Any]], out: Path, work: Path
) -> tuple[list[str], dict[str, Any]]:
    """A dataset's section of the page and its figures, from its finished runs (summary plus
    ``metrics``); ``out``: where the page and plots go, ``work``: the run folders."""

    def best_accuracy(metrics: list[dict[str, Any]]) -> float:
        return max((r["accuracy"] for r in metrics if r.get("accuracy") is not None), default=0.0)

    vanilla_best = best_accuracy(runs["vanilla"]["metrics"])
    target = TARGET_FRACTION * vanilla_best
    overall_best = max(best_accuracy(run["metrics"]) for run in runs.values())
    high = TARGET_FRACTION * overall_best
    facts = {}
    for name, run in runs.items():
        metrics = run["metrics"]
        facts[name] = {
            "best": best_accuracy(metrics),
            "ttt": time_to_target(metrics, target),
            "ttt_high": time_to_target(metrics, high),
            "total": metrics[-1]["sim_time_total_s"],
            "bytes": metrics[-1]["bytes_up_total"] + metrics[-1]["bytes_down_total"],
            "wall": metrics[-1]["wall_time_total_s"],
            "train_wall": sum(r.get("train_wall_s", 0.0) for r in metrics),
            "rounds": len(metrics),
        }

    def best_of(prefix: str) -> str:
        names = [n for n in facts if n.startswith(prefix)]
        for key in ("ttt_high", "ttt"):
            reached = [n for n in names if facts[n][key] is not None]
            if reached:
                return min(reached, key=lambda n: facts[n][key])
        return max(names, key=lambda n: facts[n]["best"])

    def sooner(f: dict[str, Any], key: str, name: str) -> str:
        if name.startswith("autofednlp"):
            return "—"
        return _ratio(f[key], f["total"], facts["autofednlp"][key])

    lf_oracle, best_adapter = best_of("lf_"), best_of("adapter_")
    lines = [
        f"### {study.dataset} ({study.partition}"
        + (f", alpha {study.alpha:g}" if study.partition == "dirichlet" else "")
        + f", {study.common['num_clients']} clients)",
        "",
        f"Target A = {target:.3f}, {TARGET_FRACTION:.0%} of vanilla's best in its budget "
        f"({vanilla_best:.3f}); target B = {high:.3f}, {TARGET_FRACTION:.0%} of the best accuracy "
        f"any run reached ({overall_best:.3f}). 'Sooner' = the baseline's simulated time to the "
        "target / AutoFedNLP's ('>' when the baseline never got there: its whole simulated time "
        "is then a lower bound).",
        f"LF_oracle = `{lf_oracle}`; best fixed adapter = `{best_adapter}`.",
        "",
        "| run | rounds | best acc | sim time to A | AutoFedNLP sooner (A) | sim time to B "
        "| AutoFedNLP sooner (B) | total sim time | MB exchanged | wall (local training) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in facts.items():
        label = name
        if name == lf_oracle:
            label += " (LF_oracle)"
        if name == best_adapter:
            label += " (best fixed adapter)"
        lines.append(
            f"| {label} | {f['rounds']} | {f['best']:.3f} | {_fmt_time(f['ttt'], f['total'])} | "
            f"{sooner(f, 'ttt', name)} | {_fmt_time(f['ttt_high'], f['total'])} | "
            f"{sooner(f, 'ttt_high', name)} | "
            f"{f['total'] / 60:.2f} min | {f['bytes'] / 1e6:.1f} | "
            f"{f['wall']:.0f} s ({f['train_wall']:.0f} s) |"
        )
    trials = [r.get("trial") for r in runs["autofednlp"]["metrics"]]
    path = [f"({r['depth']},{r['width']})" for r in runs["autofednlp"]["metrics"]]
    lines += [
        "",
        "AutoFedNLP configuration after each trial period: " + " ".join(path),
        "Rounds per candidate in each period (shallow/wide/deep): "
        + "; ".join(
            "/".join(f"{c['name'][0]}{c['rounds']}" for c in t["candidates"]) for t in trials if t
        ),
        "",
    ]
    plots_dir = work / study.dataset / "plots"  # beside the run folders
    plots = plot_overlay(
        [(name, run["metrics"]) for name, run in runs.items()],
        plots_dir,
        title=f"{study.dataset}: accuracy vs simulated time",
    )
    dest = out / f"autofednlp_{study.dataset}_acc_vs_sim_time.png"
    plot_log_time(runs, dest, f"{study.dataset}: accuracy vs simulated time", target)
    lines += [f"![{study.dataset}: accuracy vs simulated time]({dest.name})", ""]
    depth_plot = next((p for p in plots if p.name == "depth_width.png"), plots_dir / "none")
    if depth_plot.is_file():
        dest = out / f"autofednlp_{study.dataset}_depth_width.png"
        shutil.copy(depth_plot, dest)
        lines += [f"![{study.dataset}: AutoFedNLP depth and width]({dest.name})", ""]
    (out / f"autofednlp_{study.dataset}.json").write_text(json.dumps(facts, indent=1))
    figures = {
        "target_a": target,
        "target_b": high,
        "lf_oracle": lf_oracle,
        "best_fixed_adapter": best_adapter,
        "runs": {
            name: {
                "accuracy": h.headline(run),
                "best_test_accuracy": facts[name]["best"],
                "sim_time_to_a_s": facts[name]["ttt"],
                "sim_time_to_b_s": facts[name]["ttt_high"],
                "sim_time_total_s": facts[name]["total"],
                "bytes": facts[name]["bytes"],
                "trainable_params": run["trainable_params"],
            }
            for name, run in runs.items()
        },
    }
    return lines, figures


def plot_log_time(runs: dict[str, Any], path: Path, title: str, target: float) -> None:
    """Accuracy against simulated time on a log axis: the runs span four decades of time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run in runs.items():
        points = [
            (r["sim_time_total_s"], 100 * r["accuracy"])
            for r in run["metrics"]
            if r.get("accuracy") is not None and r["sim_time_total_s"] > 0
        ]
        style = {"linewidth": 2.5, "color": "black"} if name == "autofednlp" else {}
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name, **style)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label="target A")
    ax.set_xscale("log")
    ax.set_xlabel("simulated time (s, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    h.save(fig, path)


def cache_speedup(quick: bool, repeats: int = 2) -> list[str]:
    """Local training wall-clock of the same client rows with and without the cache."""
    common = _common(quick)
    config = build_config(
        {**common, "dataset": "ag_news", "method": "adapter", "partition": "iid", "lr": 2e-3}
    )
    job = build_job(config)
    model, data = job.model, job.train
    rows = np.concatenate(job.partition.train[:5])  # one round's worth of client rows
    epochs = 3  # a client that keeps its rows across epochs / rounds
    settings = config.adapter
    layers = job.num_layers
    lines = [
        f"Local training of {len(rows)} rows x {epochs} epochs (batch {config.batch_size}, "
        f"seq <= {config.max_seq_len}), median of {repeats}, same process, interleaved:",
        "",
        "| depth, width | without cache | with cache (fp16; first epoch fills it) | speed-up |",
        "|---|---|---|---|",
    ]
    from fedpeft.client import LocalTraining, train_local

    training = LocalTraining(epochs=epochs, batch_size=config.batch_size, lr=2e-3)
    configs = [(0, 8), (1, 8), (2, 8), (3, 16), (layers, 32)]
    for depth, width in sorted({(min(d, layers), w) for d, w in configs}):
        adapter_unit.set_layout(model, depth, width, settings)
        plain, cached = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            train_local(model, data, rows, training, seed=0)
            plain.append(time.perf_counter() - started)
            cache = ActivationCache(data, "fp16")
            started = time.perf_counter()
            train_local(model, data, rows, training, seed=0, forward=cache.logits)
            cached.append(time.perf_counter() - started)
        a, b = statistics.median(plain), statistics.median(cached)
        lines.append(f"| ({depth}, {width}) | {a:.2f} s | {b:.2f} s | {a / b:.1f}x |")
    return lines + [""]


def report(r: h.Results) -> tuple[list[str], dict[str, Any]]:
    """The page from the finished runs: a section per dataset once all its runs are finished."""
    out, sections, figures = r.out.parent, [], {}
    for study in settings(r.quick):
        runs = {c.run: v for c, v in r.select(dataset=study.dataset).items()}
        wanted = list(method_configs(study))
        if all(name in runs for name in wanted):
            lines, figures[study.dataset] = summarise_study(study, runs, out, r.out)
            sections += lines
        else:
            missing = [name for name in wanted if name not in runs]
            sections += [
                f"### {study.dataset}",
                "",
                f"{len(wanted) - len(missing)} of {len(wanted)} runs finished; this section waits "
                f"for {', '.join(missing)}.",
                "",
            ]
    cache = r.out / CACHE_FILE
    cache_lines = json.loads(cache.read_text())["lines"] if cache.is_file() else []
    run_time = sum(v.get("wall_time_total_s", 0.0) for v in r.found.values())
    command = "fedpeft bench autofednlp" + (" --quick" if r.quick else "")
    header = [
        "## AutoFedNLP: time-to-accuracy against fixed configurations",
        "",
        f"Command: `{command}` ({run_time / 60:.1f} min of run time in the {len(r.found)} finished "
        f"runs; reported on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; the two datasets run side by side, one process and one "
        "thread each, while other work may share the machine).",
        "",
        (
            "Quick mode: the tiny random BERT on a few hundred rows, a plumbing check only. "
            if r.quick
            else ""
        )
        + "Setting: MiniLM-L6 (all-MiniLM-L6-v2, mean pooling), max_seq_len 40, 100 clients with 20 "
        "training rows each (2,200 rows drawn, 200 held out as the server's validation split), "
        "400 test rows, 5 clients per round (per trial group for AutoFedNLP), 1 local epoch, "
        "batch 8, AdamW (lr 5e-5 full, 1e-4 layer freezing, 2e-3 adapters/AutoFedNLP). "
        "Simulated device: Jetson TX2 profile (200 GFLOP/s sustained; per-batch latency from "
        "FLOPs, so it grows with depth), network 1 MB/s both ways. The activation cache (fp16) "
        "is on for layer freezing, adapters and AutoFedNLP; its misses (first use of a row) are "
        "charged a bottom forward. AutoFedNLP: reference defaults (start (0, 8), +8 width to 64, "
        "depth 0 -> 2) except tau, scaled to this cost model.",
        "",
        *sections,
        "### Activation cache: real local-training wall-clock",
        "",
        *(cache_lines or ["Not measured yet: a sitting without --only/--part measures it.", ""]),
    ]
    return header, {"datasets": figures, "cache_speedup": cache_lines}


STUDY = h.Study(
    "autofednlp",
    ("dataset", "run"),
    grid,
    report,
    out=lambda quick: Path(
        "runs/bench-quick/autofednlp_quick_runs" if quick else "benchmarks/results/autofednlp_runs"
    ),
    stem=lambda out: out.name.removesuffix("_runs"),
)


def main(
    quick: bool = False,
    out: Path | None = None,
    only: list[str] | None = None,
    part: str | None = None,
    report_only: bool = False,
) -> Path:
    """Run the cells that are not finished (both datasets side by side when the whole study
    runs), the cache micro-benchmark if not measured yet, then rewrite the page."""
    out = Path(
        out or ("runs/bench-quick" if quick else "benchmarks/results")
    )  # quick: no clobbering
    runs = out / ("autofednlp_quick_runs" if quick else "autofednlp_runs")
    torch.set_num_threads(2 if not quick else 1)
    whole = not (only or part or report_only)
    if whole and not quick:  # one process per dataset: two single-threaded runs use 2 cores better
        datasets = [study.dataset for study in settings(quick)]
        with multiprocessing.get_context("spawn").Pool(len(datasets)) as pool:
            pool.map(_run_dataset, [(quick, runs, dataset) for dataset in datasets])
    if whole and not (runs / CACHE_FILE).is_file():
        print("cache micro-benchmark:")
        h.write_json(runs / CACHE_FILE, {"lines": cache_speedup(quick)})
    return h.main(STUDY, quick, runs, only, part, report_only or (whole and not quick))


if __name__ == "__main__":
    h.cli(STUDY, __doc__)
