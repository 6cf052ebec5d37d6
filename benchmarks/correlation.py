#!/usr/bin/env python
"""Forward + backward time of every correlation objective against one B x B x d matmul (the source's ``testHGR.py``).

Random paired features ``f, g`` of shape [B, d] (float32, ``requires_grad``) on a grid of B and d. In each
cell the objectives' ``objective.loss(f, g).backward()`` and the reference product ``torch.mm(f, g.T)`` (one
[B, d] x [d, B] matmul, no gradient) are timed *interleaved* (round r times the matmul, then every objective
once), after one warm-up call each, so that all of them see the same load on a shared CPU. Each cell keeps the
minimum over the rounds (the least-disturbed run; the mean is saved too). With one thread (the default)
the clock is the thread's CPU time (``time.thread_time``: the work done, not the time other processes hold
the core; the wall-clock minimum is saved beside it), otherwise wall-clock time. Each cell reports:

- every objective's time and its ratio to the matmul of the cell (UniFast-HGR and OptFast-HGR are expected
  within 3x: their forward is that product or two smaller d x d ones, their backward two more of the same);
- UniFast-HGR / OptFast-HGR forward-only time (``torch.no_grad``, the score alone) and the form ``auto`` picked;
- the fastest *correlation* objective of the cell (the ``cosine`` / ``dot`` baselines are timed but not
  ranked: they have no decorrelation term);
- the same run's 2048^3 float32 matmul rate (GFLOP/s, measured before and after the grid) and the rate the
  cell's own matmul reaches (small d makes that product memory-bound, not compute-bound);
- the per-call cost of each objective at B=8, d=4 (Python and operator dispatch, independent of size), which
  bounds the ratio from below where the cell's matmul takes only tens of microseconds.

The cca-zoo package's ``CCALoss`` (optional extra ``allspark[bench]``) is timed beside our Deep CCA as the
reference peer. Results: tables on stdout, ``benchmarks/results/correlation.json`` and a plot
``benchmarks/results/correlation.png``. Nothing here is a pass/fail test.

The run is bounded: an objective whose warm-up call exceeds ``--cell-limit`` seconds keeps that single time
and every larger cell (B' >= B and d' >= d) of it is skipped, with a printed note; one that exceeds it over
its rounds stops early with fewer rounds; and no new cell starts after ``--budget`` seconds.

    OMP_NUM_THREADS=1 python benchmarks/correlation.py                      # default grid, ~2-3 min
    python benchmarks/correlation.py --batch-sizes 256 4096 --dims 64 1024 --repeats 3
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
BASELINES = ("cosine", "dot")  # timed, not ranked
FAST = ("unifast_hgr", "optfast_hgr")  # held to 3x of the matmul
MATMUL = "matmul"


def build(reg: float) -> tuple[dict[str, Callable], dict[str, torch.nn.Module]]:
    funcs: dict[str, Callable] = {}
    modules: dict[str, torch.nn.Module] = {}
    for name in OBJECTIVES:
        args = {"reg": reg} if name == "deep_cca" else {}
        obj = build_objective({"type": name, **args})
        obj.train()
        funcs[name] = obj.loss
        modules[name] = obj
    try:
        from cca_zoo.deep.objectives import CCALoss
    except ImportError:
        print("note: cca-zoo is not installed (pip install 'allspark[bench]'); its CCALoss is not timed")
    else:
        ref = CCALoss(reg_covar=reg)
        funcs[REFERENCE] = lambda f, g: ref([f, g])
    return funcs, modules


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """The best of ``repeats`` n^3 float32 matmuls, in GFLOP/s (2 n^3 flops each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        torch.mm(a, b)
        best = min(best, CLOCK() - t0)
    return 2 * n**3 / best / 1e9


def _pair(b: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=gen).requires_grad_(True)
    g = (0.5 * f.detach() + torch.randn(b, d, generator=gen)).requires_grad_(True)
    return f, g


CLOCK: Callable[[], float] = time.perf_counter  # set in main(): thread CPU time with one thread


def time_cell(funcs: dict[str, Callable], b: int, d: int, repeats: int, cell_limit: float) -> dict[str, dict]:
    """Interleaved timings of the cell: ``{name: {"seconds", "min_seconds", "repeats"}}`` plus ``matmul``
    (forward-only product) and ``<name>:forward`` (no-grad score) for the fast HGR objectives."""
    f, g = _pair(b, d)
    fd, gd = f.detach(), g.detach()

    def train_step(fn):
        def once():
            f.grad = g.grad = None
            fn(f, g).backward()
        return once

    def score_only(fn):
        def once():
            with torch.no_grad():
                fn(f, g)
        return once

    tasks: dict[str, Callable[[], None]] = {MATMUL: lambda: torch.mm(fd, gd.T)}
    for name, fn in funcs.items():
        tasks[name] = train_step(fn)
        if name in FAST:
            tasks[f"{name}:forward"] = score_only(fn)

    times: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    out: dict[str, dict] = {}
    for name, task in tasks.items():  # warm-up (allocations, kernel selection)
        try:
            t0, w0 = CLOCK(), time.perf_counter()
            task()
            first, wall = CLOCK() - t0, time.perf_counter() - w0
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory
            out[name] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        if wall > cell_limit:
            out[name] = {**_summary([first], [wall]), "warm_up_only": True}
        else:
            times[name], walls[name] = [], []
    for _ in range(repeats):
        for name in list(times):
            t0, w0 = CLOCK(), time.perf_counter()
            tasks[name]()
            times[name].append(CLOCK() - t0)
            walls[name].append(time.perf_counter() - w0)
            if sum(walls[name]) > cell_limit:
                out[name] = _summary(times.pop(name), walls.pop(name))
    for name, ts in times.items():
        out[name] = _summary(ts, walls[name])
    return out


def _summary(ts: list[float], walls: list[float]) -> dict:
    return {"seconds": sum(ts) / len(ts), "min_seconds": min(ts), "wall_min_seconds": min(walls),
            "repeats": len(ts)}


def call_overhead(funcs: dict[str, Callable], repeats: int = 50) -> dict[str, float]:
    """Best forward + backward seconds at B=8, d=4: the size-independent per-call cost."""
    out = {}
    f, g = _pair(8, 4)
    for name, fn in funcs.items():
        best = float("inf")
        for _ in range(repeats + 1):
            f.grad = g.grad = None
            t0 = CLOCK()
            fn(f, g).backward()
            best = min(best, CLOCK() - t0)
        out[name] = best
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--objectives", nargs="+", default=None, help="subset of objectives (default: all + cca-zoo)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cell-limit", type=float, default=2.0,
                   help="seconds; an objective slower than this in its warm-up skips its larger cells")
    p.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--reg", type=float, default=1e-3, help="ridge of both Deep CCA implementations")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 (default) keeps timings stable on a shared CPU, 0 = torch's")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "correlation")
    args = p.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    funcs, modules = build(args.reg)
    if args.objectives:
        unknown = sorted(set(args.objectives) - set(funcs))
        if unknown:
            p.error(f"unknown objective(s) {unknown}; choose from {sorted(funcs)}")
        funcs = {k: v for k, v in funcs.items() if k in args.objectives}
    bs, ds = sorted(args.batch_sizes), sorted(args.dims)
    gflops_before = matmul_gflops()
    print(f"2048^3 float32 matmul: {gflops_before:.1f} GFLOP/s ({torch.get_num_threads()} thread(s))", flush=True)
    overhead = call_overhead(funcs)
    results: dict[str, dict[str, dict]] = {}
    too_slow: dict[str, list[tuple[int, int]]] = {name: [] for name in funcs}
    start = time.perf_counter()
    notes: list[str] = []
    for d in ds:
        for b in bs:
            key = f"{b}x{d}"
            if time.perf_counter() - start > args.budget:
                for name in [MATMUL, *funcs]:
                    results.setdefault(name, {})[key] = {"skipped": "--budget exhausted"}
                continue
            active = {n: fn for n, fn in funcs.items()
                      if not any(b >= b0 and d >= d0 for b0, d0 in too_slow[n])}
            cell = time_cell(active, b, d, args.repeats, args.cell_limit)
            for name in funcs:
                if name not in active:
                    cell[name] = {"skipped": "a smaller cell exceeded --cell-limit"}
                elif cell.get(name, {}).get("warm_up_only"):
                    too_slow[name].append((b, d))
                    note = (f"note: {name} at B={b}, d={d} took {cell[name]['seconds']:.1f} s > {args.cell_limit} s "
                            "(one call timed); skipping larger cells")
                    print(note, flush=True)
                    notes.append(note)
            for name, value in cell.items():
                results.setdefault(name, {})[key] = value
            for name in FAST:
                if name in modules and name in funcs:
                    results.setdefault(f"{name}:form", {})[key] = {
                        "train": modules[name].chosen_form(b, d, 2), "score": modules[name].chosen_form(b, d, 0)}
            print(f"B={b:5d} d={d:5d} done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    gflops_after = matmul_gflops()
    ranked = [n for n in funcs if n not in BASELINES]
    ratios = ratios_to_matmul(results, [*funcs, *(f"{n}:forward" for n in FAST if n in funcs)], bs, ds)
    fastest = fastest_table(results, ranked, bs, ds)
    print(f"\n2048^3 float32 matmul: {gflops_before:.1f} GFLOP/s before the grid, {gflops_after:.1f} after")
    print("per-call cost at B=8, d=4 (ms): " + ", ".join(f"{n} {1000 * s:.3f}" for n, s in overhead.items()))
    print()
    print(format_times(results, list(funcs), bs, ds))
    print()
    print(format_ratios(results, ratios, bs, ds, gflops_before))
    print()
    print(format_fastest(fastest, results, bs, ds))
    summary = speed_ratios(results, bs, ds)
    for k, v in summary.items():
        print(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "unit": "seconds per forward+backward (min and mean over interleaved rounds; wall_min_seconds: "
                "wall clock); 'matmul' is one torch.mm([B,d], [d,B]) forward; '<name>:forward' the no-grad score",
        "clock": "thread CPU time (time.thread_time)" if CLOCK is time.thread_time else "wall (perf_counter)",
        "dtype": "float32 inputs", "batch_sizes": bs, "dims": ds, "reg": args.reg, "repeats": args.repeats,
        "matmul_2048_gflops": {"before": gflops_before, "after": gflops_after},
        "call_overhead_seconds_B8_d4": overhead,
        "results": results, "ratios_to_matmul": ratios, "fastest": fastest, "ratios": summary, "notes": notes,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "processor": platform.processor(), "cca_zoo": _cca_zoo_version(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    plot(results, ratios, bs, ds, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


def _cca_zoo_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("cca-zoo")
    except Exception:  # not installed, or installed without metadata
        return None


def _seconds(results, name, b, d):
    """The cell's best (minimum) time, or None where it was skipped."""
    return results.get(name, {}).get(f"{b}x{d}", {}).get("min_seconds")


def ratios_to_matmul(results, names, bs, ds) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in names:
        for d in ds:
            for b in bs:
                t, mm = _seconds(results, name, b, d), _seconds(results, MATMUL, b, d)
                if t is not None and mm:
                    out.setdefault(name, {})[f"{b}x{d}"] = t / mm
    return out


def fastest_table(results, names, bs, ds) -> dict[str, str]:
    out = {}
    for d in ds:
        for b in bs:
            timed = {n: _seconds(results, n, b, d) for n in names}
            timed = {n: t for n, t in timed.items() if t is not None}
            if timed:
                out[f"{b}x{d}"] = min(timed, key=timed.get)
    return out


def format_times(results, names, bs, ds) -> str:
    """Markdown table: one row per (B, d), one column per objective, milliseconds."""
    lines = ["| B | d | matmul | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for d in ds:
        for b in bs:
            cells = []
            for n in [MATMUL, *names]:
                s = _seconds(results, n, b, d)
                cells.append("skip" if s is None else f"{1000 * s:.2f}")
            lines.append(f"| {b} | {d} | " + " | ".join(cells) + " |")
    return "(milliseconds, best of the interleaved rounds; objectives forward+backward, matmul forward)\n" + \
        "\n".join(lines)


def format_ratios(results, ratios, bs, ds, gflops) -> str:
    cols = [n for n in ratios if not n.endswith(":forward")]
    fwd = [n for n in ratios if n.endswith(":forward")]
    head = ["B", "d", "matmul ms", "matmul GFLOP/s", *cols, *fwd, "forms (train/score)", "fast HGR <= 3x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in ds:
        for b in bs:
            key = f"{b}x{d}"
            mm = _seconds(results, MATMUL, b, d)
            if mm is None:
                continue
            cells = [str(b), str(d), f"{1000 * mm:.3f}", f"{2 * b * b * d / mm / 1e9:.1f}"]
            cells += [f"{ratios[n][key]:.2f}" if key in ratios.get(n, {}) else "skip" for n in cols + fwd]
            forms = [results.get(f"{n}:form", {}).get(key) for n in FAST]
            cells.append(" ".join(f"{f['train'][:4]}/{f['score'][:4]}" for f in forms if f))
            fast = [ratios.get(n, {}).get(key) for n in FAST]
            cells.append("-" if None in fast else ("yes" if max(fast) <= 3.0 else f"no ({max(fast):.2f}x)"))
            lines.append("| " + " | ".join(cells) + " |")
    return (f"(time / one [B,d]x[d,B] matmul of the cell; same-run 2048^3 matmul {gflops:.1f} GFLOP/s; "
            "':forward' = no-grad score; forms: gram = B x B, cova = d x d)\n" + "\n".join(lines))


def format_fastest(fastest, results, bs, ds) -> str:
    lines = ["| d \\ B | " + " | ".join(str(b) for b in bs) + " |", "|---|" + "---|" * len(bs)]
    for d in ds:
        lines.append(f"| {d} | " + " | ".join(fastest.get(f"{b}x{d}", "-") for b in bs) + " |")
    return "(fastest correlation objective per cell, forward+backward; cosine/dot baselines not ranked)\n" + \
        "\n".join(lines)


def speed_ratios(results, bs, ds) -> dict[str, float | None]:
    """At the largest cell where both were timed: ours / cca-zoo for Deep CCA, Soft-HGR / Deep CCA and
    UniFast-HGR / Deep CCA (time ratios, < 1 = faster)."""
    out: dict[str, float | None] = {}
    for a, c in (("deep_cca", REFERENCE), ("soft_hgr", "deep_cca"), ("unifast_hgr", "deep_cca")):
        cells = [(b, d) for d in ds for b in bs
                 if _seconds(results, a, b, d) is not None and _seconds(results, c, b, d) is not None]
        if not cells:
            out[f"{a}/{c} time"] = None
            continue
        b, d = max(cells, key=lambda bd: bd[0] * bd[1])
        out[f"{a}/{c} time at B={b},d={d}"] = _seconds(results, a, b, d) / _seconds(results, c, b, d)
    return out


def plot(results, ratios, bs, ds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_fix = ds[-1]
    b_fix = bs[-1]
    names = [n for n in results if ":" not in n]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name in names:
        style = "k--" if name == MATMUL else "o-"
        xs = [b for b in bs if _seconds(results, name, b, d_fix) is not None]
        axes[0].loglog(xs, [_seconds(results, name, b, d_fix) for b in xs], style, label=name)
        xs = [d for d in ds if _seconds(results, name, b_fix, d) is not None]
        axes[1].loglog(xs, [_seconds(results, name, b_fix, d) for d in xs], style, label=name)
    axes[0].set(xlabel="batch size B", ylabel="seconds (forward+backward)", title=f"d = {d_fix}")
    axes[1].set(xlabel="feature dimension d", ylabel="seconds (forward+backward)", title=f"B = {b_fix}")
    for name, marker in (("unifast_hgr", "o-"), ("optfast_hgr", "s--")):
        for i, d in enumerate(ds):
            xs = [b for b in bs if f"{b}x{d}" in ratios.get(name, {})]
            axes[2].semilogx(xs, [ratios[name][f"{b}x{d}"] for b in xs], marker, color=f"C{i}",
                             label=f"{name} d={d}")
    axes[2].axhline(3.0, color="k", lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set(xlabel="batch size B", ylabel="time / one [B,d]x[d,B] matmul",
                title="fast HGR forward+backward vs matmul (line: 3x)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
