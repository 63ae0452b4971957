"""Command line: ``fedpeft run | report | export | predict | privacy | list | demo | bench STUDY |
flower``.

User mistakes (config, data, model, run folder, payload) end with one line on stderr and exit
status 2; Ctrl-C leaves finished rounds intact and says how to resume (exit 130).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _user_errors() -> tuple[type[Exception], ...]:
    from fedpeft.config import ConfigError
    from fedpeft.data.sources import DataError
    from fedpeft.export import ExportError
    from fedpeft.models import ModelError
    from fedpeft.payload import PayloadError
    from fedpeft.report import ReportError
    from fedpeft.runs import RunDirError

    return (ConfigError, DataError, ModelError, RunDirError, PayloadError, ReportError, ExportError)


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _quiet_loading() -> None:
    """No transformers / hub progress bars (weight loading, shard writing)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [key for key in new if key not in old]
        changed = []
        for key in keys:
            changed += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [] if old == new else [prefix.rstrip(".")]


def _resume_config(run_dir, overrides: list[str] | None):
    """The run's config; ``--set rounds=N`` may extend it (nothing else may change on resume).

    Returns (config, new config.yaml text or None when unchanged)."""
    import yaml

    from fedpeft.config import ConfigError, load_config, read_yaml

    config = load_config(run_dir.config_path)
    if not overrides:
        return config, None
    wanted = load_config(run_dir.config_path, overrides)
    changed = _changed_keys(config.model_dump(mode="json"), wanted.model_dump(mode="json"))
    refused = [key for key in changed if key != "rounds"]
    if refused:
        raise ConfigError(
            f"--resume cannot change '{refused[0]}' (only rounds can be raised); "
            "start a new run for other settings"
        )
    if not changed:
        return config, None
    done = 0
    if run_dir.pointer_path.is_file():
        done = int(json.loads(run_dir.pointer_path.read_text()).get("round", 0))
    if wanted.rounds < done:
        raise ConfigError(
            f"rounds: the run has completed {done} rounds; --resume cannot set {wanted.rounds}"
        )
    data = read_yaml(run_dir.config_path)
    data["rounds"] = wanted.rounds
    return wanted, yaml.safe_dump(data, sort_keys=False)


def cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.config import ConfigError, dump_config, load_config
    from fedpeft.runs import RunDir, write_text

    if args.quiet:
        _quiet_loading()
    new_yaml = None
    if args.resume:
        run_dir = RunDir.open(Path(args.resume))
        if (run_dir.path / DEPLOYMENT_FILE).is_file():  # started on Flower deployment: resume there
            return _resume_deployment(args, run_dir)
        if args.config:
            raise ConfigError("--resume continues a run as configured; drop CONFIG")
        if args.out:
            raise ConfigError("--resume continues the run in its own folder; drop --out")
        config, new_yaml = _resume_config(run_dir, args.set)
    else:
        if not args.config:
            raise ConfigError("fedpeft run needs a CONFIG file (or --resume DIR)")
        config = load_config(args.config, args.set)
        run_dir = None
    if config.engine == "flower":  # what this machine cannot run, before any folder is written
        from fedpeft.engine.flower import check_supported

        check_supported(config)
    from fedpeft.job import build_job

    job = build_job(config)
    if run_dir is None:
        out = Path(args.out) if args.out else _default_out(config.run_name())
        run_dir = RunDir.create(out, dump_config(config))
    elif new_yaml is not None:
        write_text(run_dir.config_path, new_yaml)  # atomic: the old or the new file, never half
        print(f"rounds raised to {config.rounds} in {run_dir.config_path}", file=sys.stderr)
    return _execute(job, run_dir, quiet=args.quiet)


def _resume_deployment(args: argparse.Namespace, run_dir) -> int:
    """``fedpeft run --resume`` of a run started with ``fedpeft flower local``: the same."""
    from fedpeft.config import ConfigError

    started = json.loads((run_dir.path / DEPLOYMENT_FILE).read_text())
    if started["started_with"] != "fedpeft flower local":
        raise ConfigError(
            f"{run_dir.path} is deployed on your SuperLink: resume it with `{started['resume']}`"
        )
    print(
        f"{run_dir.path} was started with {started['started_with']}: resuming it there",
        file=sys.stderr,
    )
    local = argparse.Namespace(
        config=args.config,
        set=args.set,
        out=args.out,
        resume=args.resume,
        nodes=None,
        timeout=3600.0,
    )
    return cmd_flower_local(local)


def _execute(job, run_dir, quiet: bool) -> int:
    from fedpeft.progress import RunProgress

    _write_partition(job, run_dir)
    progress = RunProgress(job.config.rounds, job.config.clients_per_round, enabled=not quiet)
    if job.config.engine == "flower":
        from fedpeft.engine.flower import FlowerEngine as Engine
    else:
        from fedpeft.engine.local import EmbeddedEngine as Engine
    engine = Engine(job, run_dir, on_event=progress.event)
    failures: tuple[type[Exception], ...] = ()
    if job.config.engine == "flower":
        from fedpeft.engine.flower import SimulationFailed

        failures = (SimulationFailed,)
    try:
        with progress:
            summary = engine.run()
    except KeyboardInterrupt:
        print(
            f"interrupted after {_rounds_done(run_dir)} completed round(s); continue with: "
            f"fedpeft run --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 130
    except failures as err:
        print(
            f"error: {err}; {_rounds_done(run_dir)} completed round(s) kept; continue with: "
            f"fedpeft run --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 1
    _print_results(run_dir, summary["name"])
    return 0


def _rounds_done(run_dir) -> int:
    done = run_dir.load_checkpoint()
    return done.round if done else 0


def headline_line(summary: dict) -> str:
    """The run's published accuracy in words: which number it is and where it comes from."""
    from fedpeft.summary import headline

    value = headline(summary)
    if value is None:
        return "result: no evaluated round"
    if summary.get("best_val_round") is not None:
        return (
            f"result: test accuracy {100 * value:.1f}% at round {summary['best_val_round']}, the "
            f"round best on validation ({100 * summary['best_val_accuracy']:.1f}%)"
        )
    return f"result: final test accuracy {100 * value:.1f}% (no validation)"


def _print_results(run_dir, name: str) -> None:
    from fedpeft.plots import plot_run
    from fedpeft.report import comparison_table, load_run

    run = load_run(run_dir.path)
    plots = plot_run(run.metrics, run_dir.path, title=name)
    print(comparison_table([run]))
    if run.summary is not None:
        print(headline_line(run.summary))
    print(f"run folder: {run_dir.path}")
    print("plots: " + ", ".join(str(p) for p in plots))


def _partition_summary(job) -> dict:
    from fedpeft.data.partition import partition_summary

    summary = partition_summary(
        job.partition, job.train.labels.numpy(), job.test.labels.numpy(), len(job.label_names)
    )
    return summary


def _write_partition(job, run_dir) -> None:
    from fedpeft.plots import plot_partition
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


def cmd_export(args: argparse.Namespace) -> int:
    from fedpeft.export import BASE_FOLDER, export_run

    _quiet_loading()
    out = Path(args.out) if args.out else Path(args.run) / "export"
    result = export_run(Path(args.run), out, args.weights)
    print(f"exported the {result.kind} of {args.run} ({result.weights.name}) to {result.out}")
    if result.kind == "peft adapter":
        print(
            "load it with:\n"
            f'  base = AutoModelForSequenceClassification.from_pretrained("{out / BASE_FOLDER}", '
            "trust_remote_code=True)\n"
            f'  model = PeftModel.from_pretrained(base, "{out}")'
        )
    else:
        print(
            "load it with:\n"
            f'  model = AutoModelForSequenceClassification.from_pretrained("{out}", '
            "trust_remote_code=True)"
        )
    print(f"(see {out / 'README.md'} and docs/export.md)")
    return 0


def _shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_predict(args: argparse.Namespace) -> int:
    from fedpeft.config import ConfigError
    from fedpeft.export import load_run_model, predict, read_rows

    if bool(args.text) == bool(args.file):
        raise ConfigError("fedpeft predict needs --text TEXT (repeatable) or --file ROWS.jsonl")
    texts, pairs = (list(args.text), None) if args.text else read_rows(Path(args.file))
    _quiet_loading()
    run = load_run_model(Path(args.run), args.weights)
    print(f"# {run.weights}: label, probability, text", file=sys.stderr)
    for text, (label, prob) in zip(texts, predict(run, texts, pairs), strict=True):
        print(f"{label}\t{prob:.3f}\t{_shorten(text)}")
    return 0


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _field_lines(settings_class, indent: str = "    ") -> list[str]:
    """``name = default  description`` for each field of a pydantic settings class."""
    from pydantic_core import PydanticUndefined

    lines = []
    for name, field in settings_class.model_fields.items():
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = "(required)"
        text = f"{indent}{name} = {_shown(default)}"
        if field.description:
            text += f"  — {field.description}"
        lines.append(text)
    return lines


_ALGORITHM_SECTIONS = {
    "fedavg": ("", "weighted average of the clients' states"),
    "fedprox": ("fedprox", "FedAvg plus a proximal term on the clients"),
    "fedadam": ("fedopt", "FedAvg then a server Adam step"),
    "fedyogi": ("fedopt", "FedAvg then a server Yogi step"),
    "fedadagrad": ("fedopt", "FedAvg then a server Adagrad step"),
    "median": ("robust", "coordinate-wise median"),
    "trimmed_mean": ("robust", "coordinate-wise trimmed mean"),
    "krum": ("robust", "the one client state closest to its n - f - 2 neighbours (Blanchard 2017)"),
    "multi_krum": ("robust", "the mean of the m states with the best Krum scores"),
    "bulyan": ("robust", "Krum selection, then a per-coordinate trimmed mean (El Mhamdi 2018)"),
}


def list_text() -> str:
    """Methods and their settings, algorithms, bundled datasets, device and network profiles."""
    from fedpeft import config as config_module
    from fedpeft import cost, registry
    from fedpeft.algorithms import ALGORITHMS
    from fedpeft.paths import shared_data_dir

    lines = ["methods (method: NAME; settings under NAME:, e.g. lora: {r: 16}):"]
    for name, spec in registry.METHODS.items():
        lines.append(f"  {name}: {spec.summary} (default lr {spec.default_lr:g})")
        lines += _field_lines(spec.settings)
    lines += ["", "algorithms (algorithm: NAME):"]
    sections = {
        "fedprox": getattr(config_module, "FedProxSettings", None),
        "fedopt": getattr(config_module, "FedOptSettings", None),
        "robust": getattr(config_module, "RobustSettings", None),
    }
    for name in ALGORITHMS:
        section, what = _ALGORITHM_SECTIONS.get(name, ("", ""))
        lines.append(f"  {name}: {what}" + (f" (settings under {section}:)" if section else ""))
    for section, settings in sections.items():
        if settings is not None:
            lines.append(f"  {section}:")
            lines += _field_lines(settings)
    folder = shared_data_dir()
    found = sorted(p.name for p in folder.glob("*") if (p / "train.jsonl").is_file())
    lines += ["", f"datasets in {folder} (dataset: NAME; or a folder, a .jsonl/.csv file):"]
    none = "  (none: set FEDPEFT_DATA to a folder of datasets)"
    lines += [f"  {name}" for name in found] or [none]
    lines += ["", "device profiles (cost: {devices: [...]}):"]
    for device in cost.DEVICES.values():
        lines.append(f"  {device.name}: {device.flops_per_s / 1e9:g} GFLOP/s — {device.note}")
    lines += ["", "network profiles (cost: {networks: [...]}):"]
    for net in cost.NETWORKS.values():
        lines.append(
            f"  {net.name}: up {net.up_bytes_per_s * 8 / 1e6:g} Mbit/s, down "
            f"{net.down_bytes_per_s * 8 / 1e6:g} Mbit/s — {net.note}"
        )
    return "\n".join(lines) + "\n"


def cmd_list(args: argparse.Namespace) -> int:
    print(list_text(), end="")
    return 0


BENCH_STUDIES = ("autofednlp", "c2a", "fedpetuning", "fibecfed", "robustness")


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


def _flower_config(args: argparse.Namespace):
    """The config of a deployed run: ``engine: flower`` whatever the file says, so it is
    validated (and recorded) as a Flower run."""
    from fedpeft.config import load_config
    from fedpeft.engine.flower import check_supported

    config = load_config(args.config, [*(args.set or []), "engine=flower"])
    check_supported(config, simulation=False)
    return config


def cmd_privacy(args: argparse.Namespace) -> int:
    """The membership-inference attack (fedpeft/privacy.py) on a finished run's weights."""
    from fedpeft.privacy import measure_run

    _quiet_loading()
    result = measure_run(Path(args.run), args.weights, args.rows)
    print(
        f"membership inference (loss threshold) on the {result['mia_weights']} weights: attack "
        f"AUC {result['mia_auc']:.3f} over {result['mia_rows']} member and {result['mia_rows']} "
        f"non-member rows (mean loss {result['mia_member_loss']:.3f} vs "
        f"{result['mia_nonmember_loss']:.3f}; 0.5 = nothing leaks) -> {Path(args.run) / 'privacy.json'}"
    )
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
    import shlex

    from fedpeft.engine.flower_deploy import deployment_commands, read_credentials, write_app
    from fedpeft.runs import RunDir, write_json

    config = _flower_config(args)
    from fedpeft.config import dump_config
    from fedpeft.engine.flower_data import read_server_rows

    creds = None if config.flower.insecure else read_credentials(Path(args.certs))
    read_server_rows(config)  # the server's data: test (+ validation) rows and labels.json
    out = Path(args.out) if args.out else _default_out(config.run_name())
    run_dir = RunDir.create(out, dump_config(config))
    app_dir = Path(args.app or f"{run_dir.path}-flower-app")
    app = write_app(app_dir, config, run_dir.path, creds.ca_cert if creds else None)
    home = shlex.quote(str((app / "flwr-home").resolve()))
    resume = f"FLWR_HOME={home} flwr run {shlex.quote(str(app))} fedpeft --stream"
    started = {"started_with": "fedpeft flower prepare", "resume": resume}
    write_json(run_dir.path / DEPLOYMENT_FILE, started)
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


DEPLOYMENT_FILE = "deployment.json"  # in a deployed run's folder: how it was started


def _flower_local_resume(args: argparse.Namespace):
    """The config and run folder of an interrupted ``fedpeft flower local`` run."""
    from fedpeft.config import ConfigError
    from fedpeft.runs import RunDir, write_text

    run_dir = RunDir.open(Path(args.resume))
    if args.config or args.out:
        raise ConfigError(
            "--resume continues the run as configured, in its folder; drop CONFIG/--out"
        )
    config, new_yaml = _resume_config(run_dir, args.set)
    if config.engine != "flower":
        raise ConfigError(f"{run_dir.path} is an embedded run: resume it with fedpeft run --resume")
    if new_yaml is not None:
        write_text(run_dir.config_path, new_yaml)
    return config, run_dir


def _server_note(line: str) -> None:
    """A deployed ServerApp's own notes (a node that takes no part, or rejoined) to stderr."""
    from fedpeft.engine.flower import LOG_PREFIX

    if line.startswith(LOG_PREFIX):
        print(line.rstrip(), file=sys.stderr, flush=True)


def _written(path: Path):
    """Whether ``path`` was written (created or replaced) since this call: the final weights,
    the last file a run writes."""
    before = path.stat().st_mtime_ns if path.is_file() else None

    def written() -> bool:
        try:
            return path.stat().st_mtime_ns != before
        except FileNotFoundError:
            return False

    return written


def cmd_flower_local(args: argparse.Namespace) -> int:
    """The run as a real deployment on this machine: a SuperLink and SuperNode processes.
    Ctrl-C stops every process (the SuperLink first), keeps the completed rounds and prints the
    command that resumes the run on a local deployment again."""
    from fedpeft.engine.flower_worker import WorkerHost, use_worker_host

    # The nodes' workers are forked from one process that imports the engine once; started
    # first, it imports on the other core while this one reads the config and the data.
    host = WorkerHost() if use_worker_host() and args.nodes != 0 else None
    try:
        return _flower_local(args, host)
    finally:
        if host is not None:
            host.stop()


def _flower_local(args: argparse.Namespace, host) -> int:
    from fedpeft.config import ConfigError
    from fedpeft.engine.flower import check_supported
    from fedpeft.engine.flower_data import split_for_nodes
    from fedpeft.engine.flower_deploy import (
        FlowerError,
        LocalFederation,
        make_credentials,
        write_app,
    )
    from fedpeft.runs import write_json

    if args.resume:
        config, run_dir = _flower_local_resume(args)
        check_supported(config, simulation=False)
    elif not args.config:
        raise ConfigError("fedpeft flower local needs a CONFIG file (or --resume DIR)")
    else:
        config = _flower_config(args)
    nodes = config.num_clients if args.nodes is None else args.nodes
    if nodes != config.num_clients:
        raise ConfigError(
            f"--nodes: {nodes}, but num_clients is {config.num_clients}: each node owns one "
            "client's share of the data"
        )
    if config.flower.min_nodes > nodes:
        raise ConfigError(
            f"flower.min_nodes: the run waits for {config.flower.min_nodes} SuperNodes, but "
            f"--nodes starts {nodes}"
        )
    if not args.resume:
        run_dir = _flower_run(config, args.out)
        write_json(
            run_dir.path / DEPLOYMENT_FILE,
            {"started_with": "fedpeft flower local", "nodes": nodes},
        )
    work = Path(f"{run_dir.path}-flower")
    # Each node's share of the partition into its own folder; the server keeps test/validation.
    server_config, node_data = split_for_nodes(config, work / "data")
    flower = server_config.flower.model_copy(update={"min_nodes": nodes})
    app = write_app(work / "app", server_config.model_copy(update={"flower": flower}), run_dir.path)
    creds = None
    if not config.flower.insecure:
        creds = make_credentials(work / "credentials", num_nodes=nodes)
    try:
        with LocalFederation(work, nodes, creds, node_data, host=host) as federation:
            print(
                f"SuperLink on {federation.address}, {nodes} SuperNodes, each on its own data in {work / 'data'}; logs in {work}"
            )
            federation.run(app, args.timeout, _server_note, finished=_written(run_dir.weights_path))
    except FlowerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every process is stopped by now (the federation's exit)
        done = run_dir.load_checkpoint()
        print(
            f"interrupted after {done.round if done else 0} completed round(s); continue with: "
            f"fedpeft flower local --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 130
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

    run = sub.add_parser(
        "run",
        help="run one federated fine-tuning job",
        epilog="Methods, their settings and defaults, algorithms, datasets and cost profiles: "
        "fedpeft list",
    )
    run.add_argument("config", nargs="?", help="YAML config file")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted for nested keys)",
    )
    run.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an interrupted run folder; with --set rounds=N, extend a finished one",
    )
    run.add_argument(
        "--quiet", action="store_true", help="no progress display (nor model-loading bars)"
    )
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="compare run folders: markdown table and overlay plots")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for report.md and overlay plots")
    rep.set_defaults(func=cmd_report)

    weights_help = "which weights: best (on validation; the default when kept) or final"
    exp = sub.add_parser(
        "export",
        help="write a run's model as a peft adapter or transformers model folder",
        description="lora/prefix/prompt: a peft adapter folder (backbone in OUT/base); "
        "adapter/bitfit/full: a transformers model folder. Both load without fedpeft, with "
        "trust_remote_code=True (docs/export.md).",
    )
    exp.add_argument("run", help="run folder")
    exp.add_argument("--out", help="new folder to write (default: RUN/export)")
    exp.add_argument("--weights", choices=("best", "final"), help=weights_help)
    exp.set_defaults(func=cmd_export)

    pred = sub.add_parser("predict", help="label texts with a run's model")
    pred.add_argument("run", help="run folder")
    pred.add_argument("--text", action="append", help="a text to label (repeatable)")
    pred.add_argument("--file", help='JSONL file, one {"text": ...} (+ "text_pair") per line')
    pred.add_argument("--weights", choices=("best", "final"), help=weights_help)
    pred.set_defaults(func=cmd_predict)

    lst = sub.add_parser(
        "list", help="methods and their settings, algorithms, datasets, device/network profiles"
    )
    lst.set_defaults(func=cmd_list)

    demo = sub.add_parser("demo", help="the demo job: MiniLM + LoRA on ag_news, a few rounds")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.add_argument("--out")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    priv = sub.add_parser(
        "privacy", help="membership-inference attack AUC of a finished run's global model"
    )
    priv.add_argument("run", help="run folder")
    priv.add_argument("--weights", choices=("best", "final"), help=weights_help)
    priv.add_argument("--rows", type=int, default=200, help="member rows, and as many test rows")
    priv.set_defaults(func=cmd_privacy)

    bench = sub.add_parser("bench", help="run a benchmark study (benchmarks/<study>.py)")
    bench.add_argument("study", choices=BENCH_STUDIES, help="which study")
    bench.add_argument("--quick", action="store_true", help="tiny model, seconds: a plumbing check")
    bench.add_argument(
        "--out",
        help="results folder (default: under benchmarks/results; with --quick, under runs/)",
    )
    bench.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1[,V2]",
        help="run only matching cells, e.g. dataset=rte or method=lora,full (repeatable)",
    )
    bench.add_argument("--part", metavar="I/N", help="run the I-th of N slices of the cells")
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
    prepare.add_argument("config", help="YAML config file")
    local.add_argument("config", nargs="?", help="YAML config file")
    for cmd in (prepare, local):
        cmd.add_argument("--set", action="append", metavar="KEY=VALUE")
        cmd.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    prepare.add_argument("--app", help="Flower app folder (default: <out>-flower-app)")
    prepare.add_argument(
        "--certs", default="flower-certs", help="folder from `fedpeft flower certs`"
    )
    prepare.set_defaults(func=cmd_flower_prepare)
    local.add_argument(
        "--nodes", type=int, help="SuperNode processes, one per client (default: num_clients)"
    )
    local.add_argument(
        "--resume", metavar="DIR", help="continue an interrupted `fedpeft flower local` run"
    )
    local.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    local.set_defaults(func=cmd_flower_local)
    certs = flower_sub.add_parser(
        "certs", help="create a CA, a SuperLink certificate and SuperNode keys"
    )
    certs.add_argument("dir", nargs="?", default="flower-certs")
    certs.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs")
    certs.set_defaults(func=cmd_flower_certs)
    executor = flower_sub.add_parser(
        "executor",
        help="run a SuperNode's ClientApps in one long-lived process (beside "
        "`flower-supernode --isolation process`)",
    )
    executor.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    executor.add_argument("--superexec-auth-secret-file", help="the secret the SuperNode was given")
    executor.add_argument(
        "--parent-pid", type=int, help="end when this process (the SuperNode) does"
    )
    executor.set_defaults(func=cmd_flower_executor)
    return parser


def cmd_flower_executor(args: argparse.Namespace) -> int:
    """``fedpeft flower executor``: ``fedpeft.engine.flower_executor``."""
    from fedpeft.engine.flower_executor import execute

    return execute(args)


def _stop_on_terminate(_signum, _frame) -> None:
    """SIGTERM (``kill PID``) stops a run as Ctrl-C does: every process it started is stopped
    and only complete rounds are kept, instead of dying with its SuperLink left running."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_terminate)
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
