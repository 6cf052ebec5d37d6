"""The training loop behind ``train.py``, on Hugging Face ``accelerate``.

One code path for one CPU, one GPU or many processes: AdamW over the trainable parameters only, cosine
schedule with warm-up, gradient accumulation via ``accelerator.accumulate``, mixed precision, resumable
checkpoints (``save_state``/``load_state``; a resumed run skips the batches it has already seen and ends
with the same weights as an uninterrupted one), ``best/`` chosen on the validation metric, and
``metrics.json`` with the test-split metrics of the best weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from allspark.baselines import baseline_metrics, build_baselines
from allspark.checkpoints import BEST_DIR, STATE_NAME, WEIGHTS_NAME, resolve_checkpoint
from allspark.config import Config, ConfigError, save_config, to_dict
from allspark.data import EpochSampler, build_dataset, build_loader, loader_options, resolve_data_root
from allspark.distributed import make_accelerator
from allspark.errors import MissingPackageError
from allspark.evaluation import build_evaluator, collect_predictions, write_metrics
from allspark.llm import check_quantization
from allspark.io import atomic_write_text
from allspark.model import AllSpark
from allspark.precision import run_precision

logger = logging.getLogger(__name__)

__all__ = ["TrainerState", "train", "train_stages", "find_latest_checkpoint", "build_optimizer", "warmup_steps"]


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch in progress (or the next to run)
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: float | None = None


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Lion) over trainable parameters only; no weight decay on biases and norms; learning-rate
    multipliers by parameter name from ``train.lr_scale`` (one group per factor; the scheduler scales each
    group's own rate)."""
    import fnmatch

    scales = dict(cfg.train.lr_scale or {})
    for pattern, factor in scales.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"train.lr_scale[{pattern!r}] must be a number > 0, got {factor!r}")
    used: set[str] = set()
    # the two groups at the base rate come first, always (an optimizer state saved without lr_scale loads)
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        factor = 1.0
        for pattern, f in scales.items():
            if fnmatch.fnmatchcase(_clean_name(name), pattern):
                factor = float(f)
                used.add(pattern)
                break
        buckets.setdefault((factor, p.dim() >= 2), []).append(p)
    if not any(buckets.values()):
        raise ValueError("the model has no trainable parameters")
    unused = [pat for pat in scales if pat not in used]
    if unused:
        names = [_clean_name(n) for n, p in model.named_parameters() if p.requires_grad][:6]
        raise ConfigError(f"train.lr_scale pattern(s) {unused} match no trainable parameter; they are named like "
                          f"{names}")
    groups = [{"params": params, "weight_decay": cfg.train.weight_decay if decays else 0.0,
               "lr": cfg.train.lr * factor}
              for (factor, decays), params in buckets.items()]
    name = cfg.train.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    if name == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError as exc:
            raise MissingPackageError("train.optimizer=lion needs the lion-pytorch package: pip install lion-pytorch") from exc
        return Lion(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    raise ConfigError(f"train.optimizer must be 'adamw' or 'lion', got {cfg.train.optimizer!r}")


def init_from_data(model: torch.nn.Module, train_set, batch_size: int, **loading: Any) -> None:
    """Data-dependent initialisation: every submodule with an ``init_from_data(batches)`` method (e.g. the
    regression head's least-squares skip) sees the training split once, in order, before the first step of a
    fresh run (a resumed run loads its weights instead). Every process reads the whole split, so all start
    alike; the global RNG (which augmentations draw from) is left as it was. ``loading``: the DataLoader worker
    settings (:func:`allspark.data.build_loader`)."""
    for name, module in model.named_modules():
        if module is model or not callable(getattr(module, "init_from_data", None)):
            continue
        with torch.random.fork_rng(devices=[]):
            summary = module.init_from_data(iter(build_loader(train_set, batch_size, **loading)))
        if summary:
            logger.info("%s initialised from the training split: %s", name, summary)


def warmup_steps(tcfg, steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps of linear warm-up: ``train.warmup_ratio`` x the run's steps when set, else
    ``train.warmup_epochs`` x the steps of an epoch; a warm-up as long as the run is warned about."""
    if tcfg.warmup_ratio is not None:
        if not 0 <= tcfg.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must lie in [0, 1), got {tcfg.warmup_ratio}")
        steps = int(round(tcfg.warmup_ratio * total_steps))
    else:
        steps = int(round(tcfg.warmup_epochs * steps_per_epoch))
    if steps >= total_steps > 1:
        logger.warning("the warm-up (%d steps) spans the whole run (%d steps): the learning rate never reaches "
                       "train.lr; set train.warmup_ratio (a share of the run) or fewer warmup_epochs", steps, total_steps)
    return steps


#: path parts that wrappers (FSDP, activation checkpointing, torch.compile) put into parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _weights_file(index: int) -> str:
    """accelerate's name for the weights of its ``index``-th model: model.safetensors, model_1.safetensors, ..."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def gather_trainable_state(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable state (the names of ``AllSpark.trainable_state_dict``) of a prepared ``model``, on the CPU.

    Call it on every process: under FSDP or DeepSpeed ZeRO-3 ``accelerator.get_state_dict`` gathers the shards,
    a collective. The main process gets every trainable tensor; under FSDP the others get an empty dict.
    """
    names = {_clean_name(k) for k in accelerator.unwrap_model(model).trainable_state_dict()}
    state = {}
    for key, value in accelerator.get_state_dict(model).items():
        key = _clean_name(key)
        if key in names:
            state[key] = value.detach().contiguous().cpu()
    if accelerator.is_main_process and set(state) != names:
        missing = sorted(names - set(state))
        raise RuntimeError(f"the gathered model state lacks {len(missing)} trainable tensors, e.g. {missing[:4]}")
    return state


def checkpoint_hooks(accelerator) -> tuple[Callable, Callable]:
    """The save-state and load-state pre-hooks: checkpoints hold the trainable parts only, not the frozen LLM.

    Without sharding accelerate hands the save hook one state dict per model in ``weights`` and writes them
    itself (``model.safetensors``); the hook puts the trainable state in their place. Under FSDP or DeepSpeed
    ``weights`` is empty (accelerate has written its own sharded files): the hook gathers the trainable state
    (on every process) and the main process writes it as ``model.safetensors``, the file the load hook reads.
    The load hook loads that file into each model accelerate hands it and takes the model off the list; under
    FSDP or DeepSpeed the list is empty, as accelerate has loaded the models from its own files.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if len(weights) == len(models):
            for i, m in enumerate(models):
                weights[i] = accelerator.unwrap_model(m).trainable_state_dict()
            return
        if weights:
            raise RuntimeError(f"accelerate handed the save hook {len(weights)} state dicts for {len(models)} models")
        for i, m in enumerate(models):
            state = gather_trainable_state(accelerator, m)
            if accelerator.is_main_process:
                save_file(state, str(Path(output_dir) / _weights_file(i)), metadata={"format": "pt"})

    def load_hook(models: list, input_dir: str) -> None:
        for i, m in enumerate(list(models)):
            path = Path(input_dir) / _weights_file(i)
            if not path.is_file():
                raise FileNotFoundError(f"{input_dir} is not a training checkpoint: {path.name} is missing")
            accelerator.unwrap_model(m).load_trainable_state_dict(load_file(str(path)))
            models.remove(m)

    return save_hook, load_hook


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    ckpt_root = output_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    found = []
    for d in ckpt_root.iterdir():
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / STATE_NAME).is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


class _JsonlLog:
    """``log.jsonl``: one JSON record a line (train records and validation records carry ``step``; the test
    record at the end of a run does not). Written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def truncate(self, step: int, *, revalidates: bool = False) -> int:
        """Before a resume from the checkpoint of optimizer step ``step``: drop what the resumed run writes again,
        so every step is logged once: the records of later steps, the test record of an earlier end of the run,
        a torn line (a kill mid-write), and with ``revalidates`` (the checkpoint was taken before the validation
        that closes its epoch, which the resumed run repeats) the validation records of ``step`` itself. The
        file is replaced atomically. Returns the number of records dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            rstep = record.get("step") if isinstance(record, dict) else None
            if not isinstance(rstep, (int, float)) or rstep > step or (
                    revalidates and rstep == step and any(k.startswith("val/") for k in record)):
                dropped += 1
                continue
            kept.append(line + "\n")
        if dropped:
            atomic_write_text(self.path, "".join(kept))
            logger.info("%s: dropped %d record(s) after step %d, which the resumed run writes again", self.path,
                        dropped, step)
        return dropped


#: what a resumed run may change: the schedule's length
_RESUME_MAY_CHANGE = ("train.epochs", "train.max_steps")
#: and how the data is loaded (a resume on another machine; a run from before these keys had ``num_workers: 0``)
_RESUME_MAY_LOAD_DIFFERENTLY = ("data.num_workers", "data.pin_memory", "data.persistent_workers")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data:
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: data}


_ABSENT = object()  # a key one of two configs lacks


def _short(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_resume_config(cfg: Config, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with a config that differs from its run's ``config.yaml`` in anything but the
    schedule's length (``train.epochs``, ``train.max_steps``)."""
    import yaml

    from allspark.config import ConfigError, from_dict, to_dict
    from allspark.errors import UserError

    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        logger.warning("--resume: %s has no config.yaml, so the config cannot be checked against the one %s was "
                       "trained with", run_dir, ckpt)
        return
    try:
        saved = to_dict(from_dict(Config, yaml.safe_load(saved_path.read_text()) or {}))
    except (ConfigError, yaml.YAMLError) as exc:
        raise UserError(f"--resume: the config of the checkpoint's run, {saved_path}, does not load: {exc}") from exc
    old = _flatten(yaml.safe_load(yaml.safe_dump(saved, sort_keys=False)))
    new = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    differ = [k for k in sorted(set(old) | set(new), key=lambda k: (k not in old, k))
              if k not in (*_RESUME_MAY_CHANGE, *_RESUME_MAY_LOAD_DIFFERENTLY)
              and old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    if differ:
        shown = ", ".join(f"{k} ({_short(old.get(k, _ABSENT))} -> {_short(new.get(k, _ABSENT))})" for k in differ[:12])
        more = f" and {len(differ) - 12} more" if len(differ) > 12 else ""
        raise UserError(
            f"--resume: the config differs from the one {ckpt} was trained with ({saved_path}) in "
            f"{len(differ)} key(s): {shown}{more}; only {' and '.join(_RESUME_MAY_CHANGE)} may change on resume "
            f"(and the data loading, {', '.join(_RESUME_MAY_LOAD_DIFFERENTLY)}). "
            "Resume with the run's config, or start a new run in another --output-dir"
        )


def _find_resume_checkpoint(cfg: Config, output_dir: Path, resume: str | Path | bool) -> Path:
    """The checkpoint ``--resume`` names (True: the newest under ``output_dir``), checked to be a training
    checkpoint whose run was trained with this config (see ``_check_resume_config``)."""
    from allspark.errors import UserFileNotFoundError

    ckpt = find_latest_checkpoint(output_dir) if resume is True else Path(resume)
    if ckpt is None:
        raise UserFileNotFoundError(f"--resume: no checkpoint under {output_dir / 'checkpoints'} (expected "
                                    f"step-N folders holding {STATE_NAME})")
    if not (ckpt / STATE_NAME).is_file():
        raise UserFileNotFoundError(f"--resume: {ckpt} is not a training checkpoint ({STATE_NAME} missing)")
    _check_resume_config(cfg, ckpt)
    return ckpt


class _InterruptNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, mid-step, so without a checkpoint (the newest one stays the resume point)."""


class _StepBoundaryInterrupt:
    """Ctrl-C (SIGINT) in the training loop stops the run at the next optimizer-step boundary: the handler notes
    it and ``requested`` (checked after each step, on every process) turns it into a ``KeyboardInterrupt``
    there, where the weights, optimizer, scheduler, RNG and counters form a state that resumes exactly. Raised
    at once, mid-step, the interrupt would leave the RNG (random prompts, dropout) or a half-done update ahead
    of the saved counters. A second Ctrl-C stops at once. Installed only over Python's default handler, in the
    main thread."""

    def __init__(self) -> None:
        self.pending = False
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise _InterruptNow
        self.pending = True
        logger.warning("interrupted: stopping after this optimizer step to save a checkpoint (Ctrl-C again to "
                       "stop at once, without one)")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def requested(self, accelerator) -> bool:
        """Whether any process was interrupted (a collective when there are several, so all stop together)."""
        if accelerator.num_processes == 1:
            return self.pending
        flag = torch.tensor(float(self.pending), device=accelerator.device)
        return accelerator.reduce(flag, "max").item() > 0


#: accelerate tracker name -> the package that provides it (pip name)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def trackers(setting: Any) -> list[str]:
    """``train.log_with`` -> the accelerate tracker names to log to. ``auto``: tensorboard when it is installed
    (else none); ``none`` (or an empty list): none; a name or a list of names: each must be a known tracker whose
    package is installed (else one clear error naming the package)."""
    import accelerate.utils as accelerate_utils

    if setting == "auto":
        return ["tensorboard"] if accelerate_utils.is_tensorboard_available() else []
    if setting in ("none", None, False):
        return []
    names = [setting] if isinstance(setting, str) else setting
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"train.log_with must be 'auto', 'none', a tracker name or a list of them, got {setting!r}")
    out = []
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; known: auto, none, "
                              f"{', '.join(TRACKER_PACKAGES)}")
        if not getattr(accelerate_utils, f"is_{name}_available")():
            from allspark.errors import MissingPackageError

            raise MissingPackageError(f"train.log_with names {name!r}, whose package is not installed: run "
                                      f"`pip install {TRACKER_PACKAGES[name]}` (or set train.log_with=none)")
        out.append(name)
    return out


ATTENTION_KERNELS = ("auto", "default", "math", "flash", "efficient", "cudnn")


def attention_kernel(setting: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``train.attention_kernel`` -> a context for the training forward that picks torch's SDPA kernel (the
    backward follows the forward's kernel). ``auto``: the math kernel on CPU, where the flash kernel's backward is
    slow for the short sequences here; torch's own choice elsewhere."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if setting not in ATTENTION_KERNELS:
        raise ConfigError(f"train.attention_kernel must be one of {list(ATTENTION_KERNELS)}, got {setting!r}")
    if setting == "auto":
        setting = "math" if device.type == "cpu" else "default"
    if setting == "default":
        return contextlib.nullcontext()
    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[setting]
    return sdpa_kernel([backend])


def ddp_handlers(ddp_kwargs: dict[str, Any]) -> list[Any]:
    """``train.ddp_kwargs`` -> accelerate's ``kwargs_handlers`` (a ``DistributedDataParallelKwargs``); an unknown
    key is a config error listing the known ones."""
    import dataclasses

    from accelerate.utils import DistributedDataParallelKwargs

    if not ddp_kwargs:
        return []
    known = [f.name for f in dataclasses.fields(DistributedDataParallelKwargs)]
    unknown = sorted(set(ddp_kwargs) - set(known))
    if unknown:
        raise ConfigError(f"train.ddp_kwargs: unknown key(s) {unknown}; DistributedDataParallel takes {known}")
    return [DistributedDataParallelKwargs(**ddp_kwargs)]


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat ``dotted.key: value`` scalars (lists and dicts as JSON text), the form
    trackers' hyper-parameter tables take."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple, dict)):
            flat[prefix] = json.dumps(node, default=str)
        elif node is None or isinstance(node, (bool, int, float, str)):
            flat[prefix] = "None" if node is None else node
        else:
            flat[prefix] = str(node)

    walk("", to_dict(cfg))
    return flat


def train(
    cfg: Config,
    output_dir: str | Path,
    *,
    resume: str | Path | bool | None = None,
    step_callback: Callable[[TrainerState], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; returns the test metrics of the best checkpoint.

    ``resume``: True picks the newest checkpoint in ``output_dir/checkpoints``; a path names one.
    ``step_callback`` is called on every process after each optimizer step (used by tests).
    """
    output_dir = Path(output_dir)
    if cfg.train.stages:
        return train_stages(cfg, output_dir, resume=resume, step_callback=step_callback)
    tcfg = cfg.train
    attention_kernel(tcfg.attention_kernel, torch.device("cpu"))  # an unknown name fails before any work
    loader_options(cfg.data)  # so does a bad data.num_workers / pin_memory / persistent_workers
    check_quantization(cfg.model.llm)  # and a model.llm.quantization this machine cannot run
    if tcfg.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1 (the newest checkpoint is the resume point), "
                          f"got {tcfg.keep_checkpoints}")
    accelerator = make_accelerator(
        gradient_accumulation_steps=tcfg.grad_accum_steps,
        mixed_precision=tcfg.mixed_precision,
        llm_dtype=cfg.model.llm.dtype,
        log_with=trackers(tcfg.log_with),
        kwargs_handlers=ddp_handlers(tcfg.ddp_kwargs),
        project_dir=str(output_dir),
    )
    main = accelerator.is_main_process
    # the resume checks read the run's config.yaml: before it is rewritten below
    resume_ckpt = _find_resume_checkpoint(cfg, output_dir, resume) if resume else None
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    set_seed(cfg.seed)  # before the model is built, so initial weights depend on the seed only

    with accelerator.main_process_first():
        root = resolve_data_root(cfg)
    train_set = build_dataset(cfg, "train", root)
    val_set = build_dataset(cfg, "val", root)
    test_set = build_dataset(cfg, "test", root)
    info = train_set.info()
    model = AllSpark(cfg, info)
    if resume_ckpt is None:
        init_from_data(model, train_set, cfg.data.eval_batch_size,  # one pass: no workers to keep
                       **{**loader_options(cfg.data, accelerator.device), "persistent_workers": False})
    if tcfg.init_from:
        start = resolve_checkpoint(Path(tcfg.init_from).expanduser())
        fresh = model.load_trainable_state_dict(load_file(str(start / WEIGHTS_NAME)), strict=False)
        logger.info("initialised from %s (%d tensors not in it keep their initial values)", start, len(fresh))
    evaluator = build_evaluator(cfg, info)
    baselines = build_baselines(cfg, info, evaluator)  # a bad baseline config fails now, not after training

    sampler = train_set.train_sampler(cfg.data.batch_size, cfg.seed)
    if sampler is None:
        sampler = EpochSampler(len(train_set), seed=cfg.seed)
    loading = loader_options(cfg.data, accelerator.device)  # data.num_workers, pin_memory, persistent_workers
    train_loader = build_loader(train_set, cfg.data.batch_size, sampler=sampler, **loading)
    val_loader = build_loader(val_set, cfg.data.eval_batch_size, **loading)
    test_loader = build_loader(test_set, cfg.data.eval_batch_size, **loading)

    optimizer = build_optimizer(cfg, model)
    # The schedule counts single-process optimizer steps; accelerate's scheduler wrapper steps it once
    # per process, so this stays right under data parallelism.
    steps_per_epoch = math.ceil(len(train_loader) / tcfg.grad_accum_steps)
    total_steps = max(1, tcfg.epochs * steps_per_epoch)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(tcfg, steps_per_epoch, total_steps),
                                                total_steps)
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, scheduler
    )
    unwrapped: AllSpark = accelerator.unwrap_model(model)
    precision = run_precision(unwrapped._llm, accelerator, tcfg.mixed_precision, cfg.model.llm.dtype)
    logger.info("precision: LLM %s, autocast %s (%s)", precision["llm_dtype"], precision["mixed_precision"],
                precision["reason"])

    # Checkpoints hold the trainable parts only, not the frozen LLM (sharded or not: see checkpoint_hooks).
    _save_hook, _load_hook = checkpoint_hooks(accelerator)
    accelerator.register_save_state_pre_hook(_save_hook)
    accelerator.register_load_state_pre_hook(_load_hook)

    state = TrainerState()
    if resume_ckpt is not None:
        ckpt = resume_ckpt
        accelerator.load_state(str(ckpt))
        state = TrainerState(**json.loads((ckpt / STATE_NAME).read_text()))
        logger.info("resumed from %s at epoch %d, batch %d, step %d", ckpt, state.epoch, state.batches_in_epoch,
                    state.global_step)
        # a checkpoint taken on the epoch's last batch precedes that epoch's validation, which the run repeats
        _JsonlLog(output_dir / "log.jsonl", main).truncate(
            state.global_step, revalidates=state.batches_in_epoch >= len(train_loader))

    log = _JsonlLog(output_dir / "log.jsonl", main)
    accelerator.init_trackers(cfg.modality, config=_flat_config(cfg))  # the full resolved config

    def save_checkpoint() -> None:
        ckpt = output_dir / "checkpoints" / f"step-{state.global_step}"
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part before the folder is renamed
        if main:
            atomic_write_text(tmp / STATE_NAME, json.dumps(asdict(state)))
            if ckpt.exists():
                shutil.rmtree(ckpt)
            tmp.rename(ckpt)  # a checkpoint folder appears whole or not at all
            old = sorted(
                (int(m.group(1)), d) for d in ckpt.parent.iterdir()
                if (m := re.fullmatch(r"step-(\d+)", d.name))
            )
            for _, d in old[: max(0, len(old) - tcfg.keep_checkpoints)]:
                shutil.rmtree(d, ignore_errors=True)
            for d in ckpt.parent.iterdir():  # folders of saves a kill interrupted: never a resume point
                if re.fullmatch(r"step-\d+\.tmp", d.name) and d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()

    def evaluate_split(loader, desc) -> dict[str, Any]:
        gathered = collect_predictions(model, loader, accelerator, evaluator.pred_keys, evaluator.batch_keys, desc)
        return evaluator.compute(gathered)

    def validate(epoch_float: float) -> None:
        metrics = evaluate_split(val_loader, "val")
        value = metrics.get(tcfg.metric_for_best)
        if not isinstance(value, (int, float)):
            raise ConfigError(f"train.metric_for_best={tcfg.metric_for_best!r} is not a metric of "
                           f"{cfg.eval.protocol!r}; it reports {sorted(metrics)}")
        better = state.best_metric is None or (
            value > state.best_metric if tcfg.greater_is_better else value < state.best_metric
        )
        if better:
            state.best_metric, state.best_epoch = float(value), round(epoch_float, 3)
            accelerator.wait_for_everyone()
            best = gather_trainable_state(accelerator, model)  # on every process: the gather may be collective
            if main:
                unwrapped.save_pretrained(output_dir / BEST_DIR, state=best)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        log.write({"epoch": round(epoch_float, 3), "step": state.global_step,
                   **{f"val/{k}": v for k, v in scalars.items()}, "best": better})
        accelerator.log({f"val/{k}": v for k, v in scalars.items()}, step=state.global_step)
        model.train()

    stop = False
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc=f"train {cfg.modality}")
    running_loss, running_count, t0 = 0.0, 0, time.perf_counter()
    running_extras: dict[str, list[float]] = {}  # scalar Output.extras (e.g. the alignment term), logged too
    interrupt = _StepBoundaryInterrupt()
    try:
        interrupt.install()
        while state.epoch < tcfg.epochs and not stop:
            epoch = state.epoch
            accelerator.step = 0  # accumulation boundaries restart with each epoch
            loader = train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            # accelerate's loaders pass their own iteration count to the sampler on every pass; set the
            # true epoch so a resumed run (which starts on a fresh skip-loader) sees the same order.
            loader.set_epoch(epoch)
            model.train()
            for batch in loader:
                with accelerator.accumulate(model):
                    with attention_kernel(tcfg.attention_kernel, accelerator.device):
                        out = model(batch)
                    if out.loss is None:
                        raise ValueError("the head returned no loss for a training batch (are labels missing?)")
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and tcfg.max_grad_norm:
                        accelerator.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], tcfg.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                running_loss += out.loss.detach().float().item()
                running_count += 1
                for key, value in out.extras.items():
                    if isinstance(value, torch.Tensor) and value.numel() == 1:
                        running_extras.setdefault(key, []).append(value.detach().float().item())
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                if state.global_step % tcfg.log_every_steps == 0:
                    loss = accelerator.reduce(torch.tensor(running_loss / running_count,
                                                           device=accelerator.device), "mean").item()
                    record = {"step": state.global_step, "epoch": epoch + state.batches_in_epoch / len(train_loader),
                              "loss": loss, "lr": scheduler.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - t0, 2)}
                    extras = {f"train/{k}": accelerator.reduce(torch.tensor(sum(v) / len(v), device=accelerator.device),
                                                               "mean").item()
                              for k, v in sorted(running_extras.items()) if v}
                    record.update(extras)
                    log.write(record)
                    accelerator.log({"train/loss": loss, "train/lr": record["lr"], **extras}, step=state.global_step)
                    progress.set_postfix(loss=f"{loss:.4f}")
                    running_loss, running_count = 0.0, 0
                    running_extras.clear()
                if step_callback is not None:
                    step_callback(state)
                if interrupt.requested(accelerator):
                    raise KeyboardInterrupt
                if tcfg.save_every_steps and state.global_step % tcfg.save_every_steps == 0:
                    save_checkpoint()
                if tcfg.max_steps and state.global_step >= tcfg.max_steps:
                    stop = True
                    break
            if stop and state.batches_in_epoch < len(train_loader):
                validate(epoch + state.batches_in_epoch / len(train_loader))
                save_checkpoint()
                break
            # End of epoch: validate, keep the best, checkpoint for resume.
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if (epoch + 1) % tcfg.eval_every_epochs == 0 or epoch + 1 == tcfg.epochs or stop:
                validate(epoch + 1)
            save_checkpoint()
        if interrupt.requested(accelerator):  # Ctrl-C during the last validation or checkpoint
            raise KeyboardInterrupt
    except _InterruptNow:
        logger.warning("interrupted again: stopping at once; the newest checkpoint is the one to resume from")
        raise
    except KeyboardInterrupt:
        logger.warning("interrupted: saving a checkpoint at step %d to resume from", state.global_step)
        save_checkpoint()
        raise
    finally:
        interrupt.uninstall()
        progress.close()

    accelerator.wait_for_everyone()
    metrics = {"split": "test" if tcfg.test_at_end else None, "best_epoch": state.best_epoch,
               f"val/{tcfg.metric_for_best}": state.best_metric, "num_processes": accelerator.num_processes}
    metrics["precision"] = precision
    if tcfg.test_at_end:  # test-split metrics of the best weights
        unwrapped.load_trainable_state_dict(load_file(str(output_dir / BEST_DIR / WEIGHTS_NAME)))
        metrics.update(evaluate_split(test_loader, "test"))
        if main:  # classical baselines on the same split, fitted on the training split (and probes of the model)
            metrics.update(baseline_metrics(cfg, evaluator, baselines, train_set, test_set, unwrapped))
    if main:
        write_metrics(output_dir / "metrics.json", metrics)
        from allspark.model_card import write_model_card

        write_model_card(output_dir / BEST_DIR, cfg, unwrapped.info, metrics,
                         num_trainable=unwrapped.num_parameters(trainable_only=True))
        if tcfg.test_at_end:
            log.write({"test/" + k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    accelerator.end_training()
    return metrics


def train_stages(
    cfg: Config,
    output_dir: str | Path,
    *,
    resume: str | Path | bool | None = None,
    step_callback: Callable[[TrainerState], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.train.stages`` in order (e.g. CISEN: V2TMap, then HFE with V2TMap held).

    Stage ``i`` is ``cfg`` with the stage's ``overrides`` applied (and ``train.init_from`` set to the previous
    stage's ``best/`` unless the stage sets it), trained into ``output_dir/stage<i>-<name>``. Afterwards the
    last stage's ``best/`` is copied to ``output_dir/best`` and ``output_dir/metrics.json`` holds the last
    stage's test metrics plus every stage's under ``stages``. ``resume``: finished stages (with a
    ``metrics.json``) are skipped and the unfinished one resumes from its newest checkpoint.
    """
    from accelerate import PartialState

    from allspark.config import ConfigError, apply_overrides, from_dict, to_dict
    from allspark.io import atomic_dir

    output_dir = Path(output_dir)
    if resume not in (None, True, False) and Path(resume).resolve() != output_dir.resolve():
        from allspark.errors import UserError

        # each stage resumes from its own newest checkpoint; a named one would be silently passed over
        raise UserError(f"--resume {resume}: a run with train.stages resumes as a whole: give --resume without a "
                        f"path (or the run folder {output_dir}); each unfinished stage then continues from its "
                        "newest checkpoint")
    base = to_dict(cfg)
    base["train"]["stages"] = []
    results: dict[str, dict[str, Any]] = {}
    previous: Path | None = None
    metrics: dict[str, Any] = {}
    for i, stage in enumerate(cfg.train.stages):
        if not isinstance(stage, dict) or "name" not in stage or set(stage) - {"name", "overrides"}:
            raise ConfigError(f"train.stages[{i}] must be {{name: str, overrides: {{dotted.key: value}}}}, got {stage!r}")
        name = str(stage["name"])
        overrides = dict(stage.get("overrides") or {})
        if "train.stages" in overrides:
            raise ConfigError(f"train.stages[{i}] ({name}) cannot set train.stages")
        if previous is not None:
            overrides.setdefault("train.init_from", str(previous))
        stage_cfg = from_dict(Config, apply_overrides(base, overrides))
        stage_dir = output_dir / f"stage{i + 1}-{name}"
        if resume and (stage_dir / "metrics.json").is_file():
            metrics = json.loads((stage_dir / "metrics.json").read_text())
        else:
            stage_resume = True if resume and find_latest_checkpoint(stage_dir) is not None else None
            logger.info("training stage %d/%d: %s", i + 1, len(cfg.train.stages), name)
            metrics = train(stage_cfg, stage_dir, resume=stage_resume, step_callback=step_callback)
        results[name] = metrics
        previous = stage_dir / BEST_DIR
    final = {**metrics, "stages": {n: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                                   for n, m in results.items()}}
    if PartialState().is_main_process:
        save_config(cfg, output_dir / "config.yaml")
        with atomic_dir(output_dir / BEST_DIR) as tmp:
            for f in previous.iterdir():  # files, and the adapter/ folder of a LoRA model
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_metrics(output_dir / "metrics.json", final)
    PartialState().wait_for_everyone()
    return final
