"""``AllSpark.ask``: free-form answers through transformers' ``generate`` on ``inputs_embeds``.

Tiny random LLM in float32 on the HSI demo. The reference is a greedy loop written here: per row, the unpadded
``[prompt | s_i]`` (``prompt_first``) or ``[s_i | prompt]`` run through the causal LM, the argmax token appended,
until ``max_new_tokens``. Rows of different prompt lengths in one batch (left padding inside ``ask``) must give
exactly the tokens of their own unpadded loop.
"""
import pytest
import torch

from allspark.config import load_config
from allspark.data import build_dataset
from allspark.model import AllSpark
from tests.helpers import TINY_HSI

WIDE = ("model.llm.tiny={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
        "intermediate_size: 128, initializer_range: 0.1}")


def _model(sequence: str):
    cfg = load_config("hsi", overrides=TINY_HSI + ["model.llm.dtype=float32", WIDE, f"model.sequence={sequence}"])
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    return AllSpark.from_config(cfg, train.info()).eval(), train


def _greedy(model, s: torch.Tensor, prompt: str, steps: int) -> str:
    llm = model._llm
    tok = llm.tokenizer
    ids = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"])
    parts = [llm.embed_tokens(ids), s]
    x = torch.cat(parts if model.cfg.model.sequence == "prompt_first" else parts[::-1])[None]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(llm.model(inputs_embeds=x).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            x = torch.cat([x, llm.embed_tokens(torch.tensor([[nxt]]))], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("sequence", ["prompt_first", "modality_first"])
def test_greedy_answers_equal_a_hand_rolled_greedy_loop_per_row(sequence):
    model, train = _model(sequence)
    batch = train.collate([train[i] for i in range(3)])
    prompts = ["What covers most of this pixel?", "Class?", "Name the land cover of this hyperspectral sample."]
    answers = model.ask(batch, prompts, max_new_tokens=6)
    with torch.no_grad():
        s = model.encode(batch)
    expected = [_greedy(model, s[i], q, 6) for i, q in enumerate(prompts)]
    assert answers == expected
    assert any(a for a in answers)  # the tiny LLM produces some text (not all end at once)
    assert model.ask(batch, "Class?", max_new_tokens=6)[1] == answers[1]  # one prompt for every row
    assert not model.training


def test_sampling_is_seeded_and_bad_arguments_are_clear_errors():
    model, train = _model("prompt_first")
    batch = train.collate([train[i] for i in range(2)])
    torch.manual_seed(3)
    first = model.ask(batch, "Class?", max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    assert model.ask(batch, "Class?", max_new_tokens=5, do_sample=True, temperature=1.5) == first
    with pytest.raises(ValueError, match=r"one prompt string or a list of 2"):
        model.ask(batch, ["only one"])
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 1"):
        model.ask(batch, "Class?", max_new_tokens=0)
