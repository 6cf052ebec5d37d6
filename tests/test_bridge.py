import pytest
import torch

from allspark.bridge import ModalBridge
from allspark.types import Tokens


def _bridge(**kw):
    torch.manual_seed(0)
    args = dict(num_queries=5, depth=2, heads=4, ff_mult=2)
    args.update(kw)
    return ModalBridge([16], 32, **args)


def test_output_shape_and_query_count():
    bridge = _bridge()
    out = bridge([Tokens.dense(torch.randn(3, 7, 16))])
    assert out.shape == (3, 5, 32)
    assert torch.isfinite(out).all()


def test_mask_makes_padding_irrelevant():
    bridge = _bridge().eval()
    tokens = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = bridge([Tokens(tokens, mask)])
    garbage = tokens.clone()
    garbage[0, 4:] = 1e3  # padding content must not matter
    out2 = bridge([Tokens(garbage, mask)])
    assert torch.allclose(out, out2, atol=1e-5)
    # and equals running the first row alone without its padding
    alone = bridge([Tokens.dense(tokens[:1, :4])])
    assert torch.allclose(out[:1], alone, atol=1e-5)


def test_keys_come_from_modality_tokens_only():
    """Permuting the modality tokens leaves the output unchanged (no positional leak from the queries)."""
    bridge = _bridge().eval()
    tokens = torch.randn(1, 6, 16)
    perm = torch.randperm(6)
    a = bridge([Tokens.dense(tokens)])
    b = bridge([Tokens.dense(tokens[:, perm])])
    assert torch.allclose(a, b, atol=1e-5)


def test_several_encoders_get_projected_and_tagged():
    torch.manual_seed(0)
    bridge = ModalBridge([8, 16], 32, num_queries=4, depth=1, heads=4)
    a, b = Tokens.dense(torch.randn(2, 3, 8)), Tokens.dense(torch.randn(2, 5, 16))
    out = bridge([a, b])
    assert out.shape == (2, 4, 32)
    merged = bridge.merge([a, b])
    assert merged.tokens.shape == (2, 8, 16)
    # swapping which encoder a token set comes from changes the result (modality embedding)
    same_width = ModalBridge([16, 16], 32, num_queries=4, depth=1, heads=4)
    x, y = Tokens.dense(torch.randn(2, 3, 16)), Tokens.dense(torch.randn(2, 3, 16))
    assert not torch.allclose(same_width([x, y]), same_width([y, x]))
    with pytest.raises(ValueError, match="2 token set"):
        bridge([a])


def test_gradients_reach_queries_and_tokens():
    bridge = _bridge()
    tokens = torch.randn(2, 4, 16, requires_grad=True)
    bridge([Tokens.dense(tokens)]).sum().backward()
    assert bridge.queries.grad is not None and tokens.grad is not None
    assert tokens.grad.abs().sum() > 0


def test_all_padding_row_is_an_error():
    bridge = _bridge()
    with pytest.raises(ValueError, match="no real modality token"):
        bridge([Tokens(torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.bool))])


def test_tokens_mean_skips_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(Tokens(tokens, mask).mean(), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    empty = Tokens(tokens, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(empty.mean(), torch.zeros(2, 2))
