"""One AllSpark model for many tasks: the shared frozen LLM with one set of adapters, and per task its
encoder(s), bridge, prompt set and head; trained jointly, one task per optimizer step.

The pieces, in the order a reader meets them:

- :class:`JointConfig` (``configs/joint/allspark.yaml``, or ``train.py --modality hsi,table``): the task list.
  Each task loads its own YAML from ``configs/`` unchanged (with its ``demo:`` block on demo data); the joint
  file adds what belongs to the run as a whole: the task schedule, the optimisation shared by every task, and
  overrides applied to every task (``overrides``) or to one (a task entry's ``overrides``).
- :class:`TaskSchedule`: which task the optimizer step ``s`` trains, a pure function of (seed, step), so every
  process draws the same task and a resumed run draws what the uninterrupted one did, with no state to save.
  ``round_robin`` cycles the tasks in list order; ``proportional`` draws task ``i`` with probability
  ``n_i / sum(n)`` (``n``: training-set sizes); ``temperature`` with probability ``n_i^(1/T) / sum(n^(1/T))``
  (T = ``schedule.temperature``; T=1 is proportional, T->inf uniform); ``run_length`` proportional to the
  optimizer steps of each task's own single-task run (its ``train.epochs`` x one pass over its training split),
  so a joint run of the default length trains each task about as many steps as its single-task run does.
- :class:`MultiTaskAllSpark`: the shared LLM under ``llm.`` and the task parts (each an :class:`AllSpark` built
  on the shared :class:`~allspark.llm.LoadedLLM`, its own copy of the LLM unregistered) in ``tasks.<name>.``;
  ``forward(batch)`` routes by ``batch["task"]``. With ``model.bridge.shared`` one bridge's queries and layers
  serve every task (under ``bridge.``), each task entering it through its own input projection (its encoders'
  widths to the bridge width, :class:`~allspark.bridge.SharedBridgeEntry`); otherwise each task has its own
  bridge. The trainable state uses the same prefixes, so the shared parts are saved once and a task's part can be
  added to (or taken from) a checkpoint as a whole.
- :func:`train_joint`: the loop: per task its run (:class:`allspark.run.Run`: data, evaluator, loaders), one
  model over them, and the optimizer steps on the :class:`allspark.steploop.StepLoop` that the single-task trainer
  runs on too (the update, step counting, interrupts, the JSONL log and trackers, checkpoints, ``best/``); its own
  are the task each step draws and the per-task records. Per task its loader (its own batch size) and loss weight;
  one cosine schedule over the run's total optimizer steps; validation of every task with its own protocol;
  ``best/`` chosen on the aggregate (:func:`aggregate_score`); exact resume (each task's loader position, the
  RNG, optimizer and schedule).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from allspark.bridge import ModalBridge, SharedBridgeEntry
from allspark.checkpoints import (ADAPTER_DIR, BEST_DIR, CONFIG_NAME, INFO_NAME, JOINT_CONFIG_NAME, SHARED_NAME,
                                  STATE_NAME, TASKS_DIR, WEIGHTS_NAME, _jsonable, is_joint_checkpoint,
                                  load_trainable_state, resolve_joint_checkpoint, save_trainable_state, write_info,
                                  write_peft_adapter)
from allspark.config import (Config, ConfigError, apply_overrides, config_dir, config_from_yaml_text, from_dict,
                             load_config, save_config, to_dict)
from allspark.errors import UserError, UserFileNotFoundError
from allspark.io import atomic_dir, atomic_write_text
from allspark.llm import LoadedLLM, load_llm
from allspark.model import AllSpark, hold_unmatched
from allspark.types import Output

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec", "ScheduleConfig", "JointTrainConfig", "JointConfig", "JOINT_CONFIG_NAME", "SCHEDULES",
    "load_joint_config", "is_joint_config_file", "joint_config_path", "resolve_task_configs",
    "TaskSchedule", "MultiTaskAllSpark", "LoadReport", "aggregate_score", "JointState", "train_joint",
    "evaluate_joint", "resolve_joint_checkpoint", "is_joint_checkpoint", "read_task_folders",
    "read_shared_settings", "JointModelConfig", "JointBridgeConfig", "check_same_draws",
]

# the checkpoint names (JOINT_CONFIG_NAME, TASKS_DIR, SHARED_NAME, STATE_NAME, ...) and resolve_joint_checkpoint /
# is_joint_checkpoint live in allspark.checkpoints and stay importable from here
SHARED_PREFIX = "llm."
#: the shared bridge's queries and layers (``model.bridge.shared``)
BRIDGE_PREFIX = "bridge."
TASK_PREFIX = "tasks."
#: names a task cannot take: the attributes of the ``nn.ModuleDict`` that holds the task parts (``train``,
#: ``items``, ``type`` ...), which it refuses as keys
_RESERVED_TASK_NAMES = frozenset(dir(nn.ModuleDict()))
#: keys of the joint config's ``model`` block, which a task's config does not have
_JOINT_MODEL_KEYS = ("model.bridge.shared", "model.bridge.width")
SCHEDULES = ("round_robin", "proportional", "temperature", "run_length")
#: what a resumed joint run may change: the run's length
_RESUME_MAY_CHANGE = ("train.steps", "train.max_steps")


# ---------------------------------------------------------------------------------------------------
# the joint config


@dataclass
class TaskSpec:
    #: the task's name: ``configs/<name>.yaml`` (unless ``config`` names another file) and its key in the model
    name: str = ""
    #: a YAML file to load instead of ``configs/<name>.yaml``
    config: str | None = None
    #: the weight of this task's loss in the steps that draw it
    loss_weight: float = 1.0
    #: dotted overrides for this task only (after the joint file's ``overrides``)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: a block of this task's ``recipes`` (e.g. ``answers``), applied as ``train.py --recipe`` applies it to a
    #: single-task run; it must exist. Default: the joint ``recipe``, where the task's config defines it
    recipe: str | None = None


@dataclass
class ScheduleConfig:
    #: ``round_robin`` | ``proportional`` (to the training-set sizes) | ``temperature`` (sizes ** (1/T)) |
    #: ``run_length`` (to each task's single-task run length, train.epochs x steps of one pass)
    type: str = "proportional"
    temperature: float = 2.0


@dataclass
class JointTrainConfig:
    """The optimisation shared by all tasks (one optimizer, one schedule). The tasks' own ``train`` blocks give
    only their ``epochs`` (for the default length), ``metric_for_best`` and ``greater_is_better``."""

    #: optimizer steps of the whole run (the learning-rate schedule spans them); None: the sum over the tasks of
    #: ``train.epochs`` x the steps of one pass over the task's training split
    steps: int | None = None
    #: stop after this many optimizer steps (the schedule still spans ``steps``)
    max_steps: int | None = None
    #: validate every task every N steps (and at the end); None: one "joint epoch", the sum over the tasks of
    #: the steps of one pass over each training split
    eval_every_steps: int | None = None
    #: micro-batches per optimizer step, all of the task drawn for the step (each of that task's
    #: ``data.batch_size``; the gradient is their mean, so a step sees ``grad_accum_steps`` x the batch). A task's
    #: pass over its training split counts ceil(batches / grad_accum_steps) optimizer steps; a step's micro-batches
    #: may run over the end of one pass into the next
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    #: learning-rate multipliers by joint parameter name ``{shell pattern: factor}`` (``tasks.rgb.encoders.0.*``);
    #: each task's own ``train.lr_scale`` applies too, its patterns under ``tasks.<name>.``
    lr_scale: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    #: linear warm-up as a share of ``steps``
    warmup_ratio: float = 0.05
    attention_kernel: str = "auto"
    mixed_precision: str = "auto"
    max_grad_norm: float | None = 1.0
    log_every_steps: int = 10
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    log_with: Any = "auto"
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    #: evaluate the best weights of every task on its test split at the end
    test_at_end: bool = True
    #: shell patterns over the joint model's parameter names (``llm.*lora*``, ``bridge.*``, ``tasks.rgb.head.*``):
    #: only the trainable parameters matching one keep training; the others are held (no gradient, not in the
    #: optimizer) and stay in the checkpoint. Empty: all train. A task's own ``train.train_only`` holds within
    #: that task's parts (its patterns as in a single-task run: ``head.*``, ``encoders.0.*``); the shared
    #: adapters and bridge follow this list only
    train_only: list[str] = field(default_factory=list)
    #: training stages in order, each ``{name, overrides}``: the run's config with the stage's overrides (keys as on
    #: the command line: ``joint.train.train_only``, ``TASK:key``, or ``key`` for every task), trained into
    #: ``stage<i>-<name>/``, each stage after the first starting from the previous stage's ``best/`` (``start_from``);
    #: the last stage's ``best/`` becomes the run's
    stages: list[Any] = field(default_factory=list)


@dataclass
class JointBridgeConfig:
    #: true: one bridge (its queries and layers) serves every task with an encoder, each task entering it through
    #: its own input projection; false: one bridge per task; null: false, or with ``init_from`` the checkpoint's
    shared: bool | None = None
    #: the shared bridge's token width (what its layers attend over); null: the widest encoder of the tasks, or
    #: with ``init_from`` the checkpoint's. An encoder of another width gets a projection to it.
    width: int | None = None


@dataclass
class JointModelConfig:
    """What the joint model decides beyond the tasks' own ``model`` blocks (which give the bridge's architecture:
    ``model.bridge.num_queries``, ``depth`` ...; a shared bridge needs every task to give the same)."""

    bridge: JointBridgeConfig = field(default_factory=JointBridgeConfig)


@dataclass
class JointConfig:
    #: the run's name (trackers' project name)
    name: str = "allspark"
    seed: int = 0
    #: task names, or mappings ``{name, config, loss_weight, overrides}`` (see :class:`TaskSpec`)
    tasks: list[Any] = field(default_factory=list)
    #: dotted overrides applied to every task's config (after its demo block), e.g. ``model.llm.name: tiny``
    overrides: dict[str, Any] = field(default_factory=dict)
    #: ``demo`` or None (each task's own ``data.root``); a real dataset folder is per task:
    #: ``overrides: {data.root: ...}`` of its entry (``NAME:data.root=PATH`` on the command line)
    data_root: str | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: JointModelConfig = field(default_factory=JointModelConfig)
    train: JointTrainConfig = field(default_factory=JointTrainConfig)
    #: a recipe (``train.py --recipe NAME``) for every task whose config's ``recipes`` defines it (e.g. ``answers``:
    #: the classification tasks answer in words, the others train as they are); at least one task must define it.
    #: Its ``train.*`` values other than ``epochs`` are not used: one optimizer serves all tasks (``joint.train``)
    recipe: str | None = None
    #: a joint checkpoint (a run folder or its ``best/``) to extend: its tasks and the shared parts (adapters, and a
    #: shared bridge, which new tasks enter through their own projections) are loaded and held fixed, and only this
    #: config's tasks (none of which it may hold) train; the result serves all of them
    init_from: str | None = None
    #: a joint checkpoint (a run folder or its ``best/``) whose weights the run starts from: every task of this run
    #: and the shared parts are loaded, and all of them train (unless ``train.train_only`` holds some); the next
    #: stage of ``train.stages`` starts from the previous stage's ``best/`` this way
    start_from: str | None = None

    def task_specs(self) -> list[TaskSpec]:
        """The task list as :class:`TaskSpec` (names checked: present, unique, usable as module names)."""
        if not self.tasks:
            raise ConfigError("a joint config lists its tasks under `tasks:` (e.g. tasks: [hsi, table]), "
                              "and the list is empty")
        specs = []
        for i, entry in enumerate(self.tasks):
            if isinstance(entry, str):
                spec = TaskSpec(name=entry)
            elif isinstance(entry, dict):
                spec = from_dict(TaskSpec, entry, f"tasks.{i}")
            else:
                raise ConfigError(f"tasks.{i}: expected a task name or a mapping {{name, config, loss_weight, "
                                  f"overrides}}, got {type(entry).__name__} {entry!r}")
            if not spec.name or any(c in spec.name for c in ".:,/\\") or spec.name != spec.name.strip():
                raise ConfigError(f"tasks.{i}: a task name must be non-empty, without '.', ':', ',', '/', '\\' or "
                                  f"surrounding spaces, got {spec.name!r}")
            if spec.name in _RESERVED_TASK_NAMES:
                raise ConfigError(f"tasks.{i}: the task name {spec.name!r} collides with an attribute of the model's "
                                  f"task table; name the task otherwise ({{name: {spec.name}_task, config: ...}})")
            if spec.loss_weight < 0:
                raise ConfigError(f"tasks.{i} ({spec.name}): loss_weight must be >= 0, got {spec.loss_weight}")
            specs.append(spec)
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"the joint config lists task(s) {twice} more than once: {names}")
        folded: dict[str, str] = {}
        for name in names:  # tasks/<name>/ folders of two such tasks would be one on a case-insensitive disk
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise ConfigError(f"tasks {other!r} and {name!r} differ only in case; their folders in a checkpoint "
                                  "would collide on a case-insensitive file system: name them apart")
        if self.model.bridge.width is not None and (isinstance(self.model.bridge.width, bool)
                                                    or self.model.bridge.width < 1):
            raise ConfigError(f"model.bridge.width must be a positive int, got {self.model.bridge.width!r}")
        return specs


def joint_config_path(name: str = "allspark") -> Path:
    """A joint config shipped with the package: ``configs/joint/<name>.yaml``. (Not in ``configs/`` itself,
    where every YAML file is one modality: ``list_modalities`` and the tests that build each one read them.)"""
    return config_dir() / "joint" / f"{name}.yaml"


def is_joint_config_file(path: str | Path) -> bool:
    """True for a YAML file whose top level lists ``tasks`` (a joint config, not a single-task one)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "tasks" in data


def _split_overrides(overrides: Sequence[str], task_names: set[str] | None
                     ) -> tuple[list[str], dict[str, Any], dict[str, dict[str, Any]]]:
    """Command-line ``key=value`` strings -> (joint-level ``joint.key=value`` without the prefix, overrides of
    every task, per-task ``NAME:key=value``)."""
    from allspark.config import _parse_value

    joint, common, per_task = [], {}, {}
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} must look like key.path=value (joint.key=value for the joint "
                              "config, TASK:key=value for one task)")
        key, _, raw = text.partition("=")
        key = key.strip()
        if key.startswith("joint."):
            joint.append(f"{key[len('joint.'):]}={raw}")
        elif ":" in key:
            task, _, sub = key.partition(":")
            if task_names is not None and task not in task_names:
                raise ConfigError(f"override {text!r} names task {task!r}, which is not in the task list "
                                  f"{sorted(task_names)}")
            per_task.setdefault(task, {})[sub] = _parse_value(raw)
        else:
            common[key] = _parse_value(raw)
    return joint, common, per_task


def load_joint_config(path: str | Path | None = None, *, tasks: Sequence[str] | None = None,
                      overrides: Sequence[str] = (), data_root: str | None = None) -> JointConfig:
    """The joint config of a file (``path``) or of a task list (``tasks``, the ``--modality a,b`` short form, with
    the defaults of :class:`JointConfig`). ``overrides``: command-line strings, ``joint.key=value`` for the joint
    config, ``TASK:key=value`` for one task, ``key=value`` for every task."""
    from allspark.config import _read_yaml

    if (path is None) == (tasks is None):
        raise ConfigError("load_joint_config needs a joint config file or a task list (not both)")
    raw = _read_yaml(Path(path)) if path is not None else {"tasks": list(tasks)}
    if path is not None and "tasks" not in raw:
        raise ConfigError(f"{path} is not a joint config: it has no top-level `tasks:` list")
    cfg = _with_overrides(raw, overrides)
    if data_root is not None:
        cfg.data_root = str(data_root)
    return cfg


def _with_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> JointConfig:
    """A joint config's mapping with command-line ``overrides`` applied (``joint.key``, ``TASK:key``, ``key``)."""
    joint, common, per_task = _split_overrides(overrides, None)
    raw = apply_overrides(raw, joint, JointConfig)
    cfg = from_dict(JointConfig, raw)
    names = {s.name for s in cfg.task_specs()}
    _split_overrides(overrides, names)  # a TASK: prefix must name a listed task
    specs = cfg.task_specs()
    cfg.overrides = {**cfg.overrides, **common}
    entries = []
    for spec in specs:
        spec.overrides = {**spec.overrides, **per_task.get(spec.name, {})}
        entries.append(asdict(spec))
    cfg.tasks = entries
    return cfg


@contextlib.contextmanager
def _in_task(name: str) -> Iterator[None]:
    """A user error raised while building task ``name`` names the task."""
    try:
        yield
    except UserError as exc:
        if str(exc).startswith(f"task {name!r}"):
            raise
        try:
            again = type(exc)(f"task {name!r}: {exc}")
        except Exception:  # an error type with another signature: as it is
            raise exc from None
        raise again from exc


#: a task's ``train`` keys that a joint run refuses (its ``train.train_only`` is taken: it holds that task's own
#: parts; the joint ``train.train_only`` decides about the shared ones)
_JOINT_ONLY_TRAIN_KEYS = {"stages": "joint.train.stages (stages of the whole joint run)",
                          "init_from": "joint.init_from (extend a joint checkpoint) or joint.start_from (start from "
                                       "one)"}


def resolve_task_configs(jcfg: JointConfig) -> dict[str, Config]:
    """Each task's config: its own YAML (``configs/<name>.yaml`` or the entry's ``config``), its demo block on
    demo data, the joint ``overrides``, then the entry's. All tasks must configure the same LLM (one is shared)."""
    specs = jcfg.task_specs()
    if jcfg.data_root not in (None, "demo") and len(specs) > 1:
        raise ConfigError(f"--data-root {jcfg.data_root}: a joint run of {len(specs)} tasks has one dataset folder "
                          "per task; give each its own with TASK:data.root=PATH (or --data-root demo)")
    cfgs: dict[str, Config] = {}
    took: list[str] = []  # the tasks that took the joint recipe, and those whose config has no such block
    skipped: list[str] = []
    for spec in specs:
        joint_only = sorted(k for k in {**jcfg.overrides, **spec.overrides} if k in _JOINT_MODEL_KEYS)
        if joint_only:
            raise ConfigError(f"{joint_only[0]} is a key of the joint config (one bridge for all tasks or one per "
                              f"task), not of task {spec.name!r}'s: set it under the joint file's `model:` block or "
                              f"as joint.{joint_only[0]}=VALUE")
        with _in_task(spec.name):
            cfg = _load_task_config(jcfg, spec, took, skipped)
            for key in _JOINT_ONLY_TRAIN_KEYS:
                if getattr(cfg.train, key):
                    raise ConfigError(f"train.{key} is set ({getattr(cfg.train, key)!r}) in the task's config; "
                                      f"a joint run takes {_JOINT_ONLY_TRAIN_KEYS[key]} instead (set "
                                      f"{spec.name}:train.{key}=null)")
        cfgs[spec.name] = cfg
    if jcfg.recipe is not None:
        if not took and skipped:
            defined = {n: sorted(c.recipes) for n, c in cfgs.items()}
            raise ConfigError(f"recipe {jcfg.recipe!r}: no task of the joint run defines it; their recipes: {defined}")
        logger.info("recipe %r: applied to %s%s", jcfg.recipe, took,
                    f"; {skipped} have no such recipe and train with their own values" if skipped else "")
    _check_same_llm(cfgs)
    return cfgs


#: what a joint run takes from a task's ``train`` block (the rest is ``joint.train``'s: one optimizer for all)
_TASK_TRAIN_KEYS = ("epochs", "metric_for_best", "greater_is_better", "lr_scale")


def _load_task_config(jcfg: JointConfig, spec: TaskSpec, took: list[str], skipped: list[str]) -> Config:
    """Task ``spec``'s config with its recipe: its own ``recipe`` (which must exist), else the joint one where its
    config defines it (``took`` / ``skipped`` collect which tasks did). A recipe's ``train.*`` values that a joint
    run does not use are named in one warning."""
    load = functools.partial(load_config, spec.name, path=spec.config,
                             overrides={**jcfg.overrides, **spec.overrides}, data_root=jcfg.data_root)
    recipe = spec.recipe
    if recipe is None and jcfg.recipe is not None:
        cfg = load()
        if jcfg.recipe not in cfg.recipes:
            skipped.append(spec.name)
            return cfg
        recipe = jcfg.recipe
        took.append(spec.name)
    cfg = load(recipe=recipe)
    if recipe is not None:
        unused = sorted(k for k in (cfg.recipes[recipe] or {}) if k.startswith("train.")
                        and k.split(".")[1] not in _TASK_TRAIN_KEYS)
        if unused:
            logger.warning("task %r: recipe %r sets %s, which a joint run does not use (one optimizer and schedule "
                           "for every task: set joint.train.lr, joint.train.warmup_ratio, ...)", spec.name, recipe,
                           ", ".join(unused))
    return cfg


def _check_same_llm(cfgs: dict[str, Config]) -> None:
    from allspark.training import _flatten

    names = list(cfgs)
    first = _flatten(to_dict(cfgs[names[0]].model.llm))
    for name in names[1:]:
        other = _flatten(to_dict(cfgs[name].model.llm))
        differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differ:
            shown = ", ".join(f"model.llm.{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in differ[:6])
            raise ConfigError(f"tasks {names[0]!r} and {name!r} configure different LLMs, but a joint model shares "
                              f"one: {shown}; set the same values for both (e.g. as joint `overrides`)")


# ---------------------------------------------------------------------------------------------------
# the task schedule


class TaskSchedule:
    """Which task optimizer step ``step`` (0-based) trains; a pure function of (seed, step), the same on every
    process and after a resume. ``round_robin``: ``names[step % T]``. ``proportional``, ``temperature`` and
    ``run_length``: a draw with probabilities :attr:`probabilities` by inverse CDF: ``u`` is the first number of
    ``torch.rand`` on a generator seeded ``seed * 1_000_003 + step``, and the task is the first ``i`` with
    ``u < cumsum(p)[i]``."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int], kind: str = "proportional",
                 temperature: float = 2.0, seed: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ConfigError(f"schedule.type must be one of {list(SCHEDULES)}, got {kind!r}")
        if len(names) != len(sizes) or not names:
            raise ValueError(f"TaskSchedule needs one size per task, got {len(names)} names and {len(sizes)} sizes")
        bad = [n for n, s in zip(names, sizes) if s < 1]
        if bad:
            raise ConfigError(f"task(s) {bad} have an empty training split; a schedule cannot draw them")
        if kind == "temperature" and not temperature > 0:
            raise ConfigError(f"schedule.temperature must be > 0, got {temperature}")
        self.names = list(names)
        self.kind = kind
        self.seed = int(seed)
        power = {"round_robin": 0.0, "proportional": 1.0, "temperature": 1.0 / temperature, "run_length": 1.0}[kind]
        weights = torch.tensor([float(s) ** power for s in sizes], dtype=torch.float64)
        self.probabilities = (weights / weights.sum()).tolist()
        self._cumulative = torch.cumsum(weights / weights.sum(), 0)

    def index(self, step: int) -> int:
        if self.kind == "round_robin":
            return step % len(self.names)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(1, generator=g, dtype=torch.float64)
        return min(int(torch.searchsorted(self._cumulative, u, right=True)), len(self.names) - 1)

    def __call__(self, step: int) -> str:
        return self.names[self.index(step)]

    def draws(self, steps: int, start: int = 0) -> list[str]:
        return [self(s) for s in range(start, start + steps)]


# ---------------------------------------------------------------------------------------------------
# the model


@dataclass
class LoadReport:
    """What :meth:`MultiTaskAllSpark.load_trainable_state_dict` left out: whole tasks the checkpoint lacks (they
    keep their initial weights) and whole tasks it holds that the model has not (ignored)."""

    missing_tasks: list[str] = field(default_factory=list)
    unexpected_tasks: list[str] = field(default_factory=list)
    loaded: int = 0


def _check_width_needs_shared(shared: bool, width: int | None) -> None:
    if width is not None and not shared:
        raise ConfigError(f"model.bridge.width={width} is the width of a shared bridge; set model.bridge.shared: "
                          "true too (or leave the width unset)")


class MultiTaskAllSpark(nn.Module):
    """The shared LLM (``llm.``, its adapters trained by every task) and one :class:`AllSpark` part per task
    (``tasks.<name>.``: encoders, bridge, head, prompts). ``forward(batch)`` runs ``batch["task"]``'s part (a
    one-task model also takes a batch that names none).

    ``shared_bridge``: one :class:`~allspark.bridge.ModalBridge` (``bridge.``: its queries, layers and final
    norm) serves every task that has encoders; each such task's ``bridge`` is then its
    :class:`~allspark.bridge.SharedBridgeEntry` (``tasks.<name>.bridge.``: a projection of each encoder whose
    width is not ``bridge_width``, and the modality embeddings of a task with several encoders). The bridge's
    architecture comes from the tasks' ``model.bridge`` blocks, which must agree; ``bridge_width`` (default: the
    widest encoder of the tasks) is the width its layers attend over."""

    def __init__(self, cfgs: dict[str, Config], infos: dict[str, dict[str, Any]] | None = None,
                 llm: LoadedLLM | None = None, loss_weights: dict[str, float] | None = None,
                 shared_bridge: bool = False, bridge_width: int | None = None) -> None:
        super().__init__()
        _check_width_needs_shared(bool(shared_bridge), bridge_width)
        if not cfgs:
            raise ConfigError("a multi-task model needs at least one task; the task list is empty")
        _check_same_llm(cfgs)
        infos = infos or {}
        unknown = sorted(set(infos) - set(cfgs))
        if unknown:
            raise ValueError(f"data info given for task(s) {unknown} that are not among the tasks {list(cfgs)}")
        self.cfgs = dict(cfgs)
        self._llm = llm if llm is not None else load_llm(next(iter(cfgs.values())).model.llm)
        self.llm = self._llm.module
        self.hidden_size = self._llm.hidden_size
        parts = {}
        for name, cfg in cfgs.items():
            with _in_task(name):
                part = AllSpark(cfg, infos.get(name), llm=self._llm)
            # The part reaches the shared LLM as before (``part.llm``, ``part._llm``) but does not own it: the
            # LLM's parameters are registered (and saved) once, under this model's ``llm.``.
            del part._modules["llm"]
            part.__dict__["llm"] = self.llm
            parts[name] = part
        self.tasks = nn.ModuleDict(parts)
        #: the bridge every task shares (None: each task has its own, in ``tasks.<name>.bridge``)
        self.bridge: ModalBridge | None = self._share_bridge(bridge_width) if shared_bridge else None
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in cfgs}

    def _share_bridge(self, width: int | None) -> ModalBridge:
        """Build the one bridge and route every task with encoders into it through its own entry (replacing the
        bridge its :class:`AllSpark` part built)."""
        bridged = {n: p for n, p in self.tasks.items() if p.bridge is not None}
        if not bridged:
            raise ConfigError(f"model.bridge.shared: none of the tasks {self.task_names} has an encoder, so there is "
                              "no bridge to share (text and code tasks read their tokens directly)")
        names = list(bridged)
        first = to_dict(bridged[names[0]].cfg.model.bridge)
        for name in names[1:]:
            other = to_dict(bridged[name].cfg.model.bridge)
            differ = [k for k in first if first[k] != other.get(k)]
            if differ:
                shown = ", ".join(f"model.bridge.{k} ({first[k]!r} vs {other.get(k)!r})" for k in differ)
                raise ConfigError(f"tasks {names[0]!r} and {name!r} configure different bridges, but with "
                                  f"model.bridge.shared they share one: {shown}; set the same values for both (e.g. "
                                  "as joint `overrides`)")
        widths = {n: [e.out_dim for e in p.encoders] for n, p in bridged.items()}
        if width is None:
            width = max(max(w) for w in widths.values())
        elif isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.bridge.width must be a positive int, got {width!r}")
        part = bridged[names[0]]
        b = part.cfg.model.bridge
        shared = ModalBridge([], self.hidden_size, width=width, num_queries=b.num_queries, depth=b.depth,
                             heads=b.heads, dim_head=b.dim_head, ff_mult=b.ff_mult, dropout=b.dropout,
                             output_scale=part._bridge_output_scale(b.output_scale))
        for name, p in bridged.items():
            p.bridge = SharedBridgeEntry(widths[name], shared)
        logger.info("one bridge of width %d shared by tasks %s (encoder widths %s)", width, names, widths)
        return shared

    @property
    def bridge_width(self) -> int | None:
        """The shared bridge's token width (None: one bridge per task)."""
        return self.bridge.token_dim if self.bridge is not None else None

    def shared_settings(self) -> dict[str, Any]:
        """How the shared parts are built, as :data:`SHARED_NAME` records it."""
        return {"bridge": {"shared": self.bridge is not None, "width": self.bridge_width}}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.keys())

    @property
    def tokenizer(self):
        return self._llm.tokenizer

    def part(self, task: str | None) -> AllSpark:
        """Task ``task``'s :class:`AllSpark` part (None: the only task of a one-task model)."""
        if task is None:
            if len(self.tasks) == 1:
                return next(iter(self.tasks.values()))
            raise ValueError(f"the batch names no task (batch['task']); this model holds tasks {self.task_names}")
        try:
            return self.tasks[task]
        except KeyError:
            raise ValueError(f"unknown task {task!r}: this model holds tasks {self.task_names}") from None

    def forward(self, batch: dict[str, Any]) -> Output:
        task = batch.get("task")
        return self.part(task)({k: v for k, v in batch.items() if k != "task"})

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        try:
            return self(batch).predictions
        finally:
            self.train(was_training)

    # -- trainable state -------------------------------------------------------------------------
    def hold(self, tasks: Sequence[str], shared: bool = True) -> list[str]:
        """Stop training the parts of ``tasks`` and (``shared``) the shared parts (the adapters, and the shared
        bridge if there is one): no gradient, not in the optimizer, but still in :meth:`trainable_state_dict` (a
        task added against held parts). Returns the names held."""
        unknown = sorted(set(tasks) - set(self.task_names))
        if unknown:
            raise ValueError(f"hold: unknown task(s) {unknown}; this model holds tasks {self.task_names}")
        self._state_names = list(self.trainable_state_dict())
        held = []
        for name, p in self.named_parameters():
            task = self._task_of(name)
            if p.requires_grad and ((task is None and shared) or task in tasks):
                p.requires_grad_(False)
                held.append(name)
        return held

    def train_only(self, patterns: Sequence[str]) -> list[str]:
        """``joint.train.train_only``: of the trainable parameters, only those whose joint name (``llm.<name>``,
        ``bridge.<name>``, ``tasks.<task>.<name>``) matches one of the shell ``patterns`` keep training; the others
        are held as :meth:`hold` holds them (still in :meth:`trainable_state_dict`). A pattern that matches no
        trainable parameter is a config error. Returns the names held."""
        if patterns:
            self._state_names = list(self.trainable_state_dict())  # held parts stay in the checkpoint
        return hold_unmatched(self, patterns, "joint.train.train_only")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared adapters once (``llm.<name>``, the names of a single-task model), the shared bridge once
        (``bridge.<name>``, with ``model.bridge.shared``) and each task's trainable parts and persistent buffers
        (``tasks.<task>.<name>``), held parts (:meth:`hold`) included."""
        names = getattr(self, "_state_names", None)
        if names is not None:
            full = self.state_dict(keep_vars=True)
            return {n: full[n].detach() for n in names}
        state = {SHARED_PREFIX + n: p.detach() for n, p in self.llm.named_parameters() if p.requires_grad}
        if self.bridge is not None:
            state.update({BRIDGE_PREFIX + n: v.detach() for n, v in self.bridge.state_dict(keep_vars=True).items()})
        for task, part in self.tasks.items():
            for name, value in part.trainable_state_dict().items():
                state[f"{TASK_PREFIX}{task}.{name}"] = value
        return state

    @staticmethod
    def _task_of(key: str) -> str | None:
        """The task a state key belongs to (None: shared). Task names hold no '.', so the first part after the
        prefix is the whole name."""
        return key[len(TASK_PREFIX):].split(".", 1)[0] if key.startswith(TASK_PREFIX) else None

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Load trainable weights. ``strict=False`` tolerates whole tasks: those the checkpoint lacks keep their
        initial weights (a task added against held shared parts) and those the model lacks are skipped (one task
        of a joint checkpoint); both are returned in the :class:`LoadReport`. A shared tensor or part of a task
        that is missing, or a tensor of the wrong shape, is always an error."""
        expected = self.trainable_state_dict()
        held_shared = any(k.startswith(BRIDGE_PREFIX) for k in state)
        if held_shared != (self.bridge is not None):
            what = {True: "one bridge shared by its tasks", False: "one bridge per task"}
            raise ValueError(f"checkpoint has {what[held_shared]} (model.bridge.shared: {str(held_shared).lower()}), "
                             f"the model {what[self.bridge is not None]}; build the model as the checkpoint was")
        missing = set(expected) - set(state)
        unexpected = set(state) - set(expected)
        have = {self._task_of(k) for k in state}
        # a task with no trainable tensors of its own (e.g. text: the LLM's own LM head, no encoder or bridge) has
        # no key in any checkpoint, so its absence is no sign that a checkpoint lacks it
        owning = {self._task_of(k) for k in expected}
        missing_tasks = sorted(t for t in self.task_names if t not in have and t in owning)
        unexpected_tasks = sorted({self._task_of(k) for k in unexpected} - set(self.task_names) - {None})
        whole = {k for k in missing if self._task_of(k) in missing_tasks} | {
            k for k in unexpected if self._task_of(k) in unexpected_tasks}
        partial = sorted((missing | unexpected) - whole)
        if partial or (strict and (missing_tasks or unexpected_tasks)):
            parts = []
            if missing_tasks:
                parts.append(f"it lacks task(s) {missing_tasks} of the model")
            if unexpected_tasks:
                parts.append(f"it holds task(s) {unexpected_tasks} the model has not")
            if partial:
                m = sorted(k for k in partial if k in missing)
                u = sorted(k for k in partial if k in unexpected)
                parts.append(f"missing tensors {m[:6]}{'...' if len(m) > 6 else ''}, unexpected tensors "
                             f"{u[:6]}{'...' if len(u) > 6 else ''}")
            hint = "" if partial else " (strict=False loads the tasks both hold)"
            raise ValueError(f"checkpoint does not match the model's tasks {self.task_names}: "
                             f"{'; '.join(parts)}{hint}")
        own = self.state_dict(keep_vars=True)
        loaded = 0
        for name, value in state.items():
            if name not in expected:
                continue
            target = own[name]
            if target.shape != value.shape:
                raise ValueError(f"checkpoint tensor {name}: shape {list(value.shape)}, model has {list(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
            loaded += 1
        if missing_tasks or unexpected_tasks:
            logger.info("loaded %d tensors; task(s) %s not in the checkpoint keep their initial weights; task(s) %s "
                        "of the checkpoint are not in the model", loaded, missing_tasks, unexpected_tasks)
        return LoadReport(missing_tasks, unexpected_tasks, loaded)

    def save_pretrained(self, directory: str | Path, joint: JointConfig | None = None,
                        state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights (``model.safetensors``), each task's resolved config and data info
        (``tasks/<name>/``), how the shared parts are built (``shared.json``), the joint config (``joint.yaml``,
        when given) and, with LoRA, the shared adapter in PEFT's format (``adapter/``), atomically."""
        expected = self.trainable_state_dict()
        state = expected if state is None else state
        if set(state) != set(expected):
            raise ValueError(f"save_pretrained: the state to write has {sorted(set(state) ^ set(expected))[:6]} "
                             "not matching the model's trainable names")
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        shared = {k: v for k, v in state.items() if k.startswith(SHARED_PREFIX)}
        adapter = next(iter(self.tasks.values())).peft_adapter(shared)
        with atomic_dir(directory) as tmp:
            save_trainable_state(state, tmp / WEIGHTS_NAME, tasks=",".join(self.task_names))
            (tmp / SHARED_NAME).write_text(json.dumps(self.shared_settings(), indent=2))
            if joint is not None:
                atomic_write_text(tmp / JOINT_CONFIG_NAME, _yaml(joint))
            for name, part in self.tasks.items():
                folder = tmp / TASKS_DIR / name
                folder.mkdir(parents=True)
                save_config(part.cfg, folder / CONFIG_NAME)
                write_info(folder / INFO_NAME, part.info)
            write_peft_adapter(tmp, adapter)

    @classmethod
    def from_pretrained(cls, directory: str | Path, tasks: Sequence[str] | None = None) -> "MultiTaskAllSpark":
        """Rebuild from :meth:`save_pretrained` output (all its tasks, or those named in ``tasks``). The LLM loads
        with ``trust_remote_code`` off, and a hub id as its name is refused (as ``AllSpark.from_pretrained``)."""
        directory = Path(directory)
        cfgs, infos = read_task_folders(directory, tasks)
        bridge = read_shared_settings(directory)["bridge"]
        state = load_trainable_state(directory / WEIGHTS_NAME)
        shared = bridge["shared"]
        if shared and not any(cfg.model.encoders for cfg in cfgs.values()):
            # text or code tasks of a checkpoint whose other tasks share a bridge: these have none to enter
            shared = False
            state = {k: v for k, v in state.items() if not k.startswith(BRIDGE_PREFIX)}
        model = cls(cfgs, infos, shared_bridge=shared, bridge_width=bridge["width"] if shared else None)
        model.load_trainable_state_dict(state, strict=tasks is None)
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def num_trained_parameters(self) -> int:
        """The parameters a checkpoint of this model holds (trained now or held from an earlier run), the shared
        ones counted once."""
        params = dict(self.named_parameters())
        return sum(params[k].numel() for k in self.trainable_state_dict() if k in params)


def read_task_folders(directory: Path, tasks: Sequence[str] | None = None
                      ) -> tuple[dict[str, Config], dict[str, dict[str, Any]]]:
    """The resolved config and data info of each task saved in a joint checkpoint (all, or ``tasks``). Configs
    are data, not permissions: ``trust_remote_code`` is turned off and a hub id as the LLM is refused."""
    from allspark.llm import llm_source

    folder = directory / TASKS_DIR
    if not (directory / WEIGHTS_NAME).is_file() or not folder.is_dir():
        raise UserFileNotFoundError(f"{directory} is not a joint AllSpark checkpoint: expected {WEIGHTS_NAME} and "
                                    f"{TASKS_DIR}/<task>/config.yaml")
    held = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
    names = list(tasks) if tasks is not None else held
    absent = [t for t in names if t not in held]
    if absent:
        raise UserError(f"{directory} holds tasks {held}, not {absent}")
    cfgs, infos = {}, {}
    for name in names:
        cfg = config_from_yaml_text((folder / name / CONFIG_NAME).read_text())
        cfg.model.llm.trust_remote_code = False
        if llm_source(cfg.model.llm.name) == "hub":
            raise UserError(f"{folder / name / 'config.yaml'}: model.llm.name is {cfg.model.llm.name!r}, a hub id "
                            "that loading may download; copy the checkpoint and name a local model folder")
        cfgs[name] = cfg
        infos[name] = json.loads((folder / name / INFO_NAME).read_text())
    return cfgs, infos


def read_shared_settings(directory: Path) -> dict[str, Any]:
    """How a saved joint model's shared parts are built (:data:`SHARED_NAME`; a checkpoint written before it
    existed has one bridge per task), checked."""
    path = Path(directory) / SHARED_NAME
    if not path.is_file():
        return {"bridge": {"shared": False, "width": None}}
    try:
        data = json.loads(path.read_text())
        bridge = data["bridge"]
        shared, width = bridge["shared"], bridge["width"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: expected {{\"bridge\": {{\"shared\": true|false, \"width\": int|null}}}}, could not "
                        f"read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(shared, bool) or not (width is None or (isinstance(width, int) and not isinstance(width, bool)
                                                              and width >= 1)):
        raise UserError(f"{path}: expected bridge.shared a boolean and bridge.width a positive int or null, got "
                        f"{bridge!r}")
    return {"bridge": {"shared": shared, "width": width}}


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(obj), sort_keys=False)


# ---------------------------------------------------------------------------------------------------
# validation aggregate


def aggregate_score(values: dict[str, float], references: dict[str, float], greater: dict[str, bool]) -> float:
    """The number ``best/`` is chosen on (higher is better): the mean over tasks of each task's relative
    improvement of its ``metric_for_best`` over its reference (its first validation in the run), signed by its
    direction: ``(v - r) / |r|`` where greater is better, ``(r - v) / |r|`` where lower is (``|r|`` at least
    1e-8). Relative, so a task whose metric has a large scale (an RMSE in ug/m3) does not outweigh one in [0, 1]."""
    if set(values) != set(references) or set(values) != set(greater):
        raise ValueError(f"aggregate_score: values for {sorted(values)}, references for {sorted(references)}, "
                         f"directions for {sorted(greater)}")
    terms = []
    for task, value in values.items():
        ref = references[task]
        delta = (value - ref) if greater[task] else (ref - value)
        terms.append(delta / max(abs(ref), 1e-8))
    return float(sum(terms) / len(terms))


# ---------------------------------------------------------------------------------------------------
# training


@dataclass
class JointState:
    global_step: int = 0
    #: per task: ``epoch`` (the pass over its training split in progress), ``batches_in_epoch`` (of that pass
    #: consumed) and ``steps`` (optimizer steps it has trained)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    #: each task's first validation value of its metric_for_best (the reference of :func:`aggregate_score`)
    reference: dict[str, float] = field(default_factory=dict)
    best_score: float | None = None
    best_step: int | None = None
    #: the per-task validation values of the best step
    best_metrics: dict[str, float] = field(default_factory=dict)


class _TaskStream:
    """Endless batches of one task's (prepared) training loader, epoch after epoch; its position lives in the
    shared ``JointState.tasks[name]`` dict, so a checkpoint records it and a resume skips what was consumed."""

    def __init__(self, name: str, loader, accelerator, position: dict[str, int]) -> None:
        if len(loader) == 0:
            raise ConfigError(f"task {name!r}: its training loader has no batch")
        self.name, self.loader, self.accelerator, self.pos = name, loader, accelerator, position
        self._it: Iterator | None = None

    def next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                loader = self.loader
                if self.pos["batches_in_epoch"]:
                    loader = self.accelerator.skip_first_batches(self.loader, self.pos["batches_in_epoch"])
                # accelerate's loaders pass their own iteration count to the sampler; set the true epoch
                loader.set_epoch(self.pos["epoch"])
                self._it = iter(loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.pos["epoch"] += 1
                self.pos["batches_in_epoch"] = 0
                continue
            self.pos["batches_in_epoch"] += 1
            return batch


def check_same_draws(accelerator, drawn: Sequence[int], names: Sequence[str], step: int) -> None:
    """Every process must train the task that the others train: the schedule is a pure function of (seed, step),
    but a process that drew another task (another seed, a stale resume) would have its gradients averaged into the
    other tasks' shared parts with no error. ``drawn``: the task indices of the steps up to ``step`` since the last
    check; compared across the processes (a collective: call it on every process at the same steps)."""
    if accelerator.num_processes == 1 or not drawn:
        return
    local = torch.tensor(list(drawn), dtype=torch.long, device=accelerator.device)
    every = accelerator.gather(local).view(accelerator.num_processes, len(drawn)).cpu()
    differ = (every != every[0]).any(dim=0)
    if bool(differ.any()):
        first = int(differ.nonzero()[0])
        drew = ", ".join(f"process {r}: {names[int(i)]!r}" for r, i in enumerate(every[:, first].tolist()))
        raise RuntimeError(f"the processes trained different tasks at step {step - len(drawn) + 1 + first} ({drew}); "
                           "every process must draw the same task (same joint seed and schedule, resumed from the "
                           "same checkpoint)")


class _Routed:
    """The model as ``collect_predictions`` calls it, with every batch routed to one task."""

    def __init__(self, model, task: str) -> None:
        self.model, self.task = model, task

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, batch: dict[str, Any]) -> Output:
        return self.model({**batch, "task": self.task})


def _check_resume(jcfg: JointConfig, cfgs: dict[str, Config], run_dir: Path, ckpt: Path) -> None:
    """Refuse to resume with a joint config or a task config that differs from the run's in anything but the
    run's length."""
    import yaml

    from allspark.training import _flatten

    def diff(old: dict, new: dict, may_change: Sequence[str]) -> list[str]:
        a = _flatten(yaml.safe_load(yaml.safe_dump(old, sort_keys=False)))
        b = _flatten(yaml.safe_load(yaml.safe_dump(new, sort_keys=False)))
        return [f"{k} ({a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r})" for k in sorted(set(a) | set(b))
                if k not in may_change and a.get(k, "(absent)") != b.get(k, "(absent)")]

    saved = run_dir / JOINT_CONFIG_NAME
    if not saved.is_file():
        raise UserFileNotFoundError(f"--resume: {run_dir} holds no {JOINT_CONFIG_NAME}; it is not a joint run folder")
    differ = diff(to_dict(from_dict(JointConfig, yaml.safe_load(saved.read_text()) or {})), to_dict(jcfg),
                  _RESUME_MAY_CHANGE)
    for name, cfg in cfgs.items():
        path = run_dir / TASKS_DIR / name / CONFIG_NAME
        if not path.is_file():
            differ.append(f"task {name} (not in the run)")
            continue
        differ += [f"{name}:{d}" for d in diff(to_dict(config_from_yaml_text(path.read_text())), to_dict(cfg),
                                                ("train.epochs",))]
    if differ:
        raise UserError(f"--resume: the config differs from the one {ckpt} was trained with in {len(differ)} key(s): "
                        f"{', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''}; only "
                        f"{' and '.join(_RESUME_MAY_CHANGE)} may change on resume")


def _held_tasks(jcfg: JointConfig, cfgs: dict[str, Config]
                ) -> tuple[Path | None, dict[str, Config], dict[str, dict[str, Any]]]:
    """``init_from``: the checkpoint folder and the configs and data infos of the tasks it holds, checked: none of
    them is a task of this run, and its LLM is this run's (one LLM is shared)."""
    if not jcfg.init_from:
        return None, {}, {}
    start = Path(jcfg.init_from).expanduser()
    single = (start / WEIGHTS_NAME).is_file() or (start / BEST_DIR / WEIGHTS_NAME).is_file()
    if single and not is_joint_checkpoint(start):
        raise UserError(f"init_from {start}: a single-task checkpoint; a joint run extends a joint one (a joint run "
                        "folder or its best/, with tasks/<name>/config.yaml); to start one task from a single-task "
                        "checkpoint, train it alone with --init-from")
    start = resolve_joint_checkpoint(start)
    held_cfgs, held_infos = read_task_folders(start)
    again = sorted(set(held_cfgs) & set(cfgs))
    if again:
        raise ConfigError(f"init_from {start}: it holds task(s) {again} already; a run that extends a checkpoint "
                          f"trains new tasks only (its tasks: {sorted(held_cfgs)})")
    try:
        _check_same_llm({**held_cfgs, **cfgs})
    except ConfigError as exc:
        raise ConfigError(f"init_from {start}: its LLM is not this run's: {exc}") from None
    return start, held_cfgs, held_infos


def _bridge_settings(jcfg: JointConfig, start: Path | None) -> tuple[bool, int | None]:
    """(shared, width) of the run's bridge: the joint config's ``model.bridge``; with ``init_from`` the held
    checkpoint's, which the config may repeat but not contradict (its tasks keep the bridge they were trained on)."""
    want = jcfg.model.bridge
    if start is None:
        _check_width_needs_shared(bool(want.shared), want.width)
        return bool(want.shared), want.width
    held = read_shared_settings(start)["bridge"]
    if want.shared is not None and want.shared != held["shared"]:
        has = "one shared bridge" if held["shared"] else "a bridge each"
        raise ConfigError(f"init_from {start}: its tasks have {has} (model.bridge.shared: "
                          f"{str(held['shared']).lower()}), this config asks for "
                          f"model.bridge.shared: {str(want.shared).lower()}; a run that extends a checkpoint keeps its "
                          "bridge (leave model.bridge.shared unset)")
    if want.width is not None and want.width != held["width"]:
        raise ConfigError(f"init_from {start}: its shared bridge has width {held['width']}, this config asks for "
                          f"model.bridge.width={want.width}; leave it unset (new tasks project their encoders to "
                          "the held width)")
    return held["shared"], held["width"]


def _start_from(model: MultiTaskAllSpark, path: str) -> None:
    """``start_from``: every task's and the shared weights from a joint checkpoint (all of this run's tasks, no
    other)."""
    start = Path(path).expanduser()
    if not is_joint_checkpoint(start):
        raise UserError(f"start_from {start}: not a joint checkpoint (a joint run folder or its best/, with "
                        "joint.yaml and tasks/<name>/config.yaml)")
    start = resolve_joint_checkpoint(start)
    report = model.load_trainable_state_dict(load_file(str(start / WEIGHTS_NAME)), strict=False)
    if report.missing_tasks or report.unexpected_tasks:
        raise ConfigError(f"start_from {start}: it must hold exactly this run's tasks {model.task_names}; it lacks "
                          f"{report.missing_tasks} and holds {report.unexpected_tasks} besides")
    logger.info("start_from %s: %d tensors loaded, every task trains from them", start, report.loaded)


def train_joint_stages(jcfg: JointConfig, output_dir: str | Path, *, resume: str | Path | bool | None = None,
                       step_callback: Callable[[JointState], None] | None = None) -> dict[str, Any]:
    """``joint.train.stages`` in order (for example the whole model first, then the heads alone with
    ``joint.train.train_only``): stage ``i`` is ``jcfg`` with the stage's overrides, trained by :func:`train_joint`
    into ``output_dir/stage<i>-<name>``, each stage after the first starting from the previous one's ``best/``.
    Then the last stage's ``best/`` is copied to ``output_dir/best`` and ``output_dir/metrics.json`` holds the last
    stage's metrics with every stage's under ``stages``. ``resume``: finished stages (with a ``metrics.json``) are
    skipped and the unfinished one continues from its newest checkpoint."""
    import copy
    import shutil

    from accelerate import PartialState

    from allspark.evaluation import write_metrics
    from allspark.steploop import find_latest_checkpoint

    output_dir = Path(output_dir)
    if resume not in (None, True, False) and Path(resume).resolve() != output_dir.resolve():
        raise UserError(f"--resume {resume}: a joint run with train.stages resumes as a whole: give --resume without "
                        f"a path (or the run folder {output_dir})")
    base = asdict(jcfg)
    base["train"]["stages"] = []
    stages = []
    for i, stage in enumerate(jcfg.train.stages):  # every stage checked before the first trains
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or set(stage) - {"name", "overrides"}:
            raise ConfigError(f"joint.train.stages[{i}] must be {{name: str, overrides: {{key: value}}}}, got "
                              f"{stage!r}")
        overrides = stage.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"joint.train.stages[{i}] ({stage['name']}): overrides must be a mapping of keys "
                              f"(joint.key, TASK:key, key) to values, got {overrides!r}")
        if any(k in ("joint.train.stages", "joint.start_from") for k in overrides):
            raise ConfigError(f"joint.train.stages[{i}] ({stage['name']}) cannot set train.stages or start_from")
        strings = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
        stages.append((stage["name"], _with_overrides(copy.deepcopy(base), strings)))
    results: dict[str, Any] = {}
    previous: Path | None = None
    metrics: dict[str, Any] = {}
    for i, (name, stage_cfg) in enumerate(stages):
        if previous is not None:  # (an init_from stays: its tasks stay held, their weights as the checkpoint's)
            stage_cfg.start_from = str(previous)
        stage_dir = output_dir / f"stage{i + 1}-{name}"
        if resume and (stage_dir / "metrics.json").is_file():
            metrics = json.loads((stage_dir / "metrics.json").read_text())
        else:
            stage_resume = True if resume and find_latest_checkpoint(stage_dir) is not None else None
            logger.info("joint training stage %d/%d: %s", i + 1, len(stages), name)
            metrics = train_joint(stage_cfg, stage_dir, resume=stage_resume, step_callback=step_callback)
        results[name] = metrics
        previous = stage_dir / BEST_DIR
    final = {**metrics, "stages": results}
    if PartialState().is_main_process:
        atomic_write_text(output_dir / JOINT_CONFIG_NAME, _yaml(jcfg))
        with atomic_dir(output_dir / BEST_DIR) as tmp:
            for f in previous.iterdir():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_metrics(output_dir / "metrics.json", final)
    PartialState().wait_for_everyone()
    return final


def train_joint(jcfg: JointConfig, output_dir: str | Path, *, resume: str | Path | bool | None = None,
                step_callback: Callable[[JointState], None] | None = None) -> dict[str, Any]:
    """Train one model over ``jcfg``'s tasks into ``output_dir``; returns the test metrics of the best joint
    weights, nested by task (``{"tasks": {name: metrics}, "aggregate": ...}``, also in ``metrics.json``).

    Writes ``joint.yaml`` and ``tasks/<name>/config.yaml`` (resolved), ``log.jsonl`` (train records carry the
    task drawn and per-task running losses ``train/<task>/loss``; validation records ``val/<task>/<metric>`` and
    ``val/aggregate``), ``checkpoints/step-N`` (accelerate state + ``trainer_state.json``), ``best/``
    (:meth:`MultiTaskAllSpark.save_pretrained`, with its model card ``README.md``: a section per task) and
    ``metrics.json``. ``resume``: True (the newest checkpoint in
    ``output_dir``) or a checkpoint folder. ``step_callback`` runs on every process after each optimizer step."""
    from transformers import get_cosine_schedule_with_warmup

    from allspark.baselines import baseline_metrics
    from allspark.data import loader_options
    from allspark.distributed import make_accelerator
    from allspark.evaluation import write_metrics
    from allspark.precision import run_precision
    from allspark.run import Run
    from allspark.steploop import StepLoop, attention_kernel, find_latest_checkpoint
    from allspark.training import _flat_config, build_optimizer, ddp_handlers, trackers
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    if jcfg.train.stages:
        return train_joint_stages(jcfg, output_dir, resume=resume, step_callback=step_callback)
    output_dir = Path(output_dir)
    tcfg = jcfg.train
    specs = {s.name: s for s in jcfg.task_specs()}
    cfgs = resolve_task_configs(jcfg)
    names = list(cfgs)
    start, held_cfgs, held_infos = _held_tasks(jcfg, cfgs)
    shared_bridge, bridge_width = _bridge_settings(jcfg, start)
    TaskSchedule(names, [1] * len(names), jcfg.schedule.type, jcfg.schedule.temperature)  # a bad schedule fails now
    attention_kernel(tcfg.attention_kernel, torch.device("cpu"))
    if tcfg.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {tcfg.keep_checkpoints}")
    if not 0 <= tcfg.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must lie in [0, 1), got {tcfg.warmup_ratio}")
    accum = tcfg.grad_accum_steps
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"joint.train.grad_accum_steps must be an int >= 1, got {accum!r}")
    # one task per step leaves the other tasks' parts without gradients: DDP must expect unused parameters
    ddp = {"find_unused_parameters": len(names) > 1, **tcfg.ddp_kwargs}
    first = cfgs[names[0]]
    # a step's micro-batches come from one task's endless stream: the end of one of its passes is no step boundary
    accum_plugin = GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False)
    accelerator = make_accelerator(gradient_accumulation_plugin=accum_plugin, mixed_precision=tcfg.mixed_precision,
                                   llm_dtype=first.model.llm.dtype, log_with=trackers(tcfg.log_with),
                                   kwargs_handlers=ddp_handlers(ddp), project_dir=str(output_dir))
    main = accelerator.is_main_process
    resume_ckpt = None
    if resume:
        resume_ckpt = find_latest_checkpoint(output_dir) if resume is True else Path(resume)
        if resume_ckpt is None or not (resume_ckpt / STATE_NAME).is_file():
            where = f"under {output_dir / 'checkpoints'}" if resume is True else f"at {resume}"
            raise UserFileNotFoundError(f"--resume: no training checkpoint {where} (expected a step-N folder "
                                        f"holding {STATE_NAME})")
        run_dir = resume_ckpt.parent.parent if resume_ckpt.parent.name == "checkpoints" else resume_ckpt
        _check_resume(jcfg, cfgs, run_dir, resume_ckpt)

    set_seed(jcfg.seed)  # before the model is built: initial weights depend on the seed only
    runs: dict[str, Run] = {}
    for name, cfg in cfgs.items():
        with _in_task(name):
            runs[name] = Run.load_data(cfg, accelerator=accelerator)
            loader_options(cfg.data)  # a bad data.num_workers / pin_memory / persistent_workers fails before any write
    model = MultiTaskAllSpark({**held_cfgs, **cfgs}, {**held_infos, **{n: r.info for n, r in runs.items()}},
                              loss_weights={n: s.loss_weight for n, s in specs.items()},
                              shared_bridge=shared_bridge, bridge_width=bridge_width)
    if resume_ckpt is None and not jcfg.start_from:  # data-dependent starts (a forecast head's least-squares skip)
        from allspark import training

        init = getattr(training, "init_from_data", None)
        for name in names if init is not None else ():
            init(model.tasks[name], runs[name].datasets["train"], cfgs[name].data.eval_batch_size,  # one pass
                 **{**loader_options(cfgs[name].data, accelerator.device), "persistent_workers": False})
    if start is not None:  # the checkpoint's tasks and the shared parts, held; this config's tasks train
        report = model.load_trainable_state_dict(load_file(str(start / WEIGHTS_NAME)), strict=False)
        if report.missing_tasks != names:
            raise RuntimeError(f"init_from {start}: expected it to lack exactly the new tasks {names}, "
                               f"it lacks {report.missing_tasks}")
        held = model.hold(list(held_cfgs), shared=True)
        logger.info("init_from %s: tasks %s and the shared adapters%s held (%d tensors); training %s", start,
                    list(held_cfgs), " and bridge" if model.bridge is not None else "", len(held), names)
    if jcfg.start_from and resume_ckpt is None:
        _start_from(model, jcfg.start_from)
    if tcfg.train_only:
        held = model.train_only(tcfg.train_only)
        logger.info("train.train_only %s: %d parameter tensors held, %d train", list(tcfg.train_only), len(held),
                    sum(p.requires_grad for p in model.parameters()))
    for name, run in runs.items():
        run.model = model.tasks[name]
        with _in_task(name):
            run.build_evaluator()
    if main:  # written after every check passed: a refused run leaves nothing half-written
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / JOINT_CONFIG_NAME, _yaml(jcfg))
        for name, cfg in cfgs.items():
            (output_dir / TASKS_DIR / name).mkdir(parents=True, exist_ok=True)
            save_config(cfg, output_dir / TASKS_DIR / name / CONFIG_NAME)

    for run in runs.values():  # each task's own batch sizes and data.num_workers, pin_memory, ...
        run.build_loaders(accelerator.device)
    # learning-rate multipliers: the joint ones by joint names, each trained task's own under its prefix
    lr_scale = dict(tcfg.lr_scale)
    for name, cfg in cfgs.items():
        lr_scale.update({f"{TASK_PREFIX}{name}.{pattern}": factor
                         for pattern, factor in (getattr(cfg.train, "lr_scale", None) or {}).items()})
    optimizer = build_optimizer(types.SimpleNamespace(train=dataclasses.replace(tcfg, lr_scale=lr_scale)), model)
    splits = ("train", "val", "test")
    prepared = accelerator.prepare(model, optimizer, *(runs[n].loaders[s] for s in splits for n in names))
    model, optimizer = prepared[0], prepared[1]
    for i, split in enumerate(splits):
        for j, name in enumerate(names):
            runs[name].loaders[split] = prepared[2 + i * len(names) + j]
    unwrapped: MultiTaskAllSpark = accelerator.unwrap_model(model)

    # Lengths in optimizer steps of this process (a step takes grad_accum_steps batches per process).
    steps_per_epoch = {n: math.ceil(len(runs[n].loaders["train"]) / accum) for n in names}
    total_steps = tcfg.steps or sum(cfgs[n].train.epochs * steps_per_epoch[n] for n in names)
    eval_every = tcfg.eval_every_steps or sum(steps_per_epoch.values())
    stop_at = min(total_steps, tcfg.max_steps) if tcfg.max_steps else total_steps
    run_length = jcfg.schedule.type == "run_length"
    schedule = TaskSchedule(names, [cfgs[n].train.epochs * steps_per_epoch[n] if run_length
                                    else len(runs[n].datasets["train"]) for n in names],
                            jcfg.schedule.type, jcfg.schedule.temperature, jcfg.seed)
    # The learning-rate schedule steps once per optimizer step (not accelerate's per-process stepping), so
    # ``steps`` counts optimizer steps whatever the number of processes; it is saved with the checkpoints.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(tcfg.warmup_ratio * total_steps)), total_steps)
    accelerator.register_for_checkpointing(scheduler)
    precision = run_precision(unwrapped._llm, accelerator, tcfg.mixed_precision, first.model.llm.dtype)
    logger.info("joint run over %s: %d optimizer steps (%s schedule, probabilities %s), validation every %d",
                names, total_steps, schedule.kind, [round(p, 4) for p in schedule.probabilities], eval_every)

    # grad_accum_steps batches of the drawn task per optimizer step, the task's loss weight on its loss
    loop = StepLoop(accelerator, model, optimizer, scheduler,
                    JointState(tasks={n: {"epoch": 0, "batches_in_epoch": 0, "steps": 0} for n in names}), output_dir,
                    max_grad_norm=tcfg.max_grad_norm, attention_kernel=tcfg.attention_kernel,
                    keep_checkpoints=tcfg.keep_checkpoints, accumulate=accum > 1, total=stop_at,
                    desc=f"train {','.join(names)}", step_callback=step_callback)
    if resume_ckpt is not None:
        state = loop.resume(resume_ckpt, JointState)
        logger.info("resumed from %s at step %d (%s)", resume_ckpt, state.global_step, state.tasks)
    state = loop.state
    streams = {n: _TaskStream(n, runs[n].loaders["train"], accelerator, state.tasks[n]) for n in names}
    loop.start_trackers(jcfg.name, _flat_config(jcfg))

    def evaluate(name: str, split: str) -> dict[str, Any]:
        return loop.evaluate(_Routed(model, name), runs[name].loaders[split], runs[name].evaluator, f"{split} {name}")

    def validate() -> None:
        record: dict[str, Any] = {"step": state.global_step}
        values, greater = {}, {}
        for name in names:
            metrics = evaluate(name, "val")
            key = cfgs[name].train.metric_for_best
            value = metrics.get(key)
            if not isinstance(value, (int, float)):
                raise ConfigError(f"task {name!r}: train.metric_for_best={key!r} is not a metric of "
                                  f"{cfgs[name].eval.protocol!r}; it reports {sorted(metrics)}")
            values[name], greater[name] = float(value), cfgs[name].train.greater_is_better
            record.update({f"val/{name}/{m}": v for m, v in metrics.items() if isinstance(v, (int, float))})
        for name in names:
            state.reference.setdefault(name, values[name])
        score = aggregate_score(values, {n: state.reference[n] for n in names}, greater)
        better = state.best_score is None or score > state.best_score
        if better:
            state.best_score, state.best_step, state.best_metrics = score, state.global_step, dict(values)
            loop.save_best(joint=jcfg)
        record.update({"val/aggregate": score, "best": better})
        loop.record(record, {k: v for k, v in record.items() if k.startswith("val/")})
        model.train()

    running: dict[str, list[float]] = {}
    drawn: list[int] = []  # the tasks drawn since the last check, compared across processes at log and eval steps
    t0 = time.perf_counter()
    model.train()
    accelerator.step = 0  # accumulation boundaries: every grad_accum_steps updates, from here (a resume too)
    with loop.running():
        while state.global_step < stop_at:
            drawn.append(schedule.index(state.global_step))
            task = names[drawn[-1]]
            for _ in range(accum):  # the last of them synchronises: clipping, optimizer and schedule step
                batch = streams[task].next()
                out = loop.update({**batch, "task": task}, loss_weight=unwrapped.loss_weights[task], task=task)
                running.setdefault(task, []).append(out.loss.detach().float().item())
            loop.count_step()
            state.tasks[task]["steps"] += 1
            at_log = loop.due(tcfg.log_every_steps)
            at_eval = loop.due(eval_every) or state.global_step == stop_at
            if at_log or at_eval:
                check_same_draws(accelerator, drawn, names, state.global_step)
                drawn.clear()
            if at_log:
                # every process drew the same tasks, so the per-task means reduce across processes
                means = {n: loop.mean(sum(v) / len(v)) for n, v in sorted(running.items())}
                record = {"step": state.global_step, "task": task, "loss": means[task],
                          "lr": scheduler.get_last_lr()[0],
                          **{f"train/{n}/loss": v for n, v in means.items()},
                          "seconds": round(time.perf_counter() - t0, 2)}
                loop.record(record, {k: v for k, v in record.items() if k.startswith("train/")})
                running.clear()
            loop.boundary()
            if at_eval:
                validate()
            if at_eval or loop.due(tcfg.save_every_steps):
                loop.save_checkpoint()
        if state.best_step is None:  # resumed from the run's last checkpoint: nothing left to train
            validate()

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {
        "split": "test" if tcfg.test_at_end else None, "tasks": {},
        "aggregate": {"name": "mean relative improvement of each task's metric_for_best over its first validation",
                      "best_step": state.best_step, "val": state.best_score, "val_per_task": state.best_metrics},
        "steps": state.global_step, "steps_per_task": {n: state.tasks[n]["steps"] for n in names},
        "num_processes": accelerator.num_processes, "precision": precision,
    }
    if tcfg.test_at_end:
        loop.load_best()
        for name in names:
            run = runs[name]
            metrics = {"metric_for_best": cfgs[name].train.metric_for_best,
                       f"val/{cfgs[name].train.metric_for_best}": state.best_metrics.get(name),
                       **evaluate(name, "test")}
            if main:
                metrics.update(baseline_metrics(run.cfg, run.evaluator, run.baselines, run.datasets["train"],
                                                run.datasets["test"], unwrapped.tasks[name]))
            result["tasks"][name] = metrics
    if main:
        write_metrics(output_dir / "metrics.json", result)
        from allspark.model_card import write_joint_model_card

        write_joint_model_card(output_dir / BEST_DIR, unwrapped.cfgs, {n: p.info for n, p in unwrapped.tasks.items()},
                               result, bridge_width=unwrapped.bridge_width,
                               widths={n: [e.out_dim for e in p.encoders] for n, p in unwrapped.tasks.items()},
                               num_trainable=unwrapped.num_trained_parameters())
        if tcfg.test_at_end:
            loop.log.write({f"test/{n}/{k}": v for n, m in result["tasks"].items() for k, v in m.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------------
# evaluation


def evaluate_joint(checkpoint: str | Path, *, tasks: Sequence[str] | None = None, data_root: str | None = None,
                   output_dir: str | Path | None = None, split: str = "test", mixed_precision: str = "auto"
                   ) -> dict[str, Any]:
    """``evaluate.py --checkpoint DIR`` of a joint checkpoint: every task's protocol (or those in ``tasks``) on
    ``split``, with its baselines; writes ``OUT/metrics.json`` nested by task (``{"tasks": {name: metrics}}``),
    ``OUT/<task>/report.md`` with the task's figures, and ``OUT/report.md`` with a section per task."""
    from allspark.baselines import baseline_metrics
    from allspark.data import loader_options
    from allspark.distributed import make_accelerator
    from allspark.evaluation import baseline_table, collect_predictions, write_metrics
    from allspark.precision import run_precision
    from allspark.run import build_run

    checkpoint = Path(checkpoint)
    ckpt = resolve_joint_checkpoint(checkpoint)
    model = MultiTaskAllSpark.from_pretrained(ckpt, tasks=tasks)
    names = model.task_names
    if data_root not in (None, "demo") and len(names) > 1:
        raise ConfigError(f"--data-root {data_root}: {len(names)} tasks have one dataset folder each; evaluate one "
                          "task (--modality NAME) with its folder, or use --data-root demo")
    first = next(iter(model.cfgs.values()))
    accelerator = make_accelerator(mixed_precision=mixed_precision, llm_dtype=first.model.llm.dtype)
    precision = run_precision(model._llm, accelerator, mixed_precision, first.model.llm.dtype)
    out_dir = Path(output_dir) if output_dir is not None else checkpoint / "eval"
    prepared = accelerator.prepare(model)
    result: dict[str, Any] = {"split": split, "checkpoint": str(ckpt), "num_processes": accelerator.num_processes,
                              "precision": precision, "tasks": {}}
    lines = [f"# AllSpark joint evaluation ({split})", "", f"Checkpoint `{ckpt}`, tasks {', '.join(names)}."]
    for name in names:
        part = model.tasks[name]
        cfg = part.cfg
        if data_root is not None:
            cfg = from_dict(Config, apply_overrides(to_dict(cfg), {"data.root": data_root}))
        with _in_task(name):
            run = build_run(cfg, splits=(split,), accelerator=accelerator, info=part.info, model=part, loaders="eval")
        dataset, evaluator, baselines = run.datasets[split], run.evaluator, run.baselines
        routed = _Routed(prepared, name)
        loading = loader_options(cfg.data, accelerator.device)  # the task's data.num_workers, pin_memory, ...
        loader = accelerator.prepare(run.loaders[split])
        gathered = {split: collect_predictions(routed, loader, accelerator, evaluator.pred_keys, evaluator.batch_keys,
                                               f"{split} {name}")}
        metrics = {"split": split, **evaluator.compute(gathered[split])}
        for extra in evaluator.extra_splits:
            gathered[extra], stats = evaluator.predict_extra(extra, routed, run.dataset(extra),
                                                             accelerator, cfg.data.eval_batch_size, **loading)
            metrics.update(stats)
        metrics.update(evaluator.model_metrics(part, dataset, accelerator))
        if accelerator.is_main_process:
            train_set = run.dataset("train") if baselines else None
            metrics.update(baseline_metrics(cfg, evaluator, baselines, train_set, dataset, part))
            extras = {k: v for k, v in gathered.items() if k != split}
            evaluator.report(gathered[split], metrics, extras, out_dir / name, f"AllSpark evaluation: {name} ({split})")
            scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            lines += ["", f"## {name}", "", f"Protocol `{cfg.eval.protocol}`; figures and details in "
                      f"[{name}/report.md]({name}/report.md).", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars]
            lines += baseline_table(metrics)
        result["tasks"][name] = metrics
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(out_dir / "metrics.json", result)
        atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    accelerator.wait_for_everyone()
    return result
