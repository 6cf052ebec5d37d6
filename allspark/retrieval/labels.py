"""The LuoJiaHOG extensible classification system (Sec. 3.1.2, Eq. 13-16): a label tree of three levels.

Third-level labels ``T3`` fall into second-level labels ``T2``, which fall into first-level labels ``T1``
(``t3 ≺ t2 ≺ t1``); ``T = T1 ∪ T2 ∪ T3`` and each label belongs to exactly one parent, so a name is unique
in the tree. The paper's full tree (Fig. 6: 7 first-, 21 second- and 131 third-level labels) is a figure,
not text; :func:`paper_examples` holds only the relations its text states. A complete tree is loaded from a
file (:meth:`LabelTree.from_file`) and extended by more files (:meth:`LabelTree.extend_from_file`): novel
labels are added under their parent, synonyms are consolidated by aliases (``graveyard -> cemetery``).

File formats:

- CSV / TSV (``.csv``, ``.tsv``, ``.txt``): one path per line, ``first,second,third`` (an optional header
  ``first,second,third``; a line of two names adds a second-level label, of one a first-level label);
  a line ``alias,<synonym>,<label>`` declares a synonym;
- JSON (``.json``): ``{"tree": {first: {second: [third, ...]}}, "aliases": {synonym: label}}``.

This does not change the annotation reader (:class:`allspark.data.captions.LuoJiaHOGMultiLabel`, which
reads second- and third-level names per image); :meth:`LabelTree.parents` maps its third-level names to the
other levels.
"""
from __future__ import annotations

import csv
import json
from os import PathLike
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["LEVELS", "LabelTree", "paper_examples"]

LEVELS = ("first", "second", "third")


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


class LabelTree:
    """A three-level label tree; names are matched case-insensitively, with ``_`` as a space."""

    def __init__(self) -> None:
        self._level: dict[str, int] = {}     # normalised name -> 0, 1, 2
        self._parent: dict[str, str] = {}    # normalised name -> normalised parent
        self._display: dict[str, str] = {}   # normalised name -> name as first given
        self._alias: dict[str, str] = {}     # normalised synonym -> normalised label

    # -- building ---------------------------------------------------------------------------------------
    def add(self, *path: str) -> None:
        """Add ``first``, ``first, second`` or ``first, second, third`` (existing parts must agree)."""
        if not 1 <= len(path) <= len(LEVELS):
            raise ValueError(f"label tree: expected a path of 1 to {len(LEVELS)} labels (first, second, third), "
                             f"found {len(path)}: {list(path)}")
        parent = None
        for depth, raw in enumerate(path):
            if not str(raw).strip():
                raise ValueError(f"label tree: expected a non-empty {LEVELS[depth]}-level label in {list(path)}")
            key = self._canonical(raw)
            if key in self._level:
                if self._level[key] != depth:
                    raise ValueError(f"label tree: {raw!r} is already a {LEVELS[self._level[key]]}-level label, "
                                     f"found it as {LEVELS[depth]}-level in {list(path)}")
                if self._parent.get(key) != parent:
                    raise ValueError(f"label tree: {raw!r} is already under {self._display[self._parent[key]]!r}, "
                                     f"found it under {self._display[parent]!r} in {list(path)}")
            else:
                self._level[key] = depth
                self._display[key] = str(raw).strip()
                if parent is not None:
                    self._parent[key] = parent
            parent = key

    def add_alias(self, synonym: str, label: str) -> None:
        """Consolidate ``synonym`` into the existing ``label``."""
        key = self._canonical(label)
        if key not in self._level:
            raise ValueError(f"label tree: alias {synonym!r} expected an existing label, found {label!r} not in the tree")
        syn = _norm(synonym)
        if syn in self._level:
            raise ValueError(f"label tree: alias {synonym!r} is itself a label of the tree")
        if syn in self._alias and self._alias[syn] != key:
            raise ValueError(f"label tree: alias {synonym!r} already means {self._display[self._alias[syn]]!r}, "
                             f"found it for {label!r}")
        self._alias[syn] = key

    @classmethod
    def from_paths(cls, paths: Iterable[Iterable[str]], aliases: Mapping[str, str] | None = None) -> "LabelTree":
        tree = cls()
        for p in paths:
            tree.add(*p)
        for syn, label in (aliases or {}).items():
            tree.add_alias(syn, label)
        return tree

    @classmethod
    def from_file(cls, path: str | PathLike) -> "LabelTree":
        tree = cls()
        tree.extend_from_file(path)
        return tree

    def extend_from_file(self, path: str | PathLike) -> "LabelTree":
        """Add every path and alias of a CSV/TSV/JSON file (module docstring); returns ``self``."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"label tree: expected a label file, found no file at {str(p)!r}")
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("tree", {}), dict):
                raise ValueError(f"label tree: {p.name} expected {{'tree': {{first: {{second: [third, ...]}}}}, "
                                 f"'aliases': {{...}}}}, found {type(data).__name__}")
            for first, seconds in data.get("tree", {}).items():
                self.add(first)
                if not isinstance(seconds, dict):
                    raise ValueError(f"label tree: {p.name} expected a mapping of second-level labels under "
                                     f"{first!r}, found {type(seconds).__name__}")
                for second, thirds in seconds.items():
                    self.add(first, second)
                    if not isinstance(thirds, list):
                        raise ValueError(f"label tree: {p.name} expected a list of third-level labels under "
                                         f"{second!r}, found {type(thirds).__name__}")
                    for third in thirds:
                        self.add(first, second, third)
            for syn, label in data.get("aliases", {}).items():
                self.add_alias(syn, label)
            return self
        if p.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise ValueError(f"label tree: expected a .csv, .tsv, .txt or .json file, found {p.name!r}")
        delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
        with p.open(encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), 1):
                cells = [c.strip() for c in row]
                while cells and not cells[-1]:
                    cells.pop()
                if not cells or cells[0].startswith("#"):
                    continue
                if lineno == 1 and [c.lower() for c in cells] == list(LEVELS)[: len(cells)]:
                    continue
                try:
                    if cells[0].lower() == "alias":
                        if len(cells) != 3:
                            raise ValueError(f"expected 'alias,<synonym>,<label>', found {cells}")
                        self.add_alias(cells[1], cells[2])
                    else:
                        self.add(*cells)
                except ValueError as err:
                    raise ValueError(f"{p.name} line {lineno}: {err}") from None
        return self

    # -- queries ----------------------------------------------------------------------------------------
    def _canonical(self, name: str) -> str:
        key = _norm(name)
        return self._alias.get(key, key)

    def __contains__(self, name: str) -> bool:
        return self._canonical(name) in self._level

    def __len__(self) -> int:
        return len(self._level)

    def level(self, name: str) -> str:
        """``first``, ``second`` or ``third``."""
        return LEVELS[self._level[self._lookup(name)]]

    def _lookup(self, name: str) -> str:
        key = self._canonical(name)
        if key not in self._level:
            raise KeyError(f"label tree: expected a label of the tree, found {name!r} (not in its {len(self)} labels)")
        return key

    def canonical(self, name: str) -> str:
        """The label's name as given in the tree (aliases resolved)."""
        return self._display[self._lookup(name)]

    def parents(self, name: str) -> dict[str, str]:
        """The label and its ancestors by level: a third-level label -> ``{"third", "second", "first"}``."""
        key = self._lookup(name)
        out = {}
        while key is not None:
            out[LEVELS[self._level[key]]] = self._display[key]
            key = self._parent.get(key)
        return out

    def labels(self, level: str) -> list[str]:
        """The labels of one level, sorted."""
        if level not in LEVELS:
            raise ValueError(f"label tree: level must be one of {list(LEVELS)}, got {level!r}")
        depth = LEVELS.index(level)
        return sorted(self._display[k] for k, d in self._level.items() if d == depth)

    def children(self, name: str) -> list[str]:
        key = self._lookup(name)
        return sorted(self._display[k] for k, p in self._parent.items() if p == key)

    def lift(self, names: Iterable[str], level: str) -> list[str]:
        """Map labels (e.g. an image's third-level labels) to their ancestors at ``level`` (sorted, unique)."""
        if level not in LEVELS:
            raise ValueError(f"label tree: level must be one of {list(LEVELS)}, got {level!r}")
        out = set()
        for n in names:
            up = self.parents(n)
            if level not in up:
                raise ValueError(f"label tree: {n!r} is a {self.level(n)}-level label, it has no {level}-level "
                                 f"ancestor")
            out.add(up[level])
        return sorted(out)


def paper_examples() -> LabelTree:
    """Only the relations the paper's text states (Sec. 3.1.2, 3.2): first-level "Building area" and "Arable
    land"; "Building" and "Infrastructure" (printed "Infrastucture") in "Building area"; "farmyard" added
    under "building", "restaurant", "Church" and "Cemetery" under "Infrastucture"; the synonym "graveyard"
    of "cemetery" (the paper's consolidation example)."""
    return LabelTree.from_paths(
        [("Building area", "Building", "farmyard"), ("Building area", "Infrastructure", "church"),
         ("Building area", "Infrastructure", "cemetery"), ("Building area", "Infrastructure", "restaurant"),
         ("Arable land",)],
        aliases={"graveyard": "cemetery", "infrastucture": "Infrastructure"},
    )
