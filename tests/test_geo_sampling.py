"""LuoJiaHOG sampling (allspark/retrieval/sampling.py) and the label tree (allspark/retrieval/labels.py).

The statistics are checked on a 3 x 3 grid with rook weights against values worked out by hand (the
arithmetic is written out below), and against esda/libpysal on a 4 x 5 grid when those are installed.
"""
from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

from allspark.retrieval import sampling as S
from allspark.retrieval.labels import LabelTree, paper_examples

# 3 x 3 grid, index = row * 3 + col, x = col, y = row; values 1..9 row by row:
#   1 2 3
#   4 5 6
#   7 8 9
GRID3 = np.array([(c, r) for r in range(3) for c in range(3)], dtype=float)
X3 = np.arange(1, 10, dtype=float)


def rook3(transform="none"):
    return S.spatial_weights(GRID3, method="distance_band", threshold=1.0, transform=transform)


def test_rook_weights_on_the_grid():
    w = rook3().matrix().toarray()
    assert w.sum() == 24  # 12 rook edges, both directions
    assert w[0].nonzero()[0].tolist() == [1, 3]
    assert w[4].nonzero()[0].tolist() == [1, 3, 5, 7]
    row = rook3("row").matrix().toarray()
    np.testing.assert_allclose(row.sum(axis=1), np.ones(9))
    assert row[1, 0] == pytest.approx(1 / 3)
    # knn, k=4, corner 0: distances 1 (1, 3), sqrt2 (4), 2 (2, 6): the 4th place is a tie -> 5 neighbours
    knn = S.spatial_weights(GRID3, method="knn", k=4, transform="none").matrix().toarray()
    assert np.flatnonzero(knn[0]).tolist() == [1, 2, 3, 4, 6]


def test_knn_ties_are_all_included():
    knn = S.spatial_weights(GRID3, method="knn", k=3, transform="none").matrix().toarray()
    # corner 0: distances 1 (1, 3), sqrt2 (4), 2 (2, 6): the 3rd nearest is 4 alone
    assert np.flatnonzero(knn[0]).tolist() == [1, 3, 4]
    # centre 4: four neighbours at distance 1, k=3 cuts a tie -> all four kept
    assert np.flatnonzero(knn[4]).tolist() == [1, 3, 5, 7]


def test_global_moran_binary_by_hand():
    # z = x - 5 = [-4 -3 -2 / -1 0 1 / 2 3 4], sum z^2 = 60, S0 = 24.
    # sum_ij w z_i z_j = 2 * (horizontal edges 12+6+0+0+6+12 + vertical 4-2+0+0-2+4) = 2 * 40 = 80
    # I = 9/24 * 80/60 = 1/2
    g = S.global_moran(X3, rook3(), assumption="normality")
    assert g.I == pytest.approx(0.5, abs=1e-12)
    assert g.expected == pytest.approx(-1 / 8)
    # S1 = 2 * 24 = 48; S2 = sum (2 d_i)^2 = 4 * (4*2^2 + 4*3^2 + 4^2) = 272
    # V_norm = (81*48 - 9*272 + 3*24^2) / (80 * 24^2) - 1/64 = 3168/46080 - 720/46080 = 2448/46080
    v_norm = Fraction(2448, 46080)
    assert g.variance == pytest.approx(float(v_norm), abs=1e-12)
    assert float(v_norm) == 0.053125
    assert g.z == pytest.approx(0.625 / math.sqrt(0.053125), abs=1e-12)
    assert g.z == pytest.approx(2.711631, abs=1e-6)
    # randomisation: b2 = 9 * 708 / 60^2 = 1.77; A = 9*(57*48 - 2448 + 1728) = 18144;
    # B = 1.77 * (72*48 - 18*272 + 6*576) = 1.77 * 2016 = 3568.32; V = (A - B)/(8*7*6*576) - 1/64
    r = S.global_moran(X3, rook3(), assumption="randomisation")
    v_rand = (18144 - 3568.32) / (8 * 7 * 6 * 576) - 1 / 64
    assert v_rand == pytest.approx(0.0596875, abs=1e-12)
    assert r.variance == pytest.approx(0.0596875, abs=1e-12)
    assert r.z == pytest.approx(0.625 / math.sqrt(0.0596875), abs=1e-12)
    assert r.p == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(r.z / math.sqrt(2)))), abs=1e-12)


def test_global_moran_row_standardised_by_hand():
    # row-standardised: S0 = 9; sum_i z_i * mean_{nbrs} z_j = 8 + 6 + 2 + 2/3 + 0 + 2/3 + 2 + 6 + 8 = 100/3
    # I = 9/9 * (100/3) / 60 = 5/9
    assert S.global_moran(X3, rook3("row")).I == pytest.approx(5 / 9, abs=1e-12)


def test_local_moran_by_hand():
    lm = S.local_moran(X3, rook3())
    # site 0: z = -4, L = z1 + z3 = -3 - 1 = -4; S_0^2 = (60 - 16)/8 = 5.5
    # I_0 = -4 / 5.5 * -4 = 32/11
    assert lm.I[0] == pytest.approx(32 / 11, abs=1e-12)
    # site 1: z = -3, L = -4 - 2 + 0 = -6, S_1^2 = (60 - 9)/8 = 51/8, I_1 = -3 * -6 * 8/51 = 48/17
    assert lm.I[1] == pytest.approx(48 / 17, abs=1e-12)
    assert lm.I[4] == 0.0  # centre: z = 0
    # conditional z at site 0: m2 = 60/9, E[L] = -2 * (-4)/8 = 1,
    # V[L] = 9/7 * (60/9 - 16/8) * (2 - 4/8) = 9/7 * 14/3 * 3/2 = 9  ->  z = sign(-4) * (-4 - 1)/3 = 5/3
    assert lm.z[0] == pytest.approx(5 / 3, abs=1e-12)
    # site 1: E[L] = 9/8, V[L] = 9/7 * (60/9 - 9/8) * (3 - 9/8) = 2565/192 -> z = (6 + 9/8)/sqrt(2565/192)
    assert lm.z[1] == pytest.approx(7.125 / math.sqrt(2565 / 192), abs=1e-12)
    # site 3: z = -1, L = -4 + 0 + 2 = -2 -> LL; centre: z = 0, L = 0 (neither > 0) -> LL; site 5: HH
    assert lm.quadrant.tolist() == ["LL", "LL", "LL", "LL", "LL", "HH", "HH", "HH", "HH"]


def test_gi_star_by_hand():
    gi = S.getis_ord_gi_star(X3, rook3())
    # X = 5, S = sqrt(285/9 - 25) = sqrt(20/3). Self-weight 1.
    s = math.sqrt(20 / 3)
    # site 0: {0, 1, 3}: sum = 1 + 2 + 4 = 7, W = 3, sum w^2 = 3 -> (7 - 15) / (S sqrt((27 - 9)/8))
    assert gi.G[0] == pytest.approx(-8 / (s * 1.5), abs=1e-12)
    assert gi.G[0] == pytest.approx(-2.065591, abs=1e-6)
    # site 1: {0, 1, 2, 4}: 1 + 2 + 3 + 5 = 11, W = 4 -> (11 - 20) / (S sqrt((36 - 16)/8))
    assert gi.G[1] == pytest.approx(-9 / (s * math.sqrt(2.5)), abs=1e-12)
    assert gi.G[4] == pytest.approx(0.0, abs=1e-12)  # centre: 2 + 4 + 5 + 6 + 8 = 25 = 5 * 5
    assert gi.G[8] == pytest.approx(-gi.G[0], abs=1e-12)
    spots = gi.spots(0.05)
    assert spots[0] == "cold" and spots[8] == "hot" and spots[4] == ""


def test_sampling_regions_eq8():
    lisa = S.LocalMoran(I=np.zeros(4), z=np.zeros(4), p=np.array([0.01, 0.01, 0.01, 0.5]),
                        quadrant=np.array(["HH", "LL", "HL", "HH"]))
    gi = S.GiStar(G=np.array([3.0, 0.5, 0.0, 3.0]), p=np.array([0.001, 0.6, 0.9, 0.001]))
    # 0: HH cluster and hot spot -> hot; 1: LL cluster but no Gi* spot -> not selected;
    # 2: significant HL outlier -> outlier; 3: hot spot but local Moran not significant -> not selected
    assert S.sampling_regions(lisa, gi).tolist() == ["hot", "", "outlier", ""]


# 4 x 4 worked allocation example (index = row * 4 + col); regions: left half A, right half B.
#   f f | w w
#   f u | w w
#   f u | w f
#   u u | w f
CLASSES4 = np.array([list("ffww"), list("fuww"), list("fuwf"), list("uuwf")])
GRID4 = np.array([(c, r) for r in range(4) for c in range(4)], dtype=float)
REGIONS4 = np.array(["A" if c < 2 else "B" for r in range(4) for c in range(4)])


def test_landscape_shape_index_eq9_by_hand():
    left = CLASSES4[:, :2]
    # b_p (rook neighbours of another class): 0 1 / 1 2 / 2 1 / 1 0 -> sum 8, q = 8
    assert S.landscape_shape_index(left) == pytest.approx(0.25 * 8 / math.sqrt(8))
    assert S.landscape_shape_index(left, "f") == pytest.approx(0.25 * 4 / 2)
    right = CLASSES4[:, 2:]
    # b_p: 0 0 / 0 1 / 1 2 / 1 1 -> sum 6; w cells 0+0+0+1+1+1 = 3 (q 6); f cells 2+1 = 3 (q 2)
    assert S.landscape_shape_index(right) == pytest.approx(0.25 * 6 / math.sqrt(8))
    assert S.landscape_shape_index(right, "w") == pytest.approx(0.75 / math.sqrt(6))
    assert S.landscape_shape_index(right, "f") == pytest.approx(0.75 / math.sqrt(2))
    # the table version (rook graph, neighbours within the region) agrees with the rasters
    w = S.spatial_weights(GRID4, method="distance_band", threshold=1.0, transform="none")
    r_lsi, c_lsi, u = S.table_lsi(CLASSES4.ravel(), w, REGIONS4)
    assert r_lsi == pytest.approx({"A": 2 / math.sqrt(8), "B": 1.5 / math.sqrt(8)})
    assert c_lsi[("B", "f")] == pytest.approx(0.75 / math.sqrt(2))
    assert (u * 4).tolist() == [0, 1, 0, 0, 1, 2, 0, 1, 2, 1, 1, 2, 1, 0, 1, 1]


def test_allocation_eq10_eq11_worked_example():
    w = S.spatial_weights(GRID4, method="distance_band", threshold=1.0, transform="none")
    plan = S.allocate_budget(20, REGIONS4, CLASSES4.ravel(), w)
    # Eq. 10: rLSI*A = 8*2/sqrt8 : 8*1.5/sqrt8 = 4 : 3 -> 20*4/7 = 11.43, 8.57 -> largest remainder: 11, 9
    assert plan["A"]["N"] == 11 and plan["B"]["N"] == 9
    assert plan["A"]["N"] + plan["B"]["N"] == 20
    # Eq. 11, A: cLSI*W = 0.5*0.5 for f and u -> 5.5 each -> tie to the first class met (f): 6, 5
    assert {c: v["N"] for c, v in plan["A"]["classes"].items()} == {"f": 6, "u": 5}
    # B: w 0.75/sqrt6 * 0.75, f 0.75/sqrt2 * 0.25 -> ratio sqrt3 : 1 -> 9*sqrt3/(sqrt3+1) = 5.706, 3.294 -> 6, 3
    assert 9 * math.sqrt(3) / (math.sqrt(3) + 1) == pytest.approx(5.7058, abs=1e-4)
    assert {c: v["N"] for c, v in plan["B"]["classes"].items()} == {"w": 6, "f": 3}
    assert plan["B"]["classes"]["w"]["share"] == 0.75
    # Eq. 12 cannot place 6 samples of f in A (3 locations with uLSI > 0; B/f: 3 for 2): a clear error
    u = S.table_lsi(CLASSES4.ravel(), w, REGIONS4)[2]
    with pytest.raises(ValueError, match="region 'A' class 'f' is allocated 6 samples but has only 3 locations"):
        S.select_points(plan, REGIONS4, CLASSES4.ravel(), u)


def test_selection_eq12_and_pipeline():
    frame = {"x": GRID4[:, 0], "y": GRID4[:, 1], "class": CLASSES4.ravel(), "region": REGIONS4}
    out = S.plan_sampling(frame, 8, region_column="region", method="distance_band", threshold=1.0,
                          transform="none", seed=3)
    plan = out["plan"]
    # Eq. 10: 8*4/7 = 4.57, 3.43 -> 5, 3; Eq. 11: A 2.5/2.5 -> f 3, u 2; B 3*0.634 = 1.90, 1.10 -> w 2, f 1
    assert {r: e["N"] for r, e in plan.items()} == {"A": 5, "B": 3}
    assert {c: v["N"] for c, v in plan["A"]["classes"].items()} == {"f": 3, "u": 2}
    assert {c: v["N"] for c, v in plan["B"]["classes"].items()} == {"w": 2, "f": 1}
    sel = set(out["selected"].tolist())
    assert len(sel) == 8
    # A/f: the three f cells with uLSI > 0 (1, 4, 8; cell 0 has uLSI 0); A/u ranked 5, 9, 12 -> parts
    # [5, 9], [12]; B/w ranked 7, 10, 14 -> [7, 10], [14]; B/f ranked 11, 15 -> one of them
    assert {1, 4, 8, 12, 14} <= sel
    assert len(sel & {5, 9}) == 1 and len(sel & {7, 10}) == 1 and len(sel & {11, 15}) == 1


def test_pipeline_with_night_light_and_cli(tmp_path):
    import pandas as pd

    from scripts.geo_sampling import main

    rng = np.random.default_rng(0)
    n = 8
    xs, ys = np.meshgrid(np.arange(n), np.arange(n))
    light = np.where(xs + ys < 6, 50.0, 1.0) + rng.normal(0, 0.5, size=xs.shape)  # a bright corner
    cls = np.where((xs + 2 * ys) % 3 == 0, "building", np.where(xs % 2 == 0, "farmland", "water"))
    frame = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "class": cls.ravel(), "light": light.ravel()})
    frame.to_csv(tmp_path / "c.csv", index=False)
    summary = main([str(tmp_path / "c.csv"), "--budget", "6", "--value", "light", "--out", str(tmp_path / "o")])
    assert summary["global_moran"]["I"] > 0.5 and summary["global_moran"]["p"] < 1e-6
    assert sum(e["N"] for e in summary["plan"].values()) == 6
    assert set(summary["plan"]) <= {"hot", "cold", "outlier"}
    table = pd.read_csv(tmp_path / "o" / "locations.csv")
    assert int(table["selected"].sum()) == 6
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["budget"] == 6


def test_lon_lat_distances_in_km():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    w = S.spatial_weights(pts, method="distance_band", threshold=120.0, gamma=1.0, transform="none",
                          geographic=True).matrix().toarray()
    one_degree = 2 * math.pi * S.EARTH_RADIUS_KM / 360  # 111.195 km
    assert w[0, 1] == pytest.approx(1 / one_degree, rel=1e-9)
    assert w[0, 3] == 0 and w[1, 2] == 0  # 157 km apart


def test_location_table_without_coordinates_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected coordinate columns 'x' and 'y' or 'lon' and 'lat', "
                                         r"found columns \['easting', 'class'\]"):
        S.read_locations({"easting": [0, 1], "class": ["a", "b"]})
    with pytest.raises(ValueError, match="expected a land-use class column 'class'"):
        S.read_locations({"x": [0, 1], "y": [0, 1]})
    with pytest.raises(ValueError, match="expected numbers in column 'y', found 'n/a'"):
        S.read_locations({"x": [0, 1], "y": [0, "n/a"], "class": ["a", "b"]})
    with pytest.raises(ValueError, match="all equal"):
        S.global_moran(np.ones(9), rook3())
    with pytest.raises(ValueError, match="weights are all zero"):
        S.largest_remainder([0.0, 0.0], 3)


def test_largest_remainder():
    assert S.largest_remainder([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert S.largest_remainder([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 -> +1 to 3.5


def test_against_esda():
    esda = pytest.importorskip("esda")
    libpysal = pytest.importorskip("libpysal")
    rng = np.random.default_rng(0)
    grid = np.array([(c, r) for r in range(4) for c in range(5)], dtype=float)
    v = rng.normal(size=20) + 5
    lw = libpysal.weights.lat2W(4, 5, rook=True)  # ids row-major, as grid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for transform, code in (("row", "r"), ("none", "b")):
            w = S.spatial_weights(grid, method="distance_band", threshold=1.0, transform=transform)
            m = esda.Moran(v, lw, transformation=code, permutations=0)
            assert S.global_moran(v, w).I == pytest.approx(m.I, abs=1e-12)
            assert S.global_moran(v, w).z == pytest.approx(m.z_rand, abs=1e-10)
            assert S.global_moran(v, w, assumption="normality").z == pytest.approx(m.z_norm, abs=1e-10)
            lm = esda.Moran_Local(v, lw, transformation=code, permutations=0)
            ours = S.local_moran(v, w)
            # esda: Anselin scale, I^A = z_i L_i / m2 on standardised z, conditional moments EIc, VIc
            z = (v - v.mean()) / v.std()
            lag = w.matrix() @ z
            z_esda = (z * lag / (z * z).mean() - lm.EIc) / np.sqrt(lm.VIc)
            np.testing.assert_allclose(ours.z, z_esda, atol=1e-10)
            # the paper's I_i = esda's I_i * (sum z^2/(n-1)) / S_i^2
            zc = v - v.mean()
            s2 = ((zc ** 2).sum() - zc ** 2) / 19
            np.testing.assert_allclose(ours.I, lm.Is * (zc ** 2).sum() / 19 / s2 * 1, rtol=1e-10)
        w = S.spatial_weights(grid, method="distance_band", threshold=1.0, transform="none")
        g = esda.G_Local(v, lw, transform="B", star=True, permutations=0)
        np.testing.assert_allclose(S.getis_ord_gi_star(v, w).G, g.Zs, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Label tree
# ---------------------------------------------------------------------------------------------------------

def test_paper_example_tree():
    tree = paper_examples()
    assert tree.parents("church") == {"third": "church", "second": "Infrastructure", "first": "Building area"}
    assert tree.parents("Graveyard")["third"] == "cemetery"  # alias consolidated
    assert tree.parents("farmyard")["second"] == "Building"
    assert tree.level("Arable land") == "first"
    assert tree.labels("second") == ["Building", "Infrastructure"]
    assert tree.lift(["church", "farmyard", "cemetery"], "second") == ["Building", "Infrastructure"]
    assert tree.lift(["church", "farmyard"], "first") == ["Building area"]
    with pytest.raises(KeyError, match="'helipad'"):
        tree.parents("helipad")


def test_label_tree_files_and_extension(tmp_path):
    (tmp_path / "t.csv").write_text("first,second,third\nWater area,water,river\nWater area,water,reservoir\n"
                                    "Building area,building,farmyard\nalias,reservior,reservoir\n")
    tree = LabelTree.from_file(tmp_path / "t.csv")
    assert tree.parents("reservior") == {"third": "reservoir", "second": "water", "first": "Water area"}
    (tmp_path / "more.json").write_text(json.dumps(
        {"tree": {"Water area": {"water": ["canal"]}, "Arable land": {"farmland": ["orchard"]}},
         "aliases": {"irrigation canal": "canal"}}))
    tree.extend_from_file(tmp_path / "more.json")
    assert tree.children("water") == ["canal", "reservoir", "river"]
    assert tree.parents("Irrigation_Canal")["first"] == "Water area"
    assert tree.parents("orchard")["second"] == "farmland"
    (tmp_path / "bad.csv").write_text("Arable land,water,pond\n")
    with pytest.raises(ValueError, match=r"bad.csv line 1: label tree: 'water' is already under 'Water area', "
                                         r"found it under 'Arable land'"):
        tree.extend_from_file(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="expected a path of 1 to 3 labels"):
        tree.add("a", "b", "c", "d")
