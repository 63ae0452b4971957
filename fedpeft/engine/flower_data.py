"""Node-owned data in a Flower deployment: each SuperNode trains on its own rows only.

A SuperNode is started with ``--node-config "data-path=PATH name=NAME"``: PATH is a folder with
``train.jsonl`` (+ ``labels.json``) or one ``.jsonl``/``.csv`` file, in the usual row format. The
server holds only its test (and validation) rows: the config's ``dataset`` is a folder with
``test.jsonl``, ``labels.json`` and optionally ``validation.jsonl``; it needs no ``train.jsonl``.

Before round 1 the server asks every connected node to describe its data (a Flower ``query``
message): the node reads its rows and answers with its name, row count and label histogram, or
with the one-line reason its data cannot be used (that node then takes no part). The nodes that
answered become the run's clients, numbered in the order of their names, so a node keeps its
client number across restarts and resumes; a round samples among them as the embedded engine
samples clients, and the aggregate weighs each node by its row count. Rows never leave a node.

``split_for_nodes`` writes a job's partition as node folders (client k's training rows into
``node-k``) plus the server's folder: ``fedpeft flower local`` starts each node on its own folder,
and with one node per client the deployment reproduces the embedded run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedpeft import attacks, cost, peft, registry
from fedpeft.config import RunConfig
from fedpeft.data import sources
from fedpeft.data.partition import Partition
from fedpeft.data.sources import DataError, TextDataset, subsample
from fedpeft.data.tokenize import tokenize
from fedpeft.engine.flower_client import DATA_PATH  # noqa: F401 - node-config key, re-exported
from fedpeft.job import (
    Job,
    build_dp,
    build_faults,
    build_method,
    build_model,
    client_contexts,
    load_data,
    partition_of,
    training_settings,
)
from fedpeft.methods.base import ClientContext
from fedpeft.paths import shared_data_dir
from fedpeft.peft.base import trainable_state

NAME = "name"  # node-config key: the node's display name (default: its data folder's name)
NO_VALIDATION_CAP = 1000  # validation rows the server keeps when validation_size is not set


# -- reading data ---------------------------------------------------------------------------------
def _folder(dataset: str) -> Path:
    path = Path(dataset).expanduser()
    if not path.exists() and "/" not in dataset and not dataset.startswith("."):
        path = shared_data_dir() / dataset
    return path


def read_label_names(folder: Path) -> list[str]:
    names = sources._read_label_names(folder / "labels.json")
    if names is None:
        raise DataError(f"{folder / 'labels.json'}: missing (the label names every node shares)")
    return names


def _read_split(path: Path, label_names: list[str]) -> TextDataset:
    if path.suffix == ".csv":
        raw = sources._read_csv(path)
    else:
        raw = sources._read_jsonl(path)
    return sources._to_dataset(raw, label_names, None)


def read_node_rows(path: str | Path, label_names: list[str]) -> TextDataset:
    """A node's training rows (DataError, one line, when they are missing or malformed)."""
    path = Path(path).expanduser()
    file = path / "train.jsonl" if path.is_dir() else path
    if path.is_dir() and (path / "labels.json").is_file():
        if read_label_names(path) != label_names:
            raise DataError(f"{path / 'labels.json'}: label names differ from the server's")
    if not file.is_file():
        raise DataError(f"{file}: missing (node data is a folder with train.jsonl, or a file)")
    if file.suffix not in (".jsonl", ".csv"):
        raise DataError(f"{file}: unsupported file type '{file.suffix}' (use .jsonl or .csv)")
    rows = _read_split(file, label_names)
    if not len(rows):
        raise DataError(f"{file}: no rows")
    return rows


def server_label_names(config: RunConfig) -> list[str]:
    """The label names in the server's data folder."""
    folder = _folder(config.dataset)
    if not folder.is_dir():
        raise DataError(f"{folder}: the server's data is a folder with test.jsonl and labels.json")
    return read_label_names(folder)


def read_server_rows(config: RunConfig) -> tuple[list[str], TextDataset, TextDataset | None]:
    """The server's label names, test rows and validation rows (no training rows needed)."""
    names = server_label_names(config)
    folder = _folder(config.dataset)
    if not (folder / "test.jsonl").is_file():
        raise DataError(f"{folder / 'test.jsonl'}: missing (the server's test rows)")
    test = subsample(
        _read_split(folder / "test.jsonl", names), config.max_test_samples, config.seed
    )
    validation = None
    size = NO_VALIDATION_CAP if config.validation_size is None else config.validation_size
    if size and (folder / "validation.jsonl").is_file():
        validation = subsample(_read_split(folder / "validation.jsonl", names), size, config.seed)
    return names, test, validation


# -- jobs -----------------------------------------------------------------------------------------
def _job(
    config: RunConfig,
    label_names: list[str],
    splits: dict,
    partition: Partition,
    built: tuple | None = None,
) -> Job:
    """A Job from already-read rows (``splits``: name -> TextDataset; "train" may be absent);
    ``built``: the (model, tokenizer) of ``build_model`` for this config, if built already."""
    num_labels = len(label_names)
    model, tokenizer = built or build_model(config, num_labels)
    data = {name: tokenize(rows, tokenizer, config.max_seq_len) for name, rows in splits.items()}
    spec, settings = registry.get(config.method), config.method_settings()
    num_layers = len(peft.base.encoder_layers(model))
    caches = {}
    if config.activation_cache.enabled:
        from fedpeft.cache import ActivationCache

        c = config.activation_cache
        caches = {
            s: ActivationCache(d, c.dtype, c.max_bytes, c.store_hidden) for s, d in data.items()
        }
    train = data.get("train")
    return Job(
        config=config,
        model=model,
        train=train,  # None on the server: it holds no training rows
        test=data.get("test", train),  # a node scores nothing: its own rows stand in
        validation=data.get("validation"),
        label_names=list(label_names),
        partition=partition,
        method=build_method(config, num_layers, num_labels),
        training=training_settings(config),
        profiles=cost.assign_profiles(
            config.num_clients,
            config.cost.devices,
            config.cost.networks,
            config.seed,
            config.cost.device_weights,
            config.cost.network_weights,
        ),
        dims=cost.ModelDims.from_hf_config(getattr(model, "config", None), num_labels),
        num_layers=num_layers,
        extra_kv=spec.extra_kv(settings) if spec.extra_kv else 0,
        extra_tokens=spec.extra_tokens(settings) if spec.extra_tokens else 0,
        initial_state=trainable_state(model),
        caches=caches,
    )


def node_job(
    config: RunConfig, rows: TextDataset, cid: int, num_clients: int, built: tuple | None = None
) -> Job:
    """A node's job: all its rows are client ``cid``'s, one of ``num_clients`` (``built``: its
    model, built ahead)."""
    config = config.model_copy(update={"num_clients": num_clients})
    empty = np.zeros(0, dtype=np.int64)
    train = [np.arange(len(rows)) if k == cid else empty for k in range(num_clients)]
    partition = Partition(train, [empty] * num_clients, "node")
    job = _job(config, rows.label_names, {"train": rows}, partition, built)
    plans(job)  # a simulated attacker or local DP: the node applies it to its own upload
    labels = job.train.labels.numpy()
    job.clients = client_contexts(partition, labels, labels[:0], len(rows.label_names))
    job.method.setup(job.clients, len(rows.label_names))
    return job


def server_job(config: RunConfig) -> Job:
    """The server's job: model, method, test and validation rows; clients come with the nodes."""
    names, test, validation = read_server_rows(config)
    splits = {"test": test} if validation is None else {"test": test, "validation": validation}
    return _job(config, names, splits, Partition([], [], "nodes"))


def admit_nodes(job: Job, described: list[dict]) -> Job:
    """The server's job once the nodes have described their data (sorted by name: client k is
    ``described[k]``): as many clients as nodes, each with its row count and label histogram."""
    config = job.config
    k = len(described)
    job.config = config.model_copy(
        update={"num_clients": k, "clients_per_round": min(config.clients_per_round, k)}
    )
    num_labels = len(job.label_names)
    empty = np.zeros(0, dtype=np.int64)
    job.partition = Partition([np.arange(d["rows"]) for d in described], [empty] * k, "nodes")
    job.clients = [
        ClientContext(cid, d["rows"], np.asarray(d["label_counts"]), None, 0, np.zeros(num_labels))
        for cid, d in enumerate(described)
    ]
    job.profiles = cost.assign_profiles(
        k,
        config.cost.devices,
        config.cost.networks,
        config.seed,
        config.cost.device_weights,
        config.cost.network_weights,
    )
    job.method.setup(job.clients, num_labels)
    plans(job)
    return job


def plans(job: Job) -> None:
    """The run's simulated attackers, faults and DP for its clients, drawn from the seed as
    the embedded engine draws them (once the number of clients is known). The server decides
    crashes, stragglers and the deadline, and clips and noises under central DP; a node that
    the plan makes an attacker poisons its own upload, and under local DP randomises it."""
    config = job.config
    a = config.attack
    job.attack = attacks.plan_attack(a.type, a.fraction, config.num_clients, config.seed, a.scale)
    job.faults = build_faults(config)
    job.dp = build_dp(config)


def nodes_summary(job: Job, described: list[dict]) -> dict:
    """partition.json of a deployed run: what each node said about its rows."""
    num_labels = len(job.label_names)
    clients = [
        {
            "client": cid,
            "name": d["name"],
            "train_size": d["rows"],
            "test_size": 0,
            "train_label_counts": list(d["label_counts"]),
            "test_label_counts": [0] * num_labels,
        }
        for cid, d in enumerate(described)
    ]
    return {
        "scheme": "nodes (each node's own data)",
        "num_clients": len(clients),
        "num_labels": num_labels,
        "clients": clients,
        "totals": {
            "train_rows": sum(c["train_size"] for c in clients),
            "test_rows": len(job.test),
            "train_assigned": sum(c["train_size"] for c in clients),
        },
    }


# -- one folder per node --------------------------------------------------------------------------
def _write_rows(path: Path, rows: TextDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(rows.texts):
            row: dict = {"text": text, "label": int(rows.labels[i])}
            if rows.text_pairs is not None:
                row["text_pair"] = rows.text_pairs[i]
            if rows.langs is not None:
                row["lang"] = rows.langs[i]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def node_name(cid: int) -> str:
    return f"node-{cid:03d}"  # zero-padded: sorting the names keeps the clients' order


def split_for_nodes(config: RunConfig, folder: Path) -> tuple[RunConfig, list[Path]]:
    """Client k's training rows (the config's partition) into ``folder/node-k``; the test and
    validation rows into ``folder/server``. Returns the server's config and the node folders."""
    splits, train, test, validation = load_data(config)
    partition = partition_of(config, train, test)
    names = json.dumps(list(splits.train.label_names))
    nodes = []
    for cid, rows in enumerate(partition.train):
        node = folder / node_name(cid)
        _write_rows(node / "train.jsonl", train.subset(rows))
        (node / "labels.json").write_text(names)
        nodes.append(node)
    server = folder / "server"
    _write_rows(server / "test.jsonl", test)
    if validation is not None:
        _write_rows(server / "validation.jsonl", validation)
    (server / "labels.json").write_text(names)
    update = {
        "dataset": str(server.resolve()),
        "max_test_samples": None,
        "validation_size": len(validation) if validation is not None else 0,
    }
    return config.model_copy(update=update), nodes
