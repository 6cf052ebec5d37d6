"""Image-text retrieval baseline: nearest-neighbour caption transfer with TF-IDF (LSA) ranking.

The classical recipe for caption retrieval without a joint model: an image is described by the captions of the
training images that look most like it, and candidate captions are ranked by their TF-IDF similarity to that
description. Here "look like" is the cosine of standardised average-pooled pixels; the text space is TF-IDF of
word uni- and bi-grams reduced by truncated SVD (latent semantic analysis), all fitted on the **training split
only**. Both directions (image -> text, text -> image) rank by the same cosine, so the task's own evaluator
(``retrieval``: R@K, mR, MAP / WMAP / NDCG on the label level) scores the two embeddings this baseline returns.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from allspark.baselines import Baseline, split_arrays
from allspark.baselines.classical import flat_features
from allspark.registry import BASELINES

__all__ = ["CaptionTransferBaseline"]


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _captions(dataset) -> list[list[str]]:
    texts = getattr(dataset, "caption_texts", None)
    if texts is None:
        raise ValueError(f"caption_transfer: the {type(dataset).__name__} reader gives no caption_texts()")
    return texts()


@BASELINES.register("caption_transfer")
class CaptionTransferBaseline(Baseline):
    """``neighbours`` training images nearest in pooled pixels (``pool`` x ``pool`` per channel) lend their
    captions; TF-IDF -> ``dims``-dimensional LSA; cosine ranking."""

    def __init__(self, info: dict[str, Any], neighbours: int = 10, pool: int = 8, dims: int = 256,
                 ngram_max: int = 2, image_key: str = "image", seed: int = 0) -> None:
        super().__init__(info)
        if neighbours < 1 or pool < 1 or dims < 1:
            raise ValueError(f"caption_transfer: neighbours, pool and dims must be >= 1, got {neighbours}, {pool}, {dims}")
        self.neighbours, self.pool, self.dims, self.ngram_max = int(neighbours), int(pool), int(dims), int(ngram_max)
        self.image_key, self.seed = image_key, int(seed)

    def _pixels(self, dataset) -> np.ndarray:
        return flat_features(split_arrays(dataset, [self.image_key]), [self.image_key], self.pool)

    def _text(self, captions: list[str]) -> np.ndarray:
        return _normalise(self.svd.transform(self.tfidf.transform(captions)))

    def fit(self, train_set, model=None) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import StandardScaler

        pixels = self._pixels(train_set)
        self.scaler = StandardScaler().fit(pixels)
        self.train_images = _normalise(self.scaler.transform(pixels))
        captions = _captions(train_set)
        flat = [c for caps in captions for c in caps]
        self.tfidf = TfidfVectorizer(ngram_range=(1, self.ngram_max), sublinear_tf=True).fit(flat)
        dims = max(1, min(self.dims, len(self.tfidf.vocabulary_) - 1, len(flat) - 1))
        self.svd = TruncatedSVD(n_components=dims, random_state=self.seed).fit(self.tfidf.transform(flat))
        # each training image's description: the mean of its captions' vectors
        self.train_text = _normalise(np.stack([self._text(caps).mean(axis=0) for caps in captions]))

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        images = _normalise(self.scaler.transform(self._pixels(dataset)))
        sim = images @ self.train_images.T  # [n, n_train] cosine
        k = min(self.neighbours, sim.shape[1])
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        image_emb = _normalise(self.train_text[nearest].mean(axis=1))
        captions = _captions(dataset)
        slots = int(self.info.get("captions_per_image") or max(len(c) for c in captions))
        text_emb = np.zeros((len(captions), slots, image_emb.shape[1]), np.float32)
        text_mask = np.zeros((len(captions), slots), bool)
        for i, caps in enumerate(captions):
            caps = caps[:slots]
            text_emb[i, : len(caps)] = self._text(caps)
            text_mask[i, : len(caps)] = True
        return {"image_emb": image_emb.astype(np.float32), "text_emb": text_emb, "text_mask": text_mask}
