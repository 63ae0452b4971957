"""Benchmark: wall-clock of one local training step, C2A against a plain adapter of the same shape.

The C2A issue asks that a C2A step cost under 1.3x a plain adapter's. Both models are MiniLM-L6
with a fresh 4-class head: ``c2a`` (its defaults: rank 16, inner dim 32, both sites of every
layer) and Houlsby adapters of width 16 (the shape C2A generates), trained with AdamW on the same
fixed batch of real AG News rows (batch 32, 64 tokens). The two step kinds are interleaved in one
process, one thread, so a busy machine slows both alike: the ratio is the figure, not the seconds.
A C2A step includes what the method does per batch: the label histogram and ``set_condition``.

    .venv/bin/python benchmarks/c2a_step.py [--steps 20] [--out benchmarks/results/c2a_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedpeft.config import build_config
from fedpeft.data.sources import load_source
from fedpeft.models.loading import load_model
from fedpeft.peft import hyperadapter
from fedpeft.registry import get as method_spec

BATCH, SEQ, LABELS = 32, 64, 4
CASES = {
    "c2a": {"method": "c2a"},
    "adapter": {"method": "adapter", "adapter": {"width": 16, "placement": "houlsby"}},
}


def build(case: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    config = build_config({"model": "minilm", "dataset": "ag_news", **CASES[case]})
    model, _ = load_model("minilm", LABELS, seed=0)
    model = method_spec(config.method).inject(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)


def batch() -> dict[str, torch.Tensor]:
    _, tokenizer = load_model("minilm", LABELS, seed=0)
    train = load_source("ag_news").train
    encoded = tokenizer(
        train.texts[:BATCH],
        padding="max_length",
        truncation=True,
        max_length=SEQ,
        return_tensors="pt",
    )
    return {**encoded, "labels": torch.as_tensor(train.labels[:BATCH])}


def step(case: str, model: torch.nn.Module, optimizer, data: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    if case == "c2a":
        hyperadapter.set_condition(model, hyperadapter.label_distribution(data["labels"], LABELS))
    loss = model(**data).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/c2a_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = batch()
    models = {case: build(case) for case in CASES}
    for case, (model, optimizer) in models.items():  # warm-up, not timed
        step(case, model, optimizer, data)
    times: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.steps):
        for case, (model, optimizer) in models.items():
            times[case].append(step(case, model, optimizer, data))
    median = {case: statistics.median(t) for case, t in times.items()}
    result = {
        "steps_each": args.steps,
        "batch": BATCH,
        "seq_len": SEQ,
        "threads": 1,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "median_step_s": median,
        "range_step_s": {case: [min(t), max(t)] for case, t in times.items()},
        "c2a_over_adapter": median["c2a"] / median["adapter"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
