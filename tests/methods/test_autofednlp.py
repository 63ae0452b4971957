"""AutoFedNLP: candidates, tie-breaking, output-preserving upgrades, trial bookkeeping (budget,
clients), resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft import cost
from fedpeft.client import Evaluation, LocalResult, forward_logits
from fedpeft.config import ConfigError, build_config
from fedpeft.data.sources import load_source
from fedpeft.data.tokenize import tokenize
from fedpeft.methods.autofednlp import AutoFedNLP, AutoFedNLPSettings, Candidate
from fedpeft.methods.base import ClientFit, ClientRunner, ClientUpdate
from fedpeft.models import TinySpec, load_model
from fedpeft.peft import adapter
from fedpeft.peft.base import trainable_parameters, trainable_state
from tests.conftest import tiny_config
from tests.engine.test_local import metrics, run_once

TINY4 = TinySpec(layers=4)


def _method(**settings) -> AutoFedNLP:
    return AutoFedNLP(AutoFedNLPSettings(**settings), adapter.AdapterSettings(), 4, 2)


def test_candidates_follow_the_reference():
    m = _method()
    assert m.candidates() == [Candidate("shallow", 0, 8), Candidate("deep", 2, 8)]  # 0 -> 2
    m.depth, m.width = 2, 8
    assert m.candidates() == [
        Candidate("shallow", 2, 8),
        Candidate("wide", 2, 16),
        Candidate("deep", 3, 8),
    ]
    m.depth, m.width = 4, 64  # both at their caps: only shallow remains
    assert m.candidates() == [Candidate("shallow", 4, 64)]
    assert _method(depth_jump_from_zero=1).candidates()[-1] == Candidate("deep", 1, 8)


def test_budget_in_seconds_or_derived_before_the_first_period():
    m = _method(tau=60.0)
    m.depth = 3
    assert m.budget_s() == pytest.approx(60 * 13)  # T = tau * (4d + 1)
    with pytest.raises(ValueError, match="tau is not set"):
        _method().budget_s()


def test_ties_go_to_shallow_then_wide_then_deep():
    pick = AutoFedNLP.pick_winner
    assert pick({"shallow": 0.5, "wide": 0.5, "deep": 0.5}) == "shallow"
    assert pick({"shallow": 0.4, "wide": 0.5, "deep": 0.5}) == "wide"
    assert pick({"shallow": 0.4, "wide": 0.4, "deep": 0.5}) == "deep"


@pytest.mark.parametrize("candidate", [Candidate("deep", 2, 8), Candidate("wide", 1, 16)])
def test_upgrade_keeps_weights_and_output(toy_data, candidate):
    model, tokenizer = load_model("tiny", 4, tiny=TINY4)
    model = adapter.inject(model, adapter.AdapterSettings(depth=1, width=8))
    for p in trainable_parameters(model).values():  # a trained state, not the identity init
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    batch = tokenize(load_source(str(toy_data)).test, tokenizer, 24).batch(range(12))
    before, state = forward_logits(model, batch), trainable_state(model)

    m = _method()
    m.depth, m.width = 1, 8
    upgraded = m.upgrade(model, state, candidate, seed=0)
    after = forward_logits(model, batch)
    assert torch.allclose(before, after, atol=1e-6)
    assert len(adapter.adapters(model)) == candidate.depth
    assert all(a.width == candidate.width for a in adapter.adapters(model))
    for name, value in state.items():  # trained weights survive, inside the grown tensors
        grown = upgraded[name]
        assert torch.equal(grown[tuple(slice(0, n) for n in value.shape)], value), name


def test_config_checks():
    with pytest.raises(ConfigError, match="validation_size"):
        build_config(
            {
                "method": "autofednlp",
                "num_clients": 30,
                "clients_per_round": 5,
                "validation_size": 0,
            }
        )
    with pytest.raises(ConfigError, match="3 trial groups"):
        build_config({"method": "autofednlp", "num_clients": 10, "validation_size": 10})


def _auto_config(toy_data, **overrides):
    settings = {
        "method": "autofednlp",
        "num_clients": 12,
        "clients_per_round": 2,
        "rounds": 3,
        "validation_size": 40,
        # tau: the budget buys several rounds, more for the cheaper candidates (2-3 vs 1-2)
        "autofednlp": {"tau": 0.006, "start_depth": 1},
        "activation_cache": {"enabled": True, "dtype": "fp32"},
        "cost": {"devices": ["jetson_tx2"], "networks": ["reference_1mbps"]},
    }
    return tiny_config(toy_data, **{**settings, **overrides})


def test_run_records_every_trial(tmp_path, toy_data):
    config = _auto_config(toy_data)
    summary, run = run_once(tmp_path / "auto", **config)
    seed = build_config(config).seed
    rows = metrics(run)
    trials = [json.loads(line) for line in (run.path / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == len(trials) == 3
    for row, trial in zip(rows, trials, strict=True):
        for key in ("train_loss", "accuracy", "macro_f1", "bytes_up", "sim_time_s", "wall_time_s"):
            assert row[key] is not None
        names = [c["name"] for c in trial["candidates"]]
        assert names[0] == "shallow" and trial["winner"] in names
        winner = next(c for c in trial["candidates"] if c["name"] == trial["winner"])
        assert (row["depth"], row["width"]) == (winner["depth"], winner["width"])
        assert all(c["rounds"] >= 1 and 0 <= c["val_accuracy"] <= 1 for c in trial["candidates"])
        # same simulated budget: each candidate stops once it has used it up
        assert all(c["sim_time_s"] >= trial["budget_s"] for c in trial["candidates"])
        assert row["sim_time_s"] == max(c["sim_time_s"] for c in trial["candidates"])
        assert row["bytes_up"] == sum(c["bytes_up"] for c in trial["candidates"])
        # one budget for all: the cheaper a candidate's rounds, the more of them it runs
        by_cost = sorted(trial["candidates"], key=lambda c: c["sim_time_s"] / c["rounds"])
        assert [c["rounds"] for c in by_cost] == sorted(
            (c["rounds"] for c in by_cost), reverse=True
        )
        by_name = {c["name"]: c for c in trial["candidates"]}
        assert by_name["shallow"]["rounds"] > by_name["deep"]["rounds"] >= 1
        # the clients each candidate trained: drawn from its own pool, every round's, disjoint
        pools = _method()._pools(seed, trial["period"], config["num_clients"], 3)
        trained = [set(c["clients"]) for c in trial["candidates"]]
        for candidate, pool, clients in zip(trial["candidates"], pools, trained, strict=False):
            assert clients <= set(pool.tolist())
            assert len(candidate["clients"]) == candidate["rounds"] * config["clients_per_round"]
        assert all(not a & b for i, a in enumerate(trained) for b in trained[i + 1 :])
        assert sorted(set().union(*trained)) == row["clients"]
    for previous, trial in zip(trials, trials[1:], strict=False):
        winner = next(c for c in previous["candidates"] if c["name"] == previous["winner"])
        assert trial["start"] == {"depth": winner["depth"], "width": winner["width"]}
    weights = load_file(str(run.weights_path))
    assert sum(t.numel() for t in weights.values()) == summary["trainable_params"]


def test_trial_groups_are_disjoint(tmp_path, toy_data):
    m = _method()
    pools = m._pools(seed=0, rnd=1, num_clients=12, groups=3)
    assert sum(len(p) for p in pools) == 12
    assert not (set(pools[0]) & set(pools[1]) or set(pools[1]) & set(pools[2]))


def test_resume_matches_uninterrupted(tmp_path, toy_data):
    from fedpeft.config import dump_config
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job
    from fedpeft.runs import RunDir

    config = _auto_config(toy_data, rounds=2)
    run_once(tmp_path / "ref", **config)
    cfg = build_config(config)
    run = RunDir.create(tmp_path / "cut", dump_config(cfg))

    def stop_in_period_2(kind, info):
        if kind == "round_start" and info["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        EmbeddedEngine(build_job(cfg), run, on_event=stop_in_period_2).run()
    EmbeddedEngine(build_job(cfg), run).run()
    ref = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    got = load_file(str(run.weights_path))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


class _CostRunner(ClientRunner):
    """Clients timed by the cost model for the model as the method shaped it: ``client_time_s``
    is the bound for a client's round with nothing cached; an actual round costs a seeded share
    of it (rows cached, shorter batches). Validation prefers depth, then width, so the deep
    candidate wins and the next period starts deeper."""

    def __init__(self, model, dims: cost.ModelDims, num_clients: int = 12):
        self.model, self.dims, self.num_clients, self.seed = model, dims, num_clients, 0

    def client_time_s(self, cid, state):
        depth = len(adapter.adapters(self.model))
        params = sum(t.numel() for t in state.values())
        rows, seq, lowest = 40 + cid, 24, self.dims.num_layers - depth
        flops = cost.train_flops(
            self.dims,
            seq,
            rows,
            lowest_trainable_layer=lowest,
            trainable_params=params,
            cached_below=True,
        ) + rows * lowest * cost.layer_forward_flops(self.dims, seq)
        return flops / 200e9 + 2 * 4 * params / 1e6

    def fit(self, rnd, cid, state, stream=()):
        share = np.random.default_rng([rnd, cid, *stream]).uniform(0.05, 1.0)
        result = LocalResult(10, 1, 1.0, 10, 240)
        update = ClientUpdate(cid, state, 10, result)
        return ClientFit(update, 0, 0, share * self.client_time_s(cid, state), 0.0)

    def evaluate(self, state, split):
        layers = adapter.adapters(self.model)
        score = 0.1 * len(layers) + 0.001 * (layers[0].width if layers else 0)
        return Evaluation(score, score, 0.0, 10)


@pytest.mark.parametrize(
    "dims",
    [
        cost.ModelDims(4, 64, 128, 1000, 4),  # the tiny test model
        cost.ModelDims(4, 384, 1536, 30522, 4),  # MiniLM-sized layers
    ],
    ids=["tiny", "minilm-sized"],
)
def test_default_budget_gives_every_candidate_rounds_per_period(dims):
    """The default states the budget in rounds: tau (seconds) scales with the cost model, the
    rounds a candidate runs do not: >= 20 for every candidate of every period."""
    model, _ = load_model("tiny", 4, tiny=TINY4)
    model = adapter.inject(model, adapter.AdapterSettings(depth=0, width=8))
    m = AutoFedNLP(AutoFedNLPSettings(), adapter.AdapterSettings(), 4, 2)
    runner = _CostRunner(model, dims)
    state = trainable_state(model)
    trials = []
    for period in (1, 2, 3):
        state, report = m.run_round(period, state, runner)
        trials.append(report.extra["trial"])
    first = trials[0]
    bound = 0.0
    for candidate in first["candidates"]:
        adapter.set_layout(model, candidate["depth"], candidate["width"], adapter.AdapterSettings())
        worst = max(runner.client_time_s(c, trainable_state(model)) for c in range(12))
        bound = max(bound, worst)
    assert first["tau_s"] == pytest.approx(20 * bound)  # R x r_0 / (4 * 0 + 1)
    assert first["rounds_per_period"] == 20
    assert [(t["start"]["depth"], t["budget_s"] / t["tau_s"]) for t in trials] == [
        (0, 1),
        (2, 9),
        (3, 13),
    ]
    rounds = [c["rounds"] for t in trials for c in t["candidates"]]
    assert min(rounds) >= 20, rounds
    assert m.state_dict()["tau"] == first["tau_s"]


def test_default_budget_on_the_tiny_model_end_to_end(tmp_path, toy_data):
    """A new user's run: no tau given, one trial period; every candidate runs >= 20 rounds and
    the period costs what its budget says, not thousands of rounds."""
    from fedpeft.config import dump_config
    from fedpeft.engine.local import EmbeddedEngine
    from fedpeft.job import build_job
    from fedpeft.progress import RunProgress
    from fedpeft.runs import RunDir

    cfg = build_config(_auto_config(toy_data, rounds=1, autofednlp={"start_depth": 1}))
    run = RunDir.create(tmp_path / "auto", dump_config(cfg))
    events = []
    screen = RunProgress(cfg.rounds, cfg.clients_per_round, enabled=False)

    def on_event(kind, info):
        events.append((kind, dict(info)))
        screen.event(kind, info)

    EmbeddedEngine(build_job(cfg), run, on_event=on_event).run()
    (trial,) = [json.loads(line) for line in (run.path / "trials.jsonl").read_text().splitlines()]
    assert trial["rounds_per_period"] == 20 and trial["tau_s"] > 0
    assert trial["budget_s"] == pytest.approx(trial["tau_s"] * 5)
    rounds = [c["rounds"] for c in trial["candidates"]]
    assert min(rounds) >= 20 and max(rounds) < 200, rounds
    # the screen hears of every round of every candidate, and of each candidate's end
    ends = [info for kind, info in events if kind == "trial_end"]
    assert [(e["candidate"], e["rounds"]) for e in ends] == [
        (c["name"], c["rounds"]) for c in trial["candidates"]
    ]
    progress = [info for kind, info in events if kind == "trial"]
    assert len(progress) == sum(rounds)
    assert all(0 <= p["sim_time_s"] < p["budget_s"] == trial["budget_s"] for p in progress)
    screen.progress.make_tasks_table(screen.progress.tasks)  # every column still renders


def test_without_stored_activations_same_simulated_run(tmp_path, toy_data):
    """The activation cache saves wall-clock only: with the hidden states recomputed each time
    (store_hidden: false) the trials, simulated time, bytes and weights are the same."""
    runs = {}
    for store in (True, False):
        cache = {"enabled": True, "dtype": "fp32", "store_hidden": store}
        config = _auto_config(toy_data, rounds=2, activation_cache=cache)
        runs[store] = run_once(tmp_path / str(store), **config)[1]
    kept, recomputed = metrics(runs[True]), metrics(runs[False])
    for a, b in zip(kept, recomputed, strict=True):
        for key in ("sim_time_s", "bytes_up", "bytes_down", "depth", "width", "cache_misses"):
            assert a[key] == b[key], key
        assert [c["rounds"] for c in a["trial"]["candidates"]] == [
            c["rounds"] for c in b["trial"]["candidates"]
        ]
    ref = load_file(str(runs[True].weights_path))
    got = load_file(str(runs[False].weights_path))
    assert ref.keys() == got.keys()
    assert all(torch.allclose(ref[k], got[k], atol=1e-4) for k in ref)
