"""WHU-OMVS: oblique aerial multi-view stereo (five-camera oblique rig; the data of Ada-MVS, Liu et al. 2023).

On-disk layout (the official release, as read by the public Ada-MVS code)::

    <root>/train/index.txt                        scene folder names, whitespace-separated (area 1 blocks)
    <root>/test/index.txt                         (area 2 blocks)
    <root>/<split>/<scene>/images/<name>.png      8-bit RGB image
    <root>/<split>/<scene>/cams/<name>.txt        camera file (below)
    <root>/<split>/<scene>/depths/<name>.exr      float32 depth of the view (metres along the viewing axis)
    <root>/<split>/<scene>/masks/<name>.png       8-bit mask; >= 128 marks valid ground truth
    <root>/<split>/<scene>/info/image_path.txt    first token N, then N triples "index name path"
                                                  (``name`` may contain a '/', e.g. "3/003_0012"; ``path``
                                                  is informative only and ignored)
    <root>/<split>/<scene>/info/viewpair.txt      first line N; then per reference view two lines:
                                                  "ref_index" and "k src1 score1 src2 score2 ..."
                                                  (sources ordered by score, best first)

Camera file (whitespace tokens; positions as the Ada-MVS loader reads them)::

    extrinsic Twc                 tokens[0:2]   a two-word header
    r11 r12 r13 tx                tokens[2:18]  4x4 camera-to-world matrix Twc, row-major, photogrammetric
    r21 r22 r23 ty                              camera axes (X right, Y up, the camera looks along -Z)
    r31 r32 r33 tz
    0 0 0 1
    fx 0 cx                       tokens[18:27] 3x3 intrinsic matrix K (pixels), row-major
    0 fy cy
    0 0 1
    dmin dmax dinterval           tokens[27:30] depth range of the view and the hypothesis interval

Tokens after the 30th are ignored. Conversion (Ada-MVS): ``R' = R_wc @ diag(1, -1, -1)`` gives the
computer-vision frame (X right, Y down, looking along +Z); ``Tcw = inv([R' | t_wc])``; the 4x4 projection
matrix ``P`` is ``Tcw`` with its top three rows replaced by ``K @ Tcw[:3, :4]``. A reference pixel (u, v) at
depth d is the world point ``inv(P_ref) @ [u d, v d, d, 1]``; depth is z in that CV camera frame.

Splits: ``test`` reads ``<root>/test``; ``train`` and ``val`` read ``<root>/train``, the last ``val_scenes``
scenes of ``train/index.txt`` forming ``val`` (when the train index lists a single scene, every 5th sample
of it -- positions 4, 9, 14, ... -- is ``val`` and the rest ``train``). A sample is one viewpair entry: the
reference view plus its first ``num_views - 1`` source views.

Items: ``views`` float32 [V, 3, H, W] (each image standardised per image and channel, as Ada-MVS's
``center_image``; reference first), ``proj`` float32 [V, 4, 4] (in pixels of the returned images),
``depth`` float32 [H, W] (reference ground truth; 0 where the mask is invalid, the depth is not finite or
outside [dmin, dmax]), ``depth_range`` float32 [2] = (dmin, dmax) of the reference camera, ``index``.
``downscale`` s: images are area-downsampled by s (PIL BOX), depth and mask take every s-th pixel and the
first two rows of K are divided by s.

Refused with ``DatasetFormatError`` naming the file: an index, image list, view-pair or camera file that is
missing, not UTF-8 or malformed (too few or non-numeric tokens, a singular matrix, ``dmax <= dmin``); a scene
name in ``index.txt`` or an image name in ``image_path.txt`` that leaves its folder (absolute, or climbing out
with ``..``); a scene listed twice; a listed scene, depth map or mask folder that is missing; a view of
``viewpair.txt`` not in ``image_path.txt`` and a reference with fewer than ``num_views - 1`` sources. Images,
depth maps and masks are decoded when an item is read; one that cannot be decoded or whose size differs
from its reference image raises naming the file.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset, path_inside, read_utf8_text
from allspark.data.image_folder import read_image
from allspark.registry import DATASETS

__all__ = ["WHUOMVS", "read_camera", "projection_matrix", "read_exr_depth", "write_camera"]

LAYOUT = ("expected layout: <root>/{train,test}/index.txt listing scene folders, each scene with images/<name>.png, "
          "cams/<name>.txt, depths/<name>.exr, masks/<name>.png and info/{image_path.txt,viewpair.txt} "
          "(WHU-OMVS as read by Ada-MVS)")
CAM_LAYOUT = ("expected camera file: 2 header tokens ('extrinsic Twc'), 16 numbers of the 4x4 camera-to-world "
              "matrix, 9 numbers of the 3x3 intrinsic matrix, then depth_min depth_max depth_interval")
FLIP = np.diag([1.0, -1.0, -1.0])


# -- file readers ---------------------------------------------------------------------------------------------
def read_camera(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(Twc [4, 4], K [3, 3], (dmin, dmax, dinterval)) of one camera file (float64)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"WHU-OMVS: camera file {path} is missing; {LAYOUT}")
    tokens = read_utf8_text(path, "WHU-OMVS").split()
    if len(tokens) < 30:
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: {len(tokens)} tokens, need 30; "
                                 f"{CAM_LAYOUT}")
    try:
        values = np.array([float(t) for t in tokens[2:30]], dtype=np.float64)
    except ValueError as exc:
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: non-numeric token ({exc}); "
                                 f"{CAM_LAYOUT}") from None
    if not np.all(np.isfinite(values)):
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: non-finite number; {CAM_LAYOUT}")
    twc = values[0:16].reshape(4, 4)
    k = values[16:25].reshape(3, 3)
    if abs(np.linalg.det(twc)) < 1e-9 or abs(np.linalg.det(twc[:3, :3])) < 1e-9:
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: the camera-to-world matrix is singular; "
                                 f"{CAM_LAYOUT}")
    if abs(np.linalg.det(k)) < 1e-12:
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: the intrinsic matrix is singular; "
                                 f"{CAM_LAYOUT}")
    dmin, dmax, dint = (float(v) for v in values[25:28])
    if not dmax > dmin:
        raise DatasetFormatError(f"WHU-OMVS: malformed camera file {path}: depth_max {dmax} <= depth_min {dmin}; "
                                 f"{CAM_LAYOUT}")
    return twc, k, (dmin, dmax, dint)


def projection_matrix(twc: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The 4x4 projection matrix of Ada-MVS from a photogrammetric camera-to-world matrix and K."""
    rt = np.eye(4)
    rt[:3, :3] = twc[:3, :3] @ FLIP
    rt[:3, 3] = twc[:3, 3]
    tcw = np.linalg.inv(rt)
    p = tcw.copy()
    p[:3, :4] = k @ tcw[:3, :4]
    return p


def read_exr_depth(path: Path) -> np.ndarray:
    import OpenEXR

    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"WHU-OMVS: depth map {path} is missing; {LAYOUT}")
    try:
        with OpenEXR.File(str(path)) as f:
            channels = f.channels()
            if len(channels) != 1:
                raise DatasetFormatError(f"WHU-OMVS: depth map {path} has channels {sorted(channels)}; "
                                         "expected a single depth channel")
            pixels = np.array(next(iter(channels.values())).pixels, dtype=np.float32)
    except DatasetFormatError:
        raise
    except Exception as exc:  # OpenEXR raises RuntimeError/OSError for unreadable files
        raise DatasetFormatError(f"WHU-OMVS: cannot read depth map {path}: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim != 2:
        raise DatasetFormatError(f"WHU-OMVS: depth map {path} has shape {pixels.shape}; expected [H, W]")
    return pixels


def _read_png(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetFormatError(f"WHU-OMVS: file {path} is missing; {LAYOUT}")
    return read_image(path, mode)


def _tokens(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DatasetFormatError(f"WHU-OMVS: {what} {path} is missing; {LAYOUT}")
    return read_utf8_text(path, "WHU-OMVS").split()


def read_image_paths(path: Path) -> dict[int, str]:
    """``info/image_path.txt`` -> {view index: name}. A name must be a relative path that stays inside the
    scene's ``images/`` (and so ``cams/``, ``depths/``, ``masks/``) folder: an absolute name or one climbing
    out with ``..`` is refused, naming the file and the entry."""
    tokens = _tokens(path, "image list")
    try:
        n = int(tokens[0])
        out = {int(tokens[1 + 3 * j]): tokens[2 + 3 * j] for j in range(n)}
    except (ValueError, IndexError):
        raise DatasetFormatError(f"WHU-OMVS: malformed {path}: expected a count N then N triples "
                                 "'index name path'") from None
    for index, name in out.items():
        path_inside(path.parent.parent / "images", name, f"WHU-OMVS: {path} (view {index})", "image name")
    return out


def read_viewpairs(path: Path) -> list[tuple[int, list[int]]]:
    tokens = _tokens(path, "view-pair file")
    pairs = []
    try:
        n, pos = int(tokens[0]), 1
        for _ in range(n):
            ref, k = int(tokens[pos]), int(tokens[pos + 1])
            srcs = [int(tokens[pos + 2 + 2 * j]) for j in range(k)]
            for j in range(k):  # the scores are not used, but must be numbers
                float(tokens[pos + 3 + 2 * j])
            pairs.append((ref, srcs))
            pos += 2 + 2 * k
    except (ValueError, IndexError):
        raise DatasetFormatError(f"WHU-OMVS: malformed {path}: expected N, then per reference 'ref_index' and "
                                 "'k src1 score1 src2 score2 ...'") from None
    return pairs


# -- reader ---------------------------------------------------------------------------------------------------
@DATASETS.register("whu_omvs")
class WHUOMVS(ModalityDataset):
    """Oblique multi-view stereo samples (reference + source views); see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, num_views: int = 5, downscale: int = 1, val_scenes: int = 1,
                 require_masks: bool = True) -> None:
        super().__init__(root, split)
        if int(num_views) < 2:
            raise ConfigError(f"WHU-OMVS: num_views must be >= 2, got {num_views}")
        if int(downscale) < 1:
            raise ConfigError(f"WHU-OMVS: downscale must be an integer >= 1, got {downscale}")
        self.num_views, self.downscale, self.require_masks = int(num_views), int(downscale), bool(require_masks)
        folder = self.root / ("test" if split == "test" else "train")
        if not folder.is_dir():
            raise DatasetFormatError(f"WHU-OMVS: split folder {folder} is missing; {LAYOUT}")
        index = folder / "index.txt"
        if not index.is_file():
            raise DatasetFormatError(f"WHU-OMVS: scene list {index} is missing; {LAYOUT}")
        scenes = read_utf8_text(index, "WHU-OMVS").split()
        for scene in scenes:
            path_inside(folder, scene, f"WHU-OMVS: {index}", "scene folder")
        if len(set(scenes)) != len(scenes):
            dup = sorted({sc for sc in scenes if scenes.count(sc) > 1})
            raise DatasetFormatError(f"WHU-OMVS: scene list {index} names scene(s) {dup} more than once; expected "
                                     "each scene once")
        if not scenes:
            raise DatasetFormatError(f"WHU-OMVS: scene list {index} names no scene; {LAYOUT}")
        every_fifth = False
        if split != "test":
            if len(scenes) == 1:
                every_fifth = True
            else:
                n_val = max(0, min(int(val_scenes), len(scenes) - 1))
                scenes = scenes[len(scenes) - n_val:] if split == "val" else scenes[:len(scenes) - n_val]
        self.scenes = scenes
        # sample: (scene folder, [view names], [P 4x4], (dmin, dmax))
        self.samples: list[tuple[Path, list[str], np.ndarray, tuple[float, float]]] = []
        for scene in scenes:
            self.samples += self._scan_scene(folder / scene)
        if every_fifth:
            keep = [j for j in range(len(self.samples)) if (j % 5 == 4) == (split == "val")]
            self.samples = [self.samples[j] for j in keep]
        self._size: tuple[int, int] | None = None

    def _scan_scene(self, scene: Path) -> list:
        if not scene.is_dir():
            raise DatasetFormatError(f"WHU-OMVS: scene folder {scene} (listed in index.txt) is missing; {LAYOUT}")
        names = read_image_paths(scene / "info" / "image_path.txt")
        pairs = read_viewpairs(scene / "info" / "viewpair.txt")
        if self.require_masks and not (scene / "masks").is_dir():
            raise DatasetFormatError(f"WHU-OMVS: masks folder {scene / 'masks'} is missing (pass require_masks=False "
                                     f"to treat every pixel as valid); {LAYOUT}")
        cams: dict[int, tuple] = {}
        no_cam: list[str] = []
        out = []
        for ref, srcs in pairs:
            if len(srcs) < self.num_views - 1:
                raise DatasetFormatError(f"WHU-OMVS: reference {ref} of {scene / 'info' / 'viewpair.txt'} has "
                                         f"{len(srcs)} source views; num_views={self.num_views} needs "
                                         f"{self.num_views - 1}")
            views = [ref] + srcs[:self.num_views - 1]
            for v in views:
                if v not in names:
                    raise DatasetFormatError(f"WHU-OMVS: view index {v} of {scene / 'info' / 'viewpair.txt'} is not "
                                             f"listed in {scene / 'info' / 'image_path.txt'}")
                if v not in cams:
                    cam_path = scene / "cams" / f"{names[v]}.txt"
                    if not cam_path.is_file():
                        no_cam.append(str(cam_path))
                        cams[v] = None
                        continue
                    twc, k, rng = read_camera(cam_path)
                    cams[v] = (twc, k, rng)
            if any(cams[v] is None for v in views):
                continue
            depth_path = scene / "depths" / f"{names[ref]}.exr"
            if not depth_path.is_file():
                raise DatasetFormatError(f"WHU-OMVS: depth map {depth_path} of reference view {names[ref]} is "
                                         f"missing; {LAYOUT}")
            out.append((scene, [names[v] for v in views], [cams[v] for v in views]))
        if no_cam:
            raise DatasetFormatError(f"WHU-OMVS: {len(no_cam)} views without camera parameters, e.g. {no_cam[:3]}; "
                                     f"{LAYOUT}")
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, names, cams = self.samples[i]
        s = self.downscale
        raw_size = None
        views, projs = [], []
        for name, (twc, k, _) in zip(names, cams):
            path = scene / "images" / f"{name}.png"
            img = _read_png(path, "RGB")
            if raw_size is None:
                raw_size = img.shape[:2]
            elif img.shape[:2] != raw_size:
                raise DatasetFormatError(f"WHU-OMVS: image {path} is {img.shape[0]} x {img.shape[1]}, but the "
                                         f"reference image {scene / 'images' / (names[0] + '.png')} of the same "
                                         f"sample is {raw_size[0]} x {raw_size[1]}")
            h, w = raw_size[0] // s, raw_size[1] // s
            if s > 1:
                from PIL import Image

                img = np.asarray(Image.fromarray(img[:h * s, :w * s]).resize((w, h), Image.BOX))
            x = img.astype(np.float32)
            x = (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-8)
            views.append(x.transpose(2, 0, 1))
            ks = k.copy()
            ks[:2] /= s
            projs.append(projection_matrix(twc, ks))
        depth_path = scene / "depths" / f"{names[0]}.exr"
        depth = read_exr_depth(depth_path)
        if depth.shape != raw_size:
            raise DatasetFormatError(f"WHU-OMVS: depth map {depth_path} is {depth.shape[0]} x {depth.shape[1]} but "
                                     f"its image is {raw_size[0]} x {raw_size[1]}")
        mask_path = scene / "masks" / f"{names[0]}.png"
        if self.require_masks or mask_path.is_file():
            mask = _read_png(mask_path, "L")
            if mask.shape != raw_size:
                raise DatasetFormatError(f"WHU-OMVS: mask {mask_path} is {mask.shape[0]} x {mask.shape[1]} but its "
                                         f"image is {raw_size[0]} x {raw_size[1]}")
            valid = mask >= 128
        else:
            valid = np.ones(raw_size, dtype=bool)
        dmin, dmax = cams[0][2][0], cams[0][2][1]
        with np.errstate(invalid="ignore"):
            valid = valid & np.isfinite(depth) & (depth >= dmin) & (depth <= dmax)
        depth = np.where(valid, depth, 0.0).astype(np.float32)
        depth = depth[::s, ::s][:h, :w]
        return {"views": torch.from_numpy(np.ascontiguousarray(np.stack(views))),
                "proj": torch.from_numpy(np.stack(projs).astype(np.float32)),
                "depth": torch.from_numpy(np.ascontiguousarray(depth)),
                "depth_range": torch.tensor([dmin, dmax], dtype=torch.float32),
                "index": torch.tensor(i, dtype=torch.int64)}

    def info(self) -> dict[str, Any]:
        if self._size is None:
            if not self.samples:
                raise DatasetFormatError(f"WHU-OMVS: split {self.split!r} of {self.root} has no sample")
            from PIL import Image

            scene, names, _ = self.samples[0]
            path = scene / "images" / f"{names[0]}.png"
            try:
                with Image.open(path) as img:
                    w, h = img.size
            except (OSError, ValueError) as exc:
                raise DatasetFormatError(f"WHU-OMVS: cannot decode image {path}: {exc}") from exc
            self._size = (h // self.downscale, w // self.downscale)
        return {"num_views": self.num_views, "image_size": list(self._size)}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        from torch.utils.data import default_collate

        shapes = {tuple(it["views"].shape) for it in items}
        if len(shapes) > 1:
            raise DatasetFormatError(f"WHU-OMVS: samples of one batch have different sizes {sorted(shapes)}; "
                                     "every image of the dataset must have the same size")
        return default_collate(items)

    # -- demo ------------------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, *, train_scenes: int = 4, test_scenes: int = 2,
                   targets: str = "plus", height: int = 48, width: int = 64, altitude: float = 45.0,
                   focal: float = 100.0, tilt_deg: float = 40.0, verbose: bool = False) -> dict[str, Any]:
        """Synthetic oblique aerial scenes rendered by ray marching a textured height field.

        Each scene: gentle hills (a few metres) plus box buildings (3-15 m, random footprints and orientations;
        two near every target node, 8-11 anywhere); the colour is a function of the 3-D hit point (random 3-D sinusoids, wavelengths
        3-10 m, plus trilinear value noise on a 2.5 m lattice and a height-dependent tint), so ground,
        roofs and walls are textured consistently across views. Camera stations lie on a grid of spacing
        ``altitude * tan(tilt)``; each station carries a nadir camera and four cameras tilted by ``tilt``
        (forward +y, backward -y, right +x, left -x), so a ground node is seen by the nadir camera above it
        and by the four oblique cameras of its grid neighbours. Every camera aimed at a target node
        (``targets='plus'``: 5 nodes, 25 views per scene; ``'single'``: 1 node, 5 views) is written and is
        the reference of one sample whose sources are the other four cameras aimed at the same node.
        Returns statistics (geometry, timing)."""
        t0 = time.time()
        root = Path(root)
        rng = np.random.default_rng(seed)
        stats: dict[str, Any] = {"altitude": altitude, "focal": focal, "tilt_deg": tilt_deg,
                                 "spacing": altitude * np.tan(np.radians(tilt_deg)), "image_size": [height, width]}
        for split, n in (("train", train_scenes), ("test", test_scenes)):
            names = [f"block_{split}_{j:02d}" for j in range(n)]
            for j, scene in enumerate(names):
                _write_scene(root / split / scene, np.random.default_rng(rng.integers(1 << 62)), targets, height,
                             width, altitude, focal, tilt_deg)
            (root / split).mkdir(parents=True, exist_ok=True)
            _atomic_text(root / split / "index.txt", "\n".join(names) + "\n")
        stats["seconds"] = time.time() - t0
        if verbose:
            print(stats)
        return stats


# -- demo rendering -------------------------------------------------------------------------------------------
DIRS = {1: None, 2: (0.0, 1.0), 3: (0.0, -1.0), 4: (1.0, 0.0), 5: (-1.0, 0.0)}  # camera -> horizontal look dir


def _write_scene(folder: Path, rng: np.random.Generator, targets: str, height: int, width: int, altitude: float,
                 focal: float, tilt_deg: float) -> None:
    d = altitude * np.tan(np.radians(tilt_deg))
    nodes = [(0, 0)] if targets == "single" else [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    half = 2 * d + 25.0
    field = _HeightField(rng, half, [(nx * d, ny * d) for nx, ny in nodes])
    tex = _Texture(rng, half)
    k = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1.0]])
    views = []  # (name, node, cam id, Twc)
    for node in nodes:
        nx, ny = node
        for cam in range(1, 6):
            look = DIRS[cam]
            sx, sy = (nx, ny) if look is None else (nx - look[0], ny - look[1])  # station of this viewer
            station = int((sx + 2) * 5 + (sy + 2))
            pos = np.array([sx * d, sy * d, altitude]) + rng.normal(0, [0.8, 0.8, 0.5])
            target = np.array([nx * d, ny * d, 0.0]) + rng.normal(0, [1.0, 1.0, 0.0])
            fwd = target - pos
            fwd /= np.linalg.norm(fwd)
            hint = np.array([0.0, 1.0, 0.0]) if look is None else np.array([0.0, 0.0, 1.0])
            xc = np.cross(fwd, hint)
            xc /= np.linalg.norm(xc)
            zc = -fwd
            yc = np.cross(zc, xc)
            twc = np.eye(4)
            twc[:3, :3] = np.stack([xc, yc, zc], axis=1)
            twc[:3, 3] = pos
            views.append((f"{cam}/{cam:03d}_{station:04d}", node, cam, twc))
    for sub in ("images", "cams", "depths", "masks", "info"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, _, _, twc in views:
        img, depth, valid = _render(field, tex, twc, k, height, width, rng)
        bound_lo, bound_hi = _depth_bounds(field, twc)
        dmin, dmax = max(1.0, bound_lo - 5.0), bound_hi + 5.0
        (folder / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        for sub in ("cams", "depths", "masks"):
            (folder / sub / name).parent.mkdir(parents=True, exist_ok=True)
        _atomic_png(folder / "images" / f"{name}.png", img)
        _atomic_png(folder / "masks" / f"{name}.png", np.where(valid, 255, 0).astype(np.uint8))
        _atomic_exr(folder / "depths" / f"{name}.exr", np.where(valid, depth, 0.0).astype(np.float32))
        _atomic_text(folder / "cams" / f"{name}.txt", write_camera(twc, k, dmin, dmax))
    lines = [str(len(views))] + [f"{j} {name} images/{name}.png" for j, (name, *_rest) in enumerate(views)]
    _atomic_text(folder / "info" / "image_path.txt", "\n".join(lines) + "\n")
    pair_lines = [str(len(views))]
    for j, (_, node, _, twc) in enumerate(views):
        fwd = -twc[:3, 2]
        others = [(i, float(fwd @ -v[3][:3, 2])) for i, v in enumerate(views) if v[1] == node and i != j]
        others.sort(key=lambda t: -t[1])  # most similar viewing direction first
        pair_lines += [str(j), f"{len(others)} " + " ".join(f"{i} {100 * (1 + s):.3f}" for i, s in others)]
    _atomic_text(folder / "info" / "viewpair.txt", "\n".join(pair_lines) + "\n")


def write_camera(twc: np.ndarray, k: np.ndarray, dmin: float, dmax: float, interval: float | None = None) -> str:
    """The text of a camera file (see the module docstring); interval defaults to (dmax - dmin) / 64."""
    interval = (dmax - dmin) / 64 if interval is None else interval
    rows = ["extrinsic Twc"] + [" ".join(f"{v:.9g}" for v in r) for r in twc]
    rows += [" ".join(f"{v:.9g}" for v in r) for r in k] + [f"{dmin:.6f} {dmax:.6f} {interval:.6f}"]
    return "\n".join(rows) + "\n"


class _HeightField:
    """z = h(x, y) on a 0.1 m grid over [-half, half]^2: hills plus (possibly rotated) box buildings."""

    res = 0.1

    def __init__(self, rng: np.random.Generator, half: float, centres=()) -> None:
        self.half = half
        n = int(np.ceil(2 * half / self.res)) + 1
        c = (np.arange(n) * self.res - half).astype(np.float32)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        h = np.zeros((n, n), np.float32)
        for _ in range(4):
            cx, cy = rng.uniform(-half, half, 2)
            s = rng.uniform(12, 30)
            h += rng.uniform(-3, 4) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        gx, gy = rng.normal(0, 0.01, 2)
        h += gx * xx + gy * yy
        inner = half - 20.0
        # two buildings near every target node (so every nadir view sees some relief), the rest anywhere
        near = [c for c in centres for _ in range(2)]
        for j in range(len(near) + int(rng.integers(8, 12))):
            if j < len(near):
                cx, cy = np.clip(np.asarray(near[j]) + rng.uniform(-12, 12, 2), -inner, inner)
            else:
                cx, cy = rng.uniform(-inner, inner, 2)
            a, b = rng.uniform(3, 8, 2)
            th = rng.uniform(0, np.pi / 2)
            # only the grid window around the building (its corners lie within hypot(a, b) of the centre; two cells
            # of margin) can be inside it: the same cells, values and result as over the whole grid, without
            # a dozen full-grid passes per building
            reach = float(np.hypot(a, b)) + 2 * self.res
            rows = slice(*np.searchsorted(c, [cy - reach, cy + reach]))
            cols = slice(*np.searchsorted(c, [cx - reach, cx + reach]))
            wx, wy = xx[rows, cols], yy[rows, cols]
            u = (wx - cx) * np.cos(th) + (wy - cy) * np.sin(th)
            v = -(wx - cx) * np.sin(th) + (wy - cy) * np.cos(th)
            inside = (np.abs(u) < a) & (np.abs(v) < b)
            base = h[int((cy + half) / self.res), int((cx + half) / self.res)]
            window = h[rows, cols]
            h[rows, cols] = np.where(inside, np.maximum(window, base + rng.uniform(3, 15)), window)
        self.h = h
        self.top, self.bottom = float(h.max()) + 0.05, float(h.min()) - 0.05

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(height, inside-bounds) at world (x, y), nearest grid cell."""
        n = self.h.shape[0]
        ix = np.rint((x + self.half) / self.res).astype(np.int64)
        iy = np.rint((y + self.half) / self.res).astype(np.int64)
        inside = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
        return self.h[np.clip(iy, 0, n - 1), np.clip(ix, 0, n - 1)], inside


class _Texture:
    """Colour as a function of the 3-D point: random sinusoids + trilinear value noise + height tint."""

    def __init__(self, rng: np.random.Generator, half: float) -> None:
        m = 14
        dirs = rng.normal(size=(m, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.k = dirs * (2 * np.pi / rng.uniform(3.0, 10.0, (m, 1)))
        self.phase = rng.uniform(0, 2 * np.pi, m)
        self.w = rng.normal(0, 1, (m, 3)) / np.sqrt(m)
        self.spacing, self.origin = 2.5, np.array([-half - 5, -half - 5, -10.0])
        dims = (np.array([2 * half + 10, 2 * half + 10, 40.0]) / self.spacing).astype(int) + 2
        self.lattice = rng.normal(0, 1, (*dims, 3)).astype(np.float32)
        self.base = rng.uniform(0.35, 0.65, 3)
        self.tint = rng.normal(0, 0.25, 3)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        val = np.sin(p @ self.k.T + self.phase) @ self.w
        q = (p - self.origin) / self.spacing
        i0 = np.clip(np.floor(q).astype(np.int64), 0, np.array(self.lattice.shape[:3]) - 2)
        f = np.clip(q - i0, 0, 1)
        noise = 0
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    wgt = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                           * (f[:, 2] if dz else 1 - f[:, 2]))
                    noise = noise + wgt[:, None] * self.lattice[i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz]
        val = val + 0.6 * noise
        colour = self.base + 0.22 * np.tanh(val) + self.tint * np.tanh(p[:, 2:3] / 10.0)
        return np.clip(colour, 0, 1)


def _rays(twc: np.ndarray, k: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (world) of the pixel grid and the CV viewing axis."""
    vv, uu = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)
    rcv = twc[:3, :3] @ FLIP
    dirs = (np.linalg.inv(k) @ pix.T).T @ rcv.T
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True), rcv[:, 2]


def _render(field: _HeightField, tex: _Texture, twc: np.ndarray, k: np.ndarray, height: int, width: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = twc[:3, 3]
    dirs, axis = _rays(twc, k, height, width)
    n = dirs.shape[0]
    dz = np.minimum(dirs[:, 2], -1e-3)
    t0 = (c[2] - field.top) / -dz
    t1 = (c[2] - field.bottom) / -dz
    step = 0.25
    steps = int(np.ceil((t1 - t0).max() / step)) + 1
    ts = t0[:, None] + step * np.arange(steps)[None, :]
    ts = np.minimum(ts, t1[:, None])
    px = c[0] + dirs[:, 0:1] * ts
    py = c[1] + dirs[:, 1:2] * ts
    pz = c[2] + dirs[:, 2:3] * ts
    h, inside = field(px, py)
    below = (pz <= h) & inside
    hit = below.any(axis=1) & (dirs[:, 2] < -1e-3)
    first = np.argmax(below, axis=1)
    # every sample before the hit must lie inside the scene bounds (the ray must not leave the scene)
    left = (~inside).astype(np.int64)
    left_before = (np.cumsum(left, axis=1)[np.arange(n), first] > 0)
    hit &= ~left_before
    lo = ts[np.arange(n), np.maximum(first - 1, 0)]
    hi = ts[np.arange(n), first]
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        p = c + dirs * mid[:, None]
        hm, _ = field(p[:, 0], p[:, 1])
        b = p[:, 2] <= hm
        hi = np.where(b, mid, hi)
        lo = np.where(b, lo, mid)
    p = c + dirs * hi[:, None]
    depth = (p - c) @ axis
    colour = tex(p)
    colour = np.where(hit[:, None], colour, 0.0)
    img = np.clip(colour * 255 + rng.normal(0, 1.0, colour.shape), 0, 255).round().astype(np.uint8)
    return img.reshape(height, width, 3), depth.reshape(height, width), hit.reshape(height, width)


def _depth_bounds(field: _HeightField, twc: np.ndarray) -> tuple[float, float]:
    """Depth range of the scene volume (the bounding box of the height field) in front of the camera -- a
    generous bound of every depth the view can see; computed from the corners of the visible ground area."""
    c = twc[:3, 3]
    axis = (twc[:3, :3] @ FLIP)[:, 2]
    best_lo, best_hi = np.inf, -np.inf
    # 4 m blocks of the field, each at its lowest and its highest point, within 25 degrees of the viewing axis
    # (the image's half-diagonal field of view is ~22 degrees)
    b = 40
    m = (field.h.shape[0] // b) * b
    blocks = field.h[:m, :m].reshape(m // b, b, m // b, b)
    coords = (np.arange(m // b) * b + b / 2) * field.res - field.half
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    for z in (blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))):
        pts = np.stack([xx.ravel(), yy.ravel(), z.ravel()], axis=1) - c
        dist = np.linalg.norm(pts, axis=1)
        dep = pts @ axis
        ok = dep > np.cos(np.radians(25)) * dist
        if ok.any():
            best_lo, best_hi = min(best_lo, dep[ok].min()), max(best_hi, dep[ok].max())
    return float(best_lo), float(best_hi)


def _atomic_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def _atomic_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    _atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _atomic_exr(path: Path, depth: np.ndarray) -> None:
    import OpenEXR

    def write(tmp: str) -> None:
        OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                     {"Y": np.ascontiguousarray(depth, dtype=np.float32)}).write(tmp)

    _atomic(path, write)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
