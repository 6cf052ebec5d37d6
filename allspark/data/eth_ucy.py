"""ETH-UCY pedestrian trajectories (eth, hotel, univ, zara1, zara2): 8 observed steps -> 12 future steps,
0.4 s per step (AllSpark, Section IV-B "Trajectory"; TUTR / Social-GAN protocol).

On-disk layout: the Social-GAN ``datasets/`` folder, which encodes leave-one-scene-out directly:
``<root>/<scene>/{train,val,test}/*.txt``, where ``<root>/eth/test`` holds the ETH recording and
``<root>/eth/{train,val}`` the recordings of the four other scenes. ``test_scene`` (default ``eth``, as in
the paper) picks the folder. Each file has one observation per line, ``frame ped_id x y`` separated by tabs
or spaces (metres; frames step by 10 at 2.5 fps, i.e. 0.4 s). Refused, naming the file and the line: text
that is not UTF-8, a line without 4 numeric fields, NaN or infinite values (see :func:`read_trajectory_file`);
naming the folder: a missing ``<scene>/<split>`` folder or one without ``*.txt`` files.

Samples (as Social-GAN): every window of ``obs_len + pred_len`` consecutive frames of a file; each
pedestrian present in all frames of the window is one sample. A window whose frames are not evenly
spaced by the file's frame step (a gap in the recording) is skipped rather than stitched. Coordinates are
made relative to the pedestrian's last observed position (translation invariance); neighbours (other
pedestrians present in the whole observed part of the window) are given in the same frame, nearest first.
Training windows can be randomly rotated about the origin (``augment_rotate``), as in TUTR.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.io import atomic_write_text
from allspark.registry import DATASETS

__all__ = ["ETHUCYTrajectories", "read_trajectory_file", "SCENES"]

SCENES = ("eth", "hotel", "univ", "zara1", "zara2")


def read_trajectory_file(path: Path) -> np.ndarray:
    """``frame ped_id x y`` lines -> float array [n, 4]; a malformed line is an error naming file and line.

    Accepted: tabs or spaces between the fields, blank lines, any number format Python's ``float`` reads.
    Refused with :class:`DatasetFormatError` naming the file and the line: a line that is not UTF-8 (or
    ASCII) text, a line without exactly 4 fields, a field that is not a number, NaN or infinity; and a file
    without any observation."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(f"ETH-UCY: {path}:{lineno}: expected UTF-8 text 'frame ped_id x y', found "
                                         f"byte 0x{raw[exc.start]:02x} that is not UTF-8") from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise DatasetFormatError(f"ETH-UCY: {path}:{lineno}: expected 4 fields 'frame ped_id x y', "
                                         f"got {len(parts)}: {line.strip()!r}")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise DatasetFormatError(f"ETH-UCY: {path}:{lineno}: expected numbers 'frame ped_id x y', "
                                         f"got {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in values):
                raise DatasetFormatError(f"ETH-UCY: {path}:{lineno}: expected finite numbers 'frame ped_id x y', "
                                         f"found a NaN or infinite value in {line.strip()!r}")
            rows.append(values)
    if not rows:
        raise DatasetFormatError(f"ETH-UCY: {path} holds no observations")
    return np.asarray(rows, dtype=np.float64)


def extract_windows(data: np.ndarray, obs_len: int, pred_len: int, max_neighbours: int, path: Path,
                    keys: list | None = None):
    """Social-GAN windows of one file -> (tracks [n, T, 2], neighbours [n, K, obs_len, 2], counts [n]).

    ``keys``: a list to which each sample's ``(last observed frame, pedestrian id)`` is appended, in sample order
    (``allspark predict`` names its rows with them; ``pred_len=0`` gives every observed window)."""
    frames = np.unique(data[:, 0])
    seq_len = obs_len + pred_len
    if len(frames) < 2:
        return [], [], []
    step = np.median(np.diff(frames))
    if step <= 0:
        raise DatasetFormatError(f"ETH-UCY: {path}: cannot infer the frame step")
    by_frame = {f: data[data[:, 0] == f] for f in frames}
    tracks, neigh, counts = [], [], []
    for start in range(len(frames) - seq_len + 1):
        window = frames[start:start + seq_len]
        if not np.allclose(np.diff(window), step):
            continue  # a gap in the recording: do not stitch across it
        positions: dict[float, np.ndarray] = {}
        for t, f in enumerate(window):
            for _, ped, x, y in by_frame[f]:
                positions.setdefault(ped, np.full((seq_len, 2), np.nan))[t] = (x, y)
        full = [p for p, xy in positions.items() if not np.isnan(xy).any()]
        observed = [p for p, xy in positions.items() if not np.isnan(xy[:obs_len]).any()]
        for p in full:
            track = positions[p]
            others = [positions[q][:obs_len] for q in observed if q != p]
            others.sort(key=lambda o: float(np.linalg.norm(o[-1] - track[obs_len - 1])))
            others = others[:max_neighbours]
            nb = np.zeros((max_neighbours, obs_len, 2))
            if others:
                nb[: len(others)] = np.stack(others)
            tracks.append(track)
            neigh.append(nb)
            counts.append(len(others))
            if keys is not None:
                keys.append((float(window[obs_len - 1]), float(p)))
    return tracks, neigh, counts


@DATASETS.register("eth_ucy")
class ETHUCYTrajectories(ModalityDataset):
    """Items: ``obs`` [8, 2], ``target`` [12, 2] (relative to the last observed position),
    ``neighbours`` [K, 8, 2] and ``neighbours_mask`` [K] (True = a real neighbour)."""

    demo_version = 1

    def __init__(self, root, split: str, test_scene: str = "eth", obs_len: int = 8, pred_len: int = 12,
                 max_neighbours: int = 8, augment_rotate: bool = True) -> None:
        super().__init__(root, split)
        folder = self.root / test_scene / split
        if not folder.is_dir():
            have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DatasetFormatError(
                f"ETH-UCY: {str(folder)!r} is missing; expected the Social-GAN layout "
                f"<root>/<scene>/{{train,val,test}}/*.txt with scene in {list(SCENES)} (found folders {have})"
            )
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise DatasetFormatError(f"ETH-UCY: no *.txt trajectory file in {folder}")
        self.obs_len, self.pred_len, self.max_neighbours = obs_len, pred_len, max_neighbours
        self.augment = augment_rotate and split == "train"
        tracks, neigh, counts = [], [], []
        for f in files:
            t, n, c = extract_windows(read_trajectory_file(f), obs_len, pred_len, max_neighbours, f)
            tracks += t
            neigh += n
            counts += c
        if not tracks:
            raise DatasetFormatError(f"ETH-UCY: no pedestrian is present for {obs_len + pred_len} consecutive "
                                     f"frames in {folder}")
        tracks = np.stack(tracks)
        origin = tracks[:, obs_len - 1: obs_len]
        self.tracks = torch.from_numpy((tracks - origin).astype(np.float32))
        self.neighbours = torch.from_numpy((np.stack(neigh) - origin[:, None]).astype(np.float32))
        counts = torch.tensor(counts)
        self.neighbours_mask = torch.arange(max_neighbours)[None, :] < counts[:, None]
        self.neighbours[~self.neighbours_mask] = 0.0
        self.files = [f.name for f in files]
        # Scale of the future offsets (per step), for the head's unscale; the mean is 0 by symmetry.
        future = self.tracks[:, obs_len:]
        self.step_std = future.square().mean(dim=(0, 2)).sqrt().clamp_min(1e-3)

    def __len__(self) -> int:
        return len(self.tracks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        track, nb = self.tracks[i], self.neighbours[i]
        if self.augment:
            theta = torch.rand(()) * 2 * math.pi
            c, s = torch.cos(theta), torch.sin(theta)
            rot = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
            track, nb = track @ rot.T, nb @ rot.T
        return {"obs": track[: self.obs_len], "target": track[self.obs_len:], "neighbours": nb,
                "neighbours_mask": self.neighbours_mask[i], "index": torch.tensor(i)}

    def info(self) -> dict[str, Any]:
        return {"obs_len": self.obs_len, "pred_len": self.pred_len, "max_neighbours": self.max_neighbours,
                "target_mean": 0.0, "target_std": self.step_std[:, None].tolist(), "files": self.files}

    @classmethod
    def write_demo(cls, root, seed: int = 0) -> None:
        """Five synthetic scenes in the Social-GAN layout (all five leave-one-out folders).

        Pedestrians walk on arcs (constant speed, constant turn rate, a slow speed change), so a constant-
        velocity extrapolation misses the curvature that the observed part reveals. Values are written
        ``frame\\tped\\tx\\ty`` with frames stepping by 10, like the real files.
        """
        root = Path(root)
        rng = np.random.default_rng(seed)
        names = {"eth": "biwi_eth", "hotel": "biwi_hotel", "univ": "students001", "zara1": "crowds_zara01",
                 "zara2": "crowds_zara02"}
        recordings = {}
        for k, scene in enumerate(SCENES):
            lines, ped = [], 0
            n_frames = 150 if scene == "eth" else 110
            for start in range(0, n_frames - 20, 2):
                for _ in range(2):
                    ped += 1
                    length = int(rng.integers(20, 28))
                    pos = rng.uniform(-6, 6, 2)
                    heading = rng.uniform(0, 2 * np.pi)
                    speed = rng.uniform(0.4, 0.7) * (1 + 0.1 * k)  # metres per 0.4 s step
                    turn = rng.choice([-1, 1]) * rng.uniform(0.06, 0.16)
                    accel = rng.uniform(-0.01, 0.01)
                    for t in range(length):
                        if start + t >= n_frames:
                            break
                        lines.append(f"{(start + t) * 10:.1f}\t{ped:.1f}\t{pos[0]:.2f}\t{pos[1]:.2f}")
                        heading += turn
                        speed = max(0.1, speed + accel)
                        pos = pos + speed * np.array([np.cos(heading), np.sin(heading)]) + rng.normal(0, 0.01, 2)
            lines.sort(key=lambda s: float(s.split("\t")[0]))
            recordings[scene] = lines
        for test_scene in SCENES:
            for scene in SCENES:
                lines = recordings[scene]
                if scene == test_scene:
                    atomic_write_text(root / test_scene / "test" / f"{names[scene]}.txt", "\n".join(lines) + "\n")
                    continue
                cut = int(len(lines) * 0.8)
                cut_frame = lines[cut].split("\t")[0]
                train = [l for l in lines if float(l.split("\t")[0]) < float(cut_frame)]
                val = [l for l in lines if float(l.split("\t")[0]) >= float(cut_frame)]
                atomic_write_text(root / test_scene / "train" / f"{names[scene]}_train.txt", "\n".join(train) + "\n")
                atomic_write_text(root / test_scene / "val" / f"{names[scene]}_val.txt", "\n".join(val) + "\n")
