import pytest

from allspark.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_yaml_text,
    list_modalities,
    load_config,
    save_config,
)


def test_hsi_config_loads_with_paper_schedule_for_real_data():
    cfg = load_config("hsi", data_root="/some/PaviaU")
    assert cfg.modality == "hsi"
    # Table II: HSI max lr 1e-4, 30 epochs, 3 warm-up epochs
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 30 and cfg.train.warmup_epochs == 3
    assert cfg.model.encoders[0].args["depth"] == 12
    assert cfg.model.bridge.num_queries == 32


def test_demo_block_applies_only_for_demo_and_overrides_win():
    demo = load_config("hsi")
    assert demo.uses_demo_data
    assert demo.model.encoders[0].args["depth"] == 2
    user = load_config("hsi", overrides=["train.epochs=7", "model.bridge.num_queries=3"])
    assert user.train.epochs == 7 and user.model.bridge.num_queries == 3


def test_unknown_key_names_key_and_suggestions():
    with pytest.raises(ConfigError) as err:
        load_config("hsi", overrides=["train.learning_rate=1e-3"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "lr" in msg
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config("hsi", overrides=["train.epoch=3"])


def test_wrong_type_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("hsi", overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("hsi", overrides=["train.epochs"])


def test_unknown_modality_lists_known():
    with pytest.raises(ConfigError) as err:
        load_config("hyperspectral")
    assert "hsi" in str(err.value)
    assert "hsi" in list_modalities()


def test_list_index_override_and_free_form_args():
    raw = {"model": {"encoders": [{"type": "a", "args": {"x": 1}}]}}
    out = apply_overrides(raw, ["model.encoders.0.args.y=2"])
    assert out["model"]["encoders"][0]["args"] == {"x": 1, "y": 2}
    with pytest.raises(ConfigError, match="index out of range"):
        apply_overrides(raw, ["model.encoders.3.type=b"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("hsi", overrides=["train.lr=0.002"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_yaml_text((tmp_path / "config.yaml").read_text())
    assert again == cfg
    assert isinstance(again, Config)
