"""The published number: test accuracy at the round best on validation, never a max over test."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job, default_validation_size, load_data
from fedpeft.runs import RunDir
from fedpeft.summary import headline, summarise
from tests.conftest import tiny_config


def _row(rnd, acc, val):
    return {"round": rnd, "accuracy": acc, "macro_f1": acc, "val_accuracy": val}


def test_headline_is_test_accuracy_at_the_best_validation_round():
    config = build_config({"rounds": 4})
    history = [_row(1, 0.5, 0.4), _row(2, 0.9, 0.5), _row(3, 0.6, 0.7), _row(4, 0.7, 0.7)]
    summary = summarise(config, history, 1, 2)
    assert summary["best_val_round"] == 3  # ties go to the earlier round
    assert summary["test_accuracy_at_best_val"] == 0.6
    assert headline(summary) == 0.6
    assert summary["oracle_best_test_accuracy"] == 0.9  # kept, but under a name that says so
    assert "best_accuracy" not in summary


def test_without_validation_the_headline_is_the_final_round_and_says_so():
    config = build_config({"rounds": 2, "validation_size": 0})
    history = [
        {"round": 1, "accuracy": 0.9, "macro_f1": 0.9},
        {"round": 2, "accuracy": 0.7, "macro_f1": 0.7},
    ]
    summary = summarise(config, history, 1, 2)
    assert headline(summary) == 0.7
    assert "no validation" in summary["headline_source"]


def test_validation_is_on_by_default():
    assert default_validation_size(240) == 60  # a quarter at most
    assert default_validation_size(2_000) == 200  # 10%
    assert default_validation_size(600) == 100  # at least 100
    assert default_validation_size(100_000) == 1_000  # at most 1,000


def test_default_validation_rows_are_held_out_of_train(toy_data):
    config = build_config(tiny_config(toy_data))
    _splits, train, _test, validation = load_data(config)
    assert len(validation) == 60 and len(train) == 180


def test_a_run_keeps_the_best_validation_weights(tmp_path, toy_data):
    config = build_config(tiny_config(toy_data, rounds=3, lr=5e-2))
    run = RunDir.create(tmp_path / "r", dump_config(config))
    summary = EmbeddedEngine(build_job(config), run).run()
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert summary["best_val_round"] == best["round"]
    assert summary["test_accuracy_at_best_val"] == best["accuracy"]
    saved = load_file(str(run.best_path))
    assert saved.keys() == load_file(str(run.weights_path)).keys()
    if best["round"] == 3:
        final = load_file(str(run.weights_path))
        assert all(torch.equal(saved[k], final[k]) for k in saved)


def test_a_config_without_lr_gets_the_methods_default():
    assert build_config({"method": "lora"}).lr == 1e-2
    assert build_config({"method": "full"}).lr == 5e-4
    assert build_config({"method": "prompt"}).lr == 5e-2
    assert build_config({"method": "lora", "lr": 1e-3}).lr == 1e-3
