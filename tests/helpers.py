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
