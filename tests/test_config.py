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


def test_hsi_config_for_real_data_default_recipe_and_paper_recipe():
    cfg = load_config("hsi", data_root="/some/PaviaU")
    assert cfg.modality == "hsi" and cfg.recipe is None
    # default recipe: the small-LLM learning rate, warm-up as a share of the run
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.warmup_ratio == pytest.approx(0.05)
    assert cfg.model.encoders[0].args["depth"] == 12
    assert cfg.model.bridge.num_queries == 32
    # --recipe paper, Table II: HSI max lr 1e-4, 30 epochs, 3 warm-up epochs
    paper = load_config("hsi", data_root="/some/PaviaU", recipe="paper")
    assert paper.recipe == "paper" and paper.train.lr == pytest.approx(1e-4)
    assert paper.train.epochs == 30 and paper.train.warmup_epochs == 3 and paper.train.warmup_ratio is None
    # explicit overrides still win over the recipe
    mine = load_config("hsi", data_root="/x", recipe="paper", overrides=["train.lr=3e-4"])
    assert mine.train.lr == pytest.approx(3e-4)


def test_unknown_recipe_lists_the_configs_recipes():
    with pytest.raises(ConfigError, match=r"unknown recipe 'papr' for 'text'; did you mean 'paper'\?"):
        load_config("text", recipe="papr")


def test_warmup_steps_as_share_of_the_run_or_in_epochs(caplog):
    from allspark.training import warmup_steps

    cfg = load_config("text", data_root="/x")
    assert warmup_steps(cfg.train, steps_per_epoch=10, total_steps=50) == 2  # round(0.05 * 50)
    short = load_config("text", data_root="/x", overrides=["train.epochs=1"])
    assert warmup_steps(short.train, steps_per_epoch=10, total_steps=10) == 0  # a shortened run keeps its share
    paper = load_config("text", data_root="/x", recipe="paper", overrides=["train.epochs=1"])
    with caplog.at_level("WARNING"):
        # Table II's whole warm-up epoch in a one-epoch run: the learning rate never leaves its warm-up
        assert warmup_steps(paper.train, steps_per_epoch=10, total_steps=10) == 10
    assert "spans the whole run" in caplog.text
    bad = load_config("text", data_root="/x", overrides=["train.warmup_ratio=1.5"])
    with pytest.raises(ValueError, match=r"warmup_ratio must lie in \[0, 1\), got 1.5"):
        warmup_steps(bad.train, 10, 50)


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
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'; did you mean 'train.epochs'"):
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


def test_override_values_use_yaml_1_2_booleans():
    """``train.mixed_precision=no`` is the string 'no' (YAML 1.1 would read a boolean False and the string field
    would refuse it); true/false stay booleans, and a boolean field refuses 'no' with a clear error."""
    from allspark.config import ConfigError, _parse_value, load_config

    assert [_parse_value(v) for v in ("no", "off", "yes", "true", "False", "{a: no}")] == [
        "no", "off", "yes", True, False, {"a": "no"}]
    cfg = load_config("hsi", overrides=["train.mixed_precision=no", "model.llm.name=tiny"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected true/false, got 'no'"):
        load_config("hsi", overrides=["model.prompt_sharing=no"])
