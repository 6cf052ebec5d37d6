"""``model.llm.adapter_dtype``: the trainable adapters in float32 (the default off FSDP) or in the frozen weights'
dtype (``base``; ``auto`` under FSDP, which flattens a layer's base and adapter weights into one tensor of one
dtype). On the tiny random LLM in bfloat16; one real training step through accelerate on the CPU with ``base``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allspark.config import AdapterConfig, ConfigError, LLMConfig, load_config
from allspark.llm import adapter_dtype, load_llm, under_fsdp
from tests.helpers import TINY_HSI


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)


def _dtypes(setting: str, adapter: str = "lora", dtype: str = "bfloat16"):
    loaded = load_llm(LLMConfig(name="tiny", dtype=dtype, adapter=AdapterConfig(type=adapter), adapter_dtype=setting))
    trainable = {p.dtype for p in loaded.trainable_parameters()}
    frozen = {p.dtype for p in loaded.model.parameters() if not p.requires_grad}
    return trainable, frozen, loaded


@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
def test_base_keeps_the_adapters_in_the_llm_dtype_and_float32_and_auto_off_fsdp_in_float32(adapter, no_fsdp):
    trainable, frozen, loaded = _dtypes("base", adapter)
    assert frozen == {torch.bfloat16} and trainable == {torch.bfloat16}
    assert len(loaded.trainable_parameters()) > 0
    # one dtype per decoder layer: what FSDP's flat parameters need
    for layer in loaded.model.get_decoder().layers:
        assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    # the bf16 adapters take gradients through the bf16 base
    loaded.module.train()
    x = torch.randn(2, 5, loaded.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    loaded.decoder(inputs_embeds=x, attention_mask=torch.ones(2, 5, dtype=torch.long)).last_hidden_state.float() \
        .pow(2).mean().backward()
    grads = [p.grad for p in loaded.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for setting in ("float32", "auto"):
        trainable, frozen, _ = _dtypes(setting, adapter)
        assert frozen == {torch.bfloat16} and trainable == {torch.float32}, setting


def test_auto_follows_fsdp_from_the_launcher_env_or_accelerate_state(monkeypatch, no_fsdp):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    assert not under_fsdp()
    assert adapter_dtype("auto", torch.bfloat16) == (torch.float32, "auto: float32 (not under FSDP)")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    assert under_fsdp()
    assert adapter_dtype("auto", torch.bfloat16)[0] == torch.bfloat16
    trainable, _, _ = _dtypes("auto")
    assert trainable == {torch.bfloat16}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not under_fsdp()
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.FSDP)
    assert under_fsdp() and adapter_dtype("auto", torch.float16)[0] == torch.float16
    assert adapter_dtype("float32", torch.bfloat16)[0] == torch.float32  # an explicit setting wins


def test_a_bad_adapter_dtype_is_a_config_error_before_loading():
    with pytest.raises(ConfigError, match=r"model.llm.adapter_dtype must be one of \['auto', 'float32', 'base'\], "
                                          r"got 'bf16'"):
        load_llm(LLMConfig(name="tiny", adapter_dtype="bf16"))
    with pytest.raises(ConfigError, match=r"model.llm.adapter_dtype: expected a string, got 16"):
        load_config("hsi", overrides=["model.llm.adapter_dtype=16"])


def test_one_training_step_with_bf16_adapters_on_the_cpu(tmp_path, no_fsdp):
    from allspark.training import train

    # no warm-up: its first step would have a learning rate of 0
    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=bfloat16", "model.llm.adapter_dtype=base",
                                        "train.mixed_precision=no", "train.max_steps=1", "train.epochs=1",
                                        "train.warmup_epochs=0", "train.log_every_steps=1", "train.test_at_end=false",
                                        "eval.baselines=[]"])
    torch.manual_seed(0)
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    state = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and {v.dtype for v in lora.values()} == {torch.bfloat16}
    # LoRA B starts at zero: after the step it has moved (the optimizer updated the bf16 adapters)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith(("bridge.", "head.")))
