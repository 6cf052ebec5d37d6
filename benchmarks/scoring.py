#!/usr/bin/env python
"""Candidate scoring throughput for the code MRR protocol: with and without reusing the prefix.

Each query is a function's prefix ``[prompt | sep | code | sep]``; its candidates are the docstrings of a
pool. ``prefix reuse`` runs the prefixes once with their key/value cache and only the candidate tokens per
candidate (:meth:`allspark.lm.LanguageModel.score_continuations`); ``full forward`` runs ``prefix + candidate`` for
every (query, candidate) row (batched in the same chunks); ``full forward, one row at a time`` is the naive
loop (one forward per candidate). The scores of the variants are checked to agree. Data: the code demo's
test split (standard-library functions). Numbers are printed and saved as JSON; not a pass/fail test.

    python benchmarks/scoring.py                       # default LLM, 4 queries x 32 candidates
    python benchmarks/scoring.py --llm tiny            # quick check of the script
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.config import load_config  # noqa: E402
from allspark.data import build_dataset  # noqa: E402
from allspark.language import prefix_rows  # noqa: E402
from allspark.model import AllSpark  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", help="model.llm.name override (e.g. tiny)")
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64, help="candidate rows per forward")
    p.add_argument("--naive-rows", type=int, default=16, help="rows timed for the one-row-at-a-time loop (every query, the first candidates)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = p.parse_args()

    overrides = [f"model.llm.name={args.llm}"] if args.llm else []
    cfg = load_config("code", overrides=overrides)
    dataset = build_dataset(cfg, "test")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, dataset.info()).eval()
    n = max(args.queries, args.candidates)
    if len(dataset) < n:
        raise SystemExit(f"the code demo test split has {len(dataset)} functions < {n}")
    items = [dataset[i] for i in range(n)]
    codec = model.text_codec
    prefixes, _ = prefix_rows(model, {"input_text": [it["input_text"] for it in items[: args.queries]],
                                      "prompt_index": torch.zeros(args.queries, dtype=torch.long)})
    cands = codec.encode_targets([it["target_text"] for it in items[: args.candidates]])
    lm = model.language_model
    rows = args.queries * args.candidates

    def timed(fn):
        fn()  # warm-up
        best, value = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - t)
        return best, value

    with torch.no_grad():
        t_reuse, s_reuse = timed(lambda: lm.score_continuations(prefixes, cands, pad_id=codec.pad_id,
                                                                chunk_size=args.chunk_size))
        t_full, s_full = timed(lambda: lm.score_continuations(prefixes, cands, pad_id=codec.pad_id,
                                                              chunk_size=args.chunk_size, reuse_prefix=False))
        naive_n = max(1, min(args.naive_rows // args.queries, args.candidates))  # candidates per query
        t_naive, s_naive = timed(lambda: lm.score_continuations(prefixes, cands[:naive_n], pad_id=codec.pad_id,
                                                                chunk_size=1, reuse_prefix=False))
        naive_n *= args.queries  # rows timed
    max_diff = float((s_reuse - s_full).abs().max())
    naive_diff = float((s_reuse[:, : naive_n // args.queries] - s_naive).abs().max())
    result = {
        "llm": cfg.model.llm.name, "dtype": cfg.model.llm.dtype, "torch_threads": torch.get_num_threads(),
        "platform": platform.processor() or platform.machine(),
        "queries": args.queries, "candidates_per_query": args.candidates, "chunk_size": args.chunk_size,
        "mean_prefix_tokens": sum(map(len, prefixes)) / len(prefixes),
        "mean_candidate_tokens": sum(map(len, cands)) / len(cands),
        "prefix_reuse": {"seconds": t_reuse, "candidates_per_s": rows / t_reuse},
        "full_forward_batched": {"seconds": t_full, "candidates_per_s": rows / t_full},
        "full_forward_one_row_at_a_time": {"seconds": t_naive, "rows": naive_n, "candidates_per_s": naive_n / t_naive},
        "speedup_vs_batched_full": t_full / t_reuse,
        "speedup_vs_one_row_at_a_time": (naive_n / t_naive) ** -1 / (t_reuse / rows),
        "max_abs_score_difference": max(max_diff, naive_diff),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{rows} candidate scorings ({args.queries} queries x {args.candidates}), "
          f"prefix {result['mean_prefix_tokens']:.0f} tokens, candidate {result['mean_candidate_tokens']:.1f} tokens")
    for key in ("prefix_reuse", "full_forward_batched", "full_forward_one_row_at_a_time"):
        print(f"  {key:32s} {result[key]['candidates_per_s']:8.1f} candidates/s")
    print(f"  speed-up of prefix reuse: x{result['speedup_vs_batched_full']:.2f} vs batched full forwards, "
          f"x{result['speedup_vs_one_row_at_a_time']:.2f} vs one row at a time; max |score diff| {result['max_abs_score_difference']:.2e}")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
