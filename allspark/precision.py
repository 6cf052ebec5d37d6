"""Which floating-point precision runs fast here: the ``auto`` setting of ``model.llm.dtype`` (the frozen LLM's
weights), ``train.mixed_precision`` (accelerate's autocast of encoders, bridge, adapters and head) and evaluation.

``auto`` picks bfloat16 only where the device runs it natively fast, else float16 where that is fast, else
float32. Emulated bf16 is no small loss: on an AMD EPYC with AVX2 and no AVX-512 a 2048^3 bf16 matmul runs
at 0.3 GFLOP/s against 111 GFLOP/s in fp32. The check, per device type:

- ``cuda``: bf16 when the GPU runs it in hardware (compute capability >= 8.0, Ampere and later; torch's
  ``is_bf16_supported(including_emulation=False)``), else fp16 from compute capability 7.0 (tensor cores),
  else fp32.
- ``mps`` (Apple silicon GPU): bf16 when the MPS backend accepts it (macOS 14+), else fp16.
- ``cpu``: from the capability flags torch reports (``torch.cpu.get_capabilities()``, else its private
  ``torch.cpu._is_*_supported`` helpers, else the flags of ``/proc/cpuinfo``), limited by
  ``ONEDNN_MAX_CPU_ISA`` when that caps oneDNN (which runs torch's bf16 matmuls) below them:

  * AMX-BF16 (Intel Sapphire Rapids and later): bf16, no measurement needed (several times fp32).
  * bf16 dot-product instructions without AMX (AVX-512-BF16 on Cooper Lake / Zen 4, the ARM BF16 extension
    on Graviton 3 or Apple M2 and later): these are not always faster than fp32 in torch (on a Sapphire
    Rapids with oneDNN capped at AVX512_CORE_BF16 a bf16 matmul ran at 0.6x fp32), so a one-off
    micro-benchmark decides: bf16 when its matmul is at least as fast as fp32's.
  * neither: fp32 (bf16 would be emulated). fp16 is never picked on a CPU: without AMX-FP16 torch has no fast
    CPU fp16 matmul (AVX-512-FP16 alone ran it at fp32 speed), and every CPU with AMX-FP16 has AMX-BF16.

- any other accelerator: bf16 when its torch backend says ``is_bf16_supported()``, else fp32.

Micro-benchmarks (square matmuls of size 256, best of a few timed runs) are cached as JSON under
``allspark.data.cache_dir()/precision/<fingerprint>.json``; the fingerprint hashes the CPU model and flags
(or the GPU's name and compute capability), torch's version, the thread count and ``ONEDNN_MAX_CPU_ISA``,
so a new machine, torch or thread count measures again.

A setting that forces a dtype (``model.llm.dtype: bfloat16``, ``train.mixed_precision: bf16``) is obeyed; where
that dtype is emulated the process gets one :class:`PrecisionWarning` per device and dtype, naming the
measured slowdown against fp32.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from allspark.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "LLM_DTYPE_SETTINGS",
    "MIXED_PRECISION_SETTINGS",
    "Capability",
    "PrecisionWarning",
    "default_device",
    "capability",
    "cpu_features",
    "resolve_dtype",
    "resolve_mixed_precision",
    "matmul_gflops",
    "measured_gflops",
    "machine_fingerprint",
    "precision_record",
    "run_precision",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLM_DTYPE_SETTINGS = ("auto", *DTYPES)
#: accelerate's names (it checks anything else it accepts, e.g. fp8) plus ``auto``
MIXED_PRECISION_SETTINGS = ("auto", "no", "bf16", "fp16")
_MIXED_TO_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: matmul size and timing of the micro-benchmark (small enough for 0.1 s per run where bf16 is emulated)
BENCH_SIZE = 256
BENCH_REPEATS = 3
BENCH_MIN_SECONDS = 0.02

#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) at or above which its bf16 dot products / AMX tiles are used
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
                     "DEFAULT")


class PrecisionWarning(UserWarning):
    """A forced low precision that this device only emulates (and so runs much slower than float32)."""


@dataclass(frozen=True)
class Capability:
    """What a device type runs natively fast, and why that was concluded."""

    device: str
    bfloat16: bool
    float16: bool
    reason: str


# ---------------------------------------------------------------------------------------------------
# devices


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return default_device().type
    return torch.device(device).type


def default_device() -> torch.device:
    """The device accelerate will run on: CPU when ``ACCELERATE_USE_CPU`` is set (``accelerate launch --cpu``),
    else the available accelerator (CUDA, MPS, XPU, ...), else CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return torch.device("cpu")
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        if probe.is_available():
            current = probe.current_accelerator()
            if current is not None:
                return torch.device(current.type)
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# CPU flags


def _cpuinfo_flags(text: str | None = None) -> set[str]:
    """The CPU flags of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); empty where there is none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_features() -> dict[str, Any]:
    """The CPU's bf16-related features as torch sees them: ``amx_bf16``, ``bf16_dot`` (AVX-512-BF16 or the ARM
    BF16 extension), ``amx_fp16``, ``source`` (where the flags came from) and ``onednn_cap`` (the value of
    ``ONEDNN_MAX_CPU_ISA``, which switches off what oneDNN may not use)."""
    caps: dict[str, Any] = {}
    source = ""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            caps = dict(get_capabilities())
            source = "torch.cpu.get_capabilities()"
        except Exception:  # noqa: BLE001 - an older or odd build: fall through to the next source
            caps = {}
    if not caps:
        helpers = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
                   "amx_fp16": "_is_amx_fp16_supported"}
        for key, name in helpers.items():
            fn = getattr(torch.cpu, name, None)
            if fn is not None:
                try:
                    caps[key] = bool(fn())
                except Exception:  # noqa: BLE001 - a private helper that changed: the next source decides
                    caps = {}
                    break
        if caps:
            caps["amx_bf16"] = caps.get("amx_tile", False)  # every CPU with AMX tiles has AMX-BF16
            source = "torch.cpu._is_*_supported()"
    if not caps:
        flags = _cpuinfo_flags()
        caps = {name: name in flags for name in ("avx512_bf16", "amx_bf16", "amx_fp16")}
        caps["bf16"] = "bf16" in flags  # ARM Features
        source = "/proc/cpuinfo"
    features = {
        "amx_bf16": bool(caps.get("amx_bf16", False)),
        "bf16_dot": bool(caps.get("avx512_bf16", False) or caps.get("bf16", False) or caps.get("sve_bf16", False)),
        "amx_fp16": bool(caps.get("amx_fp16", False)),
        "source": source,
        "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
    }
    cap = features["onednn_cap"].upper()
    if cap and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        if "AMX" not in cap and cap not in ("ALL", "DEFAULT"):
            features["amx_bf16"] = features["amx_fp16"] = False
        if cap not in _ONEDNN_BF16_ISAS:
            features["bf16_dot"] = False
    return features


def _describe_cpu_features(f: dict[str, Any]) -> str:
    cap = f" limited by ONEDNN_MAX_CPU_ISA={f['onednn_cap']}" if f["onednn_cap"] else ""
    return f"{f['source']}{cap}"


# ---------------------------------------------------------------------------------------------------
# the capability check


@lru_cache(maxsize=None)
def capability(device_type: str) -> Capability:
    """What ``device_type`` (``cpu``, ``cuda``, ``mps``, ...) runs natively fast; cached for the process.

    Tests replace this function to play a machine with or without native bf16.
    """
    if device_type == "cuda":
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False)) and major >= 8
        fp16 = major >= 7
        what = "bf16" if bf16 else ("fp16 but not bf16" if fp16 else "neither bf16 nor fp16")
        return Capability("cuda", bf16, fp16, f"{name} (compute capability {major}.{minor}) runs {what} natively")
    if device_type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            bf16 = True
        except (RuntimeError, TypeError):
            bf16 = False
        why = "the MPS backend runs bf16" if bf16 else "the MPS backend has no bf16 (macOS < 14), fp16 is native"
        return Capability("mps", bf16, True, f"Apple silicon GPU: {why}")
    if device_type == "cpu":
        return _cpu_capability()
    backend = getattr(torch, device_type, None)
    probe = getattr(backend, "is_bf16_supported", None)
    bf16 = bool(probe()) if callable(probe) else False
    return Capability(device_type, bf16, False,
                      f"torch.{device_type}.is_bf16_supported() is {bf16}" if callable(probe)
                      else f"torch reports no bf16 support for {device_type!r}")


def _cpu_capability() -> Capability:
    f = cpu_features()
    where = _describe_cpu_features(f)
    if f["amx_bf16"]:
        return Capability("cpu", True, False, f"the CPU has AMX-BF16 tiles ({where})")
    if f["bf16_dot"]:
        speed = measured_gflops("cpu", ("float32", "bfloat16"))
        ratio = speed["bfloat16"] / speed["float32"]
        fast = ratio >= 1.0
        verdict = "faster than" if fast else "slower than"
        return Capability(
            "cpu", fast, False,
            f"the CPU has bf16 dot-product instructions but no AMX ({where}); a measured {BENCH_SIZE}^3 bf16 "
            f"matmul runs at {ratio:.2f}x fp32 ({speed['bfloat16']:.1f} vs {speed['float32']:.1f} GFLOP/s), "
            f"{verdict} fp32",
        )
    return Capability("cpu", False, False,
                      f"the CPU has neither AVX-512-BF16 nor AMX-BF16 nor ARM BF16 ({where}): bf16 would be emulated")


# ---------------------------------------------------------------------------------------------------
# micro-benchmark, cached per machine


def machine_fingerprint(device_type: str = "cpu") -> tuple[str, dict[str, Any]]:
    """A short hash of what decides matmul speed here, and the fields it hashes."""
    fields: dict[str, Any] = {
        "device": device_type,
        "system": platform.system(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
    }
    if device_type == "cpu":
        model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    model = line.partition(":")[2].strip()
                    break
        except OSError:
            pass
        fields["cpu"] = model or platform.processor()
        fields["flags"] = sorted(k for k, v in cpu_features().items() if v is True)
    elif device_type == "cuda":
        fields["gpu"] = torch.cuda.get_device_name()
        fields["capability"] = list(torch.cuda.get_device_capability())
        fields["cuda"] = torch.version.cuda
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return key, fields


def _synchronize(device_type: str) -> None:
    backend = getattr(torch, device_type, None)
    sync = getattr(backend, "synchronize", None)
    if device_type != "cpu" and callable(sync):
        sync()


def matmul_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = BENCH_SIZE,
                  repeats: int = BENCH_REPEATS, min_seconds: float = BENCH_MIN_SECONDS) -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` on ``device``: best of ``repeats`` timings, each
    of as many products as take ``min_seconds`` (one at least)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    t = time.perf_counter()
    a @ b  # warm-up, and a first estimate of one product's time
    _synchronize(device.type)
    once = max(time.perf_counter() - t, 1e-6)
    inner = max(1, min(1000, int(min_seconds / once)))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        _synchronize(device.type)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n**3 / best / 1e9


def _bench_path(key: str) -> Path:
    from allspark.data import cache_dir

    return cache_dir() / "precision" / f"{key}.json"


def measured_gflops(device: torch.device | str, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, float]:
    """Matmul GFLOP/s of each dtype name on ``device``, from this machine's cache file or measured once (and
    added to it)."""
    device_type = torch.device(device).type
    key, fields = machine_fingerprint(device_type)
    path = _bench_path(key)
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    if record.get("fingerprint") != fields or record.get("n") != BENCH_SIZE:
        record = {"fingerprint": fields, "n": BENCH_SIZE, "gflops": {}}
    gflops = record.setdefault("gflops", {})
    missing = [d for d in dtypes if d not in gflops]
    if missing:
        # round-robin, best of each: a burst of load from other processes hits every dtype alike
        for _ in range(BENCH_REPEATS):
            for name in missing:
                speed = matmul_gflops(DTYPES[name], device_type, repeats=1)
                gflops[name] = max(gflops.get(name, 0.0), speed)
        logger.info("measured %s matmuls on %s: %s GFLOP/s (cached in %s)", BENCH_SIZE, device_type,
                    {k: round(v, 1) for k, v in gflops.items()}, path)
        from allspark.io import atomic_write_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        except OSError as exc:  # a read-only cache: keep the numbers for this process only
            logger.warning("could not cache the precision benchmark in %s: %s", path, exc)
    return {d: float(gflops[d]) for d in dtypes}


# ---------------------------------------------------------------------------------------------------
# decisions

_WARNED: set[tuple[str, torch.dtype]] = set()


def _warn_emulated(dtype: torch.dtype, device_type: str, what: str, cap: Capability) -> str:
    """Warn (once per process, device type and dtype) that ``what`` forces an emulated dtype; the reason text."""
    name = str(dtype).removeprefix("torch.")
    speed = measured_gflops(device_type, ("float32", name))
    slowdown = speed["float32"] / speed[name]
    text = (f"{what} forces {name} on {device_type}, which this machine emulates ({cap.reason}): a measured "
            f"{BENCH_SIZE}^3 matmul runs {slowdown:.1f}x slower than float32 ({speed[name]:.2f} vs "
            f"{speed['float32']:.1f} GFLOP/s)")
    if (device_type, dtype) not in _WARNED:
        _WARNED.add((device_type, dtype))
        warnings.warn(f"{text}; set it to auto (or float32) to run at full speed here", PrecisionWarning,
                      stacklevel=3)
    return text


def _auto(cap: Capability) -> tuple[torch.dtype, str]:
    if cap.bfloat16:
        return torch.bfloat16, f"auto: bfloat16, {cap.device}: {cap.reason}"
    if cap.float16 and cap.device != "cpu":
        return torch.float16, f"auto: float16, {cap.device}: {cap.reason}"
    return torch.float32, f"auto: float32, {cap.device}: {cap.reason}"


def resolve_dtype(setting: str, device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """``model.llm.dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``) on ``device`` (default: the one
    accelerate will use) -> (torch dtype, why). A forced dtype this device emulates warns once."""
    if setting not in LLM_DTYPE_SETTINGS:
        raise ConfigError(f"model.llm.dtype must be one of {sorted(LLM_DTYPE_SETTINGS)}, got {setting!r}")
    device_type = _device_type(device)
    if setting == "float32":
        return torch.float32, "model.llm.dtype=float32 (set in the config)"
    if setting == "auto":
        return _auto(capability(device_type))
    dtype = DTYPES[setting]
    return dtype, _forced(dtype, device_type, f"model.llm.dtype={setting}")


def _forced(dtype: torch.dtype, device_type: str, setting: str) -> str:
    """Why a precision forced by the config applies: native on the device, or emulated (warned once)."""
    cap = capability(device_type)
    if cap.bfloat16 if dtype == torch.bfloat16 else cap.float16:
        return f"{setting} (set in the config; native on {device_type})"
    return f"{setting} (set in the config): " + _warn_emulated(dtype, device_type, setting, cap)


def resolve_mixed_precision(setting: str | None, device: torch.device | str | None = None,
                            llm_dtype: str = "auto") -> tuple[str | None, str]:
    """``train.mixed_precision`` -> (accelerate's ``mixed_precision``, why).

    ``auto`` follows the LLM's precision: bf16 autocast where the device runs bf16 natively, fp16 on an
    accelerator that runs fp16 but not bf16, else ``no``; and ``no`` when ``model.llm.dtype`` is pinned to
    float32 (a run asked to be fp32 stays fp32). Under ``auto``, a launcher's ``bf16`` or ``fp16``
    (``accelerate launch --mixed_precision``, i.e. ``ACCELERATE_MIXED_PRECISION``) wins; its ``no`` does not,
    because ``accelerate launch`` passes ``no`` whenever it was not told otherwise (a default is no choice): turn
    autocast off with ``train.mixed_precision=no``. A forced ``bf16`` or ``fp16`` that the device emulates warns
    once (the same warning as a forced LLM dtype).
    """
    device_type = _device_type(device)
    if setting != "auto":
        dtype = _MIXED_TO_DTYPE.get(setting or "")
        if dtype is None:
            return setting, f"train.mixed_precision={setting} (set in the config)"
        return setting, _forced(dtype, device_type, f"train.mixed_precision={setting}")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != "no":
        return launcher, f"auto: {launcher}, set by the launcher (ACCELERATE_MIXED_PRECISION)"
    if llm_dtype == "float32":
        return "no", "auto: no autocast, model.llm.dtype is pinned to float32"
    cap = capability(device_type)
    if cap.bfloat16:
        return "bf16", f"auto: bf16 autocast, {device_type}: {cap.reason}"
    if cap.float16 and device_type != "cpu":  # accelerate has no fp16 autocast on a CPU
        return "fp16", f"auto: fp16 autocast, {device_type}: {cap.reason}"
    return "no", f"auto: no autocast, {device_type}: {cap.reason}"


def precision_record(llm_dtype: torch.dtype | str, llm_reason: str, mixed_precision: str | None,
                     mixed_reason: str) -> dict[str, str]:
    """The ``precision`` entry of ``metrics.json``."""
    name = str(llm_dtype).removeprefix("torch.")
    return {"llm_dtype": name, "mixed_precision": str(mixed_precision or "no"),
            "reason": f"LLM {name}: {llm_reason}; autocast {mixed_precision or 'no'}: {mixed_reason}"}


def run_precision(llm: Any, accelerator: Any, mixed_precision: str | None, llm_dtype: str = "auto") -> dict[str, str]:
    """The ``precision`` record of a run: the loaded LLM's dtype and why (``llm``: a
    :class:`allspark.llm.LoadedLLM`), and the autocast ``accelerator`` runs with for the ``mixed_precision``
    setting, and why."""
    mode, why = resolve_mixed_precision(mixed_precision, accelerator.device, llm_dtype)
    actual = accelerator.mixed_precision
    if (actual or "no") != (mode or "no"):
        why = f"{why}; accelerate runs {actual}"
    return precision_record(llm.dtype, llm.dtype_reason, actual, why)
