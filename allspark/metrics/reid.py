"""Re-identification retrieval metrics: CMC rank-k and mean average precision (mAP), as in the standard
SYSU-MM01 / Market-1501 evaluation code (AllSpark Section IV-B, "Infrared").

For every query, gallery items of the same identity seen by the same camera are removed before ranking
(they are trivial matches); ``same_camera_groups`` lets cameras that share a location count as one (SYSU
treats visible cam2 and infrared cam3 as the same place: pass ``{3: 2}``). Queries left without any true
match are skipped, as the reference code does. CMC@k is the share of queries whose first true match ranks
within the top k; AP is the area under the precision-recall curve of one query's ranking.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from allspark.registry import METRICS

__all__ = ["reid_metrics"]


@METRICS.register("reid")
def reid_metrics(distance: np.ndarray, query_ids: Sequence[int], gallery_ids: Sequence[int],
                 query_cams: Sequence[int], gallery_cams: Sequence[int], ranks: Sequence[int] = (1, 10, 20),
                 same_camera_groups: Mapping[int, int] | None = None) -> dict[str, Any]:
    """``distance`` [num_query, num_gallery] (smaller = more similar) -> ``rank{k}`` and ``mAP``.

    Ties are broken by gallery order (a stable sort), so results are deterministic.
    """
    dist = np.asarray(distance, dtype=np.float64)
    q_ids, g_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    group = dict(same_camera_groups or {})
    q_cams = np.array([group.get(int(c), int(c)) for c in query_cams])
    g_cams = np.array([group.get(int(c), int(c)) for c in gallery_cams])
    if dist.shape != (len(q_ids), len(g_ids)):
        raise ValueError(f"distance is {list(dist.shape)}; expected [{len(q_ids)}, {len(g_ids)}] "
                         "(queries x gallery)")
    max_rank = max(ranks)
    cmc_sum = np.zeros(max_rank)
    aps, used = [], 0
    for i in range(len(q_ids)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        matches = (g_ids[order] == q_ids[i])[keep]
        if not matches.any():
            continue
        used += 1
        first = int(np.argmax(matches))
        if first < max_rank:
            cmc_sum[first:] += 1
        hits = np.cumsum(matches)
        precision_at_hits = hits[matches] / (np.flatnonzero(matches) + 1)
        aps.append(precision_at_hits.mean())
    if used == 0:
        raise ValueError("no query has a true match in the gallery; cannot score re-identification")
    out: dict[str, Any] = {f"rank{k}": float(cmc_sum[k - 1] / used) for k in ranks}
    out["mAP"] = float(np.mean(aps))
    out["num_queries"] = used
    return out
