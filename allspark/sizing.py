"""Sizes the data knows: an argument a component takes from the dataset's ``info()`` unless the config sets it.

Encoders and heads are sized by their data (number of classes, bands, channels, sensors, image size ...).
Readers report those values in ``info()``, and the model builder passes that dict to every builder that takes
an ``info`` argument. :func:`from_data` resolves one such argument:

- the config leaves it unset (``None``): the value is ``info[key]``; a reader that does not give ``key`` is one
  clear error that names the argument to set and the info key;
- the config sets it: the value is kept, and it must equal ``info[key]`` when the reader gives that key (a
  config written for another dataset fails at build time, before any batch is drawn).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

from allspark.config import ConfigError

__all__ = ["from_data", "as_int", "as_int_pair", "as_int_list"]


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise TypeError(f"expected a whole number, got {value!r}")
    return int(value)


def as_int_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"expected a pair [height, width], got {value!r}")
    return as_int(value[0]), as_int(value[1])


def as_int_list(value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"expected a list of whole numbers, got {value!r}")
    return [as_int(v) for v in value]


def _show(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _lookup(info: dict[str, Any], key: str | tuple[str, ...]) -> Any:
    node: Any = info
    for part in (key,) if isinstance(key, str) else key:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _label(key: str | tuple[str, ...]) -> str:
    if isinstance(key, str):
        return repr(key)
    return repr(key[0]) + "".join(f"[{k!r}]" for k in key[1:])


def from_data(owner: str, arg: str, value: Any, info: dict[str, Any] | None, key: str | tuple[str, ...], *,
              where: str = "model.encoders.*.args", found: str = "gives {}",
              convert: Callable[[Any], Any] = as_int) -> Any:
    """``value`` (the config's, checked against the data) or, when it is ``None``, the dataset's ``info[key]``.

    ``owner``: the component, for the message (``"hsi_spectral"``); ``arg``: its argument name; ``key``: the
    info key (a tuple walks nested dicts: ``("channels", "hsi")``); ``where``: the config path of the
    component's args; ``found``: how the mismatch message describes the data's value (``"has {} bands"``);
    ``convert``: normalises both values before they are compared (``as_int``, ``as_int_pair`` ...).
    """
    info = info or {}
    have = _lookup(info, key)
    if have is not None:
        try:
            have = convert(have)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{owner}: the dataset info gives {_label(key)}={have!r}, which cannot size "
                             f"{arg}: {exc}") from None
    if value is None:
        if have is None:
            keys = ", ".join(sorted(map(str, info))) or "none"
            raise ConfigError(
                f"{owner}: {arg} is not set and the dataset info has no {_label(key)} to take it from "
                f"(the reader's info keys: {keys}); set {where}.{arg} in the config")
        return have
    try:
        value = convert(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner}: {where}.{arg}: {exc}") from None
    if have is not None and have != value:
        raise ConfigError(f"{owner}: the config says {arg}={_show(value)} but the dataset {found.format(_show(have))} "
                         f"({where}.{arg}; leave it unset to take it from the data)")
    return value
