#!/usr/bin/env python
"""Training-step and evaluation throughput, peak memory and efficiency per modality.

Efficiency = model FLOP/s (FLOPs counted with ``torch.utils.flop_counter`` on one step, divided by the
measured step time) / dense-matmul FLOP/s measured in the same run at the same dtype (best of repeats of
a 2048^3 matmul). Numbers are printed as a table and saved as JSON; nothing here is a pass/fail test.

    python benchmarks/throughput.py --modality hsi                 # demo-sized model, default LLM
    python benchmarks/throughput.py --modality hsi --llm tiny      # quick check of the script
    python benchmarks/throughput.py --modality hsi --paper         # the paper's encoder / bridge sizes
    python benchmarks/throughput.py --modality hsi --dtypes auto   # the precision ``auto`` picks here

Every run prints and saves (``auto_precision``) which precision ``dtype: auto`` picks on this machine and why
(allspark.precision); an ``auto`` row is measured in that precision and records it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.config import load_config  # noqa: E402
from allspark.data import build_dataset  # noqa: E402
from allspark.model import AllSpark  # noqa: E402
from allspark.precision import resolve_dtype, resolve_mixed_precision  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def auto_precision() -> dict:
    """What ``dtype: auto`` picks for a CPU run here, and why."""
    dtype, reason = resolve_dtype("auto", "cpu")
    mixed, mixed_reason = resolve_mixed_precision("auto", "cpu")
    return {"dtype": SHORT[dtype], "mixed_precision": mixed, "reason": reason, "mixed_precision_reason": mixed_reason}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def profile_step(fn, title: str, rows: int) -> None:
    """``torch.profiler`` over one call of ``fn`` (after a warm-up): the ops by self CPU time (printed), and the
    share of the step spent in matrix products (``aten::mm``/``addmm``/``bmm``/``_weight_int`` ... and SDPA
    attention) against everything else."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matrix = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")
                 or "scaled_dot_product" in e.key or "flash_attention" in e.key)
    print(f"\nprofile of one {title}: {total / 1e6:.2f} s of self CPU time, {matrix / max(total, 1):.0%} in matrix "
          f"products and attention kernels")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_modality(modality: str, requested: str, args) -> dict:
    dtype_name = auto_precision()["dtype"] if requested == "auto" else requested
    overrides = [f"model.llm.dtype={LLM_DTYPES[dtype_name]}"]
    if args.llm:
        overrides.append(f"model.llm.name={args.llm}")
    overrides += list(args.override)
    # The demo block applies when the data root is "demo"; --paper loads the config as for real data
    # (the paper's model sizes) and then feeds it the demo data.
    cfg = load_config(modality, overrides=overrides, data_root="(paper sizes)" if args.paper else None)
    cfg.data.root = "demo"
    dataset = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, dataset.info())
    batch_size = args.batch_size or cfg.data.batch_size
    if len(dataset) < batch_size:
        raise SystemExit(f"{modality}: the demo train split has {len(dataset)} samples < batch {batch_size}")
    batch = dataset.collate([dataset[i] for i in range(batch_size)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = (torch.autocast("cpu", dtype=DTYPES[dtype_name]) if dtype_name != "fp32" else contextlib.nullcontext())

    from allspark.training import attention_kernel

    def train_step():
        model.train()
        with autocast, attention_kernel(cfg.train.attention_kernel, torch.device("cpu")):  # as train() does
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_step():
        model.eval()
        with autocast:
            model(batch)

    def eval_forward_with_grad_mode():
        # FlopCounterMode's module tracker trips over no_grad forwards of modules holding parameters;
        # the forward FLOPs are the same with grad mode on, so count them that way.
        model.eval()
        with autocast:
            model(batch)

    train_flops = count_flops(train_step)
    if args.profile:
        profile_step(train_step, f"{modality} {dtype_name} train step", args.profile)
    eval_flops = count_flops(eval_forward_with_grad_mode)
    rss0 = peak_rss_mib()
    t_train = best_time(train_step, args.repeats)
    t_eval = best_time(eval_step, args.repeats)
    peak = matmul_flops(DTYPES[dtype_name])
    seq_len = model.num_modality_tokens + int(model.prompt_lengths.max())
    return {
        "modality": modality,
        "dtype": dtype_name,
        "requested": requested,
        "llm": cfg.model.llm.name,
        "sizes": "paper" if args.paper else "demo",
        "batch_size": batch_size,
        "max_sequence_length": seq_len,
        "trainable_params": model.num_parameters(trainable_only=True),
        "total_params": model.num_parameters(),
        "train_step_s": t_train,
        "train_samples_per_s": batch_size / t_train,
        "eval_step_s": t_eval,
        "eval_samples_per_s": batch_size / t_eval,
        "train_gflop_per_step": train_flops / 1e9,
        "eval_gflop_per_step": eval_flops / 1e9,
        "train_gflops": train_flops / t_train / 1e9,
        "eval_gflops": eval_flops / t_eval / 1e9,
        "matmul_gflops": peak / 1e9,
        "train_efficiency": train_flops / t_train / peak,
        "eval_efficiency": eval_flops / t_eval / peak,
        "peak_rss_mib": max(rss0, peak_rss_mib()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", nargs="+", default=["hsi"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=[*DTYPES, "auto"],
                   help="auto: the precision allspark picks on this machine (printed either way)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (demo) batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--llm", default=None, help="override model.llm.name (e.g. tiny)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.prompt_sharing=false")
    p.add_argument("--paper", action="store_true", help="the paper's model sizes instead of the demo block")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also profile one training step with torch.profiler and print its ROWS costliest ops")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = auto_precision()
    print(f"dtype auto picks {auto['dtype']} here ({auto['reason']}); autocast {auto['mixed_precision']}")
    rows = []
    for modality in args.modality:
        for dtype_name in args.dtypes:
            rows.append(bench_modality(modality, dtype_name, args))
    header = ("modality", "dtype", "batch", "train samp/s", "eval samp/s", "train GFLOP/s", "matmul GFLOP/s",
              "train eff", "eval eff", "peak RSS MiB")
    print(" | ".join(header))
    for r in rows:
        dtype = r["dtype"] + (" (auto)" if r["requested"] == "auto" else "")
        print(" | ".join([r["modality"], dtype, str(r["batch_size"]), f"{r['train_samples_per_s']:.1f}",
                          f"{r['eval_samples_per_s']:.1f}", f"{r['train_gflops']:.1f}", f"{r['matmul_gflops']:.1f}",
                          f"{r['train_efficiency']:.2f}", f"{r['eval_efficiency']:.2f}", f"{r['peak_rss_mib']:.0f}"]))
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    for r in rows:
        r["machine"] = machine
        r["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # The file keeps one row per (modality, dtype, llm, sizes): a new measurement replaces the old one
    # of the same key and leaves the other modalities' rows in place.
    def key(r):
        return (r["modality"], r["dtype"], r["llm"], r.get("sizes", "demo"))

    old = []
    if args.out.is_file():
        try:
            old = json.loads(args.out.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            print(f"warning: {args.out} is not a results file of this script; overwriting it")
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    merged.sort(key=key)
    result = {"machine": machine, "auto_precision": auto, "results": merged}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from allspark.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
