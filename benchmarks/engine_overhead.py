"""Benchmark (a): local-training throughput of the embedded engine vs a plain peft training loop.

Both train MiniLM + LoRA (r8 on query/value, + head) on exactly the same batches: the batches the
engine's sampled clients draw in a round. The engine's time covers everything a round does besides
evaluation — swapping each client's state into the resident model, serialising and checking every
payload, cost accounting and FedAvg — while the plain loop is one peft model and one AdamW loop.
Rounds are interleaved (engine, plain, engine, plain, ...) so machine noise hits both alike.

    .venv/bin/python benchmarks/engine_overhead.py [--rounds 4] [--out benchmarks/results/engine_overhead.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model

from fedpeft.client import batch_order, forward_logits
from fedpeft.config import build_config
from fedpeft.engine.local import EmbeddedEngine, client_seed, sample_clients
from fedpeft.job import build_job
from fedpeft.models import load_model
from fedpeft.peft.base import trainable_state
from fedpeft.runs import RunDir


def client_batches(job, rnd: int, cid: int) -> list:
    """The exact row batches client ``cid`` trains on in round ``rnd`` (same seeds as the engine)."""
    rows = job.partition.train[cid]
    generator = torch.Generator().manual_seed(client_seed(job.config.seed, rnd, cid))
    return batch_order(rows, job.config.batch_size, job.training.num_steps(len(rows)), generator)


def plain_client(model, optimizer, data, batches) -> int:
    model.train()
    samples = 0
    for rows in batches:
        batch = data.batch(rows)
        loss = F.cross_entropy(forward_logits(model, batch), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(rows)
    return samples


class Clock:
    """Wall and CPU seconds of a block (CPU time is less disturbed by other jobs on the machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/engine_overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = build_config(
        {
            "model": "minilm",
            "dataset": "ag_news",
            "method": "lora",
            "num_clients": 20,
            "clients_per_round": 5,
            "rounds": args.rounds + 1,
            "batch_size": 32,
            "lr": 5e-3,
            "max_seq_len": 64,
            "partition": "dirichlet",
            "alpha": 1.0,
            "max_train_samples": 2000,
            "max_test_samples": 100,
            "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        }
    )
    job = build_job(config)
    engine = EmbeddedEngine(job, RunDir(Path("/tmp/unused")))
    plain, _ = load_model("minilm", len(job.label_names), seed=0)
    plain = get_peft_model(
        plain,
        LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]
        ),
    )
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=5e-3)

    global_state = trainable_state(job.model)
    engine_wall = engine_cpu = plain_wall = plain_cpu = 0.0
    pair_ratios, total = [], 0
    for rnd in range(1, args.rounds + 2):
        clients = sample_clients(config.seed, rnd, config.num_clients, config.clients_per_round)
        updates, round_engine_wall, round_engine_cpu, round_plain_wall, round_plain_cpu = (
            [],
            0,
            0,
            0,
            0,
        )
        for cid in clients:  # interleave engine and plain client by client
            with Clock() as eng:
                update = engine._client_round(rnd, cid, global_state).update
            updates.append(update)
            with Clock() as ref:
                n = plain_client(plain, optimizer, job.train, client_batches(job, rnd, cid))
            round_engine_wall += eng.wall
            round_engine_cpu += eng.cpu
            round_plain_wall += ref.wall
            round_plain_cpu += ref.cpu
            if rnd > 1:
                total += n
                pair_ratios.append(eng.cpu / ref.cpu)
        with Clock() as agg:
            global_state = engine.method.aggregate(rnd, global_state, updates)
        print(
            f"round {rnd}: engine {round_engine_wall + agg.wall:.1f}s wall / {round_engine_cpu + agg.cpu:.1f}s cpu; "
            f"plain {round_plain_wall:.1f}s wall / {round_plain_cpu:.1f}s cpu"
        )
        if rnd == 1:
            continue  # warm-up round for both
        engine_wall += round_engine_wall + agg.wall
        engine_cpu += round_engine_cpu + agg.cpu
        plain_wall += round_plain_wall
        plain_cpu += round_plain_cpu

    lines = [
        "| | samples/s (wall) | wall time | CPU time |",
        "|---|---|---|---|",
        f"| plain peft loop (one model, one optimiser) | {total / plain_wall:.1f} | {plain_wall:.1f} s | {plain_cpu:.1f} s |",
        f"| fedpeft embedded engine (swap, serialise, account, FedAvg) | {total / engine_wall:.1f} | {engine_wall:.1f} s | {engine_cpu:.1f} s |",
        "",
        f"Engine overhead over {args.rounds} rounds after a warm-up round ({total} samples, clients "
        f"interleaved engine/plain): **{(engine_cpu / plain_cpu - 1) * 100:+.1f}% CPU time**, "
        f"{(engine_wall / plain_wall - 1) * 100:+.1f}% wall time; per-client CPU ratio median "
        f"{statistics.median(pair_ratios):.3f} (min {min(pair_ratios):.3f}, max {max(pair_ratios):.3f}).",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
