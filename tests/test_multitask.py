"""One model over several tasks (allspark/multitask.py) on the tiny random LLM: routing by task name, the shared
adapters saved once under stable prefixes, a checkpoint that lacks a task, the task schedules' draws, a joint run
through ``train.py --modality hsi,table`` (every task's loss falls and its test metric beats its baseline) and its
model card, ``evaluate.py`` on the joint checkpoint, one bridge shared by three tasks (``model.bridge.shared``:
its parameter count, its forward against a hand-composed one, a run that beats every task's baseline), a new task
added against the held shared parts (the old tasks' metrics unchanged), exact resume after a kill mid-run, two
processes under torchrun against one, and the errors of bad input."""
from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from allspark.config import ConfigError
from allspark.data import build_dataset
from allspark.errors import UserError
from allspark.multitask import (MultiTaskAllSpark, TaskSchedule, aggregate_score, load_joint_config,
                                resolve_task_configs, train_joint)
from allspark.training import find_latest_checkpoint
from tests.helpers import ROOT, free_port, run, reset_accelerate

#: both tasks shrunk to test size (72 HSI training pixels, 141 table rows; 9 and 18 batches of 8 a pass), LoRA
#: dropout and random prompts on, so an exact resume must restore the RNG; ``TASK:key=value`` is one task's
TINY = ["model.llm.name=tiny", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", "eval.baselines=[]",
        "data.batch_size=8", "model.llm.adapter.dropout=0.1",
        "hsi:model.encoders.0.args={dim: 16, depth: 1, heads: 2, bands_per_token: 8}", "hsi:data.args.train_ratio=0.1",
        "hsi:eval.args.scene_map=false",  # 1600 pixels per evaluation; tests/test_predict.py covers the scene map
        "table:model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}", "table:data.args.train_ratio=0.05",
        "joint.train.log_every_steps=1", "joint.train.lr=3e-3"]
#: three tasks of three encoder widths (hsi 16, table 24, sar 32) for the shared bridge
THREE = [*TINY, "table:model.encoders.0.args={dim: 24, depth: 1, heads: 2, dropout: 0.0}",
         "sar:model.encoders.0.args={channels: [8, 16, 32], kernel_sizes: [5, 5, 3], bn_momentum: 0.3}"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")




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


def test_a_task_without_trainable_tensors_of_its_own_round_trips_through_its_checkpoint():
    """The text task has no encoder, no bridge and the LLM's own LM head as its head: nothing of its own in the
    checkpoint. A joint model with it saves and loads strictly (its absence is not a missing task; this failed at the
    end of a five-task run, when ``best/`` was loaded for the test pass), and a checkpoint lacking a task that does
    own tensors is still refused."""
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "text"],
                                                  overrides=[o for o in TINY if not o.startswith("table:")]))
    infos = {n: build_dataset(c, "train").info() for n, c in cfgs.items()}
    torch.manual_seed(0)
    model = MultiTaskAllSpark(cfgs, infos)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert not any(k.startswith("tasks.text.") for k in state) and any(k.startswith("tasks.hsi.") for k in state)
    torch.manual_seed(1)
    other = MultiTaskAllSpark(cfgs, infos)
    report = other.load_trainable_state_dict(state)
    assert report.missing_tasks == [] and report.unexpected_tasks == [] and report.loaded == len(state)
    assert all(torch.equal(other.trainable_state_dict()[k], v) for k, v in state.items())
    without_hsi = {k: v for k, v in state.items() if not k.startswith("tasks.hsi.")}
    with pytest.raises(ValueError, match=r"lacks task\(s\) \['hsi'\]"):
        other.load_trainable_state_dict(without_hsi)


# -- one bridge shared by the tasks -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three():
    """(configs, train sets) of hsi, table and sar, whose encoders are 16, 24 and 32 wide."""
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "table", "sar"], overrides=THREE))
    return cfgs, {n: build_dataset(c, "train") for n, c in cfgs.items()}


def _bridge_parameters(d: int, w: int, n: int, depth: int, ff: int) -> int:
    """A bridge's queries, layers and final norm by hand: ``n`` queries of width ``d`` (heads x dim_head = d),
    tokens of width ``w``; per layer LayerNorms of the queries, the tokens and the FFN input (weight + bias), the
    bias-free q, kv and out projections, and the FFN's two biased linears."""
    layer = 2 * d + 2 * w + d * d + w * 2 * d + d * d + 2 * d + (d * ff * d + ff * d) + (ff * d * d + d)
    return n * d + depth * layer + 2 * d


def test_a_shared_bridge_is_one_set_of_queries_and_layers_with_a_projection_per_encoder_width(three):
    cfgs, sets = three
    infos = {n: sets[n].info() for n in cfgs}
    own = MultiTaskAllSpark(cfgs, infos)
    shared = MultiTaskAllSpark(cfgs, infos, shared_bridge=True)
    widths = {n: [e.out_dim for e in shared.tasks[n].encoders] for n in cfgs}
    assert widths == {"hsi": [16], "table": [24], "sar": [32]}
    assert shared.bridge_width == 32  # the widest encoder
    d = shared.hidden_size
    assert d == 64
    core = {w: _bridge_parameters(d, w, n=4, depth=1, ff=2) for w in (16, 24, 32)}
    # per task: a bridge at its own encoder's width; shared: one at width 32, and hsi's and table's projections
    # to it (Linear 16->32 and 24->32, with bias); sar's encoder is 32 wide already (no projection)
    assert sum(p.numel() for n, p in own.named_parameters() if ".bridge." in n) == core[16] + core[24] + core[32]
    assert sum(p.numel() for n, p in shared.named_parameters() if "bridge." in n) == \
        core[32] + (16 * 32 + 32) + (24 * 32 + 32)
    assert own.num_parameters() - shared.num_parameters() == core[16] + core[24] - (16 * 32 + 32) - (24 * 32 + 32)
    state = shared.trainable_state_dict()
    assert "bridge.queries" in state and not any(k.startswith("tasks.") and ".queries" in k for k in state)
    assert state["tasks.hsi.bridge.input_proj.0.weight"].shape == (32, 16)
    assert state["tasks.table.bridge.input_proj.0.weight"].shape == (32, 24)
    assert not any(k.startswith("tasks.sar.bridge.") for k in state)
    assert all(shared.tasks[n].bridge.shared is shared.bridge for n in cfgs)
    assert shared.shared_settings() == {"bridge": {"shared": True, "width": 32}}
    wider = MultiTaskAllSpark(cfgs, infos, shared_bridge=True, bridge_width=48)  # every encoder projected
    assert {k for k in wider.trainable_state_dict() if ".input_proj." in k and k.endswith("weight")} == {
        f"tasks.{n}.bridge.input_proj.0.weight" for n in cfgs}


def _hand_bridge(shared, proj: torch.nn.Linear, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The shared bridge written out: the task's projection, then per layer pre-norm multi-head cross-attention
    of the queries over the tokens (padding masked) and a GELU FFN, each with a residual, then the final norm."""
    b, n_q, d = tokens.shape[0], shared.queries.shape[0], shared.queries.shape[1]
    t = tokens @ proj.weight.T + proj.bias
    x = shared.queries.expand(b, n_q, d)
    for layer in shared.layers:
        heads = layer.attn.heads
        q = F.layer_norm(x, (d,), layer.norm_q.weight, layer.norm_q.bias) @ layer.attn.to_q.weight.T
        normed = F.layer_norm(t, (t.shape[-1],), layer.norm_tokens.weight, layer.norm_tokens.bias)
        k, v = (normed @ layer.attn.to_kv.weight.T).chunk(2, dim=-1)
        split = lambda z: z.reshape(b, z.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n_q, -1)
        x = x + attended @ layer.attn.to_out.weight.T
        first, second = layer.ff[0], layer.ff[3]
        hidden = F.gelu(F.layer_norm(x, (d,), layer.norm_ff.weight, layer.norm_ff.bias) @ first.weight.T + first.bias)
        x = x + hidden @ second.weight.T + second.bias
    return F.layer_norm(x, (d,), shared.norm.weight, shared.norm.bias)


def test_a_shared_bridge_forward_is_the_hand_composed_one(three):
    """hsi's bridge tokens are its projection then the shared layers, written out by hand; its whole forward is
    that of a single-task model holding the same weights (the shared bridge's under its own names)."""
    from allspark.bridge import ModalBridge
    from allspark.model import AllSpark

    cfgs, sets = three
    torch.manual_seed(0)
    model = MultiTaskAllSpark(cfgs, {n: sets[n].info() for n in cfgs}, shared_bridge=True).eval()
    ds = sets["hsi"]
    batch = ds.collate([ds[i] for i in range(5)])
    part = model.tasks["hsi"]
    with torch.no_grad():
        tokens = part.encode_tokens(batch)[0]
        by_hand = _hand_bridge(model.bridge, part.bridge.input_proj[0], tokens.tokens, tokens.mask)
        assert torch.allclose(part.encode(batch), by_hand, atol=1e-5)
        single = AllSpark(cfgs["hsi"], ds.info(), llm=model._llm)
        b = cfgs["hsi"].model.bridge
        single.bridge = ModalBridge([16], model.hidden_size, width=32, num_queries=b.num_queries, depth=b.depth,
                                    heads=b.heads, ff_mult=b.ff_mult)
        joint = model.trainable_state_dict()
        task_own = ("encoders.", "head.", "bridge.input_proj.", "bridge.modality_embed")
        single.load_trainable_state_dict({k: joint[f"tasks.hsi.{k}" if k.startswith(task_own) else k]
                                          for k in single.trainable_state_dict()})
        single.eval()
        expected = single(batch).predictions
        got = model({**batch, "task": "hsi"}).predictions
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k].float(), got[k].float(), atol=1e-5) for k in expected)
    # a sar batch trains the shared bridge and sar's part, not hsi's projection
    model.train()
    sar = sets["sar"].collate([sets["sar"][i] for i in range(4)])
    model({**sar, "task": "sar"}).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "bridge.queries" in grads and "bridge.layers.0.attn.to_kv.weight" in grads
    assert not any(n.startswith(("tasks.hsi.", "tasks.table.")) for n in grads)


def test_a_shared_bridge_is_saved_once_and_loads_only_into_a_shared_model(three, tmp_path):
    cfgs, sets = three
    infos = {n: sets[n].info() for n in cfgs}
    model = MultiTaskAllSpark(cfgs, infos, shared_bridge=True)
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert sorted(saved) == sorted(model.trainable_state_dict())
    assert json.loads((tmp_path / "m" / "shared.json").read_text()) == {"bridge": {"shared": True, "width": 32}}
    back = MultiTaskAllSpark.from_pretrained(tmp_path / "m")
    assert back.bridge_width == 32 and all(torch.equal(back.trainable_state_dict()[k], v) for k, v in saved.items())
    one = MultiTaskAllSpark.from_pretrained(tmp_path / "m", tasks=["table"])  # one task of it, into the held bridge
    assert one.task_names == ["table"] and torch.equal(one.bridge.queries, saved["bridge.queries"])
    with pytest.raises(ValueError, match=r"checkpoint has one bridge shared by its tasks.*the model one bridge per "
                                         r"task"):
        MultiTaskAllSpark(cfgs, infos).load_trainable_state_dict(saved)
    (tmp_path / "m" / "shared.json").write_text('{"bridge": {"shared": "yes"}}')
    with pytest.raises(UserError, match=r"shared.json: expected \{\"bridge\".*KeyError"):
        MultiTaskAllSpark.from_pretrained(tmp_path / "m")


def test_a_task_without_encoders_has_no_bridge_beside_a_shared_one(three, tmp_path):
    """text reads its tokens directly: with hsi it shares no bridge, and loaded alone from the checkpoint it
    needs none (the shared bridge's tensors are left out)."""
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "text"], overrides=TINY[:5]))
    sets = {n: build_dataset(c, "train") for n, c in cfgs.items()}
    model = MultiTaskAllSpark(cfgs, {n: d.info() for n, d in sets.items()}, shared_bridge=True)
    assert model.tasks["text"].bridge is None and model.tasks["hsi"].bridge.shared is model.bridge
    model.save_pretrained(tmp_path / "m")
    text = MultiTaskAllSpark.from_pretrained(tmp_path / "m", tasks=["text"])
    assert text.bridge is None and not any(k.startswith("bridge.") for k in text.trainable_state_dict())
    batch = sets["text"].collate([sets["text"][i] for i in range(3)])
    model.eval(), text.eval()
    with torch.no_grad():
        a, b = model({**batch, "task": "text"}).predictions, text(batch).predictions
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="none of the tasks \\['text'\\] has an encoder"):
        MultiTaskAllSpark({"text": cfgs["text"]}, {"text": sets["text"].info()}, shared_bridge=True)


def test_a_shared_bridge_needs_the_tasks_to_agree_on_its_architecture(three):
    cfgs, sets = three
    infos = {n: sets[n].info() for n in cfgs}
    deeper = resolve_task_configs(load_joint_config(tasks=["hsi", "table", "sar"],
                                                    overrides=[*THREE, "sar:model.bridge.depth=2"]))
    with pytest.raises(ConfigError, match=r"tasks 'hsi' and 'sar' configure different bridges, but with "
                                          r"model.bridge.shared they share one: model.bridge.depth \(1 vs 2\)"):
        MultiTaskAllSpark(deeper, infos, shared_bridge=True)
    MultiTaskAllSpark(deeper, infos)  # one bridge per task: each its own depth
    with pytest.raises(ConfigError, match="model.bridge.width=32 is the width of a shared bridge"):
        MultiTaskAllSpark(cfgs, infos, bridge_width=32)


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
    """``train.py --modality hsi,table``, 40 steps round-robin, validated at steps 20 and 40; table also scored
    against a classical baseline (ridge)."""
    from allspark.cli import train_main

    out = tmp_path_factory.mktemp("joint") / "run"
    try:
        assert train_main(["--modality", "hsi,table", "--output-dir", str(out), *TINY, "joint.train.steps=40",
                           "joint.train.eval_every_steps=20", "joint.schedule.type=round_robin",
                           "table:eval.baselines=[{type: ridge, args: {inputs: [num, cat, num_mask]}}]"]) == 0
    finally:
        reset_accelerate()
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


def test_a_joint_checkpoint_has_a_model_card_with_a_section_per_task(joint_run):
    from allspark.model_card import _fmt

    metrics = json.loads((joint_run / "metrics.json").read_text())
    card = (joint_run / "best" / "README.md").read_text()
    assert card.startswith("# AllSpark joint checkpoint: `hsi`, `table`")
    assert "- language model: `tiny` (frozen), adapter `lora` (r=8" in card and "- modal bridge: one per task" in card
    sections = card.split("\n## ")
    hsi = next(t for t in sections if t.startswith("Task `hsi`"))
    table = next(t for t in sections if t.startswith("Task `table`"))
    assert f"| **OA** | {_fmt(metrics['tasks']['hsi']['OA'])} |" in hsi and "`hsi_spectral`" in hsi
    assert "classes: Asphalt, Meadows" in hsi and "RMSE" not in hsi
    m = metrics["tasks"]["table"]
    assert f"| **RMSE** | {_fmt(m['RMSE'])} |" in table and f"| baseline/RMSE | {_fmt(m['baseline/RMSE'])} |" in table
    # the classical baseline beside the model, on the main metric
    assert f"| this model | {_fmt(m['RMSE'])} |" in table
    assert f"| ridge | {_fmt(m['baselines']['ridge']['RMSE'])} |" in table
    assert f"Validation RMSE of the best step: {_fmt(m['val/RMSE'])}." in table
    assert "MultiTaskAllSpark.from_pretrained" in card and "```yaml\nname: allspark" in card  # the joint config
    assert f"- best step {metrics['aggregate']['best_step']}," in card


def test_evaluate_py_evaluates_every_task_of_a_joint_checkpoint_or_one(joint_run, tmp_path):
    from allspark.cli import evaluate_main
    from allspark.multitask import evaluate_joint

    trained = json.loads((joint_run / "metrics.json").read_text())["tasks"]
    try:
        report = evaluate_joint(joint_run, output_dir=tmp_path / "all")
        reset_accelerate()
        assert evaluate_main(["--checkpoint", str(joint_run), "--modality", "table",
                              "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        reset_accelerate()
    assert set(report["tasks"]) == {"hsi", "table"}
    assert report["tasks"]["hsi"]["OA"] == pytest.approx(trained["hsi"]["OA"])  # same weights, same test split
    assert report["tasks"]["table"]["RMSE"] == pytest.approx(trained["table"]["RMSE"])
    text = (tmp_path / "all" / "report.md").read_text()
    assert "## hsi" in text and "## table" in text and (tmp_path / "all" / "hsi" / "report.md").is_file()
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["tasks"]["table"]["RMSE"] == \
        pytest.approx(trained["table"]["RMSE"])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert list(one["tasks"]) == ["table"] and one["tasks"]["table"]["RMSE"] == pytest.approx(trained["table"]["RMSE"])


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """``train.py --modality hsi,table,sar`` with one shared bridge (encoders 16, 24 and 32 wide), 48 steps
    round-robin, validated at steps 24 and 48."""
    from allspark.cli import train_main

    out = tmp_path_factory.mktemp("shared") / "run"
    try:
        assert train_main(["--modality", "hsi,table,sar", "--output-dir", str(out), *THREE,
                           "joint.model.bridge.shared=true", "joint.train.steps=48", "joint.train.eval_every_steps=24",
                           "joint.schedule.type=round_robin"]) == 0
    finally:
        reset_accelerate()
    return out


def test_three_tasks_through_one_shared_bridge_each_beat_their_baseline(shared_run):
    metrics = json.loads((shared_run / "metrics.json").read_text())
    assert metrics["steps_per_task"] == {"hsi": 16, "table": 16, "sar": 16}
    hsi, table, sar = (metrics["tasks"][t] for t in ("hsi", "table", "sar"))
    assert hsi["OA"] > 2 / 9  # nine classes: twice chance
    assert table["RMSE"] < table["baseline/RMSE"]  # the training-mean predictor
    assert sar["top1"] > 2 / 5  # five targets: twice chance
    train = [json.loads(line) for line in (shared_run / "log.jsonl").read_text().splitlines()]
    for task in ("hsi", "table", "sar"):
        losses = [r[f"train/{task}/loss"] for r in train if r.get("task") == task]
        assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, (task, losses)
    best = shared_run / "best"
    saved = load_file(str(best / "model.safetensors"))
    assert "bridge.queries" in saved and "tasks.hsi.bridge.input_proj.0.weight" in saved
    assert not any(k.startswith("tasks.") and ".bridge.layers." in k for k in saved)  # the layers once, shared
    assert json.loads((best / "shared.json").read_text()) == {"bridge": {"shared": True, "width": 32}}
    card = (best / "README.md").read_text()
    assert "- modal bridge: one, shared by `hsi`, `table`, `sar`: 4 queries, depth 1, token width 32" in card
    assert "encoder width(s) [24] projected to 32" in card and "encoder width 32 as it is" in card


@pytest.mark.parametrize("held", ["joint_run", "shared_run"])
def test_a_new_task_trains_against_the_held_shared_parts_and_old_metrics_stay(held, request, tmp_path, monkeypatch):
    """A new task (PM2.5 under another name, from configs/table.yaml) added with ``--init-from`` to the hsi+table
    checkpoint (a bridge per task) or to the hsi+table+sar one (one shared bridge, 32 wide): the shared adapters,
    the shared bridge and the old tasks are held, so their weights and metrics are unchanged; the new task trains
    its encoder, head and (shared bridge) its projection from its 16-wide encoder into the held bridge."""
    import yaml

    from allspark.cli import train_main
    from allspark.multitask import evaluate_joint

    run_dir = request.getfixturevalue(held)
    trained = json.loads((run_dir / "metrics.json").read_text())["tasks"]
    extend = tmp_path / "extend.yaml"
    extend.write_text(yaml.safe_dump({"tasks": [{"name": "pm25", "config": str(ROOT / "configs" / "table.yaml")}],
                                      "train": {"steps": 16, "lr": 3e-3, "log_every_steps": 1}}))
    common = [t.replace("table:", "pm25:") for t in TINY if not t.startswith(("hsi:", "joint."))]
    seen = {}
    real_hold = MultiTaskAllSpark.hold

    def hold(self, tasks, shared=True):  # what the run trains once the checkpoint's parts are held
        names = real_hold(self, tasks, shared)
        seen["trainable"] = {n for n, p in self.named_parameters() if p.requires_grad}
        seen["start"] = {k: v.clone() for k, v in self.trainable_state_dict().items() if k.startswith("tasks.pm25.")}
        return names

    monkeypatch.setattr(MultiTaskAllSpark, "hold", hold)
    out = tmp_path / "run"
    try:
        assert train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(out),
                           *common]) == 0
        reset_accelerate()
        before = evaluate_joint(run_dir, output_dir=tmp_path / "before")
        reset_accelerate()
        after = evaluate_joint(out, output_dir=tmp_path / "after")
    finally:
        reset_accelerate()
    assert set(after["tasks"]) == {*trained, "pm25"}
    for task, metrics in before["tasks"].items():
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float) and "second" not in k}  # not timings
        differ = {k: (v, after["tasks"][task].get(k)) for k, v in scalars.items() if after["tasks"][task].get(k) != v}
        assert scalars and not differ, (task, differ)
        main = trained[task]["metric_for_best"]
        assert metrics[main] == pytest.approx(trained[task][main])  # the checkpoint rebuilt as it was trained
    old = load_file(str(run_dir / "best" / "model.safetensors"))
    new = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old)  # the held parts, bit for bit
    assert seen["trainable"] and all(n.startswith("tasks.pm25.") for n in seen["trainable"])  # the new task only
    assert {k for k in new if k not in old} == set(seen["start"])  # the new task's part, all of it saved
    changed = {k for k, v in seen["start"].items() if not torch.equal(v, new[k])}
    assert any(".encoders." in k for k in changed) and any(".head." in k for k in changed)
    if held == "shared_run":
        projection = "tasks.pm25.bridge.input_proj.0.weight"
        assert projection in changed and new[projection].shape == (32, 16)  # its 16-wide encoder into the bridge
        assert not any(k.startswith("tasks.pm25.bridge.layers.") for k in new)  # it entered the held bridge
        assert json.loads((out / "best" / "shared.json").read_text())["bridge"] == {"shared": True, "width": 32}
    else:
        assert "tasks.pm25.bridge.queries" in changed  # its own bridge
    pm25 = after["tasks"]["pm25"]
    assert pm25["RMSE"] < pm25["baseline/RMSE"]
    if held == "joint_run":
        # extending with a task the checkpoint holds, or with another LLM, is refused before any training
        with pytest.raises(ConfigError, match=r"holds task\(s\) \['table'\] already"):
            train_main(["--modality", "table", "--init-from", str(run_dir), "--output-dir", str(tmp_path / "x"),
                        *[t for t in TINY if not t.startswith(("hsi:", "joint."))]])
        with pytest.raises(ConfigError, match="its LLM is not this run's.*model.llm.tiny.hidden_size"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "y"),
                        *common, "model.llm.tiny.hidden_size=32"])
        with pytest.raises(ConfigError, match=r"its LLM is not this run's.*model.llm.name \('tiny' vs "
                                              r"'smollm2-135m-instruct'\)"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "z"),
                        *common, "model.llm.name=smollm2-135m-instruct"])
        with pytest.raises(ConfigError, match=r"its tasks have a bridge each \(model.bridge.shared: false\), this "
                                              r"config asks for model.bridge.shared: true"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "s"),
                        *common, "joint.model.bridge.shared=true"])
    else:
        with pytest.raises(ConfigError, match=r"its tasks have one shared bridge .* asks for model.bridge.shared: "
                                              r"false"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "x"),
                        *common, "joint.model.bridge.shared=false"])
        with pytest.raises(ConfigError, match=r"its shared bridge has width 32, this config asks for "
                                              r"model.bridge.width=64"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "y"),
                        *common, "joint.model.bridge.width=64"])
        with pytest.raises(ConfigError, match=r"configure different bridges.*model.bridge.num_queries \(4 vs 8\)"):
            train_main(["--config", str(extend), "--init-from", str(run_dir), "--output-dir", str(tmp_path / "z"),
                        *common, "pm25:model.bridge.num_queries=8"])
        reset_accelerate()
    assert not any((tmp_path / d).exists() for d in "xyzs")


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


@pytest.mark.parametrize("bridge", ["per_task", "shared", "accumulating"])
def test_a_joint_run_killed_mid_run_resumes_to_bit_identical_weights(bridge, tmp_path, monkeypatch):
    from allspark import training

    extra = {"shared": ["joint.model.bridge.shared=true"],
             "accumulating": ["joint.train.grad_accum_steps=2"]}.get(bridge, [])

    steps = {"full": [], "cut": []}
    inits = []  # data-dependent starts: once per task of a fresh run, never on resume (the weights are loaded)
    real_init = training.init_from_data
    monkeypatch.setattr(training, "init_from_data", lambda model, *a, **kw: (inits.append(model.cfg.modality),
                                                                            real_init(model, *a, **kw)))

    def record(name, kill_at=None):
        def callback(state):
            steps[name].append(state.global_step)
            if state.global_step == kill_at:
                raise _Kill("simulated kill")
        return callback

    try:
        train_joint(_joint(*extra), tmp_path / "full", step_callback=record("full"))
        reset_accelerate()
        with pytest.raises(_Kill):
            train_joint(_joint(*extra), tmp_path / "cut", step_callback=record("cut", kill_at=10))
        reset_accelerate()
        latest = find_latest_checkpoint(tmp_path / "cut")
        assert latest.name == "step-8"
        state = json.loads((latest / "trainer_state.json").read_text())
        positions = state["tasks"]
        assert sum(p["steps"] for p in positions.values()) == 8
        assert all(0 < p["batches_in_epoch"] for p in positions.values()), positions  # both loaders mid-epoch
        steps["cut"].clear()
        train_joint(_joint(*extra), tmp_path / "cut", resume=True, step_callback=record("cut"))
    finally:
        reset_accelerate()
    assert steps["full"] == list(range(1, 25)) and steps["cut"] == list(range(9, 25))  # resumed, not restarted
    assert inits == ["hsi", "table"] * 2
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-24" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-24" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert ("bridge.queries" in a) == (bridge == "shared")  # the shared bridge is in the training checkpoint
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:4]
    full_state = json.loads((tmp_path / "full" / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    cut_state = json.loads((tmp_path / "cut" / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    assert full_state == cut_state  # loader positions, per-task step counts, references, best step
    logged = lambda run: [(r["step"], r["task"]) for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text()
                                                                .splitlines()) if "task" in r]
    assert logged("cut") == logged("full")  # every step logged once, the same task drawn
    with pytest.raises(UserError, match="differs"):
        train_joint(_joint(*extra, "joint.schedule.type=round_robin"), tmp_path / "cut", resume=True)
    if bridge == "accumulating":
        return
    flipped = "joint.model.bridge.shared=" + ("false" if bridge == "shared" else "true")
    with pytest.raises(UserError, match=r"differs .* model.bridge.shared"):
        train_joint(_joint(flipped), tmp_path / "cut", resume=True)


def test_joint_gradient_accumulation_equals_one_batch_of_the_summed_size(tmp_path):
    """Two micro-batches of 8 of the drawn task per optimizer step train as one batch of 16 (float32, no dropout,
    one prompt): the same losses, the schedule stepped once per optimizer step (stepped per micro-batch, the second
    step's learning rate would be the third's), the same weights but for a few elements whose gradient is ~0, where
    AdamW's first steps turn rounding into a sign (the key biases of attention, which softmax ignores)."""
    common = ["model.llm.dtype=float32", "model.llm.adapter.dropout=0.0", "model.prompts.train_choice=first",
              "joint.schedule.type=round_robin", "joint.train.steps=4", "joint.train.eval_every_steps=4",
              "joint.train.test_at_end=false", "joint.train.warmup_ratio=0.0"]
    runs = {"accum": ["data.batch_size=8", "joint.train.grad_accum_steps=2"], "large": ["data.batch_size=16"]}
    try:
        for name, extra in runs.items():
            train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, *common, *extra]),
                        tmp_path / name)
            reset_accelerate()
    finally:
        reset_accelerate()
    logs = {n: [r for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines()) if "lr" in r]
            for n in runs}
    assert [(r["step"], r["task"], r["lr"]) for r in logs["accum"]] == [(r["step"], r["task"], r["lr"])
                                                                         for r in logs["large"]]
    assert len({r["lr"] for r in logs["accum"]}) == 4  # the cosine schedule moved at every optimizer step
    assert [r["loss"] for r in logs["accum"]] == pytest.approx([r["loss"] for r in logs["large"]], abs=1e-5)
    ckpt = {n: tmp_path / n / "checkpoints" / "step-4" for n in runs}
    a, b = (load_file(str(ckpt[n] / "model.safetensors")) for n in runs)
    assert a.keys() == b.keys()
    apart = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert apart <= 1e-3 * sum(v.numel() for v in a.values()), apart
    positions = {n: json.loads((ckpt[n] / "trainer_state.json").read_text())["tasks"] for n in runs}
    assert {t: p["batches_in_epoch"] for t, p in positions["accum"].items()} == {"hsi": 4, "table": 4}
    assert {t: p["batches_in_epoch"] for t, p in positions["large"].items()} == {"hsi": 2, "table": 2}
    assert [p["steps"] for p in positions["accum"].values()] == [2, 2]
    with pytest.raises(UserError, match="grad_accum_steps must be an int >= 1, got 0"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.train.grad_accum_steps=0"]),
                    tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -- two processes ---------------------------------------------------------------------------------------------

#: run under torchrun (and alone): train_joint, recording on every process the task each step trained (the task
#: whose step count rose), into draws-rank<R>.json
_RECORD_DRAWS = """
import json, os, sys
from pathlib import Path

from allspark.multitask import load_joint_config, train_joint

out, overrides = Path(sys.argv[1]), sys.argv[2:]
seen, draws = {}, []


def record(state):
    rose = [n for n, p in state.tasks.items() if p["steps"] != seen.get(n, 0)]
    seen.update({n: p["steps"] for n, p in state.tasks.items()})
    draws.append([state.global_step, *rose])


train_joint(load_joint_config(tasks=["hsi", "table"], overrides=overrides), out, step_callback=record)
(out / f"draws-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(draws))
"""


@pytest.mark.slow
def test_two_processes_take_the_same_task_every_step_and_match_one_process(tmp_path, monkeypatch):
    """torchrun, two CPU processes (gloo), per-process batches of 4, against one process with batches of 8: the
    same global batches (hsi 72 and table 144 training rows: whole batches, no padding), the same draws on both
    processes and in the one-process run, the same first loss of each task, and the same test metrics. Not bit
    for bit: the mean of two all-reduced half-batch gradients rounds differently from one full-batch gradient,
    and Adam's first steps (``g / sqrt(v)``) turn rounding-level gradients into steps of the learning rate, so
    the runs drift apart by about 0.3 % over 24 steps; a wrong global batch or data split moves them by far more."""
    script = tmp_path / "record_draws.py"
    script.write_text(_RECORD_DRAWS)
    common = [t for t in TINY if not t.startswith("data.batch_size")] + [
        "model.llm.adapter.dropout=0.0", "model.prompts.train_choice=first",  # no per-process random draws
        "table:data.args.train_ratio=0.051", "data.eval_batch_size=64", "joint.schedule.type=proportional",
        "joint.train.steps=24", "joint.train.eval_every_steps=12"]
    env = {"OMP_NUM_THREADS": "1"}
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(tmp_path / "two"), *common, "data.batch_size=4"], env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one"), *common, "data.batch_size=8"])
    try:  # the same script in this process (no second start-up)
        runpy.run_path(str(script), run_name="__main__")
    finally:
        reset_accelerate()
    m2, m1 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("two", "one"))
    assert m2["num_processes"] == 2 and m1["num_processes"] == 1
    rank0, rank1, alone = (json.loads((tmp_path / d / f).read_text()) for d, f in
                           (("two", "draws-rank0.json"), ("two", "draws-rank1.json"), ("one", "draws-rank0.json")))
    assert [r[0] for r in rank0] == list(range(1, 25)) and all(len(r) == 2 for r in rank0)  # one task a step
    assert rank0 == rank1 == alone
    assert {t for _, t in rank0} == {"hsi", "table"}
    assert m2["steps_per_task"] == m1["steps_per_task"]
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("two", "one")]
    for task in ("hsi", "table"):  # the first global batch of each task: the same rows, the same loss
        first2, first1 = (next(r["loss"] for r in log if r.get("task") == task) for log in logs)
        assert first2 == pytest.approx(first1, rel=1e-5), task
    for task, keys in (("hsi", ("OA", "AA", "kappa")), ("table", ("RMSE", "MAE", "R2", "baseline/RMSE"))):
        assert m2["tasks"][task]["num_samples"] == m1["tasks"][task]["num_samples"]  # every test row once
        for key in keys:
            assert m2["tasks"][task][key] == pytest.approx(m1["tasks"][task][key], rel=2e-2), (task, key)


def test_processes_that_draw_different_tasks_stop_with_an_error():
    from allspark.multitask import check_same_draws

    class TwoProcesses:  # what gather returns when process 1 drew table at the second step
        num_processes, device = 2, torch.device("cpu")

        def gather(self, tensor):
            assert tensor.tolist() == [0, 0, 1]
            return torch.tensor([0, 0, 1, 0, 1, 1])

    with pytest.raises(RuntimeError, match=r"trained different tasks at step 9 \(process 0: 'hsi', process 1: "
                                           r"'table'\)"):
        check_same_draws(TwoProcesses(), [0, 0, 1], ["hsi", "table"], step=10)

    class Agreeing(TwoProcesses):
        def gather(self, tensor):
            return tensor.repeat(2)

    check_same_draws(Agreeing(), [0, 0, 1], ["hsi", "table"], step=10)


# -- bad input -----------------------------------------------------------------------------------------------------

def test_train_only_holds_a_task_s_own_parts_and_the_joint_list_the_shared_ones(tmp_path, monkeypatch):
    """A task's ``train.train_only`` holds the parts of that task it does not match (the shared adapters and the
    other task train on); ``joint.train.train_only`` holds every trainable parameter of the joint model it does not
    match. Held tensors end bit for bit as they started and are saved in the checkpoint; a pattern that matches
    nothing is refused before anything is written."""
    from allspark import training

    starts = []  # the trainable state when the optimizer is built (after the data-dependent starts)
    real = training.build_optimizer
    monkeypatch.setattr(training, "build_optimizer", lambda cfg, model: (
        starts.append({k: v.clone() for k, v in model.trainable_state_dict().items()}), real(cfg, model))[1])

    def changed(extra, out):
        train_joint(_joint("joint.train.steps=6", "joint.train.eval_every_steps=6", *extra), out)
        end = load_file(str(out / "best" / "model.safetensors"))
        start = starts[-1]
        assert sorted(end) == sorted(start), "held parts stay in the checkpoint"
        return {k for k in start if not torch.equal(start[k], end[k])}, set(start)

    moved, every = changed(["hsi:train.train_only=[head.*]"], tmp_path / "task")
    hsi_held = {k for k in every if k.startswith(("tasks.hsi.encoders.", "tasks.hsi.bridge."))}
    assert hsi_held and not moved & hsi_held
    assert any(k.startswith("tasks.hsi.head.") for k in moved)
    assert any(k.startswith("llm.") for k in moved) and any(k.startswith("tasks.table.") for k in moved)

    moved, every = changed(["joint.train.train_only=[tasks.*]"], tmp_path / "joint")
    adapters = {k for k in every if k.startswith("llm.")}
    assert adapters and not moved & adapters
    assert any(k.startswith("tasks.hsi.encoders.") for k in moved) and any(k.startswith("tasks.table.") for k in moved)

    with pytest.raises(ConfigError, match=r"joint.train.train_only pattern 'bridge\.\*' matches no trainable "
                                          r"parameter"):
        train_joint(_joint("joint.train.train_only=[bridge.*]"), tmp_path / "bad")  # one bridge per task here
    with pytest.raises(ConfigError, match=r"task 'hsi': train.train_only pattern 'llm.\*' matches no trainable "
                                          r"parameter"):  # a task's patterns reach its own parts, not the adapters
        train_joint(_joint("hsi:train.train_only=[llm.*]"), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"task 'hsi': train.stages is set .* in the task's config; a joint run takes "
                                          r"joint.train.stages"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=[
            *TINY, "hsi:train.stages=[{name: a, overrides: {}}]"]))
    reset_accelerate()
    assert not (tmp_path / "bad").exists()


def test_joint_stages_run_in_order_from_the_last_best_and_a_resume_skips_finished_stages(tmp_path, monkeypatch):
    """``joint.train.stages``: stage 2 starts from stage 1's ``best/`` (the optimizer is built on those weights) and
    trains only what its ``train_only`` names; the run's ``best/`` is stage 2's and evaluates; a resume skips a
    finished stage and retrains an unfinished one to the same weights; a malformed stage is refused first."""
    import shutil

    from allspark import training
    from allspark.multitask import evaluate_joint

    starts = []
    real = training.build_optimizer
    monkeypatch.setattr(training, "build_optimizer", lambda cfg, model: (
        starts.append({k: v.clone() for k, v in model.trainable_state_dict().items()}), real(cfg, model))[1])
    stages = ('[{name: all, overrides: {}}, {name: heads, overrides: {joint.train.train_only: ["tasks.*.head.*"], '
              'joint.train.lr: 0.01}}]')
    cfg = _joint("joint.train.steps=6", "joint.train.eval_every_steps=6", "joint.train.test_at_end=true",
                 f"joint.train.stages={stages}")
    out = tmp_path / "staged"
    metrics = train_joint(cfg, out)
    first = load_file(str(out / "stage1-all" / "best" / "model.safetensors"))
    end = load_file(str(out / "best" / "model.safetensors"))
    assert len(starts) == 2 and sorted(starts[1]) == sorted(first) == sorted(end)
    assert all(torch.equal(starts[1][k], first[k]) for k in first), "stage 2 starts from stage 1's best weights"
    heads = {k for k in end if ".head." in k}
    assert heads and any(not torch.equal(end[k], first[k]) for k in heads)
    assert all(torch.equal(end[k], first[k]) for k in end if k not in heads), "stage 2 trains the heads only"
    assert list(metrics["stages"]) == ["all", "heads"] and sorted(metrics["tasks"]) == ["hsi", "table"]
    assert json.loads((out / "metrics.json").read_text())["tasks"]["hsi"]["OA"] == metrics["tasks"]["hsi"]["OA"]
    assert sorted(evaluate_joint(out, output_dir=tmp_path / "eval")["tasks"]) == ["hsi", "table"]

    steps = []
    shutil.rmtree(out / "stage2-heads")
    again = train_joint(cfg, out, resume=True, step_callback=lambda state: steps.append(state.global_step))
    assert steps == [1, 2, 3, 4, 5, 6], "stage 1 skipped, stage 2 trained again"
    redone = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(redone[k], end[k]) for k in end) and again["tasks"]["hsi"]["OA"] == metrics["tasks"]["hsi"]["OA"]

    with pytest.raises(ConfigError, match=r"joint.train.stages\[1\] must be \{name: str, overrides"):
        train_joint(_joint('joint.train.stages=[{name: a}, {overrides: {}}]'), tmp_path / "bad")
    reset_accelerate()
    assert not (tmp_path / "bad").exists()


def test_bad_task_lists_fail_with_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"task 'hyperspectral': unknown modality 'hyperspectral'.*Known modali.*hsi"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "hyperspectral"], overrides=TINY[:1]))
    with pytest.raises(ConfigError, match="the list is empty"):
        load_joint_config(tasks=[])
    with pytest.raises(ConfigError, match=r"lists task\(s\) \['hsi'\] more than once"):
        load_joint_config(tasks=["hsi", "hsi"])
    # names that would collide inside the model (its task table's own attributes) or on disk (tasks/<name>/)
    with pytest.raises(ConfigError, match=r"tasks.1: the task name 'train' collides with an attribute of the model's "
                                          r"task table"):
        load_joint_config(tasks=["hsi", "train"])
    with pytest.raises(ConfigError, match="tasks 'hsi' and 'HSI' differ only in case"):
        load_joint_config(tasks=["hsi", "HSI"])
    with pytest.raises(ConfigError, match=r"without '.', ':', ',', '/'"):
        load_joint_config(tasks=["hsi", "hsi/table"])
    with pytest.raises(ConfigError, match="names task 'rgb', which is not in the task list"):
        load_joint_config(tasks=["hsi", "table"], overrides=["rgb:train.lr=1"])
    with pytest.raises(ConfigError, match=r"tasks 'hsi' and 'table' configure different LLMs.*model.llm.name"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=["hsi:model.llm.name=tiny"]))
    with pytest.raises(ConfigError, match="schedule.type must be one of"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.schedule.type=random"]),
                    tmp_path / "bad")
    # the shared bridge is the joint config's: not a task key, and a width only with it
    with pytest.raises(ConfigError, match=r"model.bridge.shared is a key of the joint config .* "
                                          r"joint.model.bridge.shared=VALUE"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "model.bridge.shared=true"]))
    with pytest.raises(ConfigError, match="model.bridge.width=32 is the width of a shared bridge"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.model.bridge.width=32"]),
                    tmp_path / "bad")
    with pytest.raises(ConfigError, match="model.bridge.width must be a positive int, got 0"):
        load_joint_config(tasks=["hsi", "table"], overrides=["joint.model.bridge.width=0"])
    # init_from a single-task checkpoint
    (tmp_path / "single" / "best").mkdir(parents=True)
    save_file({"head.weight": torch.zeros(1)}, str(tmp_path / "single" / "best" / "model.safetensors"))
    with pytest.raises(UserError, match=r"init_from .*single: a single-task checkpoint; a joint run extends a joint "
                                        r"one"):
        train_joint(load_joint_config(tasks=["table"], overrides=[*TINY[:5], f"joint.init_from={tmp_path / 'single'}"]),
                    tmp_path / "bad")
    # a task whose dataset cannot be read: its name in the message, and no run folder written
    with pytest.raises(UserError, match=r"task 'table': data root '.*nowhere' does not exist"):
        train_joint(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, f"table:data.root={tmp_path}/nowhere"]),
                    tmp_path / "unread")
    reset_accelerate()
    assert not (tmp_path / "bad").exists() and not (tmp_path / "unread").exists()


def test_a_joint_recipe_applies_to_every_task_that_defines_it(caplog):
    # answers: hsi's config defines it (its head answers in words), table's does not (it trains as it is)
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.recipe=answers"]))
    alone = resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=TINY))
    assert (cfgs["hsi"].recipe, cfgs["hsi"].model.head.type) == ("answers", "verbalizer")
    assert alone["hsi"].model.head.type == "classification"
    assert cfgs["table"].recipe is None and cfgs["table"].model.head == alone["table"].model.head
    # paper: both define it; its learning rate and warm-up are joint.train's in a joint run, and the warning says so
    with caplog.at_level(logging.WARNING, logger="allspark.multitask"):
        cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.recipe=paper"]))
    assert cfgs["hsi"].train.epochs == 30 and cfgs["hsi"].recipe == cfgs["table"].recipe == "paper"
    assert "task 'hsi': recipe 'paper' sets train.lr, train.warmup_epochs, train.warmup_ratio, which a joint run " \
           "does not use" in caplog.text
    # a recipe no task defines, and a task's own recipe that its config lacks
    with pytest.raises(ConfigError, match=r"recipe 'papr': no task of the joint run defines it; their recipes: "
                                          r"\{'hsi': \['answers', 'paper'\], 'table': \['paper'\]\}"):
        resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "joint.recipe=papr"]))
    with pytest.raises(ConfigError, match=r"task 'table': unknown recipe 'answers' for 'table'"):
        resolve_task_configs(load_joint_config(tasks=["hsi", {"name": "table", "recipe": "answers"}], overrides=TINY))


def test_train_py_exits_2_on_an_unknown_task_and_writes_nothing(tmp_path, capsys):
    from allspark.cli import run_cli, train_main

    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train_main(["--modality", "hsi,hyperspectral", "--output-dir", str(tmp_path / "run")]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: task 'hyperspectral': unknown modality 'hyperspectral'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:  # --recipe reaches the joint run
        run_cli(lambda: train_main(["--modality", "hsi,table", "--recipe", "papr", "--output-dir", str(tmp_path / "run"),
                                    *TINY]))
    assert exit_.value.code == 2
    assert "error: recipe 'papr': no task of the joint run defines it" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
