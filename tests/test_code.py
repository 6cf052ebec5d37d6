"""Code (CodeSearchNet): MRR and BLEU-4 on hand-computed cases, the prefix-reusing candidate scorer against
plain full forwards, greedy generation against a cache-free loop, the jsonl.gz reader and its errors, the
standard-library demo extraction, the evaluation protocol with the untrained baseline, and learning."""
import ast
import gzip
import json
import math

import numpy as np
import pytest
import torch

from allspark.config import load_config
from tests.helpers import fit_one_batch
from allspark.data.base import DatasetFormatError
from allspark.data.codesearchnet import CodeSearchNet, docstring_summary, stdlib_functions, strip_python_docstring
from allspark.language import adapters_off, greedy_generate, score_continuations
from allspark.metrics.language import bleu4, mrr, ranks_of_true
from allspark.model import AllSpark

FUNCS = [
    ('def add(a, b):\n    """Add two numbers.\n\n    Longer text."""\n    return a + b\n', "Add two numbers.\n\n    Longer text."),
    ('def neg(x):\n    """Negate a value."""\n    return -x\n', "Negate a value."),
    ('def first(xs):\n    """Return the first item\n    of a list."""\n    return xs[0]\n', "Return the first item\n    of a list."),
    ('def size(xs):\n    """Count the items."""\n    n = 0\n    for _ in xs:\n        n += 1\n    return n\n', "Count the items."),
    ('def twice(f, x):\n    """Apply a function twice."""\n    return f(f(x))\n', "Apply a function twice."),
    ('def last(xs):\n    """Return the last item."""\n    return xs[-1]\n', "Return the last item."),
]


def write_split(root, split, records, lines=None, n=0):
    d = root / "python" / "final" / "jsonl" / split
    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(d / f"python_{split}_{n}.jsonl.gz", "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        for line in lines or []:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def csn(tmp_path_factory):
    root = tmp_path_factory.mktemp("csn")
    recs = [{"code": c, "docstring": d, "language": "python", "func_name": c.split("(")[0][4:]} for c, d in FUNCS]
    write_split(root, "train", recs[:4])
    write_split(root, "train", recs[4:], n=1)
    write_split(root, "valid", recs[:2])
    write_split(root, "test", recs)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float32: the checks below compare two computations at 1e-4 (auto picks bf16 on AMX CPUs)
    cfg = load_config("code", overrides=["model.llm.name=tiny", "model.llm.dtype=float32",
                                         "model.text_input.max_input_tokens=40", "model.text_input.max_target_tokens=8"])
    m = AllSpark(cfg, {"language": "python"})
    with torch.no_grad():  # adapters that change the output, so the checks below see them
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m.eval()


def test_mrr_by_hand_ties_count_against():
    scores = np.array([[3.0, 1.0, 2.0],   # true 3 is the best: rank 1
                       [1.0, 1.0, 0.0],   # true 1 ties with another: rank 2
                       [0.0, 5.0, 4.0]])  # true 4, one better: rank 2
    ranks = ranks_of_true(scores)
    assert ranks.tolist() == [1, 2, 2]
    assert mrr(ranks) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert ranks_of_true(np.zeros((4, 4))).tolist() == [4, 4, 4, 4]  # all tied: last place
    with pytest.raises(ValueError, match="square"):
        ranks_of_true(np.zeros((2, 3)))


def test_bleu4_by_hand():
    # one word wrong at the end: precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty
    assert bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    # a correct but short hypothesis: all precisions 1, brevity penalty exp(1 - 6/4)
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4), abs=1e-6)
    assert bleu4(["x y z w"], ["a b c d"]) == 0.0
    # corpus level: n-gram counts add over sentences before the precisions are taken
    p = [(4 + 4) / (5 + 4), (3 + 3) / (4 + 3), (2 + 2) / (3 + 2), (1 + 1) / (2 + 1)]
    assert bleu4(["a b c d e", "p q r s"], ["a b c d f", "p q r s"]) == pytest.approx(np.prod(p) ** 0.25, abs=1e-6)


def test_prefix_reuse_scores_equal_full_forwards(model):
    llm = model._llm
    tok = model.tokenizer
    prefixes = [tok(t, add_special_tokens=False)["input_ids"] for t in
                ["def f(x):\n    return x + 1\n", "class A: pass", "import os\nprint(os.getcwd())\n# done"]]
    cands = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in
             ["Add one.", "Return the value incremented by one, as an integer.", "x", "Print the working directory."]]
    reuse = score_continuations(llm, prefixes, cands, chunk_size=5)
    full = score_continuations(llm, prefixes, cands, reuse_prefix=False, chunk_size=3)
    assert reuse.shape == (3, 4)
    assert torch.allclose(reuse, full, atol=1e-4)
    # by hand from the HF model's logits: sum of log p(candidate token | everything before)
    with torch.no_grad():
        for b in range(3):
            for k in (0, 1):
                seq = torch.tensor([prefixes[b] + cands[k]])
                logp = llm.model(input_ids=seq).logits[0].log_softmax(-1)
                n = len(prefixes[b])
                manual = sum(logp[n - 1 + t, c].item() for t, c in enumerate(cands[k]))
                assert reuse[b, k].item() == pytest.approx(manual, abs=1e-4)
    # per-prefix candidate lists
    per = score_continuations(llm, prefixes, [cands[::-1]] * 3)
    assert torch.allclose(per, reuse.flip(1), atol=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        score_continuations(llm, prefixes, [[1], []])


def test_greedy_generation_matches_a_cache_free_loop(model):
    llm = model._llm
    tok = model.tokenizer
    prefixes = [tok("def f(x):", add_special_tokens=False)["input_ids"],
                tok("import sys\nsys.exit(0)\n", add_special_tokens=False)["input_ids"]]
    out = greedy_generate(llm, prefixes, 6, eos_id=None)
    with torch.no_grad():
        for p, g in zip(prefixes, out):
            seq = list(p)
            for _ in range(6):
                seq.append(int(llm.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            assert g == seq[len(p):]


def test_reader_strips_docstrings_and_summarises(csn):
    train, val, test = (CodeSearchNet(csn, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 6)
    item = test[0]
    assert item["target_text"] == "Add two numbers."
    assert item["input_text"] == "def add(a, b):\n    return a + b"
    assert test[2]["target_text"] == "Return the first item of a list."
    assert '"""' not in "".join(test[i]["input_text"] for i in range(len(test)))
    raw = CodeSearchNet(csn, "test", summary_only=False, strip_docstring=False)[0]
    assert '"""Add two numbers.' in raw["input_text"] and raw["target_text"].startswith("Add two numbers.\n")
    assert docstring_summary("  One line.\n  two.\n\n  Rest.") == "One line. two."
    assert strip_python_docstring("def f():\n    'doc'\n") is None  # nothing left but the docstring


def test_reader_errors(tmp_path):
    good = {"code": "def f():\n    return 1\n", "docstring": "One.", "language": "python"}
    write_split(tmp_path, "train", [good], lines=["{not json"])
    with pytest.raises(DatasetFormatError, match=r"python_train_0\.jsonl\.gz, line 2: not a JSON record"):
        CodeSearchNet(tmp_path, "train")
    write_split(tmp_path, "train", [good, {"docstring": "x", "language": "python"}])
    with pytest.raises(DatasetFormatError, match=r"line 2: record lacks a string 'code'"):
        CodeSearchNet(tmp_path, "train")
    write_split(tmp_path, "train", [{**good, "language": "ruby"}])
    with pytest.raises(DatasetFormatError, match=r"language 'ruby', expected 'python'"):
        CodeSearchNet(tmp_path, "train")
    (tmp_path / "python" / "final" / "jsonl" / "valid").mkdir()
    with pytest.raises(DatasetFormatError, match=r"no python_valid_<n>\.jsonl\.gz files in"):
        CodeSearchNet(tmp_path, "val")
    with pytest.raises(DatasetFormatError, match=r"test is missing or not a folder; expected layout"):
        CodeSearchNet(tmp_path, "test")
    (tmp_path / "python" / "final" / "jsonl" / "train" / "python_train_0.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetFormatError, match="cannot read .* as gzip"):
        CodeSearchNet(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        CodeSearchNet(tmp_path, "train", language="cobol")


def test_stdlib_extraction_is_real_code_without_docstrings():
    recs = stdlib_functions(modules=("statistics.py", "textwrap.py"))
    assert len(recs) >= 5
    for rec in recs:
        tree = ast.parse(rec["code"])
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn) is None
        assert rec["language"] == "python" and rec["docstring"] and rec["func_name"] == fn.name
        assert docstring_summary(rec["docstring"]) not in rec["code"]


def test_evaluator_mrr_bleu_and_untrained_baseline(model, csn):
    from allspark.evaluation.language import CodeDocumentationEvaluator

    ds = CodeSearchNet(csn, "test")
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    ev = CodeDocumentationEvaluator({}, mrr_pool=4, ranking="loglik", max_new_tokens=4, compare_untrained=True,
                                    batch_size=3)
    m = ev.model_metrics(model, ds)
    assert m["ranking"] == "loglik" and m["mrr_pools"] == 2 and m["mrr_queries"] == 6  # pools of 4 and 2
    assert 0 < m["mrr"] <= 1 and m["mrr"] == m["mrr_loglik"] and 0 <= m["bleu4"] <= 1
    assert {"mrr_untrained", "mrr_embedding", "mrr_embedding_untrained", "bleu4_untrained"} <= set(m)
    assert m["mrr"] != m["mrr_untrained"] or m["mrr_embedding"] != m["mrr_embedding_untrained"]
    after = model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # adapters restored after the baseline
    # the loglik MRR is the MRR of the pool score matrices built from the scorer
    from allspark.language import prefix_rows

    codes = [ds[i]["input_text"] for i in range(6)]
    prefixes, _ = prefix_rows(model, {"input_text": codes, "prompt_index": torch.zeros(6, dtype=torch.long)})
    targets = model.text_codec.encode_targets([ds[i]["target_text"] for i in range(6)])
    pools = ([0, 1, 2, 3], [4, 5])
    scores = [score_continuations(model._llm, [prefixes[i] for i in p], [targets[i] for i in p]) for p in pools]
    # PMI calibration (the default): minus each docstring's log-likelihood after [prompt | sep | sep]
    prompt = model.prompt_ids[0, : model.prompt_lengths[0]].tolist()
    null = prompt + model.text_codec.sep + model.text_codec.sep
    priors = [score_continuations(model._llm, [null], [targets[i] for i in p]) for p in pools]
    raw = np.concatenate([ranks_of_true(s.numpy()) for s in scores])
    pmi = np.concatenate([ranks_of_true((s - q).numpy()) for s, q in zip(scores, priors)])
    assert m["calibration"] == "pmi" and m["mrr"] == pytest.approx(mrr(pmi)) == pytest.approx(m["mrr_loglik_pmi"])
    assert m["mrr_loglik_raw"] == pytest.approx(mrr(raw))
    none = CodeDocumentationEvaluator({}, mrr_pool=4, bleu=False, calibration="none").model_metrics(model, ds)
    assert none["mrr"] == pytest.approx(mrr(raw)) and none["calibration"] == "none"
    with pytest.raises(ValueError, match="calibration must be"):
        CodeDocumentationEvaluator({}, calibration="bayes")
    emb = CodeDocumentationEvaluator({}, mrr_pool=3, ranking="embedding", bleu=False).model_metrics(model, ds)
    assert emb["ranking"] == "embedding" and emb["mrr"] == emb["mrr_embedding"] and "bleu4" not in emb
    with pytest.raises(ValueError, match="ranking must be"):
        CodeDocumentationEvaluator({}, ranking="bm25")


def test_adapters_off_gives_the_base_model(model):
    tok = model.tokenizer
    ids = torch.tensor([tok("def f(x): return x", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        adapted = model._llm.model(input_ids=ids).logits
        with adapters_off(model):
            off = model._llm.model(input_ids=ids).logits
        again = model._llm.model(input_ids=ids).logits
    assert not torch.allclose(adapted, off, atol=1e-4) and torch.equal(adapted, again)


def test_training_steps_reduce_the_docstring_loss(csn):
    torch.manual_seed(0)
    cfg = load_config("code", overrides=["model.llm.name=tiny", "model.text_input.max_input_tokens=40"])
    ds = CodeSearchNet(csn, "train")
    m = AllSpark(cfg, ds.info())
    batch = ds.collate([ds[i] for i in range(4)])
    losses = fit_one_batch(m, batch, steps=20)
    # bounded by the tiny random LLM's small logits (see tests/test_text.py); it must still fall clearly
    assert losses[-1] < losses[0] - 0.3
