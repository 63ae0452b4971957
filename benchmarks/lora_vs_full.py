"""Benchmark (c): MiniLM on AG News, LoRA next to full fine-tuning, 20 clients, Dirichlet alpha 1.

Both runs share everything but the method and its learning rate: 2,000 training rows split over 20
clients with label skew (alpha 1), 5 clients per round, 1 local epoch, batch 32, 64 tokens, 1,000
test rows scored every round. Reported per round: accuracy, cumulative bytes and simulated time;
the overlay plots land next to the table.

    .venv/bin/python benchmarks/lora_vs_full.py [--rounds 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.plots import plot_overlay
from fedpeft.report import comparison_table, load_run
from fedpeft.runs import RunDir

COMMON = {
    "model": "minilm",
    "dataset": "ag_news",
    "num_clients": 20,
    "clients_per_round": 5,
    "local_epochs": 1,
    "batch_size": 32,
    "max_seq_len": 64,
    "partition": "dirichlet",
    "alpha": 1.0,
    "max_train_samples": 2000,
    "max_test_samples": 500,
    "seed": 0,
    "target_accuracy": 0.8,
    "threads": 2,
}
CASES = {
    "lora": {"method": "lora", "lr": 5e-3, "lora": {"r": 8, "alpha": 16}},
    "full": {"method": "full", "lr": 5e-5},
    "full-lr2e-4": {"method": "full", "lr": 2e-4},
}


def run_case(name: str, rounds: int, runs_dir: Path) -> Path:
    folder = runs_dir / name
    config = build_config({**COMMON, **CASES[name], "rounds": rounds, "name": name})
    run = (
        RunDir(folder)
        if (folder / "config.yaml").exists()
        else RunDir.create(folder, dump_config(config))
    )
    EmbeddedEngine(build_job(config), run).run()  # resumes if a previous sitting was cut off
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/bench-lora-vs-full")
    args = parser.parse_args()
    out, runs_dir = Path(args.out), Path(args.runs)
    folders = [run_case(name, args.rounds, runs_dir) for name in CASES]
    records = [load_run(f) for f in folders]
    plot_overlay(
        [(r.name, r.metrics) for r in records],
        out / "lora_vs_full",
        title="MiniLM, AG News, 20 clients, alpha 1",
    )
    rows = [
        "| round | "
        + " | ".join(f"{r.name} acc | {r.name} MB total | {r.name} sim s" for r in records)
        + " |",
        "|---|" + "---|---|---|" * len(records),
    ]
    for i in range(args.rounds):
        cells = []
        for r in records:
            m = r.metrics[i]
            mb = (m["bytes_up_total"] + m["bytes_down_total"]) / 1e6
            cells.append(f"{m['accuracy']:.3f} | {mb:.1f} | {m['sim_time_total_s']:.0f}")
        rows.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    text = "\n".join(
        [
            comparison_table(records),
            "",
            "Per round (accuracy on 500 test rows; cumulative bytes up+down; cumulative simulated time):",
            "",
            *rows,
            "",
            f"Plots: `{out / 'lora_vs_full'}/accuracy_vs_round.png`, `accuracy_vs_bytes.png`, `accuracy_vs_sim_time.png`.",
            f"Machine: {platform.machine()}, 2 torch threads, torch {torch.__version__}.",
        ]
    )
    print(text)
    (out / "lora_vs_full.md").write_text(text + "\n")
    (out / "lora_vs_full.json").write_text(
        json.dumps({r.name: r.summary for r in records}, indent=2)
    )


if __name__ == "__main__":
    main()
