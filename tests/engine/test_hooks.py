"""Every engine hook a seed system can use, tested with small fake methods on the tiny model.

Each fake method registers itself the way a real one does (a ``MethodSpec``), so these tests
also show that a method is one unit: nothing else in the package is edited to add it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft import cost, payload, registry
from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.engine.run import sample_clients
from fedpeft.job import build_job
from fedpeft.methods.base import FederatedMethod, RoundDriver
from fedpeft.methods.fedpetuning import FedPETuning
from fedpeft.peft import lora
from fedpeft.peft.base import trainable_state
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


class Recorder(FedPETuning):
    """FedPETuning that records what the engine hands its hooks."""

    name = "recorder"
    calls: list = []

    def __init__(self, algorithm):
        super().__init__(algorithm)
        self.log: list = []
        Recorder.calls = self.log

    def setup(self, clients, num_labels):
        self.log.append(("setup", clients, num_labels))


def register(monkeypatch, name: str, system, **spec_fields) -> None:
    """Add a fake method to the registry the way a new file with a ``SPEC`` would."""
    spec = registry.MethodSpec(
        name=name,
        summary=f"fake method {name}",
        settings=lora.LoraSettings,
        inject=lambda model, config: lora.inject(model, getattr(config, name)),
        default_lr=5e-3,
        system=system,
        **spec_fields,
    )
    table = dict(registry.methods())
    table[name] = spec
    monkeypatch.setattr(registry, "_METHODS", table)
    import fedpeft.config as config_module

    monkeypatch.setattr(config_module, "RunConfig", config_module._with_method_sections())


def run(folder: Path, **config):
    cfg = build_config(config)
    job = build_job(cfg)
    summary = EmbeddedEngine(job, RunDir.create(folder, dump_config(cfg))).run()
    return (
        job,
        summary,
        [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()],
    )


def test_a_method_is_one_registered_unit(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Recorder(info.algorithm))
    config = build_config(tiny_config(toy_data, method="fake", fake={"r": 2}, lr=None))
    assert config.fake.r == 2 and config.lr == 5e-3  # its settings section and default lr
    with pytest.raises(ConfigError, match="unknown config key 'fake.bogus'"):
        build_config(tiny_config(toy_data, method="fake", fake={"bogus": 1}))
    with pytest.raises(ConfigError, match="method: unknown 'nope'"):
        build_config(tiny_config(toy_data, method="nope"))


def test_engines_a_method_does_not_run_are_refused(monkeypatch, toy_data):
    register(monkeypatch, "fake", None, engines=("embedded",))
    with pytest.raises(ConfigError, match="engine: flower does not run method fake"):
        build_config(tiny_config(toy_data, method="fake", engine="flower"))


def test_setup_gets_each_clients_plain_context(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Recorder(info.algorithm))
    job = build_job(build_config(tiny_config(toy_data, method="fake", partition="dirichlet")))
    ((_, clients, num_labels),) = [c for c in Recorder.calls if c[0] == "setup"]
    assert num_labels == 4 and len(clients) == 4
    labels = job.train.labels.numpy()
    for cid, context in enumerate(clients):
        rows = job.partition.train[cid]
        assert context.cid == cid and context.num_rows == len(rows)
        assert context.label_counts.tolist() == np.bincount(labels[rows], minlength=4).tolist()
        assert context.num_test_rows == len(job.partition.test[cid])
        assert context.group is None


def test_natural_partition_gives_groups_and_per_group_accuracy(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Recorder(info.algorithm))
    job, summary, rows = run(
        tmp_path / "r",
        **tiny_config(
            toy_data, method="fake", partition="natural", num_clients=2, clients_per_round=2
        ),
    )
    assert sorted(c.group for c in job.clients) == ["de", "en"]
    last = rows[-1]
    assert set(last["group_accuracy"]) == {"de", "en"}
    # by hand: the mean over the two languages of the test rows' accuracy in each
    assert last["group_accuracy_mean"] == pytest.approx(
        np.mean(list(last["group_accuracy"].values()))
    )


class Curriculum(FedPETuning):
    """Row selection: trains on the first half of its rows only."""

    def begin_client(self, session):
        session.rows = session.rows[: len(session.rows) // 2]


def test_row_selection_trains_on_the_chosen_rows(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Curriculum(info.algorithm))
    seen = {}
    import fedpeft.engine.run as run_module

    original = run_module.train_local

    def spy(model, data, indices, training, **kwargs):
        seen.setdefault("rows", []).append(np.asarray(indices).copy())
        return original(model, data, indices, training, **kwargs)

    monkeypatch.setattr(run_module, "train_local", spy)
    job, _summary, _rows = run(tmp_path / "r", **tiny_config(toy_data, method="fake", rounds=1))
    clients = sample_clients(0, 1, 4, 2)
    for cid, rows in zip(clients, seen["rows"], strict=True):
        full = job.partition.train[cid]
        assert rows.tolist() == full[: len(full) // 2].tolist()


class Conditioned(FedPETuning):
    """Per-batch conditioning: records every batch it is shown, in training and evaluation."""

    def __init__(self, algorithm):
        super().__init__(algorithm)
        self.seen: list = []
        self.evals: list = []

    def condition(self, model, batch, rows, *, training, cid):
        self.seen.append((training, cid, batch["labels"].clone(), np.asarray(rows).copy()))

    def prepare_eval(self, model, cid, store):
        self.evals.append(cid)


@pytest.mark.parametrize("cache", [False, True])
def test_condition_sees_every_batch_before_its_forward(monkeypatch, tmp_path, toy_data, cache):
    register(monkeypatch, "fake", lambda config, info: Conditioned(info.algorithm))
    config = tiny_config(
        toy_data,
        method="fake",
        rounds=1,
        personalized_eval=True,
        fake={"depth": 1},  # a frozen bottom layer: the activation cache applies
        activation_cache={"enabled": cache},
    )
    job, _summary, _rows = run(tmp_path / "r", **config)
    method = job.method
    train = [s for s in method.seen if s[0]]
    labels = job.train.labels
    assert train and all(torch.equal(s[2], labels[s[3]]) for s in train)
    assert {s[1] for s in train} == set(sample_clients(0, 1, 4, 2))
    global_evals = [s for s in method.seen if not s[0] and s[1] is None]
    assert sum(len(s[3]) for s in global_evals) == len(job.test) + len(job.validation)
    # personalised evaluation: each client with test rows, conditioned as that client
    assert {s[1] for s in method.seen if not s[0] and s[1] is not None} == set(range(4))
    assert None in method.evals and set(range(4)) <= set(method.evals)


class Local(FedPETuning):
    """Keeps the classifier bias local: never downloaded, never uploaded, kept in the store."""

    LOCAL = "classifier.bias"

    def __init__(self, algorithm):
        super().__init__(algorithm)
        self.began: dict = {}

    def download(self, rnd, cid, global_state):
        return {k: v for k, v in global_state.items() if k != self.LOCAL}

    def begin_client(self, session):
        param = dict(session.model.named_parameters())[self.LOCAL]
        self.began.setdefault(session.cid, []).append(param.detach().clone())
        if self.LOCAL in session.store:
            with torch.no_grad():
                param.copy_(session.store[self.LOCAL])

    def end_client(self, session):
        session.store[self.LOCAL] = (
            dict(session.model.named_parameters())[self.LOCAL].detach().clone()
        )
        session.metrics["bias_norm"] = float(session.store[self.LOCAL].norm())

    def upload(self, rnd, cid, trained):
        return {k: v for k, v in trained.items() if k != self.LOCAL}

    def aggregate(self, rnd, global_state, updates):
        self.reported = {u.cid: u.metrics for u in updates}
        return super().aggregate(rnd, global_state, updates)


def test_persistent_client_state_stays_with_its_client(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Local(info.algorithm))
    job, _summary, rows = run(
        tmp_path / "r", **tiny_config(toy_data, method="fake", rounds=4, clients_per_round=2)
    )
    method = job.method
    initial = job.initial_state[Local.LOCAL]
    for cid, began in method.began.items():
        # nothing of another client's training is in the resident model when a client starts
        assert all(torch.equal(b, initial) for b in began), cid
    # the client's own value is what the engine keeps for it, checkpointed
    ckpt = RunDir(tmp_path / "r").load_checkpoint()
    stored = ckpt.extra["store"]
    trained = {int(c) for c in stored}
    assert trained == {c for r in rows for c in r["clients"]}
    values = [stored[str(c)][Local.LOCAL] for c in sorted(trained)]
    assert not any(torch.equal(values[0], v) for v in values[1:])
    # the global bias never moved: it never travelled
    final = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert torch.equal(final[Local.LOCAL], initial)
    # client metrics reached aggregate; bytes up are the encoded selection only
    assert all("bias_norm" in m for m in method.reported.values())
    up = {k: v for k, v in job.initial_state.items() if k != Local.LOCAL}
    assert rows[0]["bytes_up"] == 2 * len(payload.encode(up))


def test_resume_restores_the_client_store(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Local(info.algorithm))
    config = tiny_config(toy_data, method="fake", rounds=3)
    run(tmp_path / "full", **config)
    first = build_config({**config, "rounds": 1})
    EmbeddedEngine(build_job(first), RunDir.create(tmp_path / "cut", dump_config(first))).run()
    (tmp_path / "cut" / "config.yaml").write_text(dump_config(build_config(config)))
    EmbeddedEngine(build_job(build_config(config)), RunDir.open(tmp_path / "cut")).run()
    for name in ("weights.safetensors",):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa = RunDir(tmp_path / "full").load_checkpoint().extra["store"]
    sb = RunDir(tmp_path / "cut").load_checkpoint().extra["store"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[c][Local.LOCAL], sb[c][Local.LOCAL]) for c in sa)


class Charged(FedPETuning):
    FLOPS = 3e12

    def end_client(self, session):
        session.charge(self.FLOPS)


def test_extra_compute_is_charged_to_the_device(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "plain", None)
    register(monkeypatch, "fake", lambda config, info: Charged(info.algorithm))
    base = tiny_config(toy_data, rounds=1, clients_per_round=1, cost={"devices": ["phone"]})
    job, _s, plain = run(tmp_path / "a", **{**base, "method": "plain"})
    _job, _s, charged = run(tmp_path / "b", **{**base, "method": "fake"})
    device, _net = job.profiles[charged[0]["clients"][0]]
    extra = charged[0]["sim_time_s"] - plain[0]["sim_time_s"]
    assert extra == pytest.approx(cost.compute_time_s(Charged.FLOPS, device), rel=1e-6)


class Masked(FedPETuning):
    """Only the first row of each LoRA A matrix trains; everything else in them is frozen."""

    def begin_client(self, session):
        for name, p in session.model.named_parameters():
            if "lora_A" in name and p.requires_grad:
                mask = torch.zeros_like(p, dtype=torch.bool)
                mask[0] = True
                session.masks[name] = mask


def test_masks_freeze_entries_exactly_under_adamw_weight_decay(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Masked(info.algorithm))
    job, _s, _rows = run(
        tmp_path / "r",
        **tiny_config(toy_data, method="fake", rounds=2, weight_decay=0.1, lr=5e-2),
    )
    final = load_file(str(tmp_path / "r" / "weights.safetensors"))
    moved = 0
    for name, initial in job.initial_state.items():
        if "lora_A" not in name:
            continue
        assert torch.equal(final[name][1:], initial[1:]), name  # frozen: bit for bit
        moved += int(not torch.equal(final[name][0], initial[0]))
    assert moved > 0


class Partial(FedPETuning):
    """Only the head travels up: partial-key aggregation."""

    def upload(self, rnd, cid, trained):
        return {k: v for k, v in trained.items() if k.startswith("classifier.")}


def test_only_selected_keys_travel_and_change(monkeypatch, tmp_path, toy_data):
    register(monkeypatch, "fake", lambda config, info: Partial(info.algorithm))
    job, _s, rows = run(tmp_path / "r", **tiny_config(toy_data, method="fake", rounds=1))
    final = load_file(str(tmp_path / "r" / "weights.safetensors"))
    head = {k: v for k, v in job.initial_state.items() if k.startswith("classifier.")}
    assert rows[0]["bytes_up"] == 2 * len(payload.encode(head))
    for name, initial in job.initial_state.items():
        same = torch.equal(final[name], initial)
        assert same != name.startswith("classifier."), name


def test_round_drivers_are_recognised_by_type():
    class Driver(RoundDriver):
        pass

    assert isinstance(Driver(), FederatedMethod)
    assert not isinstance(FedPETuning(None), RoundDriver)
    state = trainable_state(torch.nn.Linear(2, 2))
    assert FederatedMethod().download(1, 0, state) is state
