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
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.types import LLMOutput, LMPrefix

if TYPE_CHECKING:  # pragma: no cover
    from allspark.config import TextInputConfig
    from allspark.llm import LoadedLLM
    from allspark.model import AllSpark

__all__ = [
    "INPUT_KEY",
    "TARGET_KEY",
    "TextCodec",
    "TextLLMOutput",
    "run_text_llm",
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

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class TextLLMOutput(LLMOutput):
    """:class:`LLMOutput` of the text-input path, plus what the language-model head needs.

    ``target_positions[b, t]`` is the position whose hidden state predicts target token ``t`` of row ``b``;
    ``scorer(candidates)`` gives the log-likelihood of each candidate string after each row's prefix
    ([prompt | sep | input | sep]) as a [B, K] tensor, reusing the prefix's key/value cache.
    """

    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_positions: torch.Tensor
    input_truncated: torch.Tensor
    lm_head: nn.Module
    scorer: Callable[[Sequence[str]], torch.Tensor]


def _pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    width = max(1, int(lengths.max())) if len(rows) else 1
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long, device=device)
    return ids, lengths


def prefix_rows(model: "AllSpark", batch: dict[str, Any]) -> tuple[list[list[int]], list[bool]]:
    """``[prompt | sep | input | sep]`` token ids per example, and which inputs were truncated."""
    codec: TextCodec = model.text_codec
    inputs, truncated = codec.encode_inputs(text_list(batch, INPUT_KEY))
    prompt_index = batch.get("prompt_index")
    if prompt_index is None:
        prompt_index = model.choose_prompts(len(inputs), model.prompt_ids.device)
    prompts = [model.prompt_ids[i, : model.prompt_lengths[i]].tolist() for i in prompt_index.tolist()]
    return [p + codec.sep + x + codec.sep for p, x in zip(prompts, inputs)], truncated


def run_text_llm(model: "AllSpark", batch: dict[str, Any]) -> TextLLMOutput:
    """The decoder over ``[prompt | sep | input | sep | target | eos]`` (no target when the batch has none)."""
    llm = model._llm
    device = model.prompt_ids.device
    codec: TextCodec = model.text_codec
    prefixes, truncated = prefix_rows(model, batch)
    batch_size = len(prefixes)
    targets = codec.encode_targets(text_list(batch, TARGET_KEY)) if TARGET_KEY in batch else [[] for _ in prefixes]
    if len(targets) != batch_size:
        raise ValueError(f"batch[{TARGET_KEY!r}] has {len(targets)} strings for {batch_size} inputs")
    ids, lengths = _pad([p + t for p, t in zip(prefixes, targets)], codec.pad_id, device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
    hidden = llm.decoder(inputs_embeds=llm.embed_tokens(ids), attention_mask=mask.long()).last_hidden_state
    prefix_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long, device=device)
    target_ids, target_len = _pad(targets, codec.pad_id, device)
    steps = torch.arange(target_ids.shape[1], device=device)
    target_mask = steps[None, :] < target_len[:, None]
    positions = torch.where(target_mask, prefix_len[:, None] - 1 + steps[None, :], torch.zeros_like(target_ids))
    scorer = functools.partial(_score_strings, llm, codec, prefixes)
    return TextLLMOutput(
        hidden, mask, prefix_len - 1, 0, target_ids=target_ids, target_mask=target_mask,
        target_positions=positions, input_truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
        lm_head=llm.lm_head, scorer=scorer,
    )


def _score_strings(llm: "LoadedLLM", codec: TextCodec, prefixes: list[list[int]], candidates: Sequence[str],
                   **kwargs: Any) -> torch.Tensor:
    if isinstance(candidates, str) or not candidates:
        raise ValueError(f"candidates must be a non-empty list of strings, got {candidates!r}")
    return score_continuations(llm, prefixes, codec.encode_targets(candidates), pad_id=codec.pad_id, **kwargs)


def _rows_of(prefixes: Sequence[Sequence[int]], candidates: Sequence[Any]) -> list[list[list[int]]]:
    """Per-prefix candidate lists: one list shared by every prefix, or one list per prefix."""
    if not candidates:
        raise ValueError("no candidates to score")
    shared = isinstance(candidates[0][0], int) if len(candidates[0]) else True
    per = [list(candidates)] * len(prefixes) if shared else [list(c) for c in candidates]
    if len(per) != len(prefixes):
        raise ValueError(f"{len(per)} candidate lists for {len(prefixes)} prefixes")
    for cands in per:
        for c in cands:
            if not len(c):
                raise ValueError("a candidate has no tokens")
    return per


def _cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new DynamicCache holding rows ``index`` (repeats allowed) of ``cache``."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])


@torch.no_grad()
def score_continuations(
    llm: "LoadedLLM",
    prefixes: Sequence[Sequence[int]],
    candidates: Sequence[Any],
    *,
    pad_id: int = 0,
    chunk_size: int = 64,
    reuse_prefix: bool = True,
) -> torch.Tensor:
    """Sum of log-probabilities of each candidate's tokens after its prefix -> [B, K] (float32).

    ``candidates`` is a list of K token-id lists shared by all B prefixes, or B such lists (each of K).
    With ``reuse_prefix`` the B prefixes run once (with their key/value cache); candidate rows then run in
    chunks of ``chunk_size`` rows on a copy of their prefix's cache. Without it each (prefix, candidate) row
    is one full forward of ``prefix + candidate`` (batched in chunks too): the same numbers, more compute.
    """
    per = _rows_of(prefixes, candidates)
    num_k = len(per[0])
    if any(len(c) != num_k for c in per):
        raise ValueError("every prefix needs the same number of candidates")
    dec, head, embed = llm.decoder, llm.lm_head, llm.embed_tokens
    device = embed.weight.device
    # rows sorted by candidate length, so a chunk pads its candidates to similar lengths
    rows = sorted(((b, k) for b in range(len(prefixes)) for k in range(num_k)), key=lambda r: len(per[r[0]][r[1]]))
    scores = torch.zeros(len(prefixes), num_k, dtype=torch.float32, device=device)
    if reuse_prefix:
        p_ids, p_len = _pad(prefixes, pad_id, device)
        if (p_len == 0).any():
            raise ValueError("a prefix has no tokens")
        p_mask = (torch.arange(p_ids.shape[1], device=device)[None, :] < p_len[:, None]).long()
        out = dec(inputs_embeds=embed(p_ids), attention_mask=p_mask, use_cache=True)
        last = out.last_hidden_state[torch.arange(len(prefixes), device=device), p_len - 1]
        first_logp = F.log_softmax(head(last).float(), dim=-1)  # [B, V]
        cache = out.past_key_values
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start: start + chunk_size]
        bi = torch.tensor([b for b, _ in chunk], device=device)
        ki = torch.tensor([k for _, k in chunk], device=device)
        cands = [per[b][k] for b, k in chunk]
        if reuse_prefix:
            c_ids, c_len = _pad(cands, pad_id, device)
            total = first_logp[bi, c_ids[:, 0]]
            if c_ids.shape[1] > 1:
                inp = c_ids[:, :-1]
                steps = torch.arange(inp.shape[1], device=device)
                valid = steps[None, :] < (c_len - 1)[:, None]
                mask = torch.cat([p_mask[bi], valid.long()], dim=1)
                hidden = dec(inputs_embeds=embed(inp), attention_mask=mask, position_ids=p_len[bi][:, None] + steps,
                             past_key_values=_cache_rows(cache, bi), use_cache=True).last_hidden_state
                total = total + _gathered_logp(head, hidden, valid, c_ids[:, 1:])
        else:
            seqs = [list(prefixes[b]) + list(c) for (b, _), c in zip(chunk, cands)]
            ids, lengths = _pad(seqs, pad_id, device)
            mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
            hidden = dec(inputs_embeds=embed(ids), attention_mask=mask.long(), use_cache=False).last_hidden_state
            c_ids, c_len = _pad(cands, pad_id, device)
            plen = torch.tensor([len(prefixes[b]) for b, _ in chunk], device=device)
            steps = torch.arange(c_ids.shape[1], device=device)
            valid = steps[None, :] < c_len[:, None]
            pos = torch.where(valid, plen[:, None] - 1 + steps[None, :], torch.zeros_like(c_ids))
            picked = hidden[torch.arange(len(chunk), device=device)[:, None], pos]
            total = _gathered_logp(head, picked, valid, c_ids)
        scores[bi, ki] = total
    return scores


def continuation_loglik(
    llm: "LoadedLLM",
    prefix: "LMPrefix",
    last_hidden: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    *,
    lead: Sequence[int] = (),
    reuse_prefix: bool = True,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Log-likelihood of each of K token sequences after every row of an embeddings prefix -> [B, K] float32.

    The prefix is what the model already ran (``LLMOutput.prefix``: [prompt | bridge tokens], any order);
    ``last_hidden`` [B, D] is the hidden state of each row's last real token (``LLMOutput.pool("last")``).
    ``lead`` (e.g. the tokens of " Answer:") follows the prefix in every row and is not scored. Entry [b, k] is
    ``sum_t log p(candidates[k][t] | prefix_b, lead, candidates[k][:t])`` under the LM head. Gradients flow (a
    training loss can be built on it); wrap the call in ``torch.no_grad()`` where none is needed.

    With ``reuse_prefix`` and a key/value cache on the prefix, ``lead`` runs once per row on a copy of that cache
    and the B x K candidate rows (in chunks of ``chunk_rows``) run only their own tokens on copies of their
    row's cache: B * (A + K * T) token positions. Otherwise every (row, candidate) pair is one full forward of
    ``[prefix | lead | candidate]``: the same numbers (checked in tests/test_verbalizer.py) at B * K * (L + A + T)
    positions.
    """
    if not candidates or any(not len(c) for c in candidates):
        raise ValueError(f"every candidate needs at least one token, got lengths {[len(c) for c in candidates]}")
    dec, head, embed = llm.decoder, llm.lm_head, llm.embed_tokens
    # transformers 5 renames the decoder's ``past_key_values`` argument ``cache``
    cache_arg = "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"
    embeds = prefix.embeds
    device, dtype = embeds.device, embeds.dtype
    b, k = embeds.shape[0], len(candidates)
    c_ids, c_len = _pad(candidates, 0, device)  # [K, T]
    lead_ids = torch.as_tensor(list(lead), dtype=torch.long, device=device)
    a = len(lead_ids)
    # (row, candidate) pairs, row-major: pair i is row i // K, candidate i % K
    pair_row = torch.arange(b, device=device).repeat_interleave(k)
    pair_cand = torch.arange(k, device=device).repeat(b)
    parts = []
    if reuse_prefix and prefix.cache is not None:
        mask, pos, h = prefix.attention_mask.long(), prefix.next_position, last_hidden
        cache = _cache_rows(prefix.cache, torch.arange(b, device=device))  # a copy: LLMOutput.prefix stays as it was
        if a:
            mask = torch.cat([mask, torch.ones(b, a, dtype=mask.dtype, device=device)], dim=1)
            h = dec(inputs_embeds=embed(lead_ids)[None].expand(b, -1, -1).to(dtype), attention_mask=mask,
                    position_ids=pos[:, None] + torch.arange(a, device=device), use_cache=True,
                    **{cache_arg: cache}).last_hidden_state[:, -1]  # ``cache`` now covers the lead too
            pos = pos + a
        first = F.log_softmax(head(h).float(), dim=-1)  # [B, V]: the distribution of every candidate's first token
        scores = first[:, c_ids[:, 0]]  # [B, K]
        if c_ids.shape[1] > 1:
            for start in range(0, b * k, chunk_rows):
                rows, cands = pair_row[start: start + chunk_rows], pair_cand[start: start + chunk_rows]
                inp = c_ids[cands, :-1]
                steps = torch.arange(inp.shape[1], device=device)
                valid = steps[None, :] < (c_len[cands] - 1)[:, None]
                hidden = dec(inputs_embeds=embed(inp).to(dtype), attention_mask=torch.cat([mask[rows], valid.long()], 1),
                             position_ids=pos[rows][:, None] + steps, use_cache=True,
                             **{cache_arg: _cache_rows(cache, rows)}).last_hidden_state
                parts.append(_gathered_logp(head, hidden, valid, c_ids[cands, 1:]))
            scores = scores + torch.cat(parts).view(b, k)
        return scores
    width = embeds.shape[1]
    for start in range(0, b * k, chunk_rows):
        rows, cands = pair_row[start: start + chunk_rows], pair_cand[start: start + chunk_rows]
        n = len(rows)
        tail = torch.cat([lead_ids[None].expand(n, -1), c_ids[cands]], dim=1)  # [n, A + T]
        steps = torch.arange(tail.shape[1], device=device)
        valid = steps[None, :] < (a + c_len[cands])[:, None]
        x = torch.cat([embeds[rows], embed(tail).to(dtype)], dim=1)
        mask = torch.cat([prefix.attention_mask[rows].long(), valid.long()], dim=1)
        positions = torch.cat([prefix.position_ids[rows], prefix.next_position[rows][:, None] + steps], dim=1)
        hidden = dec(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        # tail token j is predicted at index width + j - 1, its first one at the prefix's last real token
        t = torch.arange(c_ids.shape[1], device=device)
        at = width + a + t[None, :] - 1
        at = torch.where(at < width, prefix.last_index[rows][:, None], at.expand(n, -1))
        picked = hidden[torch.arange(n, device=device)[:, None], at]
        parts.append(_gathered_logp(head, picked, t[None, :] < c_len[cands][:, None], c_ids[cands]))
    return torch.cat(parts).view(b, k)


def _gathered_logp(head: nn.Module, hidden: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row: sum over the valid positions of log p(tokens[t] | hidden[t]); lm_head on valid positions only."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(valid)[valid]
    logp = F.log_softmax(head(hidden[valid]).float(), dim=-1).gather(1, tokens[valid][:, None])[:, 0]
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, logp)


@torch.no_grad()
def greedy_generate(llm: "LoadedLLM", prefixes: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_id: int | None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each prefix (batched, key/value cache), up to ``max_new_tokens`` or eos
    (not included)."""
    dec, head, embed = llm.decoder, llm.lm_head, llm.embed_tokens
    device = embed.weight.device
    ids, lengths = _pad(prefixes, pad_id, device)
    mask = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
    out = dec(inputs_embeds=embed(ids), attention_mask=mask, use_cache=True)
    rows = torch.arange(len(prefixes), device=device)
    nxt = head(out.last_hidden_state[rows, lengths - 1]).argmax(-1)
    cache, pos = out.past_key_values, lengths.clone()
    generated: list[list[int]] = [[] for _ in prefixes]
    done = torch.zeros(len(prefixes), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        for i in range(len(prefixes)):
            if not done[i] and (eos_id is None or int(nxt[i]) != eos_id):
                generated[i].append(int(nxt[i]))
        if eos_id is not None:
            done |= nxt == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prefixes), 1, dtype=mask.dtype, device=device)], dim=1)
        out = dec(inputs_embeds=embed(nxt[:, None]), attention_mask=mask, position_ids=pos[:, None],
                  past_key_values=cache, use_cache=True)
        cache, pos = out.past_key_values, pos + 1
        nxt = head(out.last_hidden_state[:, -1]).argmax(-1)
    return generated


@torch.no_grad()
def pooled_embeddings(llm: "LoadedLLM", rows: Sequence[Sequence[int]], *, pad_id: int = 0,
                      batch_size: int = 32) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over each row's tokens -> [N, D] float32 (one forward
    per row, batched: the O(N) alternative to ranking a pool by log-likelihood)."""
    dec, embed = llm.decoder, llm.embed_tokens
    device = embed.weight.device
    out = []
    for start in range(0, len(rows), batch_size):
        ids, lengths = _pad(rows[start: start + batch_size], pad_id, device)
        if (lengths == 0).any():
            raise ValueError("cannot embed an empty token sequence")
        mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        hidden = dec(inputs_embeds=embed(ids), attention_mask=mask.long()).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        out.append(F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, llm.hidden_size)


@contextlib.contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Temporarily zero the output side of every adapter (LoRA ``lora_B``, the bottleneck adapter's ``up``):
    the adapted LLM then computes exactly its base model (the untrained baseline). Restored on exit."""
    from allspark.llm import BottleneckAdapter

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, p in module.named_parameters():
        if ".lora_B." in name:  # PEFT names them <layer>.lora_B.<adapter>.weight
            saved.append((p, p.detach().clone()))
    for m in module.modules():
        if isinstance(m, BottleneckAdapter):
            saved += [(m.up.weight, m.up.weight.detach().clone()), (m.up.bias, m.up.bias.detach().clone())]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
