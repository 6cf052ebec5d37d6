"""The verbalizer head (heads/verbalizer.py): class names scored by the LM head after [prompt | bridge tokens].

Tiny random LLM in float32, on the HSI demo (Pavia University's nine class names). The reference for every score
is built by hand here: one forward of the causal LM over the unpadded row ``[prompt | s_i | answer prefix | name]``
(or ``[s_i | prompt | ...]``), its log-softmax read at the name's tokens. Measured maxima (CPU, float32) of the
head's scores against it: 7.6e-6 on every forward path (sums of up to six log-probabilities near -11), 0.0 for
the uncached continuation; the tests allow 1e-4 (a position id off by one moves the scores by 1.3e-3).
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allspark.config import ConfigError, load_config
from allspark.data import build_dataset
from allspark.errors import UserError, UserFileNotFoundError
from allspark.model import AllSpark
from allspark.registry import HEADS
from heads.verbalizer import VerbalizerHead
from tests.helpers import TINY_HSI, fit_one_batch

VERBALIZER = ["model.llm.dtype=float32", "model.head={type: verbalizer, args: {}}"]
#: the tiny LLM with larger random weights: at the default initializer_range (0.02) its tied LM head spans about
#: +-1.3 logits, too narrow a range for a cross-entropy over nine names to fall far in a few steps
WIDER_TINY = ("model.llm.tiny={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
              "intermediate_size: 128, initializer_range: 0.1}")
TOL = 1e-4


def _model(*extra: str):
    cfg = load_config("hsi", overrides=TINY_HSI + VERBALIZER + list(extra))
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train.info())
    return model, train


def _batch(train, per_class: int = 1):
    """``per_class`` samples of every class, in class order."""
    labels = [int(train[i]["label"]) for i in range(len(train))]
    picked = [i for c in sorted(set(labels)) for i in [j for j, y in enumerate(labels) if y == c][:per_class]]
    return train.collate([train[i] for i in picked])


@pytest.fixture(scope="module")
def prompt_first():
    model, train = _model()
    return model, _batch(train)


def reference_loglik(model, s: torch.Tensor, prompt_index: list[int], names: list[str]) -> torch.Tensor:
    """[B, K]: per row, one forward of the causal LM (its own logits) over the unpadded sequence and the name."""
    llm, head = model._llm, model.head
    tok = llm.tokenizer
    lead = tok(head.answer_prefix, add_special_tokens=False)["input_ids"]
    out = torch.zeros(len(prompt_index), len(names))
    with torch.no_grad():
        for b, k in enumerate(prompt_index):
            prompt = llm.embed_tokens(model.prompt_ids[k, : model.prompt_lengths[k]])
            parts = [prompt, s[b]] if model.cfg.model.sequence == "prompt_first" else [s[b], prompt]
            prefix = torch.cat(parts)
            for j, name in enumerate(names):
                ids = tok(" " + name.replace("_", " "), add_special_tokens=False)["input_ids"]
                x = torch.cat([prefix, llm.embed_tokens(torch.tensor(lead + ids))])[None]
                logp = F.log_softmax(llm.model(inputs_embeds=x).logits[0].float(), dim=-1)
                start = len(prefix) + len(lead)
                out[b, j] = sum(logp[start - 1 + t, i] for t, i in enumerate(ids))
    return out


def _scores(model, batch, *, grad: bool, sharing: bool = True, reuse: bool = True):
    """The head's summed log-likelihoods through one of the model's forward paths (eval mode: no dropout).
    No grad: the cached evaluation prompt; grad: the shared-prompt forward (``sharing``) or the full one."""
    model.eval()
    model.cfg.model.prompt_sharing, model.head.reuse_prefix = sharing, reuse
    try:
        with torch.set_grad_enabled(grad):
            out = model.run_llm(batch)
            scores = model.head.score(out)
        return scores.detach(), out
    finally:
        model.cfg.model.prompt_sharing, model.head.reuse_prefix = True, True


@pytest.mark.parametrize("answer_prefix", ["", " Answer:"])
def test_scores_equal_one_full_forward_of_the_prefix_and_the_name(prompt_first, answer_prefix):
    """Evaluation (the cached prompt + bridge tokens, then the cache reused for every name) against the
    hand-built forward of [prompt | s_i | answer prefix | name], per name."""
    model, batch = prompt_first
    default = model.head
    model.head = VerbalizerHead(model.hidden_size, llm=model._llm, info=model.info, answer_prefix=answer_prefix)
    try:
        scores, out = _scores(model, batch, grad=False)
        assert out.prefix is not None and out.prefix.cache.get_seq_length() == out.prefix.embeds.shape[1]
        ref = reference_loglik(model, out.modality_input, [0] * len(scores), model.head.choices)
    finally:
        model.head = default
    assert scores.shape == (9, 9)
    assert (scores - ref).abs().max().item() < TOL


@pytest.mark.parametrize("sequence", ["prompt_first", "modality_first"])
def test_every_forward_path_gives_the_same_scores(prompt_first, sequence):
    """Mixed prompts (padded rows): the shared-prompt forward, the full forward and the uncached continuation
    (one full forward per sample and name) all equal the hand-built unpadded reference."""
    model, batch = prompt_first if sequence == "prompt_first" else (_model("model.sequence=modality_first")[0],
                                                                    prompt_first[1])
    prompt_index = [0, 1, 2, 0, 1, 2, 2, 1, 0]
    b = {**batch, "prompt_index": torch.tensor(prompt_index)}
    full, out = _scores(model, b, grad=True, sharing=False)
    ref = reference_loglik(model, out.modality_input.detach(), prompt_index, model.head.choices)
    paths = {"full forward": full, "uncached": _scores(model, b, grad=True, sharing=False, reuse=False)[0]}
    if sequence == "prompt_first":
        paths["shared prompts"] = _scores(model, b, grad=True)[0]
    for name, scores in paths.items():
        assert (scores - ref).abs().max().item() < TOL, name


def test_gradient_reaches_bridge_encoder_and_adapters_also_with_checkpointing(prompt_first):
    """Training: the loss's gradient reaches the encoder, the bridge and the LoRA weights; with gradient
    checkpointing (no key/value cache, the head runs full forwards) loss and scores are the same."""
    model, batch = prompt_first
    b = {**batch, "prompt_index": torch.tensor([0, 1, 2] * 3)}
    ckpt, _ = _model("model.llm.gradient_checkpointing=true")
    ckpt.load_trainable_state_dict(model.trainable_state_dict())
    outs = {}
    for name, m in (("plain", model), ("checkpointed", ckpt)):
        m.train()
        m.zero_grad()
        out = m(b)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        # (lora_A's gradient is zero while lora_B is at its zero initialisation, but it is in the graph)
        assert all(g is not None for n, g in grads.items() if "lora_A" in n)
        for part in ("encoders.", "bridge.", "lora_B"):
            hit = [g for n, g in grads.items() if part in n and g is not None and g.abs().sum() > 0]
            assert hit, f"{name}: no gradient reaches {part}"
        outs[name] = out
    assert ckpt.run_llm(b).prefix.cache is None  # the checkpointed training forward keeps no cache
    assert outs["plain"].loss.item() == pytest.approx(outs["checkpointed"].loss.item(), abs=TOL)
    diff = outs["plain"].predictions["choice_loglik"] - outs["checkpointed"].predictions["choice_loglik"]
    assert diff.abs().max().item() < TOL
    model.zero_grad()


def test_training_scores_only_the_labelled_rows_with_the_same_loss_and_gradients(monkeypatch):
    """In training, rows without a label (ignore_index: the fusion demo's unlabelled pixels) are not scored: the
    names run after the labelled rows only, and the loss (with the answer term) and every gradient equal those of
    scoring the whole batch. Evaluation scores every row; a batch with no labelled row scores one and its zero
    loss still reaches the graph."""
    model, train = _model("model.llm.adapter.dropout=0.0", "model.head.args={answer_weight: 0.5}")
    batch = _batch(train)
    batch["label"] = batch["label"].clone()
    batch["label"][[1, 4, 5, 8]] = -1
    seen = []
    real = model.head.language_model.continuation_loglik
    monkeypatch.setattr(model.head.language_model, "continuation_loglik",
                        lambda prefix, *a, **kw: (seen.append(prefix.embeds.shape[0]), real(prefix, *a, **kw))[1])

    def loss_and_grads(b):
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the same prompts drawn
        loss = model(b).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    part_loss, part_grads = loss_and_grads(batch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VerbalizerHead, "_scored_rows", lambda self, labels: None)  # every row, as before
        full_loss, full_grads = loss_and_grads(batch)
    assert seen == [5, 9]
    assert part_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert sorted(part_grads) == sorted(full_grads) and any(n.startswith("llm.") for n in full_grads)
    for name, grad in full_grads.items():
        assert torch.allclose(part_grads[name], grad, rtol=1e-4, atol=1e-7), name
    model.eval()
    with torch.no_grad():
        model(batch)
    assert seen[-1] == 9, "evaluation scores every row"
    none = {**batch, "label": torch.full_like(batch["label"], -1)}
    loss, grads = loss_and_grads(none)
    assert seen[-1] == 1 and loss.item() == 0.0
    assert any(n.startswith("llm.") for n in grads) and all(not g.any() for g in grads.values()), "in the graph, zero"


def test_training_loss_falls_and_a_new_label_set_changes_pred_not_weights(tmp_path):
    model, train = _model(WIDER_TINY)
    batch = _batch(train)
    losses = fit_one_batch(model, batch, steps=20, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    names = model.head.choices
    weights = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    before = model.predict(batch)
    assert (before["pred"] == batch["label"]).float().mean() > 0.5  # it learnt to name the classes

    # the old names reversed, and a name never seen in training at index 2
    new = list(reversed(names))
    new.insert(2, "Water")
    model.head.set_choices(new)
    new_ids = model.head.choice_ids
    after = model.predict(batch)
    assert after["choice_loglik"].shape == (9, 10)
    for i, name in enumerate(names):  # every kept name: the same score in its new column
        assert torch.allclose(after["choice_loglik"][:, new.index(name)], before["choice_loglik"][:, i], atol=TOL)
    s = model.run_llm(batch).modality_input
    water = reference_loglik(model, s, [0] * 9, ["Water"])[:, 0]
    assert torch.allclose(after["choice_loglik"][:, 2], water, atol=TOL)
    lengths = torch.tensor([len(ids) for ids in model.head.choice_ids], dtype=torch.float32)
    assert torch.equal(after["pred"], (after["choice_loglik"] / lengths).argmax(-1))
    kept = after["pred"] != 2
    assert kept.any()
    assert [new[p] for p in after["pred"][kept].tolist()] == [names[p] for p in before["pred"][kept].tolist()]
    assert (after["pred"][kept] != before["pred"][kept]).all()  # every kept name moved to another index
    assert all(torch.equal(v, weights[k]) for k, v in model.trainable_state_dict().items())

    model.head.set_choices(names)  # and back
    assert torch.equal(model.predict(batch)["pred"], before["pred"])

    # the same set from a label file, when building the head (no dataset info: the file's size is the set's)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(new) + "\n\n")
    head = VerbalizerHead(model.hidden_size, llm=model._llm, labels=str(labels))
    assert head.choices == new and head.choice_ids == new_ids
    with pytest.raises(ConfigError, match=r"label file .*labels.txt names 10 classes, the dataset has 9"):
        VerbalizerHead(model.hidden_size, llm=model._llm, labels=str(labels), info=train.info())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step ``train.py`` run of the HSI demo with the verbalizer head: (run folder, its test metrics)."""
    from allspark.training import train

    cfg = load_config("hsi", overrides=TINY_HSI + VERBALIZER + [
        "train.epochs=1", "train.max_steps=6", "train.log_every_steps=1", "eval.baselines=[]"])
    run = tmp_path_factory.mktemp("verbalizer") / "run"
    return run, train(cfg, run)


def test_train_py_run_with_the_verbalizer_saves_and_reloads(trained_run):
    """``model.head.type=verbalizer`` through the training loop: it runs, logs its loss, writes metrics, and
    the best checkpoint reloads (the head rebuilt from the config) with the same predictions."""
    run, metrics = trained_run
    assert 0.0 <= metrics["OA"] <= 1.0 and metrics["num_samples"] > 0
    losses = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 5 and all(torch.isfinite(torch.tensor(losses)))
    model = AllSpark.from_pretrained(run / "best")
    assert isinstance(model.head, VerbalizerHead) and model.head.choices == model.info["class_names"]
    data = build_dataset(model.cfg, "test")
    batch = data.collate([data[i] for i in range(4)])
    assert model.predict(batch)["pred"].shape == (4,)


def test_evaluate_and_predict_take_a_label_file_and_change_no_weight(trained_run, tmp_path):
    """``evaluate.py --labels FILE`` / ``allspark predict --labels FILE``: the file's names are scored instead of the
    trained ones. The trained names in their own order give the same metrics as no file; two names swapped
    swap exactly those two predictions (every score is a name's own); the checkpoint and its model card are
    untouched, and the metrics go to eval_<stem> with the names recorded. Bad files: one clear error each."""
    import scipy.io
    import tifffile

    from allspark.cli import evaluate_main, predict_main
    from allspark.data import resolve_data_root
    from heads.verbalizer import replace_label_set

    run, trained = trained_run
    best = run / "best"
    files = {p.name: p.read_bytes() for p in sorted(best.rglob("*")) if p.is_file()}
    names = AllSpark.from_pretrained(best).head.choices
    same = tmp_path / "same.txt"
    same.write_text("\n".join(names) + "\n")
    assert evaluate_main(["--modality", "hsi", "--checkpoint", str(run), "--labels", str(same)]) == 0
    relabelled = json.loads((run / "eval_same" / "metrics.json").read_text())
    assert relabelled["OA"] == trained["OA"] and relabelled["AA"] == trained["AA"]  # train.py's test of best/
    assert relabelled["label_set"] == {"file": str(same), "names": names}
    assert {p.name: p.read_bytes() for p in sorted(best.rglob("*")) if p.is_file()} == files

    cube = scipy.io.loadmat(resolve_data_root(AllSpark.from_pretrained(best).cfg) / "PaviaU.mat")["paviaU"]
    scene = tmp_path / "corner.tif"  # a 12 x 12 corner of the demo scene: 144 pixels to predict
    tifffile.imwrite(scene, cube[:12, :12], photometric="minisblack", planarconfig="contig")

    def predicted(tag, *labels):
        out = tmp_path / f"pred_{tag}"
        assert predict_main(["--checkpoint", str(run), "--input", str(scene), "--out", str(out), *labels]) == 0
        return json.loads((out / "classmap.json").read_text()), tifffile.imread(out / "classmap.tif")

    legend, plain_map = predicted("plain")
    a, b = np.argsort(-np.bincount(plain_map.ravel(), minlength=9), kind="stable")[:2]  # the two commonest
    order = list(names)
    order[a], order[b] = names[b], names[a]
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join(order) + "\n")
    swapped_legend, swapped_map = predicted("swapped", "--labels", str(swapped))
    assert swapped_legend["class_names"] == order
    expected = plain_map.copy()  # classes a and b trade places; every other pixel keeps its class
    expected[plain_map == a], expected[plain_map == b] = b, a
    assert (plain_map == a).any() and np.array_equal(swapped_map, expected)
    assert {r["class_name"]: r["pixels"] for r in swapped_legend["predictions"]} == \
        {r["class_name"]: r["pixels"] for r in legend["predictions"]}  # each name keeps its pixels

    model = AllSpark.from_pretrained(best)
    bad = tmp_path / "short.txt"
    bad.write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(UserError, match=r"--labels .*short.txt: .* 9 classes .* needs 9 names; it has 8"):
        replace_label_set(model, bad, num_classes=9)
    with pytest.raises(UserFileNotFoundError, match=r"label file .*missing.txt does not exist"):
        replace_label_set(model, tmp_path / "missing.txt")
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join([names[0], *names[:-1]]) + "\n")
    with pytest.raises(ConfigError, match=r"label file .*dup.txt: class names .* are the same answer"):
        replace_label_set(model, dup, num_classes=9)
    linear = AllSpark.from_config(load_config("hsi", overrides=TINY_HSI), build_dataset(model.cfg, "train").info())
    with pytest.raises(UserError, match=r"head is ClassificationHead, which has no names to replace"):
        replace_label_set(linear, same)


@pytest.mark.slow
def test_calibration_subtracts_the_names_mean_score_on_training_inputs(trained_run, tmp_path):
    """``calibrate_label_set``: the prior is the mean of the uncalibrated logits over the chosen inputs (by hand),
    later logits are the raw ones minus it, ``pred`` their argmax; new names clear it; no weight changes.
    ``evaluate.py --calibrate``: its test metrics equal those of the calibrated predictions computed here, the
    prior is recorded, the checkpoint untouched. A linear head is refused."""
    from allspark.cli import evaluate_main
    from heads.verbalizer import calibrate_label_set

    run, _ = trained_run
    model = AllSpark.from_pretrained(run / "best")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, test_set = build_dataset(model.cfg, "train"), build_dataset(model.cfg, "test")
    index = sorted({int(i) for i in np.linspace(0, len(train_set) - 1, 40)})
    raw = model.predict(train_set.collate([train_set[i] for i in index]))["logits"]
    info = calibrate_label_set(model, train_set, batch_size=16, max_samples=40)
    assert info["samples"] == len(index)
    assert torch.allclose(model.head.prior, raw.mean(0), atol=TOL)
    model.head.prior = None
    test = test_set.collate([test_set[i] for i in range(len(test_set))])
    plain = model.predict(test)["logits"]
    calibrate_label_set(model, train_set, batch_size=16, max_samples=40)
    calibrated = model.predict(test)
    assert torch.allclose(calibrated["logits"], plain - raw.mean(0), atol=TOL)
    assert torch.equal(calibrated["pred"], calibrated["logits"].argmax(-1))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.head.set_choices(list(reversed(model.head.choices)))
    assert model.head.prior is None

    files = {p.name: p.read_bytes() for p in sorted((run / "best").rglob("*")) if p.is_file()}
    assert evaluate_main(["--modality", "hsi", "--checkpoint", str(run), "--calibrate"]) == 0
    metrics = json.loads((run / "eval_calibrated" / "metrics.json").read_text())
    # evaluate.py's prior: the mean raw logit over (up to 512 of) the training inputs; its test metrics are those of
    # the raw test logits minus that prior
    assert metrics["calibration"]["split"] == "train"
    assert metrics["calibration"]["samples"] == min(512, len(train_set))
    prior = torch.tensor(metrics["calibration"]["prior"])
    # ... measured on the training split: the mean raw logit over the same evenly spaced training inputs
    model.head.set_choices(list(reversed(model.head.choices)))  # back to the trained order (no prior)
    chosen = sorted({int(i) for i in np.linspace(0, len(train_set) - 1, min(512, len(train_set)))})
    raw_cli = torch.cat([model.predict(train_set.collate([train_set[i] for i in chosen[j: j + 64]]))["logits"]
                         for j in range(0, len(chosen), 64)])
    assert torch.allclose(prior, raw_cli.mean(0), atol=1e-4)
    expected = ((plain - prior).argmax(-1) == test["label"]).float().mean().item()
    assert metrics["OA"] == pytest.approx(expected, abs=1e-6)
    assert {p.name: p.read_bytes() for p in sorted((run / "best").rglob("*")) if p.is_file()} == files
    linear = AllSpark.from_config(load_config("hsi", overrides=TINY_HSI), train_set.info())
    with pytest.raises(UserError, match="this model's head is ClassificationHead"):
        calibrate_label_set(linear, train_set)


def test_bad_label_sets_are_one_clear_error(prompt_first, tmp_path):
    model, _ = prompt_first
    llm, d = model._llm, model.hidden_size
    with pytest.raises(ConfigError, match=r"at least two class names .* got 1: \['forest'\]"):
        VerbalizerHead(d, llm=llm, choices=["forest"])
    with pytest.raises(ConfigError, match=r"'forest' \(position 0\) and 'forest' \(position 2\) are the same answer"):
        VerbalizerHead(d, llm=llm, choices=["forest", "river", "forest"])
    with pytest.raises(ConfigError, match=r"'dense_residential' .* and 'dense residential' .* same answer"):
        VerbalizerHead(d, llm=llm, choices=["dense_residential", "dense residential"])
    with pytest.raises(ConfigError, match=r"position\(s\) \[1\] are empty"):
        VerbalizerHead(d, llm=llm, choices=["forest", "  ", "river"])
    with pytest.raises(ConfigError, match="names no classes .* model.head.args.choices"):
        HEADS.build({"type": "verbalizer"}, hidden_size=d, optional={"info": {"num_classes": 3}, "llm": llm})
    with pytest.raises(ConfigError, match="the dataset's class_names names 9 classes, the dataset has 3"):
        VerbalizerHead(d, llm=llm, info={"num_classes": 3, "class_names": model.head.choices})
    with pytest.raises(ConfigError, match="either choices .* or labels"):
        VerbalizerHead(d, llm=llm, choices=["a", "b"], labels="x.txt")
    with pytest.raises(UserFileNotFoundError, match=r"label file .*missing.txt does not exist"):
        VerbalizerHead(d, llm=llm, labels=str(tmp_path / "missing.txt"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"label file .*blank.txt: needs at least two class names .* got 0"):
        VerbalizerHead(d, llm=llm, labels=str(blank))
    binary = tmp_path / "labels.bin"
    binary.write_bytes(b"\xff\xfe\x00forest")
    with pytest.raises(UserError, match=r"cannot read label file .*labels.bin as UTF-8"):
        VerbalizerHead(d, llm=llm, labels=str(binary))
    with pytest.raises(ConfigError, match=r"length_norm must be one of \['mean', 'sum'\], got 'max'"):
        VerbalizerHead(d, llm=llm, choices=["a", "b"], length_norm="max")
    with pytest.raises(ConfigError, match="expected a list of class names, got 'forest'"):
        model.head.set_choices("forest")
    assert model.head.choices[0] == "Asphalt"  # a refused set leaves the head as it was
    head = VerbalizerHead(d, llm=llm, choices=["forest", "river"])
    model.train()
    with pytest.raises(ValueError, match=r"holds class 5 but the head has 2 names"):
        head(model.run_llm({**prompt_first[1], "prompt_index": torch.zeros(9, dtype=torch.long)}),
             {"label": torch.tensor([0, 5] + [1] * 7)})
    model.eval()


@pytest.mark.slow
def test_answer_weight_adds_the_true_names_lm_loss_and_trains_generation():
    """answer_weight: loss = choice cross-entropy + w * mean token NLL of the true name (hand-computed from the
    head's own scores); trained with it on one batch, greedy ``ask`` with the task's prompt starts with the class
    name more often than without it (measured 7 of 9 against 4 of 9; 30 steps teach the name, not yet where to
    stop)."""
    model, train = _model(WIDER_TINY, "model.head.args={answer_weight: 1.0, append_eos: true}")
    batch = _batch(train)
    model.eval()
    out = model(batch)
    lengths = torch.tensor([len(c) for c in model.head.choice_ids], dtype=torch.float32)
    y = batch["label"]
    expected = F.cross_entropy(out.predictions["logits"], y) + \
        (-out.predictions["choice_loglik"][torch.arange(len(y)), y] / lengths[y]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)

    def generated(m):
        prompt = m.prompts[0]
        answers = m.ask(batch, prompt, max_new_tokens=8)
        names = [m.head.choices[int(c)].replace("_", " ") for c in y]
        return sum(a.lower().startswith(n.lower()) for a, n in zip(answers, names)) / len(names), answers

    fit_one_batch(model, batch, steps=30, lr=1e-2)
    rate, answers = generated(model)
    plain, _ = _model(WIDER_TINY, "model.head.args={append_eos: true}")
    fit_one_batch(plain, batch, steps=30, lr=1e-2)
    plain_rate, plain_answers = generated(plain)
    assert (plain.predict(batch)["pred"] == y).float().mean() >= 0.8  # both rank the names right ...
    assert rate >= 0.6 and rate > plain_rate, (answers, plain_answers)  # ... one generates them more often
    with pytest.raises(ValueError, match="answer_weight must be a number >= 0"):
        _model("model.head.args={answer_weight: -1}")


# -- answer training: the class as an answer sentence --------------------------------------------------


def test_normalise_and_match_answers_by_hand():
    from heads.verbalizer import normalise_answer

    assert normalise_answer(" This pixel is Self_Blocking  bricks.") == "this pixel is self blocking bricks"
    model, _ = _model("model.head.args={answer_template: 'This pixel is {name}.', append_eos: true}")
    head = model.head
    texts = head.answer_texts()
    assert head.choices[7] == "Self-Blocking Bricks" and texts[0] == "This pixel is Asphalt."
    # exact: the whole answer after normalisation; prefix: the answer goes on; neither: -1
    assert head.match_answers(["this pixel is SELF_BLOCKING bricks", "This pixel is bricks.",
                               texts[1] + " It is also wet."]) == [7, -1, -1]
    assert head.match_answers([texts[1] + " It is also wet.", "pixel"], "prefix") == [1, -1]
    # the candidates are the sentences: the template's tokens precede every name's
    tok = model._llm.tokenizer
    assert head.choice_ids[0][:-1] == tok(" " + texts[0], add_special_tokens=False)["input_ids"]
    assert head.choice_ids[0][-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="match mode"):
        head.match_answers(["x"], "fuzzy")


def test_answer_template_from_the_prompt_set_and_bad_templates():
    from prompts import load_answer_template

    model, _ = _model("model.head.args={answer_template: prompts}")
    assert model.head.answer_template == load_answer_template("hsi") == "This pixel is {name}."
    for bad in ["'This pixel is a class.'", "'{name} or {other}'", "3"]:
        with pytest.raises(ConfigError, match="exactly one {name} field"):
            _model(f"model.head.args={{answer_template: {bad}}}")
    with pytest.raises(ConfigError, match="graph.yaml: answer training needs an 'answer' template"):
        _model("model.prompts.set=graph", "model.head.args={answer_template: prompts}")


def test_answers_recipe_loss_and_the_evaluators_answer_accuracy_by_hand(monkeypatch):
    """--recipe answers: the candidates are the prompt set's sentences, the loss is the choice cross-entropy plus the
    true sentence's mean token NLL (hand-computed from the head's scores), and the evaluator's answer metrics count
    exactly what ``ask`` generated (``ask`` replaced by known texts: exact, going-on, wrong, malformed). (Training the
    sentence on the tiny random LLM takes 100+ steps on one batch before the names come out right; the default
    LLM's figures are in the README.)"""
    from allspark.evaluation import build_evaluator

    tiny = [o for o in TINY_HSI if not o.startswith("model.head.")]  # the recipe sets the head
    cfg = load_config("hsi", overrides=tiny + ["model.llm.dtype=float32"], recipe="answers")
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train.info())
    head = model.head
    assert head.answer_template == "This pixel is {name}." and cfg.eval.args["generate_answers"] is True
    batch = _batch(train)
    model.eval()
    out = model(batch)
    lengths = torch.tensor([len(c) for c in head.choice_ids], dtype=torch.float32)
    y = batch["label"]
    expected = F.cross_entropy(out.predictions["logits"], y) + \
        (-out.predictions["choice_loglik"][torch.arange(len(y)), y] / lengths[y]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)

    truth = head.answer_texts()
    labels = [int(v) for v in y]
    canned = [truth[labels[0]], truth[labels[1]].upper() + " And more.", truth[(labels[2] + 1) % 9], "???"]
    canned += [truth[c] for c in labels[4:]]  # 9 rows: 6 exact, 1 only by prefix, 1 wrong, 1 no class
    asked = []

    def fake_ask(b, prompts, *, max_new_tokens):
        asked.append((prompts, max_new_tokens, len(b["label"])))
        return canned[: len(b["label"])]

    monkeypatch.setattr(model, "ask", fake_ask)

    class Rows:  # the evaluator's dataset interface over the batch's samples
        def __init__(self, ds, idx):
            self.ds, self.idx = ds, idx
        def __len__(self):
            return len(self.idx)
        def __getitem__(self, i):
            return self.ds[self.idx[i]]
        def collate(self, items):
            return self.ds.collate(items)

    all_labels = [int(train[i]["label"]) for i in range(len(train))]
    picked = [[j for j, v in enumerate(all_labels) if v == c][0] for c in sorted(set(all_labels))]
    metrics = build_evaluator(cfg, train.info()).model_metrics(model, Rows(train, picked))
    assert asked == [(model.prompts[0], head.max_answer_tokens + 2, 9)]
    assert metrics["answer_samples"] == 9
    assert metrics["answer_accuracy"] == pytest.approx(6 / 9)
    assert metrics["answer_prefix_accuracy"] == pytest.approx(7 / 9)
    assert metrics["answer_unmatched"] == pytest.approx(2 / 9)  # the going-on answer and "???"
    assert metrics["answer_examples"][1] == {"label": labels[1], "true": truth[labels[1]], "generated": canned[1]}
    # a linear head cannot be asked for answer_accuracy: one clear error
    lin_cfg = load_config("hsi", overrides=TINY_HSI + ["eval.args.generate_answers=true"])
    lin = AllSpark.from_config(lin_cfg, train.info())
    with pytest.raises(ConfigError, match="needs model.head.type=verbalizer"):
        build_evaluator(lin_cfg, train.info()).model_metrics(lin, Rows(train, picked))


def test_a_verbalizer_task_in_the_joint_model_scores_through_the_shared_llm():
    """The verbalizer in the one-model-many-tasks case: a joint hsi (verbalizer) + table model routes an hsi batch
    to the names' scores, the same as the task's own part computes them over the shared LLM; its loss trains the
    shared adapters and the hsi bridge, not the table task; replacing the names changes the scores' columns only."""
    from allspark.multitask import MultiTaskAllSpark, load_joint_config, resolve_task_configs

    overrides = ["model.llm.name=tiny", "model.llm.dtype=float32", "eval.baselines=[]",
                 "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
                 "hsi:model.encoders.0.args={dim: 16, depth: 1, heads: 2, bands_per_token: 8}",
                 "hsi:model.head={type: verbalizer, args: {}}", "hsi:data.args.train_ratio=0.1",
                 "table:model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}",
                 "table:data.args.train_ratio=0.05"]
    cfgs = resolve_task_configs(load_joint_config(tasks=["hsi", "table"], overrides=overrides))
    sets = {n: build_dataset(c, "train") for n, c in cfgs.items()}
    torch.manual_seed(0)
    model = MultiTaskAllSpark(cfgs, {n: s.info() for n, s in sets.items()})
    head = model.tasks["hsi"].head
    assert isinstance(head, VerbalizerHead) and head.choices == sets["hsi"].info()["class_names"]
    batch = _batch(sets["hsi"])
    model.eval()
    with torch.no_grad():
        routed = model({**batch, "task": "hsi"}).predictions
        own = model.tasks["hsi"](batch).predictions
    assert routed["choice_loglik"].shape == (9, 9)
    assert torch.equal(routed["choice_loglik"], own["choice_loglik"])
    names = head.choices
    head.set_choices(list(reversed(names)))
    with torch.no_grad():
        flipped = model({**batch, "task": "hsi"}).predictions["choice_loglik"]
    assert torch.allclose(flipped, routed["choice_loglik"].flip(-1), atol=TOL)
    head.set_choices(names)
    model.train()
    model({**batch, "task": "hsi"}).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("llm.") and "lora" in n for n in grads)
    assert any(n.startswith("tasks.hsi.bridge.") for n in grads)
    assert not any(n.startswith("tasks.table.") for n in grads)


# -- synonyms: several names per class ------------------------------------------------------------------


def test_synonyms_pool_their_names_scores_by_hand(prompt_first, tmp_path):
    """A class with several names: every name scored as a class of its own would be, the class's score the mean
    (``synonym_pool: mean``) or the log-mean-exp (``logsumexp``) of its names' length-normalised scores, by hand;
    ``pred`` / ``choices`` give each class by its first name; the answer loss trains the first name; a label file
    line ``a | b`` is one class; generated answers match through any synonym; bad synonym sets are refused."""
    model, batch = prompt_first
    head = model.head
    names = head.choices
    model.eval()
    flat_names = ["Asphalt", "road surface", "Meadows", "grass", "pasture"] + names[2:]
    classes = [["Asphalt", "road surface"], ["Meadows", "grass", "pasture"]] + names[2:]
    try:
        head.set_choices(flat_names)  # every name a class: the reference scores, one column per name
        with torch.no_grad():
            single = model(batch).predictions
        flat = single["choice_loglik"]
        lengths = torch.tensor([len(c) for c in head.choice_ids], dtype=torch.float32)
        norm = flat / lengths
        head.set_choices(classes)
        assert head.choices == ["Asphalt", "Meadows"] + names[2:] and head.synonyms[1] == ["Meadows", "grass", "pasture"]
        assert head.name_class == [0, 0, 1, 1, 1] + list(range(2, 9))
        with torch.no_grad():
            out = model(batch)
        p = out.predictions
        assert p["logits"].shape == (9, 9) and p["name_loglik"].shape == (9, 12)
        assert torch.allclose(p["name_loglik"], flat, atol=TOL)
        expected = torch.cat([norm[:, :2].mean(1, keepdim=True), norm[:, 2:5].mean(1, keepdim=True), norm[:, 5:]], 1)
        assert torch.allclose(p["logits"], expected, atol=TOL)
        assert torch.equal(p["pred"], p["logits"].argmax(-1))
        assert out.loss.item() == pytest.approx(F.cross_entropy(expected, batch["label"]).item(), abs=TOL)
        head.synonym_pool = "logsumexp"
        with torch.no_grad():
            lse = model(batch).predictions["logits"]
        assert torch.allclose(lse[:, 1], torch.logsumexp(norm[:, 2:5], 1) - np.log(3), atol=TOL)
        assert torch.allclose(lse[:, 2:], norm[:, 5:], atol=TOL)
        head.synonym_pool, head.answer_weight = "mean", 1.0  # the answer loss: the true class's first name
        with torch.no_grad():
            loss = model(batch).loss.item()
        y = batch["label"]
        first = torch.tensor([0, 2] + list(range(5, 12)))[y]
        answer = (-flat[torch.arange(9), first] / lengths[first]).mean()
        assert loss == pytest.approx((F.cross_entropy(expected, y) + answer).item(), abs=TOL)
        assert head.match_answers(["Grass", "pasture.", "road surface", "water"]) == [1, 1, 0, -1]
        # a label file: '|' separates a class's synonyms
        labels = tmp_path / "synonyms.txt"
        labels.write_text("Asphalt | road surface\nMeadows|grass | pasture\n" + "\n".join(names[2:]) + "\n")
        from heads.verbalizer import read_label_file
        assert read_label_file(labels) == classes
        bad = tmp_path / "bad.txt"
        bad.write_text("forest | | woods\nriver\n")
        with pytest.raises(UserError, match=r"bad.txt, line 1: an empty synonym in 'forest \| \| woods'"):
            read_label_file(bad)
        with pytest.raises(ConfigError, match=r"'grass' \(position 1\) and 'grass' \(position 3\) are the same answer"):
            head.set_choices([["Asphalt"], ["Meadows", "grass"], ["x"], ["grass"]])
        with pytest.raises(ConfigError, match="a non-empty list of synonyms"):
            head.set_choices([["Asphalt"], []])
    finally:
        head.synonym_pool, head.answer_weight = "mean", 0.0
        head.set_choices(names)
    with pytest.raises(ConfigError, match=r"synonym_pool must be one of \['mean', 'logsumexp'\], got 'max'"):
        VerbalizerHead(model.hidden_size, llm=model._llm, choices=["a", "b"], synonym_pool="max")
