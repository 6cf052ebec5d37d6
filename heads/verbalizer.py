"""Answers in words: the class is the name the language model finds most likely after the sample.

The verbalizer head has no parameters of its own. For each sample it scores every candidate name (the dataset's
``class_names``, a ``choices`` list, or a ``labels`` file) as the log-likelihood, under the LLM's own LM head, of
the name's tokens after the sequence the model already ran ([prompt | bridge tokens] with the default
``model.sequence: prompt_first``) and an optional answer prefix (``answer_prefix``, e.g. ``" Answer:"``)::

    score(b, k) = norm_k * sum_t log p(name_k[t] | prompt, s_i, answer_prefix, name_k[:t])

(``norm_k`` = 1 / the name's token count with ``length_norm: mean``, 1 with ``sum``).

The shared part, ``[prompt | s_i]``, runs once per sample; its key/value cache (``LLMOutput.prefix``, which the
model keeps because this head sets ``needs_prefix_cache``) is reused for every candidate, so a candidate costs
only its own tokens (:func:`allspark.language.continuation_loglik`). Training minimises the cross-entropy of the
scores against ``batch["label"]`` (the label indexes the names); the gradient reaches the bridge, the encoders
and the adapters through the scored tokens and the cache.

Length normalisation (``length_norm``): ``mean`` (default) divides each name's summed log-likelihood by its
number of tokens, so that a name of several tokens ("dense residential") is not out-scored by a one-token name
only for being longer, which matters most for names never trained on (zero-shot label sets); ``sum`` keeps the
joint log-likelihood of the whole name (the probability of generating exactly those tokens; the
``language_model`` head's choice scoring), which favours short names: on the HSI demo's nine names (two to six
tokens) the untrained tiny test LLM starts at a cross-entropy of 17.9 with ``sum`` and 2.2 (about log 9) with
``mean``. ``append_eos`` scores the tokenizer's end-of-sequence token after each
name too, so a name that is the beginning of another ("forest" and "forest road") is scored as a whole answer.

``answer_weight`` (default 0) adds the answer loss: the true name's mean token negative log-likelihood under the
whole vocabulary (teacher-forced), which the cross-entropy over the names leaves free, since it only compares the
names with each other. With it (and ``append_eos``, so the answer ends) the model's generation, not only its
ranking, says the class: ``AllSpark.ask`` with the task's prompt answers with the name.

Answer training (``answer_template``, the ``answers`` recipe of the classification configs): each candidate is a
whole answer sentence, the template with ``{name}`` filled by the class name (``"This remote sensing image shows
{name}."``; ``answer_template: prompts`` takes the task's prompt set's ``answer`` field, see ``prompts/``). The
sentences are scored, trained on and (with ``answer_weight`` and ``append_eos``) generated as a whole, so
``AllSpark.ask`` answers with the sentence. :meth:`VerbalizerHead.match_answers` maps generated texts back to the
candidates (exact match after :func:`normalise_answer`, or by prefix), which the classification evaluator's
``generate_answers`` option reports as ``answer_accuracy``.

``answer_prefix`` is empty by default: the first token of every name is then predicted at the last bridge token,
whose own residual stream carries the sample (the reason for ``prompt_first``, README "Sequence order"); after an
answer prefix the sample reaches the name only through the frozen LLM's attention. On the tiny random test LLM
(``initializer_range`` 0.1; HSI demo, one batch of nine samples, 20 AdamW steps at lr 1e-2, same seed) the loss fell
from 2.2 to 0.6 with no prefix and to 1.3 with ``" Answer:"``; not measured with the default LLM.

Names are tokenised as ``name_prefix + name`` (default a leading space: a word after the preceding text), with
underscores written as spaces (``underscores_as_spaces``, for folder names such as ``dense_residential``).

Zero-shot label sets: :meth:`VerbalizerHead.set_choices` replaces the names without touching any weight (the
head has none), for synonyms, a coarser or finer label set, or a class never seen in training; ``pred`` then
indexes the new list. The dataset's labels keep indexing its own classes: with a label set of another size or
order, the loss and the label metrics only mean something where index ``i`` still names class ``i`` (a label
beyond the new set gives no loss in evaluation and an error in training).

Synonyms: a class can have several names (``choices: [[farmland, fields], [forest, woods], ...]``, or a label
file line ``farmland | fields``). Every name is scored; a class's score pools its names' normalised scores
(``synonym_pool``): ``mean`` (default; the mean of the names' scores, so training raises every synonym, not only
the one already winning) or ``logsumexp`` (log of the mean likelihood, ``logsumexp_j s_j - log n``: a class is as
likely as its likeliest names). With one name per class both are the identity. ``pred`` and ``choices`` give each
class by its first name, which is also the answer the answer loss (``answer_weight``) trains generation to say;
a generated answer matches a class through any of its names.

Switching a task to it (any classification task whose data names its classes)::

    python train.py --modality rgb model.head.type=verbalizer
    python train.py --modality hsi model.head.type=verbalizer "model.head.args.answer_prefix=' Answer:'"
    python train.py --modality rgb model.head.type=verbalizer 'model.head.args.choices=[farmland, forest, harbor, river, runway]'
    python train.py --modality rgb model.head.type=verbalizer model.head.args.labels=my_labels.txt

A config whose head arguments are the linear head's (the fusion tasks set ``pooling: last+bridge``) replaces
them: ``'model.head={type: verbalizer, args: {}}'``. At prediction time, with the trained model::

    model.head.set_choices(["cropland", "woodland", "port", "stream", "airstrip"])
    model.predict(batch)["pred"]   # indexes into the new names

Predictions: ``pred`` [B], ``logits`` [B, K] (the normalised scores the loss is taken over; a softmax gives the
class probabilities) and ``choice_loglik`` [B, K] (the summed log-likelihood of each name, unnormalised; pooled
over a class's synonyms as ``logits`` are), with synonyms also ``name_loglik`` [B, N] (every name, in the order
of ``choice_ids``).
"""
from __future__ import annotations

import contextlib
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allspark.config import ConfigError
from allspark.errors import UserError, UserFileNotFoundError
from allspark.lm import LanguageModel, prefix_rows
from allspark.registry import HEADS
from allspark.types import LLMOutput, Output

LENGTH_NORMS = ("mean", "sum")
MATCH_MODES = ("exact", "prefix")
SYNONYM_POOLS = ("mean", "logsumexp")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """Lower case, underscores and punctuation as spaces, runs of white space as one: ``" This image shows
    Dense_Residential."`` -> ``"this image shows dense residential"``."""
    return " ".join(_PUNCTUATION.sub(" ", text.replace("_", " ").lower()).split())


def read_label_file(path: str | Path) -> list[str | list[str]]:
    """Class names from a text file, one class per line (UTF-8; surrounding whitespace stripped, blank lines
    skipped). A line with ``|`` names the class by several synonyms (``farmland | fields | cropland``), returned
    as a list."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"verbalizer head: label file {path} does not exist (expected a text file with "
                                    "one class name per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"verbalizer head: cannot read label file {path} as UTF-8 text (one class name per line): "
                        f"{exc}") from None
    out: list[str | list[str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "|" not in line:
            out.append(line.strip())
            continue
        names = [n.strip() for n in line.split("|")]
        if not all(names):
            raise UserError(f"verbalizer head: label file {path}, line {number}: an empty synonym in {line.strip()!r} "
                            "(synonyms of one class are separated by '|', e.g. 'forest | woods')")
        out.append(names)
    return out


def replace_label_set(model: nn.Module, path: str | Path, *, num_classes: int | None = None) -> list[str]:
    """Zero-shot label set for ``evaluate.py --labels`` / ``allspark predict --labels``: the names in ``path``
    (one per line, as :func:`read_label_file` reads them) replace the trained model's candidate names; no weight
    changes. ``num_classes``: the count the names must have (evaluation scores against the dataset's labels, so
    name ``i`` stands for class ``i``); ``None`` (prediction) takes any list of two or more names, e.g. one with a
    class never trained on. Returns the names."""
    head = getattr(model, "head", None)
    if not callable(getattr(head, "set_choices", None)):
        kind = type(head).__name__ if head is not None else "none"
        raise UserError(f"--labels {path}: a label file replaces the class names of a verbalizer head, but this "
                        f"checkpoint's head is {kind}, which has no names to replace (train with "
                        "model.head.type=verbalizer)")
    names = read_label_file(path)
    if num_classes is not None and len(names) != int(num_classes):
        raise UserError(f"--labels {path}: evaluation scores the names against the dataset's {int(num_classes)} "
                        f"classes (line i names class i), so the file needs {int(num_classes)} names; it has "
                        f"{len(names)}. For another number of classes use `allspark predict --labels`")
    head.set_choices(names, where=f"label file {path}")
    return head.choices


@torch.no_grad()
def calibrate_label_set(model: nn.Module, dataset, *, batch_size: int = 64, max_samples: int = 512,
                        device: torch.device | str | None = None, autocast=None) -> dict[str, Any]:
    """Calibrate a verbalizer head's current names against a prior measured on unlabelled inputs: each class's
    mean score (``logits``) over up to ``max_samples`` of ``dataset``'s samples (evenly spaced indices; labels not
    read) is kept on ``head.prior`` and subtracted from every later score, so that ``pred`` is the class whose
    name the sample makes likelier than inputs do on average (contextual calibration). It matters for names never
    trained on: a name's own frequency under the LLM can outweigh what the sample says (on the rgb demo every
    test image got the same synonym, top1 0.21, and 0.45 after calibrating on the training images, README
    "Answers in words"). Call it again after :meth:`VerbalizerHead.set_choices` (which clears the prior).
    ``autocast``: a context manager factory for the forward (e.g. ``accelerator.autocast``). Returns
    ``{"samples": n, "prior": [K floats]}``."""
    head = getattr(model, "head", None)
    if not isinstance(head, VerbalizerHead):
        kind = type(head).__name__ if head is not None else "none"
        raise UserError(f"calibration subtracts a prior from a verbalizer head's name scores, but this model's head "
                        f"is {kind} (train with model.head.type=verbalizer)")
    n = len(dataset)
    if n == 0:
        raise UserError("calibration needs at least one input to measure the names' prior on; the dataset is empty")
    take = min(n, int(max_samples))
    index = sorted({int(i) for i in np.linspace(0, n - 1, take)})
    if device is None:
        device = next(model.parameters()).device
    head.prior = None
    was_training = model.training
    model.eval()
    total, count = None, 0
    try:
        for s in range(0, len(index), batch_size):
            batch = dataset.collate([dataset[i] for i in index[s: s + batch_size]])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch.pop(head.label_key, None)
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                logits = model(batch).predictions["logits"].float()
            logits = logits.reshape(-1, logits.shape[-1])  # per-pixel tasks: [B, H, W, K] or [B, K]
            total = logits.sum(0) if total is None else total + logits.sum(0)
            count += logits.shape[0]
    finally:
        model.train(was_training)
    head.prior = (total / count).cpu()
    return {"samples": count, "prior": [round(float(v), 6) for v in head.prior]}


@HEADS.register("verbalizer")
class VerbalizerHead(nn.Module):
    """Class names scored by the LLM's LM head after the sample; cross-entropy over the names. No parameters.

    ``choices``: the names, class ``i`` first-named ``choices[i]`` (default: the dataset's ``class_names``);
    ``labels``: a text file of names, one per line, instead. ``answer_prefix``: text between the sequence and the
    name (not scored; default none). ``length_norm``: ``mean`` or ``sum`` (see the module docstring).
    ``reuse_prefix``: continue the prefix's key/value cache (off: one full forward per sample and name, the same
    scores at many times the cost; for checks). ``chunk_rows``: (sample, name) pairs per decoder call.
    """

    #: tells AllSpark.run_llm to keep the sequence's key/value cache on LLMOutput.prefix
    needs_prefix_cache = True

    def __init__(
        self,
        hidden_size: int,
        *,
        info: dict[str, Any] | None = None,
        llm: Any = None,
        choices: Sequence[str | Sequence[str]] | None = None,
        labels: str | None = None,
        answer_prefix: str = "",
        name_prefix: str = " ",
        underscores_as_spaces: bool = True,
        length_norm: str = "mean",
        append_eos: bool = False,
        label_key: str = "label",
        label_smoothing: float = 0.0,
        ignore_index: int = -1,
        reuse_prefix: bool = True,
        chunk_rows: int = 256,
        answer_weight: float = 0.0,
        answer_template: str | None = None,
        synonym_pool: str = "mean",
    ) -> None:
        super().__init__()
        if synonym_pool not in SYNONYM_POOLS:
            raise ConfigError(f"verbalizer head: synonym_pool must be one of {list(SYNONYM_POOLS)}, got {synonym_pool!r}")
        #: how a class with several names is scored from its names' (normalised) scores
        self.synonym_pool = synonym_pool
        if answer_template is not None:
            fields = {f for _, f, _, _ in string.Formatter().parse(answer_template) if f} \
                if isinstance(answer_template, str) else None
            if fields != {"name"}:
                raise ConfigError(f"verbalizer head: answer_template must be a string with exactly one {{name}} "
                                  f"field (e.g. 'This image shows {{name}}.'), got {answer_template!r}")
        #: the answer sentence each candidate is (``{name}`` filled); None: the bare name
        self.answer_template = answer_template
        if isinstance(answer_weight, bool) or not isinstance(answer_weight, (int, float)) or answer_weight < 0:
            raise ValueError(f"verbalizer head: answer_weight must be a number >= 0, got {answer_weight!r}")
        #: weight of the answer (generation) loss: the true name's mean token negative log-likelihood under the
        #: whole vocabulary, which the choice cross-entropy leaves free (it only compares the names)
        self.answer_weight = float(answer_weight)
        if llm is None:
            raise TypeError("verbalizer head: needs the model's language model (llm=LanguageModel or LoadedLLM; "
                            "AllSpark passes it)")
        llm = LanguageModel.of(llm)
        if length_norm not in LENGTH_NORMS:
            raise ConfigError(f"verbalizer head: length_norm must be one of {list(LENGTH_NORMS)}, got {length_norm!r}")
        if not isinstance(answer_prefix, str) or not isinstance(name_prefix, str):
            raise ConfigError(f"verbalizer head: answer_prefix and name_prefix must be strings, got "
                              f"{answer_prefix!r} and {name_prefix!r}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ConfigError(f"verbalizer head: chunk_rows must be a whole number >= 1, got {chunk_rows!r}")
        if append_eos and llm.tokenizer.eos_token_id is None:
            raise ConfigError("verbalizer head: append_eos is on but the tokenizer has no end-of-sequence token")
        #: a plain attribute: the language model's parameters are registered (once) by the model, not the head
        self.language_model = llm
        self.answer_prefix = answer_prefix
        self.name_prefix = name_prefix
        self.underscores_as_spaces = bool(underscores_as_spaces)
        self.length_norm = length_norm
        self.append_eos = bool(append_eos)
        self.label_key = label_key
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reuse_prefix = bool(reuse_prefix)
        self.chunk_rows = chunk_rows
        self.lead_ids = list(llm.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]) if answer_prefix else []
        if choices is not None and labels is not None:
            raise ConfigError("verbalizer head: give either choices (a list of names) or labels (a file of names), "
                              f"not both; got choices={list(choices)!r} and labels={labels!r}")
        where = "model.head.args.choices"
        if labels is not None:
            choices, where = read_label_file(labels), f"label file {labels}"
        elif choices is None:
            names = (info or {}).get("class_names")
            if not names:
                raise ConfigError(
                    "verbalizer head: this task's data names no classes (its info has no 'class_names'); name the "
                    "answers with model.head.args.choices=[name, ...] or model.head.args.labels=FILE (one per line)")
            choices, where = list(names), "the dataset's class_names"
        num_classes = (info or {}).get("num_classes")
        if num_classes is not None and not isinstance(choices, str) and len(choices) != int(num_classes):
            raise ConfigError(
                f"verbalizer head: {where} names {len(choices)} classes, the dataset has {int(num_classes)}; for "
                "another label set at test time, call model.head.set_choices(names) on the trained model")
        self.set_choices(choices, where=where)

    # -- the label set ---------------------------------------------------------------------------
    @property
    def choices(self) -> list[str]:
        """Each class's first name, as given (``pred`` indexes this list)."""
        return [names[0] for names in self._synonyms]

    @property
    def synonyms(self) -> list[list[str]]:
        """Every name of every class (class ``k``'s names: ``synonyms[k]``; one each unless synonyms were given)."""
        return [list(names) for names in self._synonyms]

    def set_choices(self, names: Sequence[str | Sequence[str]], *, where: str = "set_choices") -> None:
        """Replace the candidate names (zero-shot: no weight changes; the head has none). ``pred`` then indexes
        ``names``. At least two classes; a class is one name or a list of synonyms (scored together, see
        ``synonym_pool``); every name non-empty and distinct from every other."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ConfigError(f"verbalizer head: {where}: expected a list of class names, got {names!r}")
        classes = [[n] if isinstance(n, str) else list(n) if isinstance(n, Sequence) and n else n for n in names]
        bad = [c for c in classes if not isinstance(c, list) or not c or not all(isinstance(n, str) for n in c)]
        if bad:
            raise ConfigError(f"verbalizer head: {where}: every class must be a name (a string) or a non-empty list "
                              f"of synonyms (strings), got {bad[:4]!r}")
        if len(classes) < 2:
            raise ConfigError(f"verbalizer head: {where}: needs at least two class names to choose from, got "
                              f"{len(classes)}: {list(names)!r}")
        empty = [i for i, c in enumerate(classes) if any(not n.strip() for n in c)]
        if empty:
            raise ConfigError(f"verbalizer head: {where}: class name(s) at position(s) {empty} are empty; got "
                              f"{list(names)!r}")
        flat = [(k, n) for k, c in enumerate(classes) for n in c]
        texts = [self._text(n) for _, n in flat]
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text in seen:
                (k0, n0), (k1, n1) = flat[seen[text]], flat[i]
                raise ConfigError(f"verbalizer head: {where}: class names {n0!r} (position {k0}) and {n1!r} (position "
                                  f"{k1}) are the same answer {text.strip()!r}")
            seen[text] = i
        tok = self.language_model.tokenizer
        eos = [tok.eos_token_id] if self.append_eos else []
        ids = [list(x) + eos for x in tok(texts, add_special_tokens=False)["input_ids"]]
        if len({tuple(x) for x in ids}) != len(ids):  # e.g. names that differ only where the tokenizer ignores it
            raise ConfigError(f"verbalizer head: {where}: some class names tokenise identically: {list(names)!r}")
        self._synonyms = classes
        #: token ids of every name, class by class (class k's names first to last)
        self.choice_ids = ids
        #: the class of each entry of ``choice_ids``
        self.name_class = [k for k, _ in flat]
        #: per-class score subtracted from ``logits`` (:func:`calibrate_label_set`); None: uncalibrated. A plain
        #: attribute, not a buffer: it belongs to this label set, not to the weights, and new names clear it
        self.prior: torch.Tensor | None = None

    def _class_scores(self, per_name: torch.Tensor) -> torch.Tensor:
        """[B, N] scores of the names -> [B, K] scores of the classes (``synonym_pool``); the identity when every
        class has one name."""
        if len(self.name_class) == len(self._synonyms):
            return per_name
        index = torch.tensor(self.name_class, device=per_name.device)
        counts = torch.bincount(index, minlength=len(self._synonyms)).to(per_name.dtype)
        if self.synonym_pool == "mean":
            total = per_name.new_zeros(per_name.shape[0], len(self._synonyms))
            return total.index_add(1, index, per_name) / counts
        member = index.unsqueeze(0) == torch.arange(len(self._synonyms), device=per_name.device).unsqueeze(1)  # [K, N]
        masked = per_name.unsqueeze(1).masked_fill(~member, float("-inf"))  # [B, K, N]
        return torch.logsumexp(masked, dim=-1) - counts.log()

    def _text(self, name: str) -> str:
        name = name.strip()
        if self.underscores_as_spaces:
            name = " ".join(name.replace("_", " ").split())
        if self.answer_template is not None:
            name = self.answer_template.format(name=name)
        return self.name_prefix + name

    # -- generated answers ------------------------------------------------------------------------
    @property
    def max_answer_tokens(self) -> int:
        """Tokens of the longest candidate (with its end-of-sequence token when ``append_eos``)."""
        return max(len(c) for c in self.choice_ids)

    def answer_texts(self) -> list[str]:
        """Each class's answer as the text a generated answer is compared with (its first name, template filled,
        no leading space)."""
        return [self._text(n).strip() for n in self.choices]

    def match_answers(self, texts: Sequence[str], mode: str = "exact") -> list[int]:
        """The class each generated text names, -1 for none. ``exact``: the text equals one of the class's names
        (any synonym; template filled) after :func:`normalise_answer`; ``prefix``: the text begins with one (the
        longest wins), for answers that go on after the sentence."""
        if mode not in MATCH_MODES:
            raise ValueError(f"verbalizer head: match mode must be one of {list(MATCH_MODES)}, got {mode!r}")
        wanted = [(normalise_answer(self._text(n)), k) for k, names in enumerate(self._synonyms) for n in names]
        exact = {w: k for w, k in wanted}
        out = []
        for text in texts:
            got = normalise_answer(text)
            if mode == "exact":
                out.append(exact.get(got, -1))
            else:
                hits = [(len(w), k) for w, k in wanted if got == w or got.startswith(w + " ")]
                out.append(max(hits)[1] if hits else -1)
        return out

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, llm_out: LLMOutput, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Summed log-likelihood of every name after every sample -> [B, K] float32 (with gradients). ``rows``:
        score only these samples (the others' entries are 0): the labelled rows of a training batch."""
        if llm_out.prefix is None:
            raise ValueError(
                "verbalizer head: the LLM output carries no prefix to continue (LLMOutput.prefix); it is set by "
                "AllSpark.run_llm for a head with needs_prefix_cache, on the modality (bridge) path only, not the "
                "text-input path")
        prefix, last = llm_out.prefix, llm_out.pool("last")
        if rows is not None:
            prefix, last = prefix_rows(prefix, rows), last[rows]
        scores = self.language_model.continuation_loglik(prefix, last, self.choice_ids, lead=self.lead_ids,
                                                         reuse_prefix=self.reuse_prefix, chunk_rows=self.chunk_rows)
        if rows is None:
            return scores
        return scores.new_zeros(llm_out.prefix.embeds.shape[0], scores.shape[1]).index_copy(0, rows, scores)

    def _scored_rows(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """In training, the rows the loss reads: those with a label (a batch of the fusion demo holds 4 labelled
        pixels in 32; the unlabelled ones train only the correlation objective, on the encoders). Their names' scores
        are the whole cost of the head (every name's tokens through every layer), so the other rows are not scored:
        the same loss and gradients. None: every row (evaluation, or all labelled). A batch with no labelled row
        scores its first row only, to keep a zero loss in the graph."""
        if not self.training or labels is None:
            return None
        labelled = labels != self.ignore_index
        if bool(labelled.all()):
            return None
        rows = labelled.nonzero()[:, 0]
        return rows if len(rows) else torch.zeros(1, dtype=torch.long, device=labels.device)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        name_loglik = self.score(llm_out, self._scored_rows(batch.get(self.label_key)))
        lengths = torch.tensor([len(c) for c in self.choice_ids], dtype=name_loglik.dtype, device=name_loglik.device)
        per_name = name_loglik / lengths if self.length_norm == "mean" else name_loglik
        logits = self._class_scores(per_name)
        loglik = self._class_scores(name_loglik)
        if self.prior is not None:
            logits = logits - self.prior.to(device=logits.device, dtype=logits.dtype)
        loss = None
        labels = batch.get(self.label_key)
        if labels is not None:
            labelled = labels != self.ignore_index
            out_of_range = labelled & ((labels < 0) | (labels >= logits.shape[1]))
            if out_of_range.any():
                if self.training:
                    raise ValueError(
                        f"verbalizer head: batch[{self.label_key!r}] holds class {int(labels[out_of_range][0])} but "
                        f"the head has {logits.shape[1]} names {self.choices!r}; training labels must index them")
                # evaluation with another label set (zero-shot): the dataset's labels do not index it, no loss
            elif labelled.any():
                loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index,
                                       label_smoothing=self.label_smoothing)
                if self.answer_weight:  # the true class's first name: the answer generation learns
                    first = torch.tensor([self.name_class.index(k) for k in range(len(self._synonyms))],
                                         device=labels.device)
                    rows = labelled.nonzero()[:, 0]
                    true = first[labels[rows]]
                    loss = loss + self.answer_weight * (-name_loglik[rows, true] / lengths[true]).mean()
            else:
                loss = logits.sum() * 0.0  # no labelled row: a zero loss kept in the graph (see ClassificationHead)
        out = {"logits": logits, "choice_loglik": loglik, "pred": logits.argmax(dim=-1)}
        if len(self.name_class) != len(self._synonyms):
            out["name_loglik"] = name_loglik
        return Output(loss, out)
