"""A real pre-trained MiniLM learns AG News in a short federated run (skipped without shared data)."""

from __future__ import annotations

import json

import pytest

from fedpeft.config import build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import needs_shared


@pytest.mark.slow
def test_minilm_lora_on_ag_news_beats_chance(tmp_path):
    data = needs_shared("ag_news")
    config = build_config(
        {
            "model": "minilm",
            "dataset": str(data),
            "method": "lora",
            "num_clients": 4,
            "clients_per_round": 4,
            "rounds": 2,
            "batch_size": 16,
            "lr": 5e-3,
            "max_seq_len": 48,
            "partition": "iid",
            "max_train_samples": 256,
            "max_test_samples": 200,
            "threads": 2,
        }
    )
    run = RunDir.create(tmp_path / "run", dump_config(config))
    summary = EmbeddedEngine(build_job(config), run).run()
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert len(rows) == 2
    # 4 classes: chance is 25%; the pre-trained encoder gets far beyond it within two rounds
    assert summary["test_accuracy_at_best_val"] > 0.5
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert summary["trainable_params"] < 200_000  # LoRA r8 on q,v + head, not 22.7M
