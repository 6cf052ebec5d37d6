"""The core's two seams: the language-model interface (allspark.lm) and the auxiliary losses (allspark.auxiliary).
Tiny random LLM, float32."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from allspark.auxiliary import AUXILIARY_LOSSES, AlignmentLoss, AuxiliaryLoss, AuxiliaryLosses, LossTerm
from allspark.config import load_config
from allspark.lm import LanguageModel
from allspark.types import Output

ROOT = Path(__file__).resolve().parents[1]
FUSION = ["model.llm.name=tiny", "model.llm.dtype=float32", "data.eval_batch_size=512"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_language_module_does_not_import_the_model_and_heads_use_the_interface():
    language = _imports(ROOT / "allspark/language.py")
    assert not any(n == "allspark.model" or n.startswith("allspark.model.") for n in language)
    assert "allspark.language" not in _imports(ROOT / "allspark/lm.py")
    for path in sorted((ROOT / "heads").glob("*.py")):
        text = path.read_text()
        for private in ("._llm", ".decoder(", ".embed_tokens", ".lm_head"):
            assert private not in text, (path.name, private)


@pytest.fixture(scope="module")
def fusion():
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi+sar", overrides=[*FUSION, "model.alignment.weight=0.5"])
    ds = build_dataset(cfg, "train")
    torch.manual_seed(0)
    return AllSpark(cfg, ds.info()), ds.collate([ds[i] for i in range(8)])


def test_language_model_interface_matches_the_decoder(fusion):
    model, _ = fusion
    lm = model.language_model
    assert LanguageModel.of(lm) is lm and LanguageModel.of(model._llm).loaded is model._llm
    assert lm.hidden_size == model.hidden_size and lm.tokenizer is model.tokenizer
    first, second = lm.token_ids("a remote sensing image of a river"), lm.token_ids("and a forest")
    assert len(first) > 3 and len(second) >= 3
    ids = torch.tensor([first, second[:3] + [0] * (len(first) - 3)])  # the second row right-padded
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        ref = model._llm.decoder(inputs_embeds=model._llm.embed_tokens(ids), attention_mask=mask.long())
        run = lm.run(lm.embed(ids), mask)
        assert torch.equal(run.hidden, ref.last_hidden_state)
        pooled = lm.pooled(ids, mask, "last")
        assert torch.equal(pooled[1], ref.last_hidden_state[1, 2].float())
        mean = lm.pooled(ids, mask, "mean")
        torch.testing.assert_close(mean[1], ref.last_hidden_state[1, :3].float().mean(0))
        assert torch.equal(lm.logits(run.hidden), model._llm.lm_head(run.hidden))
    # adapters off: the base model's outputs, restored on exit
    lora = next(p for n, p in model.llm.named_parameters() if "lora_B" in n)
    saved = lora.detach().clone()
    with torch.no_grad():
        lora.normal_(0, 0.5)
        adapted = lm.run(lm.embed(ids), mask).hidden
        with lm.adapters_off():
            off = lm.run(lm.embed(ids), mask).hidden
            assert all(float(p.abs().sum()) == 0 for n, p in model.llm.named_parameters() if "lora_B" in n)
        again = lm.run(lm.embed(ids), mask).hidden
        lora.copy_(saved)
    assert not torch.allclose(adapted, off) and torch.equal(adapted, again)


def test_alignment_is_an_auxiliary_loss_with_stable_parameter_names(fusion):
    model, _ = fusion
    assert "alignment" in AUXILIARY_LOSSES
    loss = model.auxiliary["alignment"]
    assert isinstance(loss, AlignmentLoss) and loss.weight == 0.5 and model.auxiliary.task_weight == 1.0
    assert model.alignment is loss.objective and model.alignment_proj is loss.proj
    names = [k for k in model.trainable_state_dict() if "alignment" in k]
    assert names == [f"alignment_proj.{i}.{w}" for i in range(2) for w in ("weight", "bias")]


class _Constant(AuxiliaryLoss):
    """A test term: ``value * sum of the first token set`` (None for batches of one sample)."""

    def __init__(self, name: str, weight: float, value: float) -> None:
        self.name, self.weight, self.value = name, weight, value

    def __call__(self, parts, batch, token_sets):
        x = token_sets[0].tokens.sum()
        if token_sets[0].tokens.shape[0] < 2:
            return LossTerm(None, zero=x * 0.0)
        return LossTerm(self.value * x, {self.name: x.detach()})


def test_auxiliary_losses_combine_with_weights():
    from allspark.types import Tokens

    sets = [Tokens.dense(torch.ones(3, 2, 4, requires_grad=True))]
    aux = AuxiliaryLosses({"a": _Constant("a", 2.0, 1.0), "b": _Constant("b", 0.5, -1.0)}, task_weight=0.25)
    terms = aux.terms(None, {}, sets)
    out = aux.combine(Output(torch.tensor(4.0), extras={"head": torch.tensor(1.0)}), terms)
    assert list(out.extras) == ["head", "a", "b", "task_loss"]
    assert out.loss.item() == pytest.approx(0.25 * 4.0 + 2.0 * 24.0 - 0.5 * 24.0)
    only = aux.combine(None, aux.terms(None, {}, sets))  # an auxiliary-only step: no head output
    assert only.loss.item() == pytest.approx(36.0) and set(only.extras) == {"a", "b"}
    one = [Tokens.dense(torch.ones(1, 2, 4, requires_grad=True))]
    untouched = aux.combine(Output(torch.tensor(4.0)), aux.terms(None, {}, one))
    assert untouched.loss.item() == 4.0 and "task_loss" not in untouched.extras
    zero = aux.combine(None, aux.terms(None, {}, one))
    assert zero.loss.item() == 0.0 and zero.loss.requires_grad


def test_alignment_only_model_has_no_llm_in_its_training_graph(fusion):
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi+sar", overrides=[*FUSION, "model.alignment.weight=1", "model.alignment.task_weight=0"])
    ds = build_dataset(cfg, "train")
    model = AllSpark(cfg, ds.info())
    assert model.auxiliary.task_weight == 0
    model.train()
    out = model(ds.collate([ds[i] for i in range(8)]))
    assert set(out.extras) == {"alignment"}
    plain = AllSpark(load_config("hsi+sar", overrides=[*FUSION, "model.alignment.objective=null"]), ds.info())
    assert not plain.auxiliary and plain.alignment is None and plain.alignment_proj is None
