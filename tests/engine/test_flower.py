"""The Flower engine in simulation: parity with the embedded engine, config, the app folder."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft.config import ConfigError, build_config, dump_config
from fedpeft.engine.flower import FlowerEngine, PromptGrid, check_supported
from fedpeft.engine.flower_deploy import deployment_commands, make_credentials, write_app
from fedpeft.engine.local import EmbeddedEngine
from fedpeft.faults import RoundFailed
from fedpeft.job import build_job
from fedpeft.runs import RunDir
from tests.conftest import tiny_config


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def on_both_engines(tmp_path: Path, base: dict) -> tuple[dict, dict, dict]:
    """The config run on the embedded engine and on Flower simulation: both summaries by
    engine, then each run's final weights. Both train on one thread (``threads: 1``): float
    sums split over threads differ in their last bits (seen here: 3e-6 after two rounds), and a
    simulated client runs in a process of its own, where the split may not be the same."""
    runs = {}
    threads = torch.get_num_threads()
    try:
        for engine, cls in (("embedded", EmbeddedEngine), ("flower", FlowerEngine)):
            config = build_config({**base, "threads": 1, "engine": engine})
            run = RunDir.create(tmp_path / engine, dump_config(config))
            runs[engine] = cls(build_job(config), run).run()
    finally:
        torch.set_num_threads(threads)
    embedded = load_file(str(tmp_path / "embedded" / "weights.safetensors"))
    flower = load_file(str(tmp_path / "flower" / "weights.safetensors"))
    return runs, embedded, flower


@pytest.mark.parametrize(
    "quantized",
    [{}, {"quantize": "int8", "quantize_download": True}],
    ids=["float", "int8"],
)
def test_simulation_matches_embedded_engine(tmp_path, toy_data, quantized):
    """Same seed and config: the same global weights, bytes and scores from both engines, with
    float messages and with int8 uploads and downloads (``fedpeft.quantize``)."""
    base = tiny_config(
        toy_data, method="lora", algorithm="fedavg", num_clients=4, rounds=2, **quantized
    )
    runs, embedded, flower = on_both_engines(tmp_path, base)
    assert embedded.keys() == flower.keys()
    for name in embedded:
        assert torch.allclose(embedded[name], flower[name], atol=1e-6), name
    assert runs["flower"]["bytes_up_total"] == runs["embedded"]["bytes_up_total"] > 0
    assert runs["flower"]["bytes_down_total"] == runs["embedded"]["bytes_down_total"]
    rows_e, rows_f = metrics(tmp_path / "embedded"), metrics(tmp_path / "flower")
    assert [r["clients"] for r in rows_f] == [r["clients"] for r in rows_e]
    assert [r["accuracy"] for r in rows_f] == pytest.approx([r["accuracy"] for r in rows_e])
    assert [r["clients_failed"] for r in rows_f] == [[], []]
    assert runs["flower"]["complete"] and (tmp_path / "flower" / "checkpoint.json").is_file()
    if quantized:  # int8 codes travel: under half the fp32 bytes even with this tiny model's
        # headers and scales (a float upload here is 1.07x its fp32 tensors, an int8 one 0.45x)
        per_client = runs["flower"]["bytes_up_total"] / sum(len(r["clients"]) for r in rows_f)
        floats = sum(t.numel() for t in flower.values()) * 4
        assert per_client < 0.5 * floats, (per_client, floats)


SEED_SYSTEMS = {
    "c2a": {"method": "c2a", "c2a": {"label_input": "client"}},
    # layers selected after round 1, local sparse LoRA kept in the clients' stores, rescored
    # from stored momenta in round 3: the stores travel with the messages in simulation
    "fibecfed": {
        "method": "fibecfed",
        "rounds": 3,
        "fibecfed": {"rescore_every": 2, "rounds_to_full": 3, "global_layers": 1},
    },
    # nothing aggregated: each client's module lives in its store only
    "local": {"method": "local", "rounds": 3, "local": {"unit": "lora"}},
}


@pytest.mark.parametrize("system", list(SEED_SYSTEMS), ids=list(SEED_SYSTEMS))
def test_seed_systems_on_flower_match_embedded(tmp_path, toy_data, system):
    """The seed systems on Flower simulation: the embedded engine's weights, bytes, scores and
    personalised scores."""
    base = tiny_config(toy_data, num_clients=4, rounds=2, personalized_eval=True)
    base.update(SEED_SYSTEMS[system])
    runs, embedded, flower = on_both_engines(tmp_path, base)
    assert embedded.keys() == flower.keys()
    for name in embedded:
        assert torch.allclose(embedded[name], flower[name], atol=1e-6), name
    for key in ("bytes_up_total", "bytes_down_total", "final_accuracy"):
        assert runs["flower"][key] == pytest.approx(runs["embedded"][key]), key
    assert runs["flower"]["personalized_accuracy_mean"] == pytest.approx(
        runs["embedded"]["personalized_accuracy_mean"]
    )


def test_autofednlp_on_flower_matches_embedded(tmp_path, toy_data):
    """AutoFedNLP's trial periods on Flower simulation: each candidate's sub-rounds go out as
    messages (clients reshape their own model to the candidate), and the run ends on the
    embedded engine's weights, bytes, simulated time, trial rounds and winners."""
    base = tiny_config(
        toy_data,
        method="autofednlp",
        num_clients=6,
        clients_per_round=2,
        rounds=2,
        validation_size=40,
        autofednlp={"tau": 0.006, "start_depth": 1},
        cost={"devices": ["jetson_tx2"], "networks": ["reference_1mbps"]},
    )
    runs, embedded, flower = on_both_engines(tmp_path, base)
    assert embedded.keys() == flower.keys()
    for name in embedded:
        assert torch.allclose(embedded[name], flower[name], atol=1e-6), name
    rows_e, rows_f = metrics(tmp_path / "embedded"), metrics(tmp_path / "flower")
    for key in ("bytes_up", "bytes_down", "clients", "depth", "width"):
        assert [r[key] for r in rows_f] == [r[key] for r in rows_e], key
    assert [r["sim_time_s"] for r in rows_f] == pytest.approx([r["sim_time_s"] for r in rows_e])
    assert [r["accuracy"] for r in rows_f] == pytest.approx([r["accuracy"] for r in rows_e])
    trials = {
        engine: [
            [(c["name"], c["rounds"]) for c in row["trial"]["candidates"]]
            + [row["trial"]["winner"]]
            for row in rows
        ]
        for engine, rows in (("embedded", rows_e), ("flower", rows_f))
    }
    assert trials["flower"] == trials["embedded"]
    assert any(rounds > 1 for _name, rounds in trials["flower"][0][:-1])
    assert [r["clients_failed"] for r in rows_f] == [[], []]


ROUND_RULES = {
    # central DP under faults: round 1 is retried (client 3 crashes, straggler 2 misses the
    # 0.1 s deadline: 1 usable update < min_clients 2), round 2 loses a crashed client, and
    # dp.max_epsilon stops the run before round 3 (epsilon 6.36 after 2 rounds, 7.92 after 3)
    "dp_central_faults": {
        "clients_per_round": 3,
        "rounds": 3,
        "dp": {"noise_multiplier": 1.0, "clip_norm": 0.05, "max_epsilon": 7.0},
        "faults": {
            "crash_prob": 0.4,
            "straggler_fraction": 0.5,
            "straggler_factor": 4,
            "deadline_s": 0.1,
            "min_clients": 2,
        },
    },
    # local DP, sign-flipping attackers, and early_stop (no round gains 1.0: it converges
    # after round 2, before its cap of 3)
    "dp_local_attack_early_stop": {
        "rounds": 3,
        "dp": {"noise_multiplier": 0.5, "clip_norm": 0.05, "mode": "local"},
        "attack": {"type": "sign_flip", "fraction": 0.5},
        "early_stop": {"patience": 1, "min_delta": 1.0},
    },
}


@pytest.mark.parametrize("rules", list(ROUND_RULES), ids=list(ROUND_RULES))
def test_simulation_matches_embedded_engine_under_dp_faults_attacks(tmp_path, toy_data, rules):
    """DP (central and local), faults, attackers and early stopping run on Flower as embedded:
    the same weights, bytes, epsilon, dropped clients and retries, attackers and stop."""
    base = tiny_config(toy_data, method="lora", algorithm="fedavg", **ROUND_RULES[rules])
    runs, embedded, flower = on_both_engines(tmp_path, base)
    for name in embedded:
        assert torch.allclose(embedded[name], flower[name], atol=1e-6), name
    rows_e, rows_f = metrics(tmp_path / "embedded"), metrics(tmp_path / "flower")
    assert len(rows_e) == len(rows_f) == 2  # both stopped before round 3, for the same reason
    for key in ("stopped", "converged", "epsilon", "bytes_up_total", "bytes_down_total"):
        assert runs["flower"].get(key) == runs["embedded"].get(key), key
    fields = (
        "clients",
        "epsilon",
        "dp_clipped_fraction",
        "dp_noised_clients",
        "clients_dropped",
        "stragglers_in_round",
        "attempts",
        "attackers_in_round",
        "clients_rejected",
    )
    for row_e, row_f in zip(rows_e, rows_f, strict=True):
        for key in fields:
            assert row_f.get(key) == row_e.get(key), (row_e["round"], key)
        assert row_f["sim_time_s"] == pytest.approx(row_e["sim_time_s"])
        assert row_f["clients_failed"] == []
    assert all(r["epsilon"] > 0 for r in rows_f)
    if rules == "dp_central_faults":
        assert "dp.max_epsilon" in runs["flower"]["stopped"]
        assert rows_f[0]["attempts"] == 2 and rows_f[1]["attempts"] == 1
        reasons = {d["reason"] for r in rows_f for d in r["clients_dropped"]}
        assert reasons == {"crashed", "deadline"}
    else:
        assert runs["flower"]["converged"] and not runs["flower"]["cap_hit"]
        assert rows_f[0]["dp_mode"] == "local" and rows_f[0]["dp_noised_clients"]
        assert any(r["attackers_in_round"] for r in rows_f)
        attackers = (tmp_path / "flower" / "attackers.json").read_text()
        assert attackers == (tmp_path / "embedded" / "attackers.json").read_text()


def test_a_round_short_of_min_clients_stops_both_engines_alike(tmp_path, toy_data):
    """faults.min_clients 3 of 3: round 1 passes on its retry; every attempt of round 2 loses a
    client (crashed or late), so both engines stop in one line with round 1 kept."""
    rules = {**ROUND_RULES["dp_central_faults"], "rounds": 2}
    rules = {**rules, "dp": {}, "faults": {**rules["faults"], "min_clients": 3}}
    base = tiny_config(toy_data, method="lora", algorithm="fedavg", **rules)
    errors = {}
    for engine, cls in (("embedded", EmbeddedEngine), ("flower", FlowerEngine)):
        config = build_config({**base, "engine": engine})
        run = RunDir.create(tmp_path / engine, dump_config(config))
        with pytest.raises(RoundFailed) as info:
            cls(build_job(config), run).run()
        errors[engine] = str(info.value).replace(str(run.path), "RUN")
        assert [r["round"] for r in metrics(run.path)] == [1]
    assert errors["flower"] == errors["embedded"]
    assert errors["flower"].startswith("round 2: fewer than faults.min_clients (3)")
    assert "\n" not in errors["flower"]
    assert psutil.Process().children(recursive=True) == []
    embedded = load_file(str(tmp_path / "embedded" / "best.safetensors"))
    flower = load_file(str(tmp_path / "flower" / "best.safetensors"))
    for name in embedded:
        assert torch.allclose(embedded[name], flower[name], atol=1e-6), name


def test_config_accepts_flower_and_validates_its_section(toy_data):
    config = build_config(tiny_config(toy_data), ["engine=flower", "flower.round_timeout_s=30"])
    assert config.engine == "flower" and config.flower.round_timeout_s == 30
    with pytest.raises(ConfigError, match="engine"):
        build_config(tiny_config(toy_data, engine="ray"))
    with pytest.raises(ConfigError, match="round_timeout_s"):
        build_config(tiny_config(toy_data), ["flower.round_timeout_s=0"])
    with pytest.raises(ConfigError, match="unknown config key 'flower.port'"):
        build_config(tiny_config(toy_data), ["flower.port=1"])
    # refused when the config is validated, before any run folder exists
    assert build_config(tiny_config(toy_data, engine="flower", quantize="int8")).quantize == "int8"
    auto = tiny_config(toy_data, engine="flower", method="autofednlp", num_clients=6)
    check_supported(build_config(auto))  # AutoFedNLP runs in simulation
    check_supported(build_config(auto), simulation=False)  # and deployed
    with pytest.raises(ConfigError, match="runs its own rounds"):
        secagg = {"insecure": True, "secagg": {"enabled": True}}
        build_config({**auto, "clients_per_round": 2, "flower": secagg})
    with pytest.raises(ConfigError, match="activation_cache.enabled: in Flower simulation"):
        check_supported(build_config({**auto, "activation_cache": {"enabled": True}}))
    check_supported(build_config(tiny_config(toy_data, engine="flower")))  # runs: no error


def test_app_folder_carries_the_run_and_secure_commands(tmp_path, toy_data):
    config = build_config(tiny_config(toy_data, engine="flower"))
    app = write_app(tmp_path / "app", config, tmp_path / "run")
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    flwr_app = doc["tool"]["flwr"]["app"]
    assert flwr_app["components"]["serverapp"] == "fedpeft.engine.flower_app:server_app"
    assert build_config(yaml.safe_load(flwr_app["config"]["fedpeft-config"])) == config
    assert flwr_app["config"]["run-dir"] == str((tmp_path / "run").resolve())
    assert doc["project"]["dependencies"] == []  # nothing for a runtime installer to fetch
    creds = make_credentials(tmp_path / "certs", num_nodes=2)
    secure_app = write_app(tmp_path / "secure", config, tmp_path / "run", creds.ca_cert)
    connection = tomllib.loads((secure_app / "flwr-home" / "config.toml").read_text())
    assert connection["superlink"]["fedpeft"]["root-certificates"] == str(creds.ca_cert)
    assert "insecure" not in connection["superlink"]["fedpeft"]
    commands = deployment_commands(secure_app, config, creds)
    assert "--insecure" not in commands
    assert "--enable-supernode-auth" in commands
    assert "--disable-runtime-dependency-installation" in commands
    assert commands.count("flwr supernode register") == 2
    assert f"--root-certificates {creds.ca_cert}" in commands
    # each node's ClientApps run in fedpeft's executor, which shares the node's secret
    assert commands.count("--isolation process --superexec-auth-secret-file") == 2
    assert commands.count("fedpeft flower executor --runtime-api-address") == 2
    assert commands.count("--parent-pid $!") == 2
    assert (creds.node_keys[0].stat().st_mode & 0o077) == 0  # private keys are private


def test_credentials_are_absolute_whatever_folder_they_are_named_by(tmp_path, monkeypatch):
    """The SuperLink runs in the run's own folder: a relative certificate path would not be found
    there (``flower local --out runs/x`` with TLS failed so)."""
    from fedpeft.engine.flower_deploy import read_credentials, superlink_argv

    monkeypatch.chdir(tmp_path)
    made = make_credentials(Path("certs"), num_nodes=1)
    read = read_credentials(Path("certs"))
    for creds in (made, read):
        paths = [creds.ca_cert, creds.server_cert, creds.server_key, *creds.node_keys]
        assert all(p.is_absolute() and p.is_file() for p in paths)
        argv = superlink_argv("127.0.0.1", 9093, creds)
        assert argv[argv.index("--ssl-ca-certfile") + 1] == str(tmp_path / "certs" / "ca.crt")


def test_cli_certs_then_prepare(tmp_path, toy_data, capsys):
    from fedpeft.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(toy_data, engine="flower")))
    assert main(["flower", "certs", str(tmp_path / "certs"), "--nodes", "1"]) == 0
    out = tmp_path / "run"
    argv = ["flower", "prepare", str(config), "--certs", str(tmp_path / "certs"), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "flower-superlink" in printed and "--enable-supernode-auth" in printed
    assert (out / "config.yaml").is_file()
    assert not (out / "partition.json").exists()  # the nodes describe their data when it runs
    assert (tmp_path / "run-flower-app" / "pyproject.toml").is_file()
    missing = ["flower", "prepare", str(config), "--certs", str(tmp_path / "none")]
    assert main([*missing, "--out", str(tmp_path / "run2")]) == 2  # no certificates: one line
    assert not (tmp_path / "run2").exists()


def test_interrupted_simulation_resumes_to_the_uninterrupted_weights(tmp_path, toy_data):
    """A progress hook that raises stops a Flower run (every process it started ends, only
    complete rounds are kept); resumed, it ends where an uninterrupted run does (the embedded
    one: the parity test above ties the two engines)."""
    base = tiny_config(
        toy_data, method="lora", algorithm="fedadam", num_clients=4, rounds=3, local_epochs=4
    )
    reference_config = build_config({**base, "engine": "embedded"})
    reference_run = RunDir.create(tmp_path / "ref", dump_config(reference_config))
    reference = EmbeddedEngine(build_job(reference_config), reference_run).run()

    config = build_config({**base, "engine": "flower"})
    run = RunDir.create(tmp_path / "cut", dump_config(config))

    def stop_at_round_2(kind, info):
        if kind == "round_start" and info["round"] == 2:
            raise RuntimeError("stopped by the test")

    with pytest.raises(RuntimeError, match="stopped by the test"):
        FlowerEngine(build_job(config), run, on_event=stop_at_round_2).run()
    assert psutil.Process().children(recursive=True) == []  # the SuperLink, Ray: all gone
    done = [r["round"] for r in metrics(run.path)]
    assert done == [1]  # the ServerApp waits at each round's start: it never began round 2
    events = []
    resumed = FlowerEngine(
        build_job(config), RunDir.open(run.path), on_event=lambda k, i: events.append((k, i))
    ).run()
    assert ("resume", {"round": len(done)}) in events
    assert ("round_start", {"round": 3}) in events  # progress comes back from the ServerApp
    assert [r["round"] for r in metrics(run.path)] == [1, 2, 3]
    expected = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    got = load_file(str(run.weights_path))
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    assert resumed["complete"] and resumed["bytes_up_total"] == reference["bytes_up_total"]
    assert resumed["final_accuracy"] == pytest.approx(reference["final_accuracy"])


def test_a_config_flower_cannot_run_is_refused_before_any_run_folder(tmp_path, toy_data, capsys):
    """Every Flower entry point refuses such a config in one line and writes nothing."""
    from fedpeft.cli import main

    config = tmp_path / "job.yaml"  # an embedded-engine config: the flower commands make it flower
    config.write_text(yaml.safe_dump(tiny_config(toy_data, flower={"insecure": True})))
    cases = [
        (["flower", "local", str(config), "--set", "flower.min_nodes=5"], "flower.min_nodes"),
        (["flower", "prepare", str(config), "--set", "personalized_eval=true"], "personalized"),
        (["flower", "local", str(config), "--set", "personalized_eval=true"], "personalized"),
        (
            ["flower", "local", str(config), "--set", "privacy.membership_inference=true"],
            "membership_inference",
        ),
        (["flower", "local", str(config), "--nodes", "3"], "num_clients"),
        (["flower", "prepare", str(config), "--set", "flower.superlink=nowhere"], "host:port"),
        (["run", str(config), "--set", "engine=flower", "--set", "flower.num_cpus=4096"], "cores"),
        (["run", str(config), "--set", "engine=flower", "--set", "flower.num_cpus=0.5"], "whole"),
        (
            [
                "run",
                str(config),
                "--set",
                "engine=flower",
                "--set",
                "activation_cache.enabled=true",
            ],
            "activation_cache",
        ),
        (
            ["flower", "local", str(config), "--set", "method=autofednlp", "--set"]
            + ["num_clients=6", "--nodes", "6", "--set", "flower.secagg.enabled=true"],
            "runs its own rounds",
        ),
    ]
    for i, (argv, words) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*argv, "--out", str(out)]) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error: ") and words in error and error.count("\n") == 1, error
        assert not out.exists() and not Path(f"{out}-flower").exists(), argv
        assert not Path(f"{out}-flower-app").exists(), argv


def test_a_deployed_run_records_engine_flower(tmp_path, toy_data):
    from fedpeft.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(toy_data, flower={"insecure": True})))
    assert main(["flower", "prepare", str(config), "--out", str(tmp_path / "run")]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["engine"] == "flower"


def test_ray_object_store_is_sized_from_available_memory(monkeypatch):
    """Ray takes its store as a proportion of the memory available when it starts and refuses
    one under 75 MiB: on a busy 24 GiB machine with 7 GiB free, a proportion of the total gave
    70 MiB and the simulation crashed."""
    from types import SimpleNamespace

    from fedpeft.engine import flower

    gib = 2**30
    monkeypatch.setattr(
        flower.psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * gib, available=7 * gib)
    )
    proportion = float(flower.FlowerEngine.ray_env()["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"])
    assert proportion * 7 * gib == pytest.approx(256 * 2**20, rel=1e-4)


class SlowReplies:
    """The part of a Flower grid that ``PromptGrid.send_and_receive`` uses: two messages pushed,
    their replies found on the 1st and 3rd pull."""

    def __init__(self):
        self.pulls: list[set[str]] = []

    def push_messages(self, messages):
        return [f"id-{m}" for m in messages]

    def pull_messages(self, message_ids):
        self.pulls.append(set(message_ids))
        due = {1: ["id-a"], 3: ["id-b"]}.get(len(self.pulls), [])
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in due]


def test_prompt_grid_collects_every_reply_and_stops_asking_for_those_in():
    inner = SlowReplies()
    replies = PromptGrid(inner, poll_s=0.0).send_and_receive(["a", "b"], timeout=60)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-a", "id-b"]
    assert inner.pulls == [{"id-a", "id-b"}, {"id-b"}, {"id-b"}]  # done once both are in


def test_prompt_grid_gives_up_at_the_timeout_with_the_replies_it_has():
    inner = SlowReplies()
    assert PromptGrid(inner, poll_s=0.0).send_and_receive(["a", "b"], timeout=0) == []
    assert inner.pulls == []  # as Flower's grid: a zero timeout pushes and pulls nothing
    inner = SlowReplies()
    got = PromptGrid(inner, poll_s=1.0).send_and_receive(["a", "b"], timeout=0.5)
    assert [r.metadata.reply_to_message_id for r in got] == ["id-a"] and len(inner.pulls) == 1


class RecordingStrategy:
    """What ``flower_round`` asks of its strategy, recorded in order; sending draws from the
    global random state (as sampling may) and finishing records the state it sees."""

    def __init__(self, rounds: int, send_ahead: bool = True):
        flower = SimpleNamespace(round_timeout_s=5.0)
        self.config = SimpleNamespace(flower=flower)
        self.rounds, self.send_ahead = rounds, send_ahead
        self.first_round, self.in_flight, self.report = 1, None, None
        self.started = self.sent_at = 0.0
        self.calls: list[tuple] = []
        self.finish_states: list[torch.Tensor] = []

    def summary(self):
        pass

    def on_event(self, kind, info):
        self.calls.append((kind, info["round"]))

    def begin_round(self, rnd, grid, announce=True):
        self.calls.append(("begin", rnd, announce))
        self.report = SimpleNamespace(rnd=rnd)

    def send(self, rnd, grid):
        torch.rand(1)
        self.calls.append(("send", rnd))
        self.in_flight = (rnd, [f"m{rnd}"])

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate", self.report.rnd, list(replies)))

    def can_send_ahead(self, rnd):
        return self.send_ahead and rnd < self.rounds

    def finish(self, report, started):
        self.calls.append(("finish", report.rnd))
        self.finish_states.append(torch.get_rng_state())


class EchoGrid:
    def receive(self, ids, timeout=None):
        return [f"reply-{i}" for i in ids]


def test_a_round_sends_the_next_ones_messages_before_it_is_evaluated():
    """flower_round: round 2's messages go out after round 1's aggregation and before its
    evaluation; round 2 begins (is announced) after round 1 is recorded; the last round sends
    nothing ahead; the evaluation sees the random state as the aggregation left it."""
    from fedpeft.engine.flower import flower_round

    strategy, grid = RecordingStrategy(rounds=2), EchoGrid()
    flower_round(strategy, grid)
    strategy.first_round = 2
    flower_round(strategy, grid)
    assert strategy.calls == [
        ("begin", 1, True),
        ("send", 1),
        ("aggregate", 1, ["reply-m1"]),
        ("begin", 2, False),
        ("send", 2),
        ("finish", 1),
        ("round_start", 2),
        ("aggregate", 2, ["reply-m2"]),
        ("finish", 2),
    ]
    plain = RecordingStrategy(rounds=2, send_ahead=False)
    flower_round(plain, grid)
    assert [c[0] for c in plain.calls] == ["begin", "send", "aggregate", "finish"]


def test_sending_ahead_leaves_the_evaluation_and_the_next_round_their_random_state():
    from fedpeft.engine.flower import flower_round

    torch.manual_seed(0)
    ahead = RecordingStrategy(rounds=3)
    flower_round(ahead, EchoGrid())
    after_ahead = torch.rand(1).item()
    torch.manual_seed(0)
    plain = RecordingStrategy(rounds=3, send_ahead=False)
    flower_round(plain, EchoGrid())
    plain.begin_round(2, None, announce=False)
    plain.send(2, None)  # round 2 sent after round 1 is finished, as without sending ahead
    assert torch.equal(ahead.finish_states[0], plain.finish_states[0])  # the evaluation's
    assert after_ahead == torch.rand(1).item()  # and what follows the next round's send
