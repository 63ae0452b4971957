"""The registry: every method is one file with a SPEC, and everything about it comes from there."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft import registry
from fedpeft.config import ConfigError, build_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_method_file_registers_itself():
    names = set(registry.methods())
    assert {"lora", "adapter", "prefix", "prompt", "bitfit", "full", "autofednlp"} <= names
    for name, spec in registry.methods().items():
        assert spec.name == name
        assert spec.summary and "\n" not in spec.summary
        assert spec.default_lr > 0
        assert set(spec.engines) <= {"embedded", "flower"}


@pytest.mark.parametrize("name", sorted(registry.methods()))
def test_each_method_is_documented_and_configurable(name):
    spec = registry.get(name)
    assert f"`{name}`" in README.read_text(), f"README does not mention method {name}"
    for field_name, field in spec.settings.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description (fedpeft list shows it)"
    config = build_config(
        {"method": name, "num_clients": 30, "clients_per_round": 5, "personalized_eval": True}
    )
    assert isinstance(getattr(config, name), spec.settings)
    assert config.lr == spec.default_lr
    with pytest.raises(ConfigError, match=f"unknown config key '{name}.no_such_setting'"):
        build_config({"method": name, "personalized_eval": True, name: {"no_such_setting": 1}})


def test_unknown_names_list_the_choices():
    with pytest.raises(KeyError, match="choose from"):
        registry.get("nope")


def test_round_driving_methods_are_declared_by_their_spec():
    from fedpeft.job import build_method
    from fedpeft.methods.base import RoundDriver

    for name, spec in registry.methods().items():
        if spec.system is None:
            continue
        config = build_config(
            {"method": name, "num_clients": 30, "clients_per_round": 5, "personalized_eval": True}
        )
        method = build_method(config, num_layers=2, num_labels=4)
        assert isinstance(method, RoundDriver) == spec.drives_rounds, name
