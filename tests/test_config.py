"""Config validation: defaults, overrides, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import ConfigError, build_config, dump_config, load_config, parse_overrides


def test_defaults_and_nested_overrides():
    config = build_config(
        {"method": "lora"}, ["lora.r=16", "lr=1e-3", "lora.target_modules=[query,key]"]
    )
    assert config.lora.r == 16
    assert config.lr == pytest.approx(1e-3)
    assert config.lora.target_modules == ["query", "key"]
    assert config.method_settings() is config.lora


def test_robust_settings_reach_the_server_algorithm():
    from fedpeft.job import build_method

    config = build_config(
        {"algorithm": "trimmed_mean", "robust": {"trim_ratio": 0.25, "clip_norm": 2.0}}
    )
    algorithm = build_method(config, num_layers=6, num_labels=4).algorithm
    assert (algorithm.name, algorithm.trim_ratio, algorithm.clip_norm) == (
        "trimmed_mean",
        0.25,
        2.0,
    )


def test_round_trip_through_yaml(tmp_path):
    config = build_config({"method": "adapter", "adapter": {"width": 16, "depth": 3}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"lrr": 0.1}, [], "unknown config key 'lrr'"),
        ({"lora": {"rank": 4}}, [], "unknown config key 'lora.rank'"),
        ({"method": "lorax"}, [], "method:"),
        ({"lr": -1}, [], "lr: Input should be greater than 0"),
        ({"algorithm": "fedsgd"}, [], "unknown 'fedsgd'"),
        (
            {"num_clients": 5, "clients_per_round": 6},
            [],
            "clients_per_round: 6 is more than num_clients",
        ),
        ({}, ["rounds"], "--set expects key=value"),
        ({}, ["lr.x=1"], "lr: Input should be a valid number"),
        ({}, ["partition=weird"], "partition:"),
        ({"algorithm": "trimmed_mean"}, ["robust.trim_ratio=0.5"], "robust.trim_ratio:"),
        ({}, ["robust.clip_norm=0"], "robust.clip_norm:"),
    ],
)
def test_errors_are_one_line_and_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError) as info:
        build_config(data, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_override_values_are_typed():
    assert parse_overrides(["a.b=3", "c=true", "d=null", "e=x y"]) == {
        "a": {"b": 3},
        "c": True,
        "d": None,
        "e": "x y",
    }


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=str
)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.method and config.lr > 0
