import pytest
import torch

from allspark.metrics.classification import classification_metrics
from allspark.types import LLMOutput
from heads.classification import ClassificationHead
from heads.regression import RegressionHead


def test_classification_metrics_hand_computed():
    # confusion (rows true, cols pred): class0: 2 right, 1 as class1; class1: 1 right; class2: 1 right, 1 as 0
    target = torch.tensor([0, 0, 0, 1, 2, 2, -1])
    pred = torch.tensor([0, 0, 1, 1, 2, 0, 2])
    m = classification_metrics(pred, target, 3, ["a", "b", "c"])
    assert m["num_samples"] == 6  # the -1 (unlabelled) sample is skipped
    assert m["OA"] == pytest.approx(4 / 6)
    assert m["AA"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # kappa = (po - pe) / (1 - pe); true counts [3,1,2], pred counts [3,2,1]
    po, pe = 4 / 6, (3 * 3 + 1 * 2 + 2 * 1) / 36
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-6)
    assert m["per_class"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.5})
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_classification_metrics_class_absent_from_test_and_bad_input():
    m = classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    assert m["per_class"]["2"] is None and m["AA"] == 1.0
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        classification_metrics(torch.tensor([5]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0]), 3)


def _llm_out(hidden):
    b, n, _ = hidden.shape
    return LLMOutput(hidden, torch.ones(b, n, dtype=torch.bool), torch.full((b,), n - 1), 2)


def test_classification_head_pools_last_and_ignores_unlabelled():
    head = ClassificationHead(8, 3)
    hidden = torch.randn(4, 5, 8)
    out = head(_llm_out(hidden), {"label": torch.tensor([0, 2, -1, 1])})
    assert out.predictions["logits"].shape == (4, 3)
    assert torch.isfinite(out.loss)
    # only the last position matters for 'last' pooling
    changed = hidden.clone()
    changed[:, :4] = 0
    assert torch.allclose(head(_llm_out(changed), {}).predictions["logits"], out.predictions["logits"])
    assert head(_llm_out(hidden), {"label": torch.full((4,), -1)}).loss.item() == 0.0  # mean over no labelled row
    assert head(_llm_out(hidden), {}).loss is None
    with pytest.raises(ValueError, match="num_classes=3"):
        ClassificationHead(8, 3, info={"num_classes": 9})


def test_classification_head_batch_norm_standardises_over_the_batch():
    torch.manual_seed(0)
    head = ClassificationHead(8, 3, norm="batch")
    # states that share one large component and differ by 1 %: a batch norm brings the differences to unit scale
    hidden = 100.0 + torch.randn(6, 5, 8)
    head.train()
    head(_llm_out(hidden), {"label": torch.tensor([0, 1, 2, 0, 1, 2])})
    last = hidden[:, -1]
    expected = (last - last.mean(0)) / torch.sqrt(last.var(0, unbiased=False) + head.norm.eps)
    manual = head.linear(expected * head.norm.weight + head.norm.bias)
    head.eval()
    head.norm.running_mean.copy_(last.mean(0))
    head.norm.running_var.copy_(last.var(0, unbiased=False))
    assert torch.allclose(head(_llm_out(hidden), {}).predictions["logits"], manual, atol=1e-4)
    # a training batch of one sample uses the running statistics instead of failing
    head.train()
    one = head(_llm_out(hidden[:1]), {"label": torch.tensor([0])})
    assert torch.allclose(one.predictions["logits"], manual[:1], atol=1e-4) and torch.isfinite(one.loss)
    with pytest.raises(ValueError, match="norm must be 'layer' or 'batch', got 'group'"):
        ClassificationHead(8, 3, norm="group")


def test_regression_head_unscale_is_parameter_free_inverse():
    head = RegressionHead(8, 2, info={"target_mean": [10.0, -5.0], "target_std": [2.0, 0.5]})
    n_params = sum(p.numel() for p in head.parameters())
    assert n_params == 8 * 2 + 2 + 2 * 8  # linear + norm only; mean/std are buffers
    y = torch.tensor([[12.0, -4.0]])
    assert torch.allclose(head.unscale(head.scale(y)), y)
    out = head(_llm_out(torch.randn(1, 3, 8)), {"target": y})
    assert out.predictions["pred"].shape == (1, 2)
    # the loss is computed on standardised targets
    scaled = head.scale(y)
    pred_scaled = head.scale(out.predictions["pred"])
    assert out.loss.item() == pytest.approx(((pred_scaled - scaled) ** 2).mean().item(), rel=1e-5)


def test_regression_head_masked_loss_and_shape_errors():
    head = RegressionHead(8, (3,))
    hidden = _llm_out(torch.randn(2, 3, 8))
    target = torch.zeros(2, 3)
    full = head(hidden, {"target": target}).loss
    masked = head(hidden, {"target": target, "target_mask": torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)}).loss
    pred = head(hidden, {}).predictions["pred"]
    assert masked.item() == pytest.approx(pred[0, 0].item() ** 2, rel=1e-5)
    assert full.item() == pytest.approx((pred ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="expected shape"):
        head(hidden, {"target": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="positive"):
        RegressionHead(8, 1, target_std=0.0)


def _skip_head(**kw):
    info = {"target_mean": 10.0, "target_std": 2.0, "input_len": 2, "target_shape": [2, 3]}
    return RegressionHead(4, info=info, skip="x", **kw)


def test_regression_head_skip_hand_computed():
    """z = linear(pooled) + W h + b with the history's steps mapped to the output steps, one W for all series."""
    head = _skip_head()
    assert head.out_shape == (2, 3) and head.skip.weight.shape == (2, 2)
    hidden = _llm_out(torch.randn(1, 3, 4))
    h = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # [B=1, 2 steps, 3 series]
    # zero-initialised: the skip adds nothing until trained
    base = head.unscale(head.linear(head.norm(hidden.pool("last").float())).view(1, 2, 3))
    assert torch.equal(head(hidden, {"x": h}).predictions["pred"], base)
    with torch.no_grad():
        head.linear.weight.zero_(); head.linear.bias.zero_()
        head.skip.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, -1.0]]))
        head.skip.bias.copy_(torch.tensor([0.0, 1.0]))
    z = torch.tensor([[[1.0, 2.0, 3.0], [0.5 - 4 + 1, 1 - 5 + 1, 1.5 - 6 + 1]]])
    pred = head(hidden, {"x": h}).predictions["pred"]
    assert torch.allclose(pred, z * 2.0 + 10.0)
    # a history with a trailing feature axis of one ([B, T, N, 1], the graph reader's x) reads the same
    assert torch.allclose(head(hidden, {"x": h[..., None]}).predictions["pred"], pred)
    # skip_scale divides the history first; 'target_std' uses the mean target spread
    scaled = _skip_head(skip_scale="target_std")
    assert scaled.skip_scale == 2.0


def test_regression_head_skip_learns_what_the_pooled_state_cannot():
    """Targets that are a linear function of the history: the head whose hidden state carries nothing learns
    them through the skip, and the same head without the skip stays at the targets' variance."""
    torch.manual_seed(0)
    w_true = torch.randn(2, 2)
    losses = {}
    for skip in (None, "x"):
        info = {"input_len": 2, "target_shape": [2, 3]}
        head = RegressionHead(4, info=info, skip=skip)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(300):
            h = torch.randn(32, 2, 3)
            target = torch.einsum("bts,ot->bos", h, w_true)
            loss = head(_llm_out(torch.randn(32, 3, 4)), {"x": h, "target": target}).loss
            opt.zero_grad(); loss.backward(); opt.step()
        losses[skip] = loss.item()
    assert losses["x"] < 0.01 and losses[None] > 0.5, losses


def test_regression_head_skip_errors():
    head = _skip_head()
    hidden = _llm_out(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="no such key"):
        head(hidden, {"obs": torch.zeros(2, 2, 3)})
    with pytest.raises(ValueError, match=r"\[B=2, 2 steps, series with 3 values in all\].*got \[2, 5, 3\]"):
        head(hidden, {"x": torch.zeros(2, 5, 3)})
    with pytest.raises(ValueError, match="skip_scale"):
        _skip_head(skip_scale=0)
    with pytest.raises(ValueError, match="output steps, series"):
        RegressionHead(4, 3, info={"input_len": 2}, skip="x")
    with pytest.raises(Exception, match="skip_len=5 but the dataset gives 2 input steps"):
        _skip_head(skip_len=5)


def test_regression_head_skip_least_squares_start_recovers_a_linear_map():
    """init_from_data: the ridge fit over the batches recovers an exact linear map of the history (garbage at
    masked targets is ignored) and zeroes the pooled layer, so the head predicts the targets before training."""
    torch.manual_seed(0)
    info = {"target_mean": 1.0, "target_std": 3.0, "input_len": 4, "target_shape": [2, 5]}
    head = RegressionHead(8, info=info, skip="x")
    w_true, b_true = torch.randn(2, 4), torch.tensor([0.5, -1.0])
    batches = []
    for _ in range(3):
        h = torch.randn(16, 4, 5)
        z = torch.einsum("bts,ot->bos", h, w_true) + b_true[None, :, None]
        mask = torch.rand(16, 2, 5) > 0.2
        target = torch.where(mask, z * 3.0 + 1.0, torch.full_like(z, 1e6))
        batches.append({"x": h, "target": target, "target_mask": mask})
    summary = head.init_from_data(iter(batches), ridge=0.0)
    assert summary["rows"] == sum(int(b["target_mask"].sum()) for b in batches)
    assert summary["fit_mse"] == pytest.approx(0.0, abs=1e-8)
    assert torch.allclose(head.skip.weight, w_true, atol=1e-5) and torch.allclose(head.skip.bias, b_true, atol=1e-5)
    assert not head.linear.weight.any() and not head.linear.bias.any()
    out = head(_llm_out(torch.randn(16, 3, 8)), batches[0])
    assert out.loss.item() == pytest.approx(0.0, abs=1e-8)
    # skip_init=zeros (or no skip): nothing to do
    assert RegressionHead(8, info=info, skip="x", skip_init="zeros").init_from_data(iter(batches)) is None
    with pytest.raises(ValueError, match="skip_init must be"):
        RegressionHead(8, info=info, skip="x", skip_init="random")
    empty = [{**batches[0], "target_mask": torch.zeros(16, 2, 5, dtype=torch.bool)}]
    with pytest.raises(ValueError, match=r"no observed training target to fit the skip at output step\(s\) \[1, 2\]"):
        RegressionHead(8, info=info, skip="x").init_from_data(iter(empty))
