"""Training curves of a run from its ``log.jsonl``: the training loss and the validation metric per optimizer step,
the figure ``evaluate.py`` adds to ``report.md`` when the checkpoint lies in a ``train.py`` run folder."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from allspark.evaluation import savefig

logger = logging.getLogger(__name__)

__all__ = ["read_log", "run_log", "training_curves", "plot_training_curves", "CURVES_NAME"]

CURVES_NAME = "training_curves.png"


def run_log(checkpoint: Path, resolved: Path) -> Path | None:
    """The ``log.jsonl`` of the run a checkpoint belongs to: ``checkpoint`` as given (a run folder) or the folder
    above the resolved ``best/``; None for a checkpoint outside a run folder (``save_pretrained``, an export)."""
    for folder in (checkpoint, resolved.parent if resolved.name == "best" else None):
        if folder is not None and (folder / "log.jsonl").is_file():
            return folder / "log.jsonl"
    return None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` (a torn last line, from a killed run, is skipped with a warning)."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s, line %d: not JSON (a torn write?); skipped", path, n)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_curves(records: list[dict[str, Any]], metric: str, greater_is_better: bool) -> dict[str, Any]:
    """``loss``: (step, training loss) of the train records; ``val``: (step, ``val/<metric>``) of the validation
    records; ``best``: the best validation point (the first of equals, as training keeps the first), or None."""
    loss = [(r["step"], r["loss"]) for r in records if _number(r.get("step")) and _number(r.get("loss"))]
    key = f"val/{metric}"
    val = [(r["step"], r[key]) for r in records if _number(r.get("step")) and _number(r.get(key))]
    best = (max if greater_is_better else min)(val, key=lambda p: p[1]) if val else None
    return {"loss": loss, "val": val, "best": best}


def plot_training_curves(records: list[dict[str, Any]], metric: str, greater_is_better: bool,
                         path: Path) -> str | None:
    """Two panels: the training loss (the records with ``loss``) and ``val/<metric>`` (the validation records) over
    optimizer steps, the best validation point marked. Writes ``path`` (PNG) and returns the report's caption;
    None (nothing written) when the log holds neither curve."""
    curves = training_curves(records, metric, greater_is_better)
    loss, val, best = curves["loss"], curves["val"], curves["best"]
    key = f"val/{metric}"
    if not loss and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", lw=1.2)
    else:
        ax_loss.text(0.5, 0.5, "no training-loss record\n(train.log_every_steps > the steps run)", ha="center",
                     va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("training loss")
    if val:
        ax_val.plot(*zip(*val), color="tab:orange", marker="o", ms=3, lw=1.2)
        ax_val.plot(*best, marker="*", ms=12, color="tab:red", ls="none", label=f"best {best[1]:.4g} (step {best[0]})")
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, f"no {key} record", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set_xlabel("optimizer step")
    ax_val.set_ylabel(key)
    ax_val.set_title(f"validation {metric}")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, path)
    return f"Training curves (log.jsonl: training loss and validation {metric} per optimizer step)"
