"""The run configuration: typed, validated once, then handed out as plain objects.

A run is described by one YAML file plus ``--set key=value`` overrides. This module is the only
place that reads configuration; everything downstream takes the validated ``RunConfig`` fields.
Errors are one line that names the offending key (``ConfigError``), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from fedpeft import registry
from fedpeft.algorithms import ALGORITHMS, KRUM_KINDS, check_clients
from fedpeft.attacks import ATTACKS, num_attackers


class ConfigError(ValueError):
    """A configuration problem, said in one line that names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FedProxSettings(_Strict):
    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 ||w - w_global||^2")


class FedOptSettings(_Strict):
    """Server optimiser of FedAdam / FedYogi / FedAdagrad (Reddi et al., 2021)."""

    eta: float = Field(1e-2, gt=0, description="server learning rate")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity / numerical floor")


class RobustSettings(_Strict):
    """Robust aggregation (fedpeft/algorithms/robust.py).

    ``trim_ratio`` is used by ``algorithm: trimmed_mean``: floor(trim_ratio x clients that
    replied) values are dropped at each end per coordinate, so with 5 clients a round 0.2 drops one
    and 0.1 drops none. ``clip_norm`` applies under every algorithm: each client's update
    (returned minus received, all exchanged tensors together) is scaled down to this L2 norm.
    """

    trim_ratio: float = Field(0.2, ge=0, lt=0.5, description="share trimmed at each end")
    clip_norm: float | None = Field(None, gt=0, description="bound on an update's L2 norm")
    num_byzantine: int = Field(
        1,
        ge=0,
        description="f, Byzantine clients per round that krum / multi_krum / bulyan tolerate "
        "(clients_per_round must exceed 2f + 2; bulyan: at least 4f + 3)",
    )
    multi_krum_m: int | None = Field(
        None, ge=1, description="multi_krum: how many best-scored updates are averaged (n - f)"
    )


class AttackSettings(_Strict):
    """Simulated attackers (fedpeft/attacks.py): embedded engine and Flower simulation.

    ``floor(fraction x num_clients)`` clients, drawn once from the run seed, attack whenever they
    are sampled; they are listed in the run folder's ``attackers.json``.
    """

    type: Literal["none", "sign_flip", "scale", "noise", "label_flip"] = Field(
        "none", description="|".join(ATTACKS)
    )
    fraction: float = Field(0.0, ge=0, le=1, description="share of clients that attack")
    scale: float | None = Field(
        None,
        gt=0,
        description="sign_flip / scale: update multiplier (1 / 10); noise: std (1); "
        "null: the default in brackets",
    )


class FaultSettings(_Strict):
    """Simulated faults (fedpeft/faults.py): embedded engine and Flower simulation; all off by
    default."""

    crash_prob: float = Field(
        0.0, ge=0, le=1, description="chance a sampled client crashes after its download"
    )
    straggler_fraction: float = Field(
        0.0, ge=0, le=1, description="share of clients (drawn once) that are stragglers"
    )
    straggler_factor: float = Field(
        1.0, ge=1, description="a straggler's simulated time is multiplied by this"
    )
    deadline_s: float | None = Field(
        None, gt=0, description="simulated seconds a round waits; later clients are dropped"
    )
    min_clients: int = Field(
        0, ge=0, description="usable updates a round needs, else it is retried (0: no minimum)"
    )
    retries: int = Field(
        2, ge=0, description="retries with a fresh sample before the run stops (min_clients)"
    )

    def enabled(self) -> bool:
        return bool(
            self.crash_prob
            or (self.straggler_fraction and self.straggler_factor != 1)
            or self.deadline_s
            or self.min_clients
        )


class DPSettings(_Strict):
    """Client-level differential privacy, DP-FedAvg (fedpeft/algorithms/dp.py).

    Off while ``noise_multiplier`` is null. Each client's update is clipped to ``clip_norm``, the
    server averages the clipped updates with uniform weights and adds Gaussian noise of std
    noise_multiplier x clip_norm / (updates averaged); an RDP accountant reports epsilon.
    """

    noise_multiplier: float | None = Field(
        None, ge=0, description="noise std over clip_norm (null: DP off)"
    )
    mode: Literal["central", "local"] = Field(
        "central",
        description="central: the server noises the mean (DP-FedAvg); local: each client clips "
        "and noises its own upload (std noise_multiplier x clip_norm), epsilon per client",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update")
    adaptive: bool = Field(
        False, description="adapt clip_norm to a quantile of update norms (Andrew et al. 2021)"
    )
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: quantile to track")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: geometric learning rate of clip_norm")
    count_noise: float | None = Field(
        None,
        gt=0,
        description="adaptive: std of the noise on the count of unclipped updates "
        "(default clients_per_round / 20); must exceed noise_multiplier / 2",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP")
    max_epsilon: float | None = Field(
        None, gt=0, description="stop before a round that would exceed this epsilon"
    )

    def enabled(self) -> bool:
        return self.noise_multiplier is not None


class PrivacySettings(_Strict):
    """Privacy leakage, measured (fedpeft/privacy.py): a loss-threshold membership-inference
    attack on the published global model at the end of the run; its AUC goes to summary.json."""

    membership_inference: bool = Field(False, description="measure the attack at the end")
    rows: int = Field(200, ge=1, description="member rows (clients' training rows), as many test")


class CostSettings(_Strict):
    """Simulated devices and networks; profiles are assigned to clients by seeded draw."""

    devices: list[str] = Field(
        default_factory=lambda: ["jetson_tx2", "raspberry_pi4", "phone", "laptop"]
    )
    device_weights: list[float] | None = None
    networks: list[str] = Field(default_factory=lambda: ["wifi", "lte", "reference_1mbps"])
    network_weights: list[float] | None = None


class EarlyStopSettings(_Strict):
    """Run to convergence: stop once validation accuracy has not gained more than ``min_delta``
    for ``patience`` rounds; ``rounds`` is the cap. The summary says whether the cap was hit."""

    patience: int = Field(ge=1, description="rounds without a validation gain before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest validation gain that counts")


class ActivationCacheSettings(_Strict):
    """Cache the hidden states entering the lowest trainable layer (fedpeft/cache.py).

    Used whenever every layer below the trainable ones is frozen (adapter/lora/full with a depth,
    autofednlp); otherwise ignored. The frozen bottom then runs once per sample, in eval mode.
    """

    enabled: bool = Field(False, description="train and evaluate the top layers from the cache")
    dtype: Literal["fp16", "fp32"] = Field("fp16", description="storage precision")
    max_bytes: int | None = Field(
        2_000_000_000,
        ge=0,
        description="bound on stored bytes (null: none); rows over it are recomputed each time",
    )
    store_hidden: bool = Field(
        True,
        description="false: keep the cache's bookkeeping (hits, misses, the device time charged) "
        "but recompute the frozen bottom every time: the same simulated run, more wall-clock",
    )


class SecAggSettings(_Strict):
    """Secure aggregation of a deployment's uploads with Flower's SecAgg+ (docs/privacy.md).

    ``num_shares`` and ``reconstruction_threshold`` follow Flower's ``SecAggPlusWorkflow``: an
    integer is a count, a fraction a share (of the round's clients; of ``num_shares``). Each
    client's update (trained minus received) is clipped to +-``clipping_range`` and quantised to
    ``quantization_range`` levels before it is masked.
    """

    enabled: bool = Field(False, description="deployment: the server sees only masked sums")
    num_shares: int | float = Field(
        1.0, gt=0, description="neighbours holding a share of each client's keys (1.0: all)"
    )
    reconstruction_threshold: int | float = Field(
        0.67, gt=0, description="shares needed to unmask; also the fewest clients a round needs"
    )
    clipping_range: float = Field(8.0, gt=0, description="updates are clipped to +-this")
    quantization_range: int = Field(
        2**22, gt=1, description="quantisation levels over [-clipping_range, clipping_range]"
    )

    @model_validator(mode="after")
    def _shares(self) -> SecAggSettings:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, float) and shares > 1:
            raise ValueError("num_shares: a fraction must be at most 1")
        if isinstance(shares, int) and shares < 3:
            raise ValueError("num_shares: a count must be at least 3")
        if isinstance(threshold, float) and threshold > 1:
            raise ValueError("reconstruction_threshold: a fraction must be at most 1")
        if isinstance(threshold, int) and threshold < 2:
            raise ValueError("reconstruction_threshold: a count must be at least 2")
        if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
            raise ValueError(
                f"reconstruction_threshold: {threshold} must be below num_shares ({shares})"
            )
        if self.quantization_range >= SECAGG_MODULUS:
            raise ValueError("quantization_range: must be below the masks' modulus, 2**32")
        return self


SECAGG_MODULUS = 2**32  # Flower's SecAgg+ masks live modulo 2**32 (its default and maximum)
# What a weighted mean of the updates is enough for: FedAvg, FedProx (its term is the
# client's) and the server optimisers (one step from the mean update, fedpeft/algorithms).
SECAGG_ALGORITHMS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


class FlowerSettings(_Strict):
    """The Flower engine (fedpeft/engine/flower.py, docs/flower.md): simulation and deployment.

    Certificates and keys are files, not settings: ``fedpeft flower certs`` makes them.
    """

    round_timeout_s: float = Field(
        600.0, gt=0, description="how long a round waits for replies; late clients are left out"
    )
    num_cpus: float = Field(1.0, gt=0, description="simulation: CPU cores reserved per client")
    num_gpus: float = Field(0.0, ge=0, description="simulation: GPUs reserved per client")
    min_nodes: int = Field(
        1, ge=1, description="deployment: SuperNodes that must be connected before round 1"
    )
    superlink: str = Field(
        "127.0.0.1:9093", description="deployment: the SuperLink's address, host:port"
    )
    insecure: bool = Field(
        False, description="deployment without TLS and node authentication (loopback tests only)"
    )
    send_ahead: bool = Field(
        True,
        description="send a round's messages before the previous round is evaluated, when that "
        "round is sure to run, so clients train while the server evaluates (same results)",
    )
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)

    @model_validator(mode="after")
    def _address(self) -> FlowerSettings:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"flower.superlink: '{self.superlink}' is not host:port")
        return self


class _RunConfigBase(_Strict):
    """Everything one federated run needs. Top-level names are stable for scripts.

    Each registered method (``fedpeft.registry``) adds its settings section under its own name
    (``lora: {r: 8}``); ``RunConfig`` below is this class plus those sections.
    """

    name: str | None = Field(None, description="run name (default: dataset-method-partition)")
    model: str = Field("minilm", description="minilm | tiny | local HF folder | hub id")
    dataset: str = Field(
        "ag_news", description="shared-data name | folder | .jsonl/.csv | hub:<name>"
    )
    method: str = Field("lora", description="a registered method (fedpeft list)")
    algorithm: str = Field("fedavg", description="|".join(ALGORITHMS))
    engine: Literal["embedded", "flower"] = Field(
        "embedded", description="embedded (one process) | flower (Flower 1.41 simulation)"
    )

    num_clients: int = Field(100, ge=1)
    clients_per_round: int = Field(10, ge=1)
    rounds: int = Field(100, ge=1)
    local_epochs: float = Field(1.0, gt=0, description="local passes over the client's data")
    local_steps: int | None = Field(None, ge=1, description="fixed local steps (overrides epochs)")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float | None = Field(
        None, gt=0, description="learning rate (default: the method's, chosen on validation)"
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="linear warm-up share of local steps, then linear decay"
    )
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (null: no clipping)")
    max_seq_len: int = Field(128, ge=8, le=512)
    pooling: Literal["mean", "last", "cls"] | None = Field(
        None,
        description="mean over tokens, last real token, or the family's own head (cls); "
        "default: mean for encoders, last token for decoders",
    )

    partition: Literal["iid", "dirichlet", "quantity", "natural"] = "dirichlet"
    alpha: float = Field(
        1.0, gt=0, description="Dirichlet concentration (dirichlet and quantity skew)"
    )
    partition_field: str = Field("lang", description="row field that defines natural clients")
    seed: int = 0
    max_train_samples: int | None = Field(None, ge=1)
    max_test_samples: int | None = Field(None, ge=1)
    validation_size: int | None = Field(
        None,
        ge=0,
        description="server-held validation rows, from the validation split, else held out of "
        "train (default: 10% of train within [100, 1000], at most a quarter; 0: none)",
    )
    eval_every: int = Field(1, ge=1)
    personalized_eval: bool = Field(
        False, description="also score each client's local test split at the end"
    )
    personalized_finetune_epochs: float = Field(
        0.0,
        ge=0,
        description="before its personalised score, each client fine-tunes the final global "
        "model on its own training rows for this many local epochs (0: none)",
    )
    target_accuracy: float | None = Field(None, gt=0, le=1)
    early_stop: EarlyStopSettings | None = Field(
        None, description="{patience, min_delta}: stop when validation stops gaining (embedded)"
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: torch's choice)"
    )

    fedprox: FedProxSettings = Field(default_factory=FedProxSettings)
    fedopt: FedOptSettings = Field(default_factory=FedOptSettings)
    robust: RobustSettings = Field(default_factory=RobustSettings)
    attack: AttackSettings = Field(default_factory=AttackSettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)
    dp: DPSettings = Field(default_factory=DPSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    activation_cache: ActivationCacheSettings = Field(default_factory=ActivationCacheSettings)
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: uploads carry int8 updates (trained - received) + fp32 scales"
    )
    quantize_download: bool = Field(
        False, description="with quantize=int8, downloads carry int8 weights too"
    )

    @model_validator(mode="after")
    def _consistent(self) -> _RunConfigBase:
        methods = registry.methods()
        if self.method not in methods:
            raise ValueError(
                f"method: unknown '{self.method}' (choose from {', '.join(methods)}; fedpeft list)"
            )
        spec = methods[self.method]
        if self.engine not in spec.engines:
            raise ValueError(
                f"engine: {self.engine} does not run method {self.method} yet "
                f"(use engine: {spec.engines[0]})"
            )
        if self.early_stop is not None and self.validation_size == 0:
            raise ValueError("early_stop: needs validation rows; set validation_size > 0")
        if self.early_stop is not None and self.early_stop.patience < self.eval_every:
            raise ValueError(
                f"early_stop.patience: {self.early_stop.patience} rounds is less than eval_every "
                f"{self.eval_every}: the run would stop before validation is measured again"
            )
        if self.lr is None:
            self.lr = spec.default_lr
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm: unknown '{self.algorithm}' (choose from {', '.join(ALGORITHMS)})"
            )
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round: {self.clients_per_round} is more than num_clients ({self.num_clients})"
            )
        if spec.check is not None:
            spec.check(self)
        return self

    @model_validator(mode="after")
    def _robust_and_attack(self) -> _RunConfigBase:
        robust, attack = self.robust, self.attack
        if self.algorithm in KRUM_KINDS:
            try:
                check_clients(self.algorithm, self.clients_per_round, robust.num_byzantine)
            except ValueError as err:
                raise ValueError(f"clients_per_round: {err} (robust.num_byzantine)") from None
            room = self.clients_per_round - robust.num_byzantine
            if self.algorithm == "multi_krum" and (robust.multi_krum_m or 0) > room:
                raise ValueError(
                    f"robust.multi_krum_m: {robust.multi_krum_m} is more than clients_per_round "
                    f"- num_byzantine ({room})"
                )
        if attack.type == "none":
            return self
        if attack.type == "label_flip" and attack.scale is not None:
            raise ValueError("attack.scale: label_flip takes no scale")
        if num_attackers(self.num_clients, attack.fraction) < 1:
            raise ValueError(
                f"attack.fraction: {attack.fraction} of {self.num_clients} clients selects no "
                "attacker"
            )
        return self

    @model_validator(mode="after")
    def _faults_and_dp(self) -> _RunConfigBase:
        faults, dp = self.faults, self.dp
        if faults.enabled():
            if registry.get(self.method).drives_rounds:
                raise ValueError(f"faults: method {self.method} runs its own rounds; no faults")
            if faults.min_clients > self.clients_per_round:
                raise ValueError(
                    f"faults.min_clients: {faults.min_clients} is more than clients_per_round "
                    f"({self.clients_per_round})"
                )
        if not dp.enabled():
            return self
        if registry.methods()[self.method].system is not None:
            raise ValueError(
                f"dp: method {self.method} aggregates its own way; DP-FedAvg needs a plain PEFT "
                "method (lora, adapter, prefix, prompt, bitfit, full)"
            )
        if dp.mode == "local":  # the server only post-processes noised uploads: any rule goes
            if dp.adaptive:
                raise ValueError(
                    "dp.adaptive: local DP clips with a fixed dp.clip_norm (adaptive clipping "
                    "needs the server's view of every update norm)"
                )
            return self
        if self.algorithm not in ("fedavg", "fedprox"):
            raise ValueError(
                f"dp: algorithm {self.algorithm} does not compose with DP-FedAvg's noised mean "
                "(use fedavg or fedprox)"
            )
        if self.robust.clip_norm is not None:
            raise ValueError("robust.clip_norm: dp clips updates itself (dp.clip_norm)")
        if self.quantize != "none":
            raise ValueError(
                "quantize: int8 codes are not clipped and noised by DP-FedAvg; set quantize: none"
            )
        count_noise = dp.count_noise or self.clients_per_round / 20
        if dp.adaptive and dp.noise_multiplier and 2 * count_noise <= dp.noise_multiplier:
            raise ValueError(
                f"dp.count_noise: adaptive clipping needs 2 x count noise ({count_noise:g}) > "
                f"noise_multiplier ({dp.noise_multiplier:g}); raise dp.count_noise"
            )
        return self

    @model_validator(mode="after")
    def _privacy(self) -> _RunConfigBase:
        if self.privacy.membership_inference and self.method == "local":
            raise ValueError(
                "privacy.membership_inference: method local trains no global model to attack"
            )
        return self

    @model_validator(mode="after")
    def _secagg(self) -> _RunConfigBase:
        """What SecAgg+ cannot carry: it hands the server the clients' weighted mean update
        only, so every rule that needs one client's update is refused (docs/privacy.md)."""
        secagg = self.flower.secagg
        if not secagg.enabled:
            return self
        prefix = "flower.secagg.enabled"
        if self.engine != "flower":
            raise ValueError(
                f"{prefix}: secure aggregation runs in a Flower deployment only (fedpeft flower "
                "local / prepare); the embedded engine would ignore it"
            )
        if self.algorithm not in SECAGG_ALGORITHMS:
            raise ValueError(
                f"{prefix}: algorithm {self.algorithm} needs each client's update, SecAgg+ gives "
                f"the server only their weighted mean (use {', '.join(SECAGG_ALGORITHMS)})"
            )
        if self.robust.clip_norm is not None:
            raise ValueError(
                f"{prefix}: robust.clip_norm clips each client's update on the server, which "
                "SecAgg+ hides from it; unset robust.clip_norm"
            )
        if self.quantize != "none":
            raise ValueError(
                f"{prefix}: quantize: {self.quantize} rebuilds each client's update on the "
                "server; SecAgg+ quantises updates itself (set quantize: none)"
            )
        if self.dp.enabled() and self.dp.mode == "central":
            raise ValueError(
                f"{prefix}: central dp clips each client's update on the server, which SecAgg+ "
                "hides from it; unset dp"
            )
        for name, on in (
            ("attack", self.attack.type != "none"),
            ("faults", self.faults.enabled()),
            ("dp", self.dp.enabled()),
        ):
            if on:
                raise ValueError(
                    f"{prefix}: {name} is not run under SecAgg+ yet (a deployment runs it "
                    "without secure aggregation); unset one of them"
                )
        if registry.get(self.method).drives_rounds:
            raise ValueError(
                f"{prefix}: method {self.method} runs its own rounds (trial groups scored "
                "apart), which SecAgg+'s one masked sum per round does not carry"
            )
        if self.clients_per_round < 2:
            raise ValueError(f"{prefix}: SecAgg+ needs at least 2 clients per round")
        if self.clients_per_round * secagg.quantization_range >= SECAGG_MODULUS:
            raise ValueError(
                f"{prefix}: {self.clients_per_round} clients x quantization_range "
                f"{secagg.quantization_range} overflow the masks' modulus 2**32; lower "
                "flower.secagg.quantization_range"
            )
        for key in ("num_shares", "reconstruction_threshold"):
            count = getattr(secagg, key)
            if isinstance(count, int) and count > self.clients_per_round:
                raise ValueError(
                    f"flower.secagg.{key}: {count} is more than clients_per_round "
                    f"({self.clients_per_round})"
                )
        return self

    def method_settings(self) -> BaseModel:
        """The settings section of the configured method."""
        return getattr(self, self.method)

    def run_name(self) -> str:
        dataset = Path(self.dataset).name or self.dataset
        return self.name or f"{dataset}-{self.method}-{self.partition}"


def _with_method_sections() -> type[_RunConfigBase]:
    sections: dict[str, Any] = {
        name: (spec.settings, Field(default_factory=spec.settings))
        for name, spec in registry.methods().items()
    }
    return create_model("RunConfig", __base__=_RunConfigBase, **sections)


RunConfig = _with_method_sections()


def _error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    message = first["msg"].removeprefix("Value error, ")
    if not where:
        return message
    return f"{where}: {message} (got {first.get('input')!r})"


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "lora.r=16"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML") from err
        _set_dotted(data, key.strip(), value)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; a key given twice in one mapping is an error (YAML itself
    would silently keep the last one), and so is text that is not UTF-8."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' may override keys; that is what it is for
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key; SafeLoader reports it itself
                    continue
                if first is not None:
                    where = f"line {line}" if first == line else f"lines {first} and {line}"
                    raise ConfigError(f"config file {path}: key '{key}' appears twice ({where})")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes().count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {path}:{line}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _printable(text: str) -> str:
    """``text`` on one printable line: control characters (a newline in a key, say) and lone
    surrogates are shown escaped, as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    try:
        merged = _merge(data, parse_overrides(overrides or []))
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_printable(_error_line(err))) from err
    except ConfigError as err:
        raise ConfigError(_printable(str(err))) from err


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or only defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
