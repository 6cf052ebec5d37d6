"""One small typed registry, used for encoders, heads, datasets, metrics, objectives and evaluators.

Registration is one decorator on a plain class or function (as in timm); a duplicate name is refused
unless ``force=True`` (unlike timm); a missing name raises an error that lists what is available and the
closest matches (as in mmengine); ``build`` constructs an object from ``{"type": name, **kwargs}``.

Separately installed packages add entries through Python entry points: the group is
``allspark.<registry name>`` (for example ``allspark.encoders``), the entry point's name is the
registered name and its value the object registered (a class or a factory function).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import inspect
import logging
from typing import Any, Callable, Generic, Iterator, TypeVar, overload

from allspark.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "Registry",
    "RegistryError",
    "RegistryArgumentError",
    "ENCODERS",
    "HEADS",
    "DATASETS",
    "METRICS",
    "OBJECTIVES",
    "EVALUATORS",
    "BASELINES",
]


class RegistryError(UserError, KeyError):
    """A name is missing from a registry, or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class RegistryArgumentError(UserError, ValueError):
    """A build spec (from a config) is malformed or passes an argument the registered target does not take."""


class Registry(Generic[T]):
    """A name -> object mapping with decorator registration and entry-point discovery."""

    def __init__(self, name: str, *, entry_point_group: str | None = None) -> None:
        self.name = name
        self.entry_point_group = entry_point_group or f"allspark.{name}"
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._entry_points_loaded = False

    # -- registration -------------------------------------------------------------------------
    @overload
    def register(self, name: str | None = None, *, force: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str | None, obj: T, *, force: bool = False) -> T: ...

    def register(self, name: str | None = None, obj: Any = None, *, force: bool = False) -> Any:
        """Register ``obj`` under ``name``; used bare as ``@REG.register("x")`` it is a decorator."""

        def add(target: T) -> T:
            key = name or getattr(target, "__name__", None)
            if not key:
                raise ValueError(f"{self.name}: cannot infer a name for {target!r}; pass one")
            self._add(key, target, source=getattr(target, "__module__", "?"), force=force)
            return target

        if obj is not None:
            return add(obj)
        return add

    def _add(self, key: str, target: T, *, source: str, force: bool) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.name}: a registered name must be a non-empty string, got {key!r}")
        if key in self._entries and not force and self._entries[key] is not target:
            raise RegistryError(
                f"{self.name}: {key!r} is already registered (by {self._sources[key]}); "
                "pass force=True to replace it"
            )
        self._entries[key] = target
        self._sources[key] = source

    def unregister(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._entries:
            raise self._missing(name)
        self._sources.pop(name, None)
        return self._entries.pop(name)

    # -- entry points ---------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                # The repo's own registration wins; a plugin must choose another name.
                logger.warning(
                    "%s: entry point %r (%s) ignored: the name is already registered by %s",
                    self.name, ep.name, ep.value, self._sources[ep.name],
                )
                continue
            try:
                target = ep.load()
            except Exception as exc:  # a broken plugin must not break the package
                logger.warning("%s: entry point %r (%s) failed to load: %s", self.name, ep.name, ep.value, exc)
                continue
            self._add(ep.name, target, source=f"entry point {ep.value}", force=False)

    # -- lookup ---------------------------------------------------------------------------------
    def _missing(self, name: str) -> RegistryError:
        available = sorted(self._entries)
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return RegistryError(
            f"unknown {self.name} name {name!r}{hint} Available: {', '.join(available) or '(none)'}"
        )

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load_entry_points()
        if name not in self._entries:
            raise self._missing(name)
        return self._entries[name]

    def build(
        self, spec: str | dict[str, Any], /, *, optional: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """Build from a name or a ``{"type": name, **args}`` dict.

        ``kwargs`` are added to the args; ``optional`` ones only where the target's signature takes
        them (for example the dataset ``info`` that most, not all, heads want). An argument the target
        does not take is an error that lists the ones it does (a ``RegistryArgumentError``, a user error, when it
        comes from ``spec``; a ``TypeError`` when it comes from the calling code's ``kwargs``).
        """
        if isinstance(spec, str):
            name, args = spec, {}
        elif isinstance(spec, dict):
            if "type" not in spec:
                raise RegistryArgumentError(f"{self.name}: a build spec needs a 'type' key, got keys {sorted(spec)}")
            args = dict(spec)
            name = args.pop("type")
        else:
            raise TypeError(f"{self.name}: build spec must be a name or a dict, got {type(spec).__name__}")
        target = self.get(name)
        args.update(kwargs)
        params = _parameters(target)
        if params is not None:
            unknown = sorted(set(args) - params)
            if unknown:
                msg = f"{self.name} {name!r} does not take argument(s) {unknown}; it takes {sorted(params)}"
                # ``kwargs`` come from the calling code: a target that refuses one of them is a bug, not a
                # config mistake, and keeps its traceback
                raise (TypeError if set(unknown) & set(kwargs) else RegistryArgumentError)(msg)
            args.update({k: v for k, v in (optional or {}).items() if k in params})
        else:
            args.update(optional or {})
        return target(**args)

    def source(self, name: str) -> str:
        self.get(name)
        return self._sources[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        self._load_entry_points()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._entries)} entries)"


def _parameters(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts, or None when it takes ``**kwargs`` (anything goes)."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    return names


ENCODERS: Registry[Callable[..., Any]] = Registry("encoders")
HEADS: Registry[Callable[..., Any]] = Registry("heads")
DATASETS: Registry[Callable[..., Any]] = Registry("datasets")
METRICS: Registry[Callable[..., Any]] = Registry("metrics")
OBJECTIVES: Registry[Callable[..., Any]] = Registry("objectives")
EVALUATORS: Registry[Callable[..., Any]] = Registry("evaluators")
#: classical methods fitted on the training split and scored beside the model (allspark.baselines)
BASELINES: Registry[Callable[..., Any]] = Registry("baselines")
