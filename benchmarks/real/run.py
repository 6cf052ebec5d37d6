#!/usr/bin/env python
"""Train and evaluate the model on each assembled real-data set (the README's commands) and print one table.

    python benchmarks/real/assemble.py --out data/real
    python benchmarks/real/run.py --data data/real --out runs/real
    python benchmarks/real/run.py --data data/real --out runs/real --sets digits --extra train.epochs=1
    python benchmarks/real/run.py --data data/real --out runs/real --smoke     # tiny random LLM, 2 steps

Per set: ``python train.py --modality M --data-root DATA/<set> --output-dir OUT/<set> <set overrides>
<--extra ...>`` (the set's overrides size the paper config for 2 CPU cores; see README.md), then
``python evaluate.py --modality M --checkpoint OUT/<set>``; both are timed and logged to ``OUT/logs/``.
``OUT/<set>`` is replaced. The table (task, data, model metric, best classical baseline, ratio, wall time)
is printed and saved as ``OUT/real_suite.md`` and ``OUT/real_suite.json``.

Metrics come from ``OUT/<set>/eval/metrics.json`` (else the training run's ``metrics.json``): the headline
metric is its ``main_metric`` / ``greater_is_better`` when written, else the run config's
``train.metric_for_best`` / ``train.greater_is_better``; the best classical baseline is the best, in that
direction, of the ``baselines`` entries that report that metric (probes of the trained model, marked
``probe: true``, are not classical and are left out). No baseline -> the table says so. ``ratio`` is model /
baseline. Exit status: 0 when every set trained and evaluated, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from assemble import SETS, parse_sets  # noqa: E402

#: --smoke: flags (before the positional overrides: argparse takes those in one block) and overrides
SMOKE_FLAGS = ["--max-steps", "2"]
SMOKE_OVERRIDES = ["model.llm.name=tiny", "train.epochs=1"]


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def run_metric(run_dir: Path) -> tuple[dict, str, bool, Path]:
    """(metrics, headline metric, greater is better, metrics file) of a finished run folder."""
    import yaml

    for path in (run_dir / "eval" / "metrics.json", run_dir / "metrics.json"):
        metrics = read_json(path)
        if metrics is not None:
            break
    else:
        raise ValueError(f"{run_dir} has neither eval/metrics.json nor metrics.json")
    name, greater = metrics.get("main_metric"), metrics.get("greater_is_better")
    if not isinstance(name, str) or not isinstance(greater, bool):
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise ValueError(f"{path} names no main_metric and {cfg_path} is missing")
        train = (yaml.safe_load(cfg_path.read_text()) or {}).get("train", {})
        name, greater = train.get("metric_for_best", "top1"), bool(train.get("greater_is_better", True))
    return metrics, name, greater, path


def best_classical(baselines: Any, metric: str, greater: bool) -> tuple[str, float] | None:
    """The best non-probe baseline on ``metric`` (max if greater is better, else min); None if none reports it."""
    if not isinstance(baselines, dict):
        return None
    scored = []
    for name, m in baselines.items():
        if not isinstance(m, dict) or m.get("probe"):
            continue
        v = m.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            scored.append((str(name), float(v)))
    if not scored:
        return None
    return (max if greater else min)(scored, key=lambda x: x[1])


def summarise(set_name: str, run_dir: Path, seconds: float | None, status: str = "ok") -> dict[str, Any]:
    """One table row for a set's run folder."""
    spec = SETS[set_name]
    row: dict[str, Any] = {"set": set_name, "task": f"{spec.modality} ({spec.stands_in_for} layout)",
                           "family": spec.family, "data": spec.data, "status": status, "seconds": seconds,
                           "metric": None, "greater_is_better": None, "model": None, "baseline": None,
                           "baseline_name": None, "ratio": None, "metrics_file": None}
    if status != "ok":
        return row
    metrics, name, greater, path = run_metric(run_dir)
    row.update(metric=name, greater_is_better=greater, metrics_file=str(path))
    value = metrics.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        row["model"] = float(value)
    else:
        row["status"] = f"{path.name} has no numeric {name!r}"
    if "baselines" not in metrics:
        row["baseline_name"] = "missing (metrics.json has no baselines)"
    else:
        best = best_classical(metrics["baselines"], name, greater)
        if best is None:
            row["baseline_name"] = f"missing (no classical baseline reports {name})"
        else:
            row["baseline_name"], row["baseline"] = best
            if row["model"] is not None and best[1] != 0:
                row["ratio"] = row["model"] / best[1]
    return row


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _clock(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)}:{int(round(s % 60)):02d}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | data | model metric | best classical baseline | ratio (model / baseline) | wall time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok" and r["model"] is None:
            model = f"failed: {r['status']}"
        else:
            arrow = "" if r["greater_is_better"] is None else (" (higher is better)" if r["greater_is_better"]
                                                               else " (lower is better)")
            model = f"{r['metric']} {_fmt(r['model'])}{arrow}"
        if r["baseline"] is not None:
            base = f"{_fmt(r['baseline'])} ({r['baseline_name']})"
        else:
            base = r["baseline_name"] or "-"
        lines.append(f"| {r['task']} | {r['set']}: {r['data']} | {model} | {base} | {_fmt(r['ratio'])} | "
                     f"{_clock(r['seconds'])} |")
    return "\n".join(lines)


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def run_set(name: str, data: Path, out: Path, extra: list[str], smoke: bool) -> dict[str, Any]:
    spec = SETS[name]
    root, run_dir, logs = data / name, out / name, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [sys.executable, str(REPO / "train.py"), "--modality", spec.modality, "--data-root", str(root),
             "--output-dir", str(run_dir), *(SMOKE_FLAGS if smoke else []), *spec.overrides,
             *(SMOKE_OVERRIDES if smoke else []), *extra]
    evaluate = [sys.executable, str(REPO / "evaluate.py"), "--modality", spec.modality,
                "--checkpoint", str(run_dir)]
    print(f"[{name}] training ({spec.modality}) ...", flush=True)
    rc, t_train = _run(train, logs / f"{name}-train.log")
    if rc != 0:
        return summarise(name, run_dir, t_train, f"train.py exit {rc}: {_last_line(logs / f'{name}-train.log')}")
    print(f"[{name}] evaluating ...", flush=True)
    rc, t_eval = _run(evaluate, logs / f"{name}-evaluate.log")
    if rc != 0:
        return summarise(name, run_dir, t_train + t_eval,
                         f"evaluate.py exit {rc}: {_last_line(logs / f'{name}-evaluate.log')}")
    row = summarise(name, run_dir, t_train + t_eval)
    row.update(train_seconds=round(t_train, 1), eval_seconds=round(t_eval, 1))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the folder written by assemble.py --out")
    p.add_argument("--out", required=True, type=Path, help="run folders, logs and the table go here")
    p.add_argument("--sets", help=f"comma-separated subset of: {', '.join(SETS)} (default: every assembled one)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every set (after the set's own)")
    p.add_argument("--smoke", action="store_true", help="tiny random LLM, 2 optimizer steps (checks the wiring)")
    args = p.parse_args(argv)
    try:
        names = parse_sets(args.sets) if args.sets else [n for n in SETS if (args.data / n).is_dir()]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [n for n in names if not (args.data / n).is_dir()]
    if not names or missing:
        print(f"error: {args.data} lacks the set folder(s) {missing or list(SETS)}; write them with "
              f"`python benchmarks/real/assemble.py --out {args.data}`", file=sys.stderr)
        return 2
    bad = [e for e in args.extra if "=" not in e]
    if bad:
        print(f"error: --extra takes key.path=value overrides, got {bad}", file=sys.stderr)
        return 2
    rows = [run_set(n, args.data, args.out, list(args.extra), args.smoke) for n in names]
    table = format_table(rows)
    header = "Real-data suite" + (" (smoke: tiny random LLM, 2 steps; numbers mean nothing)" if args.smoke else "")
    (args.out / "real_suite.md").write_text(f"# {header}\n\n{table}\n")
    (args.out / "real_suite.json").write_text(json.dumps({"smoke": args.smoke, "extra": args.extra, "rows": rows},
                                                         indent=2) + "\n")
    print(table)
    print(f"\n(saved {args.out / 'real_suite.md'} and {args.out / 'real_suite.json'})")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
