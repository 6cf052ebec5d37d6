"""Test metrics of the *untrained* model (the reference the trained retrieval model must beat).

The model is built exactly as ``train.py`` builds it (seeded the same way: same initial weights), and the
split is scored by the configured evaluator::

    python -m allspark.retrieval.baseline --modality rgb-text [--output metrics.json] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["untrained_metrics", "main"]


def untrained_metrics(cfg, split: str = "test") -> dict[str, Any]:
    from accelerate.utils import set_seed

    from allspark.distributed import make_accelerator
    from allspark.evaluation import collect_predictions
    from allspark.model import AllSpark
    from allspark.run import build_run

    accelerator = make_accelerator()
    set_seed(cfg.seed)
    # the training split for the data info (the model is built on it as train.py builds it), the scored split
    run = build_run(cfg, splits=list(dict.fromkeys(("train", split))), accelerator=accelerator,
                    model=lambda run: AllSpark(run.cfg, run.info), loaders="eval")
    model, loader = accelerator.prepare(run.model, run.loaders[split])
    evaluator = run.evaluator
    gathered = collect_predictions(model, loader, accelerator, evaluator.pred_keys, evaluator.batch_keys, split)
    return {"split": split, "untrained": True, **evaluator.compute(gathered)}


def main(argv: Sequence[str] | None = None) -> int:
    from allspark.config import load_config

    p = argparse.ArgumentParser(prog="python -m allspark.retrieval.baseline", description=__doc__)
    p.add_argument("--modality", default="rgb-text")
    p.add_argument("--split", default="test")
    p.add_argument("--output", type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.modality, overrides=args.overrides)
    metrics = untrained_metrics(cfg, args.split)
    text = json.dumps(metrics, indent=2, default=float)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    from allspark.cli import run_cli

    run_cli(main)
