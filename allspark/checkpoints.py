"""What a checkpoint folder holds, by name, and how to find and read/write its trainable state.

One module for the file and folder names of a checkpoint (single-task ``save_pretrained`` folders, run folders,
``allspark export`` folders and joint multi-task checkpoints), for resolving a path the user names to the folder
that holds the weights, and for the safetensors/JSON helpers that :mod:`allspark.model` and
:mod:`allspark.multitask` share. It imports no model code, so the model, the trainers, the model card and the
evaluation entry points all take these from here rather than from each other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from allspark.errors import UserFileNotFoundError

__all__ = [
    "WEIGHTS_NAME", "CONFIG_NAME", "INFO_NAME", "ADAPTER_DIR", "EXPORT_PARTS_DIR", "BEST_DIR", "STATE_NAME",
    "JOINT_CONFIG_NAME", "TASKS_DIR", "SHARED_NAME",
    "resolve_checkpoint", "resolve_joint_checkpoint", "is_joint_checkpoint",
    "save_trainable_state", "load_trainable_state", "write_info", "write_peft_adapter",
]

# ---------------------------------------------------------------------------------------------------
# names on disk

#: the trainable parts (safetensors) of a saved model
WEIGHTS_NAME = "model.safetensors"
#: the resolved config of a saved single-task model
CONFIG_NAME = "config.yaml"
#: the data info (classes, channels, ...) a model was built with
INFO_NAME = "data_info.json"
#: the PEFT adapter folder inside a checkpoint of a LoRA model, and the key prefix of PeftModel.save_pretrained
ADAPTER_DIR = "adapter"
#: the folder of an export holding the package's own parts (encoders, bridge, head) and config
EXPORT_PARTS_DIR = "allspark"
#: the folder of a run folder holding its best model
BEST_DIR = "best"
#: the trainer's state inside a run's ``step-N`` checkpoint (single-task and joint runs)
STATE_NAME = "trainer_state.json"
#: the joint config inside a run folder and a saved joint model; each task's resolved config and data info lie in
#: ``tasks/<name>/`` beside it (``config.yaml``, ``data_info.json``)
JOINT_CONFIG_NAME = "joint.yaml"
TASKS_DIR = "tasks"
#: how a saved joint model's shared parts are built (``{"bridge": {"shared": bool, "width": int | None}}``); a
#: checkpoint without it has one bridge per task
SHARED_NAME = "shared.json"


# ---------------------------------------------------------------------------------------------------
# finding the checkpoint in a folder

def resolve_checkpoint(path: Path) -> Path:
    """A run folder (use its ``best/``), a ``save_pretrained`` folder or an ``allspark export`` folder (its
    ``allspark/`` parts, which load on the exported LLM)."""
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return path
    if (path / BEST_DIR / CONFIG_NAME).is_file():
        return path / BEST_DIR
    if (path / EXPORT_PARTS_DIR / CONFIG_NAME).is_file():
        return path / EXPORT_PARTS_DIR
    raise UserFileNotFoundError(
        f"{path} holds no checkpoint: expected {path}/best/ (a train.py run folder) or model.safetensors + "
        f"{CONFIG_NAME} (written by save_pretrained)"
    )


def resolve_joint_checkpoint(path: Path) -> Path:
    """A joint run folder (use its ``best/``) or a :meth:`MultiTaskAllSpark.save_pretrained` folder."""
    for candidate in (path, path / BEST_DIR):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / TASKS_DIR).is_dir():
            return candidate
    raise UserFileNotFoundError(f"{path} holds no joint checkpoint: expected {path}/best/ (a joint train.py run "
                                f"folder) or {WEIGHTS_NAME} + {TASKS_DIR}/<task>/config.yaml (save_pretrained)")


def is_joint_checkpoint(path: str | Path) -> bool:
    try:
        resolve_joint_checkpoint(Path(path))
        return True
    except UserFileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------
# reading and writing a checkpoint's parts

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def save_trainable_state(state: dict[str, torch.Tensor], path: Path, **metadata: str) -> None:
    """Write a trainable state (already detached, contiguous, on the CPU) as safetensors, marked as the package's
    (``{"format": "pt", "allspark": "1"}`` plus ``metadata``)."""
    save_file(state, str(path), metadata={"format": "pt", "allspark": "1", **metadata})


def load_trainable_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file written by :func:`save_trainable_state` (or a trainer)."""
    return load_file(str(path))


def write_info(path: Path, info: dict[str, Any]) -> None:
    """A model's data info as JSON (tensors and arrays as lists)."""
    path.write_text(json.dumps(_jsonable(info), indent=2))


def write_peft_adapter(directory: Path, adapter: tuple[Any, dict[str, torch.Tensor]] | None) -> None:
    """With a PEFT adapter (``(peft_config, weights)``, as ``AllSpark.peft_adapter`` returns), its folder
    ``directory/adapter/`` in PEFT's own format; nothing when ``adapter`` is None."""
    if adapter is None:
        return
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    peft_config, weights = adapter
    (directory / ADAPTER_DIR).mkdir()
    peft_config.save_pretrained(str(directory / ADAPTER_DIR))
    save_file(weights, str(directory / ADAPTER_DIR / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
