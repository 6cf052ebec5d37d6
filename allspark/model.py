"""AllSpark: encoder(s) -> modal bridge -> frozen language model with adapters -> task head.

Nothing here depends on a modality's name: the config names the encoders, the prompt set and the head,
and the registries resolve them. A task with no encoder whose batch carries raw text (``input_text``) takes
``[prompt | input | target]``: see :mod:`allspark.language`. Otherwise ``model.sequence`` orders the input:

- ``prompt_first`` (default): ``[prompt tokens | padding | bridge tokens]``, the padding masked and the position
  ids counted over real tokens only (each row is exactly its unpadded sequence), the heads reading the last
  bridge token, whose own residual stream carries the sample. A departure from the paper, chosen by measurement
  (README "Sequence order": with the paper's order the last prompt token sees the sample only through the
  frozen LLM's attention, and real images stayed at chance). In evaluation every row uses the first prompt and
  no gradient is taken, so the prompt's key/value cache is computed once per model state (keyed on the language
  model's parameters' storage and version counters, so a weight update or load recomputes it) and only the N
  bridge tokens of each sample run through the language model. Training runs full forwards (random prompts).
- ``modality_first``: the paper's ``[bridge tokens s_i | prompt tokens T(p_i) | padding]`` (eq. 2), right-padded
  with an attention mask so batched rows of different prompt lengths are exact; the heads read the last prompt
  token.

A head that declares ``uses_llm = False`` (the segmentation head with ``conditioning: none``) removes the LLM path:
the model runs the encoders and the head only (see :attr:`AllSpark.uses_llm`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from allspark.auxiliary import AlignmentLoss, AuxiliaryLosses, build_auxiliary_losses
from allspark.bridge import ModalBridge
from allspark.checkpoints import (ADAPTER_DIR, CONFIG_NAME, EXPORT_PARTS_DIR, INFO_NAME, WEIGHTS_NAME,  # noqa: F401
                                  _jsonable, resolve_checkpoint, write_info, write_peft_adapter)
from allspark.config import Config, ConfigError, config_from_yaml_text, save_config, to_dict
from allspark.io import atomic_dir
from allspark.language import INPUT_KEY as TEXT_INPUT_KEY, TextCodec, run_text_llm, text_list
from allspark.lm import PEFT_PREFIX, LanguageModel, cache_rows
from allspark.llm import LoadedLLM, load_llm, prompt_token_ids
from allspark.registry import ENCODERS, HEADS
from allspark.types import LLMOutput, LMPrefix, Output, Tokens

logger = logging.getLogger(__name__)

__all__ = ["AllSpark", "WEIGHTS_NAME", "CONFIG_NAME", "INFO_NAME", "ADAPTER_DIR", "export_checkpoint"]

#: ``model.sequence``: the paper's [s_i | prompt] (default) or [prompt | s_i] (cacheable evaluation prompt)
SEQUENCE_ORDERS = ("modality_first", "prompt_first")
PROMPT_CHOICES = ("random", "per_batch", "first")
# the checkpoint names (WEIGHTS_NAME, CONFIG_NAME, INFO_NAME, ADAPTER_DIR, EXPORT_PARTS_DIR) live in
# allspark.checkpoints and stay importable from here


def _import_plugins() -> None:
    """Import the packages whose import registers the built-in encoders and heads."""
    import encoders  # noqa: F401
    import heads  # noqa: F401


def hold_unmatched(module: nn.Module, patterns: Sequence[str], key: str,
                   own: Callable[[str], bool] = lambda name: True) -> list[str]:
    """``train_only``: of ``module``'s trainable parameters (those ``own`` accepts), stop the gradient of every one
    whose name matches none of the shell ``patterns``; returns their names. A pattern that matches no such
    parameter is a ConfigError naming ``key``. No patterns: nothing held."""
    import fnmatch

    if not patterns:
        return []
    names = [n for n, p in module.named_parameters() if p.requires_grad and own(n)]
    for pattern in patterns:
        if not isinstance(pattern, str) or not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"{key} pattern {pattern!r} matches no trainable parameter; they are named like "
                              f"{names[:3] + names[-3:]}")
    held = []
    for name, p in module.named_parameters():
        if p.requires_grad and own(name) and not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            held.append(name)
    return held


class AllSpark(nn.Module):
    def __init__(self, cfg: Config, info: dict[str, Any] | None = None, llm: LoadedLLM | None = None):
        super().__init__()
        _import_plugins()
        from prompts import load_answer_template, load_prompts

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
        #: the LLM's interface (embed, run, score, generate, adapters): what heads, evaluators and benchmarks use
        self.language_model = LanguageModel(self._llm)
        self.llm = self._llm.module  # registered here: the frozen LLM's and its adapters' parameters are ``llm.*``
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
        head_args = dict(mcfg.head.args)
        if head_args.get("answer_template") == "prompts":  # the answer sentence of the task's prompt set
            try:
                head_args["answer_template"] = load_answer_template(mcfg.prompts.set or cfg.modality)
            except ValueError as exc:
                raise ConfigError(f"model.head.args.answer_template=prompts: {exc}") from None
        self.head = HEADS.build(
            {"type": mcfg.head.type, **head_args}, hidden_size=self.hidden_size,
            optional={"info": self.info, "llm": self.language_model},  # ``llm``: for heads that run text through it
        )
        self._build_auxiliary(mcfg)
        self.prompts = load_prompts(mcfg.prompts.set or cfg.modality, self.info)
        if mcfg.prompts.train_choice not in PROMPT_CHOICES:
            raise ConfigError(f"model.prompts.train_choice must be one of {list(PROMPT_CHOICES)}, "
                              f"got {mcfg.prompts.train_choice!r}")
        if mcfg.sequence not in SEQUENCE_ORDERS:
            raise ConfigError(f"model.sequence must be one of {list(SEQUENCE_ORDERS)}, got {mcfg.sequence!r}")
        #: per prompt index: (model-state key, its embedding / key-value cache), see _prompt_state
        self._prompt_states: dict[int, tuple[Any, dict[str, Any]]] = {}
        tok = self._llm.tokenizer
        if mcfg.prompts.chat_template and not len(self.encoders):
            raise ConfigError("model.prompts.chat_template: true applies to tasks with an encoder ([prompt | bridge "
                              "tokens]); this task has no encoder, its input is text joined to the prompt, which the "
                              "chat template would leave outside the user's message. Set it false for this task")
        # each prompt as it is, or as the user's message of the tokenizer's chat template (model.prompts.chat_template)
        ids = [prompt_token_ids(tok, p, mcfg.prompts.chat_template) for p in self.prompts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # The prompt sets are tokenised once; rows pick one by index.
        self.register_buffer(
            "prompt_ids", torch.tensor([i + [pad] * (width - len(i)) for i in ids]), persistent=False
        )
        self.register_buffer("prompt_lengths", torch.tensor([len(i) for i in ids]), persistent=False)
        # Tasks with no encoder take raw text (``input_text``/``target_text``), tokenised by the model.
        self.text_codec = TextCodec(tok, mcfg.text_input) if not len(self.encoders) else None
        if self.text_codec is not None and getattr(self.head, "choices", None):
            self.text_codec.check_choices(self.head.choices)
        self._hold_parameters(getattr(cfg.train, "train_only", None) or [], shared_llm=llm is not None)
        self._hold_unused_path(shared_llm=llm is not None)

    def _hold_parameters(self, patterns: list[str], shared_llm: bool = False) -> None:
        """``train.train_only``: only trainable parameters whose name matches one of these shell patterns
        keep training; the others are held fixed (no gradient) but stay in the checkpoint (a training stage
        that freezes what an earlier stage trained). ``shared_llm``: the LLM (and its adapters) belongs to a
        multi-task model, whose own ``train.train_only`` decides about them: the patterns reach this model's own
        parts only (encoders, bridge, head)."""
        self._held: set[str] = set(hold_unmatched(self, patterns, "train.train_only",
                                                  own=lambda n: not (shared_llm and n.startswith("llm."))))

    def _build_auxiliary(self, mcfg) -> None:
        """The configured auxiliary losses (``model.alignment``: see :mod:`allspark.auxiliary`), their modules
        registered here under the names they give (``alignment``, ``alignment_proj``: stable checkpoint names)."""
        self.auxiliary: AuxiliaryLosses = build_auxiliary_losses(mcfg, self)
        for name, module in self.auxiliary.parts().items():
            self.add_module(name, module)
        for name in ("alignment", "alignment_proj"):  # the alignment objective and its projections, or None
            if name not in self._modules:
                setattr(self, name, None)

    def _bridge_output_scale(self, setting: float | str) -> float:
        if setting == "embedding":
            return self.language_model.embedding_rms()
        if isinstance(setting, str):
            raise ConfigError(f"model.bridge.output_scale must be a number or 'embedding', got {setting!r}")
        return float(setting)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, info: dict[str, Any] | None = None) -> "AllSpark":
        return cls(cfg, info)

    @property
    def tokenizer(self):
        return self.language_model.tokenizer

    @property
    def num_modality_tokens(self) -> int:
        return self.bridge.num_queries if self.bridge is not None else 0

    # -- the evaluation prompt, built once per model state ---------------------------------------
    def _uniform_prompt(self, prompt_index: torch.Tensor | None) -> int | None:
        """The prompt every row uses where its embedding (and key/value cache) can be shared: evaluation
        (eval mode, no gradient) with one prompt for the whole batch; None otherwise."""
        if self.training or torch.is_grad_enabled():
            return None
        if prompt_index is None:
            return 0  # choose_prompts outside training: the first prompt
        if prompt_index.numel() and bool((prompt_index == prompt_index[0]).all()):
            return int(prompt_index[0])
        return None

    def _prompt_state(self, k: int, with_cache: bool) -> dict[str, Any]:
        """Prompt ``k``'s embedding ``emb`` [1, P, D] (padded width P) and, with ``with_cache``, its key/value
        states ``kv`` (per layer, [1, heads, L, head_dim]) and length ``length``. Rebuilt whenever any language
        model parameter's storage or version counter (bumped by every in-place update: optimizer steps, loads)
        or the autocast / inference mode changes."""
        device, lm = self.prompt_ids.device, self.language_model
        key = (device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
               torch.is_inference_mode_enabled(), lm.state_key())
        held = self._prompt_states.get(k)
        if held is None or held[0] != key:
            held = (key, {"emb": lm.embed(self.prompt_ids[k: k + 1])})
            self._prompt_states[k] = held
        state = held[1]
        if with_cache and "kv" not in state:
            length = int(self.prompt_lengths[k])
            cache = lm.run(state["emb"][:, :length], torch.ones(1, length, dtype=torch.long, device=device),
                           position_ids=torch.arange(length, device=device)[None], use_cache=True).cache
            state["kv"] = [(layer.keys, layer.values) for layer in cache.layers]
            state["length"] = length
        return state

    def _run_shared_prompts(self, modality: torch.Tensor, prompt_index: torch.Tensor, keep_prefix: bool = False
                            ) -> LLMOutput:
        """``prompt_first`` with gradients (training): each distinct prompt of the batch runs through the language
        model once (K prompts, K <= B rows), its key/value states are gathered per row, and only the N bridge
        tokens of every row run after them. The same function as the full forward over [prompt | pad | s_i] (the
        pads masked, positions over real tokens; checked in tests/test_sequence.py) at K * P + B * N token
        positions instead of B * (P + N): the prompts are most of the sequence (e.g. ~25 prompt tokens to 8 bridge
        tokens). ``hidden`` covers the bridge positions only, as in :meth:`_run_cached`."""
        device, lm = modality.device, self.language_model
        unique, inverse = torch.unique(prompt_index, return_inverse=True)
        lengths = self.prompt_lengths[unique]
        width = int(lengths.max())
        steps = torch.arange(width, device=device)
        p_mask = steps[None, :] < lengths[:, None]  # [K, width]
        p_emb = lm.embed(self.prompt_ids[unique, :width])
        out = lm.run(p_emb, p_mask, position_ids=steps[None].expand(len(unique), -1), use_cache=True)
        dtype = out.hidden.dtype
        b, n = modality.shape[:2]
        rows = cache_rows(out.cache, inverse)
        mask = torch.cat([p_mask[inverse], torch.ones(b, n, dtype=torch.bool, device=device)], dim=1)
        positions = lengths[inverse][:, None] + torch.arange(n, device=device)[None]
        hidden = lm.run(modality.to(dtype), mask, position_ids=positions, cache=rows, use_cache=True).hidden
        prefix = None
        if keep_prefix:  # ``rows`` now holds the keys/values of [prompt | pad | s_i]
            embeds = torch.cat([p_emb[inverse], modality.to(dtype)], dim=1)
            positions = torch.cat([steps[None].expand(b, -1), positions], dim=1)
            prefix = LMPrefix(embeds, mask, positions, torch.full((b,), width + n - 1, device=device),
                              lengths[inverse] + n, rows)
        return LLMOutput(hidden, torch.ones(b, n, dtype=torch.bool, device=device),
                         torch.full((b,), n - 1, device=device), n, modality_input=modality, prefix=prefix)

    def _run_cached(self, modality: torch.Tensor, k: int, keep_prefix: bool = False) -> LLMOutput:
        """``prompt_first`` evaluation: the N bridge tokens after prompt ``k``'s cached keys/values. ``hidden``
        covers the bridge positions only ([B, N, D]; the last one is the head's ``last`` token)."""
        from transformers import DynamicCache

        state = self._prompt_state(k, with_cache=True)
        b, n = modality.shape[:2]
        length, device = state["length"], modality.device
        cache = DynamicCache(ddp_cache_data=[(key.expand(b, -1, -1, -1), value.expand(b, -1, -1, -1))
                                             for key, value in state["kv"]])
        hidden = self.language_model.run(
            modality.to(state["emb"].dtype), torch.ones(b, length + n, dtype=torch.long, device=device),
            position_ids=torch.arange(length, length + n, device=device)[None].expand(b, -1), cache=cache,
            use_cache=True,
        ).hidden
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
        prefix = None
        if keep_prefix:  # ``cache`` now holds the keys/values of [prompt | s_i]
            embeds = torch.cat([state["emb"][:, :length].expand(b, -1, -1), modality.to(state["emb"].dtype)], dim=1)
            prefix = LMPrefix(embeds, torch.ones(b, length + n, dtype=torch.bool, device=device),
                              torch.arange(length + n, device=device)[None].expand(b, -1),
                              torch.full((b,), length + n - 1, device=device),
                              torch.full((b,), length + n, device=device), cache)
        return LLMOutput(hidden, mask, torch.full((b,), n - 1, device=device), n, modality_input=modality,
                         prefix=prefix)

    # -- forward -------------------------------------------------------------------------------
    def choose_prompts(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """In training a random prompt per example (``random``, paper III-E) or one per batch (``per_batch``); the
        first one otherwise (and with ``first``). Drawn from torch's global RNG on the CPU."""
        choice = self.cfg.model.prompts.train_choice
        if self.training and choice != "first" and len(self.prompts) > 1:
            if choice == "per_batch":
                return torch.randint(len(self.prompts), (1,), device="cpu").repeat(batch_size).to(device)
            return torch.randint(len(self.prompts), (batch_size,), device="cpu").to(device)
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def encode_tokens(self, batch: dict[str, Any]) -> list[Tokens]:
        """Each encoder's token set, in config order."""
        return [enc(batch) for enc in self.encoders]

    def encode(self, batch: dict[str, Any], token_sets: list[Tokens] | None = None) -> torch.Tensor:
        """Modality data (or already computed token sets) -> bridge tokens ``s_i`` [B, N, D]."""
        return self.bridge(self.encode_tokens(batch) if token_sets is None else token_sets)

    def _alignment_loss(self, what: str) -> AlignmentLoss:
        if "alignment" not in self.auxiliary:
            raise ValueError(f"{what} needs model.alignment.objective to be set")
        return self.auxiliary["alignment"]

    def pooled_features(self, token_sets: list[Tokens]) -> list[torch.Tensor]:
        """The alignment term's per-modality features [B, dim] (:meth:`allspark.auxiliary.AlignmentLoss.features`)."""
        return self._alignment_loss("pooled_features").features(self, token_sets)

    def alignment_score(self, token_sets: list[Tokens], features: list[torch.Tensor] | None = None
                        ) -> torch.Tensor | None:
        """The alignment objective's correlation score over all encoder pairs (None for a batch of one sample,
        where no (co)variance can be estimated). ``features``: :meth:`pooled_features`, if already computed."""
        loss = self._alignment_loss("alignment_score")
        if token_sets[0].tokens.shape[0] < 2:
            return None
        return loss.score(loss.features(self, token_sets) if features is None else features)

    def build_sequence(
        self, modality: torch.Tensor | None, batch_size: int, prompt_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate ``s_i`` and the embedded prompt; returns (inputs_embeds, attention_mask, last_index).
        With ``model.sequence: prompt_first`` the rows also need :meth:`_build`'s position ids."""
        return self._build(modality, batch_size, prompt_index)[:3]

    def _build(self, modality: torch.Tensor | None, batch_size: int, prompt_index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(inputs_embeds, attention_mask, last_index, position_ids or None for the default ones, modality_start)."""
        device = self.prompt_ids.device
        uniform = self._uniform_prompt(prompt_index)
        if prompt_index is None:
            prompt_index = self.choose_prompts(batch_size, device)
        ids = self.prompt_ids[prompt_index]  # [B, P]
        lengths = self.prompt_lengths[prompt_index]  # [B]
        if uniform is not None:  # evaluation: the one prompt's embedding, built once per model state
            prompt_emb = self._prompt_state(uniform, with_cache=False)["emb"].expand(batch_size, -1, -1)
        else:
            prompt_emb = self.language_model.embed(ids)
        n = 0 if modality is None else modality.shape[1]
        p_mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        if modality is None:
            return prompt_emb, p_mask, lengths - 1, None, 0
        if self.cfg.model.sequence == "prompt_first":
            width = int(lengths.max())  # [prompt | pad | s_i]: the pads between masked, positions over real tokens
            steps = torch.arange(width + n, device=device)
            x = torch.cat([prompt_emb[:, :width], modality.to(prompt_emb.dtype)], dim=1)
            mask = torch.cat([p_mask[:, :width], torch.ones(batch_size, n, dtype=torch.bool, device=device)], dim=1)
            positions = torch.where(steps < width, steps, lengths[:, None] + steps - width)
            return x, mask, torch.full((batch_size,), width + n - 1, device=device), positions, width
        x = torch.cat([modality.to(prompt_emb.dtype), prompt_emb], dim=1)
        mask = torch.cat([torch.ones(batch_size, n, dtype=torch.bool, device=device), p_mask], dim=1)
        return x, mask, n + lengths - 1, None, 0

    def run_llm(self, batch: dict[str, Any], token_sets: list[Tokens] | None = None) -> LLMOutput:
        if self.text_codec is not None and TEXT_INPUT_KEY in batch:
            # No encoder, the input is language: [prompt | input | target] (see allspark.language).
            return run_text_llm(self.language_model, self.text_codec, self.text_prompts(batch), batch)
        batch_size = _batch_size(batch)
        modality = self.encode(batch, token_sets) if self.bridge is not None else None
        prompt_index = batch.get("prompt_index")
        # a head that continues the sequence with tokens of its own (the verbalizer) gets it as LLMOutput.prefix
        keep_prefix = bool(getattr(self.head, "needs_prefix_cache", False))
        if modality is not None and self.cfg.model.sequence == "prompt_first":
            uniform = self._uniform_prompt(prompt_index)
            if uniform is not None:
                return self._run_cached(modality, uniform, keep_prefix)
            if self.cfg.model.prompt_sharing and not self.cfg.model.llm.gradient_checkpointing:
                # (gradient checkpointing re-runs layers without a key/value cache: the full forward then)
                if prompt_index is None:
                    prompt_index = self.choose_prompts(batch_size, modality.device)
                return self._run_shared_prompts(modality, prompt_index, keep_prefix)
        x, mask, last, positions, start = self._build(modality, batch_size, prompt_index)
        # no key/value cache unless the head continues the sequence (and none with gradient checkpointing in
        # training, which re-runs the layers without one: the head then runs full forwards over [x | its tokens])
        cache = keep_prefix and not (self.training and self.cfg.model.llm.gradient_checkpointing)
        out = self.language_model.run(x, mask, position_ids=positions, use_cache=cache)
        prefix = None
        if keep_prefix:
            if positions is None:
                positions = torch.arange(x.shape[1], device=x.device)[None].expand(batch_size, -1)
            prefix = LMPrefix(x, mask, positions, last, positions.gather(1, last[:, None])[:, 0] + 1,
                              out.cache if cache else None)
        return LLMOutput(out.hidden, mask, last, self.num_modality_tokens, modality_input=modality,
                         modality_start=start, prefix=prefix)

    def text_prompts(self, batch: dict[str, Any]) -> list[list[int]]:
        """Each row's prompt token ids for a text-input batch: the prompts ``batch["prompt_index"]`` names, else
        :meth:`choose_prompts`' (see :func:`allspark.language.prefix_rows`)."""
        prompt_index = batch.get("prompt_index")
        if prompt_index is None:
            prompt_index = self.choose_prompts(len(text_list(batch, TEXT_INPUT_KEY)), self.prompt_ids.device)
        return [self.prompt_ids[i, : self.prompt_lengths[i]].tolist() for i in prompt_index.tolist()]

    @property
    def uses_llm(self) -> bool:
        """Whether the head reads the language model's output. A head that declares ``uses_llm = False`` (the
        segmentation head with ``conditioning: none``: the ablation with the LLM path removed) gets ``None`` for
        it: :meth:`forward` runs the encoders only (they may leave what the head reads in the batch, as the dense
        encoders' feature maps), never the bridge or the language model, in training, evaluation and prediction,
        and the parameters only that path trains (the adapters, the bridge unless an auxiliary loss uses it) are
        held (:meth:`_hold_unused_path`)."""
        return bool(getattr(self.head, "uses_llm", True))

    def _hold_unused_path(self, shared_llm: bool = False) -> None:
        """With a head that reads nothing of the LLM (:attr:`uses_llm` False), hold the trainable parameters of
        the path it removes -- the LLM's adapters (unless the LLM is shared with other tasks, ``shared_llm``), and
        the bridge unless an auxiliary loss runs it (``model.alignment.level: bridge``) -- as ``train.train_only``
        holds: no gradient, not in the optimizer (so a multi-process run has no unused parameter), still in the
        checkpoint (its layout does not change)."""
        if self.uses_llm:
            return
        bridge_used = any(getattr(loss, "uses_bridge", False) for loss in self.auxiliary.losses.values())
        for name, p in self.named_parameters():
            if p.requires_grad and ((name.startswith("llm.") and not shared_llm)
                                    or (name.startswith("bridge.") and not bridge_used)):
                p.requires_grad_(False)
                self._held.add(name)

    def forward(self, batch: dict[str, Any]) -> Output:
        """encode -> (auxiliary losses, training only) -> language model -> head -> the weighted sum of the losses.
        With a task weight of 0 (an auxiliary-only stage) training batches skip the language model and the head;
        with a head that reads nothing of the LLM (:attr:`uses_llm` False) every batch skips the bridge and the
        language model (the head gets ``None`` for their output)."""
        auxiliary = self.training and bool(self.auxiliary)
        if not auxiliary and self.uses_llm:
            return self.head(self.run_llm(batch), batch)
        token_sets = self.encode_tokens(batch)
        terms = self.auxiliary.terms(self, batch, token_sets) if auxiliary else {}
        out = None
        if not auxiliary or self.auxiliary.task_weight != 0:
            out = self.head(self.run_llm(batch, token_sets) if self.uses_llm else None, batch)
        return self.auxiliary.combine(out, terms) if auxiliary else out

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        try:
            return self(batch).predictions
        finally:
            self.train(was_training)

    @torch.no_grad()
    def ask(self, batch: dict[str, Any], prompts: str | list[str], *, max_new_tokens: int = 32,
            do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Free-form answers: the language model continues each sample's sequence with text, through
        transformers' ``generate`` on ``inputs_embeds``. The user's ``prompts`` (one for all rows or one per row)
        take the place of the task prompt: ``[prompt | bridge tokens]`` (``prompt_first``) or ``[bridge tokens |
        prompt]`` (``modality_first``), rows left-padded; each prompt wrapped in the tokenizer's chat template when
        ``model.prompts.chat_template`` is on, as the task prompts are; greedy unless ``do_sample`` (then
        ``temperature`` and ``top_p``; seed torch for repeatable samples). Returns the decoded answers (special
        tokens dropped).

        What the answer is worth depends on training: a task trained with a linear head never asked the LLM
        for words; one trained with the ``verbalizer`` head answers with its class names."""
        if self.bridge is None:
            raise ValueError("ask needs a modality task (an encoder and the bridge); text and code tasks answer "
                             "through their language_model head")
        b = _batch_size(batch)
        if isinstance(prompts, str):
            prompts = [prompts] * b
        if not isinstance(prompts, (list, tuple)) or len(prompts) != b or not all(isinstance(q, str) for q in prompts):
            raise ValueError(f"ask: expected one prompt string or a list of {b} (one per row), got {prompts!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"ask: max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        was_training = self.training
        self.eval()
        try:
            modality = self.encode(batch)  # [B, N, D]
            lm = self.language_model
            tok, embed = lm.tokenizer, lm.embed
            dtype, device = lm.embedding_dtype, lm.device
            rows = []
            for i, q in enumerate(prompts):
                ids = torch.tensor(prompt_token_ids(tok, q, self.cfg.model.prompts.chat_template), dtype=torch.long,
                                   device=device)
                parts = [embed(ids), modality[i].to(dtype)]
                rows.append(torch.cat(parts if self.cfg.model.sequence == "prompt_first" else parts[::-1], dim=0))
            width = max(r.shape[0] for r in rows)
            x = torch.zeros(b, width, rows[0].shape[1], dtype=dtype, device=device)
            mask = torch.zeros(b, width, dtype=torch.long, device=device)
            for i, r in enumerate(rows):  # left padding: generation continues every row at its end
                x[i, width - r.shape[0]:] = r
                mask[i, width - r.shape[0]:] = 1
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)} if do_sample \
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = lm.generate(x, mask, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                              **sampling)
            return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
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

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights, the resolved config and the data info, atomically.

        With a LoRA adapter (through PEFT) the folder also holds ``adapter/`` in PEFT's own format
        (``adapter_config.json`` + ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base_llm,
        directory / "adapter")`` loads onto the same base LLM. ``state``: the trainable state to write (default:
        :meth:`trainable_state_dict`); a sharded run passes the one it gathered across processes.
        """
        expected = self.trainable_state_dict()
        if state is None:
            state = expected
        elif set(state) != set(expected):
            raise ValueError(f"save_pretrained: the state to write has {sorted(set(state) ^ set(expected))[:6]} "
                             "not matching the model's trainable names")
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        adapter = self.peft_adapter(state)
        with atomic_dir(directory) as tmp:
            # save_file, not checkpoints.save_trainable_state: tests patch allspark.model.save_file
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "allspark": "1"})
            save_config(self.cfg, tmp / CONFIG_NAME)
            write_info(tmp / INFO_NAME, self.info)
            write_peft_adapter(tmp, adapter)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None) -> str:
        """Upload what :meth:`save_pretrained` writes (trainable parts, config, data info, PEFT adapter folder) to
        the Hugging Face Hub model repository ``repo_id`` (created if it does not exist) in one commit, through
        ``huggingface_hub.upload_folder``; returns the commit's URL. ``AllSpark.from_pretrained`` loads a local
        copy of the repository (e.g. ``huggingface_hub.snapshot_download(repo_id)``). For a plain transformers
        model with the adapters merged, use ``allspark export --push-to-hub``. See :mod:`allspark.hub`."""
        import tempfile

        from allspark.hub import check_repo_id, push_folder

        check_repo_id(repo_id)  # a bad id (or no huggingface_hub) fails before anything is written
        with tempfile.TemporaryDirectory(prefix="allspark-push-") as tmp:
            folder = Path(tmp) / "checkpoint"
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    def peft_adapter(self, state: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """The LoRA adapter as PEFT saves it: its ``LoraConfig`` and its weights under the names of
        ``PeftModel.save_pretrained`` (``base_model.model.<module>.lora_A.weight``), taken from ``state``
        (default: :meth:`trainable_state_dict`); None for other adapters."""
        if self.language_model.adapter != "lora":
            return None
        state = self.trainable_state_dict() if state is None else state
        prefix = "llm.model."
        llm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return self.language_model.peft_adapter(llm_state, self.cfg.model.llm.name)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, trust_remote_code: bool = False, allow_download: bool = False,
                        revision: str | None = None, **overrides: Any) -> "AllSpark":
        """Rebuild from ``save_pretrained`` output: the frozen LLM and backbones come from where the
        config says; the trainable parts from the safetensors file (no pickle).

        ``directory``: a local folder (written by ``save_pretrained``, or by ``allspark export``: its ``allspark/``
        parts then load on the exported LLM beside them), or a Hugging Face Hub model id ``namespace/name`` or
        ``namespace/name@revision`` (``revision=`` says the same) of a repository holding either, downloaded with
        ``huggingface_hub.snapshot_download`` because the caller named it, and only when no local path has that
        name (:func:`allspark.hub.resolve_pretrained`; a failed download is one :class:`allspark.hub.HubError`).

        ``overrides``: dotted config keys applied to the saved config before the model is built, e.g.
        ``AllSpark.from_pretrained(ckpt, **{"model.llm.name": "/models/llm", "model.llm.dtype": "float32"})`` (the
        LLM folder has moved; another dtype). An unknown key is a :class:`ConfigError`, and so is an override that
        changes the shape of a trained part (its weights no longer load).

        A checkpoint is data, not a permission: its saved ``model.llm.trust_remote_code`` is ignored (the LLM
        loads with the caller's ``trust_remote_code``, off unless asked for; an override cannot set it either), and
        a Hugging Face hub id as its ``model.llm.name`` (which loading may download) is refused unless the caller
        passes ``allow_download``. A hub id the caller names as an override (``model.llm.name``) is the caller's
        own choice and loads."""
        from allspark.config import apply_overrides, from_dict
        from allspark.errors import UserError, UserFileNotFoundError
        from allspark.hub import resolve_pretrained
        from allspark.llm import llm_source

        if _overrides_set(overrides, "model.llm.trust_remote_code"):
            raise ConfigError("from_pretrained: model.llm.trust_remote_code cannot be given as an override; pass "
                              "trust_remote_code=True (evaluate.py --trust-remote-code) to let the LLM run its code")
        folder, hub_id = resolve_pretrained(directory, revision=revision)
        export_root = None  # an ``allspark export`` folder: the merged LLM, its parts under allspark/
        if not (folder / CONFIG_NAME).is_file() and (folder / EXPORT_PARTS_DIR / CONFIG_NAME).is_file():
            export_root, folder = folder, folder / EXPORT_PARTS_DIR
        elif folder.name == EXPORT_PARTS_DIR and (folder.parent / "config.json").is_file():
            export_root = folder.parent
        named = str(folder) if hub_id is None else f"{hub_id} (downloaded to {folder})"
        for name in (WEIGHTS_NAME, CONFIG_NAME, INFO_NAME):
            if not (folder / name).is_file():
                raise UserFileNotFoundError(
                    f"{named} is not an AllSpark checkpoint: {name} is missing "
                    f"(expected {WEIGHTS_NAME}, {CONFIG_NAME}, {INFO_NAME})"
                )
        label = str(folder / CONFIG_NAME) if hub_id is None else f"{folder / CONFIG_NAME} (Hub checkpoint {hub_id})"
        cfg = config_from_yaml_text((folder / CONFIG_NAME).read_text())
        if overrides:
            cfg = from_dict(Config, apply_overrides(to_dict(cfg), dict(overrides)))
        llm = cfg.model.llm
        caller_named_llm = _overrides_set(overrides, "model.llm.name")
        llm_label = "from_pretrained override" if caller_named_llm else label  # who named the LLM
        if not caller_named_llm and export_root is not None and not Path(llm.name).expanduser().is_dir():
            # an export's config names the folder it was written to; moved or downloaded, the LLM is beside it
            logger.info("%s: model.llm.name %s is not here; loading the exported LLM at %s", label, llm.name,
                        export_root)
            llm.name = str(export_root.resolve())
        if llm.trust_remote_code and not trust_remote_code:
            logger.warning("%s sets model.llm.trust_remote_code: true; loading with it off (a checkpoint cannot "
                           "grant it: pass trust_remote_code=True, evaluate.py --trust-remote-code)", label)
        llm.trust_remote_code = bool(trust_remote_code)
        try:
            source = llm_source(llm.name)
        except UserError as exc:  # e.g. the checkpoint's LLM folder has moved: say which config names it
            raise type(exc)(f"{llm_label}: {exc}") from None
        if source == "hub" and not allow_download and not caller_named_llm:
            raise UserError(
                f"{label}: model.llm.name is {llm.name!r}, a Hugging Face hub id, which loading "
                "may download (and run); a checkpoint's config cannot ask for that. Pass allow_download=True "
                "(evaluate.py --allow-download) to allow it, or copy the checkpoint and set model.llm.name in its "
                "config.yaml to a local model folder (or pass it as an override, model.llm.name)"
            )
        info = json.loads((folder / INFO_NAME).read_text())
        model = cls(cfg, info)
        try:
            model.load_trainable_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        except ValueError as exc:
            if not overrides:
                raise
            raise ConfigError(f"{named}: with the overrides {sorted(overrides)}, {exc}") from None
        return model

    def merged_llm(self):
        """The language model with the adapters merged into its weights (for export)."""
        return self.language_model.merge_adapters()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _overrides_set(overrides: dict[str, Any], dotted: str) -> bool:
    """Whether the dotted ``overrides`` set ``dotted``: as that key, or inside the mapping given to a section above
    it (``{"model.llm": {"name": ...}}``)."""
    for key, value in overrides.items():
        if key == dotted:
            return True
        if dotted.startswith(key + ".") and isinstance(value, dict):
            node: Any = value
            for part in dotted[len(key) + 1:].split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return True
    return False


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


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """``python -m allspark export``: a checkpoint in standard formats, written atomically to a new folder ``out``.

    ``out`` is a plain transformers folder: the LLM with its LoRA adapter merged into its weights by PEFT's
    ``merge_and_unload`` (with no adapter, the base LLM) and its tokenizer, both written by ``save_pretrained``,
    so ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it.
    ``out/allspark/`` holds the package's own trained parts (encoders, bridge, head, ...) as ``model.safetensors``,
    the data info and the config, whose ``model.llm`` names ``out`` (as an absolute path) with no adapter, so that
    ``AllSpark.from_pretrained(out / "allspark")`` rebuilds the model on the merged LLM (after moving the folder,
    edit that name). ``checkpoint``: a run folder (its ``best/`` is used) or a ``save_pretrained`` folder. Returns
    ``out``. The bottleneck adapter cannot be merged into any weight; exporting it is refused with a clear error.
    """
    import dataclasses
    import shutil

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from allspark.config import AdapterConfig, from_dict
    from allspark.errors import UserError, UserFileNotFoundError
    from allspark.llm import llm_source

    checkpoint = resolve_checkpoint(Path(checkpoint).expanduser())
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise UserError(f"--out {out} exists already; export writes a new folder (remove it or name another)")
    for name in (WEIGHTS_NAME, CONFIG_NAME, INFO_NAME):
        if not (checkpoint / name).is_file():
            raise UserFileNotFoundError(f"{checkpoint} is not an AllSpark checkpoint: {name} is missing")
    cfg = config_from_yaml_text((checkpoint / CONFIG_NAME).read_text())
    llm_cfg = cfg.model.llm
    adapter = llm_cfg.adapter.type
    if adapter == "bottleneck":
        raise UserError(
            f"{checkpoint}: the bottleneck adapter cannot be merged into the LLM weights (down-projection, GELU, "
            "up-projection is non-linear, so no weight matrix can absorb it); only adapter.type lora or none exports"
        )
    if llm_source(llm_cfg.name) == "hub":
        raise UserError(
            f"{checkpoint / CONFIG_NAME}: model.llm.name is {llm_cfg.name!r}, a Hugging Face hub id, which loading "
            "may download; set it to a local model folder to export"
        )
    state = load_file(str(checkpoint / WEIGHTS_NAME))
    prefix = "llm.model."
    llm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    stray = sorted(k for k in state if k.startswith("llm.") and not k.startswith(prefix))
    if stray:
        raise UserError(f"{checkpoint / WEIGHTS_NAME}: unexpected LLM tensors {stray[:4]}")
    # unquantised: the LoRA weights merge into the real base weights (a quantised run's export is full precision)
    base = load_llm(dataclasses.replace(llm_cfg, adapter=AdapterConfig(type="none"), gradient_checkpointing=False,
                                        trust_remote_code=False, quantization="none"))
    if adapter == "lora":
        a = llm_cfg.adapter
        peft_model = get_peft_model(base.model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                           target_modules=list(a.target_modules)))
        lora = get_peft_model_state_dict(peft_model, state_dict={PEFT_PREFIX + k: v for k, v in llm_state.items()})
        result = set_peft_model_state_dict(peft_model, lora)
        expected = {k for k in peft_model.state_dict() if "lora_" in k}
        missing = sorted(k for k in result.missing_keys if k in expected)
        if len(lora) != len(llm_state) or missing or result.unexpected_keys:
            raise UserError(
                f"{checkpoint / WEIGHTS_NAME}: its LoRA weights do not match the adapter of its config "
                f"(missing {missing[:4]}, unexpected {list(result.unexpected_keys)[:4]}, "
                f"{len(llm_state) - len(lora)} LLM tensors that are no LoRA weight)"
            )
        merged = peft_model.merge_and_unload(safe_merge=True)
    elif llm_state:
        raise UserError(f"{checkpoint / WEIGHTS_NAME} holds LLM tensors {sorted(llm_state)[:4]} but its config "
                        f"sets adapter.type {adapter!r}")
    else:
        merged = base.model
    merged.eval()
    parts = {k: v.contiguous() for k, v in state.items() if not k.startswith("llm.")}
    exported = to_dict(cfg)
    exported["model"]["llm"].update(name=str(out), trust_remote_code=False, gradient_checkpointing=False,
                                    quantization="none")
    exported["model"]["llm"]["adapter"]["type"] = "none"
    exported["train"]["train_only"] = []  # the exported parts are all there is to hold
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_PARTS_DIR).mkdir()
        save_file(parts, str(tmp / EXPORT_PARTS_DIR / WEIGHTS_NAME), metadata={"format": "pt", "allspark": "1"})
        save_config(from_dict(Config, exported), tmp / EXPORT_PARTS_DIR / CONFIG_NAME)
        shutil.copy2(checkpoint / INFO_NAME, tmp / EXPORT_PARTS_DIR / INFO_NAME)
        if (checkpoint / "README.md").is_file():  # the model card, the page a model hub shows
            shutil.copy2(checkpoint / "README.md", tmp / "README.md")
    logger.info("exported %s to %s (LLM adapter %s merged)", checkpoint, out, adapter)
    return out
