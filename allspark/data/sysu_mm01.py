"""SYSU-MM01 visible-infrared person re-identification (AllSpark Section III-C "Infrared", IV-B).

On-disk layout (the official release)::

    <root>/cam1/<id>/<n>.jpg ... <root>/cam6/<id>/<n>.jpg   visible: cam1, cam2, cam4, cam5; near-infrared: cam3,
                                                           cam6; ``<id>`` is a 4-digit identity folder
    <root>/exp/train_id.txt, val_id.txt, test_id.txt       comma-separated identity numbers

Splits: ``train`` = the images of ``train_id`` (``include_val_ids: true`` adds ``val_id``, the usual
training recipe), ``val`` = the images of ``val_id`` (for model selection with the same retrieval
protocol), ``test`` = the images of ``test_id``. A camera folder without a given identity is normal (not
every person passed every camera); an identity of a split list with no image at all is an error.

Items: ``image`` float32 [3, H, W] (infrared JPEGs are decoded as RGB, as the reference code does; resized
to ``image_size`` = (H, W), normalised with ImageNet statistics), ``modality`` (0 visible, 1 infrared),
``label`` (training identities numbered 0..K-1 in the ``train`` split, -1 elsewhere), ``pid`` (the
identity number), ``cam`` (1..6), ``index``. Training images get a random horizontal flip.

Pairing (``pairing``, default ``paired``): the AllSpark paper's infrared input is a visible and a near-infrared
image of one person read together, ``m = {I_r, I_i}``, ``f(m) = Enc(I_r) (+) Enc(I_i)`` (Section III-C; DDAG, whose
design it inherits, also trains on such pairs). With ``paired`` the *training loader* draws pairs: its sampler
(:class:`PairSampler`) yields ``(visible index, infrared index)`` tuples of one identity, and ``dataset[(v, r)]``
is a paired item: ``image`` (the visible image, cams 1, 2, 4, 5), ``image_ir`` (the infrared one, cams 3, 6),
``modality`` 0 (the modality of ``image``), ``label``, ``pid``, ``cam`` / ``cam_ir`` and ``index`` /
``index_ir``. Each epoch every training image appears in at least one pair (an identity with v visible and r
infrared images gives max(v, r) pairs; the shorter side is drawn again at random). The two-stream encoder runs each
image through its own stream and concatenates the two token sets before the bridge (``encoders/dual_resnet.py``).
``single``: one image per training sample (either modality), as before; with ``images_per_identity`` K the
batches are DDAG's identity batches of single images (for the cross-modal InfoNCE term of the re-id head).

How paired training meets the evaluation protocol: the SYSU-MM01 all-search protocol ranks single images
(infrared queries against a visible gallery), so every *indexed* item (``dataset[i]``, an int) is one image, in
every split and either pairing: the ``val`` / ``test`` loaders, ``evaluate.py`` (also on the ``train`` split), the
baselines and the data-dependent initialisation read single images, and each image goes through the stream of its
own modality. Only the training loader of ``paired`` asks for pairs. The encoder's ``stream_dropout`` (0.67 in
the infrared config) shows a share of the training pairs with one stream's tokens masked, so single-stream
inputs -- what evaluation feeds -- are trained on too. ``data.batch_size`` counts pairs in the paired form.

Refused with ``DatasetFormatError``: a missing camera folder (named), a split list that is missing, not
UTF-8, empty or holds a token that is not a non-negative integer (file, line and token named), an
identity of the list without any image, and (``paired``) a training split where no identity has both a visible
and an infrared image. An image that cannot be decoded raises naming the file when its item is read. With
``ConfigError``: a ``pairing`` other than ``single`` / ``paired``, and ``images_per_identity`` with ``paired``
(identity batches of single images are the ``single`` form's).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset, read_utf8_text
from allspark.data.image_folder import IMAGE_EXTENSIONS, read_image, resize_uint8
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["SYSUMM01", "VISIBLE_CAMS", "INFRARED_CAMS", "PAIRINGS", "PairSampler", "IdentitySampler"]

VISIBLE_CAMS = (1, 2, 4, 5)
INFRARED_CAMS = (3, 6)
#: ``data.args.pairing``: one image per training sample, or a visible and an infrared image of one identity
PAIRINGS = ("single", "paired")
SPLIT_FILES = {"train": "train_id.txt", "val": "val_id.txt", "test": "test_id.txt"}
LAYOUT = ("expected layout: <root>/cam1..cam6/<4-digit id>/<image>.jpg (cam3 and cam6 infrared) and "
          "<root>/exp/{train_id,val_id,test_id}.txt with comma-separated identity numbers")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class IdentitySampler(torch.utils.data.Sampler):
    """Indices in chunks of ``batch_size``: ``batch_size // per_identity`` identities per chunk (shuffled, each
    identity once per pass while enough remain), each with ``per_identity / 2`` visible and as many infrared
    images (drawn without replacement while the identity has enough, else with replacement). One epoch
    yields about ``len(dataset)`` indices (whole chunks); the order depends only on (seed, epoch)."""

    def __init__(self, pids: list[int], modality: list[int], batch_size: int, per_identity: int, seed: int) -> None:
        if batch_size % per_identity:
            raise ConfigError(f"identity sampler: batch_size {batch_size} is not a multiple of images_per_identity "
                              f"{per_identity}")
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []
        pid_arr, mod_arr = np.asarray(pids), np.asarray(modality)
        for pid in sorted(set(pids)):
            vis = np.flatnonzero((pid_arr == pid) & (mod_arr == 0))
            ir = np.flatnonzero((pid_arr == pid) & (mod_arr == 1))
            if len(vis) and len(ir):  # identities seen by one modality only cannot form cross-modal pairs
                self.groups.append((vis, ir))
        self.ids_per_batch = batch_size // per_identity
        if len(self.groups) < self.ids_per_batch:
            raise ConfigError(f"identity sampler: {len(self.groups)} identities have both visible and infrared "
                              f"images; a batch needs {self.ids_per_batch}")
        self.half = per_identity // 2
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.length = max(1, len(pids) // batch_size) * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        out: list[int] = []
        order: list[int] = []
        while len(out) < self.length:
            if len(order) < self.ids_per_batch:
                order += rng.permutation(len(self.groups)).tolist()
            chosen, order = order[:self.ids_per_batch], order[self.ids_per_batch:]
            for g in chosen:
                for pool in self.groups[g]:
                    out += rng.choice(pool, self.half, replace=len(pool) < self.half).tolist()
        return iter(out[:self.length])


class PairSampler(torch.utils.data.Sampler):
    """Training pairs ``(visible index, infrared index)`` of one identity, shuffled; the order depends only on
    (seed, epoch).

    Per identity with ``v`` visible and ``r`` infrared images, ``max(v, r)`` pairs an epoch: the longer side in a
    random order, each image once, the shorter side as a random permutation followed by random draws (so every
    image of both modalities is in at least one pair of every epoch). Identities seen by one modality only cannot
    form a pair and are left out (their number is ``skipped``)."""

    def __init__(self, pids: list[int], modality: list[int], seed: int) -> None:
        pid_arr, mod_arr = np.asarray(pids), np.asarray(modality)
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []
        self.skipped = 0
        for pid in sorted(set(pids)):
            vis = np.flatnonzero((pid_arr == pid) & (mod_arr == 0))
            ir = np.flatnonzero((pid_arr == pid) & (mod_arr == 1))
            if len(vis) and len(ir):
                self.groups.append((vis, ir))
            else:
                self.skipped += 1
        self.length = sum(max(len(v), len(r)) for v, r in self.groups)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        pairs: list[tuple[int, int]] = []
        for vis, ir in self.groups:
            n = max(len(vis), len(ir))
            sides = []
            for pool in (vis, ir):
                order = rng.permutation(pool)
                if len(order) < n:
                    order = np.concatenate([order, rng.choice(pool, n - len(order))])
                sides.append(order)
            pairs += [(int(a), int(b)) for a, b in zip(*sides)]
        return iter([pairs[i] for i in rng.permutation(len(pairs))])


def read_id_list(path: Path) -> list[int]:
    if not path.is_file():
        raise DatasetFormatError(f"SYSU-MM01: split file {path} is missing; {LAYOUT}")
    ids = []
    for n, line in enumerate(read_utf8_text(path, "SYSU-MM01").splitlines(), 1):
        for token in (t.strip() for t in line.split(",")):
            if not token:
                continue
            if not token.isdigit():
                raise DatasetFormatError(f"SYSU-MM01: {path}, line {n}: expected comma-separated identity numbers, "
                                         f"found {token!r}")
            ids.append(int(token))
    if not ids:
        raise DatasetFormatError(f"SYSU-MM01: {path} lists no identity")
    return ids


@DATASETS.register("sysu_mm01")
class SYSUMM01(ModalityDataset):
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 2

    def __init__(self, root, split: str, *, image_size: tuple[int, int] | list[int] = (288, 144),
                 include_val_ids: bool = False, flip: bool = True, images_per_identity: int | None = None,
                 pairing: str = "paired") -> None:
        super().__init__(root, split)
        if pairing not in PAIRINGS:
            raise ConfigError(f"SYSU-MM01: data.args.pairing must be one of {list(PAIRINGS)} (single: one image per "
                              f"training sample; paired: a visible and an infrared image of one identity), got "
                              f"{pairing!r}")
        if pairing == "paired" and images_per_identity is not None:
            raise ConfigError(f"SYSU-MM01: data.args.images_per_identity={images_per_identity} builds identity "
                              "batches of single images (half visible, half infrared, for the cross-modal term); "
                              "with data.args.pairing=paired every sample already holds a visible and an infrared "
                              "image of one identity. Set pairing: single, or images_per_identity: null")
        self.pairing = pairing
        if images_per_identity is not None and (images_per_identity < 2 or images_per_identity % 2):
            raise ConfigError(f"SYSU-MM01: images_per_identity must be an even number >= 2 (half visible, half "
                              f"infrared), got {images_per_identity}")
        self.images_per_identity = images_per_identity
        self.image_size = (int(image_size[0]), int(image_size[1]))
        missing = [f"cam{c}" for c in range(1, 7) if not (self.root / f"cam{c}").is_dir()]
        if missing:
            raise DatasetFormatError(f"SYSU-MM01: camera folder(s) {missing} missing under {str(self.root)!r}; "
                                     f"{LAYOUT}")
        ids = read_id_list(self.root / "exp" / SPLIT_FILES[split])
        if split == "train" and include_val_ids:
            ids = ids + read_id_list(self.root / "exp" / SPLIT_FILES["val"])
        ids = sorted(set(ids))
        samples: list[tuple[Path, int, int]] = []
        for pid in ids:
            found = 0
            for cam in range(1, 7):
                folder = self.root / f"cam{cam}" / f"{pid:04d}"
                if folder.is_dir():
                    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                    samples += [(p, pid, cam) for p in files]
                    found += len(files)
            if not found:
                raise DatasetFormatError(f"SYSU-MM01: identity {pid} of {SPLIT_FILES[split]} has no image in any "
                                         f"camera folder; {LAYOUT}")
        self.samples = samples
        self.train_ids = ids if split == "train" else None
        self._label = {pid: i for i, pid in enumerate(ids)} if split == "train" else {}
        self.flip = flip and split == "train"
        self.num_ids = len(ids)
        if split == "train" and pairing == "paired":
            self._pair_sampler(0)  # a split without any visible-infrared pair fails now, not at the first step

    def _pair_sampler(self, seed: int) -> "PairSampler":
        sampler = PairSampler([s[1] for s in self.samples], [int(s[2] in INFRARED_CAMS) for s in self.samples], seed)
        if not sampler.groups:
            raise DatasetFormatError(f"SYSU-MM01: data.args.pairing is paired, but no identity of the {self.split} "
                                     f"split under {str(self.root)!r} has both a visible (cam1, 2, 4, 5) and an "
                                     f"infrared (cam3, 6) image; {LAYOUT}")
        return sampler

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, i: int) -> torch.Tensor:
        path = self.samples[i][0]
        img = resize_uint8(read_image(path, "RGB"), self.image_size).astype(np.float32) / 255.0
        img = (img - MEAN) / STD
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        """``dataset[i]``: image ``i``; ``dataset[(v, r)]``: the pair of visible image ``v`` and infrared image
        ``r`` of one identity (what :class:`PairSampler` yields; see the module docstring)."""
        if isinstance(i, (tuple, list)):
            return self._pair(*i)
        _, pid, cam = self.samples[i]
        return {"image": self._image(i), "modality": torch.tensor(int(cam in INFRARED_CAMS)),
                "label": torch.tensor(self._label.get(pid, -1)), "pid": torch.tensor(pid),
                "cam": torch.tensor(cam), "index": torch.tensor(i)}

    def _pair(self, v: int, r: int) -> dict[str, Any]:
        (_, pid, cam), (_, pid_ir, cam_ir) = self.samples[v], self.samples[r]
        if cam in INFRARED_CAMS or cam_ir not in INFRARED_CAMS or pid != pid_ir:
            raise ValueError(f"SYSU-MM01: a pair is (visible image, infrared image) of one identity; items {v} "
                             f"(identity {pid}, cam{cam}) and {r} (identity {pid_ir}, cam{cam_ir}) are not")
        return {"image": self._image(v), "image_ir": self._image(r), "modality": torch.tensor(0),
                "label": torch.tensor(self._label.get(pid, -1)), "pid": torch.tensor(pid),
                "cam": torch.tensor(cam), "cam_ir": torch.tensor(cam_ir), "index": torch.tensor(v),
                "index_ir": torch.tensor(r)}

    def train_sampler(self, batch_size: int, seed: int):
        """``paired``: :class:`PairSampler` (visible-infrared pairs of one identity). ``single`` with
        ``images_per_identity`` K: batches of batch_size / K identities, each with K/2 visible and K/2 infrared
        images (DDAG's identity sampler), so every batch holds cross-modality positives; else the default order."""
        modality = [int(s[2] in INFRARED_CAMS) for s in self.samples]
        if self.pairing == "paired":
            sampler = self._pair_sampler(seed)
            if sampler.skipped:
                logger.warning("SYSU-MM01: %d of %d %s identities have images of one modality only and form no "
                               "visible-infrared pair (left out of paired training)", sampler.skipped,
                               sampler.skipped + len(sampler.groups), self.split)
            return sampler
        if self.images_per_identity is None:
            return None
        return IdentitySampler([s[1] for s in self.samples], modality, batch_size, self.images_per_identity, seed)

    def info(self) -> dict[str, Any]:
        return {"num_classes": self.num_ids, "image_size": list(self.image_size), "channels": 3}

    # -- demo ----------------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root, seed: int = 0, *, ids: int = 96, per_cam: int = 2, height: int = 64,
                   width: int = 32) -> None:
        """People as vertical stacks of clothing bands: every identity has its own band layout (head, torso,
        legs heights), a texture (solid, horizontal or vertical stripes) per band and band colours. Visible
        cameras see the colours; infrared cameras see one channel whose brightness is a fixed nonlinear
        function of the colour (so colour is only partly recoverable) under a per-camera gain. Each image
        jitters position, scale and lighting and adds noise. The first two thirds of the identities train, the
        next sixth is val, the last sixth test (96 identities: 64 / 16 / 16; with a few dozen training identities
        the embedding does not generalise to unseen people across modalities)."""
        root = Path(root)
        rng = np.random.default_rng(seed)
        people = []
        for _ in range(ids):
            cuts = np.sort(rng.uniform(0.15, 0.85, 2))
            people.append({"cuts": np.concatenate([[0.0], cuts, [1.0]]), "colours": rng.uniform(0, 1, (3, 3)),
                           "texture": rng.integers(0, 3, 3), "period": rng.uniform(3, 7, 3)})
        ir_weights = np.array([0.2, 0.5, 0.3])
        for cam in range(1, 7):
            infrared = cam in INFRARED_CAMS
            gain = rng.uniform(0.8, 1.2)
            for pid in range(1, ids + 1):
                folder = root / f"cam{cam}" / f"{pid:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                for n in range(per_cam):
                    img = _render_person(rng, people[pid - 1], height, width)
                    if infrared:
                        level = np.clip(np.sqrt(img @ ir_weights) * gain, 0, 1)
                        img = np.repeat(level[..., None], 3, axis=2)
                    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
                    _atomic_jpeg(folder / f"{n + 1:04d}.jpg", (img * 255).astype(np.uint8))
        (root / "exp").mkdir(parents=True, exist_ok=True)
        n_train, n_val = (2 * ids) // 3, ids // 6
        splits = {"train_id.txt": range(1, n_train + 1), "val_id.txt": range(n_train + 1, n_train + n_val + 1),
                  "test_id.txt": range(n_train + n_val + 1, ids + 1)}
        for name, r in splits.items():
            (root / "exp" / name).write_text(",".join(str(i) for i in r) + "\n")


def _render_person(rng: np.random.Generator, person: dict, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    top, bottom = rng.uniform(0.02, 0.08) * height, rng.uniform(0.92, 0.98) * height
    cx, half = width / 2 + rng.uniform(-2, 2), width * rng.uniform(0.3, 0.4)
    img = np.tile(rng.uniform(0.3, 0.6, 3), (height, width, 1))  # background
    rel = (yy - top) / (bottom - top)
    light = rng.uniform(0.8, 1.1)
    for b in range(3):
        inside = (rel >= person["cuts"][b]) & (rel < person["cuts"][b + 1]) & (np.abs(xx - cx) < half)
        colour = person["colours"][b] * light
        tex = person["texture"][b]
        if tex == 1:
            stripe = (np.floor(yy / person["period"][b]) % 2)[..., None]
        elif tex == 2:
            stripe = (np.floor(xx / person["period"][b]) % 2)[..., None]
        else:
            stripe = np.zeros((height, width, 1))
        value = colour * (1 - 0.5 * stripe)
        img = np.where(inside[..., None], value, img)
    return img


def _atomic_jpeg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="JPEG", quality=95)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
