"""A joint run's DataLoaders take each task's own ``data.num_workers``, ``data.pin_memory`` and
``data.persistent_workers`` (resolved like a single-task run's, allspark.data.loader_options), in training and in
``evaluate_joint``; a bad value is one error naming the task, before anything is written. Tiny random LLM, two
optimizer steps; the loaders are observed through a recorder around allspark.data.build_loader."""
from __future__ import annotations

import pytest

from tests.helpers import reset_accelerate
import torch

import allspark.data as data_module
import allspark.run as run_module
from allspark.config import ConfigError
from allspark.data import build_dataset
from allspark.multitask import evaluate_joint, load_joint_config, resolve_task_configs, train_joint

TINY = ["model.llm.name=tiny", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", "eval.baselines=[]",
        "data.batch_size=8",
        "hsi:model.encoders.0.args={dim: 16, depth: 1, heads: 2, bands_per_token: 8}", "hsi:data.args.train_ratio=0.1",
        "table:model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}", "table:data.args.train_ratio=0.05"]
#: table: one worker kept alive, pinned batches; hsi: the defaults (auto: no workers and no pinning without a GPU)
LOADING = ["table:data.num_workers=1", "table:data.pin_memory=true"]

pytestmark = [pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator"),
              pytest.mark.usefixtures("one_torch_thread")]




@pytest.fixture
def loaders(monkeypatch):
    """Every build_loader call: (the dataset's reader class, the worker settings it was given)."""
    calls = []
    original = data_module.build_loader

    def recording(dataset, batch_size, **kwargs):
        calls.append((type(dataset).__name__, {k: kwargs.get(k) for k in
                                               ("num_workers", "pin_memory", "persistent_workers")}))
        return original(dataset, batch_size, **kwargs)

    monkeypatch.setattr(data_module, "build_loader", recording)
    monkeypatch.setattr(run_module, "build_loader", recording)  # each task's run (allspark.run.Run.build_loaders)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="the expected auto values are those of a machine without a GPU")
def test_each_task_s_loaders_take_its_own_worker_settings(loaders, tmp_path):
    jcfg = load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, *LOADING, "joint.train.steps=2",
                                                                "joint.train.eval_every_steps=2",
                                                                "joint.schedule.type=round_robin"])
    cfgs = resolve_task_configs(jcfg)
    reader = {name: type(build_dataset(cfg, "train")).__name__ for name, cfg in cfgs.items()}
    assert reader["hsi"] != reader["table"]
    expected = {reader["hsi"]: {"num_workers": 0, "pin_memory": False, "persistent_workers": False},
                reader["table"]: {"num_workers": 1, "pin_memory": True, "persistent_workers": True}}
    try:
        train_joint(jcfg, tmp_path / "run")
        reset_accelerate()
        trained = list(loaders)
        loaders.clear()
        evaluate_joint(tmp_path / "run", output_dir=tmp_path / "eval")
    finally:
        reset_accelerate()
    # train, val and test loaders of each task with its settings; init_from_data's one pass over the training split
    # (when a head has one) keeps no workers alive, as in a single-task run
    for name in expected:
        assert [options for n, options in trained if n == name].count(expected[name]) == 3, (name, trained)
    for name, options in trained:
        assert options in (expected[name], {**expected[name], "persistent_workers": False}), (name, options)
    assert sorted(n for n, _ in loaders) == sorted([reader["hsi"], reader["table"]])  # one test loader a task
    for name, options in loaders:
        assert options == expected[name], (name, options)


def test_a_bad_worker_setting_names_its_task_and_writes_nothing(tmp_path):
    jcfg = load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "table:data.num_workers=-1"])
    try:
        with pytest.raises(ConfigError, match=r"^task 'table': data.num_workers must be auto or a whole number >= 0, "
                                              r"got -1"):
            train_joint(jcfg, tmp_path / "run")
        jcfg = load_joint_config(tasks=["hsi", "table"], overrides=[*TINY, "hsi:data.pin_memory=maybe"])
        with pytest.raises(ConfigError, match=r"^task 'hsi': data.pin_memory must be auto, true or false, got 'maybe'"):
            train_joint(jcfg, tmp_path / "run")
    finally:
        reset_accelerate()
    assert not (tmp_path / "run").exists()
