"""The model card of a checkpoint: ``best/README.md`` with the model, data, metrics, baselines, figures and config.

``train.py`` writes it beside ``best/model.safetensors`` once the test metrics are known; ``evaluate.py`` rewrites
it with its metrics and links to the report's figures (``CHECKPOINT/eval/*.png`` by default). It is plain
Markdown, the file a model hub shows for a repository, and it is written atomically.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from allspark.config import Config
from allspark.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["CARD_NAME", "model_card", "write_model_card"]

CARD_NAME = "README.md"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(checkpoint: Path, cfg: Config, info: dict[str, Any], metrics: dict[str, Any],
               figures: list[Path] | None = None, num_trainable: int | None = None) -> str:
    """The card's Markdown text. ``figures``: image files to link (paths relative to ``checkpoint`` when they
    lie beside it)."""
    m = cfg.model
    lines = [f"# AllSpark checkpoint: `{cfg.modality}`", ""]
    encoders = ", ".join(f"`{e.type}`" for e in m.encoders) or "none (the LLM reads the text itself)"
    adapter = m.llm.adapter
    adapter_text = f"`{adapter.type}`" + (f" (r={adapter.r}, alpha={adapter.alpha})" if adapter.type == "lora" else "")
    lines += ["## Model", "",
              f"- encoders: {encoders}",
              f"- modal bridge: {m.bridge.num_queries} queries, depth {m.bridge.depth}" if m.encoders else
              "- modal bridge: none",
              f"- language model: `{m.llm.name}` (frozen), adapter {adapter_text}",
              f"- head: `{m.head.type}`; sequence order `{m.sequence}`; prompts `{m.prompts.set or cfg.modality}`"]
    if num_trainable is not None:
        lines.append(f"- trainable parameters: {num_trainable:,}")
    lines += ["", "## Data", "", f"- reader: `{cfg.data.dataset}`, data root `{cfg.data.root}`"]
    if isinstance(info.get("split_sizes"), dict):
        lines.append("- splits: " + ", ".join(f"{k} {v}" for k, v in info["split_sizes"].items()))
    names = info.get("class_names")
    if isinstance(names, list) and names:
        shown = ", ".join(map(str, names[:20])) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        lines.append(f"- classes: {shown}")
    main, greater = metrics.get("main_metric"), metrics.get("greater_is_better")
    split = metrics.get("split") or "test"
    lines += ["", f"## Metrics ({split} split)", ""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        order = sorted(scalars, key=lambda k: (k != main, k))
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {'**' + k + '**' if k == main else k} | {_fmt(scalars[k])} |" for k in order]
    else:
        lines.append("(no metrics: the run skipped its test pass)")
    baselines = metrics.get("baselines")
    if isinstance(baselines, dict) and baselines and main:
        arrow = "higher is better" if greater else "lower is better"
        lines += ["", f"Classical baselines fitted on the training split, scored on the same split ({main}, {arrow}):",
                  "", f"| method | {main} |", "| --- | --- |", f"| this model | {_fmt(metrics.get(main))} |"]
        for name, values in baselines.items():
            if isinstance(values, dict):
                kind = " (probe of this model)" if values.get("probe") else ""
                lines.append(f"| {name}{kind} | {_fmt(values.get(main, '-'))} |")
    if figures:
        lines += ["", "## Figures", ""]
        for fig in figures:
            rel = os.path.relpath(fig, checkpoint)
            lines.append(f"![{fig.stem}]({Path(rel).as_posix()})")
    lines += ["", "## Use", "", "```python", "from allspark.model import AllSpark", "",
              f'model = AllSpark.from_pretrained("{checkpoint}")', "predictions = model.predict(batch)  "
              "# a batch collated by the dataset reader", "```", "",
              f"`python -m allspark predict --checkpoint {checkpoint} --input PATH --out predictions.csv` runs it on "
              "unlabelled files; `python -m allspark export` writes the merged LLM as a transformers folder."]
    if (checkpoint / "adapter" / "adapter_config.json").is_file():
        lines += ["", "The LoRA adapter alone, in PEFT's format: "
                  f'`peft.PeftModel.from_pretrained(base_llm, "{checkpoint / "adapter"}")`.']
    from allspark.model import CONFIG_NAME

    config = checkpoint / CONFIG_NAME
    if config.is_file():
        lines += ["", "## Config", "", "```yaml", config.read_text().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint: str | Path, cfg: Config, info: dict[str, Any], metrics: dict[str, Any],
                     figures: list[Path] | None = None, num_trainable: int | None = None) -> Path | None:
    """Write ``checkpoint/README.md`` atomically; a checkpoint folder that cannot be written (read-only, say)
    keeps its old card, with a warning. Returns the card's path, or None when it was not written."""
    checkpoint = Path(checkpoint)
    path = checkpoint / CARD_NAME
    try:
        atomic_write_text(path, model_card(checkpoint, cfg, info, metrics, figures, num_trainable))
    except OSError as exc:
        logger.warning("model card not written to %s: %s", path, exc)
        return None
    return path
