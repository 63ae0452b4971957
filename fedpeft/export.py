"""A run's model in the formats the ecosystem loads, and predictions from it.

``fedpeft export RUN --out DIR`` writes, without anything of fedpeft needed to load it:

- **lora, prefix, prompt**: a peft adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``, the task head inside as peft's ``modules_to_save``), with the
  frozen backbone in ``DIR/base``;
- **adapter, bitfit, full** (and autofednlp's adapters): a transformers model folder.

Every model family is exported (BERT, RoBERTa, DistilBERT, GPT-2, LLaMA-style). fedpeft's model
is not the stock ``<Family>ForSequenceClassification``: it pools its own way (a masked mean over
tokens, or a decoder's last real token) and bottleneck adapters sit inside its layers. Weights
loaded into the stock class would silently score lower, so every model folder carries its own
``modeling_fedpeft_<type>.py`` (the pooling and adapter code is copied from fedpeft's own source)
and a ``config.json`` whose ``model_type`` (``fedpeft_bert``, ``fedpeft_llama``, ...) and
``auto_map`` make transformers use it: loading needs ``trust_remote_code=True``, and without it
transformers refuses instead of guessing. Label names (``id2label``) come from the dataset; the
saved tokenizer truncates at the run's ``max_seq_len`` and, for decoders, pads on the right with
the pad token the run used. docs/export.md shows the loading code.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fedpeft.models.families import Family, layer_index, task_model
from fedpeft.runs import RunDir

WEIGHTS = {"final": "weights.safetensors", "best": "best.safetensors"}
PEFT_METHODS = ("lora", "prefix", "prompt")
MODEL_METHODS = ("adapter", "bitfit", "full", "autofednlp")
BASE_FOLDER = "base"
# the task head's last matrix: BERT/DistilBERT classifier, RoBERTa classifier.out_proj, decoder score
_HEAD_KEY = re.compile(
    r"(?:^|\.)(?:classifier|score)\.(?:modules_to_save\.default\.)?(?:out_proj\.)?weight$"
)


class ExportError(ValueError):
    """A run that cannot be exported or predicted with, said in one line."""


@dataclass
class RunModel:
    """A run's model holding chosen weights, ready for inference (eval mode)."""

    config: Any  # fedpeft.config.RunConfig
    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    weights: Path  # the safetensors file loaded


@dataclass
class ExportResult:
    out: Path
    kind: str  # "peft adapter" or "transformers model"
    weights: Path


# ------------------------------------------------------------------------------ the run's model


def weights_path(run_path: Path, which: str | None = None) -> Path:
    """``best.safetensors`` when present (or asked for), else ``weights.safetensors``."""
    run_path = Path(run_path)
    if which is not None and which not in WEIGHTS:
        raise ExportError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{which}'")
    if which is None:
        which = "best" if (run_path / WEIGHTS["best"]).is_file() else "final"
    path = run_path / WEIGHTS[which]
    if not path.is_file():
        if which == "best":
            raise ExportError(
                f"{path} does not exist (the run kept no best-on-validation weights); "
                "use --weights final"
            )
        raise ExportError(
            f"{path} does not exist: the run has not finished (continue it with "
            f"fedpeft run --resume {run_path})"
        )
    return path


def _head_size(state: dict[str, torch.Tensor], path: Path) -> int:
    heads = [tensor for key, tensor in state.items() if _HEAD_KEY.search(key)]
    if len(heads) != 1:
        raise ExportError(
            f"{path}: cannot find the task head (classifier or score weight) among its tensors"
        )
    return int(heads[0].shape[0])


def label_names_of(config: Any, num_labels: int) -> list[str]:
    """The dataset's label names; generic ``LABEL_i`` (with a warning) when it is unavailable."""
    from fedpeft.data.sources import DataError, label_names

    try:
        names = label_names(config.dataset)
    except DataError as err:
        print(
            f"warning: label names unavailable ({err}); using LABEL_0..LABEL_{num_labels - 1}",
            file=sys.stderr,
        )
        return [f"LABEL_{i}" for i in range(num_labels)]
    if len(names) != num_labels:
        raise ExportError(
            f"dataset {config.dataset} has {len(names)} labels but the run's head has {num_labels}"
        )
    return names


def _autofednlp_layout(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> None:
    """Give the model the adapter depth and width the saved weights have (AutoFedNLP grows them)."""
    from fedpeft.peft.adapter import set_layout

    layers = {layer_index(k) for k in state if ".adapter." in k} - {None}
    widths = {int(t.shape[0]) for k, t in state.items() if k.endswith("adapter.down.weight")}
    if len(widths) > 1:
        raise ExportError(f"adapters of several widths ({sorted(widths)}) cannot be laid out")
    set_layout(model, len(layers), widths.pop() if widths else 1, config.adapter)


def load_run_model(run_path: Path, which: str | None = None) -> RunModel:
    """The run's model (same backbone, method and head) holding its final or best weights."""
    from fedpeft.config import load_config
    from fedpeft.job import build_model
    from fedpeft.peft.base import load_trainable_state

    run = RunDir.open(Path(run_path))
    config = load_config(run.config_path)
    if config.method == "local":
        raise ExportError(
            "method local keeps one module per client and never trains a global one: "
            "there is no model to use"
        )
    path = weights_path(run.path, which)
    state = load_file(str(path))
    num_labels = _head_size(state, path)
    labels = label_names_of(config, num_labels)
    model, tokenizer = build_model(config, num_labels)
    if config.method == "autofednlp":
        _autofednlp_layout(model, config, state)
    if config.method == "c2a":  # the global model, conditioned as in global evaluation
        from fedpeft.peft.hyperadapter import set_condition

        set_condition(model, None)
    try:
        load_trainable_state(model, state)
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from None
    model.eval()
    return RunModel(config, model, tokenizer, labels, path)


def encode(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, max_len: int) -> dict:
    """Tokenise as fedpeft does for training: truncation at ``max_len``, padding per batch."""
    return tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        truncation=True,
        max_length=max_len,
        padding=True,
        return_token_type_ids=True,
        return_tensors="pt",
    )


@torch.no_grad()
def logits(run: RunModel, texts: Sequence[str], pairs: Sequence[str] | None = None) -> torch.Tensor:
    """[rows, labels] logits of the run's model, in batches of ``eval_batch_size``."""
    if pairs is not None and len(pairs) != len(texts):
        raise ExportError(f"{len(texts)} texts but {len(pairs)} text pairs")
    size = run.config.eval_batch_size
    out = []
    for start in range(0, len(texts), size):
        part = pairs[start : start + size] if pairs is not None else None
        batch = encode(run.tokenizer, texts[start : start + size], part, run.config.max_seq_len)
        out.append(run.model(**batch).logits.float())
    if not out:
        return torch.empty(0, len(run.label_names))
    return torch.cat(out)


def predict(
    run: RunModel, texts: Sequence[str], pairs: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """Each row's label name and its probability."""
    probs = torch.softmax(logits(run, texts, pairs), dim=-1)
    best = probs.argmax(dim=-1)
    return [(run.label_names[int(i)], float(probs[row, i])) for row, i in enumerate(best)]


def read_rows(path: Path) -> tuple[list[str], list[str] | None]:
    """``text`` (and optional ``text_pair``) of each line of a JSONL file, errors naming the line."""
    path = Path(path)
    texts: list[str] = []
    pairs: list[str | None] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ExportError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ExportError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(row["text"])
        pairs.append(row.get("text_pair"))
    if not texts:
        raise ExportError(f"{path}: no rows")
    if all(p is None for p in pairs):
        return texts, None
    if any(p is None for p in pairs):
        line = pairs.index(None) + 1
        raise ExportError(f"{path}: row {line} has no text_pair although other rows do")
    return texts, [str(p) for p in pairs]


# ------------------------------------------------------------------------------ the modeling file


_MODEL_SOURCE = '''

BACKBONE = {backbone!r}  # the base model inside the task model
POOLER = {pooler!r}  # a [CLS] pooler module that mean pooling replaces
TOKEN_TYPES = {token_types!r}  # the model reads token_type_ids (else they are dropped)
DECODER = {decoder!r}


class {config_class}({stock_config}):
    """{stock_config} plus how fedpeft pools and where its bottleneck adapters sit."""

    model_type = "{model_type}"

    def __init__(self, pooling={pooling!r}, bottleneck_adapters=None, **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling  # "mean", "last" or "cls" (the family's own head)
        # [{{"module": "<path of a layer's output projection>", "width": 64, "activation": "relu"}}]
        self.bottleneck_adapters = list(bottleneck_adapters or [])


class {base_class}({stock_base}):
    """The base model, registered for {config_class} (a task model may build it by config)."""

    config_class = {config_class}


AutoModel.register({config_class}, {base_class}, exist_ok=True)


class {model_class}({stock_model}):
    """{stock_model} with fedpeft's pooling and bottleneck adapters."""

    config_class = {config_class}

    def __init__(self, config):
        super().__init__(config)
        for site in config.bottleneck_adapters:
            parent_path, _, attr = site["module"].rpartition(".")
            parent = self.get_submodule(parent_path)
            projection = getattr(parent, attr)
            adapter = Bottleneck(out_features(projection), site["width"], site["activation"])
            setattr(parent, attr, AdaptedLinear(projection, adapter))
        attach_pooling(
            self,
            config.pooling,
            backbone=BACKBONE,
            pooler=POOLER,
            token_types=TOKEN_TYPES,
            decoder=DECODER,
        )
'''


@dataclass(frozen=True)
class ModelCode:
    """The exported modeling file of one run's model: its names and source."""

    model_type: str  # ``fedpeft_<model type>``: unknown to transformers without the file
    config_class: str
    model_class: str
    stock_model: str  # the transformers class it subclasses
    source: str

    @property
    def file(self) -> str:
        return f"modeling_{self.model_type}.py"


def model_code(family: Family, task: nn.Module, pooling: str) -> ModelCode:
    """The modeling file for ``task`` (a transformers task model of ``family``): fedpeft's own
    pooling and adapter code, then a config and model subclassing the stock ones."""
    from fedpeft.models import pooling as poolers
    from fedpeft.models.families import out_features
    from fedpeft.peft.adapter import AdaptedLinear, Bottleneck

    stock_model = type(task).__name__
    stock_config = type(task.config).__name__
    stock_base = type(task.get_submodule(family.backbone)).__name__
    model_type = f"fedpeft_{task.config.model_type}"
    name = stock_model.removesuffix("ForSequenceClassification")
    config_class, base_class = f"Fedpeft{name}Config", f"Fedpeft{name}Model"
    model_class = f"Fedpeft{stock_model}"
    header = (
        f'"""{name} sequence classifier as trained by fedpeft (written by `fedpeft export`).\n\n'
        "Needs torch and transformers only. Load with\n"
        "AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).\n"
        '"""\n\n'
        "from __future__ import annotations\n\n"
        "import torch\n"
        "from torch import nn\n"
        f"from transformers import AutoModel, {stock_base}, {stock_config}, {stock_model}\n\n"
        '_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}\n'
        f"ATTACHED = {poolers.ATTACHED!r}  # the backbone attribute holding an attached pooler\n"
    )
    parts = (
        out_features,
        poolers.text_mask,
        poolers.MaskedMeanPooler,
        poolers.LastTokenPooler,
        poolers._remember_mask,
        poolers._remember_mask_attached,
        poolers._pool_output,
        poolers._drop_token_types,
        poolers.attach_pooling,
        Bottleneck,
        AdaptedLinear,
    )
    body = "".join("\n\n" + inspect.getsource(part) for part in parts)
    classes = _MODEL_SOURCE.format(
        backbone=family.backbone,
        pooler=family.pooler,
        token_types=family.token_types,
        decoder=family.decoder,
        pooling=pooling,
        model_type=model_type,
        config_class=config_class,
        base_class=base_class,
        model_class=model_class,
        stock_config=stock_config,
        stock_base=stock_base,
        stock_model=stock_model,
    )
    return ModelCode(model_type, config_class, model_class, stock_model, header + body + classes)


def _modeling_module(code: ModelCode) -> ModuleType:
    """The modeling file imported here too, so exported weights are checked against it."""
    folder = Path(tempfile.mkdtemp(prefix="fedpeft-export-"))
    try:
        path = folder / code.file
        path.write_text(code.source)
        spec = importlib.util.spec_from_file_location(f"fedpeft_export_{code.model_type}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return module


def _adapter_sites(model: nn.Module) -> list[dict[str, Any]]:
    """Where the model's bottleneck adapters sit: the paths of the projections they follow."""
    from fedpeft.peft.adapter import AdaptedLinear

    sites = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            activation = type(module.adapter.act).__name__.lower()
            sites.append({"module": name, "width": module.adapter.width, "activation": activation})
    return sites


def _hf_model(
    code: ModelCode,
    module: ModuleType,
    template: nn.Module,
    state: dict[str, torch.Tensor],
    labels: list[str],
    pooling: str,
    sites: list[dict[str, Any]],
) -> nn.Module:
    """An instance of the exported class with exactly ``state`` (every key must fit)."""
    settings = template.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        settings.pop(key, None)
    settings.update(
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pooling=pooling,
        bottleneck_adapters=sites,
    )
    config = getattr(module, code.config_class)(**settings)
    config.architectures = [code.model_class]
    config.auto_map = {
        "AutoConfig": f"{code.file[:-3]}.{code.config_class}",
        "AutoModelForSequenceClassification": f"{code.file[:-3]}.{code.model_class}",
    }
    model = getattr(module, code.model_class)(config)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        kind = "missing" if result.missing_keys else "unexpected"
        name = (result.missing_keys or result.unexpected_keys)[0]
        raise ExportError(f"export does not fit the model: {kind} tensor '{name}'")
    return model.eval()


def _write_model_folder(model: nn.Module, folder: Path, code: ModelCode, tokenizer) -> None:
    model.save_pretrained(folder)
    (folder / code.file).write_text(code.source)
    tokenizer.save_pretrained(folder)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ export


def _peft_key(name: str) -> str:
    """A trainable tensor's name with peft's wrapper prefixes removed (for matching)."""
    for prefix in ("base_model.model.", "base_model."):
        name = name.removeprefix(prefix)
    return name.replace("modules_to_save.default.", "")


def _export_peft(
    run: RunModel, family: Family, out: Path, final: Path, code: ModelCode, module: ModuleType
) -> None:
    """The peft adapter folder in ``out``, the backbone (custom code) in ``out/base``; ``final``
    is where ``out`` will be moved (the adapter config names its base folder there)."""
    from peft import get_peft_model

    from fedpeft.models import load_model
    from fedpeft.peft.base import trainable_state

    config, labels = run.config, run.label_names
    trained = trainable_state(run.model)
    heads = tuple(f"{name}." for name in family.head)
    head = {_peft_key(k): v for k, v in trained.items() if _peft_key(k).startswith(heads)}
    backbone, _ = load_model(config.model, len(labels), pooling=config.pooling, seed=config.seed)
    state = _plain_state(backbone)
    state.update(head)
    pooling = config.pooling or family.pooling
    base = _hf_model(code, module, backbone, state, labels, pooling, [])
    base_dir = out / BASE_FOLDER
    tokenizer = _export_tokenizer(run)
    _write_model_folder(base, base_dir, code, tokenizer)

    peft_config = copy.deepcopy(run.model.peft_config["default"])
    peft_config.task_type = "SEQ_CLS"
    peft_config.inference_mode = False
    peft_config.modules_to_save = list(family.head)  # the whole head trains, in every family
    wrapped = get_peft_model(base, peft_config)
    wrapped.peft_config["default"].base_model_name_or_path = str(base_dir)
    wanted = {_peft_key(k): k for k, p in wrapped.named_parameters() if p.requires_grad}
    have = {_peft_key(k): v for k, v in trained.items()}
    if wanted.keys() != have.keys():
        name = sorted(wanted.keys() ^ have.keys())[0]
        raise ExportError(f"peft export does not fit the run's tensors (at '{name}')")
    params = dict(wrapped.named_parameters())
    with torch.no_grad():
        for key, name in wanted.items():
            params[name].copy_(have[key])
    wrapped.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # name the backbone where it will be once ``out`` is moved to ``final``
    config_path = out / "adapter_config.json"
    settings = json.loads(config_path.read_text())
    settings["base_model_name_or_path"] = str((final / BASE_FOLDER).resolve())
    config_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _export_tokenizer(run: RunModel):
    """A copy of the tokenizer that truncates where the run did (and, for decoders, pads on the
    side and with the token the run did: ``load_model`` set both)."""
    tokenizer = copy.deepcopy(run.tokenizer)
    tokenizer.model_max_length = run.config.max_seq_len
    return tokenizer


def _export_model(
    run: RunModel, family: Family, out: Path, code: ModelCode, module: ModuleType
) -> None:
    state = _plain_state(run.model)
    sites = _adapter_sites(run.model)
    pooling = run.config.pooling or family.pooling
    model = _hf_model(code, module, run.model, state, run.label_names, pooling, sites)
    _write_model_folder(model, out, code, _export_tokenizer(run))


def export_run(run_path: Path, out: Path, which: str | None = None) -> ExportResult:
    """Write the run's model to ``out`` (see the module docstring); returns what was written."""
    from fedpeft.config import load_config

    run_dir = RunDir.open(Path(run_path))
    method = load_config(run_dir.config_path).method
    if method not in PEFT_METHODS + MODEL_METHODS:
        raise ExportError(
            f"method '{method}' cannot be exported yet (exportable: "
            f"{', '.join(PEFT_METHODS + MODEL_METHODS)})"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose a new --out folder")
    run = load_run_model(run_dir.path, which)
    family, task = task_model(run.model)
    pooling = run.config.pooling or family.pooling
    code = model_code(family, task, pooling)
    module = _modeling_module(code)
    as_peft = method in PEFT_METHODS and hasattr(run.model, "peft_config")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if as_peft:
            _export_peft(run, family, tmp, out, code, module)
        else:
            _export_model(run, family, tmp, code, module)
        kind = "peft adapter" if as_peft else "transformers model"
        (tmp / "README.md").write_text(_readme(run, kind, out.name, code, pooling))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, kind, run.weights)


def _readme(run: RunModel, kind: str, name: str, code: ModelCode, pooling: str) -> str:
    config = run.config
    if kind == "peft adapter":
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'base = AutoModelForSequenceClassification.from_pretrained("{name}/{BASE_FOLDER}", '
            "trust_remote_code=True)\n"
            f'model = PeftModel.from_pretrained(base, "{name}").eval()\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        )
    else:
        load = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'model = AutoModelForSequenceClassification.from_pretrained("{name}", '
            "trust_remote_code=True).eval()\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)\n'
        )
    use = (
        'batch = tokenizer(["some text"], truncation=True, padding=True, return_tensors="pt")\n'
        "label = model.config.id2label[model(**batch).logits.argmax(-1).item()]\n"
    )
    if kind == "peft adapter":
        use = use.replace("model.config.id2label", "base.config.id2label")
    return (
        f"# {config.run_name()}: {config.method} on {config.dataset}\n\n"
        f"Exported by `fedpeft export` from `{run.weights.parent.name}/{run.weights.name}` "
        f"({kind}). Model `{config.model}`, "
        f"pooling `{pooling}`, labels: {', '.join(run.label_names)}.\n\n"
        f"`trust_remote_code=True` loads `{code.file}` from the model folder: "
        f"fedpeft's pooling and adapters. A stock `{code.stock_model}` would not compute the "
        "same thing.\n\n"
        "```python\n" + load + use + "```\n"
    )
