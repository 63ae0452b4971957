"""Benchmark (b): peak memory of the embedded engine with 10 vs 1000 clients (same clients per round).

The engine keeps one resident backbone and only the sampled clients' trainable states, so peak
memory should not grow with the number of registered clients. Each case runs in a fresh process
(MiniLM, AG News 10,000 rows, 5 clients per round, 2 local steps of batch 8 each, 3 rounds) and reports its
peak resident set size (ru_maxrss).

    .venv/bin/python benchmarks/client_memory.py [--out benchmarks/results/client_memory.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(method: str, num_clients: int) -> None:
    from fedpeft.config import build_config, dump_config
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir

    config = build_config(
        {
            "model": "minilm",
            "dataset": "ag_news",
            "method": method,
            "num_clients": num_clients,
            "clients_per_round": 5,
            "rounds": 3,
            "local_steps": 2,
            "batch_size": 8,
            "lr": 1e-3,
            "max_seq_len": 64,
            "partition": "dirichlet",
            "alpha": 1.0,
            "max_train_samples": 10000,
            "max_test_samples": 200,
            "threads": 2,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(Path(tmp) / "run", dump_config(config))
        EmbeddedEngine(build_job(config), run).run()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "num_clients": num_clients, "peak_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--out", default="benchmarks/results/client_memory.md")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    results = {}
    # an untimed first run fills the tokenisation cache, so every measured case loads it alike
    subprocess.run(
        [sys.executable, __file__, "--child", "lora", "10"], check=True, capture_output=True
    )
    for method in ("lora", "full"):
        for clients in (10, 1000):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", method, str(clients)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            results[(method, clients)] = json.loads(out)["peak_mib"]
            print(method, clients, f"{results[(method, clients)]:.0f} MiB")
    lines = ["| method | 10 clients | 1000 clients | ratio |", "|---|---|---|---|"]
    for method in ("lora", "full"):
        a, b = results[(method, 10)], results[(method, 1000)]
        lines.append(f"| {method} | {a:.0f} MiB | {b:.0f} MiB | {b / a:.3f}x |")
    lines.append("")
    lines.append(
        "Peak RSS of one process per case: MiniLM, AG News (10,000 rows tokenised), 5 clients per "
        f"round, 2 local steps of batch 8 (every client holds at least 8 rows, so all steps have the same batch size), 3 rounds, after an untimed run that fills the tokenisation cache. Machine: {platform.machine()}, Python {platform.python_version()}."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
