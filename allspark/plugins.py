"""Import every module of a built-in package, so that adding a reader, encoder, head, metric or
evaluation protocol is adding one file: its import registers it."""
from __future__ import annotations

import importlib
import pkgutil

__all__ = ["import_submodules"]

_done: set[str] = set()


def import_submodules(package: str) -> None:
    if package in _done:
        return
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _done.add(package)
