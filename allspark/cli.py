"""Command-line entry points: ``train.py``, ``evaluate.py`` and ``python -m allspark list``.

Errors a user can cause (a bad path, config key, modality or data file) end with one clear line on
stderr and exit status 2, not a traceback; ``ALLSPARK_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from allspark.config import ConfigError

__all__ = ["train_main", "evaluate_main", "list_main", "run_cli"]

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, KeyError, ValueError, ImportError)


def run_cli(fn: Callable[[], int | None]) -> None:
    logging.basicConfig(level=os.environ.get("ALLSPARK_LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # accelerate logs every file of every checkpoint at INFO; keep the console for the run itself.
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        if os.environ.get("ALLSPARK_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train AllSpark on one modality. Extra key.path=value arguments override the config.",
    )
    p.add_argument("--modality", required=True, help="modality name (see `python -m allspark list`)")
    p.add_argument("--config", type=Path, help="a YAML config to use instead of configs/<modality>.yaml")
    p.add_argument("--data-root", help="dataset folder in its official layout, or 'demo' (default: the config's)")
    p.add_argument("--output-dir", type=Path, help="run folder (default: runs/<modality>)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the newest checkpoint in the output dir, or from the given checkpoint dir")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--recipe", help="a training recipe of the config's `recipes` block, e.g. 'paper' (Table II of the "
                                    "paper, tuned for a 7B LLM on GPUs); default: the config's own values, sized "
                                    "for the configured LLM")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4 data.batch_size=16")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    from allspark.config import load_config
    from allspark.training import train

    args = _train_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.modality, path=args.config, overrides=overrides, data_root=args.data_root,
                      recipe=args.recipe)
    if cfg.modality != args.modality:
        raise ConfigError(f"--modality {args.modality!r} but the config is for {cfg.modality!r}")
    output_dir = args.output_dir or Path("runs") / args.modality
    resume = args.resume if args.resume in (None, True) else Path(args.resume)
    metrics = train(cfg, output_dir, resume=resume)
    _print_summary(metrics, output_dir / "metrics.json")
    return 0


def _print_summary(metrics: dict, path: Path) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process and metrics:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print("test metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()) + f"  ({path})")


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    from allspark.evaluate_run import evaluate_checkpoint

    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a trained AllSpark checkpoint.")
    p.add_argument("--modality", required=True)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder (its best/ is used) or a folder written by save_pretrained")
    p.add_argument("--data-root", help="dataset folder, or 'demo' (default: the checkpoint config's)")
    p.add_argument("--output-dir", type=Path, help="where metrics.json and report.md go (default: CHECKPOINT/eval)")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    metrics = evaluate_checkpoint(args.checkpoint, modality=args.modality, data_root=args.data_root,
                                  output_dir=args.output_dir, split=args.split)
    out = args.output_dir or (args.checkpoint / "eval")
    _print_summary(metrics, out / "metrics.json")
    return 0


def list_main(argv: Sequence[str] | None = None) -> int:
    import allspark
    from allspark.registry import DATASETS, ENCODERS, EVALUATORS, HEADS, METRICS, OBJECTIVES

    p = argparse.ArgumentParser(prog="python -m allspark", description="allspark utilities")
    p.add_argument("command", choices=["list"], help="list: show registered modalities and components")
    p.parse_args(argv)
    allspark.import_builtins()
    print("modalities: " + ", ".join(allspark.list_modalities()))
    for reg in (ENCODERS, HEADS, DATASETS, METRICS, EVALUATORS, OBJECTIVES):
        names = []
        for n in reg.list():
            src = reg.source(n)
            names.append(f"{n} [{src}]" if src.startswith("entry point") else n)
        print(f"{reg.name}: " + (", ".join(names) or "(none)"))
    return 0


def _train_entry() -> None:
    run_cli(train_main)


def _evaluate_entry() -> None:
    run_cli(evaluate_main)
