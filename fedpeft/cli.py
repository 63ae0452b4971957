"""Command line: ``fedpeft run | report | demo``.

User mistakes (config, data, model, run folder, payload) end with one line on stderr and exit
status 2; Ctrl-C leaves finished rounds intact and says how to resume (exit 130).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _user_errors() -> tuple[type[Exception], ...]:
    from fedpeft.config import ConfigError
    from fedpeft.data.sources import DataError
    from fedpeft.models import ModelError
    from fedpeft.payload import PayloadError
    from fedpeft.report import ReportError
    from fedpeft.runs import RunDirError

    return (ConfigError, DataError, ModelError, RunDirError, PayloadError, ReportError)


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.config import ConfigError, dump_config, load_config
    from fedpeft.runs import RunDir

    if args.resume:
        run_dir = RunDir.open(Path(args.resume))
        if args.config or args.set:
            raise ConfigError("--resume continues a run as configured; drop CONFIG and --set")
        config = load_config(run_dir.config_path)
    else:
        if not args.config:
            raise ConfigError("fedpeft run needs a CONFIG file (or --resume DIR)")
        config = load_config(args.config, args.set)
        run_dir = None
    from fedpeft.job import build_job

    job = build_job(config)
    if run_dir is None:
        out = Path(args.out) if args.out else _default_out(config.run_name())
        run_dir = RunDir.create(out, dump_config(config))
    return _execute(job, run_dir, quiet=args.quiet)


def _execute(job, run_dir, quiet: bool) -> int:
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.plots import plot_run
    from fedpeft.progress import RunProgress
    from fedpeft.report import comparison_table, load_run

    _write_partition(job, run_dir)
    progress = RunProgress(job.config.rounds, job.config.clients_per_round, enabled=not quiet)
    engine = EmbeddedEngine(job, run_dir, on_event=progress.event)
    try:
        with progress:
            summary = engine.run()
    except KeyboardInterrupt:
        done = run_dir.load_checkpoint()
        rounds = done.round if done else 0
        print(
            f"interrupted after {rounds} completed round(s); continue with: "
            f"fedpeft run --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 130
    metrics = load_run(run_dir.path).metrics
    plots = plot_run(metrics, run_dir.path, title=summary["name"])
    print(comparison_table([load_run(run_dir.path)]))
    print(f"run folder: {run_dir.path}")
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def _partition_summary(job) -> dict:
    from fedpeft.data.partition import partition_summary

    summary = partition_summary(
        job.partition, job.train.labels.numpy(), job.test.labels.numpy(), len(job.label_names)
    )
    return summary


def _write_partition(job, run_dir) -> None:
    from fedpeft.data.partition import plot_partition
    from fedpeft.runs import write_json

    summary = _partition_summary(job)
    write_json(run_dir.path / "partition.json", summary)
    plot_partition(summary, run_dir.path / "partition.png", job.label_names)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpeft.report import report

    out = Path(args.out) if args.out else None
    print(report([Path(p) for p in args.runs], out))
    if out is not None:
        print(f"report and overlay plots written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedpeft.paths import REPO_ROOT, shared_data_dir

    demo_config = REPO_ROOT / "configs" / "demo.yaml"
    overrides = list(args.set or [])
    if (
        not any(o.startswith("dataset=") for o in overrides)
        and not (shared_data_dir() / "ag_news").is_dir()
    ):
        print(
            f'demo data {shared_data_dir() / "ag_news"} not found: run `make demo ARGS="--set dataset=PATH"` '
            "with PATH a folder of train.jsonl/test.jsonl (+labels.json), or set FEDPEFT_DATA",
            file=sys.stderr,
        )
        return 2
    ns = argparse.Namespace(
        config=str(demo_config),
        set=overrides,
        out=args.out or str(_default_out("demo")),
        resume=None,
        quiet=args.quiet,
    )
    return cmd_run(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated fine-tuning job")
    run.add_argument("config", nargs="?", help="YAML config file")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted for nested keys)",
    )
    run.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run folder")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="compare run folders: markdown table and overlay plots")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for report.md and overlay plots")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="the demo job: MiniLM + LoRA on ag_news, a few rounds")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.add_argument("--out")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # partitioner and settings checks raise plain ValueErrors
        if os.environ.get("FEDPEFT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
