"""``train.attention_kernel``: the SDPA kernel of the training forward (math on CPU by default)."""
import pytest
import torch

from allspark.config import ConfigError, load_config
from allspark.data import build_dataset
from allspark.model import AllSpark
from allspark.training import attention_kernel
from tests.helpers import TINY_HSI


def test_auto_is_the_math_kernel_on_cpu_and_torchs_choice_elsewhere():
    with attention_kernel("auto", torch.device("cpu")):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the block
    with attention_kernel("auto", torch.device("cuda")):  # (nothing runs on it: the choice is torch's)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with attention_kernel("flash", torch.device("cpu")):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    with pytest.raises(ConfigError, match="train.attention_kernel must be one of"):
        attention_kernel("fast", torch.device("cpu"))


def test_math_and_flash_kernels_give_the_same_loss_and_gradients():
    cfg = load_config("hsi", overrides=TINY_HSI + ["model.llm.dtype=float32"])
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train.info())
    model.train()
    batch = {**train.collate([train[i] for i in range(6)]), "prompt_index": torch.tensor([0, 1, 2, 0, 1, 2])}
    results = []
    for kernel in ("math", "flash"):
        model.zero_grad(set_to_none=True)
        with attention_kernel(kernel, torch.device("cpu")):
            loss = model(batch).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-6) for n in g0)
