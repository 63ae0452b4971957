"""FibecFed: the Fisher/sensitivity arithmetic on a tiny LoRA model, then whole runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fedpeft import payload
from fedpeft.algorithms import make_algorithm
from fedpeft.client import LocalResult
from fedpeft.config import build_config, dump_config
from fedpeft.data.tokenize import TokenizedData
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.fisher import (
    fisher_layer_sensitivity,
    fisher_pass,
    layer_sensitivity,
    lora_names,
    momentum,
    neuron_scores,
    top_layers,
    top_rows_mask,
)
from fedpeft.job import build_job
from fedpeft.methods.base import ClientUpdate
from fedpeft.methods.fibecfed import FibecFed, FibecFedSettings, curriculum_fraction, easiest_rows
from fedpeft.models import load_model
from fedpeft.paths import REPO_ROOT
from fedpeft.peft import lora
from fedpeft.peft.base import load_trainable_state
from fedpeft.runs import RunDir
from tests.conftest import tiny_config, write_dataset

TEXTS = [
    "the market rises today",
    "a goal",
    "election week report says the minister signed a new treaty after the war",
    "robot chip",
    "big profit for the bank on shares after a new week of trading",
    "coach",
]


def _tiny_lora(pooling: str = "mean") -> tuple[nn.Module, TokenizedData]:
    model, tokenizer = load_model("tiny", num_labels=4, pooling=pooling, seed=3)
    model = lora.inject(model, lora.LoraSettings(r=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; give it values so A's gradients are not zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    enc = tokenizer(
        TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt"
    )
    data = TokenizedData(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_type_ids=enc["token_type_ids"],
        labels=torch.tensor([1, 0, 3, 2, 1, 0]),
        lengths=enc["attention_mask"].sum(dim=1),
    )
    return model, data


def _slow_per_row_grads(model: nn.Module, data: TokenizedData, rows, names) -> list[dict]:
    """The reference: one unpadded row at a time, plain autograd."""
    params = dict(model.named_parameters())
    model.eval()
    grads = []
    for row in rows:
        n = int(data.lengths[row])
        logits = model(
            input_ids=data.input_ids[row : row + 1, :n],
            attention_mask=data.attention_mask[row : row + 1, :n],
            token_type_ids=data.token_type_ids[row : row + 1, :n],
        ).logits
        log_p = -F.cross_entropy(logits, data.labels[row : row + 1])
        row_grads = torch.autograd.grad(log_p, [params[n] for n in names])
        grads.append(dict(zip(names, row_grads, strict=True)))
    return grads


# -- per-sample Fisher ---------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_fisher_scores_equal_a_per_row_loop(pooling):
    model, data = _tiny_lora(pooling)
    names = lora_names(model)
    assert names and all(".lora_" in n for n in names)
    rows = np.array([4, 0, 2, 5, 1])
    result = fisher_pass(model, data, rows, names, chunk_rows=2)  # chunks mix lengths
    slow = _slow_per_row_grads(model, data, rows, names)
    expected = torch.stack([sum(g.pow(2).sum() for g in row.values()) for row in slow])
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-7)
    for n in names:
        mean_sq = torch.stack([row[n].pow(2) for row in slow]).mean(dim=0)
        torch.testing.assert_close(result.diagonal[n], mean_sq, rtol=1e-4, atol=1e-9)
    assert result.scores.min() > 0


def test_fisher_pass_leaves_the_model_as_it_was():
    model, data = _tiny_lora()
    model.train()
    attention = model.config._attn_implementation
    before = {n: p.clone() for n, p in model.named_parameters()}
    fisher_pass(model, data, np.arange(len(TEXTS)), lora_names(model))
    assert model.training and model.config._attn_implementation == attention
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


# -- layer sensitivity ---------------------------------------------------------------------------


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_sensitivity_of_an_identity_layer_is_the_noise_scale():
    # f(h) = h: the relative change is ||d|| / ||h|| with d_t = scale * rms(h_t) * e_t, i.e. ~scale
    model, data = _tiny_lora()
    model.bert.encoder.layer[1] = _Identity()
    scores = layer_sensitivity(
        model, data, np.arange(6), [1], scale=0.05, generator=torch.Generator().manual_seed(0)
    )
    assert scores[1] == pytest.approx(0.05, rel=0.05)


def test_sensitivity_is_zero_without_noise_and_grows_with_it():
    model, data = _tiny_lora()
    rows = np.arange(6)

    def score(scale):
        generator = torch.Generator().manual_seed(1)
        return layer_sensitivity(model, data, rows, [0, 1], scale=scale, generator=generator)

    zero, small, double = score(1e-12), score(1e-3), score(2e-3)
    assert all(v < 1e-9 for v in zero.values())
    for layer in (0, 1):
        assert small[layer] > 0
        assert double[layer] == pytest.approx(2 * small[layer], rel=0.05)  # linear when small
    assert score(1e-3) == small  # seeded: reproducible


def test_fisher_layer_sensitivity_is_the_mean_diagonal_of_the_layer():
    diagonal = {
        "bert.encoder.layer.0.attention.self.query.lora_A.default.weight": torch.tensor([1.0, 3.0]),
        "bert.encoder.layer.0.attention.self.query.lora_B.default.weight": torch.tensor([2.0]),
        "bert.encoder.layer.1.attention.self.query.lora_A.default.weight": torch.tensor([4.0]),
    }
    assert fisher_layer_sensitivity(diagonal, [0, 1, 2]) == {0: 2.0, 1: 4.0, 2: 0.0}


# -- neuron scores, momentum, selection ----------------------------------------------------------


def test_neuron_scores_sum_each_row():
    diagonal = {"A": torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.5]]), "B": torch.ones(4, 2)}
    scores = neuron_scores(diagonal)
    assert scores["A"].tolist() == [6.0, 1.0]
    assert scores["B"].tolist() == [2.0, 2.0, 2.0, 2.0]


def test_momentum_golden_numbers():
    first = momentum(None, {"n": torch.tensor([1.0, 2.0])}, beta=0.9)
    torch.testing.assert_close(first["n"], torch.tensor([0.1, 0.2]))
    second = momentum(first, {"n": torch.tensor([3.0, 0.0])}, beta=0.9)
    torch.testing.assert_close(second["n"], torch.tensor([0.39, 0.18]))


def test_top_rows_mask():
    scores = torch.tensor([0.39, 0.18, 0.5, 0.18])
    mask = top_rows_mask(scores, 0.5, torch.Size([4, 3]))
    assert mask.dtype == torch.bool and mask.shape == (4, 3)
    assert mask.all(dim=1).tolist() == [True, False, True, False]
    assert not (mask.any(dim=1) & ~mask.all(dim=1)).any()  # whole rows only
    assert top_rows_mask(scores, 0.3, torch.Size([4])).tolist() == [True, False, True, False]
    assert top_rows_mask(scores, 0.01, torch.Size([4])).sum() == 1  # at least one
    ties = top_rows_mask(torch.ones(3), 0.34, torch.Size([3]))  # ceil(1.02) = 2, lower index first
    assert ties.tolist() == [True, True, False]


def test_top_layers():
    sensitivity = {0: 0.2, 1: 0.5, 2: 0.5, 3: 0.1}
    assert top_layers(sensitivity, 2) == [1, 2]
    assert top_layers(sensitivity, 3) == [0, 1, 2]
    assert top_layers({0: 1.0, 1: 1.0}, 1) == [0]
    assert top_layers(sensitivity, 9) == [0, 1, 2, 3]


# -- pacing ----------------------------------------------------------------------------------------


def test_linear_pacing_golden_numbers():
    values = [curriculum_fraction(t, 0.5, 10, "linear") for t in (0, 4, 10, 20)]
    assert values == pytest.approx([0.5, 0.7, 1.0, 1.0])


def test_root_pacing_golden_numbers():
    values = [curriculum_fraction(t, 0.5, 10, "root") for t in (0, 4, 10, 20)]
    assert values == pytest.approx([0.5, math.sqrt(0.55), 1.0, 1.0])
    assert math.sqrt(0.55) == pytest.approx(0.7416198)
    with pytest.raises(ValueError, match="pacing"):
        curriculum_fraction(0, 0.5, 10, "step")


def test_easiest_rows():
    rows = np.array([10, 11, 12, 13, 14])
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert easiest_rows(rows, scores, 0.4).tolist() == [11, 13]
    assert easiest_rows(rows, scores, 0.5).tolist() == [11, 13, 14]  # ceil(2.5) = 3
    assert easiest_rows(rows, scores, 0.01).tolist() == [11]  # ties: the earlier row
    assert easiest_rows(rows, scores, 1.0).tolist() == rows.tolist()


# -- the server's layer selection ------------------------------------------------------------------

LORA_A = "bert.encoder.layer.{}.attention.self.query.lora_A.default.weight"


def _method(**settings) -> FibecFed:
    return FibecFed(FibecFedSettings(**settings), make_algorithm("fedavg"), seed=0, num_labels=4)


def _update(cid: int, state: dict, sensitivity: list[float] | None = None) -> ClientUpdate:
    metrics = {} if sensitivity is None else {"sensitivity": sensitivity}
    return ClientUpdate(cid, state, 10, LocalResult(10, 1, 0.0, 10, 100), metrics)


def test_server_averages_reports_and_keeps_the_top_layers():
    method = _method(rescore_every=2, global_layers=2)
    global_state = {LORA_A.format(i): torch.zeros(2) for i in range(4)}
    global_state["classifier.weight"] = torch.zeros(3)
    reports = [[0.1, 0.9, 0.2, 0.5], [0.3, 0.1, 0.2, 0.6]]  # means 0.2 0.5 0.2 0.55
    updates = [_update(c, dict(global_state), r) for c, r in enumerate(reports)]
    method.aggregate(1, global_state, updates)
    assert method.global_layers == [1, 3]
    assert method.local_since == {0: 2, 2: 2}
    assert set(method.upload(2, 0, global_state)) == {
        LORA_A.format(1),
        LORA_A.format(3),
        "classifier.weight",
    }
    # round 2 is no reporting round (K = 2): the selection stays
    method.aggregate(2, global_state, [_update(0, method.upload(2, 0, global_state))])
    assert method.global_layers == [1, 3]
    # round 3 re-selects: layer 1 leaves (its non-global stretch starts at round 4), 0 stays local
    updates = [_update(0, method.upload(3, 0, global_state), [0.1, 0.2, 0.9, 0.8])]
    method.aggregate(3, global_state, updates)
    assert method.global_layers == [2, 3]
    assert method.local_since == {0: 2, 1: 4}
    restored = _method(rescore_every=2, global_layers=2)
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert restored.global_layers == [2, 3] and restored.local_since == {0: 2, 1: 4}


def test_default_n_is_half_the_lora_layers_and_switching_off_keeps_every_layer():
    global_state = {LORA_A.format(i): torch.zeros(2) for i in range(3)}
    method = _method()
    method.aggregate(1, global_state, [_update(0, global_state, [0.3, 0.1, 0.2])])
    assert method.global_layers == [0, 2]  # ceil(3 / 2) = 2
    off = _method(layer_selection=False)
    off.aggregate(1, global_state, [_update(0, global_state, [0.3, 0.1, 0.2])])
    assert off.global_layers is None and off.upload(2, 0, global_state) == global_state


def test_a_local_copy_is_dropped_once_its_layer_was_aggregated_in_between():
    model, _data = _tiny_lora()
    params = dict(model.named_parameters())
    name = next(n for n in lora_names(model) if ".layer.0." in n)
    store = {f"local.{name}": torch.full_like(params[name], 7.0), "local_round": torch.tensor([3])}
    method = _method()
    method.global_layers, method.local_since = [1], {0: 2}  # layer 0 local since round 2
    shared = params[name].detach().clone()
    method.prepare_eval(model, None, None)  # global evaluation: the shared values
    assert torch.equal(params[name], shared)
    method.prepare_eval(model, 5, store)  # personalised: the client's copy (saved in round 3)
    assert (params[name] == 7.0).all()
    with torch.no_grad():
        params[name].copy_(shared)
    method.local_since = {0: 4}  # layer 0 was aggregated in round 3: the copy is stale
    method.prepare_eval(model, 5, store)
    assert torch.equal(params[name], shared)


# -- whole runs through the embedded engine ------------------------------------------------------

SETTINGS = {"rescore_every": 10, "global_layers": 1, "top_neurons": 0.25}


def _config(data, **overrides) -> dict:
    base = tiny_config(
        data,
        method="fibecfed",
        rounds=4,
        lr=1e-2,
        weight_decay=0.1,
        lora={"r": 4},
        fibecfed=SETTINGS,
        personalized_eval=True,
    )
    base.update(overrides)
    return base


def _run(
    folder: Path, config: dict, on_event=None, spy=None
) -> tuple[dict, RunDir, EmbeddedEngine]:
    cfg = build_config(config)
    run = RunDir.open(folder) if folder.exists() else RunDir.create(folder, dump_config(cfg))
    engine = EmbeddedEngine(build_job(cfg), run, on_event=on_event)
    if spy is not None:
        spy(engine.job.method)
    return engine.run(), run, engine


def _rows(run: RunDir) -> list[dict]:
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    for row in rows:
        for key in [k for k in row if "wall" in k]:
            del row[key]
    return rows


class Spy:
    """Records what the method set up before each client trained, and what training left."""

    def __init__(self):
        self.begins: list[dict] = []
        self.ends: list[dict] = []
        self.uploads: list[tuple[int, int, set]] = []

    def __call__(self, method: FibecFed) -> None:
        begin, end, upload = method.begin_client, method.end_client, method.upload

        def lora_values(model):
            return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

        def spied_begin(session):
            before = session.extra_flops
            begin(session)
            self.begins.append(
                {
                    "rnd": session.rnd,
                    "cid": session.cid,
                    "values": lora_values(session.model),
                    "received": dict(session.received),
                    "masks": {n: m.clone() for n, m in session.masks.items()},
                    "rows": np.asarray(session.rows).copy(),
                    "all_rows": session.context.num_rows,
                    "charged": session.extra_flops - before,
                    "local": list(method.global_layers or []),
                }
            )

        def spied_end(session):
            self.ends.append(
                {"rnd": session.rnd, "cid": session.cid, "values": lora_values(session.model)}
            )
            end(session)

        def spied_upload(rnd, cid, trained):
            sent = upload(rnd, cid, trained)
            self.uploads.append((rnd, cid, set(sent)))
            return sent

        method.begin_client, method.end_client, method.upload = spied_begin, spied_end, spied_upload


@pytest.fixture(scope="module")
def spied(tmp_path_factory, toy_data):
    spy = Spy()
    summary, run, engine = _run(tmp_path_factory.mktemp("fib") / "run", _config(toy_data), spy=spy)
    return spy, summary, run, engine


def _is_local(name: str, method: FibecFed) -> bool:
    return method._local(name)


def test_masks_freeze_exactly_the_unselected_entries(spied):
    spy, _summary, _run_dir, engine = spied
    method = engine.job.method
    assert method.global_layers is not None and len(method.global_layers) == 1
    local = [n for n in spy.begins[0]["values"] if _is_local(n, method)]
    assert local, "one of the two layers stays local"
    for begin, end in zip(spy.begins, spy.ends, strict=True):
        if begin["rnd"] == 1:  # no selection yet: every layer aggregates, nothing is masked
            assert begin["masks"] == {}
            continue
        assert set(begin["masks"]) == set(local)
        for name, mask in begin["masks"].items():
            rows = mask.shape[0]
            assert mask.all(dim=1).sum() == math.ceil(0.25 * rows)  # top-k rows, whole rows
            before, after = begin["values"][name], end["values"][name]
            assert torch.equal(before[~mask], after[~mask])  # AdamW with weight decay 0.1
            assert not torch.equal(before[mask], after[mask])
        for name in begin["values"]:
            if name not in begin["masks"]:  # aggregation layers train densely
                assert not torch.equal(begin["values"][name], end["values"][name])


def test_only_the_aggregation_layers_and_the_head_travel(spied):
    spy, _summary, run_dir, engine = spied
    method = engine.job.method
    weights = load_file(str(run_dir.weights_path))
    shared = {k: v for k, v in weights.items() if not _is_local(k, method)}
    assert len(shared) < len(weights) and any("classifier" in k for k in shared)
    rows = _rows(run_dir)
    assert rows[0]["bytes_up"] == 2 * len(payload.encode(weights))
    for row in rows[1:]:
        assert row["bytes_up"] == 2 * len(payload.encode(shared))
        assert row["bytes_down"] == 2 * len(payload.encode(weights))
    for rnd, _cid, keys in spy.uploads:
        if rnd > 1:
            assert keys == set(shared)
    assert rows[0]["aggregated_layers"] == [0, 1]  # round 1 aggregates every layer
    assert all(row["aggregated_layers"] == sorted(method.global_layers) for row in rows[1:])


def test_local_entries_come_back_and_never_reach_another_client(spied):
    spy, _summary, _run_dir, engine = spied
    method = engine.job.method
    last_end: dict[int, dict] = {}
    checked_return = checked_fresh = 0
    for begin, end in zip(spy.begins, spy.ends, strict=True):
        cid, rnd = begin["cid"], begin["rnd"]
        previous = last_end.get(cid)
        for name, value in begin["values"].items():
            if not _is_local(name, method) or rnd == 1:
                continue
            if previous is not None and previous["rnd"] > 1:
                assert torch.equal(value, previous["values"][name])  # its own, unchanged
                checked_return += 1
            else:
                assert torch.equal(value, begin["received"][name])  # the shared value
                checked_fresh += 1
            for other, theirs in last_end.items():
                if other != cid and theirs["rnd"] > 1:
                    assert not torch.equal(value, theirs["values"][name])
        last_end[cid] = end
    assert checked_return and checked_fresh


def test_personalised_evaluation_uses_the_clients_own_entries(spied):
    spy, _summary, run_dir, engine = spied
    job, method = engine.job, engine.job.method
    weights = load_file(str(run_dir.weights_path))
    cid = spy.ends[-1]["cid"]
    params = dict(job.model.named_parameters())
    method.prepare_eval(job.model, None, None)  # global: the shared values
    local = [n for n in weights if _is_local(n, method)]
    load_trainable_state(job.model, weights)
    method.prepare_eval(job.model, None, None)
    assert all(torch.equal(params[n], weights[n]) for n in local)
    method.prepare_eval(job.model, cid, engine.state.store.get(cid))
    assert all(torch.equal(params[n], spy.ends[-1]["values"][n]) for n in local)
    load_trainable_state(job.model, weights)


def test_curriculum_trains_on_the_easiest_fraction_and_scoring_is_charged(spied):
    spy, _summary, _run_dir, _engine = spied
    scored = set()
    for begin in spy.begins:
        fraction = curriculum_fraction(begin["rnd"] - 1, 0.5, 10, "root")
        assert len(begin["rows"]) == math.ceil(fraction * begin["all_rows"])
        first_time = begin["cid"] not in scored
        scored.add(begin["cid"])
        if first_time or begin["rnd"] == 1:  # scoring (and round 1's sensitivity report)
            assert begin["charged"] > 0
        else:  # K = 10: nothing to re-score, no report due
            assert begin["charged"] == 0


def test_resume_is_exact(tmp_path, toy_data):
    config = _config(
        toy_data, rounds=3, fibecfed={**SETTINGS, "rescore_every": 2}, personalized_eval=False
    )
    reference, ref_run, _ = _run(tmp_path / "ref", config)

    def stop_after_round_2(kind, info):
        if kind == "round_start" and info["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", config, on_event=stop_after_round_2)
    resumed, cut_run, _ = _run(tmp_path / "cut", config)
    ref_w, got_w = load_file(str(ref_run.weights_path)), load_file(str(cut_run.weights_path))
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert _rows(cut_run) == _rows(ref_run)


def test_every_part_off_is_lora_fedavg(tmp_path, toy_data):
    off = {"curriculum": False, "layer_selection": False, "sparse": False}
    config = _config(toy_data, rounds=2, fibecfed=off, personalized_eval=False)
    _summary, fib_run, _ = _run(tmp_path / "fib", config)
    lora_config = {k: v for k, v in config.items() if k != "fibecfed"}
    _summary, lora_run, _ = _run(tmp_path / "lora", {**lora_config, "method": "lora"})
    fib_w, lora_w = load_file(str(fib_run.weights_path)), load_file(str(lora_run.weights_path))
    assert fib_w.keys() == lora_w.keys()
    assert all(torch.equal(fib_w[k], lora_w[k]) for k in fib_w)
    fib_rows = _rows(fib_run)
    for row in fib_rows:  # FibecFed's own fields: every layer aggregated, all rows used
        assert row.pop("curriculum_fraction") == 1.0
        assert row.pop("aggregated_layers") == [0, 1]
    assert fib_rows == _rows(lora_run)


def test_flower_takes_it(toy_data):
    """FibecFed runs on Flower (its parity with the embedded engine: tests/engine)."""
    from fedpeft.engine.flower import check_supported

    config = build_config(_config(toy_data, engine="flower"))
    check_supported(config)  # simulation: personalised scores too
    check_supported(config.model_copy(update={"personalized_eval": False}), simulation=False)
    assert config.engine == "flower" and config.method == "fibecfed"


# -- the study's quick mode ----------------------------------------------------------------------


def test_study_quick_mode_runs_every_cell_and_writes_the_page(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import fibecfed as study

    write_dataset(tmp_path / "shared" / "sst2")
    monkeypatch.setenv("FEDPEFT_DATA", str(tmp_path / "shared"))
    out = tmp_path / "results" / "fibecfed"
    page = study.main(quick=True, out=out)
    cells = study.grid(quick=True)
    assert {c.run for c in cells} == {
        "fibecfed",
        "lora",
        "curriculum",
        "sparse",
        "random",
        "bitfit",
    }
    for cell in cells:
        summary = json.loads((out / cell.folder / "summary.json").read_text())
        assert summary["complete"]
        config = build_config(cell.config(None))
        if cell.run == "curriculum":
            assert not config.fibecfed.layer_selection and config.fibecfed.curriculum
    text = page.read_text()
    assert "### Against the paper's claims" in text and "| fibecfed |" in text
    figures = json.loads((out.parent / "fibecfed.json").read_text())
    cell = figures["cells"]["sst2"]
    assert (
        cell["fibecfed"]["a1"]["bytes_up_per_client_round"]["mean"]
        < (cell["lora"]["a1"]["bytes_up_per_client_round"]["mean"])
    )
    assert set(figures["checks"]) >= {"accuracy_vs_lora", "fewer_bytes_than_lora"}
