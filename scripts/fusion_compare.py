#!/usr/bin/env python
"""Fusion with a correlation objective vs. fusion without it vs. each single modality, on a fusion task.

Trains the same config four (or more) times, changing only the encoders / the alignment block, and prints
the test OA / AA / kappa of each run as a markdown table (also written to ``OUT/comparison.json``):

    python scripts/fusion_compare.py --modality hsi+sar --out /tmp/cmp model.llm.name=tiny
    python scripts/fusion_compare.py --modality hsi+lidar --out /tmp/cmp --objectives soft_hgr deep_cca

Extra ``key=value`` arguments are config overrides applied to every run (e.g. the tiny LLM for speed); put
them before ``--seeds`` / ``--objectives`` (which take several values) or after ``--``:

    python scripts/fusion_compare.py --modality hsi+sar --out /tmp/cmp --seeds 0 1 2 -- model.llm.name=tiny

``--pretrain-epochs N`` gives the objective runs an alignment-only first stage of N epochs (the objective alone
on the encoders, the bridge at ``model.alignment.level=bridge``, and the projections at weight 1: no label, no
LLM; ``model.alignment.task_weight=0``) before
the usual training; add ``model.alignment.weight=0`` to the overrides to train the second stage on the task loss alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.config import load_config, to_dict  # noqa: E402
from allspark.training import train  # noqa: E402


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--objectives", nargs="+", default=["soft_hgr"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--skip-baselines", action="store_true",
                   help="run only the fusion + objective runs (e.g. to sweep model.alignment.weight)")
    p.add_argument("--skip-singles", action="store_true",
                   help="skip the single-modality runs, keep the fusion control (e.g. to sweep demo settings)")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="alignment-only pre-training stage of this many epochs before each objective run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    base = load_config(args.modality, overrides=args.overrides)
    encoders = to_dict(base.model.encoders)
    runs: dict[str, list[str]] = {}
    for i, enc in enumerate([] if args.skip_baselines or args.skip_singles else encoders):
        runs[f"single:{enc['args'].get('key', enc['type'])}"] = [
            f"model.encoders={yaml.safe_dump([enc], default_flow_style=True).strip()}", "model.alignment.objective=null",
            "train.stages=[]"]
    if not args.skip_baselines:
        # The control keeps the objective's projections (so initialisation and every random stream are the
        # same as in the runs with the objective) but gives the objective weight 0: the only difference
        # between it and "fusion + X" is the objective (its term in the loss, and the alignment-only
        # pre-training stage where the config has one: the control and the singles train in one stage).
        runs["fusion (no objective)"] = [f"model.alignment.objective={args.objectives[0]}",
                                         "model.alignment.weight=0", "train.stages=[]"]
    pretrain = []
    if args.pretrain_epochs > 0:
        # The bridge only trains there with model.alignment.level=bridge (otherwise the stage does not run it).
        n = args.pretrain_epochs
        pretrain = [
            "train.stages=[{name: align, overrides: {model.alignment.task_weight: 0, model.alignment.weight: 1.0, "
            f"train.train_only: ['encoders.*', 'alignment_proj.*', 'bridge.*'], train.epochs: {n}, train.eval_every_epochs: {n}, "
            "train.test_at_end: false}}, {name: fuse, overrides: {}}]"]
    for obj in args.objectives:
        name = f"fusion + {obj}" + (f" (pre-trained {args.pretrain_epochs} epochs)" if pretrain else "")
        runs[name] = [f"model.alignment.objective={obj}", *pretrain]
    results = {}
    for name, extra in runs.items():
        for seed in args.seeds:
            cfg = load_config(args.modality, overrides=[*args.overrides, *extra, f"seed={seed}"])
            tag = name.replace(" ", "_").replace(":", "-").replace("(", "").replace(")", "").replace("+", "plus")
            metrics = train(cfg, args.out / f"{tag}-seed{seed}")
            _reset_accelerate()
            results.setdefault(name, []).append({k: metrics[k] for k in ("OA", "AA", "kappa")})
            print(f"{name} seed {seed}: OA {metrics['OA']:.4f}", flush=True)
    lines = ["| run | OA | AA | kappa |", "|---|---|---|---|"]
    for name, rs in results.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("OA", "AA", "kappa")}
        lines.append(f"| {name} | {mean['OA']:.4f} | {mean['AA']:.4f} | {mean['kappa']:.4f} |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps({"modality": args.modality, "overrides": args.overrides,
                                                          "seeds": args.seeds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
