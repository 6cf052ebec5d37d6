"""Spectral transformer encoder (AllSpark III-C "HSI"): tokens per band, grouping with padding, checks."""
from __future__ import annotations

import pytest
import torch

import encoders  # noqa: F401  (registers every encoder)
from allspark.registry import ENCODERS
from allspark.types import Tokens
from encoders.hsi import SpectralTransformer


def _small(**kw) -> SpectralTransformer:
    args = dict(in_bands=103, dim=32, depth=2, heads=4)
    args.update(kw)
    return SpectralTransformer(**args)


def test_registered_and_declares_its_interface():
    assert ENCODERS.get("hsi_spectral") is SpectralTransformer
    enc = ENCODERS.build({"type": "hsi_spectral", "dim": 32, "depth": 1}, optional={"info": {"num_bands": 103}})
    assert enc.out_dim == 32 and enc.input_keys == ("spectrum",)
    assert len(enc.transformer.layers) == 1
    assert len(SpectralTransformer(in_bands=103).transformer.layers) == 12  # paper: 12-layer encoder


def test_one_token_per_band():
    enc = _small().eval()
    out = enc({"spectrum": torch.randn(5, 103)})
    assert isinstance(out, Tokens)
    assert out.tokens.shape == (5, 103, 32)
    assert out.mask.shape == (5, 103) and out.mask.all()
    assert enc.value_projection.weight.shape == (32, 1)  # W in R^{1 x d}


def test_grouped_bands_are_zero_padded_not_truncated():
    enc = _small(bands_per_token=4).eval()
    assert enc.num_tokens == 26 and enc.pad == 1  # 103 = 25 * 4 + 3
    x = torch.randn(3, 103)
    out = enc({"spectrum": x})
    assert out.tokens.shape == (3, 26, 32) and out.mask.all()
    # the last band still reaches the output: changing it changes the tokens
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(out.tokens, enc({"spectrum": y}).tokens)


def test_band_order_matters():
    enc = _small(bands_per_token=8).eval()
    x = torch.randn(2, 103)
    out = enc({"spectrum": x}).tokens
    flipped = enc({"spectrum": x.flip(1)}).tokens
    assert not torch.allclose(out.mean(1), flipped.mean(1), atol=1e-4)


def test_gradients_reach_the_projection():
    enc = _small(bands_per_token=4)
    enc({"spectrum": torch.randn(4, 103)}).tokens.sum().backward()
    assert enc.value_projection.weight.grad is not None
    assert enc.position_embedding.grad is not None


def test_wrong_band_count():
    with pytest.raises(ValueError, match=r"'spectrum'.*expected shape \[B, 103\], got \[2, 64\]"):
        _small()({"spectrum": torch.randn(2, 64)})


def test_integer_input():
    with pytest.raises(ValueError, match=r"'spectrum'.*floating-point.*torch.int64"):
        _small()({"spectrum": torch.zeros(2, 103, dtype=torch.int64)})


def test_nan_input():
    x = torch.randn(2, 103)
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"'spectrum'.*1 value\(s\) are NaN"):
        _small()({"spectrum": x})


def test_config_disagreeing_with_the_data():
    with pytest.raises(ValueError, match="in_bands=103 but the dataset has 64 bands"):
        SpectralTransformer(in_bands=103, dim=32, depth=1, info={"num_bands": 64})
    with pytest.raises(ValueError, match="divisible"):
        SpectralTransformer(dim=30, heads=4)
