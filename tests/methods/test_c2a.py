"""The C2A seed system through the embedded engine: a run, exact resume, its label conditions,
its charged work, personalised and per-group scores recomputed by hand, and the Flower refusal."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.algorithms import make_algorithm
from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.methods.base import ClientContext
from fedpeft.methods.c2a import C2A
from fedpeft.models import load_model
from fedpeft.peft import hyperadapter
from fedpeft.peft.base import load_trainable_state
from fedpeft.peft.hyperadapter import C2ASettings
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


def c2a_config(toy_data: Path, **overrides) -> dict:
    return tiny_config(toy_data, method="c2a", lr=3e-3, **overrides)


def run_once(folder: Path, config: dict, on_event=None) -> tuple[dict, RunDir]:
    cfg = build_config(config)
    run = RunDir.create(folder, dump_config(cfg))
    return EmbeddedEngine(build_job(cfg), run, on_event=on_event).run(), run


def metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


def test_two_rounds_exchange_the_hypernetwork_and_head(tmp_path, toy_data):
    summary, run = run_once(tmp_path / "r", c2a_config(toy_data))
    assert [r["round"] for r in metrics(run)] == [1, 2]
    weights = load_file(str(run.weights_path))
    assert {k.split(".")[0] for k in weights} == {"c2a", "classifier"}
    assert {"c2a.lower", "c2a.higher", "c2a.bias", "c2a.b1", "c2a.b2"} <= weights.keys()
    assert sum(t.numel() for t in weights.values()) == summary["trainable_params"]
    assert metrics(run)[0]["bytes_up"] > 0 and summary["sim_time_total_s"] > 0


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, toy_data):
    config = c2a_config(toy_data, algorithm="fedadam")
    run_once(tmp_path / "ref", config)

    def stop_in_round_2(kind, info):
        if kind == "client" and info["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_once(tmp_path / "cut", config, on_event=stop_in_round_2)
    run = RunDir(tmp_path / "cut")
    assert [r["round"] for r in metrics(run)] == [1]
    EmbeddedEngine(build_job(build_config(config)), run).run()
    reference = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    resumed = load_file(str(run.weights_path))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def system(label_input: str) -> C2A:
    method = C2A(C2ASettings(label_input=label_input), make_algorithm("fedavg"), num_layers=2)
    counts = [np.array([3, 1, 0, 0]), np.array([0, 0, 2, 2])]
    method.setup(
        [ClientContext(cid, int(c.sum()), c, None, 4, c) for cid, c in enumerate(counts)],
        num_labels=4,
    )
    return method


@pytest.mark.parametrize("label_input", ["batch", "client"])
def test_label_condition_per_phase(label_input):
    method = system(label_input)
    batch = {"labels": torch.tensor([1, 1, 2, 3])}
    train = method.label_input(batch, training=True, cid=0)
    personal = method.label_input(batch, training=False, cid=1)
    assert method.label_input(batch, training=False, cid=None) is None  # global: uniform
    if label_input == "batch":
        assert train.tolist() == [0.0, 0.5, 0.25, 0.25]
        assert personal is None
    else:
        assert train.tolist() == [0.75, 0.25, 0.0, 0.0]
        assert personal.tolist() == [0.0, 0.0, 0.5, 0.5]


def test_training_batches_charge_the_generation_work():
    model = hyperadapter.inject(load_model("tiny", 4, seed=0)[0], C2ASettings())
    method = system("batch")
    charged = []
    session = SimpleNamespace(charge=charged.append)
    method.begin_client(session)
    batch = {"labels": torch.tensor([0, 1]), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    for _ in range(3):
        method.condition(model, batch, np.arange(2), training=True, cid=0)
    method.condition(model, batch, np.arange(2), training=False, cid=None)  # evaluation: free
    method.end_client(session)
    one = hyperadapter.generation_flops(
        C2ASettings(),
        hidden=64,
        num_labels=4,
        num_layers=2,
        batch_size=2,
        seq_len=10,
        training=True,
    )
    assert charged == [pytest.approx(3 * one)]


def _score_by_hand(job, rows: np.ndarray, label_dist) -> np.ndarray:
    """Per-row correctness, batching as the engine's evaluation does (rows sorted by length):
    the context is a batch mean, so batch composition is part of C2A's prediction."""
    order = rows[np.argsort(job.test.lengths[rows].numpy(), kind="stable")]
    correct = np.zeros(len(job.test), dtype=bool)
    job.model.eval()
    size = job.config.eval_batch_size
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = job.test.batch(chunk)
        hyperadapter.set_condition(job.model, label_dist)
        with torch.no_grad():
            logits = job.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            ).logits
        correct[chunk] = (logits.argmax(-1) == batch["labels"]).numpy()
    return correct


def test_personalised_and_group_scores_match_a_hand_computation(tmp_path, toy_data):
    config = c2a_config(
        toy_data,
        c2a={"label_input": "client"},
        partition="natural",
        partition_field="lang",
        personalized_eval=True,
        eval_batch_size=16,
    )
    summary, run = run_once(tmp_path / "p", config)
    job = build_job(build_config(config))
    load_trainable_state(job.model, load_file(str(run.weights_path)))

    # global evaluation: uniform label input, all test rows, accuracy per language
    correct = _score_by_hand(job, np.arange(len(job.test)), None)
    groups = np.asarray(job.test_groups)
    expected = {g: float(correct[groups == g].mean()) for g in sorted(set(groups))}
    last = metrics(run)[-1]
    assert last["group_accuracy"] == pytest.approx(expected)
    assert last["accuracy"] == pytest.approx(correct.mean())

    # personalised: each client's own test rows, conditioned on its own label histogram
    accs, by_group = [], {}
    for cid, rows in enumerate(job.partition.test):
        context = job.clients[cid]
        hist = torch.as_tensor(context.label_distribution, dtype=torch.float32)
        acc = float(_score_by_hand(job, rows, hist)[rows].mean())
        accs.append(acc)
        by_group.setdefault(context.group, []).append(acc)
    assert summary["personalized_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert summary["personalized_accuracy_min"] == pytest.approx(min(accs))
    assert summary["personalized_group_accuracy"] == pytest.approx(
        {g: float(np.mean(v)) for g, v in by_group.items()}
    )
    assert set(summary["personalized_group_accuracy"]) == {"de", "en"}
