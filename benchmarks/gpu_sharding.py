#!/usr/bin/env python
"""GPU check of distributed training: HSI for a few optimizer steps under DDP, FSDP2 and DeepSpeed ZeRO-3
(``accelerate launch --config_file configs/accelerate/<strategy>.yaml train.py``) on the GPUs of this machine,
each compared with one single-process run of the same global batch.

Every run trains the tiny HSI model (the tiny random LLM unless ``--llm`` names another, float32 weights, no
autocast, the first prompt for every example, no dropout) for ``--steps`` optimizer steps and writes ``best/``
(validation at the last step, so ``best/`` holds the final weights). The distributed runs use ``--batch-size``
per process; the single-process reference uses ``num_processes x batch-size`` on one GPU. accelerate shards the
same seeded permutation into consecutive per-process batches, so one distributed step sees exactly the samples of
one reference step and the weights should agree up to floating-point reduction order. The table gives, per
strategy, the exit status, wall time, the largest absolute and relative difference of any trainable tensor of
``best/model.safetensors`` from the reference, and the validation and test OA of both; ``ok`` means the run
finished and its weights are within ``--atol`` (plus ``--rtol`` x |reference|) of the reference's.

    python benchmarks/gpu_sharding.py                                   # every strategy, all visible GPUs
    python benchmarks/gpu_sharding.py --strategies ddp,fsdp --steps 4 --num-processes 2
    python benchmarks/gpu_sharding.py --llm /models/Qwen2-0.5B --fsdp-layer Qwen2DecoderLayer

Without a CUDA GPU it prints why and exits 0 (nothing to check). The table is printed and saved as
``OUT/gpu_sharding.json`` and ``OUT/gpu_sharding.md`` (``--out``, default ``benchmarks/results``); the run folders
are kept with ``--keep-runs``. Exit status 1 when a requested strategy failed or its weights differ beyond the
tolerance. DeepSpeed needs ``pip install deepspeed``; without it that row says so and counts as skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]

#: strategy -> its accelerate config under configs/accelerate/
STRATEGIES = {"ddp": "ddp.yaml", "fsdp": "fsdp2.yaml", "deepspeed": "deepspeed_zero3.yaml"}
#: the tiny HSI model (encoder, bridge and LLM sizes as the test suite's), comparable across strategies
TINY_HSI = [
    "model.encoders.0.args={in_bands: 103, dim: 16, depth: 1, heads: 2, bands_per_token: 8}",
    "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
    "model.head.args.pooling=last",
]
#: what makes the runs deterministic and comparable: fp32 weights and math, one prompt, no dropout, no extras
COMPARABLE = [
    "model.llm.dtype=float32",
    "train.mixed_precision=no",
    "model.prompts.train_choice=first",
    "train.epochs=1",
    "train.warmup_ratio=0.0",
    "train.lr=3e-3",
    "train.log_every_steps=1",
    "train.log_with=none",
    "eval.baselines=[]",
    "data.num_workers=0",
]


@dataclass
class Run:
    name: str
    command: list[str]
    output_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_sharding.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, of {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--num-processes", type=int, help="processes (GPUs) per distributed run (default: every GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="per-process batch of the distributed runs (default 8)")
    p.add_argument("--llm", default="tiny", help="model.llm.name (default: the tiny random LLM)")
    p.add_argument("--fsdp-layer", help="the LLM's decoder layer class for FSDP's auto-wrap (default: the config's, "
                                        "LlamaDecoderLayer)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance on the weights (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance on the weights (default 1e-3)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run (default 1800)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder of gpu_sharding.json / .md (default benchmarks/results)")
    p.add_argument("--work-dir", type=Path, help="where the runs train (default: a temporary folder)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders")
    p.add_argument("--accelerate-configs", type=Path, default=ROOT / "configs" / "accelerate",
                   help="folder of the accelerate config files (default configs/accelerate)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        p.error(f"--strategies: unknown {unknown} (known: {', '.join(STRATEGIES)})" if unknown
                else "--strategies: name at least one")
    args.strategies = list(dict.fromkeys(names))
    for name in ("steps", "batch_size", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_processes is not None and args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    for name in ("atol", "rtol"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(args: argparse.Namespace, batch_size: int) -> list[str]:
    return [f"model.llm.name={args.llm}", *TINY_HSI, *COMPARABLE, f"train.max_steps={args.steps}",
            f"data.batch_size={batch_size}", f"data.eval_batch_size={batch_size}"]


def plan(args: argparse.Namespace, num_gpus: int, work: Path) -> list[Run]:
    """The reference run and one run per strategy: their commands, environments and output folders."""
    n = args.num_processes or num_gpus
    if n > num_gpus:
        raise SystemExit(f"gpu_sharding: --num-processes {n} but this machine has {num_gpus} GPU(s)")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    train_py = str(ROOT / "train.py")
    single_dir = work / "single"
    runs = [Run("single", [sys.executable, train_py, "--modality", "hsi", "--output-dir", str(single_dir),
                           *_overrides(args, n * args.batch_size)], single_dir,
                {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]})]
    for name in args.strategies:
        config = args.accelerate_configs / STRATEGIES[name]
        out = work / name
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", str(n), "--main_process_port", str(_free_port())]
        if name == "fsdp" and args.fsdp_layer:
            command += ["--fsdp_transformer_layer_cls_to_wrap", args.fsdp_layer]
        command += [train_py, "--modality", "hsi", "--output-dir", str(out), *_overrides(args, args.batch_size)]
        skip = None
        if not config.is_file():
            skip = f"no accelerate config {config}"
        elif name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            skip = "deepspeed is not installed (pip install deepspeed)"
        runs.append(Run(name, command, out, dict(env), skip))
    return runs


def compare(reference: Path, other: Path, atol: float, rtol: float) -> dict[str, Any]:
    """``best/model.safetensors`` of ``other`` against ``reference``'s: the tensor names either lacks, the largest
    absolute and relative difference (and the tensor it is in), whether every element is within
    ``atol + rtol * |reference|``, and both runs' validation and test OA (``metrics.json``)."""
    from safetensors.torch import load_file

    a = load_file(str(reference / "best" / "model.safetensors"))
    b = load_file(str(other / "best" / "model.safetensors"))
    out: dict[str, Any] = {"tensors": len(a), "missing": sorted(set(a) - set(b)), "extra": sorted(set(b) - set(a)),
                           "shape_mismatch": [], "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_tensor": None}
    within = True
    for key in sorted(set(a) & set(b)):
        x, y = a[key].double(), b[key].double()
        if x.shape != y.shape:
            out["shape_mismatch"].append(key)
            continue
        if not x.numel():
            continue
        diff = (x - y).abs()
        if diff.max().item() > out["max_abs_diff"]:
            out["max_abs_diff"], out["worst_tensor"] = diff.max().item(), key
        out["max_rel_diff"] = max(out["max_rel_diff"], (diff / x.abs().clamp_min(1e-12)).max().item())
        within = within and bool((diff <= atol + rtol * x.abs()).all())
    out["within_tolerance"] = within and not (out["missing"] or out["extra"] or out["shape_mismatch"])
    for tag, run in (("reference", reference), ("run", other)):
        metrics = json.loads((run / "metrics.json").read_text())
        out[f"{tag}_val_OA"], out[f"{tag}_test_OA"] = metrics.get("val/OA"), metrics.get("OA")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    cols = ["strategy", "processes", "status", "seconds", "max_abs_diff", "max_rel_diff", "val_OA", "ref_val_OA",
            "test_OA", "ref_test_OA", "ok"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _train_size() -> int:
    from allspark.config import load_config
    from allspark.data import build_dataset

    return len(build_dataset(load_config("hsi"), "train"))


def fitting_steps(steps: int, global_batch: int, train_size: int) -> int:
    """The steps (at most ``steps``) whose batches all lie inside one pass over the ``train_size`` training samples:
    the last, short batch of a pass is padded with repeated samples by accelerate when sharded (``even_batches``),
    which a single process does not do, so only full global batches compare exactly."""
    full = train_size // global_batch
    if full < 1:
        raise SystemExit(f"gpu_sharding: a global batch of {global_batch} samples is larger than the training split "
                         f"({train_size}); lower --batch-size or --num-processes")
    return min(steps, full)


def _run(run: Run, timeout: int) -> tuple[int, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(run.command, cwd=ROOT, env={**os.environ, **run.env}, capture_output=True, text=True,
                              timeout=timeout)
        code, tail = proc.returncode, (proc.stderr or "")[-2000:]
    except subprocess.TimeoutExpired:
        code, tail = 124, f"timed out after {timeout} s"
    return code, time.perf_counter() - start, tail


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_sharding: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check; run this on a "
              "machine with one or more GPUs")
        return 0
    num_gpus = torch.cuda.device_count()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="allspark-gpu-sharding-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from allspark.data import demo_root

    demo_root("pavia_university")  # written once here, not raced for by the launched processes
    n = args.num_processes or num_gpus
    steps = fitting_steps(args.steps, n * args.batch_size, _train_size())
    if steps != args.steps:
        print(f"gpu_sharding: {args.steps} steps of {n} x {args.batch_size} samples pass the end of the training "
              f"split, where accelerate pads the last distributed batch: {steps} steps instead")
        args.steps = steps
    runs = plan(args, num_gpus, work)
    rows: list[dict[str, Any]] = []
    reference_ok = False
    for run in runs:
        row: dict[str, Any] = {"strategy": run.name, "processes": 1 if run.name == "single" else n,
                               "command": " ".join(run.command)}
        if run.skip:
            row.update(status=f"skipped: {run.skip}", ok=None)
            rows.append(row)
            print(f"{run.name}: {row['status']}", flush=True)
            continue
        print(f"{run.name}: {' '.join(run.command)}", flush=True)
        code, seconds, tail = _run(run, args.timeout)
        row.update(status="finished" if code == 0 else f"exit {code}", seconds=round(seconds, 1))
        if code != 0:
            row.update(ok=False, stderr_tail=tail)
        elif run.name == "single":
            reference_ok = True
            metrics = json.loads((run.output_dir / "metrics.json").read_text())
            row.update(val_OA=metrics.get("val/OA"), test_OA=metrics.get("OA"), ok=True)
        elif not reference_ok:
            row.update(ok=None, status="finished (no reference to compare: the single-process run failed)")
        else:
            cmp = compare(runs[0].output_dir, run.output_dir, args.atol, args.rtol)
            row.update(max_abs_diff=cmp["max_abs_diff"], max_rel_diff=cmp["max_rel_diff"],
                       worst_tensor=cmp["worst_tensor"], val_OA=cmp["run_val_OA"], test_OA=cmp["run_test_OA"],
                       ref_val_OA=cmp["reference_val_OA"], ref_test_OA=cmp["reference_test_OA"],
                       ok=cmp["within_tolerance"], missing=cmp["missing"], extra=cmp["extra"],
                       shape_mismatch=cmp["shape_mismatch"])
        rows.append(row)
        print(f"{run.name}: {row['status']} in {seconds:.0f} s" + (f"\n{tail}" if code else ""), flush=True)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"gpus": num_gpus, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "steps": args.steps, "batch_size_per_process": args.batch_size, "llm": args.llm, "atol": args.atol,
              "rtol": args.rtol, "rows": rows}
    (args.out / "gpu_sharding.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (args.out / "gpu_sharding.md").write_text(f"# GPU sharding check ({num_gpus} x {record['gpu']})\n\n{text}\n")
    if not args.keep_runs and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
