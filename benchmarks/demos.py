#!/usr/bin/env python
"""Train every task on its built-in demo dataset with the config's defaults and print one table.

    python benchmarks/demos.py --out runs/demos                          # every config in configs/
    python benchmarks/demos.py --out runs/demos --modalities hsi,rgb,table

Per task: ``python train.py --modality M --output-dir OUT/M`` (the config's ``demo:`` block and defaults, the
default LLM, precision ``auto``), timed, logged to ``OUT/logs/M.log``. ``train.py`` ends with the test pass of
``best/``, which also fits and scores the config's classical baselines on the same test split; the row takes
the model's headline metric (``main_metric`` of ``metrics.json``) and the best non-probe baseline on it (the
same logic as ``benchmarks/real/run.py``). The table and the rows are saved as ``OUT/demos.md`` and
``OUT/demos.json``, with the machine (CPU, torch threads) they were measured on. Runs go one after another:
never run two at once on a small machine (bf16 matrix kernels slow down ~10x when oversubscribed).
Exit status: 0 when every task trained, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "real"))

from run import _clock, _fmt, _last_line, _run, best_classical, run_metric  # noqa: E402


def modalities() -> list[str]:
    return sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def run_task(modality: str, out: Path, extra: list[str], recipe: str | None = None) -> dict[str, Any]:
    run_dir, logs = out / modality, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), "--modality", modality, "--output-dir", str(run_dir),
           *(["--recipe", recipe] if recipe else []), *extra]
    log = logs / f"{modality}.log"
    print(f"[{modality}] training ...", flush=True)
    rc, seconds = _run(cmd, log)
    row: dict[str, Any] = {"modality": modality, "seconds": round(seconds, 1), "status": "ok", "metric": None,
                           "greater_is_better": None, "model": None, "baseline": None, "baseline_name": None,
                           "precision": None}
    if rc != 0:
        row["status"] = f"train.py exit {rc}: {_last_line(log)}"
        return row
    metrics, name, greater, _ = run_metric(run_dir)
    row.update(metric=name, greater_is_better=greater, model=metrics.get(name), precision=metrics.get("precision"))
    best = best_classical(metrics.get("baselines"), name, greater)
    if best is not None:
        row["baseline_name"], row["baseline"] = best
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | model | best classical baseline | wall time (train + test) |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| `{r['modality']}` | failed: {r['status']} | - | {_clock(r['seconds'])} |")
            continue
        arrow = " (higher is better)" if r["greater_is_better"] else " (lower is better)"
        base = f"{_fmt(r['baseline'])} ({r['baseline_name']})" if r["baseline"] is not None else "-"
        lines.append(f"| `{r['modality']}` | {r['metric']} {_fmt(r['model'])}{arrow} | {base} | "
                     f"{_clock(r['seconds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run folders, logs and the table go here")
    p.add_argument("--modalities", help=f"comma-separated subset of: {', '.join(modalities())} (default: all)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every task")
    p.add_argument("--recipe", help="a recipe of every task's config (train.py --recipe), e.g. 'answers'")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else modalities()
    unknown = [m for m in names if m not in modalities()]
    if unknown or not names:
        print(f"error: unknown modality {unknown or args.modalities!r}; choose from {', '.join(modalities())}",
              file=sys.stderr)
        return 2
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    rows = []
    for m in names:
        rows.append(run_task(m, args.out, list(args.extra), args.recipe))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    (args.out / "demos.md").write_text(f"# Demo runs\n\nmachine: {machine}\n\n{table}\n")
    (args.out / "demos.json").write_text(json.dumps({"machine": machine, "extra": args.extra, "recipe": args.recipe, "rows": rows},
                                                    indent=2) + "\n")
    print(table)
    print(f"\n(saved {args.out / 'demos.md'} and {args.out / 'demos.json'})")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
