"""CodeSearchNet (Husain et al. 2019) for code documentation generation (AllSpark Section III-C "Code").

On-disk layout (the dataset's ``<language>.zip`` unpacked; ``language`` is one of go, java, javascript, php,
python, ruby)::

    <root>/<language>/final/jsonl/{train,valid,test}/<language>_<split>_<n>.jsonl.gz

Each line is one JSON record; the reader uses ``code`` (the function), ``docstring`` (its documentation) and
``language``. ``val`` reads the ``valid`` folder. A line that is not JSON, a record without ``code`` or
``docstring``, a record of another language, an unreadable gzip file or a split folder without files raises
:class:`DatasetFormatError` naming the file and line.

Items carry raw text (the model tokenises it): ``input_text`` is the function's code, ``target_text`` its
documentation: with ``summary_only`` (default, as CodeBERT) the first paragraph of the docstring, whitespace
collapsed. With ``strip_docstring`` (default) the docstring is removed from the code when it is written
there (CodeSearchNet's ``code`` field contains it): for Python by parsing the function with ``ast``,
otherwise by removing the docstring's text, so the task cannot copy its answer from the input.
"""
from __future__ import annotations

import ast
import gzip
import json
import re
import textwrap
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.registry import DATASETS

__all__ = ["CodeSearchNet", "read_jsonl_gz", "docstring_summary", "strip_python_docstring", "stdlib_functions"]

LANGUAGES = ("go", "java", "javascript", "php", "python", "ruby")
SPLIT_DIRS = {"train": "train", "val": "valid", "test": "test"}
LAYOUT = "expected layout: <root>/<language>/final/jsonl/{train,valid,test}/<language>_<split>_<n>.jsonl.gz"


def read_jsonl_gz(path: Path, required: tuple[str, ...] = ("code", "docstring")) -> list[dict[str, Any]]:
    """All records of one ``.jsonl.gz`` file; a bad line raises naming the file and line number."""
    records = []
    try:
        with gzip.open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetFormatError(f"{path}, line {n}: expected gzip-compressed UTF-8 JSON lines, found "
                                             f"byte 0x{raw[exc.start]:02x} that is not UTF-8") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(f"{path}, line {n}: not a JSON record ({exc.msg})") from exc
                if not isinstance(rec, dict):
                    raise DatasetFormatError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
                for key in required:
                    if not isinstance(rec.get(key), str):
                        raise DatasetFormatError(
                            f"{path}, line {n}: record lacks a string {key!r} (it has {sorted(rec)}); "
                            "CodeSearchNet records have code, docstring, language ...")
                records.append(rec)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"cannot read {path} as gzip-compressed UTF-8 JSON lines: {exc}") from exc
    return records


def docstring_summary(doc: str) -> str:
    """The first paragraph of a docstring, whitespace collapsed."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def strip_python_docstring(code: str) -> str | None:
    """The function's source without its docstring statement (None if it does not parse as one function)."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return None
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(funcs) != 1:
        return None
    node = funcs[0]
    if ast.get_docstring(node, clean=False) is None:
        return textwrap.dedent(code)
    doc = node.body[0]
    lines = textwrap.dedent(code).splitlines()
    if doc.lineno == node.lineno or len(node.body) < 2:  # one-line def or a function that is only a docstring
        return None
    return "\n".join(lines[: doc.lineno - 1] + lines[doc.end_lineno:])


@DATASETS.register("codesearchnet")
class CodeSearchNet(ModalityDataset):
    """CodeSearchNet jsonl.gz files of one language; see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, language: str = "python", summary_only: bool = True,
                 strip_docstring: bool = True, max_samples: int | None = None) -> None:
        super().__init__(root, split)
        if language not in LANGUAGES:
            raise ConfigError(f"CodeSearchNet: unknown language {language!r}; expected one of {LANGUAGES}")
        self.language = language
        folder = self.root / language / "final" / "jsonl" / SPLIT_DIRS[split]
        if not folder.is_dir():
            raise DatasetFormatError(f"CodeSearchNet: {folder} is missing or not a folder; {LAYOUT}")
        files = sorted(folder.glob(f"{language}_{SPLIT_DIRS[split]}_*.jsonl.gz"),
                       key=lambda p: int(re.findall(r"_(\d+)\.jsonl\.gz$", p.name)[0])
                       if re.findall(r"_(\d+)\.jsonl\.gz$", p.name) else 1 << 30)
        if not files:
            raise DatasetFormatError(f"CodeSearchNet: no {language}_{SPLIT_DIRS[split]}_<n>.jsonl.gz files in {folder}; {LAYOUT}")
        self.samples: list[tuple[str, str]] = []
        for path in files:
            for n, rec in enumerate(read_jsonl_gz(path), 1):
                lang = rec.get("language", language)
                if lang != language:
                    raise DatasetFormatError(f"{path}, record {n}: language {lang!r}, expected {language!r}")
                code, doc = rec["code"], rec["docstring"]
                target = docstring_summary(doc) if summary_only else doc.strip()
                if not target or not code.strip():
                    continue  # CodeSearchNet keeps functions without documentation out; skip stray ones
                if strip_docstring and doc.strip():
                    stripped = strip_python_docstring(code) if language == "python" else None
                    code = stripped if stripped is not None else code.replace(doc, "")
                self.samples.append((code, target))
                if max_samples and len(self.samples) >= max_samples:
                    break
            if max_samples and len(self.samples) >= max_samples:
                break
        if not self.samples:
            raise DatasetFormatError(f"CodeSearchNet: {folder} holds no documented function")

    def info(self) -> dict[str, Any]:
        return {"language": self.language}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        code, doc = self.samples[i]
        return {"input_text": code, "target_text": doc, "index": torch.tensor(i, dtype=torch.int64)}

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, sizes: tuple[int, int, int] = (192, 32, 60),
                   max_code_chars: int = 320) -> None:
        """Real functions with docstrings from the running Python's standard library, as CodeSearchNet
        ``python`` jsonl.gz files (``python/final/jsonl/{train,valid,test}/python_<split>_0.jsonl.gz``).

        Functions are found with ``ast`` (see :func:`stdlib_functions`), their docstring is removed from the
        code, and short ones are kept (at most ``max_code_chars`` characters of code, a first docstring
        line of 15-100 characters); a seeded shuffle assigns whole functions to train/valid/test, so the test
        functions are held out.
        """
        rng = np.random.default_rng(seed)
        funcs = stdlib_functions(max_code_chars)
        order = rng.permutation(len(funcs))
        need = sum(sizes)
        if len(funcs) < need:
            raise RuntimeError(f"the standard library gave {len(funcs)} usable functions, fewer than {need}")
        start = 0
        for split, size in zip(("train", "valid", "test"), sizes):
            chosen = [funcs[i] for i in order[start: start + size]]
            start += size
            d = Path(root) / "python" / "final" / "jsonl" / split
            d.mkdir(parents=True, exist_ok=True)
            with gzip.open(d / f"python_{split}_0.jsonl.gz", "wt", encoding="utf-8") as f:
                for rec in chosen:
                    f.write(json.dumps({**rec, "partition": split}) + "\n")


def stdlib_functions(max_code_chars: int = 320, modules: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Documented functions of the running Python's standard library as CodeSearchNet-style records
    (``repo``, ``path``, ``func_name``, ``original_string``, ``language``, ``code`` without the docstring,
    ``code_tokens``, ``docstring``, ``docstring_tokens``), sorted by path and name, duplicates of a
    docstring dropped. Private names, tests and the ``idlelib``/``lib2to3``/``site-packages`` trees are skipped.
    ``modules`` limits the scan to those files (paths relative to the standard library, e.g. ``statistics.py``).
    """
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip")
    out, seen = [], set()
    paths = [stdlib / m for m in modules] if modules is not None else sorted(stdlib.rglob("*.py"))
    for rel, node, doc, summary, original, code in documented_functions(paths, stdlib, skip):
        if not 15 <= len(summary) <= 100 or summary in seen:
            continue
        if code is None or len(code) > max_code_chars or len(code.splitlines()) < 2:
            continue
        seen.add(summary)
        out.append({
            "repo": "python/cpython-stdlib", "path": str(rel), "func_name": node.name,
            "original_string": original, "language": "python", "code": code,
            "code_tokens": re.findall(r"\w+|[^\w\s]", code), "docstring": doc,
            "docstring_tokens": re.findall(r"\w+|[^\w\s]", summary),
        })
    return out


_LINE_ENDS = re.compile(r"\r\n|\r|\n")


def _lines(source: str, lines: list[bytes] | None) -> list[bytes]:
    """``source`` split into UTF-8 lines with their endings, as :func:`ast.get_source_segment` splits it."""
    if lines is not None:
        return lines
    out, start = [], 0
    for m in _LINE_ENDS.finditer(source):
        out.append(source[start: m.end()].encode("utf-8"))
        start = m.end()
    if start < len(source):
        out.append(source[start:].encode("utf-8"))
    return out


def _source_segment(lines: list[bytes], node: ast.AST) -> str | None:
    """:func:`ast.get_source_segment` (``padded=False``) over lines split once: the node's source text (column
    offsets are UTF-8 byte offsets)."""
    end = getattr(node, "end_lineno", None)
    if end is None or node.end_col_offset is None:
        return None
    first, last = node.lineno - 1, end - 1
    if first == last:
        return lines[first][node.col_offset: node.end_col_offset].decode("utf-8")
    return (lines[first][node.col_offset:] + b"".join(lines[first + 1: last])
            + lines[last][: node.end_col_offset]).decode("utf-8")


def documented_functions(paths, relative_to: Path, skip: tuple[str, ...] | set[str] = ()):
    """Yield ``(relative path, node, docstring, summary, source, source without docstring)`` for every public
    (not ``_``-prefixed) function with a docstring in the Python files ``paths``; files under a folder named in
    ``skip`` or starting with ``test`` and files that do not parse are skipped. The source is dedented; the
    docstring-free source is None when the docstring cannot be cut out cleanly."""
    for path in paths:
        rel = path.relative_to(relative_to)
        if any(part in skip or part.startswith("test") for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        lines: list[bytes] | None = None  # the file's lines, split once (ast.get_source_segment splits per call)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            segment = _source_segment(lines, node) if (lines := _lines(source, lines)) else None
            if segment is None:
                continue
            original = textwrap.dedent(" " * node.col_offset + segment)
            yield rel, node, doc, docstring_summary(doc), original, strip_python_docstring(original)
