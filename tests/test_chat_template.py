"""``model.prompts.chat_template``: each prompt wrapped in the tokenizer's chat template (the prompt as the user's
message, the assistant's turn opened) before it is tokenised, for the ``[prompt | bridge tokens]`` sequences and
for ``AllSpark.ask``. The tiny random LLM, with a chat template set here, so the expected token ids are written
out by hand: the template's special tokens by their ids, the text between them tokenised on its own."""
from __future__ import annotations

import pytest
import torch

from allspark.config import ConfigError, load_config
from allspark.data import build_dataset
from allspark.llm import load_llm
from allspark.model import AllSpark
from tests.helpers import TINY_HSI

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WIDE = ("model.llm.tiny={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
        "intermediate_size: 128, initializer_range: 0.1}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32", WIDE, "model.prompts.chat_template=true"])
    train = build_dataset(cfg, "train")
    return cfg, train


def _model(cfg, train, template=TEMPLATE) -> AllSpark:
    loaded = load_llm(cfg.model.llm)
    loaded.tokenizer.chat_template = template
    torch.manual_seed(0)
    return AllSpark(cfg, train.info(), llm=loaded).eval()


def _by_hand(tok, text: str) -> list[int]:
    """``TEMPLATE`` with ``text`` as the user's message and the generation prompt, as token ids."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert start != tok.unk_token_id and end != tok.unk_token_id

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    return [start, *ids("user\n" + text), end, *ids("\n"), start, *ids("assistant\n")]


def test_every_prompt_is_wrapped_in_the_chat_template_and_the_sequence_holds_it(setup):
    cfg, train = setup
    model = _model(cfg, train)
    tok = model.tokenizer
    assert len(model.prompts) > 1
    for k, prompt in enumerate(model.prompts):
        expected = _by_hand(tok, prompt)
        length = int(model.prompt_lengths[k])
        assert model.prompt_ids[k, :length].tolist() == expected, prompt
    # the first prompt's exact ids, spelled out: <|im_start|> = 1, <|im_end|> = 2 in the SmolLM2 tokenizer
    first = model.prompt_ids[0, : int(model.prompt_lengths[0])].tolist()
    assert first[0] == 1 and first.count(1) == 2 and first.count(2) == 1
    assert tok.decode(first) == f"<|im_start|>user\n{model.prompts[0]}<|im_end|>\n<|im_start|>assistant\n"

    # what the LLM runs in evaluation ([chat prompt | bridge tokens], cached prompt) against a plain forward
    batch = train.collate([train[i] for i in range(3)])
    with torch.no_grad():
        got = model.run_llm(batch).hidden
        s = model.encode(batch)
        prompt = model._llm.embed_tokens(torch.tensor(_by_hand(tok, model.prompts[0])))[None].expand(3, -1, -1)
        x = torch.cat([prompt, s], dim=1)
        full = model._llm.decoder(inputs_embeds=x, attention_mask=torch.ones(3, x.shape[1], dtype=torch.long))
    n = s.shape[1]
    assert torch.allclose(got, full.last_hidden_state[:, -n:], atol=1e-5)


def test_off_by_default_the_prompt_is_tokenised_as_it_is(setup):
    cfg, train = setup
    plain = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32", WIDE])
    assert plain.model.prompts.chat_template is False
    model = _model(plain, train)
    ids = model.prompt_ids[0, : int(model.prompt_lengths[0])].tolist()
    assert ids == model.tokenizer(model.prompts[0], add_special_tokens=False)["input_ids"]


def test_ask_wraps_the_question_in_the_chat_template(setup):
    cfg, train = setup
    model = _model(cfg, train)
    llm, tok = model._llm, model.tokenizer
    batch = train.collate([train[i] for i in range(2)])
    question = "What is in this pixel?"
    answers = model.ask(batch, question, max_new_tokens=3)
    with torch.no_grad():
        s = model.encode(batch)
        expected = []
        for i in range(2):  # a greedy loop over [chat(question) | s_i], written out
            x = torch.cat([llm.embed_tokens(torch.tensor(_by_hand(tok, question))), s[i]])[None]
            new = []
            for _ in range(3):
                nxt = int(llm.model(inputs_embeds=x).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                x = torch.cat([x, llm.embed_tokens(torch.tensor([[nxt]]))], dim=1)
            expected.append(tok.decode(new, skip_special_tokens=True).strip())
    assert answers == expected


def test_a_tokenizer_without_a_chat_template_is_a_config_error(setup):
    cfg, train = setup
    with pytest.raises(ConfigError, match=r"model.prompts.chat_template is true, but the LLM's tokenizer .* has no "
                                          r"chat template .*set model.prompts.chat_template=false"):
        _model(cfg, train, template=None)


def test_a_task_without_an_encoder_refuses_the_chat_template():
    cfg = load_config("text", overrides=["model.llm.name=tiny", "model.llm.dtype=float32",
                                         "model.prompts.chat_template=true"])
    with pytest.raises(ConfigError, match=r"chat_template: true applies to tasks with an encoder.*no encoder"):
        AllSpark(cfg, build_dataset(cfg, "train").info())
