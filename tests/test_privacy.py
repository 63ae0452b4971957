"""Membership inference (fedpeft/privacy.py): the rank AUC against hand counts (ties too) and a
brute-force pair count, 0.5 for identical distributions, per-row losses against evaluation, the
config switch at the end of a tiny run and `fedpeft privacy RUN` on the same run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedpeft import privacy
from fedpeft.cli import main
from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.engine.run import evaluate_split
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


# -- the AUC --------------------------------------------------------------------------------------
def test_average_ranks_share_the_mean_rank_of_a_tie():
    assert privacy.average_ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4, 2.5, 1]


@pytest.mark.parametrize(
    "positives, negatives, expected",
    [
        ([0.9, 0.4, 0.6], [0.5, 0.1], 5 / 6),  # 5 of 6 pairs ordered
        ([1.0, 2.0], [1.0, 0.0], 3.5 / 4),  # one tie counts one half
        ([3.0, 3.0], [3.0, 3.0, 3.0], 0.5),  # all tied
        ([2.0], [1.0], 1.0),
        ([0.0, -1.0], [1.0, 2.0], 0.0),
    ],
)
def test_roc_auc_on_hand_counted_pairs(positives, negatives, expected):
    assert privacy.roc_auc(positives, negatives) == pytest.approx(expected)


def test_attack_auc_says_member_when_the_loss_is_lower():
    # scores -loss: (-0.1 > -0.3), (-0.1 > -0.5), (-0.5 < -0.3), (-0.5 = -0.5): 2.5 of 4
    assert privacy.attack_auc([0.1, 0.5], [0.3, 0.5]) == pytest.approx(0.625)


def test_rank_auc_equals_a_brute_force_pair_count_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
        neg = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
        pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert privacy.roc_auc(pos, neg) == pytest.approx(pairs.mean())


def test_identical_distributions_give_one_half():
    same = [0.3, 1.2, 0.7, 0.7]
    assert privacy.attack_auc(same, same) == 0.5
    rng = np.random.default_rng(1)
    auc = privacy.attack_auc(rng.exponential(size=5000), rng.exponential(size=5000))
    assert auc == pytest.approx(0.5, abs=0.02)  # the AUC's std here is ~0.006


def test_an_auc_needs_both_sides_and_finite_scores():
    with pytest.raises(ValueError, match="at least one positive"):
        privacy.roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        privacy.roc_auc([float("nan")], [1.0])


# -- on a model -----------------------------------------------------------------------------------
def test_row_losses_average_to_the_evaluation_loss(toy_data):
    job = build_job(build_config(tiny_config(toy_data)))
    losses = privacy.row_losses(job, job.test, np.arange(len(job.test)))
    assert losses.shape == (len(job.test),) and (losses > 0).all()
    assert losses.mean() == pytest.approx(evaluate_split(job, "test").loss, rel=1e-5)
    some = np.array([5, 1, 3])  # returned in the order asked
    assert privacy.row_losses(job, job.test, some) == pytest.approx(losses[some], rel=1e-5)


def test_membership_inference_draws_members_from_the_clients_given(toy_data):
    job = build_job(build_config(tiny_config(toy_data)))
    few = len(job.partition.train[0])
    result = privacy.membership_inference(job, [0], rows=10_000, seed=0)
    assert result["mia_rows"] == min(few, len(job.test))
    assert 0 <= result["mia_auc"] <= 1
    assert result == privacy.membership_inference(job, [0], rows=10_000, seed=0)


def test_members_are_the_clients_whose_update_was_taken_up_to_the_scored_round():
    history = [
        {"round": 1, "clients": [0, 1, 2], "val_accuracy": 0.5,
         "clients_dropped": [{"cid": 1, "reason": "crashed"}], "clients_rejected": []},
        {"round": 2, "clients": [3, 4], "val_accuracy": 0.7,
         "clients_rejected": [{"cid": 4, "reason": "nan"}]},
        {"round": 3, "clients": [1, 5], "val_accuracy": 0.7},
    ]  # fmt: skip
    assert privacy.participants(history) == [0, 1, 2, 3, 5]
    assert privacy.best_round(history) == 2  # the first of equals, as best.safetensors keeps
    assert privacy.participants(history, up_to=2) == [0, 2, 3]
    assert privacy.best_round([{"round": 1, "clients": [0]}]) is None


def test_config_switch_refuses_method_local_in_one_line(toy_data):
    with pytest.raises(ConfigError, match="^privacy.membership_inference: method local"):
        build_config(
            tiny_config(
                toy_data,
                method="local",
                personalized_eval=True,
                privacy={"membership_inference": True},
            )
        )


def test_a_run_measures_the_attack_and_the_command_agrees(tmp_path, toy_data, capsys):
    settings = {"membership_inference": True, "rows": 30}
    config = build_config(tiny_config(toy_data, rounds=3, privacy=settings))
    folder = tmp_path / "r"
    summary = EmbeddedEngine(build_job(config), RunDir.create(folder, dump_config(config))).run()
    assert summary["mia_weights"] == "best" and summary["mia_rows"] == 30
    assert 0 <= summary["mia_auc"] <= 1
    assert summary["mia_member_loss"] > 0 and summary["mia_nonmember_loss"] > 0
    assert json.loads((folder / "summary.json").read_text())["mia_auc"] == summary["mia_auc"]

    assert main(["privacy", str(folder), "--rows", "30"]) == 0
    printed = capsys.readouterr().out
    written = json.loads((folder / "privacy.json").read_text())
    assert written["mia_auc"] == pytest.approx(summary["mia_auc"])  # same weights, same rows
    assert f"AUC {summary['mia_auc']:.3f}" in printed and written["mia_weights"] == "best"

    assert main(["privacy", str(folder), "--weights", "final", "--rows", "30"]) == 0
    assert json.loads((folder / "privacy.json").read_text())["mia_weights"] == "final"


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, toy_data, capsys):
    assert main(["privacy", str(tmp_path / "missing"), "--rows", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --rows: 0; the attack needs at least 1 member row"
    )
    assert main(["privacy", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    folder = tmp_path / "unfinished"
    RunDir.create(folder, yaml.safe_dump(tiny_config(toy_data)))
    assert main(["privacy", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights.safetensors does not exist" in err and len(err.splitlines()) == 1
    assert not (Path(folder) / "privacy.json").exists()
