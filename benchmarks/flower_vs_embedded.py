"""Benchmark: the same workloads on the embedded engine, Flower simulation and a Flower deployment.

Two workloads, MiniLM + LoRA on AG News, seq 64:
- ``training``: 5 clients, all in every round, 3 rounds, ``--steps`` local steps of batch 16
  (training dominates); embedded, Flower simulation, and a loopback deployment (``fedpeft flower
  local``, one SuperNode per client, each on its own rows) five ways: as shipped (each node's
  ClientApps run in fedpeft's long-lived executor, ``fedpeft.engine.flower_executor``, and hand
  the work to the node worker that keeps the model and rows, ``fedpeft.engine.flower_worker``;
  a message's tensors travel packed in one Array, ``fedpeft.engine.flower_arrays``; the
  worker starts with its node and a round's messages go out before the round before it is
  evaluated); with neither of the last two (``flower.send_ahead: false``,
  ``FEDPEFT_NODE_WARM=0``); with an Array per tensor, as Flower's ``ArrayRecord`` has them
  (``FEDPEFT_FLOWER_PACK=0``);
  with Flower's own process per message (``FEDPEFT_NODE_EXECUTOR=0``, the worker still there);
  and with neither (``FEDPEFT_NODE_WORKER=0`` too: every message imports the engine and builds
  the job in its own process);
- ``cross-device``: 1,000 clients, 100 per round, 3 rounds, 2 local steps of batch 8 (little work
  per client: engine overhead dominates); embedded and Flower simulation.
Each run is its own ``fedpeft`` command, one after the other in one sitting; a sampler adds up
the memory of that command and every process under it (Ray's services and actors, SuperLink,
SuperNodes, ClientApp processes, node workers) every 0.5 s and keeps the peak. Memory is PSS, so
pages that processes share (libraries, a forked parent) are counted once.

    .venv/bin/python benchmarks/flower_vs_embedded.py [--steps 3] [--only training]
        [--engine "flower deployment" ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def workload(name: str, steps: int) -> dict:
    base = {
        "name": f"flower-bench-{name}",
        "model": "minilm",
        "dataset": "ag_news",
        "method": "lora",
        "algorithm": "fedavg",
        "rounds": 3,
        "lr": 5e-3,
        "max_seq_len": 64,
        "partition": "dirichlet",
        "alpha": 1.0,
        "max_test_samples": 300,
        "seed": 0,
    }
    if name == "training":
        return {
            **base,
            "num_clients": 5,  # a deployed node is one client: 5 SuperNodes
            "clients_per_round": 5,
            "local_steps": steps,
            "batch_size": 16,
            "max_train_samples": 2000,
        }
    return {  # cross-device: many clients, little work each
        **base,
        "num_clients": 1000,
        "clients_per_round": 100,
        "local_steps": 2,
        "batch_size": 8,
        "max_train_samples": 10000,
    }


def tree_memory(root: psutil.Process) -> int:
    """PSS (else RSS) bytes of ``root`` and all its descendants."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


ROLES = (  # a process's role, by what its command line holds (first match)
    ("flower-superlink", "superlink"),
    ("flower-supernode", "supernodes"),
    ("flower_executor", "executors"),
    ("flower executor", "executors"),
    ("flower_worker", "workers"),
    ("flwr-serverapp", "serverapp"),
    ("flwr-simulation", "simulation"),
    ("flwr-clientapp", "clientapps"),
    ("ray::", "ray"),
    ("/ray/", "ray"),
    ("flwr", "flwr cli"),
)


def role(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "fedpeft command"
    try:
        line = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    return next((name for key, name in ROLES if key in line), "other")


def measure(argv: list[str], log: Path, env: dict | None = None, run: Path | None = None) -> dict:
    """Run a command; its wall seconds, peak memory of its process tree, process count, the CPU
    seconds of each role of process (sampled every 0.5 s: a process's last half second may be
    missed) and, from the run folder's metrics file, when its first and last rounds were
    written (seconds from the start)."""
    peak, most = 0, 0
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds so far)
    written: list[float] = []  # when metrics.jsonl grew
    started = time.perf_counter()
    with open(log, "w") as out:
        env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        root = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, most
            size = 0
            while not done.is_set():
                try:
                    peak = max(peak, tree_memory(root))
                    procs = [root, *root.children(recursive=True)]
                    most = max(most, len(procs))
                except psutil.NoSuchProcess:
                    return
                for child in procs:
                    try:
                        times = child.cpu_times()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    name = cpu[child.pid][0] if child.pid in cpu else role(child, root)
                    cpu[child.pid] = (name, times.user + times.system)
                metrics = run / "metrics.jsonl" if run else None
                grown = metrics.stat().st_size if metrics and metrics.is_file() else 0
                if grown > size:
                    size = grown
                    written.append(time.perf_counter() - started)
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}); see {log}")
    by_role: dict[str, float] = {}
    for name, seconds in cpu.values():
        by_role[name] = by_role.get(name, 0.0) + seconds
    return {
        "wall_s": wall,
        "peak_bytes": peak,
        "processes": most,
        "cpu_s": by_role,
        "first_row_s": written[0] if written else None,
        "last_row_s": written[-1] if written else None,
    }


def time_split(r: dict) -> dict[str, float] | None:
    """Where a run's wall clock went: before its first round began, in its rounds (the clients'
    part: waiting on their answers; the server's: the rest, aggregation and evaluation), between
    rounds, and after its last round's row."""
    metrics = rows(r["folder"])
    if r.get("first_row_s") is None or not metrics:
        return None
    in_rounds = sum(m["wall_time_s"] for m in metrics)
    clients = sum(m.get("train_wall_s") or 0.0 for m in metrics)
    before = r["first_row_s"] - metrics[0]["wall_time_s"]
    span = r["last_row_s"] - before
    return {
        "before": before,
        "clients": clients,
        "server": in_rounds - clients,
        "between": max(0.0, span - in_rounds),
        "after": r["wall_s"] - r["last_row_s"],
    }


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def mean_of(run: Path, key: str, first_round_only: bool = False) -> float | None:
    values = [r[key] for r in rows(run) if r.get(key) is not None]
    if first_round_only:
        values = values[:1]
    return sum(values) / len(values) if values else None


def commands(config: Path, nodes: int) -> dict[str, tuple[list[str], dict]]:
    """Each engine's command line and extra environment."""
    fedpeft = [sys.executable, "-m", "fedpeft.cli"]
    local = [*fedpeft, "flower", "local", str(config), "--set", "flower.insecure=true"]
    local += ["--set", f"flower.min_nodes={nodes}", "--nodes", str(nodes)]
    deploy = [*local, "--out"]
    return {
        "embedded": ([*fedpeft, "run", str(config), "--quiet", "--out"], {}),
        "flower simulation": (
            [*fedpeft, "run", str(config), "--quiet", "--set", "engine=flower", "--out"],
            {},
        ),
        "flower deployment": (deploy, {}),
        "flower deployment, an Array per tensor": (deploy, {"FEDPEFT_FLOWER_PACK": "0"}),
        "flower deployment, each worker imports the engine": (deploy, {"FEDPEFT_NODE_FORK": "0"}),
        "flower deployment, rounds one after the other, worker started by the first message": (
            [*local, "--set", "flower.send_ahead=false", "--out"],
            {"FEDPEFT_NODE_WARM": "0"},
        ),
        "flower deployment, process per message": (deploy, {"FEDPEFT_NODE_EXECUTOR": "0"}),
        "flower deployment, no executor or worker": (
            deploy,
            {"FEDPEFT_NODE_EXECUTOR": "0", "FEDPEFT_NODE_WORKER": "0"},
        ),
    }


ENGINES = {
    "training": [
        "embedded",
        "flower simulation",
        "flower deployment",
        "flower deployment, each worker imports the engine",
        "flower deployment, rounds one after the other, worker started by the first message",
        "flower deployment, an Array per tensor",
        "flower deployment, process per message",
        "flower deployment, no executor or worker",
    ],
    "cross-device": ["embedded", "flower simulation"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="local steps (training workload)")
    parser.add_argument("--only", choices=list(ENGINES), help="one workload")
    parser.add_argument(
        "--engine", action="append", help="run this engine (repeatable; embedded always runs)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "flower.md"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    results: dict[str, dict[str, dict]] = {}
    for name, engines in ENGINES.items():
        if args.only and name != args.only:
            continue
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(workload(name, args.steps)))
        lines = commands(config, workload(name, args.steps)["num_clients"])
        results[name] = {}
        chosen = set(args.engine) | {"embedded"} if args.engine else set(engines)
        for engine in [e for e in engines if e in chosen]:
            argv, env = lines[engine]
            folder = work / f"{name}-{engine.replace(' ', '-').replace(',', '')}"
            print(f"{name}: running {engine} ...", flush=True)
            result = measure([*argv, str(folder)], work / f"{folder.name}.log", env, folder)
            summary = json.loads((folder / "summary.json").read_text())
            result.update(
                accuracy=summary["test_accuracy_at_best_val"],
                bytes=summary["bytes_up_total"] + summary["bytes_down_total"],
                folder=folder,
            )
            results[name][engine] = result
            print(f"  {result}", flush=True)
    Path(args.out).write_text(report(results, args))
    print(Path(args.out).read_text())


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "## Flower engine vs embedded engine",
        "",
        "Workloads (MiniLM + LoRA r8 on AG News, seq 64, 300 test rows, 3 rounds): **training**, "
        f"5 clients (Dirichlet 1.0), all in every round, {args.steps} local steps of batch 16; "
        "**cross-device**, 1,000 clients, 100 per round, 2 local steps of batch 8. Each engine "
        "ran as its own `fedpeft` command, one after the other; peak memory is the PSS of the "
        "command and all processes under it, sampled every 0.5 s. Deployment: "
        "`fedpeft flower local` with one SuperNode per client on 127.0.0.1, no TLS, each on its "
        "own rows, each node's ClientApps in fedpeft's executor handing the work to the node's "
        "worker (started as the node starts), a message's tensors packed in one Array, a "
        "round's messages sent before the round before it is evaluated; 'rounds one after the "
        "other, worker started by the first message' is the same with "
        "`flower.send_ahead: false` and `FEDPEFT_NODE_WARM=0`; 'an Array per tensor' is the same "
        "with `FEDPEFT_FLOWER_PACK=0` (Flower's own `ArrayRecord` layout: an object, and a "
        "request on each hop, per tensor); "
        "'process per message' is the same with `FEDPEFT_NODE_EXECUTOR=0` (Flower "
        "starts a `flwr-clientapp` process per message, which relays to the worker); 'no "
        "executor or worker' adds `FEDPEFT_NODE_WORKER=0` (every message imports the engine and "
        "builds the job in its own process).",
    ]
    for name, runs in results.items():
        base = runs["embedded"]
        lines += [
            "",
            f"### {name}",
            "",
            "| engine | wall clock | peak memory (all processes) | processes | acc (test, round best on validation) | bytes "
            "| wall vs embedded | memory vs embedded |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for engine, r in runs.items():
            lines.append(
                f"| {engine} | {r['wall_s']:.0f} s | {r['peak_bytes'] / 2**20:.0f} MiB | "
                f"{r['processes']} | {r['accuracy']:.4f} | {r['bytes']:,} | "
                f"{r['wall_s'] / base['wall_s']:.2f}x | "
                f"{r['peak_bytes'] / base['peak_bytes']:.2f}x |"
            )
        lines += [
            "",
            "Where the wall clock went: *before* the first round began (imports, the job, "
            "processes starting, nodes connecting), the rounds' *clients* (waiting on their "
            "answers) and *server* (aggregation, evaluation, the round's row and checkpoint), "
            "*after* the last round's row (summary, plots, processes stopping); and the CPU "
            "seconds of each kind of process (sampled every 0.5 s).",
            "",
            "| engine | before | clients | server | between rounds | after | CPU seconds by process |",
            "|---|---|---|---|---|---|---|",
        ]
        for engine, r in runs.items():
            split = time_split(r)
            cells = [DASH] * 5 if split is None else [f"{v:.1f} s" for v in split.values()]
            cpu = ", ".join(
                f"{name} {seconds:.0f}"
                for name, seconds in sorted(r["cpu_s"].items(), key=lambda kv: -kv[1])
                if seconds >= 0.5
            )
            lines.append(f"| {engine} | {' | '.join(cells)} | {cpu} |")
        breakdown = [
            (engine, r) for engine, r in runs.items() if engine.startswith("flower deployment")
        ]
        if breakdown:
            lines += [
                "",
                "Per message, mean over the run's messages (a deployment's ClientApp reports "
                "them): *start* from the executor taking the task (pulling the message; the "
                "app's installation the first time), or from the `flwr-clientapp` process's "
                "start (interpreter, Flower's imports), to the ClientApp's code; *load* building "
                "the job (model, rows; paid once per node with the "
                "worker, which the first message also starts); *relay* handing the message to "
                "the worker and back; *train* the client step itself.",
                "",
                "| engine | start | load | relay | train | overhead (start + load + relay) |",
                "|---|---|---|---|---|---|",
            ]
            for engine, r in breakdown:
                parts = [
                    mean_of(r["folder"], f"client_{key}_s") for key in ("start", "load", "relay")
                ]
                train = mean_of(r["folder"], "client_train_s")
                cells = [DASH if v is None else f"{v:.2f} s" for v in [*parts, train]]
                overhead = sum(v for v in parts if v is not None)
                lines.append(f"| {engine} | {' | '.join(cells)} | {overhead:.2f} s |")
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load average at the end "
        f"{os.getloadavg()[0]:.1f}. Script: `benchmarks/flower_vs_embedded.py`.",
        "",
    ]
    return "\n".join(lines)


DASH = "—"


if __name__ == "__main__":
    main()
