"""Text (IMDB): the aclImdb reader and its errors, the [prompt | review | label word] sequence, the LM loss on
the label tokens only, label scoring by log-likelihood (equal to plain full forwards), the token budget and
its count, the evaluation protocol, and a training step that learns."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allspark.config import load_config
from tests.helpers import fit_one_batch
from allspark.data.base import DatasetFormatError
from allspark.data.imdb import IMDB
from allspark.language import TextLLMOutput, score_continuations
from allspark.model import AllSpark


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("imdb")
    IMDB.write_demo(root, seed=0, train_per_class=10, test_per_class=4)
    return root


@pytest.fixture(scope="module")
def model(corpus):
    torch.manual_seed(0)
    # float32: the exactness checks below compare two computations at 1e-4/1e-5 (bf16 is chosen by auto on AMX CPUs)
    cfg = load_config("text", overrides=["model.llm.name=tiny", "model.llm.dtype=float32", "model.text_input.max_input_tokens=24"])
    return AllSpark(cfg, IMDB(corpus, "train").info())


def test_reader_layout_splits_and_labels(corpus):
    train, val, test = (IMDB(corpus / "aclImdb", s, val_ratio=0.1) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 8)
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert all("/test/" in str(p) for p, _ in test.samples)
    assert IMDB(corpus, "test").samples == test.samples  # the folder holding aclImdb works too
    item = test[len(test) - 1]
    assert item["target_text"] == "positive" and int(item["label"]) == 1
    assert test[0]["target_text"] == "negative"
    path = corpus / "aclImdb" / "test" / "pos" / "99_10.txt"
    path.write_text("Great fun.<br /><br />Loved   it.")
    ds = IMDB(corpus, "test")
    assert ds[[p for p, _ in ds.samples].index(path)]["input_text"] == "Great fun. Loved it."
    path.unlink()


def test_reader_errors(tmp_path):
    IMDB.write_demo(tmp_path, train_per_class=2, test_per_class=2)
    for f in (tmp_path / "aclImdb" / "test" / "neg").iterdir():
        f.unlink()
    with pytest.raises(DatasetFormatError, match=r"no \.txt reviews in .*test/neg; expected layout"):
        IMDB(tmp_path, "test")
    with pytest.raises(DatasetFormatError, match=r"train/train/neg is missing or not a folder"):
        IMDB(tmp_path / "aclImdb" / "train", "train")
    bad = tmp_path / "aclImdb" / "train" / "pos" / "0_9.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    with pytest.raises(DatasetFormatError, match=r"0_9\.txt is not UTF-8"):
        IMDB(tmp_path, "train", val_ratio=0)[2]
    bad.write_text("  <br />  ")
    with pytest.raises(DatasetFormatError, match=r"0_9\.txt is empty"):
        IMDB(tmp_path, "train", val_ratio=0)[2]


def test_reader_takes_one_folder_per_class_and_names_the_classes_after_them(tmp_path):
    """Beyond aclImdb's pos/neg: <root>/{train,test}/<class>/*.txt, classes in sorted order, the label word the folder
    name with '_' as a space; bad class folders are one clear error each."""
    texts = {"computer_jokes": ["Real programmers count from zero.", "It compiles; ship it."],
             "people": ["A friend in need is a pest.", "Be yourself."], "weather": ["Rain at noon.", "Fog."]}
    for split in ("train", "test"):
        for name, rows in texts.items():
            (tmp_path / split / name).mkdir(parents=True)
            for j, row in enumerate(rows):
                (tmp_path / split / name / f"note{j}.txt").write_text(row)
    train, test = IMDB(tmp_path, "train", val_ratio=0), IMDB(tmp_path, "test")
    assert train.info() == {"num_classes": 3, "class_names": ["computer jokes", "people", "weather"]}
    assert [int(test[i]["label"]) for i in range(len(test))] == [0, 0, 1, 1, 2, 2]
    assert test[0]["target_text"] == "computer jokes" and test[0]["input_text"] == "Real programmers count from zero."
    assert test[5]["target_text"] == "weather" and test[5]["input_text"] == "Fog."
    val = IMDB(tmp_path, "val", val_ratio=0.5)
    assert sorted(int(val[i]["label"]) for i in range(len(val))) == [0, 1, 2]  # stratified: one of each class
    (tmp_path / "test" / "weather").rename(tmp_path / "test" / "climate")
    with pytest.raises(DatasetFormatError, match=r"class folders differ between .*train \['computer_jokes', 'people', "
                                                 r"'weather'\] and .*test \['climate', 'computer_jokes', 'people'\]"):
        IMDB(tmp_path, "train")
    (tmp_path / "test" / "climate").rename(tmp_path / "test" / "weather")
    (tmp_path / "train" / "Weather").mkdir()
    (tmp_path / "test" / "Weather").mkdir()
    with pytest.raises(DatasetFormatError, match="name the same class twice"):
        IMDB(tmp_path, "train")
    for split in ("train", "test"):
        (tmp_path / split / "Weather").rmdir()
    (tmp_path / "train" / "people" / "note0.txt").unlink()
    (tmp_path / "train" / "people" / "note1.txt").unlink()
    with pytest.raises(DatasetFormatError, match=r"no \.txt reviews in .*train/people"):
        IMDB(tmp_path, "train")
    lone = tmp_path / "lone"
    (lone / "train" / "only").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"holds 1 class folder\(s\) \['only'\]; a classification needs two"):
        IMDB(lone, "train")


def test_a_class_name_longer_than_the_target_budget_is_a_config_error():
    """Class words are scored whole: one over model.text_input.max_target_tokens is refused, not cut."""
    from allspark.config import ConfigError

    cfg = load_config("text", overrides=["model.llm.name=tiny", "model.llm.dtype=float32",
                                         "model.text_input.max_target_tokens=2"])
    info = {"num_classes": 2, "class_names": ["people", "self blocking bricks of computers"]}
    with pytest.raises(ConfigError, match=r"max_target_tokens=2 is shorter than the answer 'self blocking bricks of "
                                          r"computers' \(\d+ tokens; 1 of 2 class names"):
        AllSpark(cfg, info)
    AllSpark(cfg, {"num_classes": 2, "class_names": ["people", "computers"]})  # one token each: fits


def test_sequence_loss_on_label_tokens_only(model, corpus):
    ds = IMDB(corpus, "test")
    batch = ds.collate([ds[0], ds[5]])
    batch["prompt_index"] = torch.zeros(2, dtype=torch.long)
    model.eval()
    out = model.run_llm(batch)
    assert isinstance(out, TextLLMOutput)
    codec = model.text_codec
    # rows are [prompt | sep | review | sep | label word | eos], right-padded
    tok = model.tokenizer
    for row in range(2):
        ids = (model.prompt_ids[0, : model.prompt_lengths[0]].tolist() + codec.sep
               + tok(batch["input_text"][row], add_special_tokens=False)["input_ids"][:24] + codec.sep
               + tok(batch["target_text"][row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        assert int(out.attention_mask[row].sum()) == len(ids)
        assert out.target_ids[row][out.target_mask[row]].tolist() == ids[-2:]
    # the head's loss equals cross-entropy of the full HF model's logits at the target positions
    head_out = model.head(out, batch)
    seq = torch.zeros(out.attention_mask.shape, dtype=torch.long)
    for row in range(2):
        n = int(out.attention_mask[row].sum())
        seq[row, :n] = torch.cat([torch.tensor(model.prompt_ids[0, : model.prompt_lengths[0]].tolist() + codec.sep),
                                  torch.tensor(tok(batch["input_text"][row], add_special_tokens=False)["input_ids"][:24] + codec.sep),
                                  out.target_ids[row][out.target_mask[row]]])
    logits = model._llm.model(input_ids=seq, attention_mask=out.attention_mask.long()).logits
    rows = torch.arange(2)[:, None].expand_as(out.target_mask)[out.target_mask]
    ref = F.cross_entropy(logits[rows, out.target_positions[out.target_mask]], out.target_ids[out.target_mask])
    assert torch.allclose(head_out.loss, ref, atol=1e-5)
    assert out.input_truncated.tolist() == [len(tok(t, add_special_tokens=False)["input_ids"]) > 24 for t in batch["input_text"]]


def test_label_scoring_matches_full_forwards(model, corpus):
    ds = IMDB(corpus, "test")
    batch = ds.collate([ds[i] for i in range(len(ds))])
    batch.pop("target_text")  # evaluation needs no target: every label word is scored
    model.eval()
    with torch.no_grad():
        # make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        preds = model(batch).predictions
    assert preds["choice_loglik"].shape == (len(ds), 2)
    assert torch.equal(preds["pred"], preds["choice_loglik"].argmax(1))
    from allspark.language import prefix_rows

    batch["prompt_index"] = torch.zeros(len(ds), dtype=torch.long)
    prefixes, _ = prefix_rows(model, batch)
    cands = model.text_codec.encode_targets(["negative", "positive"])
    full = score_continuations(model._llm, prefixes, cands, reuse_prefix=False, chunk_size=5)
    assert torch.allclose(preds["choice_loglik"], full, atol=1e-4)
    # and by hand for one row: log p(label tokens | prefix) from the HF model's own logits
    seq = torch.tensor([prefixes[3] + cands[1]])
    logp = model._llm.model(input_ids=seq).logits[0].log_softmax(-1)
    n = len(prefixes[3])
    manual = sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(cands[1]))
    assert preds["choice_loglik"][3, 1].item() == pytest.approx(manual, abs=1e-4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()


def test_evaluator_counts_truncated_reviews_and_chance():
    from allspark.evaluation import EVALUATORS, build_evaluator  # noqa: F401
    from allspark.evaluation.language import LanguageClassificationEvaluator

    ev = LanguageClassificationEvaluator({"num_classes": 2, "class_names": ["negative", "positive"]})
    m = ev.compute({"pred": np.array([1, 0, 1, 1]), "label": np.array([1, 0, 0, 0]),
                    "truncated": np.array([True, False, False, True]), "index": np.arange(4),
                    "choice_loglik": np.zeros((4, 2))})
    assert m["top1"] == pytest.approx(50.0) or m["top1"] == pytest.approx(0.5)
    assert m["truncated_inputs"] == 2 and m["truncated_fraction"] == 0.5 and m["chance"] == 0.75


def test_errors(model):
    with pytest.raises(ValueError, match=r"batch\['input_text'\] must be a list of strings"):
        model({"input_text": torch.zeros(2, 3), "index": torch.arange(2)})
    from heads.language import LanguageModelHead
    from allspark.types import LLMOutput

    head = LanguageModelHead(64)
    with pytest.raises(ValueError, match="needs the text-input path"):
        head(LLMOutput(torch.zeros(1, 2, 64), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]), 0), {})
    with pytest.raises(ValueError, match="at least two"):
        LanguageModelHead(64, choices=["yes"])


def test_training_steps_learn_the_labels(corpus):
    torch.manual_seed(0)
    cfg = load_config("text", overrides=["model.llm.name=tiny", "model.text_input.max_input_tokens=32"])
    ds = IMDB(corpus, "train", val_ratio=0)
    m = AllSpark(cfg, ds.info())
    batch = ds.collate([ds[i] for i in (0, 1, 10, 11)])
    batch["prompt_index"] = torch.zeros(4, dtype=torch.long)
    losses = fit_one_batch(m, batch, steps=25)
    # the tiny random LLM's tied embeddings (std 0.02) bound its logits to about +-1.3, so its loss cannot
    # fall far below log(vocab) = 10.8; it must still fall, and the label words must be told apart
    assert losses[-1] < losses[0] - 0.3
    m.eval()
    assert m(batch).predictions["pred"].tolist() == batch["label"].tolist()


def test_untrained_baseline_scores_with_adapters_off(model, corpus):
    from allspark.evaluation.language import LanguageClassificationEvaluator

    ds = IMDB(corpus, "test")
    ev = LanguageClassificationEvaluator(ds.info(), compare_untrained=True, batch_size=3)
    model.eval()
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        base_top1 = float((model(batch).predictions["pred"] == batch["label"]).float().mean())  # lora_B = 0 here
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        m = ev.model_metrics(model, ds)
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # restored
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert m["top1_untrained"] == pytest.approx(base_top1)
    assert LanguageClassificationEvaluator(ds.info()).model_metrics(model, ds) == {}
