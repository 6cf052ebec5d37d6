"""Protocols of the language tasks (text, code), whose head is the LLM's own decoder.

``language_classification`` (IMDB): each label word's log-likelihood is scored after the review; ``top1``
(and the classification metrics), the number of reviews cut to the token budget, the chance level, a
confusion matrix and a histogram of the log-likelihood margins.

``code_documentation`` (CodeSearchNet): the token-mean negative log-likelihood of the docstrings
(``loss``, ``perplexity``; the validation metric), and, with the model (:meth:`model_metrics`, run by
``evaluate.py``):

- ``mrr`` by the CodeBERT protocol: the test split is cut into consecutive pools of ``mrr_pool`` functions
  (1000 in the paper; a last pool of fewer than two is dropped); within a pool every function's true
  docstring is ranked among the pool's docstrings; ties count against it. ``ranking: loglik`` ranks by the
  conditional log-likelihood log p(docstring | prompt, code) (pool x pool candidate scorings, batched with
  the code's key/value cache reused: :meth:`allspark.lm.LanguageModel.score_continuations`); ``ranking:
  embedding`` by the cosine of mean-pooled last hidden states of the code and of the docstring, each run
  alone through the same adapted LLM (2N forwards: the fast option for 1000-way pools). ``calibration: pmi``
  (default) ranks loglik by pointwise mutual information, log p(doc | prompt, code) - log p(doc | prompt, empty
  input) (the "surface form competition" correction of Holtzman et al., 2021): without it a docstring that is
  likely after any code (short, generic) outranks the one the code explains; ``none``: the raw log-likelihood.
  Both are reported (``mrr_loglik_pmi``, ``mrr_loglik_raw``).
  ``metrics.json`` says which ranking made ``mrr`` (``ranking``); the embedding MRR is always reported too.
- ``bleu4``: corpus BLEU-4 (torchmetrics) of greedy generations against the docstrings.
- with ``compare_untrained``: the same numbers with the adapters off (the untrained model), ``*_untrained``.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.evaluation import Evaluator, savefig
from allspark.evaluation.classification import ClassificationEvaluator
from allspark.registry import EVALUATORS

logger = logging.getLogger(__name__)

__all__ = ["LanguageClassificationEvaluator", "CodeDocumentationEvaluator"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@EVALUATORS.register("language_classification")
class LanguageClassificationEvaluator(ClassificationEvaluator):
    """Classification by label-word log-likelihood, plus the count of inputs cut to the token budget."""

    def __init__(self, info: dict[str, Any], label_key: str = "label", compare_untrained: bool = False,
                 batch_size: int = 32) -> None:
        super().__init__(info, label_key)
        self.pred_keys = ("pred", "truncated", "choice_loglik")
        self.compare_untrained, self.batch_size = bool(compare_untrained), int(batch_size)

    @torch.no_grad()
    def model_metrics(self, model, dataset, accelerator=None) -> dict[str, Any]:
        """With ``compare_untrained``: ``top1_untrained``, the same label scoring with the adapters off."""
        if not self.compare_untrained:
            return {}
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            with model.language_model.adapters_off():
                for s in range(0, len(dataset), self.batch_size):
                    batch = dataset.collate([dataset[i] for i in range(s, min(s + self.batch_size, len(dataset)))])
                    batch = {k: v.to(model.prompt_ids.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    pred = model(batch).predictions["pred"]
                    correct += int((pred == batch[self.label_key]).sum())
                    total += len(pred)
        finally:
            model.train(was_training)
        return {"top1_untrained": correct / max(total, 1)}

    def compute_baseline(self, gathered):
        """A baseline predicts labels only: the classification metrics and the majority-class chance."""
        metrics = ClassificationEvaluator.compute(self, gathered)
        labels = np.asarray(gathered[self.label_key])
        counts = np.bincount(labels[labels >= 0], minlength=self.info["num_classes"])
        metrics["chance"] = float(counts.max() / max(counts.sum(), 1))
        return metrics

    def compute(self, gathered):
        metrics = super().compute(gathered)
        labels = np.asarray(gathered[self.label_key])
        truncated = np.asarray(gathered["truncated"]).astype(bool)
        counts = np.bincount(labels[labels >= 0], minlength=self.info["num_classes"])
        metrics["chance"] = float(counts.max() / max(counts.sum(), 1))  # majority-class accuracy
        metrics["truncated_inputs"] = int(truncated.sum())
        metrics["truncated_fraction"] = float(truncated.mean()) if truncated.size else 0.0
        return metrics

    def figures(self, gathered, metrics, extra, out_dir):
        figs = super().figures(gathered, metrics, extra, out_dir)
        scores = np.asarray(gathered["choice_loglik"])
        if scores.ndim == 2 and scores.shape[1] == 2:
            plt = _plt()
            names = list(self.info.get("class_names") or ["0", "1"])
            margin = scores[:, 1] - scores[:, 0]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for k, name in enumerate(names):
                ax.hist(margin[gathered[self.label_key] == k], bins=30, alpha=0.6, label=f"true {name}")
            ax.axvline(0, color="black", lw=1)
            ax.set_xlabel(f"log p({names[1]}) - log p({names[0]})")
            ax.set_ylabel("reviews")
            ax.legend()
            savefig(fig, out_dir / "loglik_margin.png")
            figs.append(("Log-likelihood margin of the label words (test split)", "loglik_margin.png"))
        return figs


@EVALUATORS.register("code_documentation")
class CodeDocumentationEvaluator(Evaluator):
    """Docstring LM loss per split; MRR (loglik or embedding ranking) and BLEU-4 with the model."""

    pred_keys = ("nll", "target_tokens", "truncated")
    batch_keys = ("index",)

    def __init__(self, info: dict[str, Any], mrr_pool: int = 1000, ranking: str = "loglik", bleu: bool = True,
                 max_new_tokens: int = 32, compare_untrained: bool = False, batch_size: int = 8,
                 chunk_size: int = 64, examples: int = 8, calibration: str = "pmi") -> None:
        super().__init__(info)
        if calibration not in ("pmi", "none"):
            raise ValueError(f"code_documentation: calibration must be 'pmi' or 'none', got {calibration!r}")
        self.calibration = calibration
        if ranking not in ("loglik", "embedding"):
            raise ValueError(f"code_documentation: ranking must be 'loglik' or 'embedding', got {ranking!r}")
        if mrr_pool < 2:
            raise ValueError(f"code_documentation: mrr_pool must be >= 2, got {mrr_pool}")
        self.mrr_pool, self.ranking, self.bleu = int(mrr_pool), ranking, bool(bleu)
        self.max_new_tokens, self.compare_untrained = int(max_new_tokens), bool(compare_untrained)
        self.batch_size, self.chunk_size, self.examples = int(batch_size), int(chunk_size), int(examples)
        self._ranks: dict[str, np.ndarray] = {}
        self._samples: list[tuple[str, str, str]] = []

    @property
    def main_metric(self) -> tuple[str, bool]:
        return "mrr", True  # validation selects on the docstring loss; the task is ranked by MRR

    def compute(self, gathered):
        nll = np.asarray(gathered["nll"], dtype=np.float64)
        count = np.asarray(gathered["target_tokens"], dtype=np.float64)
        truncated = np.asarray(gathered["truncated"]).astype(bool)
        loss = float((nll * count).sum() / max(count.sum(), 1))
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "num_functions": int(nll.size),
                "truncated_inputs": int(truncated.sum()),
                "truncated_fraction": float(truncated.mean()) if truncated.size else 0.0}

    # -- with the model ------------------------------------------------------------------------
    @torch.no_grad()
    def model_metrics(self, model, dataset, accelerator=None) -> dict[str, Any]:
        from allspark.language import prefix_rows

        was_training = model.training
        model.eval()
        try:
            t0 = time.perf_counter()
            items = [dataset[i] for i in range(len(dataset))]
            codes = [it["input_text"] for it in items]
            docs = [it["target_text"] for it in items]
            zeros = torch.zeros(len(codes), dtype=torch.long, device=model.prompt_ids.device)
            prefixes, _ = prefix_rows(model, {"input_text": codes, "prompt_index": zeros})
            pools = [list(range(s, min(s + self.mrr_pool, len(items)))) for s in range(0, len(items), self.mrr_pool)]
            pools = [p for p in pools if len(p) >= 2]
            if not pools:
                raise ValueError(f"code_documentation: the split has {len(items)} functions; MRR needs at least 2")
            out = {"mrr_pool": self.mrr_pool, "mrr_pools": len(pools), "mrr_queries": sum(map(len, pools))}
            out.update(self._run(model, prefixes, codes, docs, pools, suffix=""))
            if self.compare_untrained:
                with model.language_model.adapters_off():
                    out.update(self._run(model, prefixes, codes, docs, pools, suffix="_untrained"))
            out["eval_seconds"] = round(time.perf_counter() - t0, 1)
            return out
        finally:
            model.train(was_training)

    def _run(self, model, prefixes, codes, docs, pools, suffix: str) -> dict[str, Any]:
        from allspark.metrics.language import code_documentation_metrics, mrr, ranks_of_true

        codec, lm = model.text_codec, model.language_model
        targets = codec.encode_targets(docs)
        out: dict[str, Any] = {}
        # embedding ranking: always (cheap)
        code_ids, _ = codec.encode_inputs(codes)
        doc_ids = [t[:-1] if codec.cfg.append_eos and len(t) > 1 else t for t in targets]
        code_emb = lm.pooled_embeddings(code_ids, pad_id=codec.pad_id, batch_size=self.batch_size * 4)
        doc_emb = lm.pooled_embeddings(doc_ids, pad_id=codec.pad_id, batch_size=self.batch_size * 4)
        emb_ranks = np.concatenate([ranks_of_true((code_emb[p] @ doc_emb[p].T).cpu().numpy()) for p in pools])
        out[f"mrr_embedding{suffix}"] = mrr(emb_ranks)
        ranks = emb_ranks
        if self.ranking == "loglik":
            t = time.perf_counter()
            # PMI calibration: each docstring's log-likelihood after the prompt with an empty input, subtracted
            # from its conditional one, so a docstring that is likely whatever the code (short, generic) does
            # not outrank the one this code explains
            prompt = model.prompt_ids[0, : model.prompt_lengths[0]].tolist()  # the evaluation prompt (as prefixes)
            null_prefix = prompt + codec.sep + codec.sep  # [prompt | sep | (no input) | sep]
            all_ranks, pmi_ranks = [], []
            for pool in pools:
                cands = [targets[i] for i in pool]
                rows = []
                for s in range(0, len(pool), self.batch_size):
                    chunk = pool[s: s + self.batch_size]
                    rows.append(lm.score_continuations([prefixes[i] for i in chunk], cands, pad_id=codec.pad_id,
                                                       chunk_size=self.chunk_size))
                scores = torch.cat(rows).cpu()
                prior = lm.score_continuations([null_prefix], cands, pad_id=codec.pad_id,
                                               chunk_size=self.chunk_size).cpu()
                all_ranks.append(ranks_of_true(scores.numpy()))
                pmi_ranks.append(ranks_of_true((scores - prior).numpy()))
            plain, pmi = np.concatenate(all_ranks), np.concatenate(pmi_ranks)
            out[f"mrr_loglik_raw{suffix}"] = mrr(plain)
            out[f"mrr_loglik_pmi{suffix}"] = mrr(pmi)
            ranks = pmi if self.calibration == "pmi" else plain
            out[f"mrr_loglik{suffix}"] = mrr(ranks)
            logger.info("code_documentation%s: loglik MRR %.4f over %d pools (%.0f s)", suffix, out[f"mrr_loglik{suffix}"],
                        len(pools), time.perf_counter() - t)
            out[f"loglik_scoring_seconds{suffix}"] = round(time.perf_counter() - t, 1)
        hyps = None
        if self.bleu:
            hyps = []
            for s in range(0, len(prefixes), self.batch_size):
                gen = lm.greedy_generate(prefixes[s: s + self.batch_size], self.max_new_tokens, codec.eos_id,
                                         codec.pad_id)
                hyps += [codec.decode(g) for g in gen]
        evaluated = [i for p in pools for i in p]
        metrics = code_documentation_metrics(
            ranks, hyps if hyps is not None else None, docs if hyps is not None else None)
        out.update({f"{k}{suffix}": v for k, v in metrics.items()})
        out[f"ranking{suffix}" if suffix else "ranking"] = self.ranking
        if self.ranking == "loglik":
            out[f"calibration{suffix}" if suffix else "calibration"] = self.calibration
        self._ranks[suffix or "trained"] = ranks
        if not suffix and hyps is not None:
            self._samples = [(codes[i], docs[i], hyps[i]) for i in evaluated[: self.examples]]
        return out

    def figures(self, gathered, metrics, extra, out_dir):
        figs = []
        if self._ranks:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6, 3.5))
            top = max(int(r.max()) for r in self._ranks.values())
            bins = np.arange(1, top + 2) - 0.5
            for name, r in self._ranks.items():
                label = "adapters off (untrained)" if name == "_untrained" else "trained"
                ax.hist(r, bins=bins, alpha=0.6, label=f"{label}: MRR {np.mean(1 / r):.3f}")
            ax.set_xlabel(f"rank of the true docstring in its pool ({metrics.get('ranking', self.ranking)} ranking)")
            ax.set_ylabel("functions")
            ax.legend()
            savefig(fig, out_dir / "rank_histogram.png")
            figs.append(("Rank of the true docstring (test split)", "rank_histogram.png"))
        return figs

    def report(self, gathered, metrics, extra, out_dir: Path, title: str) -> Path:
        path = super().report(gathered, metrics, extra, out_dir, title)
        if self._samples:
            lines = ["", "## Greedy generations (first test functions)", ""]
            for code, ref, hyp in self._samples:
                lines += ["```python", code.strip(), "```", f"- reference: {ref}", f"- generated: {hyp}", ""]
            with path.open("a") as f:
                f.write("\n".join(lines))
        return path
