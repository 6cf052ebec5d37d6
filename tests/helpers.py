"""Helpers shared by the tests (kept out of conftest so subprocess scripts can import them too)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: shrink the HSI config to test size: tiny random LLM, small encoder and bridge
TINY_HSI = [
    "model.llm.name=tiny",
    "model.encoders.0.args={in_bands: 103, dim: 16, depth: 1, heads: 2, bands_per_token: 8}",
    "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "train.epochs=2",
    "train.warmup_epochs=0.5",
    "train.lr=3e-3",
    # the defaults of the design (the HSI demo block changes both): last-token pooling, random prompts
    "model.head.args.pooling=last",
    "model.prompts.train_choice=random",
    # no scene map (every one of the demo scene's 1600 pixels, after each test pass): the tests that check it set
    # eval.args.scene_map=true (tests/test_training.py, tests/test_predict.py; tests/test_sequence.py tiles it)
    "eval.args.scene_map=false",
]


def free_port() -> int:
    """A TCP port that is free now (the OS picks it: bind to port 0), for a torchrun ``--master_port``, so
    concurrent test runs on one machine do not collide on a fixed port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], *, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", "")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env["PYTHONPATH"]) if p)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args] if args[0].endswith(".py") or args[0] == "-m" else args,
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _entry(args: list[str]):
    """The entry function behind the script ``run(args)`` starts (``train.py``, ``evaluate.py``,
    ``-m allspark ...``), called with the rest of ``args``: for ``run_inprocess``."""
    from allspark import cli

    if args[0] == "train.py":
        return lambda: cli.train_main(args[1:])
    if args[0] == "evaluate.py":
        return lambda: cli.evaluate_main(args[1:])
    if args[:2] == ["-m", "allspark"]:
        return lambda: cli.main(args[2:])
    raise ValueError(f"run_inprocess: not an allspark entry point: {args[:2]}")


def run_inprocess(args: list[str], *, env: dict | None = None, cwd: Path = ROOT,
                  threads: int | None = None) -> subprocess.CompletedProcess:
    """``run(args)`` without the subprocess, for tests whose subject is the code behind ``train.py``,
    ``evaluate.py`` or ``python -m allspark ...``, not the process boundary: the same entry function under the same
    ``allspark.cli.run_cli`` wrapper (its one-line ``error: ...`` and exit status 2 for user errors), in this process,
    with accelerate's singletons reset before and after. Returns what ``run`` returns: the exit status (``SystemExit``'s
    code; 1 and the traceback on stderr for an exception that escapes ``run_cli``, as the interpreter does), stdout and
    stderr. ``env`` is set for the call and restored after; ``threads`` sets torch's intra-op thread count for the
    call (what ``OMP_NUM_THREADS`` sets in a subprocess). Log records go to pytest's log capture, not stderr."""
    import contextlib
    import io
    import logging
    import traceback

    import torch

    from allspark.cli import run_cli

    fn = _entry(list(args))
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level
             for name in ("accelerate.checkpointing", "accelerate.accelerator", "httpx")}
    saved_threads = torch.get_num_threads()
    saved_cwd = os.getcwd()
    code = 0
    reset_accelerate()
    try:
        os.environ.update(env or {})
        if threads is not None:
            torch.set_num_threads(threads)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(fn)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)  # argparse / sys.exit("message"), as the interpreter prints
            except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                code = 1
                traceback.print_exc(file=sys.stderr)
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)
        reset_accelerate()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def fit_one_batch(model, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """Train ``model``'s trainable parameters on one batch with AdamW; the loss of every step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def majority_share(metrics: dict) -> float:
    """The accuracy of always predicting the evaluated split's commonest class, from the classification metrics'
    ``support``: the most that a model predicting one constant class (e.g. a head whose input is zero) reaches on
    OA / top1. End-to-end tests assert the trained model clears it by a margin."""
    support = metrics["support"]
    return max(support.values()) / sum(support.values())


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons (state, gradient state), so the next Accelerator starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
