"""Shared fixtures: a small synthetic text dataset in the shared-data layout, and tiny configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOPICS = {
    0: ["football", "match", "goal", "team", "league", "coach"],
    1: ["market", "stock", "bank", "profit", "shares", "price"],
    2: ["computer", "software", "chip", "internet", "robot", "phone"],
    3: ["election", "minister", "war", "president", "treaty", "army"],
}
FILLER = ["the", "a", "today", "new", "report", "says", "on", "after", "big", "week"]


def _rows(n: int, seed: int, pairs: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, len(TOPICS)))
        words = list(rng.choice(TOPICS[label], size=3)) + list(rng.choice(FILLER, size=4))
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": label}
        if pairs:
            row["text_pair"] = " ".join(rng.choice(FILLER, size=3))
        row["lang"] = ["en", "de"][i % 2]
        rows.append(row)
    return rows


def write_dataset(folder: Path, n_train: int = 240, n_test: int = 80, pairs: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        with open(folder / f"{name}.jsonl", "w") as fh:
            for row in _rows(n, seed, pairs):
                fh.write(json.dumps(row) + "\n")
    (folder / "labels.json").write_text(json.dumps(["sports", "business", "tech", "world"]))
    return folder


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "toy")


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "toy_pairs", pairs=True)


def tiny_config(dataset: Path, **overrides) -> dict:
    """A config dict for the tiny random BERT on the toy data: seconds per run."""
    config = {
        "model": "tiny",
        "dataset": str(dataset),
        "method": "lora",
        "num_clients": 4,
        "clients_per_round": 2,
        "rounds": 2,
        "batch_size": 16,
        "lr": 5e-3,
        "max_seq_len": 24,
        "partition": "iid",
        "eval_batch_size": 64,
    }
    config.update(overrides)
    return config


def needs_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (real-data tests need ../shared/data)")
    return path
