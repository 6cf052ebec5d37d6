"""The single-task trainer behind ``train.py``, on Hugging Face ``accelerate``.

One code path for one CPU, one GPU or many processes: AdamW over the trainable parameters only, cosine
schedule with warm-up, gradient accumulation via ``accelerator.accumulate``, mixed precision, resumable
checkpoints (``save_state``/``load_state``; a resumed run skips the batches it has already seen and ends
with the same weights as an uninterrupted one), ``best/`` chosen on the validation metric, and
``metrics.json`` with the test-split metrics of the best weights.

:func:`train` reads as its steps (``start_run`` -> ``prepare_run`` -> ``prepare_loop`` -> ``resume_or_start`` ->
``run_epochs`` -> ``final_test`` -> ``write_outputs``); the run is built by :func:`allspark.run.build_run` and the
optimizer steps run on :class:`allspark.steploop.StepLoop`, the machinery the joint trainer
(:func:`allspark.multitask.train_joint`) shares.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from allspark.baselines import baseline_metrics
from allspark.checkpoints import BEST_DIR, STATE_NAME, WEIGHTS_NAME, resolve_checkpoint
from allspark.config import Config, ConfigError, save_config, to_dict
from allspark.data import build_loader, loader_options
from allspark.distributed import make_accelerator
from allspark.errors import MissingPackageError
from allspark.evaluation import write_metrics
from allspark.llm import check_quantization
from allspark.model import AllSpark
from allspark.precision import run_precision
from allspark.run import Run, build_run
# the loop machinery shared with the joint trainer (allspark.multitask), importable from here as before
from allspark.steploop import (  # noqa: F401
    ATTENTION_KERNELS, StepLoop, _InterruptNow, _JsonlLog, _StepBoundaryInterrupt, _clean_name, attention_kernel,
    checkpoint_hooks, find_latest_checkpoint, gather_trainable_state)

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

    The steps, each a function below: :func:`start_run` (checks, accelerator, resume point, ``config.yaml``,
    seed), :func:`prepare_run` (data, model, evaluator, loaders), :func:`prepare_loop` (optimizer and schedule,
    everything prepared, the :class:`~allspark.steploop.StepLoop`), :func:`resume_or_start`, :func:`run_epochs`
    (validating and checkpointing as it goes), :func:`final_test` and :func:`write_outputs`.
    """
    output_dir = Path(output_dir)
    if cfg.train.stages:
        return train_stages(cfg, output_dir, resume=resume, step_callback=step_callback)
    accelerator, resume_ckpt = start_run(cfg, output_dir, resume)
    run = prepare_run(cfg, accelerator, fresh=resume_ckpt is None)
    loop, precision = prepare_loop(cfg, run, accelerator, output_dir, step_callback)
    resume_or_start(loop, cfg, run, resume_ckpt)
    run_epochs(loop, cfg, run)
    metrics = final_test(loop, cfg, run, precision)
    write_outputs(loop, cfg, metrics)
    return metrics


def start_run(cfg: Config, output_dir: Path, resume: str | Path | bool | None):
    """Refuse a bad setting before any work (attention kernel, data loading, quantization, keep_checkpoints), make
    the accelerator, find the checkpoint ``resume`` names (checked against the run's ``config.yaml`` before it is
    rewritten), write ``config.yaml`` and seed the RNG (before the model is built, so its initial weights depend
    on the seed only). Returns (accelerator, the checkpoint to resume from or None)."""
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
    # the resume checks read the run's config.yaml: before it is rewritten below
    resume_ckpt = _find_resume_checkpoint(cfg, output_dir, resume) if resume else None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    set_seed(cfg.seed)
    return accelerator, resume_ckpt


def prepare_run(cfg: Config, accelerator, *, fresh: bool) -> Run:
    """The run (:func:`allspark.run.build_run`): the train, val and test splits, the model on the training split's
    info with its starting weights (:func:`init_model`), the evaluator and baselines (a bad baseline config fails
    now, not after training) and the loaders."""
    return build_run(cfg, accelerator=accelerator, model=lambda run: init_model(run, fresh=fresh,
                                                                               device=accelerator.device))


def init_model(run: Run, *, fresh: bool, device) -> AllSpark:
    """The model of ``run.cfg`` on ``run.info``, and where its weights start: in a ``fresh`` run (not a resume,
    which loads them) the data-dependent initialisation (:func:`init_from_data`); then ``train.init_from``'s
    trainable state, where it has the tensor."""
    cfg = run.cfg
    model = AllSpark(cfg, run.info)
    if fresh:
        init_from_data(model, run.datasets["train"], cfg.data.eval_batch_size,  # one pass: no workers to keep
                       **{**loader_options(cfg.data, device), "persistent_workers": False})
    if cfg.train.init_from:
        start = resolve_checkpoint(Path(cfg.train.init_from).expanduser())
        fresh_tensors = model.load_trainable_state_dict(load_file(str(start / WEIGHTS_NAME)), strict=False)
        logger.info("initialised from %s (%d tensors not in it keep their initial values)", start, len(fresh_tensors))
    return model


def build_optimizer_and_schedule(cfg: Config, model: torch.nn.Module, train_loader):
    """The optimizer (:func:`build_optimizer`) and the cosine schedule with warm-up (:func:`warmup_steps`) over
    ``train.epochs`` x the optimizer steps of one pass over ``train_loader`` (not yet prepared: the schedule counts
    single-process optimizer steps; accelerate's scheduler wrapper steps it once per process, so this stays right
    under data parallelism). Returns (optimizer, scheduler, total steps)."""
    from transformers import get_cosine_schedule_with_warmup

    tcfg = cfg.train
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(train_loader) / tcfg.grad_accum_steps)
    total_steps = max(1, tcfg.epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(tcfg, steps_per_epoch, total_steps),
                                                total_steps)
    return optimizer, scheduler, total_steps


def prepare_loop(cfg: Config, run: Run, accelerator, output_dir: Path,
                 step_callback: Callable[[TrainerState], None] | None):
    """The optimizer and schedule; the model, optimizer, loaders (``run.loaders`` become the prepared ones) and
    scheduler prepared by accelerate; the run's precision (logged); the :class:`StepLoop` over them, with a fresh
    :class:`TrainerState`. Returns (loop, precision)."""
    tcfg = cfg.train
    optimizer, scheduler, total_steps = build_optimizer_and_schedule(cfg, run.model, run.loaders["train"])
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        run.model, optimizer, run.loaders["train"], run.loaders["val"], run.loaders["test"], scheduler
    )
    run.loaders = {"train": train_loader, "val": val_loader, "test": test_loader}
    unwrapped: AllSpark = accelerator.unwrap_model(model)
    precision = run_precision(unwrapped._llm, accelerator, tcfg.mixed_precision, cfg.model.llm.dtype)
    logger.info("precision: LLM %s, autocast %s (%s)", precision["llm_dtype"], precision["mixed_precision"],
                precision["reason"])
    loop = StepLoop(accelerator, model, optimizer, scheduler, TrainerState(), output_dir,
                    max_grad_norm=tcfg.max_grad_norm, attention_kernel=tcfg.attention_kernel,
                    keep_checkpoints=tcfg.keep_checkpoints, accumulate=True, total=total_steps,
                    desc=f"train {cfg.modality}", step_callback=step_callback)
    return loop, precision


def resume_or_start(loop: StepLoop, cfg: Config, run: Run, resume_ckpt: Path | None) -> None:
    """Resume from ``resume_ckpt`` (weights, optimizer, schedule, RNG, counters; ``log.jsonl`` cut back to its
    step) or start at step 0; then start the trackers with the full resolved config."""
    if resume_ckpt is not None:
        # a checkpoint taken on the epoch's last batch precedes that epoch's validation, which the run repeats
        state = loop.resume(resume_ckpt, TrainerState,
                            revalidates=lambda s: s.batches_in_epoch >= len(run.loaders["train"]))
        logger.info("resumed from %s at epoch %d, batch %d, step %d", resume_ckpt, state.epoch,
                    state.batches_in_epoch, state.global_step)
    loop.start_trackers(cfg.modality, _flat_config(cfg))


def run_epochs(loop: StepLoop, cfg: Config, run: Run) -> None:
    """The epochs from the state's position (a resumed run skips the batches its epoch has seen): an optimizer
    step every ``train.grad_accum_steps`` micro-batches, the running loss (and scalar ``Output.extras``, e.g.
    the alignment term) logged every ``train.log_every_steps``, a checkpoint every ``train.save_every_steps``;
    at an epoch's end validation (every ``train.eval_every_epochs`` and at the last) and a checkpoint.
    ``train.max_steps`` stops the run early, validating and checkpointing where it stops."""
    tcfg, accelerator, state = cfg.train, loop.accelerator, loop.state
    train_loader = run.loaders["train"]
    stop = False
    running_loss, running_count, t0 = 0.0, 0, time.perf_counter()
    running_extras: dict[str, list[float]] = {}  # scalar Output.extras (e.g. the alignment term), logged too
    with loop.running():
        while state.epoch < tcfg.epochs and not stop:
            epoch = state.epoch
            accelerator.step = 0  # accumulation boundaries restart with each epoch
            loader = train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            # accelerate's loaders pass their own iteration count to the sampler on every pass; set the
            # true epoch so a resumed run (which starts on a fresh skip-loader) sees the same order.
            loader.set_epoch(epoch)
            loop.model.train()
            for batch in loader:
                out = loop.update(batch)
                state.batches_in_epoch += 1
                running_loss += out.loss.detach().float().item()
                running_count += 1
                for key, value in out.extras.items():
                    if isinstance(value, torch.Tensor) and value.numel() == 1:
                        running_extras.setdefault(key, []).append(value.detach().float().item())
                if not accelerator.sync_gradients:
                    continue
                loop.count_step()
                if loop.due(tcfg.log_every_steps):
                    loss = loop.mean(running_loss / running_count)
                    record = {"step": state.global_step, "epoch": epoch + state.batches_in_epoch / len(train_loader),
                              "loss": loss, "lr": loop.scheduler.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - t0, 2)}
                    extras = {f"train/{k}": loop.mean(sum(v) / len(v)) for k, v in sorted(running_extras.items()) if v}
                    record.update(extras)
                    loop.record(record, {"train/loss": loss, "train/lr": record["lr"], **extras})
                    loop.progress.set_postfix(loss=f"{loss:.4f}")
                    running_loss, running_count = 0.0, 0
                    running_extras.clear()
                loop.boundary()
                if loop.due(tcfg.save_every_steps):
                    loop.save_checkpoint()
                if tcfg.max_steps and state.global_step >= tcfg.max_steps:
                    stop = True
                    break
            if stop and state.batches_in_epoch < len(train_loader):
                validate(loop, cfg, run, epoch + state.batches_in_epoch / len(train_loader))
                loop.save_checkpoint()
                break
            # End of epoch: validate, keep the best, checkpoint for resume.
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if (epoch + 1) % tcfg.eval_every_epochs == 0 or epoch + 1 == tcfg.epochs or stop:
                validate(loop, cfg, run, epoch + 1)
            loop.save_checkpoint()


def validate(loop: StepLoop, cfg: Config, run: Run, epoch_float: float) -> None:
    """The validation split's metrics, logged (``val/<metric>``, and whether they are the best so far); the best
    on ``train.metric_for_best`` (direction ``train.greater_is_better``) is saved as ``best/``."""
    tcfg, state = cfg.train, loop.state
    metrics = loop.evaluate(loop.model, run.loaders["val"], run.evaluator, "val")
    value = metrics.get(tcfg.metric_for_best)
    if not isinstance(value, (int, float)):
        raise ConfigError(f"train.metric_for_best={tcfg.metric_for_best!r} is not a metric of "
                          f"{cfg.eval.protocol!r}; it reports {sorted(metrics)}")
    better = state.best_metric is None or (
        value > state.best_metric if tcfg.greater_is_better else value < state.best_metric
    )
    if better:
        state.best_metric, state.best_epoch = float(value), round(epoch_float, 3)
        loop.save_best()
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    loop.record({"epoch": round(epoch_float, 3), "step": state.global_step,
                 **{f"val/{k}": v for k, v in scalars.items()}, "best": better},
                {f"val/{k}": v for k, v in scalars.items()})
    loop.model.train()


def final_test(loop: StepLoop, cfg: Config, run: Run, precision: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics: the best validation value and its epoch, the precision, and with ``train.test_at_end``
    the test split's metrics of the best weights, beside the classical baselines (fitted on the training split)
    and the probes of the model."""
    tcfg, state, accelerator = cfg.train, loop.state, loop.accelerator
    accelerator.wait_for_everyone()
    metrics = {"split": "test" if tcfg.test_at_end else None, "best_epoch": state.best_epoch,
               f"val/{tcfg.metric_for_best}": state.best_metric, "num_processes": accelerator.num_processes}
    metrics["precision"] = precision
    if tcfg.test_at_end:  # test-split metrics of the best weights
        loop.load_best()
        metrics.update(loop.evaluate(loop.model, run.loaders["test"], run.evaluator, "test"))
        if loop.main:  # classical baselines on the same split, fitted on the training split (and probes of the model)
            metrics.update(baseline_metrics(cfg, run.evaluator, run.baselines, run.datasets["train"],
                                            run.datasets["test"], loop.unwrapped))
    return metrics


def write_outputs(loop: StepLoop, cfg: Config, metrics: dict[str, Any]) -> None:
    """``metrics.json``, the model card of ``best/`` and the test record of ``log.jsonl`` (main process); then
    the trackers are closed."""
    if loop.main:
        write_metrics(loop.output_dir / "metrics.json", metrics)
        from allspark.model_card import write_model_card

        write_model_card(loop.output_dir / BEST_DIR, cfg, loop.unwrapped.info, metrics,
                         num_trainable=loop.unwrapped.num_parameters(trainable_only=True))
        if cfg.train.test_at_end:
            loop.log.write({"test/" + k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    loop.accelerator.end_training()


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
