#!/usr/bin/env python
"""One joint model over several tasks against the separate single-task models, on the demo data (issue 19).

    python benchmarks/joint.py --out runs/joint-bench                        # hsi, rgb, table, trajectory, text
    python benchmarks/joint.py --out runs/joint-bench --tasks hsi,table --parallel --threads 1

Runs ``train.py --modality T`` for every task and ``train.py --modality T1,T2,...
joint.schedule.type=run_length`` (every task drawn about as many optimizer steps as its own run takes; the same
seed), each as its own process (logs in ``OUT/logs/``), and prints one table: per task the test metric of the
joint model's ``best/`` beside its single-task model's and the best classical baseline of the same test split;
then parameters in the checkpoints (``best/model.safetensors``, counted tensor by tensor), their size on disk,
the peak resident memory of each training process (``os.wait4``'s ``ru_maxrss``: the frozen LLM is in each
single-task process once, in the joint one once for all tasks) and the wall times. Saved as ``OUT/joint.md``
and ``OUT/joint.json`` with the machine (CPU, torch capability, threads). ``--parallel`` runs the joint run
and the chain of single-task runs side by side (two processes; give each ``--threads`` torch threads): then wall
times are upper bounds of what either takes alone. Exit status: 0 when every run trained, 1 when one failed,
2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "real"))

from run import _clock, _fmt, _last_line, best_classical, run_metric  # noqa: E402

DEFAULT_TASKS = "hsi,rgb,table,trajectory,text"


def run_process(cmd: list[str], log: Path, threads: int | None) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log``; its exit status, wall seconds and peak RSS (MiB)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # Linux reports KiB


def checkpoint_stats(run_dir: Path) -> dict[str, Any]:
    """Tensor elements and bytes of ``best/model.safetensors``."""
    from safetensors import safe_open

    path = run_dir / "best" / "model.safetensors"
    count = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            count += _numel(f.get_slice(key).get_shape())
    return {"checkpoint_parameters": count, "checkpoint_bytes": path.stat().st_size}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def train_cmd(modalities: str, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO / "train.py"), "--modality", modalities, "--output-dir", str(run_dir)]
    if "," in modalities:
        cmd += ["joint.schedule.type=run_length", f"joint.seed={seed}"]
    return cmd + [f"seed={seed}", *extra]


def single_runs(tasks: list[str], out: Path, seed: int, extra: list[str], threads: int | None) -> dict[str, dict]:
    results = {}
    for task in tasks:
        run_dir = out / task
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{task}] training ...", flush=True)
        res = run_process(train_cmd(task, run_dir, seed, extra), out / "logs" / f"{task}.log", threads)
        if res["rc"] == 0:
            metrics, name, greater, _ = run_metric(run_dir)
            res.update(metric=name, greater_is_better=greater, value=metrics.get(name),
                       baseline=best_classical(metrics.get("baselines"), name, greater), **checkpoint_stats(run_dir))
        else:
            res["error"] = _last_line(out / "logs" / f"{task}.log")
        print(f"[{task}] {res}", flush=True)
        results[task] = res
    return results


def joint_run(tasks: list[str], out: Path, seed: int, extra: list[str], threads: int | None) -> dict[str, Any]:
    run_dir = out / "joint"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[joint {','.join(tasks)}] training ...", flush=True)
    res = run_process(train_cmd(",".join(tasks), run_dir, seed, extra), out / "logs" / "joint.log", threads)
    if res["rc"] != 0:
        res["error"] = _last_line(out / "logs" / "joint.log")
        return res
    metrics = json.loads((run_dir / "metrics.json").read_text())
    res.update(tasks=metrics["tasks"], steps_per_task=metrics.get("steps_per_task"),
               best_step=metrics.get("aggregate", {}).get("best_step"), steps=metrics.get("steps"),
               **checkpoint_stats(run_dir))
    print(f"[joint] done in {_clock(res['seconds'])}", flush=True)
    return res


def format_table(tasks: list[str], singles: dict[str, dict], joint: dict[str, Any]) -> str:
    lines = ["| task | metric | joint model | single-task model | best classical baseline |", "| --- | --- | --- | --- | --- |"]
    for t in tasks:
        s = singles.get(t, {})
        name = s.get("metric") or (joint.get("tasks", {}).get(t, {}).get("metric_for_best"))
        arrow = "" if s.get("greater_is_better") is None else (" (higher is better)" if s["greater_is_better"]
                                                                else " (lower is better)")
        jv = joint.get("tasks", {}).get(t, {}).get(name) if joint.get("rc") == 0 else None
        base = s.get("baseline")
        lines.append(f"| `{t}` | {name}{arrow} | {_fmt(jv) if jv is not None else 'failed'} | "
                     f"{_fmt(s.get('value')) if s.get('rc') == 0 else 'failed'} | "
                     f"{f'{_fmt(base[1])} ({base[0]})' if base else '-'} |")
    ok = [s for s in singles.values() if s.get("rc") == 0]
    lines += ["", "| | parameters in `best/model.safetensors` | its size | peak memory (RSS) | wall time |",
              "| --- | --- | --- | --- | --- |"]
    if joint.get("rc") == 0:
        lines.append(f"| one joint model | {joint['checkpoint_parameters']:,} | "
                     f"{joint['checkpoint_bytes'] / 1e6:.1f} MB | {joint['peak_rss_mib'] / 1024:.2f} GiB, one process | "
                     f"{_clock(joint['seconds'])} |")
    if ok:
        lines.append(f"| {len(ok)} single-task models | {sum(s['checkpoint_parameters'] for s in ok):,} | "
                     f"{sum(s['checkpoint_bytes'] for s in ok) / 1e6:.1f} MB | "
                     f"{' + '.join('%.2f' % (s['peak_rss_mib'] / 1024) for s in ok)} GiB, {len(ok)} processes | "
                     f"{_clock(sum(s['seconds'] for s in ok))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run folders, logs and the table go here")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", action="store_true", help="run the joint run beside the single-task chain")
    p.add_argument("--threads", type=int, default=None, help="torch threads per training process (OMP_NUM_THREADS)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    args = p.parse_args(argv)
    known = sorted(q.stem for q in (REPO / "configs").glob("*.yaml"))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in known]
    if len(tasks) < 2 or bad or len(set(tasks)) != len(tasks):
        print(f"error: --tasks needs two or more distinct task names from {', '.join(known)}; got {args.tasks!r}",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "cpu_capability":
               torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
               "threads_per_run": args.threads or torch.get_num_threads(), "parallel": args.parallel}
    singles: dict[str, dict] = {}
    joint: dict[str, Any] = {}
    if args.parallel:
        worker = threading.Thread(target=lambda: singles.update(
            single_runs(tasks, args.out, args.seed, args.extra, args.threads)))
        worker.start()
        joint = joint_run(tasks, args.out, args.seed, args.extra, args.threads)
        worker.join()
    else:
        singles = single_runs(tasks, args.out, args.seed, args.extra, args.threads)
        joint = joint_run(tasks, args.out, args.seed, args.extra, args.threads)
    table = format_table(tasks, singles, joint)
    (args.out / "joint.md").write_text(f"# Joint model vs single-task models\n\nmachine: {machine}\n\n{table}\n")
    (args.out / "joint.json").write_text(json.dumps({"machine": machine, "tasks": tasks, "seed": args.seed,
                                                      "extra": args.extra, "single": singles, "joint": joint},
                                                     indent=2, default=str) + "\n")
    print(table)
    print(f"\n(saved {args.out / 'joint.md'} and {args.out / 'joint.json'})")
    return 0 if joint.get("rc") == 0 and all(s.get("rc") == 0 for s in singles.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
