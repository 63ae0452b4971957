"""early_stop: a run stops once validation stops gaining, its cap (``rounds``) recorded."""

from __future__ import annotations

import pytest

from fedpeft.config import ConfigError, build_config
from fedpeft.engine.run import converged
from tests.conftest import tiny_config
from tests.engine.test_local import metrics, run_once


def _rows(*vals):
    return [{"round": i + 1, "val_accuracy": v} for i, v in enumerate(vals)]


def test_converged_after_patience_rounds_without_gain():
    assert converged(_rows(0.5, 0.6, 0.6), patience=2) is None  # one round since the best
    assert "since round 2" in converged(_rows(0.5, 0.6, 0.6, 0.55), patience=2)
    assert converged(_rows(0.5, 0.6, 0.6, 0.61), patience=2) is None  # a gain resets it
    # a gain of no more than min_delta does not count
    assert converged(_rows(0.5, 0.6, 0.605, 0.609), patience=2, min_delta=0.01)
    assert converged(_rows(0.5, None, None), patience=2)  # rounds between evaluations count
    assert converged([], patience=1) is None


def _config(toy_data, **overrides):
    return tiny_config(toy_data, **{"num_clients": 4, "validation_size": 40, **overrides})


def test_run_stops_when_validation_stops_gaining(tmp_path, toy_data):
    # lr ~0: validation never moves after round 1, so the run stops after 1 + patience rounds
    config = _config(toy_data, rounds=10, lr=1e-12, early_stop={"patience": 2})
    summary, run = run_once(tmp_path / "flat", **config)
    assert [r["round"] for r in metrics(run)] == [1, 2, 3]
    assert summary["complete"] and summary["converged"] and not summary["cap_hit"]
    assert summary["rounds_completed"] == 3 and summary["rounds_planned"] == 10
    assert "no validation gain" in summary["stopped"]


def test_cap_is_recorded(tmp_path, toy_data):
    config = _config(toy_data, rounds=2, early_stop={"patience": 5})
    summary, _ = run_once(tmp_path / "cap", **config)
    assert summary["complete"] and summary["cap_hit"] and not summary["converged"]
    plain, _ = run_once(tmp_path / "plain", **_config(toy_data, rounds=2))
    assert "cap_hit" not in plain and "converged" not in plain


def test_resuming_a_converged_run_runs_nothing(tmp_path, toy_data):
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir

    config = _config(toy_data, rounds=10, lr=1e-12, early_stop={"patience": 1})
    first, run = run_once(tmp_path / "flat", **config)
    again = EmbeddedEngine(build_job(build_config(config)), RunDir.open(run.path)).run()
    assert again["rounds_completed"] == first["rounds_completed"] == 2 and again["converged"]


def test_bad_settings_are_refused_in_one_line(toy_data):
    with pytest.raises(ConfigError, match="early_stop"):
        build_config(_config(toy_data, early_stop={"patience": 0}))
    with pytest.raises(ConfigError, match="early_stop: needs validation rows"):
        build_config(_config(toy_data, validation_size=0, early_stop={"patience": 2}))
    with pytest.raises(ConfigError, match="^early_stop.patience: 2 rounds is less than eval_ev"):
        build_config(_config(toy_data, eval_every=3, early_stop={"patience": 2}))
    assert build_config(_config(toy_data, eval_every=3, early_stop={"patience": 3}))
