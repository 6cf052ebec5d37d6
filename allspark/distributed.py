"""One place that builds the :class:`accelerate.Accelerator` for training and evaluation.

accelerate forms a CPU process group (gloo) only when it is told the run is on CPU: ``accelerate launch
--cpu`` does that through ``ACCELERATE_USE_CPU``, a plain ``torchrun`` does not. Without it, N processes
started by torchrun on a machine with no accelerator each become an independent single-process run that
trains on the whole dataset and writes the same checkpoint folders as the others. ``make_accelerator``
asks for the CPU backend whenever the launcher started several processes and no accelerator device exists.

It also resolves ``mixed_precision="auto"`` (the default of ``train.mixed_precision``) for the device the run
will use, with :func:`allspark.precision.resolve_mixed_precision`: bf16 autocast where that device runs bf16
natively, else ``no`` (``fp16`` on a GPU with fp16 but no bf16). A forced ``bf16``/``fp16`` the device only
emulates warns once.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator

from allspark.precision import default_device, resolve_mixed_precision

__all__ = ["make_accelerator", "launched_world_size", "accelerator_device_available"]


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) says this job has."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {key}={value!r} is not a process count") from None
    return 1


def accelerator_device_available() -> bool:
    """True when torch sees a GPU (or another accelerator device) that accelerate would use."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def make_accelerator(*, llm_dtype: str = "auto", **kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)``, on the CPU process group when a multi-process launch has no device.

    ``mixed_precision`` may be ``auto``; ``llm_dtype`` (the run's ``model.llm.dtype`` setting) goes into that
    decision: an LLM pinned to float32 gets no autocast.
    """
    if "cpu" not in kwargs and launched_world_size() > 1 and not accelerator_device_available():
        kwargs["cpu"] = True
    if kwargs.get("mixed_precision") is not None:
        device = torch.device("cpu") if kwargs.get("cpu") else default_device()
        kwargs["mixed_precision"], _ = resolve_mixed_precision(kwargs["mixed_precision"], device, llm_dtype)
    return Accelerator(**kwargs)
