"""The LLM's own decoder as task head (text, code: paper Section III-E, "1D" modalities).

Training is teacher-forced language modelling of the target tokens only (the label word, the docstring, and
the end-of-sequence token): the LLM's LM head (``LanguageModel.logits``) is applied at the positions that predict
target tokens and nowhere else, never as full-vocabulary logits over the whole sequence.

With ``choices`` (by default the dataset's ``class_names``, e.g. ``["negative", "positive"]``) the head also
classifies outside training: it scores each choice's log-likelihood after the row's prefix (one prefix pass,
its key/value cache reused for every choice; see :func:`allspark.language.score_continuations`) and
predicts the most likely one.

Predictions: ``nll`` (mean negative log-likelihood of the row's target tokens), ``target_tokens``,
``truncated`` (the input exceeded ``model.text_input.max_input_tokens``), and with choices ``choice_loglik``
[B, K] and ``pred``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.language import TextLLMOutput
from allspark.registry import HEADS
from allspark.types import LLMOutput, Output


@HEADS.register("language_model")
class LanguageModelHead(nn.Module):
    """Teacher-forced LM loss on the target tokens; label choice by log-likelihood. No own parameters."""

    def __init__(self, hidden_size: int, *, info: dict[str, Any] | None = None,
                 choices: list[str] | None = None, use_class_names: bool = True) -> None:
        super().__init__()
        if choices is None and use_class_names and info and info.get("class_names"):
            choices = [str(c) for c in info["class_names"]]
        if choices is not None:
            if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"language_model head: choices must be a list of at least two non-empty strings, got {choices!r}")
            if len(set(choices)) != len(choices):
                raise ValueError(f"language_model head: choices repeat: {choices}")
        self.choices = list(choices) if choices is not None else None
        self.hidden_size = hidden_size

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        if not isinstance(llm_out, TextLLMOutput):
            raise ValueError(
                "the language_model head needs the text-input path: a task with no encoder whose batch carries "
                "'input_text' (and 'target_text' for the loss); this batch went through the modality bridge")
        predictions: dict[str, torch.Tensor] = {"truncated": llm_out.input_truncated}
        loss = None
        mask = llm_out.target_mask
        batch_size = mask.shape[0]
        if mask.any():
            rows = torch.arange(batch_size, device=mask.device)[:, None].expand_as(mask)[mask]
            hidden = llm_out.hidden[rows, llm_out.target_positions[mask]]  # [N target tokens, D]
            logits = llm_out.language_model.logits(hidden).float()
            token_nll = F.cross_entropy(logits, llm_out.target_ids[mask], reduction="none")
            loss = token_nll.mean()
            count = mask.sum(1)
            per_row = torch.zeros(batch_size, dtype=torch.float32, device=mask.device).index_add_(0, rows, token_nll.detach())
            predictions["nll"] = per_row / count.clamp_min(1)
            predictions["target_tokens"] = count
        if self.choices is not None and not self.training:
            scores = llm_out.scorer(self.choices)
            predictions["choice_loglik"] = scores
            predictions["pred"] = scores.argmax(dim=-1)
        return Output(loss, predictions)
