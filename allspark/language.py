"""The text-input path: tasks whose input is language already (text, code; the paper's f(m) = T(m)).

No encoder and no bridge run. A reader of such a task yields raw strings: ``input_text`` (a review, a
function's code) and ``target_text`` (the answer: a label word, a docstring). **The model tokenises them**,
with the LLM's own tokenizer, when the batch reaches it (:func:`run_text_llm`). This keeps readers
independent of the model (no tokenizer to pass into a dataset, no tokenizer name to repeat in the data
config) and makes a checkpoint tokenise exactly as it was trained, whatever reads the data.

Per example the sequence is (``model.text_input`` in the config sets the budgets)::

    [prompt | sep | input tokens | sep | target tokens | eos | pad ...]

right-padded with an attention mask. An input longer than ``max_input_tokens`` is truncated (its first tokens
are kept with ``keep: head``, its last with ``keep: tail``); every example carries an ``input_truncated``
flag that the evaluation protocols count. The ``language_model`` head (``heads/language.py``) applies the
LLM's ``lm_head`` only at the positions that predict target tokens: a full-vocabulary projection over the
whole sequence would cost several times the decoder itself.

Candidate scoring (the log-likelihood of each of K continuations of one prefix: label words, a pool of
docstrings) reuses the shared prefix: :func:`score_continuations` runs the prefixes ``[prompt | sep | input |
sep]`` once with ``use_cache``, copies each prefix's key/value cache (a ``transformers.DynamicCache``) to its
candidate rows, and runs only the candidate tokens. ``reuse_prefix=False`` computes the same numbers with one
full forward per (prefix, candidate) row; the tests check both agree and ``benchmarks/scoring.py`` times them.

Everything here reaches the LLM through :class:`allspark.lm.LanguageModel` (the scoring, generation and pooling
functions below are the free-function form of its methods and take it or a ``LoadedLLM``); nothing here knows the
model class: :func:`prefix_rows` takes anything with a ``text_codec`` and ``text_prompts`` (:class:`TextTask`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch

from allspark.config import ConfigError
from allspark.lm import LanguageModel, adapters_off, pad_rows
from allspark.types import LLMOutput, LMPrefix

if TYPE_CHECKING:  # pragma: no cover
    from allspark.config import TextInputConfig
    from allspark.llm import LoadedLLM

__all__ = [
    "INPUT_KEY",
    "TARGET_KEY",
    "TextCodec",
    "TextLLMOutput",
    "TextTask",
    "run_text_llm",
    "text_prefixes",
    "prefix_rows",
    "score_continuations",
    "continuation_loglik",
    "greedy_generate",
    "pooled_embeddings",
    "adapters_off",
    "text_list",
]

INPUT_KEY = "input_text"
TARGET_KEY = "target_text"


def text_list(batch: dict[str, Any], key: str) -> list[str]:
    """``batch[key]`` as a list of strings (what ``default_collate`` makes of string items)."""
    if key not in batch:
        raise ValueError(f"batch is missing key {key!r}; it has {sorted(batch)}")
    value = batch[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"batch[{key!r}] must be a list of strings (raw text; the model tokenises it), "
                         f"got {type(value).__name__}")
    return list(value)


class TextCodec:
    """Tokenises inputs and targets with the LLM's tokenizer under the configured budgets."""

    def __init__(self, tokenizer: Any, cfg: "TextInputConfig") -> None:
        if cfg.keep not in ("head", "tail"):
            raise ValueError(f"model.text_input.keep must be 'head' or 'tail', got {cfg.keep!r}")
        if cfg.max_input_tokens < 1 or cfg.max_target_tokens < 1:
            raise ValueError("model.text_input.max_input_tokens and max_target_tokens must be >= 1, got "
                             f"{cfg.max_input_tokens} and {cfg.max_target_tokens}")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.sep = list(tokenizer(cfg.separator, add_special_tokens=False)["input_ids"]) if cfg.separator else []
        self.eos_id = tokenizer.eos_token_id
        if cfg.append_eos and self.eos_id is None:
            raise ValueError("model.text_input.append_eos is on but the tokenizer has no end-of-sequence token")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_inputs(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each input within ``max_input_tokens`` and whether it was truncated."""
        budget = self.cfg.max_input_tokens
        out, truncated = [], []
        for ids in self._ids(texts):
            truncated.append(len(ids) > budget)
            out.append(ids[:budget] if self.cfg.keep == "head" else ids[len(ids) - budget:] if len(ids) > budget else ids)
        return out, truncated

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each target within ``max_target_tokens``, then the end-of-sequence token."""
        eos = [self.eos_id] if self.cfg.append_eos else []
        out = [ids[: self.cfg.max_target_tokens] + eos for ids in self._ids(texts)]
        for text, ids in zip(texts, out):
            if not ids:
                raise ValueError(f"target text {text!r} has no tokens (and model.text_input.append_eos is off)")
        return out

    def check_choices(self, choices: Sequence[str]) -> None:
        """Answers scored whole (class words): each must fit ``max_target_tokens``, which would otherwise cut it
        (in training targets and in scoring alike). A ``ConfigError`` names the longest one."""
        budget = self.cfg.max_target_tokens
        lengths = {c: len(ids) for c, ids in zip(choices, self._ids(list(choices)))}
        over = {c: n for c, n in lengths.items() if n > budget}
        if over:
            name = max(over, key=over.get)
            raise ConfigError(f"model.text_input.max_target_tokens={budget} is shorter than the answer {name!r} "
                              f"({over[name]} tokens; {len(over)} of {len(lengths)} class names are longer): "
                              f"raise it to at least {over[name]} so every class name is scored whole")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class TextLLMOutput(LLMOutput):
    """:class:`LLMOutput` of the text-input path, plus what the language-model head needs.

    ``target_positions[b, t]`` is the position whose hidden state predicts target token ``t`` of row ``b``;
    ``language_model`` the LLM (its :meth:`~allspark.lm.LanguageModel.logits` is the LM head);
    ``scorer(candidates)`` gives the log-likelihood of each candidate string after each row's prefix
    ([prompt | sep | input | sep]) as a [B, K] tensor, reusing the prefix's key/value cache.
    """

    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_positions: torch.Tensor
    input_truncated: torch.Tensor
    language_model: LanguageModel
    scorer: Callable[[Sequence[str]], torch.Tensor]


class TextTask(Protocol):
    """What :func:`prefix_rows` reads of a model: its codec and each row's prompt token ids."""

    text_codec: TextCodec | None

    def text_prompts(self, batch: dict[str, Any]) -> list[list[int]]: ...


def text_prefixes(codec: TextCodec, prompts: Sequence[Sequence[int]], batch: dict[str, Any]
                  ) -> tuple[list[list[int]], list[bool]]:
    """``[prompt | sep | input | sep]`` token ids per example (``prompts``: each row's prompt ids), and which
    inputs were truncated."""
    inputs, truncated = codec.encode_inputs(text_list(batch, INPUT_KEY))
    return [list(p) + codec.sep + x + codec.sep for p, x in zip(prompts, inputs)], truncated


def prefix_rows(model: TextTask, batch: dict[str, Any]) -> tuple[list[list[int]], list[bool]]:
    """``[prompt | sep | input | sep]`` token ids per example of a text task's batch (the prompts its
    ``prompt_index`` names, else the model's choice), and which inputs were truncated."""
    return text_prefixes(model.text_codec, model.text_prompts(batch), batch)


def run_text_llm(lm: LanguageModel, codec: TextCodec, prompts: Sequence[Sequence[int]], batch: dict[str, Any]
                 ) -> TextLLMOutput:
    """The decoder over ``[prompt | sep | input | sep | target | eos]`` (no target when the batch has none);
    ``prompts``: each row's prompt token ids."""
    device = lm.device
    prefixes, truncated = text_prefixes(codec, prompts, batch)
    batch_size = len(prefixes)
    targets = codec.encode_targets(text_list(batch, TARGET_KEY)) if TARGET_KEY in batch else [[] for _ in prefixes]
    if len(targets) != batch_size:
        raise ValueError(f"batch[{TARGET_KEY!r}] has {len(targets)} strings for {batch_size} inputs")
    ids, lengths = pad_rows([p + t for p, t in zip(prefixes, targets)], codec.pad_id, device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
    hidden = lm.run(lm.embed(ids), mask).hidden
    prefix_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long, device=device)
    target_ids, target_len = pad_rows(targets, codec.pad_id, device)
    steps = torch.arange(target_ids.shape[1], device=device)
    target_mask = steps[None, :] < target_len[:, None]
    positions = torch.where(target_mask, prefix_len[:, None] - 1 + steps[None, :], torch.zeros_like(target_ids))
    scorer = functools.partial(_score_strings, lm, codec, prefixes)
    return TextLLMOutput(
        hidden, mask, prefix_len - 1, 0, target_ids=target_ids, target_mask=target_mask,
        target_positions=positions, input_truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
        language_model=lm, scorer=scorer,
    )


def _score_strings(lm: LanguageModel, codec: TextCodec, prefixes: list[list[int]], candidates: Sequence[str],
                   **kwargs: Any) -> torch.Tensor:
    if isinstance(candidates, str) or not candidates:
        raise ValueError(f"candidates must be a non-empty list of strings, got {candidates!r}")
    return lm.score_continuations(prefixes, codec.encode_targets(candidates), pad_id=codec.pad_id, **kwargs)


# -- the free-function form of LanguageModel's scoring, generation and pooling (a LoadedLLM is accepted too) ----


def score_continuations(llm: "LanguageModel | LoadedLLM", prefixes: Sequence[Sequence[int]],
                        candidates: Sequence[Any], **kwargs: Any) -> torch.Tensor:
    """:meth:`allspark.lm.LanguageModel.score_continuations`."""
    return LanguageModel.of(llm).score_continuations(prefixes, candidates, **kwargs)


def continuation_loglik(llm: "LanguageModel | LoadedLLM", prefix: LMPrefix, last_hidden: torch.Tensor,
                        candidates: Sequence[Sequence[int]], **kwargs: Any) -> torch.Tensor:
    """:meth:`allspark.lm.LanguageModel.continuation_loglik`."""
    return LanguageModel.of(llm).continuation_loglik(prefix, last_hidden, candidates, **kwargs)


def greedy_generate(llm: "LanguageModel | LoadedLLM", prefixes: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_id: int | None, pad_id: int = 0) -> list[list[int]]:
    """:meth:`allspark.lm.LanguageModel.greedy_generate`."""
    return LanguageModel.of(llm).greedy_generate(prefixes, max_new_tokens, eos_id, pad_id)


def pooled_embeddings(llm: "LanguageModel | LoadedLLM", rows: Sequence[Sequence[int]], **kwargs: Any) -> torch.Tensor:
    """:meth:`allspark.lm.LanguageModel.pooled_embeddings`."""
    return LanguageModel.of(llm).pooled_embeddings(rows, **kwargs)
