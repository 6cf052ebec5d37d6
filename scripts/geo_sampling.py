#!/usr/bin/env python
"""LuoJiaHOG hierarchical spatial sampling on a table of candidate locations (allspark/retrieval/sampling.py).

Reads a CSV with coordinates (``x``/``y`` or ``lon``/``lat``), a land-use class column and optionally a
night-light column; prints global Moran's I (z, p), writes one row per location with local Moran's I, Gi*,
the region and whether it was selected, and the allocation (Eq. 10-11) as JSON:

    python scripts/geo_sampling.py candidates.csv --budget 200 --value nightlight --out /tmp/plan
    python scripts/geo_sampling.py candidates.csv --budget 50 --region-column region --method distance_band \\
        --threshold 1.0 --transform none

Outputs: ``OUT/locations.csv`` (the input columns plus the computed ones and ``selected``) and
``OUT/plan.json`` (statistics, per-region and per-class counts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.retrieval.sampling import plan_sampling  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", help="CSV of candidate locations")
    ap.add_argument("--budget", type=int, required=True, help="total number of samples N")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--class-column", default="class")
    ap.add_argument("--value", dest="value_column", default=None, help="night-light column (enables Moran/Gi*)")
    ap.add_argument("--region-column", default=None, help="regions from this column instead of Eq. 8")
    ap.add_argument("--area-column", default=None, help="area per location (default: --unit-area each)")
    ap.add_argument("--unit-area", type=float, default=1.0)
    ap.add_argument("--method", choices=("knn", "distance_band"), default="knn")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=None, help="distance band (coordinate units, or km for lon/lat)")
    ap.add_argument("--gamma", type=float, default=0.0, help="inverse-distance power of Eq. 1 (0: binary)")
    ap.add_argument("--transform", choices=("row", "none"), default="row")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import pandas as pd

    frame = pd.read_csv(args.table)
    result = plan_sampling(frame, args.budget, class_column=args.class_column, value_column=args.value_column,
                           region_column=args.region_column, area_column=args.area_column, unit_area=args.unit_area,
                           method=args.method, k=args.k, threshold=args.threshold, gamma=args.gamma,
                           transform=args.transform, alpha=args.alpha, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = frame.copy()
    for name, col in result["columns"].items():
        table[name] = col
    table["selected"] = np.isin(np.arange(len(frame)), result["selected"])
    table.to_csv(out / "locations.csv", index=False)
    summary = {"n": result["n"], "budget": args.budget, "global_moran": result.get("global_moran"),
               "plan": result["plan"], "selected_rows": result["selected"].tolist()}
    (out / "plan.json").write_text(json.dumps(summary, indent=2))
    gm = result.get("global_moran")
    if gm:
        print(f"global Moran's I = {gm['I']:.4f} (E = {gm['expected']:.4f}, z = {gm['z']:.3f}, p = {gm['p']:.4g}, "
              f"{gm['assumption']})")
    for region, entry in result["plan"].items():
        classes = ", ".join(f"{c}: {v['N']}" for c, v in entry["classes"].items())
        print(f"region {region!r}: N = {entry['N']} (rLSI {entry['rLSI']:.4f}, area {entry['area']:g}) -> {classes}")
    print(f"wrote {out / 'locations.csv'} and {out / 'plan.json'}")
    return summary


if __name__ == "__main__":
    main()
