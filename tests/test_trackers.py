"""``train.log_with``: trackers through accelerate, chosen by config, with the full resolved config logged."""
import pytest

from allspark.config import ConfigError, load_config
from allspark.errors import MissingPackageError
from allspark.training import _flat_config, train, trackers
from tests.helpers import TINY_HSI


def test_log_with_names_and_errors(monkeypatch):
    import accelerate.utils as accelerate_utils

    monkeypatch.setattr(accelerate_utils, "is_tensorboard_available", lambda: True)
    assert trackers("auto") == ["tensorboard"] and trackers("tensorboard") == ["tensorboard"]
    assert trackers("none") == [] and trackers([]) == []
    monkeypatch.setattr(accelerate_utils, "is_tensorboard_available", lambda: False)
    assert trackers("auto") == []  # auto: only what is installed
    with pytest.raises(MissingPackageError, match="pip install tensorboard"):
        trackers(["tensorboard"])
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; known: auto, none, tensorboard, wandb"):
        trackers(["neptune"])
    with pytest.raises(ConfigError, match="must be 'auto', 'none', a tracker name or a list"):
        trackers(3)


def test_flat_config_holds_every_resolved_value_as_a_scalar():
    cfg = load_config("hsi", overrides=TINY_HSI + ["train.lr=0.002"])
    flat = _flat_config(cfg)
    assert flat["train.lr"] == 0.002 and flat["model.llm.name"] == "tiny" and flat["modality"] == "hsi"
    assert flat["model.bridge.num_queries"] == 4 and isinstance(flat["train.betas"], str)  # a list as JSON text
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_a_run_logs_its_config_and_curves_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("hsi", overrides=TINY_HSI + ["train.log_with=[tensorboard]", "train.epochs=1",
                                                   "train.max_steps=2", "train.log_every_steps=1"])
    train(cfg, tmp_path / "run")
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr"} <= tags
    hparams = sorted((tmp_path / "run").rglob("hparams.yml"))
    assert hparams and "model.llm.name: tiny" in hparams[0].read_text()


def test_ddp_kwargs_reach_accelerate_and_unknown_keys_are_refused():
    from accelerate.utils import DistributedDataParallelKwargs

    from allspark.training import ddp_handlers

    assert ddp_handlers({}) == []
    (handler,) = ddp_handlers({"find_unused_parameters": True, "static_graph": False})
    assert isinstance(handler, DistributedDataParallelKwargs) and handler.find_unused_parameters is True
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['find_unused'\]; DistributedDataParallel takes"):
        ddp_handlers({"find_unused": True})
    cfg = load_config("hsi", overrides=["train.ddp_kwargs={find_unused_parameters: true}"])
    assert cfg.train.ddp_kwargs == {"find_unused_parameters": True}


def test_the_shipped_accelerate_configs_load_in_accelerate():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in sorted(folder.glob("*.yaml"))}
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp2": "DistributedType.FSDP",
                     "deepspeed_zero2": "DistributedType.DEEPSPEED", "deepspeed_zero3": "DistributedType.DEEPSPEED"}
