"""Command line: ``fedpeft run | report | demo | bench STUDY | flower ...``.

User mistakes (config, data, model, run folder, payload) end with one line on stderr and exit
status 2; Ctrl-C leaves finished rounds intact and says how to resume (exit 130).
"""

from __future__ import annotations

import argparse
import json
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
    from fedpeft.progress import RunProgress

    _write_partition(job, run_dir)
    progress = RunProgress(job.config.rounds, job.config.clients_per_round, enabled=not quiet)
    if job.config.engine == "flower":
        from fedpeft.engine.flower import FlowerEngine as Engine
    else:
        from fedpeft.engine.local import EmbeddedEngine as Engine
    engine = Engine(job, run_dir, on_event=progress.event)
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
    _print_results(run_dir, summary["name"])
    return 0


def _print_results(run_dir, name: str) -> None:
    from fedpeft.plots import plot_run
    from fedpeft.report import comparison_table, load_run

    metrics = load_run(run_dir.path).metrics
    plots = plot_run(metrics, run_dir.path, title=name)
    print(comparison_table([load_run(run_dir.path)]))
    print(f"run folder: {run_dir.path}")
    print("plots: " + ", ".join(str(p) for p in plots))


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


BENCH_STUDIES = ("autofednlp", "fedpetuning")


def cmd_bench(args: argparse.Namespace) -> int:
    """Import ``benchmarks/<study>.py`` from the repository and call its ``main(quick, out)``,
    plus ``--only``/``--part``/``--report-only`` for studies whose ``main`` takes them."""
    import importlib
    import inspect

    from fedpeft.paths import REPO_ROOT

    folder = REPO_ROOT / "benchmarks"
    if not (folder / f"{args.study}.py").is_file():
        print(f"error: benchmark script {folder / args.study}.py not found", file=sys.stderr)
        return 2
    sys.path.insert(0, str(folder))  # by name, so worker processes can import it too
    module = importlib.import_module(args.study)
    extra = {"only": args.only, "part": args.part, "report_only": args.report_only}
    extra = {key: value for key, value in extra.items() if value}
    accepted = inspect.signature(module.main).parameters
    unsupported = [key for key in extra if key not in accepted]
    if unsupported:
        flags = ", ".join("--" + key.replace("_", "-") for key in unsupported)
        print(f"error: study {args.study} does not take {flags}", file=sys.stderr)
        return 2
    module.main(quick=args.quick, out=Path(args.out) if args.out else None, **extra)
    return 0


def _flower_run(config, out: str | None):
    """A new run folder for a deployed run, once its job builds (data and model are there)."""
    from fedpeft.config import dump_config
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir

    job = build_job(config)
    run_dir = RunDir.create(
        Path(out) if out else _default_out(config.run_name()), dump_config(config)
    )
    _write_partition(job, run_dir)
    return run_dir


def cmd_flower_prepare(args: argparse.Namespace) -> int:
    """Write the Flower app for a deployment and print the commands that run it."""
    from fedpeft.config import load_config
    from fedpeft.engine.flower_deploy import deployment_commands, read_credentials, write_app

    config = load_config(args.config, args.set)
    creds = None if config.flower.insecure else read_credentials(Path(args.certs))
    run_dir = _flower_run(config, args.out)
    app_dir = Path(args.app or f"{run_dir.path}-flower-app")
    app = write_app(app_dir, config, run_dir.path, creds.ca_cert if creds else None)
    print(f"Flower app: {app}\nrun folder (on the SuperLink host): {run_dir.path}\n")
    print(deployment_commands(app, config, creds), end="")
    return 0


def cmd_flower_certs(args: argparse.Namespace) -> int:
    """Create a CA, a SuperLink certificate and SuperNode key pairs."""
    from fedpeft.engine.flower_deploy import make_credentials

    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    creds = make_credentials(Path(args.dir), hosts=hosts, num_nodes=args.nodes)
    print(f"CA certificate:        {creds.ca_cert}  (give to SuperNodes and the flwr CLI)")
    print(f"SuperLink certificate: {creds.server_cert}  (for {', '.join(hosts)})")
    print(f"SuperLink key:         {creds.server_key}  (keep on the SuperLink host)")
    for key in creds.node_keys:
        print(f"SuperNode key pair:    {key} + {key}.pub  (register the .pub)")
    return 0


def cmd_flower_local(args: argparse.Namespace) -> int:
    """The run as a real deployment on this machine: a SuperLink and SuperNode processes."""
    from fedpeft.config import load_config
    from fedpeft.engine.flower_deploy import (
        FlowerError,
        LocalFederation,
        make_credentials,
        write_app,
    )

    config = load_config(args.config, args.set)
    run_dir = _flower_run(config, args.out)
    work = Path(f"{run_dir.path}-flower")
    app = write_app(work / "app", config, run_dir.path)
    creds = None
    if not config.flower.insecure:
        creds = make_credentials(work / "credentials", num_nodes=args.nodes)
    try:
        with LocalFederation(work, args.nodes, creds) as federation:
            print(f"SuperLink on {federation.address}, {args.nodes} SuperNodes; logs in {work}")
            federation.run(app, timeout=args.timeout)
    except FlowerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not run_dir.summary_path.is_file():
        print(f"error: the run did not finish; see the logs in {work}", file=sys.stderr)
        return 2
    _print_results(run_dir, json.loads(run_dir.summary_path.read_text())["name"])
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

    bench = sub.add_parser("bench", help="run a benchmark study (benchmarks/<study>.py)")
    bench.add_argument("study", choices=BENCH_STUDIES, help="which study")
    bench.add_argument("--quick", action="store_true", help="tiny model, seconds: a plumbing check")
    bench.add_argument("--out", help="results folder (default: benchmarks/results)")
    bench.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1[,V2]",
        help="run only matching cells, e.g. dataset=rte or method=lora,full (repeatable; fedpetuning)",
    )
    bench.add_argument(
        "--part", metavar="I/N", help="run the I-th of N slices of the cells (fedpetuning)"
    )
    bench.add_argument(
        "--report-only", action="store_true", help="rewrite the report from finished cells only"
    )
    bench.set_defaults(func=cmd_bench)

    flower = sub.add_parser("flower", help="run on Flower: prepare a deployment, certificates")
    flower_sub = flower.add_subparsers(dest="flower_command", required=True)
    prepare = flower_sub.add_parser(
        "prepare", help="write the Flower app of a run and print the deployment commands"
    )
    local = flower_sub.add_parser(
        "local", help="deploy on this machine: SuperLink + SuperNodes on 127.0.0.1, then run"
    )
    for cmd in (prepare, local):
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("--set", action="append", metavar="KEY=VALUE")
        cmd.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    prepare.add_argument("--app", help="Flower app folder (default: <out>-flower-app)")
    prepare.add_argument(
        "--certs", default="flower-certs", help="folder from `fedpeft flower certs`"
    )
    prepare.set_defaults(func=cmd_flower_prepare)
    local.add_argument("--nodes", type=int, default=2, help="SuperNode processes")
    local.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    local.set_defaults(func=cmd_flower_local)
    certs = flower_sub.add_parser(
        "certs", help="create a CA, a SuperLink certificate and SuperNode keys"
    )
    certs.add_argument("dir", nargs="?", default="flower-certs")
    certs.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs")
    certs.set_defaults(func=cmd_flower_certs)
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
