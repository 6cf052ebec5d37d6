"""``evaluate.py``: a checkpoint's modality protocol on the test split, with its report and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from allspark.baselines import baseline_metrics
from allspark.checkpoints import resolve_checkpoint
from allspark.config import ConfigError, apply_overrides, from_dict, to_dict, Config
from allspark.data import loader_options
from allspark.distributed import make_accelerator
from allspark.evaluation import collect_predictions, write_metrics
from allspark.model import AllSpark
from allspark.precision import run_precision
from allspark.run import build_run


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    modality: str | None = None,
    data_root: str | None = None,
    output_dir: str | Path | None = None,
    split: str = "test",
    mixed_precision: str = "auto",
    trust_remote_code: bool = False,
    allow_download: bool = False,
    labels: str | Path | None = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """``mixed_precision``: the autocast of evaluation, ``auto`` (bf16 where the device runs it natively unless
    the checkpoint pins its LLM to float32, see allspark.precision), ``no``, ``bf16`` or ``fp16``.
    ``trust_remote_code`` / ``allow_download``: the caller's permission to run the LLM's own code and to fetch a
    hub id the checkpoint's config names; the checkpoint cannot grant either (see ``AllSpark.from_pretrained``).
    ``checkpoint``: a local folder, or a Hugging Face Hub id ``namespace/name[@revision]`` that no local path has
    (downloaded into huggingface_hub's cache: ``output_dir`` is then required, and the model card is not rewritten
    there). ``labels``: a text file of class names (one per line, line ``i`` naming class ``i``) that replaces a
    verbalizer head's names for this evaluation only (zero-shot label sets: synonyms, another language); the
    metrics then go to ``CHECKPOINT/eval_<file stem>`` by default, and the model card is left as it is. A line
    ``a | b`` names class ``i`` by synonyms. ``calibrate``: a verbalizer head's scores calibrated against the names'
    mean score on the training split's inputs (labels unused; :func:`heads.verbalizer.calibrate_label_set`),
    recorded under ``calibration``; default output ``CHECKPOINT/eval[_<file stem>]_calibrated``."""
    from allspark.errors import UserError
    from allspark.hub import hub_checkpoint_id, resolve_pretrained

    if hub_checkpoint_id(checkpoint) is not None and output_dir is None:
        raise UserError(f"--checkpoint {checkpoint} is a Hugging Face Hub id: pass --output-dir (evaluate writes its "
                        "metrics and report there, not into the download cache)")
    checkpoint, hub_id = resolve_pretrained(checkpoint)
    ckpt = resolve_checkpoint(checkpoint)
    model = AllSpark.from_pretrained(ckpt, trust_remote_code=trust_remote_code, allow_download=allow_download)
    cfg = model.cfg
    label_set = None
    if labels is not None:
        from heads.verbalizer import replace_label_set

        label_set = {"file": str(labels),
                     "names": replace_label_set(model, labels, num_classes=model.info.get("num_classes"))}
        if any(len(names) > 1 for names in model.head.synonyms):
            label_set["synonyms"] = model.head.synonyms
    accelerator = make_accelerator(mixed_precision=mixed_precision, llm_dtype=cfg.model.llm.dtype)
    precision = run_precision(model._llm, accelerator, mixed_precision, cfg.model.llm.dtype)
    if modality is not None and cfg.modality != modality:
        raise ConfigError(f"--modality {modality!r} but the checkpoint was trained on {cfg.modality!r}")
    if data_root is not None:
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), {"data.root": data_root}))
    out_dir = Path(output_dir) if output_dir is not None else checkpoint / default_eval_dir(labels, calibrate)
    run = build_run(cfg, splits=(split,), accelerator=accelerator, info=model.info, model=model, loaders="eval")
    dataset, evaluator, baselines, loader = run.datasets[split], run.evaluator, run.baselines, run.loaders[split]
    loading = loader_options(cfg.data, accelerator.device)
    calibration = None
    if calibrate:
        from heads.verbalizer import calibrate_label_set

        model.to(accelerator.device)
        calibration = {"split": "train", **calibrate_label_set(model, run.dataset("train"),
                                                               batch_size=cfg.data.eval_batch_size,
                                                               device=accelerator.device,
                                                               autocast=accelerator.autocast)}
    model = accelerator.prepare(model)
    gathered = {split: collect_predictions(model, accelerator.prepare(loader), accelerator, evaluator.pred_keys,
                                           evaluator.batch_keys, split)}
    metrics = {"split": split, "checkpoint": str(ckpt), "num_processes": accelerator.num_processes,
               **evaluator.compute(gathered[split])}
    for extra in evaluator.extra_splits:  # what the report needs beyond the scored split (e.g. the scene map)
        gathered[extra], stats = evaluator.predict_extra(extra, model, run.dataset(extra), accelerator,
                                                         cfg.data.eval_batch_size, **loading)
        metrics.update(stats)
    metrics["precision"] = precision
    if label_set is not None:
        metrics["label_set"] = label_set
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics.update(evaluator.model_metrics(accelerator.unwrap_model(model), dataset, accelerator))
    if accelerator.is_main_process:  # classical baselines fitted on the training split, scored on this one
        train_set = run.dataset("train") if baselines else None
        metrics.update(baseline_metrics(cfg, evaluator, baselines, train_set, dataset, accelerator.unwrap_model(model)))
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(out_dir / "metrics.json", metrics)
        extras = {k: v for k, v in gathered.items() if k != split}
        report = evaluator.report(gathered[split], metrics, extras, out_dir,
                                  f"AllSpark evaluation: {cfg.modality} ({split})")
        _add_training_curves(report, checkpoint, ckpt, cfg)
        if hub_id is None and label_set is None and calibration is None:  # a downloaded checkpoint's card is the repository's; a replaced
            # label set is this evaluation's, not the checkpoint's
            from allspark.model_card import write_model_card

            unwrapped = accelerator.unwrap_model(model)
            write_model_card(ckpt, cfg, unwrapped.info, metrics, figures=sorted(out_dir.glob("*.png")),
                             num_trainable=unwrapped.num_parameters(trainable_only=True))
    accelerator.wait_for_everyone()
    return metrics


def default_eval_dir(labels: str | Path | None, calibrate: bool = False) -> str:
    """The folder under the checkpoint where an evaluation writes by default: ``eval``, ``eval_<label file stem>``,
    and ``_calibrated`` after either when calibrated."""
    name = "eval" if labels is None else f"eval_{Path(labels).stem}"
    return name + ("_calibrated" if calibrate else "")


def _add_training_curves(report: Path, checkpoint: Path, ckpt: Path, cfg: Config) -> None:
    """The run's training curves (its ``log.jsonl``: loss and validation metric per step) as a figure beside the
    report and a section at its end; nothing for a checkpoint outside a run folder."""
    from allspark.evaluation.curves import CURVES_NAME, plot_training_curves, read_log, run_log
    from allspark.io import atomic_write_text

    log = run_log(checkpoint, ckpt)
    if log is None:
        return
    caption = plot_training_curves(read_log(log), cfg.train.metric_for_best, cfg.train.greater_is_better,
                                   report.parent / CURVES_NAME)
    if caption is not None:
        text = report.read_text().rstrip("\n")
        atomic_write_text(report, f"{text}\n\n## {caption}\n\n![{caption}]({CURVES_NAME})\n")
