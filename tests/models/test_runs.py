"""Every PEFT method and seed system (C2A, FibecFed, AutoFedNLP) in the embedded engine, on each
model family; predictions from a run of another family (tests/test_export.py exports every family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.export import load_run_model, predict
from fedpeft.job import build_job
from fedpeft.models import FAMILIES, ModelError
from fedpeft.runs import RunDir
from tests.conftest import tiny_config

METHODS = ["lora", "adapter", "prefix", "prompt", "bitfit", "full"]
NAMES = [family.name for family in FAMILIES]


def spec(name: str) -> str:
    return "tiny" if name == "bert" else f"tiny-{name}"


def run_once(folder: Path, **config) -> tuple[dict, RunDir]:
    cfg = build_config(config)
    run = RunDir.create(folder, dump_config(cfg))
    return EmbeddedEngine(build_job(cfg), run).run(), run


def two_rounds(toy_data, name: str, **overrides) -> dict:
    settings = {"rounds": 2, "max_train_samples": 96, "max_test_samples": 32, **overrides}
    return tiny_config(toy_data, model=spec(name), **settings)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(tmp_path, toy_data, name, method):
    config = two_rounds(toy_data, name, method=method)
    if (name, method) == ("distilbert", "prefix"):
        with pytest.raises(ModelError, match="prefix-tuning"):
            run_once(tmp_path / "run", **config)
        return
    summary, _ = run_once(tmp_path / "run", **config)
    assert summary["rounds_completed"] == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["trainable_params"] > 0 and summary["bytes_up_total"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_c2a_runs_on_every_family(tmp_path, toy_data, name):
    summary, _ = run_once(tmp_path / "run", **two_rounds(toy_data, name, method="c2a", lr=3e-3))
    assert summary["rounds_completed"] == 2


@pytest.mark.parametrize("name", NAMES)
def test_fibecfed_runs_on_every_family(tmp_path, toy_data, name):
    config = two_rounds(
        toy_data,
        name,
        method="fibecfed",
        lora={"r": 4},
        fibecfed={"rescore_every": 10, "global_layers": 1, "top_neurons": 0.25},
    )
    summary, _ = run_once(tmp_path / "run", **config)
    assert summary["rounds_completed"] == 2


def test_a_decoder_run_predicts(tmp_path, toy_data):
    _, run = run_once(tmp_path / "run", **two_rounds(toy_data, "llama", method="lora"))
    model = load_run_model(run.path)
    rows = predict(model, ["the football team won the match", "shares fell"])
    assert len(rows) == 2 and all(label in model.label_names for label, _ in rows)


@pytest.mark.parametrize("name", NAMES)
def test_autofednlp_runs_on_every_family(tmp_path, toy_data, name):
    """Two trial periods with the activation cache: trial groups, depth/width candidates and the
    cached bottom layers all go through the family's description."""
    config = two_rounds(
        toy_data,
        name,
        method="autofednlp",
        rounds=2,
        num_clients=12,
        clients_per_round=2,
        max_train_samples=160,
        validation_size=40,
        autofednlp={"rounds_per_period": 2, "start_depth": 1},
        activation_cache={"enabled": True, "dtype": "fp32"},
    )
    summary, run = run_once(tmp_path / "run", **config)
    assert summary["rounds_completed"] == 2
    trials = (run.path / "trials.jsonl").read_text().splitlines()
    assert len(trials) == 2
    first, second = (json.loads(line)["candidates"] for line in trials)
    assert {c["name"] for c in first} == {"shallow", "deep", "wide"}  # from depth 1
    assert 2 <= len(second) <= 3  # no "deep" once the tiny model's layers are all trained
    assert all(c["rounds"] >= 2 for c in first + second)
