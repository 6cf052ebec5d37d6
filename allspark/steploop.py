"""The optimizer-step loop shared by the single-task trainer (``allspark.training.train``) and the joint one
(``allspark.multitask.train_joint``), and the accelerate machinery under it.

:class:`StepLoop` holds what both loops do the same way: one optimizer step's update (forward under the attention
kernel, backward, clipping, optimizer and scheduler step; inside ``accelerator.accumulate`` when the run
accumulates gradients), step counting and the progress bar, ``log.jsonl`` and tracker records, the step-boundary
hooks (the step callback, then Ctrl-C, see :class:`_StepBoundaryInterrupt`), periodic checkpoints
(``checkpoints/step-N``, written whole or not at all, the oldest pruned), ``best/`` and evaluation of a split.
What differs stays with each trainer: where a batch comes from (one loader epoch by epoch, or the task schedule's
draw from one loader per task), what a log record holds and when validation runs.

Beneath it: checkpoints that hold the trainable parts only (:func:`checkpoint_hooks`), the gathered trainable state
(:func:`gather_trainable_state`), the run log (:class:`_JsonlLog`), the newest resume point
(:func:`find_latest_checkpoint`) and the SDPA kernel choice (:func:`attention_kernel`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate.scheduler import AcceleratedScheduler
from safetensors.torch import load_file, save_file

from allspark.checkpoints import BEST_DIR, STATE_NAME, WEIGHTS_NAME
from allspark.config import ConfigError
from allspark.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["StepLoop", "checkpoint_hooks", "gather_trainable_state", "find_latest_checkpoint", "attention_kernel",
           "ATTENTION_KERNELS"]


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


class StepLoop:
    """One run's optimizer steps, on a prepared ``model``, ``optimizer`` and ``scheduler``.

    ``state``: the trainer's state (a dataclass with ``global_step``, saved as ``trainer_state.json`` in each
    checkpoint); the trainer may replace it (:meth:`resume`). ``accumulate``: run each update inside
    ``accelerator.accumulate`` (gradient accumulation: ``train.grad_accum_steps`` micro-batches per step).
    ``total``: the progress bar's length in optimizer steps. Creating the loop registers the checkpoint hooks.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, state, output_dir: Path, *, max_grad_norm,
                 attention_kernel: str, keep_checkpoints: int, accumulate: bool, total: int, desc: str,
                 step_callback: Callable[[Any], None] | None = None) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.state, self.output_dir = state, Path(output_dir)
        self.max_grad_norm, self.kernel, self.keep_checkpoints = max_grad_norm, attention_kernel, keep_checkpoints
        self.accumulate, self.total, self.desc, self.step_callback = accumulate, total, desc, step_callback
        self.main = accelerator.is_main_process
        # a scheduler that accelerate did not prepare (the joint loop's, stepped once per optimizer step) steps
        # only where the optimizer does
        self._prepared_scheduler = isinstance(scheduler, AcceleratedScheduler)
        self.unwrapped = accelerator.unwrap_model(model)
        self.log = _JsonlLog(self.output_dir / "log.jsonl", self.main)
        self.interrupt = _StepBoundaryInterrupt()
        self.progress = None
        save_hook, load_hook = checkpoint_hooks(accelerator)  # checkpoints hold the trainable parts only
        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    # -- starting -------------------------------------------------------------------------------------------
    def resume(self, ckpt: Path, state_type: type, *, revalidates: Callable[[Any], bool] = lambda state: False):
        """Load checkpoint ``ckpt`` (weights, optimizer, scheduler, RNG) and its trainer state (as ``state_type``);
        drop from ``log.jsonl`` what the resumed run writes again (with ``revalidates(state)``: the checkpoint's
        own validation records too). Returns the state, now the loop's."""
        self.accelerator.load_state(str(ckpt))
        self.state = state_type(**json.loads((ckpt / STATE_NAME).read_text()))
        self.log.truncate(self.state.global_step, revalidates=revalidates(self.state))
        return self.state

    def start_trackers(self, project: str, config: dict[str, Any]) -> None:
        """The trackers of ``train.log_with`` under ``project``, with the resolved config as hyper-parameters."""
        self.accelerator.init_trackers(project, config=config)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The span of the step loop: the progress bar, and Ctrl-C at step boundaries. An interrupt (at a
        boundary, or during the last validation or checkpoint) saves a checkpoint to resume from and re-raises; a
        second Ctrl-C stops at once, without one."""
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.total, initial=self.state.global_step,
                             disable=not self.accelerator.is_local_main_process, desc=self.desc)
        try:
            self.interrupt.install()
            yield
            if self.interrupt.requested(self.accelerator):  # Ctrl-C during the last validation or checkpoint
                raise KeyboardInterrupt
        except _InterruptNow:
            logger.warning("interrupted again: stopping at once; the newest checkpoint is the one to resume from")
            raise
        except KeyboardInterrupt:
            logger.warning("interrupted: saving a checkpoint at step %d to resume from", self.state.global_step)
            self.save_checkpoint()
            raise
        finally:
            self.interrupt.uninstall()
            self.progress.close()

    # -- one step -------------------------------------------------------------------------------------------
    def update(self, batch: dict[str, Any], *, loss_weight: float | None = None, task: str | None = None):
        """One micro-batch: forward under ``train.attention_kernel``, backward (of the loss times ``loss_weight``
        when given), gradient clipping to ``max_grad_norm`` at a synchronising step, optimizer and scheduler step
        (accelerate's wrappers skip them between accumulation boundaries). Returns the model's output."""
        accelerator, model = self.accelerator, self.model
        with accelerator.accumulate(model) if self.accumulate else contextlib.nullcontext():
            with attention_kernel(self.kernel, accelerator.device):
                out = model(batch)
            if out.loss is None:
                where = f"task {task!r}: " if task is not None else ""
                raise ValueError(f"{where}the head returned no loss for a training batch (are labels missing?)")
            accelerator.backward(out.loss if loss_weight is None else out.loss * loss_weight)
            if accelerator.sync_gradients and self.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients or self._prepared_scheduler:  # accelerate's wrapper skips by itself
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def count_step(self) -> None:
        """An optimizer step is done: count it."""
        self.state.global_step += 1
        self.progress.update(1)

    def due(self, every: int | None) -> bool:
        """Whether the step just counted is a multiple of ``every`` (never when ``every`` is unset)."""
        return bool(every) and self.state.global_step % every == 0

    def boundary(self) -> None:
        """The end of an optimizer step: the step callback, then a pending Ctrl-C (on any process) stops the run
        here, where the state resumes exactly."""
        if self.step_callback is not None:
            self.step_callback(self.state)
        if self.interrupt.requested(self.accelerator):
            raise KeyboardInterrupt

    # -- records --------------------------------------------------------------------------------------------
    def mean(self, value: float) -> float:
        """``value`` averaged over the processes (a collective)."""
        return self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean").item()

    def record(self, record: dict[str, Any], tracked: dict[str, Any] | None = None) -> None:
        """``record`` into ``log.jsonl`` and ``tracked`` (default: none) to the trackers at the current step."""
        self.log.write(record)
        if tracked is not None:
            self.accelerator.log(tracked, step=self.state.global_step)

    def evaluate(self, model, loader, evaluator, desc: str) -> dict[str, Any]:
        """``evaluator``'s metrics of ``model`` (the prepared model, or a view of it) on ``loader``."""
        from allspark.evaluation import collect_predictions

        gathered = collect_predictions(model, loader, self.accelerator, evaluator.pred_keys, evaluator.batch_keys,
                                       desc)
        return evaluator.compute(gathered)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """``checkpoints/step-N``: the accelerate state and the trainer state, written under ``.tmp`` and renamed,
        so a folder appears whole or not at all; then all but the newest ``keep_checkpoints`` are removed, and so
        are the folders of saves a kill interrupted."""
        accelerator, main = self.accelerator, self.main
        ckpt = self.output_dir / "checkpoints" / f"step-{self.state.global_step}"
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part before the folder is renamed
        if main:
            atomic_write_text(tmp / STATE_NAME, json.dumps(asdict(self.state)))
            if ckpt.exists():
                shutil.rmtree(ckpt)
            tmp.rename(ckpt)
            old = sorted((int(m.group(1)), d) for d in ckpt.parent.iterdir()
                         if (m := re.fullmatch(r"step-(\d+)", d.name)))
            for _, d in old[: max(0, len(old) - self.keep_checkpoints)]:
                shutil.rmtree(d, ignore_errors=True)
            for d in ckpt.parent.iterdir():  # folders of saves a kill interrupted: never a resume point
                if re.fullmatch(r"step-\d+\.tmp", d.name) and d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_best(self, **kwargs: Any) -> None:
        """The current trainable state as ``best/`` (``save_pretrained`` of the model, with ``kwargs``); the state
        is gathered on every process (a collective under sharding), written by the main one."""
        self.accelerator.wait_for_everyone()
        best = gather_trainable_state(self.accelerator, self.model)
        if self.main:
            self.unwrapped.save_pretrained(self.output_dir / BEST_DIR, state=best, **kwargs)

    def load_best(self) -> None:
        """Put ``best/``'s trainable state back into the model (for the final test)."""
        self.unwrapped.load_trainable_state_dict(load_file(str(self.output_dir / BEST_DIR / WEIGHTS_NAME)))
