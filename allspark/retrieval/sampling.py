r"""LuoJiaHOG hierarchical spatial sampling (Zhao et al., "LuoJiaHOG", Sec. 3.1.1, Eq. 1-12) on a location table.

Input: a table of candidate sample locations, one row each, with coordinates (``x``/``y`` in a projected
unit, or ``lon``/``lat`` in degrees), a land-use ``class`` and optionally a night-light value (the paper's
analysis variable). Everything is numpy/scipy (no optional dependency at run time); ``esda``/``libpysal``
(PyPI, optional) are used by tests/test_geo_sampling.py as an independent check when installed (skipped
otherwise): global Moran's I and both z-scores, the local z-scores (esda's ``EIc``/``VIc``) and Gi* agree
to 1e-10.

**Spatial weights (Eq. 1).** ``w_ij = ||i - j||^{-gamma}`` when ``i`` and ``j`` are neighbours, 0 otherwise
(``w_ii = 0``). The paper's neighbours share a boundary or node (contiguity of regions); for point locations
the neighbours here are the ``k`` nearest (``method="knn"``) or all within a distance (``"distance_band"``;
on a regular grid of spacing ``s``, a band of ``s`` is rook and of ``s*sqrt(2)`` queen contiguity).
``gamma = 0`` gives binary weights. Distances are Euclidean for ``x``/``y`` and great-circle kilometres for
``lon``/``lat``. ``transform="row"`` row-standardises (each row sums to 1), ``"none"`` keeps Eq. 1 as is.
The paper does not state a transform: Eq. 1 is unstandardised; row standardisation is the default here
(as in esda and ArcGIS), ``transform="none"`` reproduces Eq. 1 literally.

**Global Moran's I (Eq. 2-3).** ``I = n/S0 * sum_ij w_ij z_i z_j / sum_i z_i^2``, ``z = x - mean(x)``,
``S0 = sum_ij w_ij``. The paper draws conclusions from "the z-score and the p-value" without naming the null;
both classical ones are given (Cliff & Ord 1981), ``E[I] = -1/(n-1)`` and, with ``S1 = 1/2 sum_ij
(w_ij + w_ji)^2``, ``S2 = sum_i (w_i. + w_.i)^2``, ``b2 = n sum z^4 / (sum z^2)^2``::

    V_norm = (n^2 S1 - n S2 + 3 S0^2) / ((n^2 - 1) S0^2) - E[I]^2
    V_rand = (n((n^2 - 3n + 3) S1 - n S2 + 3 S0^2) - b2((n^2 - n) S1 - 2n S2 + 6 S0^2))
             / ((n-1)(n-2)(n-3) S0^2) - E[I]^2

``z = (I - E[I]) / sqrt(V)``, two-sided ``p = 2 (1 - Phi(|z|))``.

**Local Moran's I (Eq. 4-5)**, exactly as printed: ``I_i = z_i / S_i^2 * sum_{j != i} w_ij z_j`` with
``S_i^2 = sum_{j != i} (x_j - mean x)^2 / (n - 1)``. Its z-score is taken under *conditional randomisation*
(``x_i`` held, the other ``n-1`` values permuted over the other sites; Sokal et al. 1998, Eqs. A7-A8, the null
of the permutation tests of GeoDa/esda/ArcGIS): with ``L_i = sum_{j != i} w_ij z_j``, ``W_i = sum_j w_ij``,
``W2_i = sum_j w_ij^2`` and ``m2 = sum z^2 / n``::

    E[L_i] = -W_i z_i / (n-1)
    V[L_i] = n/(n-2) * (m2 - z_i^2/(n-1)) * (W2_i - W_i^2/(n-1))
    z(I_i) = sign(z_i) (L_i - E[L_i]) / sqrt(V[L_i])      (0 where z_i = 0 or V = 0)

(``I_i = (z_i / S_i^2) L_i``, so its deviation is ``L_i``'s times ``z_i / S_i^2``, hence the sign). ``S_i^2``
is fixed under that null, so the z-score does not depend on how ``I_i`` is scaled (the paper's
``S_i^2``, Anselin's ``m2`` or esda's ``sum z^2/(n-1)`` all give the same z). Quadrants: ``HH`` (``z_i > 0``,
``L_i > 0``), ``LL`` (both < 0), ``HL``, ``LH``.

**Getis-Ord Gi\* (Eq. 6-7)**, as printed (the statistic is itself a z-score)::

    G*_i = (sum_j w*_ij x_j - X W*_i) / (S sqrt((n sum_j w*_ij^2 - W*_i^2) / (n-1))),
    S = sqrt(sum_j x_j^2 / n - X^2),    X = mean x

with the sums over all ``j`` *including* ``i``: ``w*`` is the Eq. 1 matrix with a self-weight on the
diagonal (``self_weight``, default 1, the binary convention; Eq. 1 cannot give one, ``||i - i|| = 0``),
then transformed. Hot spot: ``G*_i > 0`` and ``p < alpha``; cold spot: ``G*_i < 0`` and ``p < alpha``.

**Sampling regions (Eq. 8).** ``r = (M+ ∩ G) ∪ M-``: significant HH/LL local-Moran clusters that are also
significant Gi\* hot/cold spots, together with the significant HL/LH outliers.

**Landscape shape index (Eq. 9)** over a set of cells: ``LSI = 1/4 * sum_p b_p / sqrt(q)``, ``q`` the number
of cells, ``b_p`` the number of the 4-neighbours of cell ``p`` that belong to a different class. On a raster
the 4-neighbours are the pixel's rook neighbours inside the raster (cells outside it are not counted, and
an edge between two cells of the set is seen from both sides, as Eq. 9 is written); on the location table
they are the neighbours of the weights graph (build it with rook contiguity to match). ``rLSI`` uses all
cells of a region, ``cLSI_{i,k}`` only the cells of class ``k`` in region ``i`` (``q`` their number, ``b_p``
still counting any different class), ``uLSI`` one unit (here: one location, ``q = 1``).

**Budget allocation (Eq. 10-11).** ``N_i = rLSI_i A_i / sum_j rLSI_j A_j * N`` over regions, then
``cN_{i,k} = cLSI_{i,k} W_{i,k} / sum_k cLSI_{i,k} W_{i,k} * N_i`` over the classes of region ``i``
(``W_{i,k}`` the share of class ``k`` in region ``i``). The paper gives real numbers; counts here are
rounded by largest remainders at each level (ties to the earlier entry), so the counts sum exactly to ``N``
and to each ``N_i``. The regions of a table are its hot-spot groups (``hot``, ``cold``, ``outlier``: the
Eq. 8 regions split by type) or a ``region`` column; areas are the number of locations times
``unit_area`` or the sum of an area column.

**Point selection (Eq. 12).** Within region ``i`` and class ``k`` the units are ranked by ``uLSI``
(descending), zeros removed, the ranking cut into ``cN_{i,k}`` equal parts (``numpy.array_split``) and one
unit drawn at random from each part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree
from scipy.stats import norm

__all__ = [
    "EARTH_RADIUS_KM", "LocationTable", "SpatialWeights", "GlobalMoran", "LocalMoran", "GiStar", "read_locations",
    "spatial_weights", "global_moran", "local_moran", "getis_ord_gi_star", "sampling_regions",
    "landscape_shape_index", "table_lsi", "largest_remainder", "allocate_regions", "allocate_classes",
    "allocate_budget", "select_points", "plan_sampling",
]

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius
_COORDS = (("x", "y"), ("lon", "lat"), ("longitude", "latitude"))


# --------------------------------------------------------------------------------------------------------
# The location table
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocationTable:
    """Candidate locations: ``coords`` [n, 2] (x, y or lon, lat), ``geographic`` (lon/lat), ``classes``
    (land-use class per row, strings), optional ``values`` (night light) and the source ``frame``."""

    coords: np.ndarray
    geographic: bool
    classes: np.ndarray | None
    values: np.ndarray | None
    frame: Any

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def read_locations(table: Any, *, class_column: str | None = "class", value_column: str | None = None) -> LocationTable:
    """Read a location table (a pandas ``DataFrame``, a mapping of columns, or a CSV path).

    Coordinates: columns ``x``/``y`` or ``lon``/``lat`` (also ``longitude``/``latitude``), case-insensitive.
    ``class_column`` (None: no classes) and ``value_column`` (None: no values) name the land-use class and
    the analysis value. Missing columns, non-numeric coordinates/values, NaNs, latitudes outside [-90, 90]
    or fewer than 2 rows raise a ``ValueError`` saying what was expected and what was found."""
    import pandas as pd

    if isinstance(table, (str, PathLike)):
        frame = pd.read_csv(table)
    elif isinstance(table, pd.DataFrame):
        frame = table
    elif isinstance(table, Mapping):
        frame = pd.DataFrame(dict(table))
    else:
        raise ValueError(f"location table: expected a pandas DataFrame, a mapping of columns or a CSV path, "
                         f"got {type(table).__name__}")
    lower = {str(c).lower(): c for c in frame.columns}
    found = [str(c) for c in frame.columns]
    pair = next(((lower[a], lower[b], a) for a, b in _COORDS if a in lower and b in lower), None)
    if pair is None:
        raise ValueError(f"location table: expected coordinate columns 'x' and 'y' or 'lon' and 'lat', "
                         f"found columns {found}")
    if len(frame) < 2:
        raise ValueError(f"location table: expected at least 2 locations, found {len(frame)}")
    cx, cy, kind = pair
    coords = np.column_stack([_numeric(frame[cx], cx), _numeric(frame[cy], cy)])
    geographic = kind != "x"
    if geographic and (np.abs(coords[:, 1]) > 90).any():
        bad = coords[np.abs(coords[:, 1]) > 90, 1][0]
        raise ValueError(f"location table: expected latitudes in [-90, 90] in column {cy!r}, found {bad}")

    def column(name: str | None, what: str):
        if name is None:
            return None
        if name.lower() not in lower:
            raise ValueError(f"location table: expected a {what} column {name!r}, found columns {found}")
        return frame[lower[name.lower()]]

    cls = column(class_column, "land-use class")
    classes = None if cls is None else cls.astype(str).to_numpy()
    if cls is not None and cls.isna().any():
        raise ValueError(f"location table: expected a class in every row of {class_column!r}, "
                         f"found {int(cls.isna().sum())} empty")
    val = column(value_column, "value")
    values = None if val is None else _numeric(val, value_column)
    return LocationTable(coords, geographic, classes, values, frame)


def _numeric(series, name) -> np.ndarray:
    import pandas as pd

    out = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(out)
    if bad.any():
        raise ValueError(f"location table: expected numbers in column {name!r}, found "
                         f"{series[bad].iloc[0]!r} (row {int(np.flatnonzero(bad)[0])})")
    return out


# --------------------------------------------------------------------------------------------------------
# Spatial weights (Eq. 1)
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpatialWeights:
    """Eq. 1 weights ``raw`` (sparse [n, n], zero diagonal) and their ``transform`` (``row`` or ``none``)."""

    raw: sparse.csr_matrix
    transform: str = "row"

    @property
    def n(self) -> int:
        return int(self.raw.shape[0])

    def matrix(self, self_weight: float | None = None) -> sparse.csr_matrix:
        """The transformed matrix; with ``self_weight`` the diagonal is set to it before the transform."""
        w = self.raw.tocsr(copy=True)
        if self_weight is not None:
            w = (w + sparse.identity(self.n, format="csr") * float(self_weight)).tocsr()
        if self.transform == "row":
            sums = np.asarray(w.sum(axis=1)).ravel()
            if (sums == 0).any():
                raise ValueError(f"spatial weights: row standardisation needs every location to have a "
                                 f"neighbour, found {int((sums == 0).sum())} without (location "
                                 f"{int(np.flatnonzero(sums == 0)[0])}); widen the band or raise k")
            w = sparse.diags(1.0 / sums) @ w
        return sparse.csr_matrix(w)

    def neighbours(self, i: int) -> np.ndarray:
        row = self.raw.getrow(i)
        return row.indices[row.data != 0]


def _cartesian(coords: np.ndarray, geographic: bool) -> np.ndarray:
    if not geographic:
        return coords
    lon, lat = np.radians(coords[:, 0]), np.radians(coords[:, 1])
    return EARTH_RADIUS_KM * np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _distance(chord: np.ndarray, geographic: bool) -> np.ndarray:
    """Chord length in the KD-tree space -> the reported distance (great-circle km when geographic)."""
    if not geographic:
        return chord
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / (2 * EARTH_RADIUS_KM), 0.0, 1.0))


def spatial_weights(locations: LocationTable | np.ndarray, *, method: str = "knn", k: int = 4,
                    threshold: float | None = None, gamma: float = 0.0, transform: str = "row",
                    geographic: bool = False) -> SpatialWeights:
    """Eq. 1 weights between the locations (see the module docstring).

    Args:
        locations: a :class:`LocationTable` or an [n, 2] coordinate array (``geographic``: lon/lat degrees).
        method: ``knn`` (the ``k`` nearest others; a distance tie at the k-th place includes all tied) or
            ``distance_band`` (all others within ``threshold``, inclusive, in coordinate units or km).
        gamma: the inverse-distance power of Eq. 1 (0: binary).
        transform: ``row`` (row-standardised) or ``none``.
    """
    if isinstance(locations, LocationTable):
        coords, geographic = locations.coords, locations.geographic
    else:
        coords = np.asarray(locations, dtype=float)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"spatial weights: expected coordinates of shape [n, 2], found {list(coords.shape)}")
    n = coords.shape[0]
    if transform not in ("row", "none"):
        raise ValueError(f"spatial weights: transform must be 'row' or 'none', got {transform!r}")
    if gamma < 0:
        raise ValueError(f"spatial weights: gamma must be >= 0, got {gamma}")
    pts = _cartesian(coords, geographic)
    tree = cKDTree(pts)
    tol = 1e-9
    if method == "knn":
        if not 1 <= k <= n - 1:
            raise ValueError(f"spatial weights: k must be in [1, {n - 1}] for {n} locations, got {k}")
        dist, _ = tree.query(pts, k=k + 1)
        radius = dist[:, -1]  # the k-th neighbour's distance (index 0 is the point itself)
        pairs = [(i, j) for i in range(n) for j in tree.query_ball_point(pts[i], radius[i] * (1 + tol) + tol)
                 if j != i]
    elif method == "distance_band":
        if threshold is None or threshold <= 0:
            raise ValueError(f"spatial weights: distance_band needs threshold > 0, got {threshold}")
        band = threshold if not geographic else 2 * EARTH_RADIUS_KM * math.sin(
            min(threshold / (2 * EARTH_RADIUS_KM), math.pi / 2))
        pairs = [(i, j) for i, j in tree.query_pairs(band * (1 + tol) + tol, output_type="ndarray")]
        pairs += [(j, i) for i, j in pairs]
    else:
        raise ValueError(f"spatial weights: method must be 'knn' or 'distance_band', got {method!r}")
    if not pairs:
        return SpatialWeights(sparse.csr_matrix((n, n)), transform)
    rows, cols = np.array(pairs, dtype=int).T
    d = _distance(np.linalg.norm(pts[rows] - pts[cols], axis=1), geographic)
    if gamma > 0 and (d == 0).any():
        raise ValueError("spatial weights: two locations coincide (distance 0), so ||i - j||^-gamma is infinite; "
                         "use gamma=0 or remove duplicate locations")
    data = np.ones_like(d) if gamma == 0 else d ** (-gamma)
    return SpatialWeights(sparse.csr_matrix((data, (rows, cols)), shape=(n, n)), transform)


def _values(values, n: int, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.shape[0] != n:
        raise ValueError(f"{what}: expected {n} values (one per location), found {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: expected finite values, found {x[~np.isfinite(x)][0]}")
    if np.ptp(x) == 0:
        raise ValueError(f"{what}: the values are all equal ({x[0]}), so there is no variance to test")
    return x


def _p_two_sided(z):
    return 2.0 * norm.sf(np.abs(z))


# --------------------------------------------------------------------------------------------------------
# Global and local Moran's I, Getis-Ord Gi* (Eq. 2-7)
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalMoran:
    I: float
    expected: float
    variance: float
    z: float
    p: float
    assumption: str


def global_moran(values, weights: SpatialWeights, *, assumption: str = "randomisation") -> GlobalMoran:
    """Global Moran's I (Eq. 2-3) with its z-score and two-sided p-value under ``assumption``
    (``randomisation`` or ``normality``)."""
    if assumption not in ("randomisation", "normality"):
        raise ValueError(f"global Moran's I: assumption must be 'randomisation' or 'normality', got {assumption!r}")
    n = weights.n
    if n < 4:
        raise ValueError(f"global Moran's I: expected at least 4 locations for the variance, found {n}")
    x = _values(values, n, "global Moran's I")
    w = weights.matrix()
    z = x - x.mean()
    s0 = float(w.sum())
    if s0 == 0:
        raise ValueError("global Moran's I: the weights are all zero (no location has a neighbour)")
    i_value = n / s0 * float(z @ (w @ z)) / float(z @ z)
    sym = w + w.T
    s1 = 0.5 * float(sym.multiply(sym).sum())
    s2 = float(((np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()) ** 2).sum())
    e = -1.0 / (n - 1)
    if assumption == "normality":
        v = (n * n * s1 - n * s2 + 3 * s0 * s0) / ((n * n - 1) * s0 * s0) - e * e
    else:
        b2 = n * float((z ** 4).sum()) / float((z ** 2).sum()) ** 2
        num = n * ((n * n - 3 * n + 3) * s1 - n * s2 + 3 * s0 * s0) - b2 * ((n * n - n) * s1 - 2 * n * s2 + 6 * s0 * s0)
        v = num / ((n - 1) * (n - 2) * (n - 3) * s0 * s0) - e * e
    zs = (i_value - e) / math.sqrt(v)
    return GlobalMoran(i_value, e, v, zs, float(_p_two_sided(zs)), assumption)


@dataclass(frozen=True)
class LocalMoran:
    I: np.ndarray          # Eq. 4-5
    z: np.ndarray          # conditional-randomisation z-scores
    p: np.ndarray          # two-sided
    quadrant: np.ndarray   # 'HH', 'LL', 'HL', 'LH'


def local_moran(values, weights: SpatialWeights) -> LocalMoran:
    """Local Moran's I of Eq. 4-5 with conditional-randomisation z-scores (module docstring)."""
    n = weights.n
    if n < 3:
        raise ValueError(f"local Moran's I: expected at least 3 locations, found {n}")
    x = _values(values, n, "local Moran's I")
    w = weights.matrix()
    w = w - sparse.diags(w.diagonal())  # the sums of Eq. 4 exclude j = i
    z = x - x.mean()
    lag = w @ z
    s2_i = ((z * z).sum() - z * z) / (n - 1)  # Eq. 5
    local = z / s2_i * lag
    wi = np.asarray(w.sum(axis=1)).ravel()
    wi2 = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    m2 = (z * z).sum() / n
    expected = -wi * z / (n - 1)
    variance = n / (n - 2) * (m2 - z * z / (n - 1)) * (wi2 - wi * wi / (n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        zs = np.where((variance > 0) & (z != 0), np.sign(z) * (lag - expected) / np.sqrt(variance), 0.0)
    quadrant = np.where(z > 0, np.where(lag > 0, "HH", "HL"), np.where(lag > 0, "LH", "LL"))
    return LocalMoran(local, zs, _p_two_sided(zs), quadrant)


@dataclass(frozen=True)
class GiStar:
    G: np.ndarray   # Eq. 6, a z-score
    p: np.ndarray   # two-sided

    def spots(self, alpha: float = 0.05) -> np.ndarray:
        """``hot`` / ``cold`` where significant at ``alpha``, ``''`` elsewhere."""
        sig = self.p < alpha
        return np.where(sig & (self.G > 0), "hot", np.where(sig & (self.G < 0), "cold", ""))


def getis_ord_gi_star(values, weights: SpatialWeights, *, self_weight: float = 1.0) -> GiStar:
    """Getis-Ord Gi* of Eq. 6-7 (sums over all j including i; ``self_weight`` on the diagonal)."""
    n = weights.n
    x = _values(values, n, "Getis-Ord Gi*")
    if self_weight <= 0:
        raise ValueError(f"Getis-Ord Gi*: self_weight must be > 0 (Gi* includes the location itself), got {self_weight}")
    w = weights.matrix(self_weight)
    xbar = x.mean()
    s = math.sqrt((x * x).sum() / n - xbar * xbar)  # Eq. 7
    wi = np.asarray(w.sum(axis=1)).ravel()
    wi2 = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    den = s * np.sqrt((n * wi2 - wi * wi) / (n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(den > 0, (w @ x - xbar * wi) / den, 0.0)
    return GiStar(g, _p_two_sided(g))


def sampling_regions(lisa: LocalMoran, gi: GiStar, *, alpha: float = 0.05) -> np.ndarray:
    """Eq. 8 per location: ``hot``/``cold`` (``M+ ∩ G``: a significant HH or LL local-Moran cluster that is
    also a significant Gi* hot/cold spot, named by the spot), ``outlier`` (``M-``: a significant HL/LH) or
    ``''`` (not selected)."""
    sig = lisa.p < alpha
    cluster = sig & np.isin(lisa.quadrant, ("HH", "LL"))
    outlier = sig & np.isin(lisa.quadrant, ("HL", "LH"))
    spot = gi.spots(alpha)
    return np.where(cluster & (spot != ""), spot, np.where(outlier, "outlier", ""))


# --------------------------------------------------------------------------------------------------------
# Landscape shape index (Eq. 9)
# --------------------------------------------------------------------------------------------------------

def landscape_shape_index(raster, cls=None) -> float:
    """Eq. 9 on a 2-D class raster: over all pixels (``cls=None``, the rLSI of the raster) or over the
    pixels of class ``cls`` (cLSI); ``b_p`` counts the rook neighbours inside the raster of another class."""
    r = np.asarray(raster)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"landscape shape index: expected a non-empty 2-D class raster, found shape {list(r.shape)}")
    b = np.zeros(r.shape, dtype=float)
    b[1:, :] += r[1:, :] != r[:-1, :]
    b[:-1, :] += r[:-1, :] != r[1:, :]
    b[:, 1:] += r[:, 1:] != r[:, :-1]
    b[:, :-1] += r[:, :-1] != r[:, 1:]
    mask = np.ones(r.shape, dtype=bool) if cls is None else r == cls
    q = int(mask.sum())
    if q == 0:
        raise ValueError(f"landscape shape index: expected pixels of class {cls!r}, found none")
    return 0.25 * float(b[mask].sum()) / math.sqrt(q)


def table_lsi(classes: Sequence, weights: SpatialWeights, regions: Sequence) -> tuple[dict, dict, np.ndarray]:
    """Eq. 9 on a location table: ``b_p`` = neighbours of ``p`` (weights graph, same region) of another class.

    Returns ``(rLSI, cLSI, uLSI)``: ``{region: rLSI}``, ``{(region, class): cLSI}`` and per location
    ``uLSI_p = b_p / 4`` (one unit, ``q = 1``)."""
    classes = np.asarray(classes).astype(str)
    regions = np.asarray(regions).astype(str)
    n = weights.n
    if classes.shape[0] != n or regions.shape[0] != n:
        raise ValueError(f"landscape shape index: expected {n} classes and regions, found {classes.shape[0]} "
                         f"and {regions.shape[0]}")
    raw = weights.raw.tocoo()
    keep = (raw.data != 0) & (raw.row != raw.col) & (regions[raw.row] == regions[raw.col]) \
        & (classes[raw.row] != classes[raw.col])
    b = np.bincount(raw.row[keep], minlength=n).astype(float)
    r_lsi, c_lsi = {}, {}
    for reg in dict.fromkeys(regions.tolist()):
        in_reg = regions == reg
        r_lsi[reg] = 0.25 * float(b[in_reg].sum()) / math.sqrt(in_reg.sum())
        for c in dict.fromkeys(classes[in_reg].tolist()):
            cell = in_reg & (classes == c)
            c_lsi[(reg, c)] = 0.25 * float(b[cell].sum()) / math.sqrt(cell.sum())
    return r_lsi, c_lsi, b / 4.0


# --------------------------------------------------------------------------------------------------------
# Allocation (Eq. 10-11) and point selection (Eq. 12)
# --------------------------------------------------------------------------------------------------------

def largest_remainder(shares: Sequence[float], total: int) -> np.ndarray:
    """Integers summing to ``total`` proportional to ``shares`` (Hamilton: floors, then the largest
    remainders get one more; ties to the earlier entry)."""
    s = np.asarray(shares, dtype=float)
    if total < 0 or int(total) != total:
        raise ValueError(f"allocation: expected a non-negative integer budget, found {total}")
    if s.size == 0 or (s < 0).any() or not np.isfinite(s).all():
        raise ValueError(f"allocation: expected non-negative finite weights, found {s.tolist()}")
    if total == 0:
        return np.zeros(s.size, dtype=int)
    if s.sum() == 0:
        raise ValueError(f"allocation: the weights are all zero ({s.tolist()}), so a budget of {total} "
                         f"cannot be shared")
    exact = s / s.sum() * total
    out = np.floor(exact + 1e-9).astype(int)
    rest = int(total - out.sum())
    order = sorted(range(s.size), key=lambda i: (-(exact[i] - out[i]), i))
    out[order[:rest]] += 1
    return out


def _proportional(total: int, lsi: Mapping[Any, float], size: Mapping[Any, float], what: str, names: str) -> dict:
    """Integers summing to ``total``, proportional to ``lsi[k] * size[k]`` (largest remainder)."""
    if set(lsi) != set(size):
        raise ValueError(f"allocation: expected the same {what} in {names}, found {sorted(map(str, lsi))} "
                         f"and {sorted(map(str, size))}")
    keys = list(lsi)
    return dict(zip(keys, largest_remainder([lsi[k] * size[k] for k in keys], total).tolist()))


def allocate_regions(budget: int, r_lsi: Mapping[Any, float], area: Mapping[Any, float]) -> dict:
    """Eq. 10: ``N_i`` proportional to ``rLSI_i * A_i`` (integers summing to ``budget``)."""
    return _proportional(budget, r_lsi, area, "regions", "rLSI and area")


def allocate_classes(n_region: int, c_lsi: Mapping[Any, float], share: Mapping[Any, float]) -> dict:
    """Eq. 11: ``cN_{i,k}`` proportional to ``cLSI_{i,k} * W_{i,k}`` (integers summing to ``n_region``)."""
    return _proportional(n_region, c_lsi, share, "classes", "cLSI and shares")


def allocate_budget(budget: int, regions: Sequence, classes: Sequence, weights: SpatialWeights, *,
                    area: Sequence[float] | None = None, unit_area: float = 1.0) -> dict:
    """Eq. 9-11 on a table: ``{region: {"N": N_i, "rLSI": .., "area": .., "classes": {class: {"N": cN_ik,
    "cLSI": .., "share": W_ik}}}}`` with the counts summing to ``budget`` (regions ``''`` are skipped: not
    selected by Eq. 8)."""
    regions = np.asarray(regions).astype(str)
    classes = np.asarray(classes).astype(str)
    r_lsi, c_lsi, _ = table_lsi(classes, weights, regions)
    chosen = [r for r in r_lsi if r != ""]
    if not chosen:
        raise ValueError("allocation: expected at least one selected region, found none (no significant "
                         "hot/cold spot or outlier, and no region column)")
    if area is None:
        areas = {r: unit_area * float((regions == r).sum()) for r in chosen}
    else:
        a = np.asarray(area, dtype=float)
        if a.shape[0] != regions.shape[0] or (a < 0).any():
            raise ValueError(f"allocation: expected {regions.shape[0]} non-negative areas, found {a.tolist()[:5]}...")
        areas = {r: float(a[regions == r].sum()) for r in chosen}
    per_region = allocate_regions(budget, {r: r_lsi[r] for r in chosen}, areas)
    plan = {}
    for r in chosen:
        in_reg = regions == r
        cls_keys = list(dict.fromkeys(classes[in_reg].tolist()))
        shares = {c: float((classes[in_reg] == c).sum()) / float(in_reg.sum()) for c in cls_keys}
        lsis = {c: c_lsi[(r, c)] for c in cls_keys}
        counts = allocate_classes(per_region[r], lsis, shares) if per_region[r] else {c: 0 for c in cls_keys}
        plan[r] = {"N": per_region[r], "rLSI": r_lsi[r], "area": areas[r],
                   "classes": {c: {"N": counts[c], "cLSI": lsis[c], "share": shares[c]} for c in cls_keys}}
    return plan


def select_points(plan: Mapping, regions: Sequence, classes: Sequence, u_lsi: Sequence[float], *,
                  seed: int = 0) -> np.ndarray:
    """Eq. 12: for each region/class, rank its locations by ``uLSI`` (descending, stable), drop zeros, cut
    into ``cN`` equal parts and draw one location per part. Returns the selected row indices (sorted)."""
    regions = np.asarray(regions).astype(str)
    classes = np.asarray(classes).astype(str)
    u = np.asarray(u_lsi, dtype=float)
    rng = np.random.default_rng(seed)
    chosen = []
    for r, entry in plan.items():
        for c, info in entry["classes"].items():
            want = int(info["N"])
            if want == 0:
                continue
            rows = np.flatnonzero((regions == r) & (classes == c) & (u > 0))
            if rows.size < want:
                raise ValueError(f"point selection: region {r!r} class {c!r} is allocated {want} samples but has "
                                 f"only {rows.size} locations with uLSI > 0")
            ranked = rows[np.argsort(-u[rows], kind="stable")]
            chosen += [int(rng.choice(part)) for part in np.array_split(ranked, want)]
    return np.sort(np.array(chosen, dtype=int))


def plan_sampling(table: Any, budget: int, *, class_column: str = "class", value_column: str | None = None,
                  region_column: str | None = None, area_column: str | None = None, unit_area: float = 1.0,
                  method: str = "knn", k: int = 4, threshold: float | None = None, gamma: float = 0.0,
                  transform: str = "row", alpha: float = 0.05, self_weight: float = 1.0, seed: int = 0) -> dict:
    """The whole pipeline on a location table: weights, global/local Moran's I and Gi* of ``value_column``
    (if given), regions (``region_column``, else Eq. 8 on the value, else one region ``all``), Eq. 9-11
    allocation and Eq. 12 selection. Returns a dict with the statistics, the per-location columns, the plan
    and the selected rows."""
    loc = read_locations(table, class_column=class_column, value_column=value_column)
    w = spatial_weights(loc, method=method, k=k, threshold=threshold, gamma=gamma, transform=transform)
    out: dict[str, Any] = {"n": len(loc)}
    columns: dict[str, Any] = {}
    if loc.values is not None:
        gm = global_moran(loc.values, w)
        lm = local_moran(loc.values, w)
        gi = getis_ord_gi_star(loc.values, w, self_weight=self_weight)
        out["global_moran"] = {"I": gm.I, "expected": gm.expected, "variance": gm.variance, "z": gm.z, "p": gm.p,
                               "assumption": gm.assumption}
        columns.update(local_I=lm.I, local_z=lm.z, local_p=lm.p, quadrant=lm.quadrant, gi_star=gi.G, gi_p=gi.p,
                       spot=gi.spots(alpha))
        eq8 = sampling_regions(lm, gi, alpha=alpha)
        columns["eq8_region"] = eq8
    if region_column is not None:
        lower = {str(c).lower(): c for c in loc.frame.columns}
        if region_column.lower() not in lower:
            raise ValueError(f"location table: expected a region column {region_column!r}, found columns "
                             f"{[str(c) for c in loc.frame.columns]}")
        regions = loc.frame[lower[region_column.lower()]].astype(str).to_numpy()
    elif loc.values is not None:
        regions = columns["eq8_region"]
    else:
        regions = np.full(len(loc), "all")
    area = None
    if area_column is not None:
        lower = {str(c).lower(): c for c in loc.frame.columns}
        if area_column.lower() not in lower:
            raise ValueError(f"location table: expected an area column {area_column!r}, found columns "
                             f"{[str(c) for c in loc.frame.columns]}")
        area = _numeric(loc.frame[lower[area_column.lower()]], area_column)
    plan = allocate_budget(budget, regions, loc.classes, w, area=area, unit_area=unit_area)
    _, _, u = table_lsi(loc.classes, w, regions)
    columns.update(region=regions, uLSI=u)
    out.update(columns=columns, plan=plan, selected=select_points(plan, regions, loc.classes, u, seed=seed))
    return out
