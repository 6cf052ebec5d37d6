"""``caption_transfer``: the classical image-text retrieval baseline (nearest-neighbour captions, TF-IDF / LSA)."""
import numpy as np
import pytest
import torch

from allspark.baselines.retrieval import CaptionTransferBaseline
from allspark.config import load_config
from allspark.data import build_dataset
from allspark.evaluation import build_evaluator
from allspark.evaluation.retrieval import RetrievalEvaluator


class _Pairs:
    """A hand-built caption set: image i is a constant grey level, its captions given."""

    def __init__(self, levels, captions):
        self.levels, self.captions = levels, captions

    def __len__(self):
        return len(self.levels)

    def __getitem__(self, i):
        return {"image": torch.full((3, 8, 8), float(self.levels[i])), "index": torch.tensor(i)}

    collate = staticmethod(lambda items: torch.utils.data.default_collate(items))

    def caption_texts(self):
        return [list(c) for c in self.captions]


def test_hand_built_pairs_are_retrieved_through_their_nearest_training_images():
    train = _Pairs([0.0, 0.1, 0.9, 1.0], [["dark night sky"], ["dark night road"], ["bright snow field"],
                                         ["bright snow peak"]])
    # test images near the dark / bright training images; their captions share words with those neighbours only
    test = _Pairs([0.05, 0.95], [["a dark night"], ["snow so bright"]])
    base = CaptionTransferBaseline({"captions_per_image": 1}, neighbours=2, pool=2, dims=4)
    base.evaluator = RetrievalEvaluator({"captions_per_image": 1}, label_level=None, figures=False)
    base.fit(train)
    out = base.predict(test)
    assert out["image_emb"].shape[0] == 2 and out["text_emb"].shape[:2] == (2, 1) and out["text_mask"].all()
    sim = out["image_emb"] @ out["text_emb"][:, 0].T
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]  # each image ranks its own caption first
    metrics = base.score(test)
    assert metrics["I2T_R@1"] == 1.0 and metrics["T2I_R@1"] == 1.0
    # fitted on the training split only: a word seen only in test captions is not in the vocabulary
    assert "so" not in base.tfidf.vocabulary_ and "night" in base.tfidf.vocabulary_


def test_demo_caption_transfer_beats_chance_by_far():
    cfg = load_config("rgb-text")
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    evaluator = build_evaluator(cfg, train.info())
    base = CaptionTransferBaseline(train.info())
    base.evaluator = evaluator
    base.fit(train)
    metrics = base.score(test)
    chance_r5 = 5 / len(test)  # one caption per demo image
    assert metrics["I2T_R@5"] > 4 * chance_r5 and metrics["T2I_R@5"] > 4 * chance_r5, metrics
    with pytest.raises(ValueError, match="must be >= 1"):
        CaptionTransferBaseline({}, neighbours=0)
