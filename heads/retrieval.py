"""Contrastive image-text retrieval head (CISEN on AllSpark; LuoJiaHOG paper Section 4).

The image goes encoder -> bridge -> LLM as in every AllSpark task; its pooled hidden state is projected
into the embedding space (``o_v5``), mapped by V2TMap (Eq. 18-19) and, in the second stage, enhanced by
HFE (Eq. 20-24) from the encoder's multi-level maps (``batch["image_pyramid"]``, see encoders/image_pyramid.py).
Captions are tokenised here with the LLM's own tokenizer (an end-of-sequence token appended, like CLIP's
[EOS]), embedded with the LLM's input embeddings, run through the same language model (the model passes its
``LanguageModel`` to the head) and pooled (``mean`` over the caption tokens or the ``last`` one), then projected.
The loss is the symmetric InfoNCE of Eq. 25 with a learnable temperature, negatives gathered from every
process (allspark/retrieval/losses.py).

Batch: ``captions`` is a list (one entry per image) of lists of strings. The loss pairs each image with its
first caption; the predictions hold every caption (for evaluation):
``image_emb`` [B, E], ``text_emb`` [B, K, E] and ``text_mask`` [B, K] (K = ``info["captions_per_image"]``,
unused slots zero and False), embeddings L2-normalised.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.lm import LanguageModel
from allspark.registry import HEADS
from allspark.retrieval.losses import symmetric_info_nce
from allspark.retrieval.modules import HFE, V2TMap
from allspark.types import LLMOutput, Output

__all__ = ["ContrastiveRetrievalHead"]

PYRAMID_KEY = "image_pyramid"


@HEADS.register("contrastive_retrieval")
class ContrastiveRetrievalHead(nn.Module):
    def __init__(self, hidden_size: int, *, llm: Any = None, info: dict[str, Any] | None = None,
                 embed_dim: int = 256, image_pooling: str = "mean", text_pooling: str = "mean",
                 alpha: float = 0.9, adapter_reduction: int = 4, v2tmap: bool = True,
                 temperature: float = 0.07, learn_temperature: bool = True, max_caption_tokens: int = 64,
                 text_grad: bool = True, hfe: bool = False, hfe_channels: list[int] | None = None,
                 hfe_dim: int = 128, hfe_heads: int = 4, hfe_residual: bool = True,
                 caption_key: str = "captions", max_captions: int | None = None, proj_norm: str = "batch") -> None:
        super().__init__()
        if llm is None:
            raise ValueError("contrastive_retrieval: the head encodes captions with the model's language model; "
                             "build it through AllSpark (which passes llm=) or pass a LanguageModel or LoadedLLM")
        for name, mode in (("image_pooling", image_pooling), ("text_pooling", text_pooling)):
            if mode not in ("mean", "last"):
                raise ValueError(f"contrastive_retrieval: {name} must be 'mean' or 'last', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"contrastive_retrieval: temperature must be > 0, got {temperature}")
        #: not a module: the language model's weights live under the model's ``llm``
        self.language_model = LanguageModel.of(llm)
        self.image_pooling, self.text_pooling = image_pooling, text_pooling
        self.max_caption_tokens = int(max_caption_tokens)
        self.text_grad = text_grad
        self.caption_key = caption_key
        self.max_captions = int(max_captions or (info or {}).get("captions_per_image") or 1)
        if proj_norm not in ("batch", "layer"):
            raise ValueError(f"contrastive_retrieval: proj_norm must be 'batch' or 'layer', got {proj_norm!r}")

        def projection() -> nn.Sequential:
            # The LLM's pooled states share one large component (cosine ~0.93 between unrelated captions);
            # a batch norm standardises every dimension over the data, so the projection sees the variation.
            norm = nn.BatchNorm1d(hidden_size) if proj_norm == "batch" else nn.LayerNorm(hidden_size)
            return nn.Sequential(norm, nn.Linear(hidden_size, embed_dim))

        self.image_proj = projection()
        self.text_proj = projection()
        self.v2tmap = V2TMap(embed_dim, alpha, adapter_reduction) if v2tmap else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        if hfe:
            if not hfe_channels or len(hfe_channels) != 3:
                raise ValueError("contrastive_retrieval: hfe=true needs hfe_channels, the channel counts of the "
                                 "encoder's three levels (strides 8, 16, 32), e.g. [40, 112, 320] for efficientnet_lite0")
            self.hfe = HFE(hfe_channels, embed_dim, dim=hfe_dim, heads=hfe_heads, residual=hfe_residual)
        else:
            self.hfe = None

    def train(self, mode: bool = True) -> "ContrastiveRetrievalHead":
        """A projection whose parameters are held (a later stage, ``train.train_only``) keeps its batch-norm
        statistics fixed too."""
        super().train(mode)
        for proj in (self.image_proj, self.text_proj):
            if not any(p.requires_grad for p in proj.parameters()):
                proj.eval()
        return self

    # -- text ----------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> L2-normalised embeddings [n, E] through the model's language model."""
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("contrastive_retrieval: captions must be a non-empty list of strings")
        lm = self.language_model
        tok, device = lm.tokenizer, lm.device
        ids = tok(texts, add_special_tokens=False, truncation=True, max_length=self.max_caption_tokens - 1)["input_ids"]
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        ids = [list(x) + [eos] for x in ids]
        lengths = torch.tensor([len(x) for x in ids], device=device)
        width = int(lengths.max())
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids_t = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            pooled = lm.pooled(ids_t, mask, self.text_pooling)
        return F.normalize(self.text_proj(pooled), dim=-1)

    # -- image ---------------------------------------------------------------------------------
    def encode_image(self, llm_out: LLMOutput, batch: dict[str, Any]) -> torch.Tensor:
        o_v = self.image_proj(llm_out.pool(self.image_pooling).float())  # o_v5
        if self.v2tmap is not None:
            o_v = self.v2tmap(o_v)  # Eq. 18-19
        if self.hfe is not None:
            maps = batch.get(PYRAMID_KEY)
            if maps is None:
                raise ValueError("contrastive_retrieval: hfe=true needs the multi-level maps in "
                                 f"batch[{PYRAMID_KEY!r}]; use the image_pyramid encoder")
            o_v = self.hfe(maps, o_v)  # Eq. 20-24
        return F.normalize(o_v, dim=-1)

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.logit_scale.exp()

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        captions = batch.get(self.caption_key)
        if not isinstance(captions, (list, tuple)) or len(captions) != llm_out.hidden.shape[0]:
            raise ValueError(f"contrastive_retrieval: batch[{self.caption_key!r}] must be a list of caption lists, "
                             f"one per image ({llm_out.hidden.shape[0]}), got {type(captions).__name__}")
        if any(not c for c in captions):
            raise ValueError("contrastive_retrieval: every image needs at least one caption")
        if max(len(c) for c in captions) > self.max_captions:
            raise ValueError(f"contrastive_retrieval: an image has {max(len(c) for c in captions)} captions; the "
                             f"head pads to max_captions={self.max_captions} (info captions_per_image)")
        image = self.encode_image(llm_out, batch)
        if self.training:  # training items carry one caption each: encode only the pair
            flat, owner = [c[0] for c in captions], list(range(len(captions)))
        else:
            flat = [t for c in captions for t in c]
            owner = [i for i, c in enumerate(captions) for _ in c]
        text = self.encode_text(flat)
        first = [flat_i for flat_i, i in enumerate(owner) if flat_i == 0 or owner[flat_i - 1] != i]
        scale = self.logit_scale.exp().clamp(max=100.0)
        loss, terms = symmetric_info_nce(image, text[first], scale, gather=self.training)
        B, K = len(captions), self.max_captions
        text_emb = text.new_zeros(B, K, text.shape[-1])
        text_mask = torch.zeros(B, K, dtype=torch.bool, device=text.device)
        slot = [j for c in captions for j in range(len(c))] if not self.training else [0] * B
        owner_t = torch.tensor(owner, device=text.device)
        slot_t = torch.tensor(slot, device=text.device)
        text_emb[owner_t, slot_t] = text
        text_mask[owner_t, slot_t] = True
        extras = {**terms, "temperature": self.temperature.detach()}
        return Output(loss, {"image_emb": image, "text_emb": text_emb, "text_mask": text_mask}, extras)
