"""AllSpark: encoder(s) -> modal bridge -> frozen language model with adapters -> task head.

Nothing here depends on a modality's name: the config names the encoders, the prompt set and the head,
and the registries resolve them. The sequence given to the language model is, per example,
``[bridge tokens s_i | prompt tokens T(p_i) | padding]`` (paper eq. 2, s_i before the prompt), right-padded
with an attention mask so batched rows of different prompt lengths are exact. A task with no encoder whose
batch carries raw text (``input_text``) takes ``[prompt | input | target]`` instead: see :mod:`allspark.language`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from allspark.bridge import ModalBridge
from allspark.config import Config, config_from_yaml_text, save_config, to_dict
from allspark.io import atomic_dir
from allspark.language import INPUT_KEY as TEXT_INPUT_KEY, TextCodec, run_text_llm
from allspark.llm import LoadedLLM, load_llm
from allspark.registry import ENCODERS, HEADS
from allspark.types import LLMOutput, Output, Tokens

logger = logging.getLogger(__name__)

__all__ = ["AllSpark", "WEIGHTS_NAME", "CONFIG_NAME", "INFO_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
INFO_NAME = "data_info.json"


def _import_plugins() -> None:
    """Import the packages whose import registers the built-in encoders and heads."""
    import encoders  # noqa: F401
    import heads  # noqa: F401


class AllSpark(nn.Module):
    def __init__(self, cfg: Config, info: dict[str, Any] | None = None, llm: LoadedLLM | None = None):
        super().__init__()
        _import_plugins()
        from prompts import load_prompts

        self.cfg = cfg
        self.info = dict(info or {})
        mcfg = cfg.model
        self.encoders = nn.ModuleList(
            ENCODERS.build({"type": e.type, **e.args}, optional={"info": self.info}) for e in mcfg.encoders
        )
        for enc, ecfg in zip(self.encoders, mcfg.encoders):
            if not isinstance(getattr(enc, "out_dim", None), int):
                raise TypeError(f"encoder {ecfg.type!r} must declare its output width as an int `out_dim`")
        self._llm = llm if llm is not None else load_llm(mcfg.llm)
        self.llm = self._llm.module
        self.hidden_size = self._llm.hidden_size
        b = mcfg.bridge
        self.bridge = (
            ModalBridge(
                [e.out_dim for e in self.encoders], self.hidden_size, num_queries=b.num_queries, depth=b.depth,
                heads=b.heads, dim_head=b.dim_head, ff_mult=b.ff_mult, dropout=b.dropout,
                output_scale=self._bridge_output_scale(b.output_scale),
            )
            if len(self.encoders)
            else None
        )
        self.head = HEADS.build(
            {"type": mcfg.head.type, **mcfg.head.args}, hidden_size=self.hidden_size,
            optional={"info": self.info, "llm": self._llm},  # ``llm``: for heads that run text through it
        )
        self._build_alignment(mcfg.alignment)
        self.prompts = load_prompts(mcfg.prompts.set or cfg.modality, self.info)
        if mcfg.prompts.train_choice not in ("random", "first"):
            raise ValueError(f"model.prompts.train_choice must be 'random' or 'first', got {mcfg.prompts.train_choice!r}")
        tok = self._llm.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in self.prompts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # The prompt sets are tokenised once; rows pick one by index.
        self.register_buffer(
            "prompt_ids", torch.tensor([i + [pad] * (width - len(i)) for i in ids]), persistent=False
        )
        self.register_buffer("prompt_lengths", torch.tensor([len(i) for i in ids]), persistent=False)
        # Tasks with no encoder take raw text (``input_text``/``target_text``), tokenised by the model.
        self.text_codec = TextCodec(tok, mcfg.text_input) if not len(self.encoders) else None
        self._hold_parameters(getattr(cfg.train, "train_only", None) or [])

    def _hold_parameters(self, patterns: list[str]) -> None:
        """``train.train_only``: only trainable parameters whose name matches one of these shell patterns
        keep training; the others are held fixed (no gradient) but stay in the checkpoint (a training stage
        that freezes what an earlier stage trained)."""
        import fnmatch

        self._held: set[str] = set()
        if not patterns:
            return
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"train.train_only pattern {pattern!r} matches no trainable parameter; "
                                 f"they are named like {names[:6]}")
        for name, p in self.named_parameters():
            if p.requires_grad and not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                p.requires_grad_(False)
                self._held.add(name)

    def _build_alignment(self, acfg) -> None:
        """Per-encoder projections to a common width and the correlation objective (if configured)."""
        self.alignment = None
        self.alignment_proj = None
        if not acfg.objective:
            return
        if len(self.encoders) < 2:
            raise ValueError(
                f"model.alignment.objective={acfg.objective!r} needs at least two encoders to correlate; "
                f"this config has {len(self.encoders)}"
            )
        if acfg.dim < 1:
            raise ValueError(f"model.alignment.dim must be >= 1, got {acfg.dim}")
        if acfg.level not in ("encoders", "bridge"):
            raise ValueError(f"model.alignment.level must be 'encoders' or 'bridge', got {acfg.level!r}")
        if acfg.task_weight < 0 or (acfg.task_weight == 0 and acfg.weight <= 0):
            raise ValueError(
                f"model.alignment.task_weight must be >= 0, and an alignment-only stage (task_weight=0) needs "
                f"weight > 0; got task_weight={acfg.task_weight}, weight={acfg.weight}"
            )
        from allspark.objectives import build_objective

        self.alignment = build_objective({"type": acfg.objective, **acfg.args})
        widths = [e.out_dim if acfg.level == "encoders" else self.hidden_size for e in self.encoders]
        self.alignment_proj = nn.ModuleList(nn.Linear(w, acfg.dim) for w in widths)

    def _bridge_output_scale(self, setting: float | str) -> float:
        if setting == "embedding":
            weight = self._llm.embed_tokens.weight
            return float(weight.detach().float().pow(2).mean().sqrt())
        if isinstance(setting, str):
            raise ValueError(f"model.bridge.output_scale must be a number or 'embedding', got {setting!r}")
        return float(setting)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, info: dict[str, Any] | None = None) -> "AllSpark":
        return cls(cfg, info)

    @property
    def tokenizer(self):
        return self._llm.tokenizer

    @property
    def num_modality_tokens(self) -> int:
        return self.bridge.num_queries if self.bridge is not None else 0

    # -- forward -------------------------------------------------------------------------------
    def choose_prompts(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """A random prompt per example in training (paper III-E), the first one otherwise."""
        if self.training and self.cfg.model.prompts.train_choice == "random" and len(self.prompts) > 1:
            return torch.randint(len(self.prompts), (batch_size,), device="cpu").to(device)
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def encode_tokens(self, batch: dict[str, Any]) -> list[Tokens]:
        """Each encoder's token set, in config order."""
        return [enc(batch) for enc in self.encoders]

    def encode(self, batch: dict[str, Any], token_sets: list[Tokens] | None = None) -> torch.Tensor:
        """Modality data (or already computed token sets) -> bridge tokens ``s_i`` [B, N, D]."""
        return self.bridge(self.encode_tokens(batch) if token_sets is None else token_sets)

    @staticmethod
    def _only(token_sets: list[Tokens], i: int) -> list[Tokens]:
        """The token sets with every set but the ``i``-th masked out (a bridge pass that sees one modality)."""
        return [ts if j == i else Tokens(ts.tokens, torch.zeros_like(ts.mask)) for j, ts in enumerate(token_sets)]

    def pooled_features(self, token_sets: list[Tokens]) -> list[torch.Tensor]:
        """Per modality, projected to ``model.alignment.dim`` -> [B, dim]: the masked mean of its encoder's tokens
        (``model.alignment.level: encoders``), or the mean bridge token of a bridge pass that sees that modality
        alone (``bridge``: the objective then also trains the bridge to keep what the modalities share)."""
        if self.alignment_proj is None:
            raise ValueError("pooled_features needs model.alignment.objective to be set")
        if self.cfg.model.alignment.level == "bridge":
            return [proj(self.bridge(self._only(token_sets, i)).mean(dim=1).float())
                    for i, proj in enumerate(self.alignment_proj)]
        return [proj(tokens.mean().float()) for tokens, proj in zip(token_sets, self.alignment_proj)]

    def alignment_score(self, token_sets: list[Tokens], features: list[torch.Tensor] | None = None
                        ) -> torch.Tensor | None:
        """The objective's correlation score over all encoder pairs (None for a batch of one sample,
        where no (co)variance can be estimated). ``features``: :meth:`pooled_features`, if already computed."""
        if token_sets[0].tokens.shape[0] < 2:
            return None
        return self.alignment(*(self.pooled_features(token_sets) if features is None else features))

    def build_sequence(
        self, modality: torch.Tensor | None, batch_size: int, prompt_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate ``s_i`` and the embedded prompt; returns (inputs_embeds, attention_mask, last_index)."""
        device = self.prompt_ids.device
        if prompt_index is None:
            prompt_index = self.choose_prompts(batch_size, device)
        ids = self.prompt_ids[prompt_index]  # [B, P]
        lengths = self.prompt_lengths[prompt_index]  # [B]
        embed = self._llm.embed_tokens
        prompt_emb = embed(ids)
        n = 0 if modality is None else modality.shape[1]
        p_mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        if modality is not None:
            x = torch.cat([modality.to(prompt_emb.dtype), prompt_emb], dim=1)
            mask = torch.cat([torch.ones(batch_size, n, dtype=torch.bool, device=device), p_mask], dim=1)
        else:
            x, mask = prompt_emb, p_mask
        return x, mask, n + lengths - 1

    def run_llm(self, batch: dict[str, Any], token_sets: list[Tokens] | None = None) -> LLMOutput:
        if self.text_codec is not None and TEXT_INPUT_KEY in batch:
            # No encoder, the input is language: [prompt | input | target] (see allspark.language).
            return run_text_llm(self, batch)
        batch_size = _batch_size(batch)
        modality = self.encode(batch, token_sets) if self.bridge is not None else None
        x, mask, last = self.build_sequence(modality, batch_size, batch.get("prompt_index"))
        hidden = self._llm.decoder(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        return LLMOutput(hidden, mask, last, self.num_modality_tokens, modality_input=modality)

    def forward(self, batch: dict[str, Any]) -> Output:
        if self.alignment is None or not self.training:
            # The objective's score only enters the training loss (and its log): evaluation skips it.
            return self.head(self.run_llm(batch), batch)
        acfg = self.cfg.model.alignment
        token_sets = self.encode_tokens(batch)
        features = self.pooled_features(token_sets)
        if acfg.task_weight == 0:
            # Alignment-only training: the encoders (and the bridge at level ``bridge``) and the projections
            # learn the objective alone.
            score = self.alignment_score(token_sets, features)
            if score is None:  # a batch of one sample: nothing to correlate, a zero loss kept in the graph
                return Output(torch.cat(features, dim=-1).sum() * 0.0)
            return Output(-acfg.weight * score, extras={"alignment": score.detach()})
        out = self.head(self.run_llm(batch, token_sets), batch)
        score = self.alignment_score(token_sets, features)
        if score is not None:
            # Minimising ``task_weight * loss - weight * score`` maximises the correlation of the modalities' features.
            out.extras["alignment"] = score.detach()
            if out.loss is not None:
                out.extras["task_loss"] = out.loss.detach()
                out.loss = acfg.task_weight * out.loss - acfg.weight * score
        return out

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        try:
            return self(batch).predictions
        finally:
            self.train(was_training)

    # -- trainable state -------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters (encoders, bridge, adapters, head) and the persistent buffers outside
        the language model (e.g. the regression head's scaler). The frozen LLM is not saved."""
        state = {}
        for name, p in self.named_parameters():
            if p.requires_grad or name in getattr(self, "_held", ()):
                state[name] = p.detach()
        for name, buf in self.state_dict().items():
            if name not in state and not name.startswith("llm.") and not _is_param(self, name):
                state[name] = buf.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load trainable weights; ``strict=False`` lets parts the checkpoint lacks keep their initial
        values (a later training stage adding a module) and returns their names."""
        expected = set(self.trainable_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if unexpected or (missing and strict):
            raise ValueError(
                "checkpoint does not match the model built from its config: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        own = self.state_dict(keep_vars=True)
        for name, value in state.items():
            target = own[name]
            if target.shape != value.shape:
                raise ValueError(f"checkpoint tensor {name}: shape {list(value.shape)}, model has {list(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
        return missing

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the trainable weights, the resolved config and the data info, atomically."""
        state = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_dir(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "allspark": "1"})
            save_config(self.cfg, tmp / CONFIG_NAME)
            (tmp / INFO_NAME).write_text(json.dumps(_jsonable(self.info), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> "AllSpark":
        """Rebuild from ``save_pretrained`` output: the frozen LLM and backbones come from where the
        config says; the trainable parts from the safetensors file (no pickle)."""
        directory = Path(directory)
        for name in (WEIGHTS_NAME, CONFIG_NAME, INFO_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory} is not an AllSpark checkpoint: {name} is missing "
                    f"(expected {WEIGHTS_NAME}, {CONFIG_NAME}, {INFO_NAME})"
                )
        cfg = config_from_yaml_text((directory / CONFIG_NAME).read_text())
        info = json.loads((directory / INFO_NAME).read_text())
        model = cls(cfg, info)
        model.load_trainable_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model

    def merged_llm(self):
        """The language model with the adapters merged into its weights (for export)."""
        return self._llm.merge_adapters()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _is_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("batch holds no tensor to take the batch size from")


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
