"""Command-line entry points: ``train.py``, ``evaluate.py`` and ``python -m allspark list|export|predict|ask``
(also installed as the ``allspark`` and ``allspark-predict`` console scripts).

Errors a user can cause end with one clear ``error: ...`` line on stderr and exit status 2, not a traceback:
an :class:`allspark.errors.UserError` (a bad config key or value, data file, checkpoint path, component name) and
the OS errors of the user's paths and disks (a missing file, no permission, a file where a folder belongs or the
reverse, a full disk). Everything else is a bug and keeps its traceback (exit status 1), even a ``KeyError`` or
``ValueError``. ``ALLSPARK_DEBUG=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from allspark.config import ConfigError
from allspark.errors import UserError, is_user_os_error

__all__ = ["train_main", "evaluate_main", "list_main", "export_main", "predict_main", "ask_main", "main", "run_cli",
           "is_user_error"]


def is_user_error(exc: BaseException) -> bool:
    """True for the errors ``run_cli`` reports as one line (exit 2): a ``UserError`` or a user's OS error."""
    return isinstance(exc, UserError) or is_user_os_error(exc)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None \
            and exc.strerror:
        msg = f"{exc.strerror}: {exc.filename!r}"  # e.g. "No space left on device: '/runs/hsi/log.jsonl'"
    else:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(msg.split()) or type(exc).__name__


def run_cli(fn: Callable[[], int | None]) -> None:
    logging.basicConfig(level=os.environ.get("ALLSPARK_LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # accelerate logs every file of every checkpoint at INFO; keep the console for the run itself.
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not is_user_error(exc) or os.environ.get("ALLSPARK_DEBUG"):
            raise  # a bug: the traceback, exit status 1
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train AllSpark on one modality. Extra key.path=value arguments override the config.",
    )
    p.add_argument("--modality", help="modality name (see `python -m allspark list`); several, comma-separated "
                                      "(hsi,table), train one joint model over them (allspark.multitask)")
    p.add_argument("--config", type=Path, help="a YAML config to use instead of configs/<modality>.yaml, or a joint "
                                               "config listing `tasks:` (e.g. configs/joint/allspark.yaml)")
    p.add_argument("--data-root", help="dataset folder in its official layout, or 'demo' (default: the config's)")
    p.add_argument("--output-dir", type=Path, help="run folder (default: runs/<modality>)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the newest checkpoint in the output dir, or from the given checkpoint dir")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--init-from", type=Path,
                   help="start from a checkpoint's trainable weights (train.init_from); a joint checkpoint is "
                        "extended: its tasks and shared adapters are held and the --modality task(s) train beside them")
    p.add_argument("--recipe", help="a training recipe of the config's `recipes` block, e.g. 'paper' (Table II of the "
                                    "paper, tuned for a 7B LLM on GPUs); default: the config's own values, sized "
                                    "for the configured LLM")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4 data.batch_size=16")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    from allspark.config import load_config
    from allspark.training import train

    parser = _train_parser()
    args = parser.parse_args(argv)
    joint = (args.modality is not None and "," in args.modality) or (
        args.config is not None and args.modality is None and _is_joint_config(args.config)) or (
        args.init_from is not None and _is_joint_checkpoint(args.init_from))
    if joint:
        return _train_joint_main(args)
    if args.modality is None:
        parser.error("the following arguments are required: --modality")
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from}")
    cfg = load_config(args.modality, path=args.config, overrides=overrides, data_root=args.data_root,
                      recipe=args.recipe)
    if cfg.modality != args.modality:
        raise ConfigError(f"--modality {args.modality!r} but the config is for {cfg.modality!r}")
    output_dir = args.output_dir or Path("runs") / args.modality
    resume = args.resume if args.resume in (None, True) else Path(args.resume)
    metrics = train(cfg, output_dir, resume=resume)
    _print_summary(metrics, output_dir / "metrics.json")
    return 0


def _is_joint_checkpoint(path: Path) -> bool:
    from allspark.multitask import is_joint_checkpoint

    return is_joint_checkpoint(path)


def _is_joint_config(path: Path) -> bool:
    from allspark.multitask import is_joint_config_file

    return is_joint_config_file(path)


def _train_joint_main(args: argparse.Namespace) -> int:
    """``train.py --modality a,b`` or ``--config JOINT.yaml``: one model over several tasks (allspark.multitask).
    ``joint.key=value`` overrides the joint config, ``TASK:key=value`` one task, ``key=value`` every task."""
    from allspark.multitask import load_joint_config, train_joint

    overrides = list(args.overrides)
    if args.recipe is not None:  # every task whose config defines it (joint.recipe)
        overrides.append(f"joint.recipe={args.recipe}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")  # every task's (the run's default length follows)
    if args.max_steps is not None:
        overrides.append(f"joint.train.max_steps={args.max_steps}")
    if args.init_from is not None:
        overrides.append(f"joint.init_from={args.init_from}")
    if args.config is not None:
        if args.modality is not None:
            raise ConfigError("give a joint run's tasks either in --config (a joint config) or as --modality a,b")
        cfg = load_joint_config(args.config, overrides=overrides, data_root=args.data_root)
    else:
        cfg = load_joint_config(tasks=[t.strip() for t in args.modality.split(",")], overrides=overrides,
                                data_root=args.data_root)
    names = [s.name for s in cfg.task_specs()]
    output_dir = args.output_dir or Path("runs") / "+".join(names)
    resume = args.resume if args.resume in (None, True) else Path(args.resume)
    metrics = train_joint(cfg, output_dir, resume=resume)
    _print_joint_summary(metrics, output_dir / "metrics.json")
    return 0


def _print_joint_summary(metrics: dict, path: Path) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        for name, task in metrics.get("tasks", {}).items():
            scalars = {k: v for k, v in task.items() if isinstance(v, float)}
            print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        print(f"({path})")


def _print_summary(metrics: dict, path: Path) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process and metrics:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print("test metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()) + f"  ({path})")


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    from allspark.evaluate_run import evaluate_checkpoint

    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a trained AllSpark checkpoint.")
    p.add_argument("--modality", help="the checkpoint's modality (required for a single-task checkpoint); for a "
                                      "joint checkpoint the one task to evaluate (default: every task)")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder (its best/ is used) or a folder written by save_pretrained")
    p.add_argument("--data-root", help="dataset folder, or 'demo' (default: the checkpoint config's)")
    p.add_argument("--output-dir", type=Path, help="where metrics.json and report.md go (default: CHECKPOINT/eval)")
    p.add_argument("--split", default="test")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the LLM run its own Python code (transformers trust_remote_code); a checkpoint's saved "
                        "config cannot turn this on")
    p.add_argument("--allow-download", action="store_true",
                   help="allow loading a Hugging Face hub id that the checkpoint's config names as its LLM (may "
                        "download it); refused otherwise")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="a verbalizer checkpoint only: class names, one per line (line i names class i), scored "
                        "instead of the trained names, with no weight changed (synonyms, another language); "
                        "default --output-dir: CHECKPOINT/eval_<file stem>; a line 'a | b' names one class by "
                        "synonyms")
    p.add_argument("--calibrate", action="store_true",
                   help="a verbalizer checkpoint only: subtract each name's mean score on the training split's "
                        "inputs (labels unused) before choosing, for names never trained on (with --labels); "
                        "default --output-dir: CHECKPOINT/eval[_<file stem>]_calibrated")
    args = p.parse_args(argv)
    from allspark.multitask import evaluate_joint, is_joint_checkpoint

    if is_joint_checkpoint(args.checkpoint):
        if args.labels is not None or args.calibrate:
            what = f"--labels {args.labels}" if args.labels is not None else "--calibrate"
            raise UserError(f"{what}: not supported for a joint checkpoint; load the task's model "
                            "(AllSpark.from_pretrained) and call model.head.set_choices(names) / "
                            "heads.verbalizer.calibrate_label_set(model, dataset)")
        metrics = evaluate_joint(args.checkpoint, tasks=[args.modality] if args.modality else None,
                                 data_root=args.data_root, output_dir=args.output_dir, split=args.split)
        _print_joint_summary(metrics, (args.output_dir or (args.checkpoint / "eval")) / "metrics.json")
        return 0
    if args.modality is None:
        p.error("the following arguments are required: --modality")
    metrics = evaluate_checkpoint(args.checkpoint, modality=args.modality, data_root=args.data_root,
                                  output_dir=args.output_dir, split=args.split,
                                  trust_remote_code=args.trust_remote_code, allow_download=args.allow_download,
                                  labels=args.labels, calibrate=args.calibrate)
    from allspark.evaluate_run import default_eval_dir

    out = args.output_dir or (args.checkpoint / default_eval_dir(args.labels, args.calibrate))
    _print_summary(metrics, out / "metrics.json")
    return 0


def list_main(argv: Sequence[str] | None = None) -> int:
    import allspark
    from allspark.registry import BASELINES, DATASETS, ENCODERS, EVALUATORS, HEADS, METRICS, OBJECTIVES

    p = argparse.ArgumentParser(prog="python -m allspark", description="allspark utilities")
    p.add_argument("command", choices=["list", "export", "predict", "ask"],
                   help="list: show registered modalities and components; export: see `python -m allspark export -h`; "
                        "predict: see `python -m allspark predict -h`; ask: see `python -m allspark ask -h`")
    p.parse_args(argv)
    allspark.import_builtins()
    print("modalities: " + ", ".join(allspark.list_modalities()))
    for reg in (ENCODERS, HEADS, DATASETS, METRICS, EVALUATORS, OBJECTIVES, BASELINES):
        names = []
        for n in reg.list():
            src = reg.source(n)
            names.append(f"{n} [{src}]" if src.startswith("entry point") else n)
        print(f"{reg.name}: " + (", ".join(names) or "(none)"))
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    from allspark.model import EXPORT_PARTS_DIR, export_checkpoint

    p = argparse.ArgumentParser(
        prog="python -m allspark export",
        description="Write a checkpoint in standard formats: the LLM with its LoRA adapter merged (PEFT "
                    "merge_and_unload) and its tokenizer as a plain transformers folder, plus the encoders, bridge "
                    f"and head (safetensors), the config and the data info in OUT/{EXPORT_PARTS_DIR}/.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder (its best/ is used) or a folder written by save_pretrained")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (must not exist yet)")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="then upload OUT to this Hugging Face Hub model repository ('name' or 'namespace/name'; "
                        "created if missing) with huggingface_hub.upload_folder; the token is HF_TOKEN or "
                        "`hf auth login`'s")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--commit-message", help="with --push-to-hub: the commit message")
    args = p.parse_args(argv)
    if args.push_to_hub is None and (args.private or args.commit_message):
        p.error("--private and --commit-message go with --push-to-hub REPO_ID")
    if args.push_to_hub is not None:
        from allspark.hub import check_repo_id

        check_repo_id(args.push_to_hub)  # a bad id or no huggingface_hub: before the export's work
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {out} (AutoModelForCausalLM.from_pretrained loads it; "
          f"AllSpark.from_pretrained loads {out / EXPORT_PARTS_DIR})")
    if args.push_to_hub is not None:
        from allspark.hub import push_folder

        url = push_folder(out, args.push_to_hub, private=True if args.private else None,
                          commit_message=args.commit_message)
        print(f"pushed {out} to the Hugging Face Hub: {url}")
    return 0


def _workers(text: str) -> int | str:
    """``--num-workers``: ``auto`` or a whole number >= 0."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 0, got {text!r}")
    return int(text)


def predict_main(argv: Sequence[str] | None = None, prog: str = "python -m allspark predict") -> int:
    from allspark.predict import FORMATS, PREDICTORS

    families = {cls: [n for n, c in PREDICTORS.items() if c is cls] for cls in PREDICTORS.values()}
    supported = "\n".join(f"  {', '.join(names)}: {cls.input_help}" for cls, names in families.items())
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict unlabelled input with a trained checkpoint: files -> a class per file, a hyperspectral\n"
                    "scene -> a class-map GeoTIFF (georeferencing kept) and PNG, a table CSV -> a value per row,\n"
                    "trajectories -> future positions, a sensor series -> forecasts. The preprocessing and the\n"
                    "normalisation fitted at training are reused; outputs are written atomically (docs/predict.md).",
        epilog=f"readers (data.dataset of the checkpoint) and their input:\n{supported}",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder (its best/ is used) or a folder written by save_pretrained")
    p.add_argument("--input", required=True, nargs="+", type=Path, metavar="PATH",
                   help="the files or folders to predict (folders are searched recursively for the reader's files)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE_OR_DIR",
                   help="a .csv/.json file, or a folder (predictions.<format>); a scene: a .tif file or a folder "
                        "(classmap.tif, classmap.png, classmap.<format>)")
    p.add_argument("--format", choices=list(FORMATS),
                   help="csv or json (default: the --out suffix's, else csv; a scene's legend: json)")
    p.add_argument("--batch-size", type=int, help="default: the checkpoint config's data.eval_batch_size")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast; default: the checkpoint config's train.mixed_precision (auto)")
    p.add_argument("--top-k", type=int, default=5, help="class probabilities per row (default 5)")
    p.add_argument("--data-root",
                   help="the training data, read only for a checkpoint from before the statistics a reader fits on "
                        "the training split (hsi, msi, table) were stored in its data_info.json (default: the "
                        "checkpoint config's data.root)")
    p.add_argument("--num-workers", type=_workers, metavar="N|auto",
                   help="DataLoader worker processes (default: the checkpoint config's data.num_workers, auto)")
    p.add_argument("--modality", help="refuse a checkpoint of another modality")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="a verbalizer checkpoint only: candidate class names, one per line, scored instead of the "
                        "trained names (any number of two or more: a class never trained on can be named); "
                        "pred and class_name index these names")
    p.add_argument("--trust-remote-code", action="store_true", help="as for evaluate.py")
    p.add_argument("--allow-download", action="store_true", help="as for evaluate.py")
    args = p.parse_args(argv)
    from allspark.predict import predict

    written = predict(args.checkpoint, args.input, args.out, fmt=args.format, batch_size=args.batch_size,
                      device=args.device, mixed_precision=args.mixed_precision, top_k=args.top_k,
                      data_root=args.data_root, modality=args.modality, num_workers=args.num_workers,
                      trust_remote_code=args.trust_remote_code, allow_download=args.allow_download,
                      labels=args.labels)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def ask_main(argv: Sequence[str] | None = None, prog: str = "python -m allspark ask") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description="Answer a question about each input in words: the checkpoint's LLM continues "
                               "[question | the input's bridge tokens] (transformers' generate). Answers are only as "
                               "good as the training: a task trained with the verbalizer head answers with its class "
                               "names, one trained with a linear head was never asked for words.")
    p.add_argument("question", help='the question, e.g. "What covers most of this scene?"')
    p.add_argument("--checkpoint", required=True, type=Path, help="a run folder (its best/) or a saved model folder")
    p.add_argument("--input", required=True, action="append", type=Path,
                   help="a file or folder, read as predict reads it (repeat --input for several)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed of the sampling")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data-root", help="the training data, for readers that need its statistics (as for predict)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-download", action="store_true")
    args = p.parse_args(argv)
    from allspark.predict import ask

    for row in ask(args.checkpoint, args.input, args.question, max_new_tokens=args.max_new_tokens,
                   do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   batch_size=args.batch_size, data_root=args.data_root, trust_remote_code=args.trust_remote_code,
                   allow_download=args.allow_download):
        print(f"{row['input']}: {row['answer']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m allspark``: ``list`` (registered components), ``export`` (see ``export --help``), ``predict``
    (see ``predict --help``) or ``ask`` (see ``ask --help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    if argv[:1] == ["ask"]:
        return ask_main(argv[1:], prog="allspark ask")
    return list_main(argv)


def _train_entry() -> None:
    run_cli(train_main)


def _evaluate_entry() -> None:
    run_cli(evaluate_main)


def _main_entry() -> None:
    """The ``allspark`` console script: ``allspark list|export|predict|ask``."""
    run_cli(main)


def _predict_entry() -> None:
    """The ``allspark-predict`` console script."""
    run_cli(lambda: predict_main(prog="allspark-predict"))
