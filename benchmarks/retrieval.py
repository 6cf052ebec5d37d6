#!/usr/bin/env python
"""Image-text retrieval (rgb-text): embedding throughput of the model and ranking time of 10k x 10k.

- embedding throughput: images/s (encoder -> bridge -> LLM -> head) and captions/s (LLM -> head) of the
  demo-sized model in eval mode, best of ``--repeats`` timed batches
- ranking: ``--num`` random image and caption embeddings (width ``--dim``), ranked both ways in chunks of
  ``--chunk`` queries to depth 100 (R@K and the Eq. 26-30 metrics need the top 100), then all metrics with
  random multi-labels; the time and the peak memory of one chunk are reported

    python benchmarks/retrieval.py                 # default LLM, results -> benchmarks/results/retrieval.json
    python benchmarks/retrieval.py --llm tiny      # quick check of the script
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allspark.config import load_config  # noqa: E402
from allspark.data import build_dataset  # noqa: E402
from allspark.metrics.retrieval import label_ranking_metrics, rank_topk, recall_at_k  # noqa: E402
from allspark.model import AllSpark  # noqa: E402
from benchmarks.throughput import best_time  # noqa: E402


def bench_embedding(args) -> dict:
    overrides = [f"model.llm.name={args.llm}"] if args.llm else []
    cfg = load_config("rgb-text", overrides=overrides)
    dataset = build_dataset(cfg, "test")
    torch.manual_seed(0)
    model = AllSpark(cfg, build_dataset(cfg, "train").info()).eval()
    n = min(args.batch_size, len(dataset))
    batch = dataset.collate([dataset[i] for i in range(n)])
    captions = [c for cs in batch["captions"] for c in cs]

    @torch.no_grad()
    def images():
        model.head.encode_image(model.run_llm(batch), batch)

    @torch.no_grad()
    def texts():
        model.head.encode_text(captions)

    t_img, t_txt = best_time(images, args.repeats), best_time(texts, args.repeats)
    return {"llm": cfg.model.llm.name, "dtype": cfg.model.llm.dtype, "batch_size": n,
            "image_size": cfg.data.args.get("image_size"), "embed_dim": cfg.model.head.args.get("embed_dim"),
            "images_per_s": n / t_img, "captions_per_s": len(captions) / t_txt,
            "image_batch_s": t_img, "caption_batch_s": t_txt}


def bench_ranking(args) -> dict:
    rng = np.random.default_rng(0)
    n, dim = args.num, args.dim
    images = torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32))
    texts = torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32))
    labels = (rng.uniform(size=(n, 20)) < 0.15).astype(np.float32)
    t = time.perf_counter()
    i2t = rank_topk(images, texts, 100, args.chunk)
    t_i2t = time.perf_counter() - t
    t = time.perf_counter()
    t2i = rank_topk(texts, images, 100, args.chunk)
    t_t2i = time.perf_counter() - t
    t = time.perf_counter()
    ids = np.arange(n)
    recall_at_k(i2t, ids, ids)
    recall_at_k(t2i, ids, ids)
    label_ranking_metrics(i2t, labels, labels, chunk_size=args.chunk)
    label_ranking_metrics(t2i, labels, labels, chunk_size=args.chunk)
    t_metrics = time.perf_counter() - t
    return {"num_images": n, "num_captions": n, "dim": dim, "chunk": args.chunk, "depth": 100,
            "rank_i2t_s": t_i2t, "rank_t2i_s": t_t2i, "metrics_s": t_metrics,
            "chunk_scores_mib": args.chunk * n * 4 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", help="model.llm.name override (e.g. tiny)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"machine": platform.machine(), "torch_threads": torch.get_num_threads(),
              "embedding": bench_embedding(args), "ranking": bench_ranking(args)}
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
