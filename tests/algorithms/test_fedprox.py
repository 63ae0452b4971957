"""FedProx proximal term: value and gradient against hand-computed numbers."""

import pytest
import torch

from fedpeft.algorithms.fedprox import proximal_term


def test_value_and_gradient_by_hand():
    params = {
        "w": torch.tensor([1.0, 2.0], requires_grad=True),
        "b": torch.tensor([3.0], requires_grad=True),
    }
    glob = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    term = proximal_term(params, glob, mu=0.1)
    # ||w - w_g||^2 = 1^2 + 2^2 + (3 - 1)^2 = 9;  mu/2 * 9 = 0.05 * 9
    assert term.item() == pytest.approx(0.45)
    term.backward()
    # d/dw = mu * (w - w_g)
    torch.testing.assert_close(params["w"].grad, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(params["b"].grad, torch.tensor([0.2]))


def test_only_global_keys_count_and_global_gets_no_grad():
    params = {"w": torch.tensor([2.0], requires_grad=True), "frozen": torch.tensor([100.0])}
    glob = {"w": torch.tensor([1.0], requires_grad=True)}
    term = proximal_term(params, glob, mu=2.0)
    # 2/2 * (2 - 1)^2
    assert term.item() == pytest.approx(1.0)
    term.backward()
    assert glob["w"].grad is None
    assert params["w"].grad.item() == pytest.approx(2.0)


def test_zero_at_the_global_model_and_for_mu_zero():
    glob = {"w": torch.tensor([1.5, -2.0])}
    params = {"w": glob["w"].clone().requires_grad_()}
    assert proximal_term(params, glob, mu=0.5).item() == 0.0
    assert proximal_term({"w": torch.tensor([9.0, 9.0])}, glob, mu=0.0).item() == 0.0


def test_works_with_named_parameters_of_a_module():
    layer = torch.nn.Linear(2, 1)
    glob = {k: torch.zeros_like(v) for k, v in layer.state_dict().items()}
    term = proximal_term(dict(layer.named_parameters()), glob, mu=1.0)
    expected = 0.5 * sum(p.detach().pow(2).sum() for p in layer.parameters())
    torch.testing.assert_close(term, expected)


def test_missing_param_and_negative_mu_rejected():
    glob = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="'w'"):
        proximal_term({}, glob, mu=0.1)
    with pytest.raises(ValueError, match="mu"):
        proximal_term({"w": torch.zeros(1)}, glob, mu=-1.0)
