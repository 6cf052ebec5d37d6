"""Text baselines: TF-IDF features with logistic regression (classification) and TF-IDF ranking (code search).

Both fit their vocabulary and weights on the training split only. For code, identifiers are split into words
(``get_user_name`` and ``getUserName`` both give ``get user name``) before TF-IDF, the usual bag-of-words
baseline of CodeSearchNet, and each function's true docstring is ranked among the docstrings of its pool by
cosine similarity, with the same pools as the model's MRR (``eval.args.mrr_pool``).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from allspark.baselines import Baseline, split_arrays
from allspark.registry import BASELINES

__all__ = ["TfidfLogisticBaseline", "TfidfRankingBaseline", "code_words"]

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def code_words(text: str) -> str:
    """Identifiers split into lower-case words: ``parseHTTPHeader_v2`` -> ``parse httpheader v2``."""
    return " ".join(w.lower() for w in re.findall(r"[A-Za-z0-9]+", _CAMEL.sub(" ", text.replace("_", " "))))


@BASELINES.register("tfidf_logistic")
class TfidfLogisticBaseline(Baseline):
    """TF-IDF of word uni- and bi-grams (sublinear tf, min_df 2) -> L2 logistic regression."""

    def __init__(self, info: dict[str, Any], input_key: str = "input_text", ngram_max: int = 2, min_df: int = 2,
                 C: float = 10.0, max_features: int | None = 200_000) -> None:
        super().__init__(info)
        self.input_key, self.ngram_max, self.min_df = input_key, int(ngram_max), int(min_df)
        self.C, self.max_features = float(C), max_features
        self.model = None

    def fit(self, train_set, model=None) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        data = split_arrays(train_set, [self.input_key, self.target_key])
        y = data[self.target_key].astype(np.int64)
        keep = y >= 0
        min_df = self.min_df if keep.sum() >= 50 else 1  # a handful of texts has no word seen twice
        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, self.ngram_max), min_df=min_df, sublinear_tf=True,
                            max_features=self.max_features),
            LogisticRegression(C=self.C, max_iter=2000),
        )
        self.model.fit(list(data[self.input_key][keep]), y[keep])

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        texts = split_arrays(dataset, [self.input_key])[self.input_key]
        return {"pred": self.model.predict(list(texts)).astype(np.int64)}


@BASELINES.register("tfidf_ranking")
class TfidfRankingBaseline(Baseline):
    """Code search by TF-IDF cosine between a function's code words and the candidate docstrings."""

    def __init__(self, info: dict[str, Any], code_key: str = "input_text", doc_key: str = "target_text",
                 mrr_pool: int | None = None) -> None:
        super().__init__(info)
        self.code_key, self.doc_key = code_key, doc_key
        self.mrr_pool = mrr_pool
        self.vectorizer = None

    def fit(self, train_set, model=None) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        data = split_arrays(train_set, [self.code_key, self.doc_key])
        corpus = [code_words(t) for t in data[self.code_key]] + [code_words(t) for t in data[self.doc_key]]
        self.vectorizer = TfidfVectorizer(sublinear_tf=True).fit(corpus)

    def ranks(self, dataset) -> np.ndarray:
        from allspark.metrics.language import ranks_of_true

        data = split_arrays(dataset, [self.code_key, self.doc_key])
        codes = self.vectorizer.transform([code_words(t) for t in data[self.code_key]])
        docs = self.vectorizer.transform([code_words(t) for t in data[self.doc_key]])
        pool = int(self.mrr_pool or getattr(self.evaluator, "mrr_pool", 1000))
        n = len(dataset)
        pools = [list(range(s, min(s + pool, n))) for s in range(0, n, pool)]
        pools = [p for p in pools if len(p) >= 2]
        if not pools:
            raise ValueError(f"tfidf_ranking: the split has {n} functions; MRR needs at least 2")
        # TfidfVectorizer rows are L2-normalised: the dot product is the cosine similarity
        return np.concatenate([ranks_of_true((codes[p] @ docs[p].T).toarray()) for p in pools])

    def score(self, dataset, model=None) -> dict[str, Any]:
        from allspark.metrics.language import code_documentation_metrics

        return code_documentation_metrics(self.ranks(dataset))
