"""AllSpark end to end on the tiny random LLM: shapes, exact padding, frozen LLM, save/load round trip."""
import pytest
import torch

from allspark.config import load_config
from allspark.data import build_dataset
from allspark.model import AllSpark
from tests.helpers import TINY_HSI


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("hsi", overrides=TINY_HSI)
    train_set = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train_set.info())
    batch = train_set.collate([train_set[i] for i in range(6)])
    return cfg, model, batch


def test_forward_shapes_and_loss(setup):
    _, model, batch = setup
    model.train()
    out = model(batch)
    assert out.predictions["logits"].shape == (6, 9)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_frozen_llm_gets_no_weight_gradients(setup):
    _, model, batch = setup
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    frozen = [n for n, p in model.llm.named_parameters() if not p.requires_grad]
    assert frozen, "the LLM base weights must be frozen"
    assert all(p.grad is None for p in model.llm.parameters() if not p.requires_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoders.") for n in trainable)
    assert any(n.startswith("bridge.") for n in trainable)
    assert any("lora" in n for n in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if n.startswith(("bridge.", "head.")))


def test_batched_rows_with_different_prompts_are_exact(setup):
    """Right padding plus the attention mask: a row's output does not depend on its batch mates."""
    _, model, batch = setup
    model.eval()
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2])  # prompts of different token lengths
    together = model({**batch, "prompt_index": prompt_index}).predictions["logits"]
    for i in range(6):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        alone = model({**row, "prompt_index": prompt_index[i : i + 1]}).predictions["logits"]
        assert torch.allclose(together[i : i + 1], alone, atol=1e-4), i


def test_prompt_choice_random_in_training_first_in_eval(setup):
    _, model, _ = setup
    model.train()
    torch.manual_seed(0)
    chosen = model.choose_prompts(200, torch.device("cpu"))
    assert set(chosen.tolist()) == {0, 1, 2}
    model.eval()
    assert model.choose_prompts(10, torch.device("cpu")).eq(0).all()


def test_save_and_load_round_trip(setup, tmp_path):
    cfg, model, batch = setup
    model.eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1)  # make sure trained-looking values round-trip
    expected = model.predict(batch)["logits"]
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter", "config.yaml", "data_info.json", "model.safetensors"]  # adapter/: the PEFT LoRA folder
    # only trainable parts are stored, not the frozen LLM
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not any(k.startswith("llm.") and "lora" not in k for k in stored)
    again = AllSpark.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(again.predict(batch)["logits"], expected, atol=1e-5)


def test_failed_write_leaves_previous_checkpoint_intact(setup, tmp_path, monkeypatch):
    _, model, _ = setup
    model.save_pretrained(tmp_path / "best")
    before = (tmp_path / "best" / "model.safetensors").read_bytes()

    import allspark.model as model_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp leftovers
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_checkpoint_must_match_model(setup, tmp_path):
    cfg, model, _ = setup
    state = model.trainable_state_dict()
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict(bad)


def test_encoder_rejects_bad_batch(setup):
    _, model, batch = setup
    with pytest.raises(ValueError, match="spectrum"):
        model({**batch, "spectrum": batch["spectrum"][:, :50]})
    nan = batch["spectrum"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model({**batch, "spectrum": nan})
