"""early_stop: a run stops once validation stops gaining, its cap (``rounds``) recorded."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from fedpeft.config import ConfigError, build_config
from fedpeft.engine.run import converged, next_round_certain
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


def _job(rounds=10, patience=None, min_delta=0.0, max_epsilon=None):
    stop = None if patience is None else SimpleNamespace(patience=patience, min_delta=min_delta)
    dp = None if max_epsilon is None else SimpleNamespace(max_epsilon=max_epsilon)
    return SimpleNamespace(config=SimpleNamespace(rounds=rounds, early_stop=stop), dp=dp)


@pytest.mark.parametrize("patience,min_delta", [(1, 0.0), (2, 0.0), (2, 0.1), (3, 0.0)])
def test_next_round_is_certain_exactly_when_no_evaluation_of_this_round_can_stop_the_run(
    patience, min_delta
):
    """Round r + 1 is certain (its messages may go out before round r is evaluated) iff no
    validation score of round r (a gain, none, no evaluation) makes the run converge after r;
    checked over every history of up to 4 rounds from a few scores."""
    job = _job(patience=patience, min_delta=min_delta)
    scores = (None, 0.5, 0.55, 0.7)
    for length in range(5):
        for vals in itertools.product(scores, repeat=length):
            history = _rows(*vals)
            if converged(history, patience, min_delta):
                continue  # the run ended already: no round r
            rnd = length + 1
            outcomes = [
                converged(history + _rows(*vals, v)[-1:], patience, min_delta)
                for v in (*scores, 1.0)
            ]
            certain = next_round_certain(job, history, rnd)
            assert certain == (not any(outcomes)), (vals, certain, outcomes)


def test_next_round_is_not_certain_past_the_cap_or_under_a_privacy_budget():
    assert next_round_certain(_job(rounds=3), [], 2)
    assert not next_round_certain(_job(rounds=3), [], 3)  # round 4 is past the cap
    assert not next_round_certain(_job(rounds=3, max_epsilon=8.0), [], 1)


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
