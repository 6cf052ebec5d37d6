"""The language-model interface: the one object through which the model, its heads, evaluators and benchmarks
use the frozen LLM.

:class:`LanguageModel` wraps the :class:`~allspark.llm.LoadedLLM` that :func:`~allspark.llm.load_llm` returns (the
Hugging Face causal LM with its adapters, its tokenizer and sizes) and offers what the rest of the package needs:

- tokens: :meth:`~LanguageModel.token_ids`, :meth:`~LanguageModel.embed` (the input embeddings),
  :meth:`~LanguageModel.embedding_rms`;
- the decoder: :meth:`~LanguageModel.run` on embeddings with an attention mask (position ids and a key/value cache
  optional; it returns the last hidden states and the cache), :meth:`~LanguageModel.pooled` (mean or last hidden
  state per row), :meth:`~LanguageModel.state_key` (what a cache of the LLM's outputs is keyed on);
- the LM head: :meth:`~LanguageModel.logits`, :meth:`~LanguageModel.token_logprobs`, and log-likelihoods of
  continuations with the prefix's cache reused: :meth:`~LanguageModel.score_continuations` (token-id prefixes),
  :meth:`~LanguageModel.continuation_loglik` (an embeddings prefix the model already ran, :class:`LMPrefix`);
- generation: :meth:`~LanguageModel.generate` (transformers' ``generate`` on ``inputs_embeds``) and
  :meth:`~LanguageModel.greedy_generate` (token-id prefixes, batched, with the cache);
- adapters: :meth:`~LanguageModel.adapters_off` (the base model, temporarily), :meth:`~LanguageModel.merge_adapters`
  (a merged copy, for export), :meth:`~LanguageModel.peft_adapter` (the LoRA adapter in PEFT's format).

It is not an ``nn.Module``: the LLM's parameters are registered once, by the model that owns it (under ``llm.``),
and several task models of a multi-task model share one. Transformers' renaming of the decoder's cache argument
(``past_key_values`` -> ``cache``) is handled here, once.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.llm import BottleneckAdapter, LoadedLLM
from allspark.types import LMPrefix

__all__ = ["LanguageModel", "DecoderRun", "PEFT_PREFIX", "adapters_off", "cache_rows", "pad_rows", "prefix_rows"]

#: the key prefix of ``PeftModel.save_pretrained`` weights
PEFT_PREFIX = "base_model.model."


class DecoderRun(NamedTuple):
    """What :meth:`LanguageModel.run` returns: the last hidden states [B, L, D] and the key/value cache (a
    ``transformers`` cache; None unless one was asked for or the model's config keeps one by default)."""

    hidden: torch.Tensor
    cache: Any | None


def pad_rows(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [N, W] (W >= 1) and the rows' lengths [N]."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    width = max(1, int(lengths.max())) if len(rows) else 1
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long, device=device)
    return ids, lengths


def cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new DynamicCache holding rows ``index`` (repeats allowed) of ``cache``."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])


def prefix_rows(prefix: LMPrefix, index: torch.Tensor) -> LMPrefix:
    """Rows ``index`` of a prefix (its tensors and a copy of those rows of its cache), for continuing only some
    samples of a batch (the verbalizer's labelled training rows)."""
    return LMPrefix(embeds=prefix.embeds[index], attention_mask=prefix.attention_mask[index],
                    position_ids=prefix.position_ids[index], last_index=prefix.last_index[index],
                    next_position=prefix.next_position[index],
                    cache=None if prefix.cache is None else cache_rows(prefix.cache, index))


@contextlib.contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Temporarily zero the output side of every adapter inside ``module`` (LoRA ``lora_B``, the bottleneck
    adapter's ``up``): the adapted LLM then computes exactly its base model (the untrained baseline). Restored on
    exit."""
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


class LanguageModel:
    """The frozen LLM (with its adapters) as the model's heads, evaluators and benchmarks use it."""

    def __init__(self, loaded: LoadedLLM) -> None:
        if isinstance(loaded, LanguageModel):
            raise TypeError("LanguageModel wraps a LoadedLLM; use LanguageModel.of(x) to accept either")
        #: the loaded LLM (module, tokenizer, sizes, how it was loaded)
        self.loaded = loaded
        self._cache_arg: str | None = None

    @classmethod
    def of(cls, llm: "LanguageModel | LoadedLLM") -> "LanguageModel":
        """``llm`` itself if it is a :class:`LanguageModel`, else the interface over that :class:`LoadedLLM`."""
        return llm if isinstance(llm, LanguageModel) else cls(llm)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def hidden_size(self) -> int:
        return self.loaded.hidden_size

    @property
    def adapter(self) -> str:
        """``lora``, ``bottleneck`` or ``none``."""
        return self.loaded.adapter

    @property
    def dtype(self) -> str:
        """The frozen weights' dtype name (``float32``, ``bfloat16``, ``float16``); :attr:`dtype_reason` says why."""
        return self.loaded.dtype

    @property
    def dtype_reason(self) -> str:
        return self.loaded.dtype_reason

    @property
    def module(self) -> nn.Module:
        """The :class:`~allspark.llm.FrozenLLM` holding the HF model (registered by the owning model as ``llm``)."""
        return self.loaded.module

    @property
    def device(self) -> torch.device:
        """Where the input embeddings (and so the token ids they take) live."""
        return self.loaded.embed_tokens.weight.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.loaded.embed_tokens.weight.dtype

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.loaded.model.parameters()

    def state_key(self) -> tuple[tuple[int, int], ...]:
        """Every parameter's storage and version counter (bumped by every in-place update: optimizer steps, loads):
        equal keys mean equal weights, so a cache of the LLM's outputs keyed on it follows every update."""
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    # -- tokens --------------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of token ids ``ids`` [...] -> [..., D]."""
        return self.loaded.embed_tokens(ids)

    def embedding_rms(self) -> float:
        """The root mean square of the input-embedding table's entries (the scale of a token embedding)."""
        weight = self.loaded.embed_tokens.weight
        return float(weight.detach().float().pow(2).mean().sqrt())

    # -- the decoder ---------------------------------------------------------------------------
    def _cache_argument(self) -> str:
        # transformers 5 renames the decoder's ``past_key_values`` argument ``cache``
        if self._cache_arg is None:
            params = inspect.signature(self.loaded.decoder.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
        return self._cache_arg

    def run(self, embeds: torch.Tensor, attention_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
            cache: Any | None = None, use_cache: bool | None = None) -> DecoderRun:
        """The decoder stack (adapted layers, no vocabulary projection) over ``embeds`` [B, L, D] with
        ``attention_mask`` [B, L] (bool or 0/1; over the cached positions too when ``cache`` is given).
        ``position_ids`` default to the decoder's own (0.. after the cache); ``cache`` is continued (in place);
        ``use_cache`` unset follows the model's config."""
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": attention_mask.long()}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        if cache is not None:
            kwargs[self._cache_argument()] = cache
        out = self.loaded.decoder(**kwargs)
        # (transformers 5 names the output's cache ``cache``; ``past_key_values`` before)
        return DecoderRun(out.last_hidden_state, out.cache if hasattr(out, "cache") else out.past_key_values)

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Token ids [N, W] (right-padded, ``mask`` [N, W] True on real tokens) run alone through the decoder and
        pooled -> [N, D] float32: ``mean`` over the real tokens or the ``last`` one."""
        if mode not in ("mean", "last"):
            raise ValueError(f"pooled: mode must be 'mean' or 'last', got {mode!r}")
        hidden = self.run(self.embed(ids), mask).hidden.float()
        if mode == "last":
            return hidden[torch.arange(ids.shape[0], device=hidden.device), mask.sum(1) - 1]
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)

    @torch.no_grad()
    def pooled_embeddings(self, rows: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 32
                          ) -> torch.Tensor:
        """L2-normalised mean of the last hidden states over each row's tokens -> [N, D] float32 (one forward
        per row, batched: the O(N) alternative to ranking a pool by log-likelihood)."""
        device = self.device
        out = []
        for start in range(0, len(rows), batch_size):
            ids, lengths = pad_rows(rows[start: start + batch_size], pad_id, device)
            if (lengths == 0).any():
                raise ValueError("cannot embed an empty token sequence")
            mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
            out.append(F.normalize(self.pooled(ids, mask, "mean"), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.hidden_size)

    # -- the LM head ---------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (vocabulary projection) of hidden states [..., D] -> [..., V]."""
        return self.loaded.lm_head(hidden)

    def token_logprobs(self, hidden: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per row: the sum over the valid positions of log p(tokens[t] | hidden[t]) -> [B] float32; the LM head
        runs on the valid positions only."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(valid)[valid]
        logp = F.log_softmax(self.logits(hidden[valid]).float(), dim=-1).gather(1, tokens[valid][:, None])[:, 0]
        return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, logp)

    @torch.no_grad()
    def score_continuations(
        self,
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
        device = self.device
        # rows sorted by candidate length, so a chunk pads its candidates to similar lengths
        rows = sorted(((b, k) for b in range(len(prefixes)) for k in range(num_k)), key=lambda r: len(per[r[0]][r[1]]))
        scores = torch.zeros(len(prefixes), num_k, dtype=torch.float32, device=device)
        if reuse_prefix:
            p_ids, p_len = pad_rows(prefixes, pad_id, device)
            if (p_len == 0).any():
                raise ValueError("a prefix has no tokens")
            p_mask = (torch.arange(p_ids.shape[1], device=device)[None, :] < p_len[:, None]).long()
            out = self.run(self.embed(p_ids), p_mask, use_cache=True)
            last = out.hidden[torch.arange(len(prefixes), device=device), p_len - 1]
            first_logp = F.log_softmax(self.logits(last).float(), dim=-1)  # [B, V]
            cache = out.cache
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start: start + chunk_size]
            bi = torch.tensor([b for b, _ in chunk], device=device)
            ki = torch.tensor([k for _, k in chunk], device=device)
            cands = [per[b][k] for b, k in chunk]
            if reuse_prefix:
                c_ids, c_len = pad_rows(cands, pad_id, device)
                total = first_logp[bi, c_ids[:, 0]]
                if c_ids.shape[1] > 1:
                    inp = c_ids[:, :-1]
                    steps = torch.arange(inp.shape[1], device=device)
                    valid = steps[None, :] < (c_len - 1)[:, None]
                    mask = torch.cat([p_mask[bi], valid.long()], dim=1)
                    hidden = self.run(self.embed(inp), mask, position_ids=p_len[bi][:, None] + steps,
                                      cache=cache_rows(cache, bi), use_cache=True).hidden
                    total = total + self.token_logprobs(hidden, valid, c_ids[:, 1:])
            else:
                seqs = [list(prefixes[b]) + list(c) for (b, _), c in zip(chunk, cands)]
                ids, lengths = pad_rows(seqs, pad_id, device)
                mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
                hidden = self.run(self.embed(ids), mask, use_cache=False).hidden
                c_ids, c_len = pad_rows(cands, pad_id, device)
                plen = torch.tensor([len(prefixes[b]) for b, _ in chunk], device=device)
                steps = torch.arange(c_ids.shape[1], device=device)
                valid = steps[None, :] < c_len[:, None]
                pos = torch.where(valid, plen[:, None] - 1 + steps[None, :], torch.zeros_like(c_ids))
                picked = hidden[torch.arange(len(chunk), device=device)[:, None], pos]
                total = self.token_logprobs(picked, valid, c_ids)
            scores[bi, ki] = total
        return scores

    def continuation_loglik(
        self,
        prefix: LMPrefix,
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

        With ``reuse_prefix`` and a key/value cache on the prefix, ``lead`` runs once per row on a copy of that
        cache and the B x K candidate rows (in chunks of ``chunk_rows``) run only their own tokens on copies of their
        row's cache: B * (A + K * T) token positions. Otherwise every (row, candidate) pair is one full forward of
        ``[prefix | lead | candidate]``: the same numbers (checked in tests/test_verbalizer.py) at B * K * (L + A + T)
        positions.
        """
        if not candidates or any(not len(c) for c in candidates):
            raise ValueError(f"every candidate needs at least one token, got lengths {[len(c) for c in candidates]}")
        embeds = prefix.embeds
        device, dtype = embeds.device, embeds.dtype
        b, k = embeds.shape[0], len(candidates)
        c_ids, c_len = pad_rows(candidates, 0, device)  # [K, T]
        lead_ids = torch.as_tensor(list(lead), dtype=torch.long, device=device)
        a = len(lead_ids)
        # (row, candidate) pairs, row-major: pair i is row i // K, candidate i % K
        pair_row = torch.arange(b, device=device).repeat_interleave(k)
        pair_cand = torch.arange(k, device=device).repeat(b)
        parts = []
        if reuse_prefix and prefix.cache is not None:
            mask, pos, h = prefix.attention_mask.long(), prefix.next_position, last_hidden
            cache = cache_rows(prefix.cache, torch.arange(b, device=device))  # a copy: LLMOutput.prefix stays as it was
            if a:
                mask = torch.cat([mask, torch.ones(b, a, dtype=mask.dtype, device=device)], dim=1)
                h = self.run(self.embed(lead_ids)[None].expand(b, -1, -1).to(dtype), mask,
                             position_ids=pos[:, None] + torch.arange(a, device=device), cache=cache,
                             use_cache=True).hidden[:, -1]  # ``cache`` now covers the lead too
                pos = pos + a
            first = F.log_softmax(self.logits(h).float(), dim=-1)  # [B, V]: every candidate's first-token distribution
            scores = first[:, c_ids[:, 0]]  # [B, K]
            if c_ids.shape[1] > 1:
                for start in range(0, b * k, chunk_rows):
                    rows, cands = pair_row[start: start + chunk_rows], pair_cand[start: start + chunk_rows]
                    inp = c_ids[cands, :-1]
                    steps = torch.arange(inp.shape[1], device=device)
                    valid = steps[None, :] < (c_len[cands] - 1)[:, None]
                    hidden = self.run(self.embed(inp).to(dtype), torch.cat([mask[rows], valid.long()], 1),
                                      position_ids=pos[rows][:, None] + steps, cache=cache_rows(cache, rows),
                                      use_cache=True).hidden
                    parts.append(self.token_logprobs(hidden, valid, c_ids[cands, 1:]))
                scores = scores + torch.cat(parts).view(b, k)
            return scores
        width = embeds.shape[1]
        for start in range(0, b * k, chunk_rows):
            rows, cands = pair_row[start: start + chunk_rows], pair_cand[start: start + chunk_rows]
            n = len(rows)
            tail = torch.cat([lead_ids[None].expand(n, -1), c_ids[cands]], dim=1)  # [n, A + T]
            steps = torch.arange(tail.shape[1], device=device)
            valid = steps[None, :] < (a + c_len[cands])[:, None]
            x = torch.cat([embeds[rows], self.embed(tail).to(dtype)], dim=1)
            mask = torch.cat([prefix.attention_mask[rows].long(), valid.long()], dim=1)
            positions = torch.cat([prefix.position_ids[rows], prefix.next_position[rows][:, None] + steps], dim=1)
            hidden = self.run(x, mask, position_ids=positions, use_cache=False).hidden
            # tail token j is predicted at index width + j - 1, its first one at the prefix's last real token
            t = torch.arange(c_ids.shape[1], device=device)
            at = width + a + t[None, :] - 1
            at = torch.where(at < width, prefix.last_index[rows][:, None], at.expand(n, -1))
            picked = hidden[torch.arange(n, device=device)[:, None], at]
            parts.append(self.token_logprobs(picked, t[None, :] < c_len[cands][:, None], c_ids[cands]))
        return torch.cat(parts).view(b, k)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` continuing ``inputs_embeds`` (rows left-padded, ``attention_mask`` 0/1);
        ``kwargs`` go to ``generate`` (``max_new_tokens``, sampling, ``pad_token_id``, ...). Returns the new
        token ids."""
        return self.loaded.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def greedy_generate(self, prefixes: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None,
                        pad_id: int = 0) -> list[list[int]]:
        """Greedy continuation of each token-id prefix (batched, key/value cache), up to ``max_new_tokens`` or
        eos (not included)."""
        device = self.device
        ids, lengths = pad_rows(prefixes, pad_id, device)
        mask = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
        out = self.run(self.embed(ids), mask, use_cache=True)
        rows = torch.arange(len(prefixes), device=device)
        nxt = self.logits(out.hidden[rows, lengths - 1]).argmax(-1)
        cache, pos = out.cache, lengths.clone()
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
            out = self.run(self.embed(nxt[:, None]), mask, position_ids=pos[:, None], cache=cache, use_cache=True)
            cache, pos = out.cache, pos + 1
            nxt = self.logits(out.hidden[:, -1]).argmax(-1)
        return generated

    # -- adapters ------------------------------------------------------------------------------
    def adapters_off(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the adapters' outputs are zero: the LLM computes its base model (see
        :func:`adapters_off`)."""
        return adapters_off(self.module)

    def merge_adapters(self) -> nn.Module:
        """A plain HF model (a copy) with the LoRA weights merged into its weights, for export (see
        :meth:`allspark.llm.LoadedLLM.merge_adapters`)."""
        return self.loaded.merge_adapters()

    def peft_adapter(self, llm_state: dict[str, torch.Tensor], base_model: str
                     ) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """The LoRA adapter as PEFT saves it: its ``LoraConfig`` (naming ``base_model``) and the weights of
        ``llm_state`` (the HF model's trainable tensors, named as in it) under the names of
        ``PeftModel.save_pretrained`` (``base_model.model.<module>.lora_A.weight``); None for other adapters."""
        if self.adapter != "lora":
            return None
        import copy

        from peft import get_peft_model_state_dict

        hf = self.loaded.model
        weights = {PEFT_PREFIX + k: v.detach().contiguous().cpu()
                   for k, v in get_peft_model_state_dict(hf, state_dict=llm_state).items()}
        if len(weights) != len(llm_state):
            raise ValueError(f"the LLM's trainable tensors {sorted(llm_state)[:4]} are not all LoRA weights")
        peft_config = copy.deepcopy(hf.peft_config["default"])
        peft_config.base_model_name_or_path = base_model
        peft_config.task_type = "CAUSAL_LM"
        peft_config.inference_mode = True
        return peft_config, weights


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
