"""ServerAlgorithm: the engine-facing object, including checkpoint round trips."""

import io

import pytest
import torch

from fedpeft.algorithms import ALGORITHMS, ServerAlgorithm, fedavg, make_algorithm


def rounds(num_rounds, seed=0):
    """Deterministic client states for a few rounds: 3 clients, two tensors each."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            {"w": torch.randn(2, 3, generator=gen), "b": torch.randn(3, generator=gen)}
            for _ in range(3)
        ]
        for _ in range(num_rounds)
    ]


INITIAL = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
SAMPLES = [10, 20, 30]


def run(algo, client_rounds, state=None):
    state = dict(INITIAL) if state is None else state
    for clients in client_rounds:
        state = algo.aggregate(state, clients, SAMPLES)
    return state


def test_names():
    assert ALGORITHMS == (
        "fedavg",
        "fedprox",
        "fedadagrad",
        "fedadam",
        "fedyogi",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "bulyan",
    )
    for name in ALGORITHMS:
        assert make_algorithm(name).name == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="fedavg, fedprox, fedadagrad, fedadam, fedyogi"):
        make_algorithm("scaffold")


def test_bad_hparams_fail_at_construction():
    with pytest.raises(ValueError):
        make_algorithm("fedprox", mu=-0.1)
    with pytest.raises(ValueError):
        make_algorithm("fedyogi", eta=0.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_family_aggregates_with_fedavg(name):
    clients = rounds(1)[0]
    out = make_algorithm(name).aggregate(INITIAL, clients, SAMPLES)
    expected = fedavg(INITIAL, clients, SAMPLES)
    for key in expected:
        assert torch.equal(out[key], expected[key])


def test_client_loss_only_for_fedprox():
    params = {"w": torch.ones(2, 3, requires_grad=True), "b": torch.zeros(3, requires_grad=True)}
    for name in ("fedavg", "fedadam", "fedyogi", "fedadagrad"):
        assert make_algorithm(name).client_loss(params, INITIAL) is None
    loss = make_algorithm("fedprox", mu=0.5).client_loss(params, INITIAL)
    # 0.5 / 2 * (six ones squared) = 1.5
    assert loss.item() == pytest.approx(1.5)


def test_fedopt_moves_differently_from_fedavg():
    clients = rounds(1)[0]
    plain = make_algorithm("fedavg").aggregate(INITIAL, clients, SAMPLES)
    adam = make_algorithm("fedadam").aggregate(INITIAL, clients, SAMPLES)
    assert not torch.allclose(plain["w"], adam["w"])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_checkpoint_round_trip_resumes_identically(name):
    client_rounds = rounds(4)
    uninterrupted = run(make_algorithm(name), client_rounds)

    first = make_algorithm(name)
    halfway = run(first, client_rounds[:2])
    buffer = io.BytesIO()
    torch.save({"algo": first.state_dict(), "model": halfway}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = make_algorithm(name)
    resumed.load_state_dict(saved["algo"])
    final = run(resumed, client_rounds[2:], state=saved["model"])
    for key in uninterrupted:
        assert torch.equal(final[key], uninterrupted[key])


def test_fresh_fedopt_differs_from_resumed():
    # Guards the round-trip test: dropping the optimiser state would change the result.
    client_rounds = rounds(3)
    algo = make_algorithm("fedadam")
    state = run(algo, client_rounds[:2])
    resumed = run(algo, client_rounds[2:], state=state)
    fresh = run(make_algorithm("fedadam"), client_rounds[2:], state=state)
    assert not torch.equal(resumed["w"], fresh["w"])


def test_load_state_dict_rejects_other_algorithm():
    with pytest.raises(ValueError, match="fedadam"):
        make_algorithm("fedyogi").load_state_dict(make_algorithm("fedadam").state_dict())


def test_is_a_server_algorithm():
    assert isinstance(make_algorithm("fedavg"), ServerAlgorithm)
    assert "mu=0.01" in repr(make_algorithm("fedprox"))
