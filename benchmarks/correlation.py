#!/usr/bin/env python
"""Forward + backward time of every correlation objective (the source's ``testHGR.py``).

Random paired features ``f, g`` of shape [B, d] (float32, ``requires_grad``) for B in 64..8192 and d in
64..2048; each cell is timed as the mean over repeats of ``objective.loss(f, g).backward()`` after one
warm-up call. The cca-zoo package's ``CCALoss`` (optional extra ``allspark[bench]``) is timed beside our
Deep CCA as the reference peer. Results: a table on stdout, ``benchmarks/results/correlation.json`` and a
log-log plot ``benchmarks/results/correlation.png``. Nothing here is a pass/fail test.

The CPU may be shared, so the run is bounded: a cell whose mean exceeds ``--cell-limit`` seconds marks
every larger cell (B' >= B and d' >= d) of that objective as skipped, with a printed note, and the whole
run stops timing new cells after ``--budget`` seconds.

    python benchmarks/correlation.py                                   # full grid
    python benchmarks/correlation.py --batch-sizes 64 4096 --dims 64 512 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.objectives import build_objective  # noqa: E402

OBJECTIVES = ["soft_hgr", "unifast_hgr", "optfast_hgr", "deep_cca", "soft_cca", "cosine", "dot"]
REFERENCE = "cca_zoo_CCALoss"


def loss_functions(reg: float) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    funcs: dict[str, Callable] = {}
    for name in OBJECTIVES:
        args = {"reg": reg} if name == "deep_cca" else {}
        obj = build_objective({"type": name, **args})
        obj.train()
        funcs[name] = obj.loss
    try:
        from cca_zoo.deep.objectives import CCALoss
    except ImportError:
        print("note: cca-zoo is not installed (pip install 'allspark[bench]'); its CCALoss is not timed")
    else:
        ref = CCALoss(reg_covar=reg)
        funcs[REFERENCE] = lambda f, g: ref([f, g])
    return funcs


def time_cell(fn, b: int, d: int, repeats: int, cell_limit: float, seed: int = 0) -> tuple[float, int]:
    """Mean seconds of forward + backward over up to ``repeats`` runs (fewer if one run is slow)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=gen).requires_grad_(True)
    g = (0.5 * f.detach() + torch.randn(b, d, generator=gen)).requires_grad_(True)

    def once() -> float:
        f.grad = g.grad = None
        t0 = time.perf_counter()
        fn(f, g).backward()
        return time.perf_counter() - t0

    first = once()  # warm-up (allocations, kernel selection)
    if first > cell_limit:
        return first, 1
    times = []
    for _ in range(repeats):
        times.append(once())
        if sum(times) > cell_limit:
            break
    return sum(times) / len(times), len(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--objectives", nargs="+", default=None, help="subset of objectives (default: all + cca-zoo)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cell-limit", type=float, default=20.0, help="seconds; slower cells skip larger ones")
    p.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run")
    p.add_argument("--reg", type=float, default=1e-3, help="ridge of both Deep CCA implementations")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 (default) keeps timings stable on a shared CPU, 0 = torch's")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "correlation")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    funcs = loss_functions(args.reg)
    if args.objectives:
        unknown = sorted(set(args.objectives) - set(funcs))
        if unknown:
            p.error(f"unknown objective(s) {unknown}; choose from {sorted(funcs)}")
        funcs = {k: v for k, v in funcs.items() if k in args.objectives}
    bs, ds = sorted(args.batch_sizes), sorted(args.dims)
    results: dict[str, dict[str, dict]] = {name: {} for name in funcs}
    start = time.perf_counter()
    notes = []
    for name, fn in funcs.items():
        too_slow: list[tuple[int, int]] = []
        for d in ds:
            for b in bs:
                key = f"{b}x{d}"
                if any(b >= b0 and d >= d0 for b0, d0 in too_slow):
                    results[name][key] = {"skipped": "a smaller cell exceeded --cell-limit"}
                    continue
                if time.perf_counter() - start > args.budget:
                    results[name][key] = {"skipped": "--budget exhausted"}
                    continue
                try:
                    mean, n = time_cell(fn, b, d, args.repeats, args.cell_limit)
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory
                    results[name][key] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
                    continue
                results[name][key] = {"seconds": mean, "repeats": n}
                if mean > args.cell_limit:
                    too_slow.append((b, d))
                    note = f"note: {name} at B={b}, d={d} took {mean:.1f} s > {args.cell_limit} s; skipping larger cells"
                    print(note, flush=True)
                    notes.append(note)
            print(f"{name:18s} d={d:5d} done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    table = format_table(results, bs, ds)
    print(table)
    ratios = speed_ratios(results)
    for k, v in ratios.items():
        print(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "unit": "seconds per forward+backward (mean over repeats)", "dtype": "float32 inputs",
        "batch_sizes": bs, "dims": ds, "reg": args.reg, "results": results, "ratios": ratios, "notes": notes,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "processor": platform.processor(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    plot(results, bs, ds, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


def _seconds(results, name, b, d):
    cell = results.get(name, {}).get(f"{b}x{d}", {})
    return cell.get("seconds")


def format_table(results, bs, ds) -> str:
    """Markdown table: one row per (B, d), one column per objective, milliseconds."""
    names = list(results)
    lines = ["| B | d | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d in ds:
        for b in bs:
            cells = []
            for n in names:
                s = _seconds(results, n, b, d)
                cells.append("skip" if s is None else f"{1000 * s:.2f}")
            lines.append(f"| {b} | {d} | " + " | ".join(cells) + " |")
    return "(milliseconds per forward+backward)\n" + "\n".join(lines)


def speed_ratios(results, b: int = 4096, d: int = 512) -> dict[str, float | None]:
    """Time ratios at (b, d): ours / cca-zoo for Deep CCA and Soft-HGR / Deep CCA (< 1 = faster)."""
    def ratio(a, c):
        ta, tc = _seconds(results, a, b, d), _seconds(results, c, b, d)
        return None if ta is None or tc is None else ta / tc

    return {f"deep_cca/{REFERENCE} time at B={b},d={d}": ratio("deep_cca", REFERENCE),
            f"soft_hgr/deep_cca time at B={b},d={d}": ratio("soft_hgr", "deep_cca")}


def plot(results, bs, ds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_fix = 512 if 512 in ds else ds[len(ds) // 2]
    b_fix = 4096 if 4096 in bs else bs[len(bs) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in results:
        xs = [b for b in bs if _seconds(results, name, b, d_fix) is not None]
        axes[0].loglog(xs, [_seconds(results, name, b, d_fix) for b in xs], "o-", label=name)
        xs = [d for d in ds if _seconds(results, name, b_fix, d) is not None]
        axes[1].loglog(xs, [_seconds(results, name, b_fix, d) for d in xs], "o-", label=name)
    axes[0].set(xlabel="batch size B", ylabel="seconds (forward+backward)", title=f"d = {d_fix}")
    axes[1].set(xlabel="feature dimension d", ylabel="seconds (forward+backward)", title=f"B = {b_fix}")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
