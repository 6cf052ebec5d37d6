"""One model over several tasks (allspark/multitask.py) on the tiny random LLM: routing by task name, the shared
adapters saved once under stable prefixes, a checkpoint that lacks a task, the task schedules' draws, a joint run
through ``train.py --modality hsi,table`` (every task's loss falls and its test metric beats its baseline),
``evaluate.py`` on the joint checkpoint, a new task added against the held shared parts (the old tasks' metrics
unchanged), exact resume after a kill mid-run, and the errors of a bad task list."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allspark.config import ConfigError
from allspark.data import build_dataset
from allspark.errors import UserError
from allspark.multitask import (MultiTaskAllSpark, TaskSchedule, aggregate_score, load_joint_config,
                                resolve_task_configs, train_joint)
from allspark.training import find_latest_checkpoint
from tests.helpers import ROOT

#: both tasks shrunk to test size (72 HSI training pixels, 141 table rows; 9 and 18 batches of 8 a pass), LoRA
#: dropout and random prompts on, so an exact resume must restore the RNG; ``TASK:key=value`` is one task's
TINY = ["model.llm.name=tiny", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", "eval.baselines=[]",
        "data.batch_size=8", "model.llm.adapter.dropout=0.1",
        "hsi:model.encoders.0.args={dim: 16, depth: 1, heads: 2, bands_per_token: 8}", "hsi:data.args.train_ratio=0.1",
        "table:model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}", "table:data.args.train_ratio=0.05",
        "joint.train.log_every_steps=1", "joint.train.lr=3e-3"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def tasks():
    """(configs, train sets) of hsi and table at test size."""
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=TINY))
    return cfgs, {n: build_dataset(c, "train") for n, c in cfgs.items()}


def _model(tasks, names, seed=0) -> MultiTaskAllSpark:
    cfgs, sets = tasks
    torch.manual_seed(seed)
    return MultiTaskAllSpark({n: cfgs[n] for n in names}, {n: sets[n].info() for n in names})


def _batch(tasks, name, n=4):
    ds = tasks[1][name]
    return ds.collate([ds[i] for i in range(n)])


# -- the model -----------------------------------------------------------------------------------------------------

def test_forward_routes_by_the_batch_task_to_that_task_only(tasks):
    model = _model(tasks, ["hsi", "table"])
    model.eval()
    table, hsi = _batch(tasks, "table"), _batch(tasks, "hsi")
    with torch.no_grad():
        assert torch.equal(model({**table, "task": "table"}).predictions["pred"],
                           model.tasks["table"](table).predictions["pred"])
        assert model({**hsi, "task": "hsi"}).predictions["pred"].shape == (4,)
    model.train()
    model({**table, "task": "table"}).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("tasks.table.") for n in grads) and any(n.startswith("llm.") for n in grads)
    assert not any(n.startswith("tasks.hsi.") for n in grads)  # a table batch trains no part of the hsi task
    with pytest.raises(ValueError, match=r"unknown task 'rgb': this model holds tasks \['hsi', 'table'\]"):
        model({**table, "task": "rgb"})
    with pytest.raises(ValueError, match="names no task"):
        model(table)
    one = _model(tasks, ["table"])
    assert one(table).loss is not None  # a one-task model takes a batch that names no task


def test_the_shared_adapters_are_held_and_saved_once(tasks, tmp_path):
    from allspark.model import AllSpark

    model = _model(tasks, ["hsi", "table"])
    assert model.tasks["hsi"]._llm is model.tasks["table"]._llm is model._llm
    assert model.tasks["hsi"].llm is model.llm  # the parts reach the LLM but do not register it
    state = model.trainable_state_dict()
    shared = sorted(k for k in state if k.startswith("llm."))
    single = AllSpark(tasks[0]["hsi"], tasks[1]["hsi"].info())
    assert shared == sorted(k for k in single.trainable_state_dict() if k.startswith("llm."))  # same names
    assert shared and all("lora_" in k for k in shared)
    assert all(k.startswith(("llm.", "tasks.hsi.", "tasks.table.")) for k in state)
    assert not any(".llm." in k for k in state)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(state)
    for task in ("hsi", "table"):  # each part saved as its single-task model would save it, under tasks.<name>.
        names = {k for k in model.tasks[task].trainable_state_dict()}
        assert {f"tasks.{task}.{k}" for k in names} == {k for k in state if k.startswith(f"tasks.{task}.")}
    model.save_pretrained(tmp_path / "joint")
    saved = load_file(str(tmp_path / "joint" / "model.safetensors"))
    assert sorted(saved) == sorted(state)
    assert (tmp_path / "joint" / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in (tmp_path / "joint" / "tasks").iterdir()} == {"hsi", "table"}
    back = MultiTaskAllSpark.from_pretrained(tmp_path / "joint")
    again = back.trainable_state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_a_checkpoint_that_lacks_a_task_loads_with_strict_false_and_says_which(tasks):
    old = _model(tasks, ["hsi"], seed=1)
    held = {k: v.clone() for k, v in old.trainable_state_dict().items()}
    new = _model(tasks, ["hsi", "table"], seed=2)
    fresh_table = {k: v.clone() for k, v in new.trainable_state_dict().items() if k.startswith("tasks.table.")}
    with pytest.raises(ValueError, match=r"lacks task\(s\) \['table'\].*strict=False"):
        new.load_trainable_state_dict(held)
    report = new.load_trainable_state_dict(held, strict=False)
    assert report.missing_tasks == ["table"] and report.unexpected_tasks == [] and report.loaded == len(held)
    now = new.trainable_state_dict()
    assert all(torch.equal(now[k], v) for k, v in held.items())  # the held shared and hsi parts
    assert all(torch.equal(now[k], v) for k, v in fresh_table.items())  # the new task keeps its initial weights
    # the other way round: one task of a joint checkpoint (strict=False), but never a part of a task
    report = old.load_trainable_state_dict(new.trainable_state_dict(), strict=False)
    assert report.unexpected_tasks == ["table"]
    partial = dict(held)
    partial.pop(next(k for k in partial if k.startswith("tasks.hsi.")))
    with pytest.raises(ValueError, match="missing tensors"):
        new.load_trainable_state_dict(partial, strict=False)


# -- the schedule and the aggregate ----------------------------------------------------------------------------------

def test_round_robin_cycles_the_tasks_in_list_order():
    schedule = TaskSchedule(["hsi", "table", "graph"], [100, 10, 1], "round_robin", seed=5)
    assert schedule.draws(7) == ["hsi", "table", "graph", "hsi", "table", "graph", "hsi"]
    assert schedule.draws(2, start=4) == ["table", "graph"]  # a resumed run picks up where it was
    assert schedule.probabilities == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("kind,sizes,temperature", [("proportional", [30, 10], 1.0), ("temperature", [90, 10], 2.0)])
def test_proportional_and_temperature_draws_are_exact_for_a_seed(kind, sizes, temperature):
    # 30:10 proportional and 90:10 at T=2 (sqrt(90):sqrt(10) = 3:1) both draw "a" with probability 3/4
    schedule = TaskSchedule(["a", "b"], sizes, kind, temperature=temperature, seed=7)
    assert schedule.probabilities == pytest.approx([0.75, 0.25])
    draws = schedule.draws(400)
    # by hand, the documented rule: u = torch.rand on a generator seeded seed * 1_000_003 + step; "a" iff u < 0.75
    expected = ["a" if torch.rand(1, generator=torch.Generator().manual_seed(7 * 1_000_003 + s), dtype=torch.float64)
                < 0.75 else "b" for s in range(400)]
    assert draws == expected
    assert 270 <= draws.count("a") <= 330  # ~300 of 400 (binomial sd 8.7)
    assert TaskSchedule(["a", "b"], sizes, kind, temperature=temperature, seed=7).draws(400) == draws  # pure
    assert TaskSchedule(["a", "b"], sizes, kind, temperature=temperature, seed=8).draws(400) != draws


def test_aggregate_is_direction_aware_and_relative():
    # OA 0.5 -> 0.6 is +20 %, RMSE 40 -> 30 (lower is better) is +25 %: mean +22.5 %
    assert aggregate_score({"hsi": 0.6, "table": 30.0}, {"hsi": 0.5, "table": 40.0},
                           {"hsi": True, "table": False}) == pytest.approx(0.225)
    assert aggregate_score({"hsi": 0.4, "table": 50.0}, {"hsi": 0.5, "table": 40.0},
                           {"hsi": True, "table": False}) == pytest.approx(-0.225)


# -- joint training ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """``train.py --modality hsi,table``, 40 steps round-robin, validated at steps 20 and 40."""
    from allspark.cli import train_main

    out = tmp_path_factory.mktemp("joint") / "run"
    try:
        assert train_main(["--modality", "hsi,table", "--output-dir", str(out), *TINY, "joint.train.steps=40",
                           "joint.train.eval_every_steps=20", "joint.schedule.type=round_robin"]) == 0
    finally:
        _reset_accelerate()
    return out


def test_train_py_short_form_trains_both_tasks_and_each_loss_falls(joint_run):
    out = joint_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"hsi", "table"} and metrics["steps_per_task"] == {"hsi": 20, "table": 20}
    hsi, table = metrics["tasks"]["hsi"], metrics["tasks"]["table"]
    assert hsi["OA"] > 2 / 9  # nine classes: twice chance
    assert table["RMSE"] < table["baseline/RMSE"]  # the training-mean predictor
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "task" in r]
    assert [r["task"] for r in train[:4]] == ["hsi", "table", "hsi", "table"]
    for task in ("hsi", "table"):
        losses = [r[f"train/{task}/loss"] for r in train if r["task"] == task]
        assert len(losses) == 20
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (task, losses)
    val = [r for r in records if "val/aggregate" in r]
    assert [r["step"] for r in val] == [20, 40] and all("val/hsi/OA" in r and "val/table/RMSE" in r for r in val)
    assert val[0]["val/aggregate"] == 0.0 and val[0]["best"]  # the first validation is the reference
    assert metrics["aggregate"]["best_step"] == max(val, key=lambda r: r["val/aggregate"])["step"]
    assert any(k.startswith("test/table/") for k in records[-1])
    assert json.loads((out / "best" / "tasks" / "table" / "data_info.json").read_text())


def test_evaluate_py_evaluates_every_task_of_a_joint_checkpoint_or_one(joint_run, tmp_path):
    from allspark.cli import evaluate_main
    from allspark.multitask import evaluate_joint

    trained = json.loads((joint_run / "metrics.json").read_text())["tasks"]
    try:
        report = evaluate_joint(joint_run, output_dir=tmp_path / "all")
        _reset_accelerate()
        assert evaluate_main(["--checkpoint", str(joint_run), "--modality", "table",
                              "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        _reset_accelerate()
    assert set(report["tasks"]) == {"hsi", "table"}
    assert report["tasks"]["hsi"]["OA"] == pytest.approx(trained["hsi"]["OA"])  # same weights, same test split
    assert report["tasks"]["table"]["RMSE"] == pytest.approx(trained["table"]["RMSE"])
    text = (tmp_path / "all" / "report.md").read_text()
    assert "## hsi" in text and "## table" in text and (tmp_path / "all" / "hsi" / "report.md").is_file()
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["tasks"]["table"]["RMSE"] == \
        pytest.approx(trained["table"]["RMSE"])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert list(one["tasks"]) == ["table"] and one["tasks"]["table"]["RMSE"] == pytest.approx(trained["table"]["RMSE"])


def test_a_new_task_trains_against_the_held_shared_parts_and_old_metrics_stay(joint_run, tmp_path):
    """A third task (PM2.5 under another name, from configs/table.yaml) added to the hsi+table checkpoint with
    ``--init-from``: the shared adapters and the old tasks are held, so their weights and metrics are unchanged."""
    import yaml

    from allspark.cli import train_main
    from allspark.multitask import evaluate_joint

    extend = tmp_path / "extend.yaml"
    extend.write_text(yaml.safe_dump({"tasks": [{"name": "pm25", "config": str(ROOT / "configs" / "table.yaml")}],
                                      "train": {"steps": 16, "lr": 3e-3, "log_every_steps": 1}}))
    common = [t.replace("table:", "pm25:") for t in TINY if not t.startswith(("hsi:", "joint."))]
    out = tmp_path / "run"
    try:
        assert train_main(["--config", str(extend), "--init-from", str(joint_run), "--output-dir", str(out),
                           *common]) == 0
        _reset_accelerate()
        before = evaluate_joint(joint_run, output_dir=tmp_path / "before")
        _reset_accelerate()
        after = evaluate_joint(out, output_dir=tmp_path / "after")
    finally:
        _reset_accelerate()
    assert set(after["tasks"]) == {"hsi", "table", "pm25"}
    for task, metric in (("hsi", "OA"), ("hsi", "kappa"), ("table", "RMSE"), ("table", "MAE")):
        assert after["tasks"][task][metric] == before["tasks"][task][metric], (task, metric)
    old = load_file(str(joint_run / "best" / "model.safetensors"))
    new = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old)  # the held parts, bit for bit
    assert any(k.startswith("tasks.pm25.") for k in new)
    pm25 = after["tasks"]["pm25"]
    assert pm25["RMSE"] < pm25["baseline/RMSE"]
    # extending with a task the checkpoint holds, or with another LLM, is refused before any training
    with pytest.raises(ConfigError, match=r"holds task\(s\) \['table'\] already"):
        train_main(["--modality", "table", "--init-from", str(joint_run), "--output-dir", str(tmp_path / "x"),
                    *[t for t in TINY if not t.startswith(("hsi:", "joint."))]])
    with pytest.raises(ConfigError, match="its LLM is not this run's.*model.llm.tiny.hidden_size"):
        train_main(["--config", str(extend), "--init-from", str(joint_run), "--output-dir", str(tmp_path / "y"),
                    *common, "model.llm.tiny.hidden_size=32"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_shipped_joint_config_resolves_every_task():
    from allspark.multitask import joint_config_path

    cfg = load_joint_config(joint_config_path(), overrides=["model.llm.name=tiny"])
    cfgs = resolve_task_configs(cfg)
    assert list(cfgs) == ["hsi", "table", "graph"] and cfg.schedule.type == "temperature"
    assert cfgs["hsi"].data.batch_size == 16  # the task's own demo block applied, its YAML unchanged


def _joint(*extra):
    return load_joint_config(tasks=["hsi", "table"], overrides=[
        *TINY, "joint.schedule.type=proportional", "joint.train.steps=24", "joint.train.save_every_steps=4",
        "joint.train.eval_every_steps=12", "joint.train.keep_checkpoints=10", "joint.train.test_at_end=false",
        *extra])


class _Kill(RuntimeError):
    pass


def test_a_joint_run_killed_mid_run_resumes_to_bit_identical_weights(tmp_path, monkeypatch):
    from allspark import training

    steps = {"full": [], "cut": []}
    inits = []  # data-dependent starts: once per task of a fresh run, never on resume (the weights are loaded)
    real_init = training.init_from_data
    monkeypatch.setattr(training, "init_from_data", lambda model, *a: (inits.append(model.cfg.modality),
                                                                      real_init(model, *a)))

    def record(name, kill_at=None):
        def callback(state):
            steps[name].append(state.global_step)
            if state.global_step == kill_at:
                raise _Kill("simulated kill")
        return callback

    try:
        train_joint(_joint(), tmp_path / "full", step_callback=record("full"))
        _reset_accelerate()
        with pytest.raises(_Kill):
            train_joint(_joint(), tmp_path / "cut", step_callback=record("cut", kill_at=10))
        _reset_accelerate()
        latest = find_latest_checkpoint(tmp_path / "cut")
        assert latest.name == "step-8"
        state = json.loads((latest / "trainer_state.json").read_text())
        positions = state["tasks"]
        assert sum(p["steps"] for p in positions.values()) == 8
        assert all(0 < p["batches_in_epoch"] for p in positions.values()), positions  # both loaders mid-epoch
        steps["cut"].clear()
        train_joint(_joint(), tmp_path / "cut", resume=True, step_callback=record("cut"))
    finally:
        _reset_accelerate()
    assert steps["full"] == list(range(1, 25)) and steps["cut"] == list(range(9, 25))  # resumed, not restarted
    assert inits == ["hsi", "table"] * 2
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-24" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-24" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:4]
    full_state = json.loads((tmp_path / "full" / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    cut_state = json.loads((tmp_path / "cut" / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    assert full_state == cut_state  # loader positions, per-task step counts, references, best step
    logged = lambda run: [(r["step"], r["task"]) for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text()
                                                                .splitlines()) if "task" in r]
    assert logged("cut") == logged("full")  # every step logged once, the same task drawn
    with pytest.raises(UserError, match="differs"):
        train_joint(_joint("joint.schedule.type=round_robin"), tmp_path / "cut", resume=True)


# -- bad input -----------------------------------------------------------------------------------------------------

def test_bad_task_lists_fail_with_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"task 'hyperspectral': unknown modality 'hyperspectral'.*Known modali.*hsi"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "hyperspectral"], overrides=TINY[:1]))
    with pytest.raises(ConfigError, match="the list is empty"):
        load_joint_config(tasks=[])
    with pytest.raises(ConfigError, match=r"lists task\(s\) \['hsi'\] more than once"):
        load_joint_config(tasks=["hsi", "hsi"])
    with pytest.raises(ConfigError, match="names task 'rgb', which is not in the task list"):
        load_joint_config(tasks=["hsi", "table"], overrides=["rgb:train.lr=1"])
    with pytest.raises(ConfigError, match=r"tasks 'hsi' and 'table' configure different LLMs.*model.llm.name"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=["hsi:model.llm.name=tiny"]))
    with pytest.raises(ConfigError, match="schedule.type must be one of"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.schedule.type=random"]),
                    tmp_path / "bad")
    # a task whose dataset cannot be read: its name in the message, and no run folder written
    with pytest.raises(UserError, match=r"task 'table': data root '.*nowhere' does not exist"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, f"table:data.root={tmp_path}/nowhere"]),
                    tmp_path / "unread")
    _reset_accelerate()
    assert not (tmp_path / "bad").exists() and not (tmp_path / "unread" / "joint.yaml").exists()


def test_train_py_exits_2_on_an_unknown_task_and_writes_nothing(tmp_path, capsys):
    from allspark.cli import run_cli, train_main

    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train_main(["--modality", "hsi,hyperspectral", "--output-dir", str(tmp_path / "run")]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: task 'hyperspectral': unknown modality 'hyperspectral'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
