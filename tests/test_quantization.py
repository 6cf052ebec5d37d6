"""``model.llm.quantization`` (bitsandbytes 8bit / 4bit on a CUDA GPU) and ``model.llm.dtype: float16``.

Without a CUDA GPU a quantised LLM is one clear config error (``train.py`` exits 2 before writing anything); with
one, and bitsandbytes installed, a tiny run trains with NF4 base weights and float32 LoRA adapters. float16 base
weights run forward and backward on the CPU (slowly: the CPU emulates them, and says so)."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import yaml

from allspark.config import ConfigError, LLMConfig, load_config
from allspark.errors import MissingPackageError
from allspark.llm import check_quantization, load_llm, quantization_config
from tests.helpers import TINY_HSI, run_inprocess

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a CUDA GPU")
def test_train_py_refuses_quantization_without_a_gpu(tmp_path):
    out = tmp_path / "run"
    result = run_inprocess(["train.py", "--modality", "hsi", "--output-dir", str(out), *TINY_HSI,
                            "model.llm.quantization=4bit"])
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.llm.quantization=4bit needs a CUDA GPU") and "this machine has none" in last
    assert "Traceback" not in result.stderr
    assert not out.exists(), "refused before anything is written"


def test_unknown_quantization_lists_the_settings():
    with pytest.raises(ConfigError, match=r"model.llm.quantization must be one of \['none', '8bit', '4bit'\], "
                                          r"got '3bit'"):
        load_llm(LLMConfig(name="tiny", quantization="3bit"))
    assert check_quantization(LLMConfig(name="tiny")) is None, "none needs nothing"


def test_a_gpu_without_bitsandbytes_or_a_cpu_run_is_one_clear_error(monkeypatch):
    """With a CUDA GPU (simulated): a missing bitsandbytes names the package; a run put on the CPU is refused."""
    import allspark.llm as llm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        importlib.util.find_spec(name, *a))
    with pytest.raises(MissingPackageError, match=r"quantization=8bit needs the bitsandbytes package.*"
                                                  r"pip install bitsandbytes"):
        check_quantization(LLMConfig(name="tiny", quantization="8bit"))
    with pytest.raises(ConfigError, match="quantization=4bit needs a CUDA device .*this run is on cpu"):
        check_quantization(LLMConfig(name="tiny", quantization="4bit"), "cpu")
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert check_quantization(LLMConfig(name="tiny", quantization="4bit")) == torch.device("cuda", 3), \
        "a launcher's process quantises onto its own GPU"
    assert check_quantization(LLMConfig(name="tiny", quantization="4bit"), "cuda:1") == torch.device("cuda", 1)


def test_bitsandbytes_configs_are_llm_int8_and_qlora_nf4():
    eight = quantization_config("8bit", torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    four = quantization_config("4bit", torch.float16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float16


def test_predict_refuses_a_quantised_checkpoint_on_the_cpu(tmp_path):
    """A checkpoint trained with a quantised LLM names the GPU it needs, before reading any input."""
    from allspark.data import build_dataset
    from allspark.model import AllSpark
    from allspark.predict import predict

    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32"])
    AllSpark(cfg, build_dataset(cfg, "train").info()).save_pretrained(tmp_path / "ckpt")
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    saved["model"]["llm"]["quantization"] = "4bit"
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (tmp_path / "scene.tif").write_bytes(b"")
    with pytest.raises(ConfigError, match="quantization=4bit needs a CUDA (GPU|device)"):
        predict(tmp_path / "ckpt", [tmp_path / "scene.tif"], tmp_path / "map", device="cpu")
    assert not (tmp_path / "map").exists()


def test_merging_adapters_into_quantised_weights_is_refused():
    loaded = load_llm(LLMConfig(name="tiny", dtype="float32"), "cpu")
    loaded.quantization = "4bit"  # as a quantised load records it
    with pytest.raises(ValueError, match="quantised .*allspark export.* loads the base weights unquantised"):
        loaded.merge_adapters()


def test_float16_base_weights_train_on_the_cpu():
    """model.llm.dtype=float16: fp16 frozen weights, fp32 adapters; a forward and backward give a finite loss and
    finite gradients for every trainable part (the CPU emulates fp16: a warning says so)."""
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float16"])
    train_set = build_dataset(cfg, "train")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AllSpark(cfg, train_set.info())
    llm = model._llm.model
    assert model._llm.dtype == "float16" and llm.get_input_embeddings().weight.dtype == torch.float16
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    assert any(".lora_" in n for n, _ in trainable)
    out = model(train_set.collate([train_set[i] for i in range(8)]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in trainable}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".lora_" in n), "the adapters learn through fp16"


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("setting", ["8bit", "4bit"])
def test_a_quantised_tiny_run_trains_on_the_gpu(setting, tmp_path):
    """On a GPU: the base linear layers are bitsandbytes layers, LoRA trains in float32, the run finishes and its
    checkpoint loads back quantised."""
    import bitsandbytes as bnb

    from allspark.model import AllSpark
    from allspark.training import train

    cfg = load_config("hsi", overrides=[*TINY_HSI, f"model.llm.quantization={setting}", "train.epochs=1",
                                        "train.max_steps=3", "eval.baselines=[]"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["OA"] >= 0
    model = AllSpark.from_pretrained(tmp_path / "run" / "best")
    layer = bnb.nn.Linear8bitLt if setting == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in model._llm.model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
