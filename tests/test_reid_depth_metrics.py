"""Re-identification (CMC, mAP) and depth (PAG6, PAG10, MAE) metrics on small hand-computed cases."""
import numpy as np
import pytest

from allspark.metrics.depth import depth_metrics
from allspark.metrics.reid import reid_metrics


def test_cmc_and_map_by_hand():
    # gallery: ids [1, 2, 1, 3], cams [1, 1, 2, 2]
    # query A (id 1, cam 3): ranking by distance -> g1(id2), g0(id1), g3(id3), g2(id1)
    #   matches at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5; first match at rank 2
    # query B (id 3, cam 3): ranking -> g3(id3) first: AP = 1, rank 1
    dist = np.array([[0.2, 0.1, 0.9, 0.5],
                     [0.6, 0.7, 0.8, 0.1]])
    m = reid_metrics(dist, [1, 3], [1, 2, 1, 3], [3, 3], [1, 1, 2, 2], ranks=(1, 2, 3))
    assert m["rank1"] == pytest.approx(0.5) and m["rank2"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx(0.75) and m["num_queries"] == 2


def test_same_identity_same_camera_is_removed_and_groups_apply():
    dist = np.array([[0.1, 0.2, 0.3]])
    # the nearest gallery item is the same person from the same camera: removed, so the true match at
    # position 3 becomes rank 2 (after the id-9 distractor)
    m = reid_metrics(dist, [5], [5, 9, 5], [3], [3, 1, 1], ranks=(1, 2))
    assert m["rank1"] == 0.0 and m["rank2"] == 1.0 and m["mAP"] == pytest.approx(0.5)
    # SYSU: cam3 (infrared) counts as cam2's place -> the cam-2 match is removed too; no match left
    with pytest.raises(ValueError, match="no query has a true match"):
        reid_metrics(np.array([[0.1]]), [5], [5], [3], [2], same_camera_groups={3: 2})
    with pytest.raises(ValueError, match=r"expected \[1, 2\]"):
        reid_metrics(np.zeros((1, 3)), [1], [1, 2], [1], [2, 2])


def test_pag_and_mae_by_hand():
    truth = np.array([[10.0, 10.0, 10.0], [10.0, 0.0, np.nan]])  # last two pixels have no ground truth
    pred = np.array([[10.5, 10.8, 11.5], [9.0, 3.0, 7.0]])
    m = depth_metrics(pred, truth)
    # errors on the 4 valid pixels: 0.5, 0.8, 1.5, 1.0
    assert m["PAG6"] == pytest.approx(1 / 4) and m["PAG10"] == pytest.approx(3 / 4)
    assert m["MAE"] == pytest.approx((0.5 + 0.8 + 1.5 + 1.0) / 4) and m["num_pixels"] == 4
    with pytest.raises(ValueError, match="no valid ground-truth pixel"):
        depth_metrics(pred, np.zeros_like(truth))
    with pytest.raises(ValueError, match="differ in shape"):
        depth_metrics(pred[:1], truth)
