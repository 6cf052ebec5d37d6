"""The model card of a checkpoint: ``best/README.md`` with the model, data, metrics, baselines, figures and config
(a joint checkpoint's: the shared parts, then those sections per task).

``train.py`` writes it beside ``best/model.safetensors`` once the test metrics are known; ``evaluate.py`` rewrites
it with its metrics and links to the report's figures (``CHECKPOINT/eval/*.png`` by default). A joint run's card
(:func:`joint_model_card`) is written by ``train.py`` only (``evaluate.py`` leaves it and writes its report,
with a section per task, to ``CHECKPOINT/eval/``). It is plain Markdown, the file a model hub shows for a
repository, and it is written atomically.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from allspark.checkpoints import ADAPTER_DIR, CONFIG_NAME, JOINT_CONFIG_NAME
from allspark.config import Config
from allspark.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["CARD_NAME", "model_card", "write_model_card", "joint_model_card", "write_joint_model_card"]

CARD_NAME = "README.md"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _model_lines(cfg: Config, num_trainable: int | None = None, bridge: str | None = None,
                 llm: bool = True) -> list[str]:
    """The model's bullet list: encoders, bridge (``bridge``: the line to show instead), language model (unless
    ``llm`` is False: a joint card states it once), head, trainable parameters."""
    m = cfg.model
    encoders = ", ".join(f"`{e.type}`" for e in m.encoders) or "none (the LLM reads the text itself)"
    adapter = m.llm.adapter
    adapter_text = f"`{adapter.type}`" + (f" (r={adapter.r}, alpha={adapter.alpha})" if adapter.type == "lora" else "")
    lines = [f"- encoders: {encoders}",
             bridge if bridge is not None else
             f"- modal bridge: {m.bridge.num_queries} queries, depth {m.bridge.depth}" if m.encoders else
             "- modal bridge: none"]
    if llm:
        lines.append(f"- language model: `{m.llm.name}` (frozen), adapter {adapter_text}")
    lines.append(f"- head: `{m.head.type}`; sequence order `{m.sequence}`; prompts `{m.prompts.set or cfg.modality}`")
    if num_trainable is not None:
        lines.append(f"- trainable parameters: {num_trainable:,}")
    return lines


def _data_lines(cfg: Config, info: dict[str, Any]) -> list[str]:
    lines = [f"- reader: `{cfg.data.dataset}`, data root `{cfg.data.root}`"]
    if isinstance(info.get("split_sizes"), dict):
        lines.append("- splits: " + ", ".join(f"{k} {v}" for k, v in info["split_sizes"].items()))
    names = info.get("class_names")
    if isinstance(names, list) and names:
        shown = ", ".join(map(str, names[:20])) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        lines.append(f"- classes: {shown}")
    return lines


def _metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """The metrics table (the main metric first, in bold) and the classical baselines beside the model."""
    main, greater = metrics.get("main_metric"), metrics.get("greater_is_better")
    lines: list[str] = []
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
    return lines


def _figure_lines(checkpoint: Path, figures: list[Path] | None) -> list[str]:
    if not figures:
        return []
    lines = ["", "## Figures", ""]
    for fig in figures:
        rel = os.path.relpath(fig, checkpoint)
        lines.append(f"![{fig.stem}]({Path(rel).as_posix()})")
    return lines


def _adapter_lines(checkpoint: Path) -> list[str]:
    if (checkpoint / ADAPTER_DIR / "adapter_config.json").is_file():
        return ["", "The LoRA adapter alone, in PEFT's format: "
                f'`peft.PeftModel.from_pretrained(base_llm, "{checkpoint / ADAPTER_DIR}")`.']
    return []


def _config_lines(path: Path) -> list[str]:
    if path.is_file():
        return ["", "## Config", "", "```yaml", path.read_text().rstrip(), "```"]
    return []


def model_card(checkpoint: Path, cfg: Config, info: dict[str, Any], metrics: dict[str, Any],
               figures: list[Path] | None = None, num_trainable: int | None = None) -> str:
    """The card's Markdown text. ``figures``: image files to link (paths relative to ``checkpoint`` when they
    lie beside it)."""
    lines = [f"# AllSpark checkpoint: `{cfg.modality}`", ""]
    lines += ["## Model", "", *_model_lines(cfg, num_trainable)]
    lines += ["", "## Data", "", *_data_lines(cfg, info)]
    split = metrics.get("split") or "test"
    lines += ["", f"## Metrics ({split} split)", "", *_metrics_lines(metrics)]
    lines += _figure_lines(checkpoint, figures)
    lines += ["", "## Use", "", "```python", "from allspark.model import AllSpark", "",
              f'model = AllSpark.from_pretrained("{checkpoint}")', "predictions = model.predict(batch)  "
              "# a batch collated by the dataset reader", "```", "",
              f"`python -m allspark predict --checkpoint {checkpoint} --input PATH --out predictions.csv` runs it on "
              "unlabelled files; `python -m allspark export` writes the merged LLM as a transformers folder."]
    lines += _adapter_lines(checkpoint)
    lines += _config_lines(checkpoint / CONFIG_NAME)
    return "\n".join(lines) + "\n"


def joint_model_card(checkpoint: Path, cfgs: dict[str, Config], infos: dict[str, dict[str, Any]],
                     metrics: dict[str, Any], *, bridge_width: int | None = None,
                     widths: dict[str, list[int]] | None = None, num_trainable: int | None = None) -> str:
    """The card of a joint checkpoint (:class:`allspark.multitask.MultiTaskAllSpark`): the shared parts once, then
    a section per task with its model, data and metrics beside its baselines (the single-task card's sections,
    one heading level down). ``metrics``: what ``train_joint`` returns (``{"tasks": {name: metrics}, "split",
    "aggregate"}``); ``bridge_width``: the shared bridge's width (None: one bridge per task); ``widths``: each
    task's encoder widths (to say which are projected to the shared width)."""
    names = list(cfgs)
    first = cfgs[names[0]].model
    adapter = first.llm.adapter
    adapter_text = f"`{adapter.type}`" + (f" (r={adapter.r}, alpha={adapter.alpha})" if adapter.type == "lora" else "")
    bridged = [n for n in names if cfgs[n].model.encoders]
    lines = [f"# AllSpark joint checkpoint: {', '.join(f'`{n}`' for n in names)}", "",
             f"One model for {len(names)} task(s): every task runs through one frozen language model with one set of "
             "adapters that all of them trained, with its own encoder(s), prompts and head.", "",
             "## Shared parts", "",
             f"- language model: `{first.llm.name}` (frozen), adapter {adapter_text}, trained by every task"]
    if bridge_width is not None:
        b = cfgs[bridged[0]].model.bridge
        lines.append(f"- modal bridge: one, shared by {', '.join(f'`{n}`' for n in bridged)}: {b.num_queries} queries, "
                     f"depth {b.depth}, token width {bridge_width}; each task enters it through its own input "
                     "projection")
    else:
        lines.append("- modal bridge: one per task")
    if num_trainable is not None:
        lines.append(f"- trainable parameters: {num_trainable:,} (all tasks)")
    aggregate = metrics.get("aggregate") or {}
    if aggregate.get("best_step") is not None:
        lines.append(f"- best step {aggregate['best_step']}, chosen on the validation aggregate "
                     f"{_fmt(aggregate.get('val'))} ({aggregate.get('name', 'aggregate')})")
    split = metrics.get("split") or "test"
    for name in names:
        cfg, task_metrics = cfgs[name], (metrics.get("tasks") or {}).get(name, {})
        bridge = None
        if bridge_width is not None and cfg.model.encoders:
            own = (widths or {}).get(name, [])
            projected = [w for w in own if w != bridge_width]
            bridge = ("- modal bridge: the shared one, " + (f"encoder width(s) {projected} projected to {bridge_width}"
                                                            if projected else f"encoder width {bridge_width} as it is"))
        lines += ["", f"## Task `{name}`", "", "### Model", "", *_model_lines(cfg, bridge=bridge, llm=False)]
        lines += ["", "### Data", "", *_data_lines(cfg, infos.get(name, {}))]
        lines += ["", f"### Metrics ({split} split)", ""]
        if task_metrics.get("metric_for_best"):
            key = task_metrics["metric_for_best"]
            lines += [f"Validation {key} of the best step: {_fmt(task_metrics.get(f'val/{key}'))}.", ""]
        lines += _metrics_lines({k: v for k, v in task_metrics.items() if not k.startswith("val/")})
    lines += ["", "## Use", "", "```python", "from allspark.multitask import MultiTaskAllSpark", "",
              f'model = MultiTaskAllSpark.from_pretrained("{checkpoint}")',
              f'predictions = model.predict({{**batch, "task": "{names[0]}"}})  # a batch of that task\'s reader',
              "```", "", f"`python evaluate.py --checkpoint {checkpoint}` runs every task's protocol "
              "(`--modality NAME`: one task); a run with `--init-from` this folder adds tasks against its held parts."]
    lines += _adapter_lines(checkpoint)
    lines += _config_lines(checkpoint / JOINT_CONFIG_NAME)
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


def write_joint_model_card(checkpoint: str | Path, cfgs: dict[str, Config], infos: dict[str, dict[str, Any]],
                           metrics: dict[str, Any], **kwargs: Any) -> Path | None:
    """Write a joint checkpoint's ``README.md`` (:func:`joint_model_card`) atomically, as :func:`write_model_card`
    does (a folder that cannot be written keeps its old card, with a warning)."""
    checkpoint = Path(checkpoint)
    path = checkpoint / CARD_NAME
    try:
        atomic_write_text(path, joint_model_card(checkpoint, cfgs, infos, metrics, **kwargs))
    except OSError as exc:
        logger.warning("model card not written to %s: %s", path, exc)
        return None
    return path
