"""Simulated attacks: golden numbers for the pure functions, config errors, and runs of the tiny
model where attackers poison their uploads or train on flipped labels."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fedpeft.engine.local as local
import fedpeft.engine.run as skeleton
from fedpeft import attacks
from fedpeft.attacks import (
    add_noise,
    choose_attackers,
    flip_labels,
    noise_seed,
    num_attackers,
    plan_attack,
    poison_update,
    scale_update,
    sign_flip,
)
from fedpeft.config import ConfigError, build_config
from fedpeft.data.tokenize import TokenizedData
from tests.conftest import tiny_config
from tests.engine.test_local import run_once

RECEIVED = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3)}
TRAINED = {"w": torch.tensor([2.0, 0.0]), "step": torch.tensor(4), "local": torch.tensor([5.0])}
# the honest update is w - g = (1, -2); "local" was not received, "step" is an integer


def test_sign_flip_and_scale_golden():
    flipped = sign_flip(TRAINED, RECEIVED)  # g - (w - g) = (1 - 1, 2 + 2)
    assert flipped["w"].tolist() == [0.0, 4.0]
    assert sign_flip(TRAINED, RECEIVED, 2.0)["w"].tolist() == [-1.0, 6.0]  # g - 2 (w - g)
    assert scale_update(TRAINED, RECEIVED, 10.0)["w"].tolist() == [11.0, -18.0]  # g + 10 (w - g)
    assert scale_update(TRAINED, RECEIVED, 1.0)["w"].tolist() == [2.0, 0.0]
    for out in (flipped, scale_update(TRAINED, RECEIVED, 10.0)):
        assert out["step"] is TRAINED["step"] and out["local"] is TRAINED["local"]
        assert out["w"].dtype == torch.float32


def test_half_precision_overflow_becomes_inf():
    half = {"w": torch.tensor([60000.0], dtype=torch.float16)}
    out = scale_update(half, {"w": torch.tensor([0.0], dtype=torch.float16)}, 10.0)
    assert out["w"].dtype == torch.float16 and torch.isinf(out["w"]).all()


def test_noise_is_seeded_and_has_the_asked_std():
    big = {"w": torch.zeros(20000), "step": torch.tensor(1)}
    a = add_noise(big, big, 2.0, seed=5)
    assert torch.equal(a["w"], add_noise(big, big, 2.0, seed=5)["w"])
    assert not torch.equal(a["w"], add_noise(big, big, 2.0, seed=6)["w"])
    assert abs(a["w"].mean().item()) < 0.05 and a["w"].std().item() == pytest.approx(2.0, rel=0.03)
    assert a["step"] is big["step"]
    assert noise_seed(0, 1, 2) != noise_seed(0, 1, 3) != noise_seed(0, 2, 3)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="trained shape"):
        sign_flip({"w": torch.zeros(3)}, {"w": torch.zeros(2)})


def test_attackers_are_a_seeded_fraction():
    assert [num_attackers(10, f) for f in (0.3, 0.05, 0.7, 1.0, 0.0)] == [3, 0, 7, 10, 0]
    assert num_attackers(100, 0.29) == 29
    chosen = choose_attackers(0, 10, 0.3)
    assert (
        len(chosen) == 3
        and chosen == sorted(set(chosen))
        and chosen == choose_attackers(0, 10, 0.3)
    )
    assert any(choose_attackers(s, 10, 0.3) != chosen for s in range(1, 5))
    with pytest.raises(ValueError, match="fraction"):
        num_attackers(10, 1.5)


def test_plan_defaults_record_and_dispatch():
    assert plan_attack("none", 0.5, 10, 0) is None
    plan = plan_attack("scale", 0.3, 10, 0)
    assert plan.scale == 10.0 and plan.record() == {
        "type": "scale",
        "fraction": 0.3,
        "scale": 10.0,
        "seed": 0,
        "attackers": choose_attackers(0, 10, 0.3),
    }
    assert plan_attack("sign_flip", 0.3, 10, 0).scale == 1.0
    assert plan_attack("noise", 0.3, 10, 0, scale=0.5).scale == 0.5
    assert plan_attack("label_flip", 0.3, 10, 0).scale is None
    assert poison_update(plan, TRAINED, RECEIVED, 1, 2)["w"].tolist() == [11.0, -18.0]
    noisy = plan_attack("noise", 0.3, 10, 7)
    once = poison_update(noisy, TRAINED, RECEIVED, 1, 2)["w"]
    assert torch.equal(once, poison_update(noisy, TRAINED, RECEIVED, 1, 2)["w"])
    assert not torch.equal(once, poison_update(noisy, TRAINED, RECEIVED, 2, 2)["w"])
    with pytest.raises(ValueError, match="not an update attack"):
        poison_update(plan_attack("label_flip", 0.3, 10, 0), TRAINED, RECEIVED, 1, 2)
    with pytest.raises(ValueError, match="selects no attacker"):
        plan_attack("sign_flip", 0.05, 10, 0)
    with pytest.raises(ValueError, match="no scale"):
        plan_attack("label_flip", 0.3, 10, 0, scale=2.0)
    with pytest.raises(ValueError, match="unknown attack"):
        plan_attack("backdoor", 0.3, 10, 0)


def test_flip_labels_golden():
    rows = torch.arange(8).reshape(4, 2)
    data = TokenizedData(rows, rows, rows, torch.tensor([0, 1, 2, 3]), torch.full((4,), 2))
    flipped = flip_labels(data, 4)
    assert flipped.labels.tolist() == [3, 2, 1, 0]
    assert flipped.input_ids is data.input_ids and data.labels.tolist() == [0, 1, 2, 3]
    assert flip_labels(data, 5).labels.tolist() == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="outside"):
        flip_labels(data, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"num_clients": 10, "attack": {"type": "noise", "fraction": 0.05}},
            "attack.fraction: 0.05 of 10 clients selects no attacker",
        ),
        ({"attack": {"type": "label_flip", "fraction": 0.5, "scale": 2}}, "label_flip takes no"),
        ({"attack": {"type": "backdoor"}}, "attack.type:"),
        ({"attack": {"fraction": 1.5}}, "attack.fraction:"),
        ({"attack": {"type": "scale", "fraction": 0.5, "scale": 0}}, "attack.scale:"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_config(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- end to end on the tiny model ----------------------------------------------------------------
def _captured_run(folder, data, monkeypatch, **overrides):
    """One round with all ten clients: (what each client received, what it uploaded, the new
    global weights, the run dir)."""
    received, uploads = {}, []
    train, encode = skeleton.train_client, local.encode_upload

    def spy(job, rnd, cid, state, *args, **kwargs):
        received[cid] = state
        return train(job, rnd, cid, state, *args, **kwargs)

    monkeypatch.setattr(skeleton, "train_client", spy)
    monkeypatch.setattr(
        local, "encode_upload", lambda state: uploads.append(state) or encode(state)
    )
    config = tiny_config(
        data, num_clients=10, clients_per_round=10, rounds=1, local_steps=2, **overrides
    )
    _summary, run = run_once(folder, **config)
    monkeypatch.undo()
    return received, uploads, load_file(str(run.weights_path)), run


def test_sign_flip_attackers_are_recorded_and_krum_resists(tmp_path, toy_data, monkeypatch):
    attack = {"type": "sign_flip", "fraction": 0.3}
    _, clean, _, clean_run = _captured_run(tmp_path / "clean", toy_data, monkeypatch)
    received, flipped, fedavg, run = _captured_run(
        tmp_path / "fedavg", toy_data, monkeypatch, attack=attack
    )
    _, _, krum, krum_run = _captured_run(
        tmp_path / "krum",
        toy_data,
        monkeypatch,
        attack=attack,
        algorithm="krum",
        robust={"num_byzantine": 3},
    )
    attackers = choose_attackers(0, 10, 0.3)
    for folder in (run.path, krum_run.path):
        record = json.loads((folder / "attackers.json").read_text())
        assert record["attackers"] == attackers and record["type"] == "sign_flip"
    assert not (clean_run.path / "attackers.json").exists()
    (row,) = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert row["attackers_in_round"] == sorted(attackers)  # all ten clients sample round 1
    # round 1 samples all ten clients in order; an attacker sends g - (w - g), where g is what it
    # received and w exactly what it sent in the clean run (training is seeded by round and client)
    for cid in range(10):
        for key, value in clean[cid].items():
            if cid in attackers:
                expected = 2 * received[cid][key].double() - value.double()
                assert torch.allclose(flipped[cid][key].double(), expected, atol=1e-6), key
            else:
                assert torch.equal(flipped[cid][key], value), key
    assert any(not torch.equal(krum[k], fedavg[k]) for k in krum)
    # Krum's new global state is one client's upload: an honest one
    winners = [cid for cid in range(10) if all(torch.equal(krum[k], clean[cid][k]) for k in krum)]
    assert len(winners) == 1 and winners[0] not in attackers


def test_label_flip_attackers_train_on_flipped_labels(tmp_path, toy_data, monkeypatch):
    seen = {}
    train = skeleton.train_client

    def spy(job, rnd, cid, *args, **kwargs):
        seen[cid] = job.train.labels.clone()
        return train(job, rnd, cid, *args, **kwargs)

    monkeypatch.setattr(skeleton, "train_client", spy)
    attack = {"type": "label_flip", "fraction": 0.5}
    config = tiny_config(toy_data, rounds=1, local_steps=1, clients_per_round=4, attack=attack)
    _summary, run = run_once(tmp_path / "flip", **config)
    attackers = json.loads((run.path / "attackers.json").read_text())["attackers"]
    assert attackers == choose_attackers(0, 4, 0.5) and len(attackers) == 2
    honest = next(cid for cid in seen if cid not in attackers)
    for cid in attackers:
        assert seen[cid].tolist() == (3 - seen[honest]).tolist()
    assert attacks.UPDATE_ATTACKS == ("sign_flip", "scale", "noise")
