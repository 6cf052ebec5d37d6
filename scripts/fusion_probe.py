#!/usr/bin/env python
"""Linear probes of a trained fusion model: how much of the class its representations carry.

For each representation -- ``encoders`` (each encoder's tokens mean-pooled, concatenated), ``bridge`` (mean of
the bridge tokens entering the LLM) and ``last`` (the LLM's last-token state) -- a multinomial logistic
regression (L2, LBFGS) is fitted on the labelled training pixels (features standardised on them) and scored
on the test pixels; the model's own test OA is printed beside them. The gap between the probes locates
where the model loses what its encoders know:

    python scripts/fusion_probe.py runs/hsi+lidar/best            # encoders, bridge, last + the model's OA
    python scripts/fusion_probe.py runs/hsi+lidar/best --encoders-only   # no LLM forward: fast
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.data import build_dataset  # noqa: E402
from allspark.model import AllSpark  # noqa: E402


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1.0, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression: minimises mean cross-entropy + ``l2`` / (2 n) * ||W||^2 (the
    ``C = 1 / l2`` convention of scikit-learn's LogisticRegression) with LBFGS."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_probe: expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    lin = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    x, n = x.double(), x.shape[0]
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 / (2 * n) * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


@torch.no_grad()
def representations(model: AllSpark, split: str, with_llm: bool, batch_size: int = 256) -> dict[str, torch.Tensor]:
    if not len(model.encoders):
        raise ValueError("the model has no modality encoder to probe")
    ds = build_dataset(model.cfg, split)
    if not isinstance(getattr(ds, "labels", None), torch.Tensor):
        raise ValueError(f"{type(ds).__name__} has no per-sample label tensor (the probes need a classification set)")
    keep = (ds.labels >= 0).nonzero().flatten().tolist()
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(keep), batch_size):
        batch = ds.collate([ds[i] for i in keep[start:start + batch_size]])
        token_sets = model.encode_tokens(batch)
        out.setdefault("encoders", []).append(torch.cat([t.mean() for t in token_sets], dim=-1).float())
        out.setdefault("label", []).append(batch["label"])
        if with_llm:
            llm_out = model.run_llm(batch, token_sets)
            out.setdefault("bridge", []).append(llm_out.pool("bridge").float())
            out.setdefault("last", []).append(llm_out.pool("last").float())
            out.setdefault("pred", []).append(model.head(llm_out, batch).predictions["pred"])
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a best/ folder of a fusion run")
    p.add_argument("--encoders-only", action="store_true", help="probe the encoders only (no LLM forward)")
    p.add_argument("--l2", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        model = AllSpark.from_pretrained(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    model.eval()
    try:
        train = representations(model, "train", not args.encoders_only)
        test = representations(model, "test", not args.encoders_only)
    except ValueError as exc:
        p.error(f"{args.checkpoint}: {exc}")
    num_classes = int(model.info.get("num_classes", int(train["label"].max()) + 1))
    result: dict[str, float] = {}
    if "pred" in test:
        result["model"] = float((test["pred"] == test["label"]).double().mean())
    for name in ("encoders", "bridge", "last"):
        if name not in train:
            continue
        mean, std = train[name].mean(0), train[name].std(0) + 1e-6
        probe = fit_probe((train[name] - mean) / std, train["label"], num_classes, l2=args.l2)
        pred = probe(((test[name] - mean) / std).double()).argmax(-1)
        result[f"probe:{name}"] = float((pred == test["label"]).double().mean())
    print(json.dumps({"checkpoint": str(args.checkpoint), "test_OA": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
