"""User paths through training that the other files do not walk: exact resume with gradient accumulation, with
forced bf16, from a checkpoint named on the command line, in the second of two stages and after Ctrl-C; the best
checkpoint of a lower-is-better metric; checkpoint pruning; every shipped config built on its demo data; graph,
text and code through train() and evaluate.py; the README's Python API as written.

Everything runs on the tiny random LLM with one intra-op thread (``_one_thread``; subprocesses get
``OMP_NUM_THREADS=1``): tiny models run faster on one thread, and runs that are compared bit for bit, in this
process or in a subprocess, then use the same kernels. "Resumed" is checked two ways: the weights (and optimizer
state) of the final checkpoint equal an uninterrupted run's exactly, and the resumed run took only the steps after
its checkpoint (a silent restart from scratch would reach the same weights).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from allspark.config import Config, apply_overrides, from_dict, load_config, to_dict
from allspark.data import build_dataset
from allspark.model import AllSpark
from allspark.training import find_latest_checkpoint, train
from tests.conftest import tiny_overrides
from tests.helpers import ROOT, TINY_HSI, reset_accelerate, run_inprocess

#: for subprocesses: one thread (see above), and the INFO log lines the tests read
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "ALLSPARK_LOGLEVEL": "INFO"}

#: the tiny HSI run, shrunk further: 72 training pixels, batches of 8 (9 steps an epoch, 2 epochs), no test pass
#: or baselines; LoRA dropout and random training prompts, so a resume must restore the RNG to be exact
HSI = TINY_HSI + ["data.args.train_ratio=0.1", "data.batch_size=8", "eval.baselines=[]", "train.test_at_end=false",
                  "train.log_every_steps=1", "model.llm.adapter.dropout=0.1"]
STEPS_PER_EPOCH = 9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hsi(*extra: str) -> Config:
    return load_config("hsi", overrides=HSI + list(extra))


def run_train(cfg: Config, out: Path, **kwargs) -> list[int]:
    """train() into ``out``; returns the optimizer steps it took (from its step callback)."""
    steps: list[int] = []
    callback = kwargs.pop("step_callback", None)

    def record(state):
        steps.append(state.global_step)
        if callback is not None:
            callback(state)

    try:
        train(cfg, out, step_callback=record, **kwargs)
    finally:
        reset_accelerate()  # between two train() calls in one test
    return steps


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """The trainable weights and the optimizer state of two checkpoint folders are bit-identical."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, (f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}, max |diff| "
                        f"{max((wa[k].float() - wb[k].float()).abs().max().item() for k in differ):.3g}")
    oa = torch.load(a / "optimizer.bin", map_location="cpu", weights_only=False)
    ob = torch.load(b / "optimizer.bin", map_location="cpu", weights_only=False)
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)


def assert_complete_checkpoint(ckpt: Path) -> dict:
    """A resumable checkpoint folder: weights, optimizer, scheduler, RNG states and the trainer state."""
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "trainer_state.json"} <= names, sorted(names)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert ckpt.name == f"step-{state['global_step']}"
    return state


def checkpoint_names(out: Path) -> list[str]:
    return sorted((p.name for p in (out / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def train_steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


# -- 1. gradient accumulation ------------------------------------------------------------------------------------

def test_resume_with_gradient_accumulation_is_exact(tmp_path):
    """train.grad_accum_steps=2 over 9 micro-batches an epoch: 5 optimizer steps, the last of one micro-batch.
    Stopped by train.max_steps at step 3 (mid-epoch 0) and again at step 7 (mid-epoch 1), resumed to the end."""
    accum = ["train.grad_accum_steps=2"]
    assert run_train(hsi(*accum), tmp_path / "full") == list(range(1, 11))
    cut = tmp_path / "cut"
    assert run_train(hsi(*accum, "train.max_steps=3"), cut) == [1, 2, 3]
    state = assert_complete_checkpoint(find_latest_checkpoint(cut))
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (3, 0, 6)
    assert run_train(hsi(*accum, "train.max_steps=7"), cut, resume=True) == [4, 5, 6, 7]
    state = assert_complete_checkpoint(find_latest_checkpoint(cut))
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (7, 1, 4)
    assert run_train(hsi(*accum), cut, resume=True) == [8, 9, 10]
    assert find_latest_checkpoint(cut).name == find_latest_checkpoint(tmp_path / "full").name == "step-10"
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "step-10", cut / "checkpoints" / "step-10")
    assert train_steps_logged(cut) == list(range(1, 11))


# -- 2. bf16 mixed precision ---------------------------------------------------------------------------------------

def test_resume_under_forced_bf16_is_exact(tmp_path):
    bf16 = ["train.mixed_precision=bf16", "model.llm.dtype=bfloat16"]
    assert run_train(hsi(*bf16), tmp_path / "full") == list(range(1, 19))
    precision = json.loads((tmp_path / "full" / "metrics.json").read_text())["precision"]
    assert (precision["llm_dtype"], precision["mixed_precision"]) == ("bfloat16", "bf16")
    cut = tmp_path / "cut"
    assert run_train(hsi(*bf16, "train.max_steps=4"), cut) == [1, 2, 3, 4]
    assert run_train(hsi(*bf16), cut, resume=True) == list(range(5, 19))
    full_ckpt, cut_ckpt = tmp_path / "full" / "checkpoints" / "step-18", cut / "checkpoints" / "step-18"
    assert_same_checkpoint(full_ckpt, cut_ckpt)
    weights = load_file(str(cut_ckpt / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values()), "the trainable parts train in float32"


# -- 3. --resume DIR on the command line ---------------------------------------------------------------------------

def test_cli_resume_from_a_named_older_checkpoint_into_a_new_folder(tmp_path, caplog):
    """``train.py --resume RUN/checkpoints/step-2 --output-dir NEW``: continues from that checkpoint (not the
    run's newest) and reaches the weights of the uninterrupted run."""
    periodic = ["train.save_every_steps=2", "train.keep_checkpoints=10"]
    full = tmp_path / "full"
    assert run_train(hsi(*periodic, "train.max_steps=6"), full) == list(range(1, 7))
    assert checkpoint_names(full) == ["step-2", "step-4", "step-6"]
    before = {p.relative_to(full): p.stat().st_mtime_ns for p in full.rglob("*") if p.is_file()}

    fork = tmp_path / "fork"
    named = full / "checkpoints" / "step-2"
    # train.py's entry function and run_cli in this process (one thread: the module's fixture); its log in caplog
    with caplog.at_level("INFO", logger="allspark.training"):
        proc = run_inprocess(["train.py", "--modality", "hsi", "--output-dir", str(fork), "--resume", str(named),
                              "--max-steps", "6", *HSI, *periodic])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {named} at epoch 0, batch 2, step 2" in caplog.text
    assert checkpoint_names(fork) == ["step-4", "step-6"]
    assert train_steps_logged(fork) == [3, 4, 5, 6]
    assert_same_checkpoint(full / "checkpoints" / "step-6", fork / "checkpoints" / "step-6")
    after = {p.relative_to(full): p.stat().st_mtime_ns for p in full.rglob("*") if p.is_file()}
    assert after == before, "resuming into another folder leaves the named run untouched"

    from allspark.cli import train_main
    from allspark.errors import UserFileNotFoundError

    with pytest.raises(UserFileNotFoundError, match=r"is not a training checkpoint \(trainer_state.json missing\)"):
        train_main(["--modality", "hsi", "--output-dir", str(tmp_path / "x"), "--resume", str(full / "best"), *HSI])


# -- 4. a two-stage run, resumed in its second stage ---------------------------------------------------------------

STAGES = ("train.stages=[{name: first, overrides: {}}, "
          "{name: second, overrides: {train.train_only: ['bridge.*', 'head.*']}}]")


class _Crash(RuntimeError):
    pass


def test_resume_in_the_second_stage_skips_the_first_and_is_exact(tmp_path, caplog):
    cfg = hsi(STAGES, "train.epochs=1", "train.save_every_steps=2", "train.keep_checkpoints=10")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(cfg, full) == [*range(1, 10), *range(1, 10)]
    calls = []

    def crash_in_stage_two_at_step_5(state):
        calls.append(state.global_step)
        if len(calls) == STEPS_PER_EPOCH + 5:
            raise _Crash("simulated kill")

    with pytest.raises(_Crash):
        run_train(cfg, cut, step_callback=crash_in_stage_two_at_step_5)
    first, second = cut / "stage1-first", cut / "stage2-second"
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    assert find_latest_checkpoint(second).name == "step-4"
    untouched = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    from allspark.errors import UserError

    # a named checkpoint cannot be honoured stage by stage: refused, not silently replaced by the newest one
    with pytest.raises(UserError, match=r"a run with train.stages resumes as a whole: give --resume without a path"):
        train(cfg, cut, resume=second / "checkpoints" / "step-2")
    reset_accelerate()  # between two train() calls in one test

    with caplog.at_level("INFO", logger="allspark.training"):
        assert run_train(cfg, cut, resume=True) == [5, 6, 7, 8, 9], "stage 1 skipped, stage 2 from step 4"
    assert f"resumed from {second / 'checkpoints' / 'step-4'}" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == untouched
    assert train_steps_logged(second) == list(range(1, 10))
    assert_same_checkpoint(full / "stage2-second" / "checkpoints" / "step-9", second / "checkpoints" / "step-9")
    a, b = load_file(str(full / "best" / "model.safetensors")), load_file(str(cut / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((cut / "metrics.json").read_text())
    assert saved == json.loads((full / "metrics.json").read_text())
    assert set(saved["stages"]) == {"first", "second"}
    # stage 2 held everything but the bridge and the head at stage 1's best weights
    start = load_file(str(first / "best" / "model.safetensors"))
    moved = {k for k in start if not torch.equal(start[k], b[k])}
    assert moved and all(k.startswith(("bridge.", "head.")) for k in moved), sorted(moved)[:5]


# -- 5. Ctrl-C ----------------------------------------------------------------------------------------------------

def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(SUBPROCESS_ENV)
    return env


@pytest.mark.slow
def test_ctrl_c_leaves_a_complete_checkpoint_that_resumes_exactly(tmp_path):
    out = tmp_path / "cut"
    log = out / "log.jsonl"
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "train.py", "--modality", "hsi", "--output-dir", str(out), *HSI],
                                cwd=ROOT, env=_subprocess_env(), stdout=stdout, stderr=stderr,
                                preexec_fn=_default_sigint)
        try:
            deadline = time.monotonic() + 240
            while not (log.is_file() and '"loss"' in log.read_text()):
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline, "no training step logged in time"
                time.sleep(0.005)
            time.sleep(0.05)  # into a later step: nearly all of a step is forward, backward and update
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = (tmp_path / "stderr").read_text()
    assert code == 130, err[-3000:]
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    assert "interrupted: stopping after this optimizer step" in err
    assert "interrupted: saving a checkpoint at step" in err
    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None, err[-3000:]
    state = assert_complete_checkpoint(ckpt)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name], "no temporary folder left"
    k = state["global_step"]
    assert 1 <= k < 2 * STEPS_PER_EPOCH
    assert state["batches_in_epoch"] == k - STEPS_PER_EPOCH * state["epoch"], state

    total = k + 3  # the schedule spans train.epochs either way; train.max_steps only stops it
    assert run_train(hsi(f"train.max_steps={total}"), out, resume=True) == list(range(k + 1, total + 1))
    assert run_train(hsi(f"train.max_steps={total}"), tmp_path / "full") == list(range(1, total + 1))
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / f"step-{total}", out / "checkpoints" / f"step-{total}")
    assert train_steps_logged(out) == list(range(1, total + 1))


class _Pressed(AllSpark):
    """The model, with Ctrl-C pressed ``PRESSES[n]`` times inside its n-th training forward (after the random
    prompt choice and dropout drew from the RNG): a deterministic mid-step interrupt."""

    PRESSES: dict[int, int] = {}
    forwards = 0

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            type(self).forwards += 1
            for _ in range(self.PRESSES.get(type(self).forwards, 0)):
                signal.raise_signal(signal.SIGINT)
        return out


@pytest.fixture
def _python_sigint():
    """Python's own Ctrl-C handler for the test: pytest-xdist workers start with SIGINT ignored, and training only
    installs its handler over Python's default one (a process that ignores Ctrl-C keeps ignoring it)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def _default_sigint() -> None:
    """preexec_fn of a child that must react to Ctrl-C even when this process ignores it (xdist workers do)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_mid_step_stops_after_the_step_and_twice_stops_at_once(tmp_path, monkeypatch, presses, _python_sigint):
    import allspark.training as training

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(training, "AllSpark", _Pressed)
    monkeypatch.setattr(_Pressed, "PRESSES", {3: presses})
    monkeypatch.setattr(_Pressed, "forwards", 0)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(hsi("train.save_every_steps=2", "train.max_steps=6"), cut)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is restored"
    if presses == 2:  # stopped at once, mid-step 3: no checkpoint of a torn state, step-2 stays the newest
        assert checkpoint_names(cut) == ["step-2"]
        return
    assert checkpoint_names(cut) == ["step-2", "step-3"]  # step 3 finished, then the checkpoint
    assert assert_complete_checkpoint(cut / "checkpoints" / "step-3")["batches_in_epoch"] == 3
    monkeypatch.setattr(_Pressed, "PRESSES", {})
    assert run_train(hsi("train.save_every_steps=2", "train.max_steps=6"), cut, resume=True) == [4, 5, 6]
    assert run_train(hsi("train.save_every_steps=2", "train.max_steps=6"), tmp_path / "full") == list(range(1, 7))
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "step-6", cut / "checkpoints" / "step-6")


# -- 6. the best checkpoint of a lower-is-better metric ---------------------------------------------------------------

def test_best_holds_the_epoch_with_the_lowest_rmse(tmp_path, monkeypatch):
    """Table regression selects on RMSE, lower is better. The validation RMSE of each epoch is scripted (the real
    ones of a tiny run need not have an interior minimum): best/ must hold the weights of epoch 2, the lowest,
    not the first, the last or the highest."""
    import allspark.run as run_module

    scripted = iter([5.0, 3.0, 4.0, 3.5])
    real_build = run_module.build_evaluator

    def build_evaluator(cfg, info):
        evaluator = real_build(cfg, info)
        compute = evaluator.compute
        evaluator.compute = lambda gathered: {**compute(gathered), "RMSE": next(scripted)}
        return evaluator

    monkeypatch.setattr(run_module, "build_evaluator", build_evaluator)  # the run's evaluator (allspark.run.build_run)
    cfg = load_config("table", overrides=tiny_overrides() + [
        "data.args.train_ratio=0.02", "data.batch_size=16", "train.epochs=4", "train.keep_checkpoints=10",
        "train.test_at_end=false", "eval.baselines=[]"])
    assert cfg.train.metric_for_best == "RMSE" and cfg.train.greater_is_better is False
    out = tmp_path / "run"
    steps = run_train(cfg, out)
    per_epoch = len(steps) // 4
    assert steps == list(range(1, 4 * per_epoch + 1))

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/RMSE" in r]
    assert [r["val/RMSE"] for r in val] == [5.0, 3.0, 4.0, 3.5]
    assert [r["best"] for r in val] == [True, True, False, False]
    lowest = min(val, key=lambda r: r["val/RMSE"])
    assert (lowest["epoch"], lowest["step"]) == (2, 2 * per_epoch)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] == 2 and saved["val/RMSE"] == 3.0

    best = load_file(str(out / "best" / "model.safetensors"))
    for epoch in (1, 2, 3, 4):
        ckpt = load_file(str(out / "checkpoints" / f"step-{epoch * per_epoch}" / "model.safetensors"))
        same = best.keys() == ckpt.keys() and all(torch.equal(best[k], ckpt[k]) for k in best)
        assert same == (epoch == 2), epoch


# -- 7. keep_checkpoints --------------------------------------------------------------------------------------------

def test_keep_checkpoints_prunes_to_the_newest_n_also_after_a_resume(tmp_path):
    out = tmp_path / "run"
    keep = ["train.save_every_steps=1", "train.keep_checkpoints=2"]
    assert run_train(hsi(*keep, "train.max_steps=5"), out) == [1, 2, 3, 4, 5]
    assert checkpoint_names(out) == ["step-4", "step-5"]
    for name in ("step-4", "step-5"):
        assert_complete_checkpoint(out / "checkpoints" / name)
    assert run_train(hsi(*keep, "train.max_steps=7"), out, resume=True) == [6, 7]
    assert checkpoint_names(out) == ["step-6", "step-7"]
    assert find_latest_checkpoint(out).name == "step-7"
    one = tmp_path / "one"
    assert run_train(hsi("train.keep_checkpoints=1", "train.max_steps=12"), one) == list(range(1, 13))
    assert checkpoint_names(one) == ["step-12"]  # epoch 1 ended at step 9, pruned at step 12
    # the folder of a save that a kill interrupted is removed at the next save; keep_checkpoints=0 is refused
    stale = one / "checkpoints" / "step-11.tmp"  # (not the name the next save uses itself)
    stale.mkdir()
    (stale / "partial.bin").write_bytes(b"x")
    assert run_train(hsi("train.keep_checkpoints=1", "train.max_steps=13"), one, resume=True) == [13]
    assert checkpoint_names(one) == ["step-13"] and not stale.exists()
    assert_complete_checkpoint(one / "checkpoints" / "step-13")
    from allspark.config import ConfigError

    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        run_train(hsi("train.keep_checkpoints=0", "train.max_steps=1"), tmp_path / "zero")


# -- 8. every shipped config builds on its demo data ----------------------------------------------------------------

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
#: small standard-library files that together hold over the 284 documented functions the code demo draws
_CODE_DEMO_FILES = ("symtable.py", "operator.py", "xml/sax/xmlreader.py", "_collections_abc.py", "bdb.py",
                    "asyncio/events.py", "threading.py", "pathlib.py", "tkinter/ttk.py", "imaplib.py", "ipaddress.py",
                    "datetime.py", "unittest/case.py", "typing.py")


@pytest.fixture(scope="module")
def _code_demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("code-demo-cache")


def _use_fast_code_demo(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """The code demo (CodeSearchNet.write_demo) scans the whole standard library for documented functions, about
    a minute on 2 cores; here it scans a few small files (falling back to the whole library if they give too
    few). The demo it writes goes to a cache of this module only (``ALLSPARK_CACHE``, which subprocesses
    inherit), never to the session's, whose code demo must be the real one."""
    import allspark.data.codesearchnet as csn

    whole_library = csn.stdlib_functions
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = tuple(f for f in _CODE_DEMO_FILES if (stdlib / f).is_file())

    def fewer_files(max_code_chars: int = 320, modules=None):
        if modules is None:
            found = whole_library(max_code_chars, modules=files)
            if len(found) >= 284:
                return found
        return whole_library(max_code_chars, modules)

    mp.setattr(csn, "stdlib_functions", fewer_files)
    mp.setenv("ALLSPARK_CACHE", str(cache))


@pytest.fixture
def fast_code_demo(monkeypatch, _code_demo_cache):
    _use_fast_code_demo(monkeypatch, _code_demo_cache)


def _stage_configs(cfg: Config) -> list[Config]:
    if not cfg.train.stages:
        return [cfg]
    base = to_dict(cfg)
    base["train"]["stages"] = []
    return [from_dict(Config, apply_overrides(base, dict(s.get("overrides") or {}))) for s in cfg.train.stages]


def test_the_parametrisation_covers_every_modality():
    from allspark.config import list_modalities

    assert CONFIGS == list_modalities() and "hsi" in CONFIGS


@pytest.mark.parametrize("modality", CONFIGS)
def test_every_config_builds_on_the_tiny_llm_with_its_demo_data(modality, request):
    if modality == "code":
        request.getfixturevalue("fast_code_demo")
    cfg = load_config(modality, overrides=["model.llm.name=tiny"])
    assert cfg.modality == modality and cfg.uses_demo_data
    train_set = build_dataset(cfg, "train")
    info = train_set.info()
    batch = train_set.collate([train_set[i] for i in range(2)])
    for stage in _stage_configs(cfg):  # rgb-text: V2TMap, then HFE with stage 1 held
        torch.manual_seed(0)
        model = AllSpark.from_config(stage, info)
        assert any(p.requires_grad for p in model.parameters())
        model.train()
        out = model(batch)
        assert out.loss is not None and out.loss.ndim == 0 and torch.isfinite(out.loss), modality
        model.eval()
        with torch.no_grad():
            assert model(batch).predictions, modality


# -- 9. graph, text and code through train() and evaluate.py ---------------------------------------------------------

E2E = {  # modality: (main metric, greater is better, baselines, overrides that shorten evaluation)
    "graph": ("MAE", False, {"seasonal_naive", "linear_autoregressive"}, []),
    "text": ("top1", True, {"tfidf_logistic"}, ["eval.args.compare_untrained=false"]),
    "code": ("mrr", True, {"tfidf_ranking"},
             ["eval.args={mrr_pool: 10, ranking: loglik, bleu: true, max_new_tokens: 4, compare_untrained: false}"]),
}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory, _code_demo_cache):
    """Graph, text and code trained through train() in this process (2 steps, no test pass: evaluate.py makes
    it; train's own is tested on HSI in test_training.py), then evaluate.py's entry function on each, in this
    process too (``run_inprocess``; the script itself runs as a subprocess in test_cli.py)."""
    root = tmp_path_factory.mktemp("e2e")
    runs = {}
    for modality, (*_, extra) in sorted(E2E.items()):
        with pytest.MonkeyPatch.context() as mp:
            if modality == "code":
                _use_fast_code_demo(mp, _code_demo_cache)
            cfg = load_config(modality, overrides=tiny_overrides() + [
                "train.epochs=1", "train.max_steps=2", "train.test_at_end=false", *extra])
            steps = run_train(cfg, root / modality / "run")
            runs[modality] = r = {"cfg": cfg, "steps": steps, "out": root / modality / "run",
                                  "eval": root / modality / "eval", "stderr": root / modality / "evaluate.stderr"}
            # evaluate.py's entry function in this process (the code demo's cache still set: it reads that demo)
            proc = run_inprocess(["evaluate.py", "--modality", modality, "--checkpoint", str(r["out"]),
                                  "--output-dir", str(r["eval"])])
            r["returncode"] = proc.returncode
            r["stderr"].write_text(proc.stderr)
    return runs


@pytest.mark.parametrize("modality", sorted(E2E))
def test_train_then_evaluate_py_end_to_end(modality, e2e_runs):
    metric, greater, baselines, _ = E2E[modality]
    r = e2e_runs[modality]
    assert r["steps"] == [1, 2]
    trained = json.loads((r["out"] / "metrics.json").read_text())
    assert trained["best_epoch"] is not None and math.isfinite(trained[f"val/{r['cfg'].train.metric_for_best}"])
    assert (r["out"] / "best" / "model.safetensors").is_file()

    assert r["returncode"] == 0, r["stderr"].read_text()[-3000:]
    evaluated = json.loads((r["eval"] / "metrics.json").read_text())
    assert (evaluated["main_metric"], evaluated["greater_is_better"]) == (metric, greater)
    assert evaluated["split"] == "test" and math.isfinite(evaluated[metric])
    assert evaluated["checkpoint"] == str(r["out"] / "best")
    assert set(evaluated["baselines"]) == baselines
    assert all(math.isfinite(evaluated["baselines"][b][metric]) for b in baselines)
    best = evaluated["best_baseline"]
    assert best[metric] == (max if greater else min)(evaluated["baselines"][b][metric] for b in baselines)
    assert (r["eval"] / "report.md").is_file()


# -- 10. the README's Python API ---------------------------------------------------------------------------------------

def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'load_config("hsi", overrides=["model.llm.name=tiny"])' in code
    monkeypatch.chdir(tmp_path)  # the snippet saves to ./ckpt
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out, model, batch = namespace["out"], namespace["model"], namespace["batch"]
    assert out.loss is not None and torch.isfinite(out.loss)
    assert {"config.yaml", "model.safetensors"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert model.predict(batch)["pred"].shape == (4,)
    from transformers import PreTrainedModel

    assert isinstance(namespace["merged"], PreTrainedModel)
