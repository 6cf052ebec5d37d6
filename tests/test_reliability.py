"""Reliability: user errors are one line (exit 2) and bugs keep their traceback (exit 1); clear messages for an
unknown LLM name or config key; a checkpoint cannot grant remote code or downloads; resume keeps log.jsonl exact
and refuses a changed config; atomic writes keep the umask's mode and reach the disk; test caches are fresh."""
from __future__ import annotations

import errno
import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
import yaml

from allspark.cli import evaluate_main, run_cli
from allspark.config import ConfigError, LLMConfig, load_config
from allspark.data import DatasetFormatError
from allspark.errors import UserError, UserFileNotFoundError
from allspark.registry import Registry, RegistryArgumentError, RegistryError
from tests.helpers import TINY_HSI, run


# -- 1. one error type for user-caused problems ------------------------------------------------------------------

def test_user_errors_share_one_base_and_keep_their_old_ones():
    for cls, old in ((ConfigError, ValueError), (DatasetFormatError, ValueError), (RegistryError, KeyError),
                     (RegistryArgumentError, ValueError), (UserFileNotFoundError, FileNotFoundError)):
        assert issubclass(cls, UserError) and issubclass(cls, old), cls
    # a KeyError subclass still prints its message unquoted
    assert str(RegistryError("unknown heads name 'x'")) == "unknown heads name 'x'"


def _exit(fn, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        run_cli(fn)
    return stop.value.code, capsys.readouterr().err


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc, shown", [
    (ConfigError("unknown config key 'x'"), "error: unknown config key 'x'"),
    (RegistryError("unknown heads name 'clasification'"), "error: unknown heads name 'clasification'"),
    (UserError("two\n  lines"), "error: two lines"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/PaviaU.mat"),
     "error: No such file or directory: '/data/PaviaU.mat'"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/hsi"), "error: Permission denied: '/runs/hsi'"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/hsi/config.yaml"),
     "error: Is a directory: '/runs/hsi/config.yaml'"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/x"), "error: Not a directory: '/runs/file/x'"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/hsi/log.jsonl"),
     "error: No space left on device: '/runs/hsi/log.jsonl'"),
])
def test_user_errors_are_one_line_with_exit_status_2(exc, shown, capsys, monkeypatch):
    monkeypatch.delenv("ALLSPARK_DEBUG", raising=False)
    code, err = _exit(_raise(exc), capsys)
    assert code == 2
    assert err == shown + "\n"


@pytest.mark.parametrize("exc", [KeyError("label"), ValueError("bad shape"), TypeError("x"), ImportError("y"),
                                 OSError(errno.EIO, "Input/output error"), RuntimeError("z")])
def test_other_errors_are_not_turned_into_user_errors(exc, capsys):
    with pytest.raises(type(exc)):
        run_cli(_raise(exc))
    assert "error:" not in capsys.readouterr().err


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch):
    monkeypatch.setenv("ALLSPARK_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli(_raise(ConfigError("x")))


BROKEN_HEAD = textwrap.dedent('''
    """A head with a bug (or a user error) in its forward, registered by the script before train.py runs."""
    import sys

    from allspark.cli import run_cli, train_main
    from allspark.errors import UserError
    from allspark.registry import HEADS
    from heads.classification import ClassificationHead

    MODE = sys.argv.pop(1)


    class BrokenHead(ClassificationHead):
        def forward(self, llm_out, batch):
            if MODE == "bug":
                return {}["label"]  # the KeyError of a bug: a missing dict key
            raise UserError("broken_head: the labels of this batch are not what the head expects")


    HEADS.register("broken_head", BrokenHead)
    sys.argv[0] = "train.py"
    run_cli(train_main)
''')


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bug", "user"])
def test_error_raised_inside_a_head_bug_keeps_traceback_user_error_is_one_line(tmp_path, mode):
    script = tmp_path / "broken_head.py"
    script.write_text(BROKEN_HEAD)
    proc = run([str(script), mode, "--modality", "hsi", "--output-dir", str(tmp_path / "run"), *TINY_HSI,
                "model.head.type=broken_head", "train.epochs=1"], env={"ALLSPARK_DEBUG": ""}, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    if mode == "bug":
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback (most recent call last)" in proc.stderr and "in forward" in proc.stderr
        assert last == "KeyError: 'label'"
        assert "error: label" not in proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert last == "error: broken_head: the labels of this batch are not what the head expects"


def test_unknown_baseline_type_is_a_config_error_naming_the_key():
    from allspark.baselines import build_baselines
    from allspark.evaluation import build_evaluator

    cfg = load_config("hsi", overrides=["eval.baselines=[{type: svn, args: {inputs: [spectrum]}}]"])
    with pytest.raises(ConfigError) as err:
        build_baselines(cfg, {"num_classes": 9}, build_evaluator(cfg, {"num_classes": 9, "height": 1, "width": 1}))
    msg = str(err.value)
    assert msg.startswith("eval.baselines.0.type: unknown baselines name 'svn'") and "'svm'" in msg


def test_evaluating_a_folder_without_checkpoint_is_a_user_error(tmp_path):
    from allspark.evaluate_run import resolve_checkpoint

    with pytest.raises(UserFileNotFoundError, match="holds no checkpoint: expected"):
        resolve_checkpoint(tmp_path)


def test_unknown_split_is_a_user_error():
    from allspark.data import build_dataset

    with pytest.raises(ConfigError, match=r"PaviaUniversity: unknown split 'tst'; expected one of \('train', "):
        build_dataset(load_config("hsi", overrides=TINY_HSI), "tst")


def test_registry_argument_errors_blame_the_config_only_when_the_config_passed_them():
    reg = Registry("things")

    @reg.register("plain")
    def make(hidden_size: int):
        return hidden_size

    with pytest.raises(RegistryArgumentError, match=r"does not take argument\(s\) \['depth'\]"):
        reg.build({"type": "plain", "depth": 2}, hidden_size=3)  # 'depth' came from the config
    with pytest.raises(TypeError) as err:  # 'hidden_size' came from the calling code: a bug, not a user error
        reg.build({"type": "plain"}, hidden_size=3, width=4)
    assert not isinstance(err.value, UserError)


# -- 2. an unknown LLM name --------------------------------------------------------------------------------------

def test_unknown_llm_name_lists_the_known_ones(monkeypatch, tmp_path):
    from allspark.llm import llm_source, load_llm

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_llm(LLMConfig(name="smollm2"))
    assert str(err.value) == ("model.llm.name: unknown LLM name 'smollm2'; known: smollm2-135m-instruct, tiny; "
                              "a Hub id looks like org/name (a local model folder is also accepted)")
    with pytest.raises(UserFileNotFoundError, match="no such model folder"):
        llm_source("./models/missing")
    (tmp_path / "mymodel").mkdir()
    assert llm_source("mymodel") == "folder"  # a local folder without a slash is fine
    assert llm_source("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert llm_source("tiny") == "tiny" and llm_source("smollm2-135m-instruct") == "default"


# -- 3. an unknown dotted override -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("no.such.key=1", "unknown config key 'no.such.key': there is no top-level key 'no'. Valid keys at the top "
                      "level: modality, seed, data, model, train, eval, demo, recipes, recipe"),
    ("model.bridg.depth=1", "unknown config key 'model.bridg.depth': 'model' has no key 'bridg'; did you mean "
                            "'model.bridge'? Valid keys under 'model': encoders, bridge, llm, head, prompts, "
                            "alignment, text_input"),
    ("model.llm.adapterr.r=4", "unknown config key 'model.llm.adapterr.r': 'model.llm' has no key 'adapterr'; "
                               "did you mean 'model.llm.adapter', 'model.llm.adapter_dtype'?"),
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
])
def test_unknown_dotted_key_names_the_whole_key_and_the_closest_at_its_level(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("hsi", overrides=[override])
    assert str(err.value).startswith(message), str(err.value)


# -- 4. a checkpoint cannot grant remote code or downloads --------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi", overrides=TINY_HSI)
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, build_dataset(cfg, "train").info())
    path = tmp_path_factory.mktemp("ckpt") / "best"
    model.save_pretrained(path)
    return path


def _edit_llm(path: Path, **llm) -> None:
    data = yaml.safe_load((path / "config.yaml").read_text())
    data["model"]["llm"].update(llm)
    (path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_saved_trust_remote_code_is_forced_off_unless_the_caller_passes_it(checkpoint, tmp_path, caplog):
    import shutil

    from allspark.model import AllSpark

    ckpt = tmp_path / "best"
    shutil.copytree(checkpoint, ckpt)
    _edit_llm(ckpt, trust_remote_code=True)
    with caplog.at_level("WARNING", logger="allspark.model"):
        model = AllSpark.from_pretrained(ckpt)
    assert model.cfg.model.llm.trust_remote_code is False
    assert "trust_remote_code: true; loading with it off" in caplog.text
    assert AllSpark.from_pretrained(ckpt, trust_remote_code=True).cfg.model.llm.trust_remote_code is True


class _Loaded(Exception):
    pass


def test_hub_id_in_a_checkpoint_is_refused_unless_the_caller_allows_it(checkpoint, tmp_path, monkeypatch):
    import shutil

    import allspark.llm as llm_module
    from allspark.model import AllSpark

    ckpt = tmp_path / "best"
    shutil.copytree(checkpoint, ckpt)
    _edit_llm(ckpt, name="someorg/some-model", trust_remote_code=True)
    calls = []

    def fake_load(name, dtype, trust_remote_code):  # where a download would start
        calls.append((name, trust_remote_code))
        raise _Loaded

    monkeypatch.setattr(llm_module, "_load_pretrained", fake_load)
    with pytest.raises(UserError) as err:
        AllSpark.from_pretrained(ckpt)
    assert "model.llm.name is 'someorg/some-model', a Hugging Face hub id" in str(err.value)
    assert "--allow-download" in str(err.value) and str(ckpt / "config.yaml") in str(err.value)
    assert calls == []  # refused before anything was fetched
    with pytest.raises(_Loaded):
        AllSpark.from_pretrained(ckpt, allow_download=True)
    with pytest.raises(_Loaded):
        AllSpark.from_pretrained(ckpt, allow_download=True, trust_remote_code=True)
    assert calls == [("someorg/some-model", False), ("someorg/some-model", True)]
    _edit_llm(ckpt, name="/gone/models/llm")  # the checkpoint's LLM folder has moved
    with pytest.raises(UserFileNotFoundError) as err:
        AllSpark.from_pretrained(ckpt)
    assert str(err.value).startswith(f"{ckpt / 'config.yaml'}: model.llm.name '/gone/models/llm': no such model folder")


def test_evaluate_flags_reach_the_loader(monkeypatch, tmp_path):
    import allspark.evaluate_run as evaluate_run

    seen = []
    monkeypatch.setattr(evaluate_run, "evaluate_checkpoint", lambda *a, **kw: seen.append(kw) or {})
    evaluate_main(["--modality", "hsi", "--checkpoint", str(tmp_path)])
    evaluate_main(["--modality", "hsi", "--checkpoint", str(tmp_path), "--trust-remote-code", "--allow-download"])
    assert [(kw["trust_remote_code"], kw["allow_download"]) for kw in seen] == [(False, False), (True, True)]


# -- 5. resume: log.jsonl exact, config unchanged ------------------------------------------------------------------

def test_log_truncation_drops_later_steps_the_test_record_and_a_torn_line(tmp_path):
    from allspark.training import _JsonlLog

    path = tmp_path / "log.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    records.insert(4, {"epoch": 1, "step": 4, "val/OA": 0.5, "best": True})
    lines = [json.dumps(r) for r in records] + [json.dumps({"test/OA": 0.4}), '{"step": 7, "lo']
    path.write_text("\n".join(lines))
    log = _JsonlLog(path, enabled=True)
    assert log.truncate(4) == 4  # steps 5 and 6, the test record, the torn line
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4] and "val/OA" in kept[-1]
    assert log.truncate(4) == 0 and len(path.read_text().splitlines()) == 5
    # a checkpoint taken before its epoch's validation: that validation runs again, its old record goes
    assert log.truncate(4, revalidates=True) == 1
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # no temporary file left
    assert _JsonlLog(tmp_path / "absent.jsonl", enabled=True).truncate(3) == 0


class _Crash(RuntimeError):
    pass


def test_resume_logs_every_step_once_and_refuses_a_changed_config(tmp_path):
    from allspark.training import find_latest_checkpoint, train

    out = tmp_path / "run"
    base = TINY_HSI + ["train.save_every_steps=2", "train.keep_checkpoints=10", "train.log_every_steps=1"]
    cfg = load_config("hsi", overrides=base + ["train.epochs=1"])

    def crash_at_5(state):
        if state.global_step == 5:
            raise _Crash("simulated kill")

    with pytest.raises(_Crash):
        train(cfg, out, step_callback=crash_at_5)
    assert find_latest_checkpoint(out).name == "step-4"
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5]  # step 5 was logged after the last checkpoint
    saved = (out / "config.yaml").read_text()

    changed = load_config("hsi", overrides=base + ["train.epochs=1", "train.lr=1e-3", "data.batch_size=16"])
    with pytest.raises(UserError) as err:
        train(changed, out, resume=True)
    msg = str(err.value)
    assert msg.startswith(f"--resume: the config differs from the one {out / 'checkpoints' / 'step-4'} was trained "
                          f"with ({out / 'config.yaml'}) in 2 key(s):")
    assert "data.batch_size (32 -> 16)" in msg and "train.lr (0.003 -> 0.001)" in msg
    assert "only train.epochs and train.max_steps may change on resume" in msg
    assert (out / "config.yaml").read_text() == saved  # the refused run rewrote nothing

    longer = load_config("hsi", overrides=base + ["train.epochs=2"])  # the schedule's length may change
    train(longer, out, resume=True)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 19)), train_steps  # 9 steps an epoch, each logged once
    val_steps = [r["step"] for r in records if "val/OA" in r]
    assert val_steps == [9, 18]
    assert sum("test/OA" in r for r in records) == 1


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path):
    from allspark.training import train

    cfg = load_config("hsi", overrides=TINY_HSI)
    with pytest.raises(UserFileNotFoundError, match="--resume: no checkpoint under"):
        train(cfg, tmp_path / "run", resume=True)


# -- 6. atomic writes: mode and fsync ----------------------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask, file_mode, dir_mode):
    from allspark.io import atomic_dir, atomic_write_text, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_dir(tmp_path / "best") as tmp:
            (tmp / "config.yaml").write_text("a: 1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "best").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "best" / "config.yaml").stat().st_mode) == file_mode


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_atomic_writes_fsync_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from allspark.io import atomic_dir, atomic_write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "metrics.json", "{}")
    kinds = [(kind, Path(p).name) for kind, p in events]
    assert kinds[0][0] == "fsync" and kinds[0][1].startswith(".metrics.json.")  # the temporary file's data
    assert kinds[1:] == [("replace", "metrics.json"), ("fsync", tmp_path.name)]  # then the rename, the folder
    events.clear()
    with atomic_dir(tmp_path / "best") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    kinds = [(kind, Path(p).name) for kind, p in events]
    assert kinds[0] == ("fsync", "model.safetensors")
    assert kinds[1][0] == "fsync" and kinds[1][1].startswith(".best.")  # the new folder's entries
    assert kinds[2:] == [("replace", "best"), ("fsync", tmp_path.name)]


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from allspark.io import atomic_write_text

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_text(target, "new")
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# -- 7. test infrastructure: caches and demo keys ----------------------------------------------------------------

def test_session_cache_is_fresh_but_the_llm_cache_is_shared(pytestconfig, tmp_path_factory):
    from allspark.data import cache_dir
    from allspark.llm import _gguf_cache_dir, llm_cache_root, smollm2_gguf_path

    caller = pytestconfig.allspark_caller_cache_env
    if not caller["ALLSPARK_CACHE"]:
        # (pytest -n N: the run's workers share one cache beside their own temporary folders)
        assert cache_dir().is_relative_to(tmp_path_factory.getbasetemp().parent
                                          if os.environ.get("PYTEST_XDIST_WORKER") else tmp_path_factory.getbasetemp())
    expected_llm = caller["ALLSPARK_LLM_CACHE"] or Path(caller["ALLSPARK_CACHE"] or
                                                        Path.home() / ".cache" / "allspark") / "llm"
    assert llm_cache_root() == Path(expected_llm).expanduser()
    assert _gguf_cache_dir(smollm2_gguf_path()).parent == llm_cache_root()


def test_llm_cache_root_follows_its_own_variable_else_the_cache(monkeypatch, tmp_path):
    from allspark.llm import llm_cache_root

    monkeypatch.setenv("ALLSPARK_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("ALLSPARK_LLM_CACHE")
    assert llm_cache_root() == tmp_path / "c" / "llm"
    monkeypatch.setenv("ALLSPARK_LLM_CACHE", str(tmp_path / "shared"))
    assert llm_cache_root() == tmp_path / "shared"


DEMO_READER = '''
from allspark.data.base import ModalityDataset

SIZE = {size}


class Reader(ModalityDataset):
    demo_version = {version}

    @classmethod
    def write_demo(cls, root, seed=0):
        (root / "values.txt").write_text(" ".join(str(seed + i) for i in range(SIZE)))
'''


def _reader(tmp_path, name, size, version=1):
    import importlib

    (tmp_path / f"{name}.py").write_text(DEMO_READER.format(size=size, version=version))
    importlib.invalidate_caches()
    return importlib.import_module(name).Reader


def test_demo_data_is_keyed_by_its_generator_source_and_version(tmp_path, monkeypatch):
    from allspark.data import demo_key, demo_root
    from allspark.registry import DATASETS

    monkeypatch.setenv("ALLSPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b, c = (_reader(tmp_path, "demo_a", 3), _reader(tmp_path, "demo_b", 4), _reader(tmp_path, "demo_c", 3, 2))
    assert demo_key(a).startswith("v1-") and demo_key(c).startswith("v2-")
    assert len({demo_key(a), demo_key(b), demo_key(c)}) == 3  # a changed constant or version: a new key
    assert demo_key(a) == demo_key(_reader(tmp_path, "demo_a2", 3))  # same code, same key
    roots = []
    for reader in (a, b):
        DATASETS.register("reliability_demo", reader, force=True)
        try:
            roots.append(demo_root("reliability_demo", seed=1))
        finally:
            DATASETS.unregister("reliability_demo")
    assert roots[0] != roots[1]
    assert roots[0].name == f"reliability_demo-{demo_key(a)}-seed1"
    assert (roots[0] / "values.txt").read_text() == "1 2 3" and (roots[1] / "values.txt").read_text() == "1 2 3 4"
