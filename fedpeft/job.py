"""Turn a validated ``RunConfig`` into the plain objects a run needs (the edge of the system).

Engines receive a ``Job``; nothing below this module reads configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedpeft import attacks, cost, faults, peft, registry
from fedpeft.algorithms import ServerAlgorithm, make_algorithm
from fedpeft.algorithms.dp import DPPlan
from fedpeft.cache import ActivationCache
from fedpeft.client import LocalTraining
from fedpeft.config import RunConfig
from fedpeft.data.partition import Partition, make_partition
from fedpeft.data.sources import DataSplits, TextDataset, load_source, subsample
from fedpeft.data.tokenize import TokenizedData, tokenize
from fedpeft.methods.base import ClientContext, FederatedMethod
from fedpeft.methods.fedpetuning import FedPETuning
from fedpeft.models import load_model
from fedpeft.peft.base import State, trainable_state


@dataclass
class Job:
    config: RunConfig
    model: nn.Module
    train: TokenizedData
    test: TokenizedData
    validation: TokenizedData | None
    label_names: list[str]
    partition: Partition
    method: FederatedMethod
    training: LocalTraining
    profiles: list[tuple[cost.DeviceProfile, cost.NetworkProfile]]
    dims: cost.ModelDims
    num_layers: int
    extra_kv: int  # prefix tokens every attention layer also attends to (cost model)
    extra_tokens: int  # soft prompt tokens added to every sequence (cost model)
    clients: list[ClientContext] = field(default_factory=list)  # plain per-client facts
    initial_state: State = field(default_factory=dict)  # what every client holds when it joins
    test_groups: np.ndarray | None = None  # natural partitions: each test row's group
    caches: dict[str, ActivationCache] = field(default_factory=dict)  # split -> activation cache
    attack: attacks.AttackPlan | None = None  # simulated attackers (embedded engine)
    faults: faults.FaultPlan | None = None  # simulated crashes, stragglers, deadline (embedded)
    dp: DPPlan | None = None  # DP-FedAvg (embedded engine)


def default_validation_size(train_rows: int) -> int:
    """10% of the training rows, within [100, 1000], and never more than a quarter of them."""
    return min(max(round(0.1 * train_rows), 100), 1000, train_rows // 4)


def load_data(config: RunConfig) -> tuple[DataSplits, TextDataset, TextDataset, TextDataset | None]:
    """Read the dataset and take the seeded subsets: (splits, train, test, validation)."""
    splits = load_source(config.dataset)
    train = subsample(splits.train, config.max_train_samples, config.seed)
    test = subsample(splits.test, config.max_test_samples, config.seed)
    size = config.validation_size
    if size is None:
        size = default_validation_size(len(train))
    validation = None
    if size:
        if splits.validation is not None:
            validation = subsample(splits.validation, size, config.seed)
        else:
            if size >= len(train):
                raise ValueError(f"validation_size {size} leaves no training rows ({len(train)})")
            order = np.random.default_rng([config.seed, 7]).permutation(len(train))
            validation = train.subset(np.sort(order[:size]))
            train = train.subset(np.sort(order[size:]))
    return splits, train, test, validation


def training_settings(config: RunConfig) -> LocalTraining:
    return LocalTraining(
        epochs=config.local_epochs,
        steps=config.local_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        warmup_ratio=config.warmup_ratio,
        grad_clip=config.grad_clip,
    )


def build_algorithm(config: RunConfig) -> ServerAlgorithm:
    return make_algorithm(
        config.algorithm,
        mu=config.fedprox.mu,
        eta=config.fedopt.eta,
        beta1=config.fedopt.beta1,
        beta2=config.fedopt.beta2,
        tau=config.fedopt.tau,
        trim_ratio=config.robust.trim_ratio,
        clip_norm=config.robust.clip_norm,
        num_byzantine=config.robust.num_byzantine,
        multi_krum_m=config.robust.multi_krum_m,
    )


def build_faults(config: RunConfig) -> faults.FaultPlan | None:
    settings = config.faults
    if not settings.enabled():
        return None
    return faults.plan_faults(
        config.seed,
        config.num_clients,
        crash_prob=settings.crash_prob,
        straggler_fraction=settings.straggler_fraction,
        straggler_factor=settings.straggler_factor,
        deadline_s=settings.deadline_s,
        min_clients=settings.min_clients,
        retries=settings.retries,
    )


def build_dp(config: RunConfig) -> DPPlan | None:
    settings = config.dp
    if not settings.enabled():
        return None
    return DPPlan(
        noise_multiplier=settings.noise_multiplier,
        clip_norm=settings.clip_norm,
        adaptive=settings.adaptive,
        target_quantile=settings.target_quantile,
        clip_lr=settings.clip_lr,
        count_noise=settings.count_noise or config.clients_per_round / 20,
        delta=settings.delta,
        max_epsilon=settings.max_epsilon,
        sampling_rate=config.clients_per_round / config.num_clients,
        seed=config.seed,
        mode=settings.mode,
    )


def build_method(config: RunConfig, num_layers: int, num_labels: int) -> FederatedMethod:
    """The configured seed system (plain PEFT units run FedPETuning with the algorithm)."""
    spec = registry.get(config.method)
    algorithm = build_algorithm(config)
    if spec.system is None:
        return FedPETuning(algorithm)
    return spec.system(config, registry.SystemInfo(num_layers, num_labels, algorithm))


def build_model(config: RunConfig, num_labels: int) -> tuple[nn.Module, object]:
    """The backbone with the task head and the configured method's trainable parts injected."""
    model, tokenizer = load_model(
        config.model, num_labels, pooling=config.pooling, seed=config.seed
    )
    model = registry.get(config.method).inject(model, config)
    model.eval()
    return model, tokenizer


def client_contexts(
    partition: Partition,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_labels: int,
    train_groups: np.ndarray | None = None,
) -> list[ClientContext]:
    """Each client's row counts, label histograms and (natural partitions) group."""
    contexts = []
    for cid, (train_rows, test_rows) in enumerate(
        zip(partition.train, partition.test, strict=True)
    ):
        group = None
        if train_groups is not None and len(train_rows):
            values, counts = np.unique(np.asarray(train_groups)[train_rows], return_counts=True)
            group = str(values[np.argmax(counts)])
        contexts.append(
            ClientContext(
                cid=cid,
                num_rows=len(train_rows),
                label_counts=np.bincount(train_labels[train_rows], minlength=num_labels),
                group=group,
                num_test_rows=len(test_rows),
                test_label_counts=np.bincount(test_labels[test_rows], minlength=num_labels),
            )
        )
    return contexts


def natural_groups(config: RunConfig, train: TextDataset, test: TextDataset):
    """(train, test) values of the partition field when the partition is natural, else None."""
    if config.partition != "natural":
        return None
    return train.field(config.partition_field), test.field(config.partition_field)


def partition_of(config: RunConfig, train: TextDataset, test: TextDataset):
    """The config's split of the training (and test) rows over its clients."""
    groups = natural_groups(config, train, test)
    return make_partition(
        train.labels,
        test.labels,
        config.num_clients,
        config.partition,
        alpha=config.alpha,
        seed=config.seed,
        train_groups=groups[0] if groups else None,
        test_groups=groups[1] if groups else None,
    )


def build_job(config: RunConfig) -> Job:
    if config.threads:
        torch.set_num_threads(config.threads)
    splits, train_rows, test_rows, val_rows = load_data(config)
    num_labels = len(splits.train.label_names)
    groups = natural_groups(config, train_rows, test_rows)
    partition = partition_of(config, train_rows, test_rows)
    model, tokenizer = build_model(config, num_labels)

    def tok(rows: TextDataset, split: str) -> TokenizedData:
        key = f"{splits.fingerprint}:{split}:{len(rows)}:{config.seed}:{config.max_train_samples}:{config.max_test_samples}:{config.validation_size}"
        return tokenize(rows, tokenizer, config.max_seq_len, cache_key=key)

    data = {"train": tok(train_rows, "train"), "test": tok(test_rows, "test")}
    if val_rows is not None:
        data["validation"] = tok(val_rows, "validation")
    caches = {}
    if config.activation_cache.enabled:
        cache = config.activation_cache
        caches = {
            split: ActivationCache(rows, cache.dtype, cache.max_bytes, cache.store_hidden)
            for split, rows in data.items()
        }
    hf_config = model.config if hasattr(model, "config") else None
    num_layers = len(peft.base.encoder_layers(model))
    spec = registry.get(config.method)
    settings = config.method_settings()
    extra_kv = spec.extra_kv(settings) if spec.extra_kv else 0
    extra_tokens = spec.extra_tokens(settings) if spec.extra_tokens else 0
    contexts = client_contexts(
        partition,
        data["train"].labels.numpy(),
        data["test"].labels.numpy(),
        num_labels,
        np.asarray(groups[0]) if groups else None,
    )
    method = build_method(config, num_layers, num_labels)
    method.setup(contexts, num_labels)
    return Job(
        config=config,
        model=model,
        train=data["train"],
        test=data["test"],
        validation=data.get("validation"),
        label_names=list(splits.train.label_names),
        partition=partition,
        method=method,
        training=training_settings(config),
        profiles=cost.assign_profiles(
            config.num_clients,
            config.cost.devices,
            config.cost.networks,
            config.seed,
            config.cost.device_weights,
            config.cost.network_weights,
        ),
        dims=cost.ModelDims.from_hf_config(hf_config, num_labels),
        num_layers=num_layers,
        extra_kv=extra_kv,
        extra_tokens=extra_tokens,
        clients=contexts,
        initial_state=trainable_state(model),
        test_groups=np.asarray(groups[1]) if groups else None,
        caches=caches,
        attack=attacks.plan_attack(
            config.attack.type,
            config.attack.fraction,
            config.num_clients,
            config.seed,
            config.attack.scale,
        ),
        faults=build_faults(config),
        dp=build_dp(config),
    )
