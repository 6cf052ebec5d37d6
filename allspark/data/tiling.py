"""Cutting large tiles into patches and stitching per-patch predictions back, for dense (per-pixel) tasks.

A tile of ``H x W`` pixels is covered by square windows of ``patch`` pixels placed every ``stride`` pixels along
each axis; the last window of a row (column) is moved back to end exactly at the tile's border, so every pixel
is covered and no window reaches outside the tile (nothing is padded or resized). A tile smaller than the patch
cannot be covered this way and is refused by the readers.

Where windows overlap, each pixel is *owned* by one window: along an axis, the boundary between window ``i``
(offset ``o_i``) and window ``i + 1`` lies in the middle of their overlap, ``(o_i + patch + o_{i+1}) // 2``.
A pixel's prediction is taken from its owner only, so it comes from the window in which it sits farthest from
the window's border, and a model whose prediction at a pixel depends only on the pixels within ``m`` of it gives,
with ``patch - stride >= 2 m``, exactly what it gives on the whole tile at once (``tests/test_segmentation.py``).
The owned parts of a tile's windows partition the tile, so metrics over owned pixels count every pixel once.

``owned`` boxes are ``[r0, r1, c0, c1]`` in the window's own coordinates (rows ``r0 .. r1 - 1``, columns
``c0 .. c1 - 1``); windows are ``[y0, x0]`` tile coordinates of their top-left pixel.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["window_offsets", "owned_spans", "tile_windows", "stitch", "sliding_window"]


def window_offsets(length: int, patch: int, stride: int) -> list[int]:
    """Offsets of the windows along one axis: ``0, stride, 2 stride, ...`` and a last one at ``length - patch``."""
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got patch={patch}, stride={stride}")
    if stride > patch:
        raise ValueError(f"stride {stride} > patch {patch} would leave pixels between the windows uncovered")
    if length < patch:
        raise ValueError(f"a side of {length} pixels is smaller than the patch ({patch})")
    offsets = list(range(0, length - patch + 1, stride))
    if offsets[-1] != length - patch:
        offsets.append(length - patch)
    return offsets


def owned_spans(offsets: list[int], patch: int, length: int) -> list[tuple[int, int]]:
    """Per window, the ``[start, end)`` span (in the window's coordinates) of the pixels it owns."""
    bounds = [0] + [(a + patch + b) // 2 for a, b in zip(offsets[:-1], offsets[1:])] + [length]
    return [(lo - o, hi - o) for o, lo, hi in zip(offsets, bounds[:-1], bounds[1:])]


def tile_windows(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Every window of an ``height x width`` tile, row-major: ``(y0, x0, (r0, r1, c0, c1))`` with its owned box."""
    ys, xs = window_offsets(height, patch, stride), window_offsets(width, patch, stride)
    own_y, own_x = owned_spans(ys, patch, height), owned_spans(xs, patch, width)
    return [(y, x, (*oy, *ox)) for y, oy in zip(ys, own_y) for x, ox in zip(xs, own_x)]


def stitch(values: np.ndarray, tiles: np.ndarray, windows: np.ndarray, owned: np.ndarray,
           fill: int | float = -1) -> dict[int, np.ndarray]:
    """Per-window maps back into whole tiles. ``values`` [n, ..., p, p] (the trailing two axes are the window's
    pixels, e.g. a class map [n, p, p] or scores [n, K, p, p]); ``tiles`` [n] tile ids; ``windows`` [n, 2] offsets;
    ``owned`` [n, 4] owned boxes. Returns ``{tile id: [..., H, W]}`` with each pixel from its owning window (pixels
    no window owns, which a complete set of windows leaves none of, stay ``fill``). A tile's size is where its
    owned boxes end."""
    values, tiles = np.asarray(values), np.asarray(tiles).astype(np.int64)
    windows, owned = np.asarray(windows).astype(np.int64), np.asarray(owned).astype(np.int64)
    if not (len(values) == len(tiles) == len(windows) == len(owned)):
        raise ValueError(f"stitch: {len(values)} values, {len(tiles)} tile ids, {len(windows)} windows and "
                         f"{len(owned)} owned boxes; expected one each per window")
    out: dict[int, np.ndarray] = {}
    for t in np.unique(tiles):
        rows = np.flatnonzero(tiles == t)
        h = int((windows[rows, 0] + owned[rows, 1]).max())
        w = int((windows[rows, 1] + owned[rows, 3]).max())
        canvas = np.full(values.shape[1:-2] + (h, w), fill, dtype=values.dtype)
        for i in rows:
            y, x = windows[i]
            r0, r1, c0, c1 = owned[i]
            canvas[..., y + r0:y + r1, x + c0:x + c1] = values[i][..., r0:r1, c0:c1]
        out[int(t)] = canvas
    return out


def sliding_window(predict: Callable[[dict[str, torch.Tensor]], torch.Tensor], inputs: dict[str, torch.Tensor],
                   patch: int, stride: int, batch_size: int = 16) -> torch.Tensor:
    """Tiled inference over one whole tile: ``inputs`` {batch key: [C, H, W]} (one tile, every raster on the same
    grid) is cut into windows (:func:`tile_windows`), ``predict`` maps a batch {key: [b, C, p, p]} to per-pixel
    outputs [b, ..., p, p], and the owned parts are stitched into [..., H, W]."""
    sizes = {tuple(x.shape[-2:]) for x in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"sliding_window: the rasters of one tile must share a grid, got sizes {sorted(sizes)}")
    (h, w), = sizes
    windows = tile_windows(h, w, patch, stride)
    out: torch.Tensor | None = None

    def batches() -> Iterator[list[tuple[int, int, tuple[int, int, int, int]]]]:
        for s in range(0, len(windows), batch_size):
            yield windows[s:s + batch_size]

    for chunk in batches():
        batch = {k: torch.stack([x[:, y:y + patch, c:c + patch] for y, c, _ in chunk]) for k, x in inputs.items()}
        pred = predict(batch)
        if out is None:
            out = pred.new_zeros(pred.shape[1:-2] + (h, w))
        for (y, x, (r0, r1, c0, c1)), p in zip(chunk, pred):
            out[..., y + r0:y + r1, x + c0:x + c1] = p[..., r0:r1, c0:c1]
    return out
