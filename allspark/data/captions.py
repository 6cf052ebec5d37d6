"""Image-caption readers for retrieval: the RSICD family layout and the LuoJiaHOG-style multi-label layout.

**RSICD / UCM-captions / Sydney-captions / RSITMD** (``rsicd_captions``): one caption file
``<root>/dataset_*.json`` (or the file named by ``annotation``) in the Karpathy layout::

    {"images": [{"filename": "airport_1.jpg", "split": "train", "sentences": [{"raw": "..."}, ...]}, ...]}

and the images in ``<root>/<image_dir>/`` (``images`` by default; RSICD ships ``RSICD_images``, UCM and
Sydney ``imgs``: set ``image_dir``). Split names ``train``/``val``/``test`` (``restval`` counts as train).

**LuoJiaHOG-style multi-label** (``luojiahog``): ``<root>/<annotation>`` (default ``annotations.jsonl``),
one JSON object per line and image::

    {"image": "000001.png", "caption": "...", "second_level": ["water", ...], "third_level": ["river", ...],
     "split": "train"}

with the images in ``<root>/<image_dir>/``. ``split`` is optional: without it the images are split 70/10/20
(the paper's ratio) by a seeded permutation (``split_seed``). The label vocabularies are the sorted label
names of the whole file, so every split shares them.

Items: ``image`` float32 [3, S, S] (normalised with ``mean``/``std``), ``captions`` (a list of strings: in
the training split one caption drawn at random per access, otherwise all of the image's captions),
``index``; the multi-label reader adds ``labels_second`` and ``labels_third`` (float multi-hot vectors).
``collate`` keeps ``captions`` as a list of lists. Errors raise ``DatasetFormatError`` naming the caption
file (and the line or ``images[k]`` entry): a caption file that is missing, not UTF-8 or not JSON, an entry
without its keys, an image name that is not a relative path inside the image folder (absolute, or climbing
out with ``..``: refused, never read), an image listed that does not exist, a split name other than
train/val/test (or ``restval``), a split with no images, an image with no caption. An image that cannot be
decoded raises naming the file when its item is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from allspark.data.base import DatasetFormatError, ModalityDataset, path_inside, read_utf8_text
from allspark.data.image_folder import read_image, resize_uint8
from allspark.registry import DATASETS

__all__ = ["CaptionDataset", "RSICDCaptions", "LuoJiaHOGMultiLabel", "collate_captions"]


def collate_captions(items: list[dict[str, Any]]) -> dict[str, Any]:
    from torch.utils.data import default_collate

    captions = [list(it["captions"]) for it in items]
    rest = default_collate([{k: v for k, v in it.items() if k != "captions"} for it in items])
    rest["captions"] = captions
    return rest


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


class CaptionDataset(ModalityDataset):
    """Shared parts: image loading, caption choice, collate, info."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1
    name: ClassVar[str] = "captions"

    def _setup_images(self, image_dir: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise DatasetFormatError(f"{self.name}: image folder {self.image_dir} is missing ({self.LAYOUT})")
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def _check_split(self, annotation: Path, all_records: list[dict[str, Any]]) -> None:
        #: the most captions any image of the whole file has (the same for every split)
        self.max_captions = max((len(r["captions"]) for r in all_records), default=0)
        self.thumbnail_size = 48
        if not self.records:
            raise DatasetFormatError(f"{self.name}: split {self.split!r} of {annotation} has no images")
        for rec in self.records:
            path = self.image_dir / rec["file"]
            if not path.is_file():
                raise DatasetFormatError(f"{self.name}: {annotation} names image {rec['file']!r}, but "
                                         f"{path} does not exist")
            if not rec["captions"]:
                raise DatasetFormatError(f"{self.name}: {annotation}: image {rec['file']!r} has no caption")

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, rec: dict[str, Any]) -> torch.Tensor:
        img = resize_uint8(read_image(self.image_dir / rec["file"], "RGB"), self.image_size)
        return torch.from_numpy((img.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std)

    def _captions(self, rec: dict[str, Any]) -> list[str]:
        if self.split == "train":
            return [rec["captions"][int(torch.randint(len(rec["captions"]), ()))]]
        return list(rec["captions"])

    #: bytes of UTF-8 kept per caption in ``caption_bytes`` (for the report's figures)
    CAPTION_BYTES: ClassVar[int] = 128

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        item = {"image": self._image(rec), "captions": self._captions(rec), "index": torch.tensor(i)}
        if self.split != "train":
            # For the report (gathered like predictions): a thumbnail and the captions as padded UTF-8 bytes.
            thumb = resize_uint8(read_image(self.image_dir / rec["file"], "RGB"), self.thumbnail_size)
            item["thumbnail"] = torch.from_numpy(np.ascontiguousarray(thumb.transpose(2, 0, 1)))
            raw = np.zeros((self.max_captions, self.CAPTION_BYTES), np.uint8)
            for j, text in enumerate(rec["captions"][: self.max_captions]):
                b = text.encode("utf-8")[: self.CAPTION_BYTES]
                raw[j, : len(b)] = np.frombuffer(b, np.uint8)
            item["caption_bytes"] = torch.from_numpy(raw)
        return item

    def info(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": 3, "captions_per_image": self.max_captions}

    def caption_texts(self) -> list[list[str]]:
        """Every image's captions, in item order (for reports)."""
        return [list(r["captions"]) for r in self.records]

    def raw_image(self, i: int) -> np.ndarray:
        return read_image(self.image_dir / self.records[i]["file"], "RGB")

    collate = staticmethod(collate_captions)


@DATASETS.register("rsicd_captions")
class RSICDCaptions(CaptionDataset):
    """RSICD / UCM-captions / Sydney-captions / RSITMD: ``dataset_*.json`` plus an image folder."""

    name = "rsicd_captions"
    LAYOUT = ("expected layout: <root>/dataset_*.json with images[] of {filename, split, sentences[].raw}, "
              "and the images in <root>/<image_dir>/")

    def __init__(self, root: str | Path, split: str, *, annotation: str | None = None, image_dir: str = "images",
                 image_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__(root, split)
        if annotation is None:
            found = sorted(self.root.glob("dataset_*.json"))
            if len(found) != 1:
                raise DatasetFormatError(f"rsicd_captions: expected one dataset_*.json in {self.root}, found "
                                         f"{[p.name for p in found]}; set data.args.annotation ({self.LAYOUT})")
            path = found[0]
        else:
            path = self.root / annotation
        if not path.is_file():
            raise DatasetFormatError(f"rsicd_captions: caption file {path} is missing ({self.LAYOUT})")
        try:
            data = json.loads(read_utf8_text(path, "rsicd_captions"))
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"rsicd_captions: {path} is not valid JSON: {exc}") from exc
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DatasetFormatError(f"rsicd_captions: {path} has no 'images' list ({self.LAYOUT})")
        self._setup_images(image_dir, image_size, mean, std)
        self.records, every = [], []
        for k, entry in enumerate(images):
            try:
                entry_split = "train" if entry["split"] == "restval" else entry["split"]
                file = entry["filename"]
                captions = [s["raw"].strip() for s in entry["sentences"] if s.get("raw", "").strip()]
            except (KeyError, TypeError, AttributeError) as exc:
                raise DatasetFormatError(f"rsicd_captions: {path}: images[{k}] lacks {exc} ({self.LAYOUT})") from None
            if entry_split not in self.splits:
                raise DatasetFormatError(f"rsicd_captions: {path}: images[{k}] ({file!r}) has split "
                                         f"{entry['split']!r}; expected one of {[*self.splits, 'restval']}")
            path_inside(self.image_dir, file, f"rsicd_captions: {path}: images[{k}]", "image name")
            every.append({"file": file, "captions": captions})
            if entry_split == split:
                self.records.append(every[-1])
        self._check_split(path, every)

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, num_images: int = 360, size: int = 64,
                   captions_per_image: int = 3) -> None:
        """Generated aerial-like scenes (:mod:`allspark.retrieval.scenes`), 70/10/20 split, RSICD layout."""
        from allspark.retrieval.scenes import make_scenes

        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        scenes = make_scenes(num_images, seed, size, captions_per_image)
        splits = _demo_splits(num_images, seed)
        entries = []
        for i, scene in enumerate(scenes):
            name = f"scene_{i:04d}.png"
            _save_png(scene.image, root / "images" / name)
            entries.append({"filename": name, "imgid": i, "split": splits[i],
                            "sentences": [{"raw": c, "tokens": c.lower().rstrip(".").replace(",", "").split(),
                                           "imgid": i, "sentid": i * captions_per_image + j}
                                          for j, c in enumerate(scene.captions)]})
        (root / "dataset_demo.json").write_text(json.dumps({"images": entries, "dataset": "demo"}))


def _demo_splits(n: int, seed: int) -> list[str]:
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_train, n_val = int(round(0.7 * n)), int(round(0.1 * n))
    out = ["test"] * n
    for rank, i in enumerate(order):
        out[i] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


@DATASETS.register("luojiahog")
class LuoJiaHOGMultiLabel(CaptionDataset):
    """One JSON line per image: caption, second- and third-level labels (LuoJiaHOG-style)."""

    name = "luojiahog"
    LEVELS = ("second", "third")
    LAYOUT = ("expected layout: <root>/annotations.jsonl, one line per image {image, caption, second_level[], "
              "third_level[], split (optional)}, and the images in <root>/<image_dir>/")

    def __init__(self, root: str | Path, split: str, *, annotation: str = "annotations.jsonl",
                 image_dir: str = "images", image_size: int = 224, train_ratio: float = 0.7, val_ratio: float = 0.1,
                 split_seed: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__(root, split)
        path = self.root / annotation
        if not path.is_file():
            raise DatasetFormatError(f"luojiahog: annotation file {path} is missing ({self.LAYOUT})")
        self._setup_images(image_dir, image_size, mean, std)
        rows = []
        for n, line in enumerate(read_utf8_text(path, "luojiahog").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DatasetFormatError(f"luojiahog: {path} line {n}: expected a JSON object, found a JSON "
                                             f"{type(row).__name__} ({self.LAYOUT})")
                for key in ("second_level", "third_level"):
                    if key in row and not isinstance(row[key], list):
                        raise DatasetFormatError(f"luojiahog: {path} line {n}: {key!r} must be a list of label "
                                                 f"names, found {type(row[key]).__name__} {row[key]!r}")
                rec = {"file": row["image"], "captions": [str(row["caption"]).strip()] if str(row["caption"]).strip() else [],
                       "second": [str(x) for x in row["second_level"]], "third": [str(x) for x in row["third_level"]],
                       "split": row.get("split")}
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"luojiahog: {path} line {n} is not JSON: {exc}") from None
            except (KeyError, TypeError) as exc:
                raise DatasetFormatError(f"luojiahog: {path} line {n} lacks {exc} ({self.LAYOUT})") from None
            if rec["split"] is not None and rec["split"] not in self.splits:
                raise DatasetFormatError(f"luojiahog: {path} line {n}: split {rec['split']!r}; expected one of "
                                         f"{list(self.splits)} (or no split key)")
            path_inside(self.image_dir, rec["file"], f"luojiahog: {path} line {n}", "image name")
            rows.append(rec)
        if not rows:
            raise DatasetFormatError(f"luojiahog: {path} holds no image ({self.LAYOUT})")
        self.label_names = {lv: sorted({x for r in rows for x in r[lv]}) for lv in self.LEVELS}
        have_split = [r["split"] is not None for r in rows]
        if any(have_split) and not all(have_split):
            raise DatasetFormatError(f"luojiahog: {path}: either every line names its split or none does")
        if not all(have_split):
            order = np.random.default_rng(split_seed).permutation(len(rows))
            n_train, n_val = int(round(train_ratio * len(rows))), int(round(val_ratio * len(rows)))
            for rank, i in enumerate(order):
                rows[i]["split"] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
        self.records = [r for r in rows if r["split"] == split]
        self._check_split(path, rows)
        self._index = {lv: {name: j for j, name in enumerate(self.label_names[lv])} for lv in self.LEVELS}

    def _multi_hot(self, rec: dict[str, Any], level: str) -> torch.Tensor:
        v = torch.zeros(len(self.label_names[level]))
        v[[self._index[level][x] for x in rec[level]]] = 1.0
        return v

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        rec = self.records[i]
        item["labels_second"] = self._multi_hot(rec, "second")
        item["labels_third"] = self._multi_hot(rec, "third")
        return item

    def info(self) -> dict[str, Any]:
        return {**super().info(), "label_names_second": self.label_names["second"],
                "label_names_third": self.label_names["third"]}

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, num_images: int = 360, size: int = 64) -> None:
        """The same generated scenes as the ``rsicd_captions`` demo (one caption each), with their labels."""
        from allspark.retrieval.scenes import make_scenes

        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        scenes = make_scenes(num_images, seed, size, 3)
        splits = _demo_splits(num_images, seed)
        lines = []
        for i, scene in enumerate(scenes):
            name = f"scene_{i:04d}.png"
            _save_png(scene.image, root / "images" / name)
            lines.append(json.dumps({"image": name, "caption": scene.captions[0], "second_level": scene.second,
                                     "third_level": scene.third, "split": splits[i]}))
        (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
