"""``model.sequence``: the paper's [bridge | prompt] order unchanged, and ``prompt_first`` ([prompt | bridge]) whose
evaluation reuses the prompt's key/value cache; the tiled scene map. Tiny random LLM in float32.

Measured maxima (CPU, float32): the cached evaluation forward vs the full forward 0.0 (bit-identical here; the
tests allow 1e-6 for other kernels); a padded row of a mixed-prompt batch vs the row alone 0.0-3e-7."""
import pytest
import torch

from allspark.config import load_config
from allspark.data import build_dataset, build_loader
from allspark.model import AllSpark
from tests.helpers import TINY_HSI

POOLINGS = ("last", "mean", "bridge", "last+bridge")


def _model(sequence: str):
    cfg = load_config("hsi", overrides=TINY_HSI + ["model.llm.dtype=float32", f"model.sequence={sequence}"])
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train.info())
    return cfg, model, train.collate([train[i] for i in range(6)])


@pytest.fixture(scope="module")
def prompt_first():
    return _model("prompt_first")


def _uncached(model, batch):
    """The full forward over [prompt | pad | s_i]: the cached-prompt and shared-prompt shortcuts off for this call."""
    model._uniform_prompt = lambda prompt_index: None
    model.cfg.model.prompt_sharing = False
    try:
        return model.run_llm(batch)
    finally:
        del model._uniform_prompt
        model.cfg.model.prompt_sharing = True


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_unknown_sequence_is_refused():
    cfg = load_config("hsi", overrides=TINY_HSI + ["model.sequence=bridge_last"])
    with pytest.raises(ValueError, match="model.sequence must be one of"):
        AllSpark.from_config(cfg, build_dataset(cfg, "train").info())


def test_modality_first_is_the_paper_sequence_bit_for_bit():
    """[s_i | prompt | pad] with the default positions: the same hidden states as a decoder call on that
    sequence built by hand, in training (random prompts, with grad) and in evaluation (the shared prompt)."""
    _, model, batch = _model("modality_first")
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2])
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            out = model.run_llm({**batch, "prompt_index": prompt_index} if training else batch)
            idx = prompt_index if training else torch.zeros(6, dtype=torch.long)
            s = out.modality_input
            ids, lengths = model.prompt_ids[idx], model.prompt_lengths[idx]
            x = torch.cat([s.to(model._llm.embed_tokens.weight.dtype), model._llm.embed_tokens(ids)], dim=1)
            mask = torch.cat([torch.ones(6, s.shape[1], dtype=torch.bool),
                              torch.arange(ids.shape[1])[None] < lengths[:, None]], dim=1)
            ref = model._llm.decoder(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        assert out.modality_start == 0
        assert torch.equal(out.hidden, ref)
        assert torch.equal(out.last_index, s.shape[1] + lengths - 1)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_prompt_first_cached_evaluation_equals_the_full_forward(prompt_first, k):
    _, model, batch = prompt_first
    model.eval()
    model._prompt_states.clear()
    b = {**batch, "prompt_index": torch.full((6,), k)}
    with torch.no_grad():
        cached = model.run_llm(b)
        full = _uncached(model, b)
    n = model.num_modality_tokens
    width = int(model.prompt_lengths[k])
    assert cached.hidden.shape[1] == n and full.hidden.shape[1] == width + n  # the cache holds the prompt
    assert full.modality_start == width and torch.equal(full.last_index, torch.full((6,), width + n - 1))
    assert k in model._prompt_states
    for mode in POOLINGS:
        diff = _max_diff(cached.pool(mode), full.pool(mode))
        assert diff <= 1e-6, (mode, diff)  # measured 0.0
    with torch.no_grad():
        logits_cached = model.head(cached, batch).predictions["logits"]
        logits_full = model.head(full, batch).predictions["logits"]
    assert _max_diff(logits_cached, logits_full) <= 1e-6


def test_prompt_first_inference_mode_matches_no_grad(prompt_first):
    _, model, batch = prompt_first
    model.eval()
    with torch.no_grad():
        plain = model(batch).predictions["logits"]
    with torch.inference_mode():
        inference = model(batch).predictions["logits"]
    assert torch.equal(plain, inference)


def test_prompt_first_padded_rows_equal_each_row_alone(prompt_first):
    """[prompt | pad | s_i] with positions counted over real tokens: a row of a batch of prompts of different
    lengths equals that row alone (whose evaluation then takes the cached path)."""
    _, model, batch = prompt_first
    model.eval()
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2])
    assert len(set(model.prompt_lengths[:3].tolist())) > 1  # the prompts differ in length
    with torch.no_grad():
        together = model({**batch, "prompt_index": prompt_index}).predictions["logits"]
        for i in range(6):
            row = {k: v[i: i + 1] for k, v in batch.items()}
            alone = model({**row, "prompt_index": prompt_index[i: i + 1]}).predictions["logits"]
            assert _max_diff(together[i: i + 1], alone) <= 1e-6, i


def test_prompt_first_cache_follows_weight_updates(prompt_first):
    """An in-place update of the language model's weights (an optimizer step, a checkpoint load) bumps their
    version counters, so the next evaluation recomputes the prompt's cache."""
    _, model, batch = prompt_first
    model.eval()
    with torch.no_grad():
        before = model(batch).predictions["logits"]
        key_before, state_before = model._prompt_states[0]
        lora = next(p for n, p in model.llm.named_parameters() if "lora_B" in n)  # layer 0's first projection
        saved = lora.detach().clone()
        try:
            lora.add_(1.0)
            after = model(batch).predictions["logits"]
            key_after, state_after = model._prompt_states[0]
            assert key_after != key_before
            assert not all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                           for a, b in zip(state_after["kv"], state_before["kv"]))  # a new prompt cache
            assert _max_diff(after, before) > 1e-3  # the weight change reaches the output
            assert _max_diff(after, model.head(_uncached(model, batch), batch).predictions["logits"]) <= 1e-6
        finally:
            lora.copy_(saved)


def test_shared_prompt_training_forward_equals_the_full_forward_and_its_gradients(prompt_first):
    """Training with ``prompt_sharing`` (the default): each distinct prompt runs once and its key/value states are
    shared by the rows using it; the outputs at the bridge positions and every trainable gradient equal those of
    the full forward over [prompt | pad | s_i] (float32; measured max difference ~1e-7)."""
    _, model, batch = prompt_first
    model.train()
    prompt_index = torch.tensor([2, 0, 2, 1, 0, 2])  # three distinct prompts of different lengths, shuffled
    grads = []
    outs = []
    for sharing in (True, False):
        model.cfg.model.prompt_sharing = sharing
        model.zero_grad(set_to_none=True)
        out = model.run_llm({**batch, "prompt_index": prompt_index})
        n = model.num_modality_tokens
        outs.append(out.hidden[:, -n:])
        assert torch.equal(out.last_index, torch.full((6,), out.hidden.shape[1] - 1))
        model.head(out, batch).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    model.cfg.model.prompt_sharing = True
    assert outs[0].shape == outs[1].shape and _max_diff(outs[0], outs[1]) <= 1e-5
    assert grads[0].keys() == grads[1].keys() and any("lora" in k for k in grads[0])
    for k in grads[0]:
        scale = grads[1][k].abs().max().item() + 1e-12
        assert _max_diff(grads[0][k], grads[1][k]) <= 1e-4 * max(scale, 1.0), k
    # a broken share (every row given prompt 0's states) is far from the full forward
    model.cfg.model.prompt_sharing = False
    with torch.no_grad():
        wrong = model.run_llm({**batch, "prompt_index": torch.zeros(6, dtype=torch.long)}).hidden[:, -n:]
    model.cfg.model.prompt_sharing = True
    assert _max_diff(wrong, outs[1]) > 1e-3


def test_per_batch_prompt_choice_shares_one_prompt_per_batch_and_covers_the_set(prompt_first):
    """``model.prompts.train_choice: per_batch``: in training every row of a batch gets the same prompt, drawn from
    torch's RNG (so seeded runs repeat it), and over steps every prompt of the set is drawn; ``random`` gives rows
    different prompts; evaluation uses the first prompt either way; an unknown choice is refused."""
    _, model, _ = prompt_first
    choice, k = model.cfg.model.prompts.train_choice, len(model.prompts)
    assert k == 3
    model.train()
    try:
        model.cfg.model.prompts.train_choice = "per_batch"
        torch.manual_seed(1)
        draws = [model.choose_prompts(16, torch.device("cpu")) for _ in range(40)]
        assert all(d.shape == (16,) and d.dtype == torch.long and bool((d == d[0]).all()) for d in draws)
        assert {int(d[0]) for d in draws} == set(range(k))
        torch.manual_seed(1)
        assert all(torch.equal(d, model.choose_prompts(16, torch.device("cpu"))) for d in draws)
        model.cfg.model.prompts.train_choice = "random"
        torch.manual_seed(1)
        assert any(len(set(model.choose_prompts(16, torch.device("cpu")).tolist())) > 1 for _ in range(5))
        model.eval()
        for c in ("per_batch", "random", "first"):
            model.cfg.model.prompts.train_choice = c
            assert torch.equal(model.choose_prompts(4, torch.device("cpu")), torch.zeros(4, dtype=torch.long))
    finally:
        model.cfg.model.prompts.train_choice = choice
    cfg = load_config("hsi", overrides=TINY_HSI + ["model.prompts.train_choice=per_example"])
    with pytest.raises(ValueError, match=r"train_choice must be one of \['random', 'per_batch', 'first'\], got 'per_example'"):
        AllSpark.from_config(cfg, build_dataset(cfg, "train").info())


def test_prompt_first_trains_with_full_forwards(prompt_first):
    _, model, batch = prompt_first
    model.train()
    model.zero_grad(set_to_none=True)
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2])  # prompts of different lengths: padding between
    model.cfg.model.prompt_sharing = False
    try:
        out = model.run_llm({**batch, "prompt_index": prompt_index})
    finally:
        model.cfg.model.prompt_sharing = True
    width, n = int(model.prompt_lengths[:3].max()), model.num_modality_tokens
    assert out.modality_start == width and out.hidden.shape[1] == width + n
    assert torch.equal(out.last_index, torch.full((6,), width + n - 1))
    lengths = model.prompt_lengths[prompt_index]
    assert torch.equal(out.attention_mask[:, :width], torch.arange(width)[None] < lengths[:, None])
    model.head(out, batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("bridge.") and p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_scene_map_is_tiled_and_equals_one_pass(prompt_first):
    """predict_scene: every pixel once, in scene order, tile by tile (40 rows in tiles of 7), with the same
    predictions as one collect_predictions pass over the scene split; it reports the pixels per second."""
    from allspark.distributed import make_accelerator
    from allspark.evaluation import collect_predictions
    from allspark.evaluation.classification import PixelClassificationEvaluator

    cfg, model, _ = prompt_first
    scene = build_dataset(cfg, "scene")
    info = scene.info()
    accelerator = make_accelerator(mixed_precision="no")
    evaluator = PixelClassificationEvaluator(info, scene_tile_rows=7)
    gathered, stats = evaluator.predict_scene(model, scene, accelerator, batch_size=64)
    h, w = info["height"], info["width"]
    assert stats["scene_pixels"] == h * w and stats["scene_tiles"] == -(-h // 7)
    assert stats["scene_pixels_per_second"] > 0 and stats["scene_seconds"] > 0
    assert gathered["index"].tolist() == list(range(h * w))
    assert gathered["coords"].tolist() == [[r, c] for r in range(h) for c in range(w)]
    whole = collect_predictions(model, build_loader(scene, 64), accelerator, evaluator.pred_keys,
                                evaluator.batch_keys, "scene")
    for key in ("pred", "label", "coords", "index"):
        assert (gathered[key] == whole[key]).all(), key
    with pytest.raises(ValueError, match="scene_tile_rows"):
        PixelClassificationEvaluator(info, scene_tile_rows=0)
