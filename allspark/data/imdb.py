"""IMDB movie reviews (Maas et al. 2011) for binary sentiment classification (AllSpark Section III-C "Text").

On-disk layout (``aclImdb_v1.tar.gz`` unpacked; any corpus in this layout works)::

    <root>/{train,test}/{pos,neg}/<id>_<rating>.txt     one UTF-8 review per file

``<root>`` is the ``aclImdb`` folder or a folder holding it. The unlabelled ``train/unsup`` reviews are not
used (the paper uses the labelled data only). ``val`` is a stratified ``val_ratio`` share of ``train``
(seeded); ``test`` is the test folder. The ``<br />`` tags of the original files become spaces.

Beyond the official files: any text-classification corpus with one folder per class,
``<root>/{train,test}/<class>/*.txt`` (two or more classes, the same class folders under ``train`` and ``test``;
the ``<id>_<rating>`` file names are not needed). Without ``pos``/``neg`` folders the classes are the folder
names in sorted order and each class's label word is its folder name with ``_`` read as a space
(``train/computer_jokes`` -> "computer jokes"), so the language-model head scores the words that name the classes.

Items carry raw text (the model tokenises it: see :mod:`allspark.language`): ``input_text`` (the review),
``target_text`` (the label word: ``negative`` or ``positive`` for ``neg``/``pos``, else the class name), ``label``
int64 (IMDB: 0 = negative, 1 = positive; class folders: the sorted position) and ``index``. Long reviews are cut to
the token budget ``model.text_input.max_input_tokens`` by the model; the evaluation reports how many were cut. A
missing or empty class folder, class folders that differ between ``train`` and ``test``, an empty review file or one
that is not UTF-8 raises :class:`DatasetFormatError` naming the file or folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.registry import DATASETS

__all__ = ["IMDB", "read_review"]

LAYOUT = ("expected layout: <root>/{train,test}/{pos,neg}/<id>_<rating>.txt (the aclImdb folder), or one folder per "
          "class: <root>/{train,test}/<class>/*.txt")
LABEL_DIRS = ("neg", "pos")
LABEL_WORDS = ("negative", "positive")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def read_review(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"review {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DatasetFormatError(f"cannot read review {path}: {exc}") from exc
    text = " ".join(_BR.sub(" ", text).split())
    if not text:
        raise DatasetFormatError(f"review {path} is empty")
    return text


@DATASETS.register("imdb")
class IMDB(ModalityDataset):
    """Labelled IMDB reviews in the aclImdb folder layout; see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, val_ratio: float = 0.1, split_seed: int = 0,
                 max_per_class: int | None = None) -> None:
        super().__init__(root, split)
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"IMDB: val_ratio must be in [0, 1), got {val_ratio}")
        base = self.root / "aclImdb" if (self.root / "aclImdb").is_dir() else self.root
        folder = base / ("test" if split == "test" else "train")
        self.class_dirs, self.label_words = class_folders(base)
        samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_dirs):
            d = folder / name
            if not d.is_dir():
                raise DatasetFormatError(f"IMDB: {d} is missing or not a folder; {LAYOUT}")
            files = sorted(d.glob("*.txt"), key=_review_order)
            if not files:
                raise DatasetFormatError(f"IMDB: no .txt reviews in {d}; {LAYOUT}")
            if max_per_class:
                files = files[:max_per_class]
            samples += [(f, label) for f in files]
        if split != "test" and val_ratio > 0:
            rng = np.random.default_rng(split_seed)
            keep = []
            for label in range(len(self.class_dirs)):
                idx = [i for i, (_, y) in enumerate(samples) if y == label]
                rng.shuffle(idx)
                n_val = max(1, int(round(val_ratio * len(idx))))
                keep += idx[:n_val] if split == "val" else idx[n_val:]
            samples = [samples[i] for i in sorted(keep)]
        self.samples = samples

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_words), "class_names": list(self.label_words)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        return {"input_text": read_review(path), "target_text": self.label_words[label],
                "label": torch.tensor(label, dtype=torch.int64), "index": torch.tensor(i, dtype=torch.int64)}

    # -- demo ------------------------------------------------------------------------------------
    _TITLES = ("The Silent Harbor", "Midnight Express Line", "A Winter in Prague", "Iron Valley", "The Last Orchard",
               "Paper Kingdoms", "Echoes of Tomorrow", "The Glass Detective", "Northern Lights", "Red Canyon")
    _GENRES = ("thriller", "drama", "comedy", "western", "mystery", "romance", "science fiction film")
    _NEUTRAL = ("The story follows a family during one long summer.", "It runs a little over two hours.",
                "The film was shot on location near the coast.", "I watched it on a Sunday afternoon.",
                "The plot centres on a detective and an old case.", "It is based on a novel from the seventies.",
                "Most of the action takes place in a small town.", "The cast includes several newcomers.")
    _POS = ("The acting is brilliant and the script is sharp.", "I loved every minute of it.",
            "A wonderful, moving film with a superb soundtrack.", "The direction is masterful and the pacing perfect.",
            "One of the best movies I have seen this year.", "The performances are excellent and heartfelt.",
            "Beautifully photographed and genuinely funny.", "I would happily watch it again.",
            "A delightful surprise from start to finish.", "The ending is satisfying and powerful.")
    _NEG = ("The acting is wooden and the script is lazy.", "I was bored for most of it.",
            "A dull, lifeless film with an annoying soundtrack.", "The direction is clumsy and the pacing awful.",
            "One of the worst movies I have seen this year.", "The performances are weak and forced.",
            "Badly photographed and never funny.", "I would not watch it again.",
            "A tedious disappointment from start to finish.", "The ending is confusing and pointless.")
    _BUT_POS = ("Some critics found it slow, but I thought it was great.",
                "It is not perfect, yet it is a joy to watch.")
    _BUT_NEG = ("Some critics praised it, but I thought it was terrible.",
                "It has a good poster, yet the film itself is a mess.")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, train_per_class: int = 120, test_per_class: int = 60) -> None:
        """A generated review corpus in the aclImdb layout (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``).

        How it is made: each review is an opening sentence naming a made-up title and genre, one or two neutral
        sentences (plot, running time, shooting place: the same pool for both classes), and one to three
        sentiment sentences drawn from a positive or a negative bank (praise vs criticism of acting, script,
        pacing ...), in shuffled order; one review in five instead carries a contrastive sentence ("Some critics
        found it slow, but I thought it was great."). Ratings in the file names follow IMDB: 7-10 for
        ``pos``, 1-4 for ``neg``. The label is learnable from the sentiment words; no single sentence position
        or length gives it away. Reviews are short (about 30-60 tokens) to keep the CPU demo fast.
        """
        rng = np.random.default_rng(seed)
        base = Path(root) / "aclImdb"
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(LABEL_DIRS):
                d = base / split / name
                d.mkdir(parents=True, exist_ok=True)
                bank, turn = (cls._POS, cls._BUT_POS) if label else (cls._NEG, cls._BUT_NEG)
                for j in range(per_class):
                    opening = (f"I saw {cls._TITLES[rng.integers(len(cls._TITLES))]}, "
                               f"a {cls._GENRES[rng.integers(len(cls._GENRES))]}.")
                    body = list(rng.choice(cls._NEUTRAL, size=int(rng.integers(1, 3)), replace=False))
                    k = int(rng.integers(1, 4))
                    body += list(rng.choice(bank, size=k, replace=False))
                    if rng.random() < 0.2:
                        body[-1] = turn[rng.integers(len(turn))]
                    rng.shuffle(body)
                    rating = int(rng.integers(7, 11)) if label else int(rng.integers(1, 5))
                    text = " ".join([opening, *body])
                    if rng.random() < 0.3:  # the original files carry HTML line breaks
                        text = text.replace(". ", ".<br /><br />", 1)
                    (d / f"{j}_{rating}.txt").write_text(text + "\n", encoding="utf-8")


def class_folders(base: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The class folders under ``base/train`` and their label words: IMDB's ``neg``/``pos`` (words ``negative``,
    ``positive``) when ``train/pos`` or ``train/neg`` exists, else every sub-folder of ``train`` but ``unsup`` in
    sorted order (words: the names, ``_`` as a space), which ``base/test`` must hold too."""
    train, test = base / "train", base / "test"
    if not train.is_dir() or (train / "pos").exists() or (train / "neg").exists():
        return LABEL_DIRS, LABEL_WORDS  # (a missing folder is reported by the reader, naming train/neg)
    def subfolders(folder: Path) -> tuple[str, ...]:
        return tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name != "unsup"
                            and not d.name.startswith(".")))

    names = subfolders(train)
    if len(names) < 2:
        raise DatasetFormatError(f"IMDB: {train} holds {len(names)} class folder(s) {list(names)}; a classification "
                                 f"needs two or more; {LAYOUT}")
    if test.is_dir():
        found = subfolders(test)
        if found != names:
            raise DatasetFormatError(f"IMDB: the class folders differ between {train} {list(names)} and {test} "
                                     f"{list(found)}; {LAYOUT}")
    words = tuple(" ".join(n.replace("_", " ").split()) for n in names)
    if len(set(w.lower() for w in words)) < len(words):
        raise DatasetFormatError(f"IMDB: class folders {list(names)} under {train} name the same class twice "
                                 "(after '_' -> ' ' and case)")
    return names, words


def _review_order(path: Path) -> tuple[int, str]:
    head = path.stem.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (1 << 62, path.name)
