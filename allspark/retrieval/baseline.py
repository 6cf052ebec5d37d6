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

    from allspark.data import build_dataset, build_loader, loader_options, resolve_data_root
    from allspark.distributed import make_accelerator
    from allspark.evaluation import build_evaluator, collect_predictions
    from allspark.model import AllSpark

    accelerator = make_accelerator()
    set_seed(cfg.seed)
    root = resolve_data_root(cfg)
    info = build_dataset(cfg, "train", root).info()
    model = AllSpark(cfg, info)
    dataset = build_dataset(cfg, split, root)
    evaluator = build_evaluator(cfg, info)
    loader = build_loader(dataset, cfg.data.eval_batch_size, **loader_options(cfg.data, accelerator.device))
    model, loader = accelerator.prepare(model, loader)
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
