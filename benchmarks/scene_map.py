#!/usr/bin/env python
"""HSI scene-map throughput: pixels per second of the whole-scene classification map, and the projected time of
a full Pavia University scene (610 x 340 = 207,400 pixels).

The demo HSI model (``load_config('hsi')`` on the demo data: the configured LLM, SmolLM2-135M by default, with
the demo-sized encoder and bridge; weights untrained, which does not change the speed) predicts the first
``--rows`` rows of the demo scene through :meth:`PixelClassificationEvaluator.predict_scene` (tiled, as the
evaluation does), after one warm-up batch, under accelerate as ``evaluate.py`` runs it. Settings measured:

- ``modality_first fp32``: the paper's order [bridge | prompt], float32 LLM, no autocast;
- ``modality_first auto``: the same with ``model.llm.dtype: auto`` and ``mixed_precision: auto`` (bf16 where
  the CPU runs it natively, as here);
- ``prompt_first auto``: ``model.sequence: prompt_first`` ([prompt | bridge]), whose evaluation computes the
  prompt's key/value cache once and runs only the bridge tokens of each pixel through the LLM.

The same run measures the dense 2048^3 matmul rate in fp32 and bf16, so a slower or busier machine can be told
apart from a slower code path. Results are printed and saved to ``benchmarks/results/scene_map.json``; nothing
here is a pass/fail test.

    python benchmarks/scene_map.py                     # defaults: 4 rows (fp32), 16 rows (the others)
    python benchmarks/scene_map.py --llm tiny --rows 4 --rows-fp32 2 --out /tmp/scene_map.json   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import matmul_flops  # noqa: E402

from allspark.config import load_config  # noqa: E402
from allspark.data import build_dataset  # noqa: E402
from allspark.distributed import make_accelerator  # noqa: E402
from allspark.evaluation.classification import PixelClassificationEvaluator  # noqa: E402
from allspark.model import AllSpark  # noqa: E402

PAVIA_PIXELS = 610 * 340
#: (name, model.sequence, model.llm.dtype, mixed_precision)
SETTINGS = (
    ("modality_first fp32", "modality_first", "float32", "no"),
    ("modality_first auto", "modality_first", "auto", "auto"),
    ("prompt_first auto", "prompt_first", "auto", "auto"),
)


class FirstRows(torch.utils.data.Dataset):
    """The first ``rows`` rows of a row-major scene split (what a scene of that height would hold)."""

    def __init__(self, scene, rows: int, width: int) -> None:
        self.scene, self.length = scene, rows * width
        self.collate = scene.collate

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.scene[i]


def measure(name: str, sequence: str, dtype: str, mixed: str, rows: int, args) -> dict:
    overrides = [f"model.sequence={sequence}", f"model.llm.dtype={dtype}"]
    if args.llm:
        overrides.append(f"model.llm.name={args.llm}")
    cfg = load_config("hsi", overrides=overrides)
    train = build_dataset(cfg, "train")
    scene = build_dataset(cfg, "scene")
    info = train.info()
    rows = min(rows, int(info["height"]))
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, info)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):  # each setting its own autocast
        state._reset_state(True) if state is AcceleratorState else state._reset_state()
    accelerator = make_accelerator(mixed_precision=mixed, llm_dtype=cfg.model.llm.dtype)
    model = accelerator.prepare(model)
    batch_size = args.batch_size or cfg.data.eval_batch_size
    evaluator = PixelClassificationEvaluator({**info, "height": rows}, scene_tile_rows=args.tile_rows)
    part = FirstRows(scene, rows, int(info["width"]))
    with torch.inference_mode():  # warm-up: one batch (and, for prompt_first, the prompt's cache)
        model.eval()
        model(scene.collate([scene[i] for i in range(min(batch_size, len(part)))]))
    gathered, stats = evaluator.predict_scene(model, part, accelerator, batch_size)
    rate = stats["scene_pixels_per_second"]
    return {
        "setting": name, "sequence": sequence, "llm_dtype": getattr(getattr(model, "language_model", None), "dtype", dtype),
        "mixed_precision": accelerator.mixed_precision, "llm": cfg.model.llm.name, "batch_size": batch_size,
        "tile_rows": args.tile_rows, "pixels": stats["scene_pixels"], "seconds": stats["scene_seconds"],
        "pixels_per_second": rate, "pavia_projected_seconds": PAVIA_PIXELS / rate,
        "predicted_classes": int(len(set(gathered["pred"].tolist()))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=None, help="model.llm.name (default: the config's, SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=16, help="scene rows timed per setting (demo scene: 40 x 40)")
    parser.add_argument("--rows-fp32", type=int, default=4, help="rows for the slow fp32 setting")
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.eval_batch_size")
    parser.add_argument("--tile-rows", type=int, default=32)
    parser.add_argument("--settings", nargs="*", default=None, help="subset of: " + ", ".join(s[0] for s in SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scene_map.json"))
    args = parser.parse_args()

    chosen = [s for s in SETTINGS if args.settings is None or s[0] in args.settings]
    load_before = os.getloadavg()
    results = []
    for name, sequence, dtype, mixed in chosen:
        rows = args.rows_fp32 if dtype == "float32" else args.rows
        results.append(measure(name, sequence, dtype, mixed, rows, args))
        r = results[-1]
        print(f"{name:22s} {r['llm_dtype']:>9s} autocast {r['mixed_precision']:>4s}  {r['pixels']:6d} px in "
              f"{r['seconds']:7.1f} s = {r['pixels_per_second']:8.1f} px/s; Pavia 610x340: "
              f"{r['pavia_projected_seconds'] / 60:7.1f} min", flush=True)
    base = next((r["pixels_per_second"] for r in results if r["setting"] == "modality_first fp32"), None)
    for r in results:
        r["speedup_vs_modality_first_fp32"] = r["pixels_per_second"] / base if base else None
    matmul = {"fp32_gflops": matmul_flops(torch.float32) / 1e9, "bf16_gflops": matmul_flops(torch.bfloat16) / 1e9}
    report = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "matmul_2048": matmul,
        "pavia_pixels": PAVIA_PIXELS,
        "results": results,
    }
    print(f"matmul 2048^3: fp32 {matmul['fp32_gflops']:.0f} GFLOP/s, bf16 {matmul['bf16_gflops']:.0f} GFLOP/s "
          f"(load average {load_before[0]:.1f} before, {report['machine']['load_average_after'][0]:.1f} after)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
