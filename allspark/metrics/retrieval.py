"""Image-text retrieval metrics: R@K for caption datasets; MAP@n, WMAP@n, NDCG@n, ACG@n on multi-label data
exactly as the LuoJiaHOG paper defines them (Section 5.2.1, Eq. 26-30).

Ranking: the similarity of a query and a database item is the cosine of their embeddings; each query's
database is sorted by decreasing similarity with a *stable* sort, so **ties are ordered by database index**
(the earlier item first). The database is scored in chunks of ``chunk_size`` queries, so memory stays
``chunk_size x N`` whatever the number of queries; rows are independent, so chunked and full ranking agree.

For a query q and the item at rank i (1-based), ``C(q, i)`` is the number of labels they share and
``Tr(q, i) = 1`` when ``C(q, i) > 0``:

- Eq. 26 ``ACG@n = (1/n) sum_{i<=n} C(q, i)``
- Eq. 27 ``DCG@n = sum_{i<=n} (2^C(q,i) - 1) / log(1 + i)``, ``NDCG@n = DCG@n / Z_n`` with ``Z_n`` the DCG@n
  of the ideal order of the *whole* database (every item sorted by C(q, .)); the log base cancels
- Eq. 28-29 ``AP@n(q) = 1/N_Tr(q)@n * sum_{i<=n} Tr(q,i) * N_Tr(q)@i / i``, ``MAP@n`` the mean over queries
- Eq. 30 ``WMAP@n``: the same with ``ACG@i`` in place of the precision ``N_Tr(q)@i / i``

Conventions: a query with no relevant item in its top n (``N_Tr(q)@n = 0``) has AP = WMAP = 0, and one
with no relevant item in the whole database has ``Z_n = 0`` and NDCG = 0; such queries stay in the mean
(as the reference hashing-evaluation code does, which skips them in the sum but divides by all queries).
When the database holds fewer than n items, ``@n`` uses all of them (n is clipped for ACG too).

R@K (caption datasets, I2T and T2I): the share of queries with a ground-truth match in the top K (an image's
match is any of its captions; a caption's is its image); ``mR`` is the mean of the six recalls.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from allspark.registry import METRICS

__all__ = ["rank_topk", "recall_at_k", "label_ranking_metrics", "retrieval_metrics"]


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def rank_topk(queries: Any, database: Any, k: int, chunk_size: int = 1024, normalize: bool = True) -> np.ndarray:
    """Indices [Q, min(k, N)] of each query's top database items, by decreasing cosine similarity; ties by index."""
    q = _as_tensor(queries).float()
    db = _as_tensor(database).float()
    if q.dim() != 2 or db.dim() != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"rank_topk: queries [Q, E] and database [N, E] need the same E, got {list(q.shape)} "
                         f"and {list(db.shape)}")
    if not (torch.isfinite(q).all() and torch.isfinite(db).all()):
        raise ValueError("rank_topk: embeddings hold NaN or infinite values")
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        db = torch.nn.functional.normalize(db, dim=1)
    k = min(int(k), db.shape[0])
    out = torch.empty((q.shape[0], k), dtype=torch.long)
    for s in range(0, q.shape[0], chunk_size):
        out[s:s + chunk_size] = _stable_topk(q[s:s + chunk_size] @ db.T, k)
    return out.numpy()


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` columns of a stable descending sort of each row, without sorting whole rows.

    ``topk`` finds the k best; they are put in (value descending, index ascending) order. Where the k-th
    value also occurs outside the k found (a tie across the cut), ``topk`` may have picked the wrong ones
    among the equal items, so such rows are sorted in full."""
    if k == scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    vals, idx = scores.topk(k, dim=1)
    by_index = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, by_index), vals.gather(1, by_index)
    idx = idx.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)
    kth = vals.min(dim=1, keepdim=True).values
    cut_ties = (scores == kth).sum(1) > (vals == kth).sum(1)
    if cut_ties.any():
        idx[cut_ties] = torch.sort(scores[cut_ties], dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def recall_at_k(topk: np.ndarray, query_ids: Sequence[int], database_ids: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries whose top K holds a database item with the query's id (the image an item belongs to)."""
    topk = np.asarray(topk)
    hits = np.asarray(database_ids)[topk] == np.asarray(query_ids)[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def label_ranking_metrics(topk: np.ndarray, query_labels: Any, database_labels: Any,
                          ns: Sequence[int] = (5, 10, 20, 50, 100), chunk_size: int = 1024) -> dict[str, float]:
    """Eq. 26-30 from each query's ranked database indices ``topk`` [Q, >= max n] and multi-hot labels."""
    ql = _as_tensor(query_labels).float()
    dl = _as_tensor(database_labels).float()
    topk = np.asarray(topk)
    if ql.dim() != 2 or dl.dim() != 2 or ql.shape[1] != dl.shape[1]:
        raise ValueError(f"label_ranking_metrics: labels must be [Q, L] and [N, L], got {list(ql.shape)} and {list(dl.shape)}")
    if topk.shape[0] != ql.shape[0]:
        raise ValueError(f"label_ranking_metrics: topk has {topk.shape[0]} rows for {ql.shape[0]} queries")
    n_db = dl.shape[0]
    width = min(max(ns), n_db)
    if topk.shape[1] < width:
        raise ValueError(f"label_ranking_metrics: topk holds {topk.shape[1]} ranks; n={max(ns)} needs {width}")
    sums = {f"{m}@{n}": 0.0 for n in ns for m in ("MAP", "WMAP", "NDCG", "ACG")}
    disc = 1.0 / np.log2(np.arange(2, width + 2))  # 1 / log(1 + i), i = 1..width
    ranks = np.arange(1, width + 1)
    for s in range(0, ql.shape[0], chunk_size):
        q = ql[s:s + chunk_size]
        c = (q @ dl.T).round().numpy()  # C(q, j) for every database item j
        shared = np.take_along_axis(c, topk[s:s + chunk_size, :width], axis=1)  # C(q, i) by rank
        ideal = -np.sort(-c, axis=1)[:, :width]
        rel = (shared > 0).astype(np.float64)
        n_rel = np.cumsum(rel, axis=1)  # N_Tr(q)@i
        acg_i = np.cumsum(shared, axis=1) / ranks  # ACG@i
        gain = (2.0 ** shared - 1) * disc
        ideal_gain = (2.0 ** ideal - 1) * disc
        for n in ns:
            m = min(n, width)
            denom = n_rel[:, m - 1]
            safe = np.where(denom > 0, denom, 1)
            ap = np.where(denom > 0, (rel[:, :m] * n_rel[:, :m] / ranks[:m]).sum(1) / safe, 0.0)
            wmap = np.where(denom > 0, (rel[:, :m] * acg_i[:, :m]).sum(1) / safe, 0.0)
            z = ideal_gain[:, :m].sum(1)
            ndcg = np.where(z > 0, gain[:, :m].sum(1) / np.where(z > 0, z, 1), 0.0)
            sums[f"MAP@{n}"] += ap.sum()
            sums[f"WMAP@{n}"] += wmap.sum()
            sums[f"NDCG@{n}"] += ndcg.sum()
            sums[f"ACG@{n}"] += acg_i[:, m - 1].sum()
    return {k: float(v / ql.shape[0]) for k, v in sums.items()}


@METRICS.register("retrieval")
def retrieval_metrics(image_emb: Any, text_emb: Any, text_owner: Sequence[int], image_labels: Any = None,
                      ks: Sequence[int] = (1, 5, 10), ns: Sequence[int] = (5, 10, 20, 50, 100),
                      chunk_size: int = 1024) -> dict[str, Any]:
    """I2T and T2I: ``I2T_R@K``, ``T2I_R@K``, ``mR``; with ``image_labels`` [N_img, L] also
    ``I2T_MAP@n`` ... ``T2I_ACG@n`` (a caption carries the labels of its image)."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    owner = np.asarray(text_owner, dtype=np.int64)
    if len(owner) != len(text_emb):
        raise ValueError(f"retrieval_metrics: {len(text_emb)} captions but {len(owner)} owners")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(image_emb)):
        raise ValueError("retrieval_metrics: a caption's owner is not an image index")
    depth = max(max(ks), max(ns) if image_labels is not None else 0)
    i2t = rank_topk(image_emb, text_emb, depth, chunk_size)
    t2i = rank_topk(text_emb, image_emb, depth, chunk_size)
    out: dict[str, Any] = {}
    for k, v in recall_at_k(i2t, np.arange(len(image_emb)), owner, ks).items():
        out[f"I2T_R@{k}"] = v
    for k, v in recall_at_k(t2i, owner, np.arange(len(image_emb)), ks).items():
        out[f"T2I_R@{k}"] = v
    out["mR"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("I2T", "T2I") for k in ks]))
    if image_labels is not None:
        labels = np.asarray(image_labels, dtype=np.float32)
        for k, v in label_ranking_metrics(i2t, labels, labels[owner], ns, chunk_size).items():
            out[f"I2T_{k}"] = v
        for k, v in label_ranking_metrics(t2i, labels[owner], labels, ns, chunk_size).items():
            out[f"T2I_{k}"] = v
    out["num_images"], out["num_captions"] = int(len(image_emb)), int(len(text_emb))
    return out
