"""UCF101 action videos (AllSpark IV-B, "Video"), read from the official release layout.

Layout under ``root``::

    UCF-101/<Class>/v_<Class>_gXX_cYY.avi
    ucfTrainTestlist/classInd.txt         "<1-based index> <Class>" per line
    ucfTrainTestlist/trainlist0K.txt      "<Class>/v_<Class>_gXX_cYY.avi <1-based label>" per line
    ucfTrainTestlist/testlist0K.txt       "<Class>/v_<Class>_gXX_cYY.avi" per line (no label)

``split_id`` (1, 2 or 3) picks the official train/test list pair; 1 is the default, as in most papers.

**Validation.** UCF101 has none. Clips of one group ``gXX`` are cut from the same long video, so a
validation set that shared groups with training would be optimistic. ``val`` therefore holds out whole
groups: of the groups that occur in the training list (sorted by number), the last
``ceil(val_ratio * n_groups)`` go to ``val`` and the rest stay in ``train``. The choice depends only on the
list file, so it is the same on every machine and every run.

**Clip sampling.** A clip is ``num_frames`` frames ``frame_stride`` apart, decoded with PyAV. When a
video is too short for that span the stride shrinks to the largest that fits (a 29-frame UCF video still
gives 16 frames); a video with fewer than ``num_frames`` frames is an error. Training clips start at a
uniformly random frame; validation and test clips are centred in the video (deterministic). Frames are
resized to ``image_size`` x ``image_size`` (UCF's 320 x 240 is squeezed, not cropped, so an action at
the frame's edge is kept), scaled to [0, 1] and normalised with the Kinetics mean/std. There is no
horizontal flip: direction of motion can be what tells classes apart.

**Refused** (``DatasetFormatError``, naming the list file and line): a list file that is missing or not
UTF-8; a ``classInd.txt`` line that is not ``<index> <Class>`` or indices that are not 1..K; a list entry
with more than two fields, a label that is not an integer or disagrees with ``classInd.txt``, a class folder
not in ``classInd.txt``, a name that is not ``v_<Class>_gXX_cYY.avi``, and a path that leaves ``UCF-101/``
(absolute, or climbing out with ``..``). Listed videos missing on disk are refused when the reader is
built; a video that cannot be decoded, or is shorter than a clip, raises naming the file when its item is
read (decoding every video up front would take minutes on the full set).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset, path_inside, read_utf8_text
from allspark.registry import DATASETS

__all__ = ["UCF101", "read_clip", "clip_indices"]

VIDEO_DIR = "UCF-101"
LIST_DIR = "ucfTrainTestlist"
GROUP_RE = re.compile(r"_g(\d+)_c(\d+)\.avi$", re.IGNORECASE)
LAYOUT = (
    "expected layout: <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and <root>/ucfTrainTestlist/ with "
    "classInd.txt, trainlist0K.txt, testlist0K.txt"
)


def clip_indices(num_available: int, num_frames: int, frame_stride: int, start: int | None) -> list[int]:
    """Frame indices of one clip. ``start=None`` centres the clip; the stride shrinks to fit short videos."""
    if num_available < num_frames:
        raise ValueError(f"{num_available} frames < the {num_frames} frames of a clip")
    stride = frame_stride if num_frames == 1 else max(1, min(frame_stride, (num_available - 1) // (num_frames - 1)))
    span = (num_frames - 1) * stride + 1
    last_start = num_available - span
    first = last_start // 2 if start is None else min(max(start, 0), last_start)
    return [first + i * stride for i in range(num_frames)]


def read_clip(path: Path, num_frames: int, frame_stride: int, image_size: int,
              rng: torch.Generator | None = None) -> np.ndarray:
    """Decode ``path`` and return one clip as uint8 ``[T, H, W, 3]``; a random start when ``rng`` is
    given, the centred clip otherwise. Raises ``DatasetFormatError`` naming the file when it cannot be
    decoded, has no video stream, or is shorter than the clip."""
    import av

    errors = (getattr(av, "FFmpegError", OSError), OSError, ValueError, EOFError)
    if not path.is_file():
        raise DatasetFormatError(f"UCF101: video {path} is missing; {LAYOUT}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetFormatError(f"UCF101: {path} has no video stream")
            frames = list(container.decode(video=0))
    except DatasetFormatError:
        raise
    except errors as exc:
        raise DatasetFormatError(f"UCF101: cannot decode video {path}: {exc}") from None
    if len(frames) < num_frames:
        raise DatasetFormatError(f"UCF101: video {path} has {len(frames)} decodable frame(s); a clip needs "
                                 f"{num_frames} (data.args.num_frames)")
    start = None
    if rng is not None:
        stride = clip_indices(len(frames), num_frames, frame_stride, 0)
        span = stride[-1] - stride[0] + 1
        start = int(torch.randint(len(frames) - span + 1, (), generator=rng))
    picked = clip_indices(len(frames), num_frames, frame_stride, start)
    # one reformatter for the clip: it keeps its swscale context between frames of the same size and format
    # (VideoFrame.reformat builds a new one for every frame, about ten times the cost of the conversion itself)
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    try:
        return np.stack([reformatter.reformat(frames[i], width=image_size, height=image_size,
                                              format="rgb24").to_ndarray() for i in picked])
    except errors as exc:
        raise DatasetFormatError(f"UCF101: cannot convert frames of {path}: {exc}") from None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a list file."""
    if not path.is_file():
        raise DatasetFormatError(f"UCF101: {path} is missing; {LAYOUT}")
    lines = read_utf8_text(path, "UCF101").splitlines()
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]


@DATASETS.register("ucf101")
class UCF101(ModalityDataset):
    """Items: ``video`` float32 ``[3, num_frames, image_size, image_size]``, ``label``, ``index``."""

    demo_version: ClassVar[int] = 2

    def __init__(
        self,
        root: str | Path,
        split: str,
        split_id: int = 1,
        num_frames: int = 32,
        frame_stride: int = 2,
        image_size: int = 224,
        val_ratio: float = 0.1,
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
    ) -> None:
        super().__init__(root, split)
        if split_id not in (1, 2, 3):
            raise ConfigError(f"UCF101: split_id must be 1, 2 or 3, got {split_id}")
        if num_frames < 1 or frame_stride < 1 or image_size < 1:
            raise ConfigError("UCF101: num_frames, frame_stride and image_size must be positive")
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"UCF101: val_ratio must be in [0, 1), got {val_ratio}")
        self.num_frames, self.frame_stride, self.image_size = num_frames, frame_stride, image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        lists = self.root / LIST_DIR
        self.class_names, label_of = self._read_class_index(lists / "classInd.txt")
        list_file = lists / f"{'test' if split == 'test' else 'train'}list0{split_id}.txt"
        samples = self._read_list(list_file, label_of)
        missing = [str(p) for p, _ in samples if not p.is_file()]
        if missing:
            raise DatasetFormatError(f"UCF101: {len(missing)} video(s) listed in {list_file} are missing on disk, "
                                     f"e.g. {missing[:3]}; {LAYOUT}")
        if split != "test":
            samples = self._hold_out_groups(samples, split, val_ratio)
        if not samples:
            raise DatasetFormatError(f"UCF101: the {split} split of {self.root} is empty")
        self.samples = samples

    @staticmethod
    def _read_class_index(path: Path) -> tuple[list[str], dict[str, int]]:
        entries = []
        for n, line in _read_lines(path):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise DatasetFormatError(f"UCF101: {path} line {n}: expected '<index> <Class>', got {line!r}")
            entries.append((int(parts[0]), parts[1]))
        entries.sort()
        if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
            raise DatasetFormatError(f"UCF101: {path} must number its classes 1..{len(entries)} without gaps")
        names = [name for _, name in entries]
        return names, {name: i for i, name in enumerate(names)}

    def _read_list(self, path: Path, label_of: dict[str, int]) -> list[tuple[Path, int]]:
        samples = []
        for n, line in _read_lines(path):
            parts = line.split()
            if len(parts) > 2:
                raise DatasetFormatError(f"UCF101: {path} line {n}: expected '<Class>/<video>.avi [label]', found "
                                         f"{len(parts)} fields: {line!r}")
            rel = parts[0]
            video = path_inside(self.root / VIDEO_DIR, rel, f"UCF101: {path} line {n}", "video")
            cls = rel.split("/")[0]
            if cls not in label_of:
                raise DatasetFormatError(f"UCF101: {path} line {n}: class folder {cls!r} is not in classInd.txt")
            label = label_of[cls]
            if len(parts) > 1:
                if not parts[1].isdigit():
                    raise DatasetFormatError(f"UCF101: {path} line {n}: expected an integer label (1-based, as in "
                                             f"classInd.txt) after the video, found {parts[1]!r}")
                if int(parts[1]) - 1 != label:
                    raise DatasetFormatError(f"UCF101: {path} line {n}: label {parts[1]} disagrees with "
                                             f"classInd.txt ({cls} is {label + 1})")
            if not GROUP_RE.search(rel):
                raise DatasetFormatError(f"UCF101: {path} line {n}: {rel!r} is not named v_<Class>_gXX_cYY.avi")
            samples.append((video, label))
        return samples

    @staticmethod
    def _hold_out_groups(samples, split, val_ratio):
        groups = sorted({int(GROUP_RE.search(p.name).group(1)) for p, _ in samples})
        n_val = math.ceil(val_ratio * len(groups)) if len(groups) > 1 else 0
        val_groups = set(groups[len(groups) - n_val:]) if n_val else set()
        in_val = lambda p: int(GROUP_RE.search(p.name).group(1)) in val_groups  # noqa: E731
        return [s for s in samples if in_val(s[0]) == (split == "val")]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        # Training draws the clip start from torch's generator (seeded by the run); eval clips are centred.
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()))) if self.split == "train" else None
        clip = read_clip(path, self.num_frames, self.frame_stride, self.image_size, rng)
        video = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255)  # [3, T, H, W]
        video = (video - self.mean) / self.std
        return {"video": video, "label": torch.tensor(label), "index": torch.tensor(index)}

    def info(self) -> dict[str, Any]:
        return {
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "num_frames": self.num_frames,
            "image_size": self.image_size,
            "channels": 3,
        }

    # -- demo ----------------------------------------------------------------------------------------
    DEMO_CLASSES: ClassVar[tuple[str, ...]] = ("SlideLeft", "SlideRight", "SlideDown", "Spin")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, *, groups: int = 25, clips_per_group: int = 3,
                   test_groups: int = 3, frames: int = 24, size: int = 32) -> None:
        """Tiny AVI clips (MPEG-4 part 2) of a bar on a noisy background, in the official layout.

        The classes differ only in motion: the bar slides left, right or down (wrapping around the frame
        edges, so its position in any single frame is uniform for every class) or spins in place. Bar
        (bright) and background (dark) levels and tints, bar size and orientation, speed and start position
        are random per clip and drawn the same way for every class, so neither colour nor one frame tells
        the class. Groups ``g01..g{test_groups}`` form the test list,
        the rest the training list (as the official split 1 tests groups 1-7).
        """
        root = Path(root)
        rng = np.random.default_rng(seed)
        lists = root / LIST_DIR
        lists.mkdir(parents=True, exist_ok=True)
        _atomic_text(lists / "classInd.txt", "".join(f"{i + 1} {c}\n" for i, c in enumerate(cls.DEMO_CLASSES)))
        train_lines, test_lines = [], []
        for label, name in enumerate(cls.DEMO_CLASSES):
            for g in range(1, groups + 1):
                for c in range(1, clips_per_group + 1):
                    rel = f"{name}/v_{name}_g{g:02d}_c{c:02d}.avi"
                    _write_avi(root / VIDEO_DIR / rel, _render_motion(rng, name, frames, size))
                    if g <= test_groups:
                        test_lines.append(rel)
                    else:
                        train_lines.append(f"{rel} {label + 1}")
        _atomic_text(lists / "trainlist01.txt", "\n".join(train_lines) + "\n")
        _atomic_text(lists / "testlist01.txt", "\n".join(test_lines) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """Encode uint8 ``[T, H, W, 3]`` as MPEG-4 in an AVI container, atomically."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with av.open(str(tmp), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "3"}  # near-lossless at this size; the files stay a few KB
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _render_motion(rng: np.random.Generator, name: str, frames: int, size: int) -> np.ndarray:
    """One demo clip: a bar moving as the class ``name`` says, on a random noisy background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # A bright, slightly tinted bar on a dark, slightly tinted background: the brightness levels vary per
    # clip, the polarity does not (with fully random colours the 8-frame demo did not train above chance
    # in a few minutes: the encoder had to learn colour invariance from ~100 clips first).
    background = rng.uniform(10, 70) + rng.uniform(-10, 10, 3)
    colour = rng.uniform(190, 250) + rng.uniform(-5, 5, 3)
    half_len, half_wid = rng.uniform(0.18, 0.28) * size, rng.uniform(0.05, 0.09) * size
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0, size, 2)  # (x, y)
    speed = rng.uniform(0.05, 0.09) * size  # pixels per frame
    spin = rng.choice([-1, 1]) * rng.uniform(np.pi / 14, np.pi / 8)  # radians per frame
    velocity = {"SlideLeft": (-speed, 0.0), "SlideRight": (speed, 0.0), "SlideDown": (0.0, speed)}.get(name, (0, 0))
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        cx, cy = centre[0] + velocity[0] * t, centre[1] + velocity[1] * t
        theta = angle + (spin * t if name == "Spin" else 0.0)
        dx = (xx - cx + size / 2) % size - size / 2  # wrap around the edges
        dy = (yy - cy + size / 2) % size - size / 2
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        # soft edges (1 px) so sub-pixel motion is visible
        inside = np.clip(half_len + 0.5 - np.abs(u), 0, 1) * np.clip(half_wid + 0.5 - np.abs(v), 0, 1)
        img = background + inside[..., None] * (colour - background)
        img = img + rng.normal(0, 8, img.shape)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out
