"""Checkpoints past one machine and in standard formats: sharding-safe save/load hooks, ``best/`` gathered through
accelerate (two processes write what one writes), the PEFT adapter folder, ``allspark export``, and any local
transformers causal LM as the LLM."""
import dataclasses
import json
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from allspark.config import AdapterConfig, load_config
from allspark.data import build_dataset
from allspark.llm import load_llm
from allspark.model import ADAPTER_DIR, EXPORT_PARTS_DIR, AllSpark
from tests.helpers import TINY_HSI, fit_one_batch, run, run_inprocess


def _tiny_model(*extra: str) -> tuple[AllSpark, dict]:
    """The tiny HSI model with a float32 LLM (``auto`` may pick bfloat16 on a CPU that computes it natively)."""
    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32", *extra])
    train_set = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark.from_config(cfg, train_set.info())
    batch = train_set.collate([train_set[i] for i in range(6)])
    return model, batch


def _randomise_trainable(model: AllSpark, seed: int = 1) -> None:
    """Non-zero LoRA B matrices (they start at zero), so the adapter changes what the LLM computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _cloned_trainable(model: AllSpark) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def _token_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("A hyperspectral pixel of Pavia University, class asphalt.")["input_ids"]])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. sharding-safe checkpoint hooks ------------------------------------------------------------------------------


def test_hooks_round_trip_the_trainable_state_when_accelerate_hands_no_weights(tmp_path):
    """Under FSDP/DeepSpeed accelerate hands the save hook an empty ``weights`` list: the hook writes the trainable
    state itself (model.safetensors), and the load hook reads it back exactly."""
    from accelerate import Accelerator

    from allspark.training import checkpoint_hooks

    model, _ = _tiny_model()
    _randomise_trainable(model)
    accelerator = Accelerator(cpu=True)
    save_hook, load_hook = checkpoint_hooks(accelerator)
    saved = _cloned_trainable(model)

    weights: list = []
    save_hook([model], weights, str(tmp_path))
    assert weights == []
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(on_disk) == sorted(saved)
    assert all(torch.equal(on_disk[k], saved[k]) for k in saved)
    assert not any(k.startswith("llm.") and "lora_" not in k for k in on_disk), "no frozen LLM weight is saved"

    with torch.no_grad():
        for value in model.trainable_state_dict().values():
            value.add_(1.0)
    assert not any(torch.equal(model.trainable_state_dict()[k], saved[k]) for k in saved)

    models = [model]
    load_hook(models, str(tmp_path))
    assert models == [], "the hook loaded the model, so accelerate must not load it again"
    restored = model.trainable_state_dict()
    assert sorted(restored) == sorted(saved)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)

    # Models accelerate loaded itself (FSDP/DeepSpeed hand the load hook none): nothing is touched.
    with torch.no_grad():
        next(iter(model.trainable_state_dict().values())).add_(1.0)
    before = _cloned_trainable(model)
    load_hook([], str(tmp_path))
    assert all(torch.equal(model.trainable_state_dict()[k], before[k]) for k in before)


def test_hooks_replace_the_weights_accelerate_hands_and_refuse_a_folder_without_them(tmp_path):
    from accelerate import Accelerator

    from allspark.training import checkpoint_hooks

    model, _ = _tiny_model()
    accelerator = Accelerator(cpu=True)
    save_hook, load_hook = checkpoint_hooks(accelerator)
    weights = [accelerator.get_state_dict(model)]  # what accelerate hands without sharding: the full state dict
    save_hook([model], weights, str(tmp_path))
    trainable = model.trainable_state_dict()
    assert sorted(weights[0]) == sorted(trainable)
    assert all(torch.equal(weights[0][k], trainable[k]) for k in trainable)
    assert not (tmp_path / "model.safetensors").exists(), "accelerate writes the handed weights itself"

    with pytest.raises(RuntimeError, match="2 state dicts for 1 models"):
        save_hook([model], [{}, {}], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_hook([model], str(tmp_path))


def _train_cmd(out, port=None, *extra):
    common = [*TINY_HSI, "train.epochs=1", "train.max_steps=2", "train.test_at_end=false",
              "model.prompts.train_choice=first", "data.eval_batch_size=50", *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)] \
        if port else []
    return [*launch, "train.py", "--modality", "hsi", "--output-dir", str(out), *common]


@pytest.mark.slow
def test_best_of_two_processes_equals_best_of_one(tmp_path):
    """``best/`` is gathered through accelerate on every process and written by the main one: two processes with a
    batch each per step write exactly the weights one process writes accumulating the same two batches."""
    env = {"OMP_NUM_THREADS": "1"}  # the same kernels (thread count) in every process
    # the one-process reference: train.py's entry function in this process, on one thread as well
    one = run_inprocess(_train_cmd(tmp_path / "one", None, "train.grad_accum_steps=2"), env=env, threads=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(_train_cmd(tmp_path / "two", _free_port(), "train.grad_accum_steps=1"), env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["num_processes"] == 1

    w1 = load_file(str(tmp_path / "one" / "best" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "best" / "model.safetensors"))
    assert sorted(w1) == sorted(w2)
    init, _ = _tiny_model()
    assert sorted(w1) == sorted(init.trainable_state_dict())
    assert any(not torch.equal(w1[k], v) for k, v in init.trainable_state_dict().items()), "training changed them"
    unequal = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert unequal == [], (unequal[:5], max(_max_diff(w1[k], w2[k]) for k in unequal) if unequal else 0.0)
    a1 = load_file(str(tmp_path / "one" / "best" / ADAPTER_DIR / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "best" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert sorted(a1) == sorted(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    # The training checkpoints (DDP: accelerate hands the hook the weights) hold the same trainable state too.
    c2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-2" / "model.safetensors"))
    assert sorted(c2) == sorted(w2) and all(torch.equal(c2[k], w2[k]) for k in w2)


# -- 2. standard formats ---------------------------------------------------------------------------------------------


def _base_llm(model: AllSpark):
    """A fresh copy of the same base LLM (the tiny one is built from its config with a fixed seed)."""
    llm_cfg = dataclasses.replace(model.cfg.model.llm, adapter=AdapterConfig(type="none"))
    return load_llm(llm_cfg).model


def test_best_holds_a_peft_adapter_that_peft_loads_onto_the_base_llm(tmp_path):
    from peft import PeftModel

    model, _ = _tiny_model()
    _randomise_trainable(model)
    model.save_pretrained(tmp_path / "best")
    adapter = tmp_path / "best" / ADAPTER_DIR
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    base = _base_llm(model)
    package_llm = model.llm.model
    package_base = {k.replace(".base_layer", ""): v for k, v in package_llm.state_dict().items() if "lora_" not in k}
    base_state = base.state_dict()
    assert sorted(base_state) == sorted(package_base)
    assert all(torch.equal(base_state[k], package_base[k]) for k in base_state), "the identical base LLM"
    ids = _token_ids(model.tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_llm = PeftModel.from_pretrained(base, str(adapter)).eval()
        peft_logits = peft_llm(input_ids=ids).logits
        package_logits = package_llm(input_ids=ids).logits
    assert peft_logits.dtype == package_logits.dtype == torch.float32
    diff = _max_diff(peft_logits, package_logits)
    print(f"PEFT-loaded adapter vs package LLM: max abs logit difference {diff:.3e}")
    assert diff == 0.0
    assert _max_diff(base_logits, package_logits) > 1e-3, "the adapter changes the LLM's output"


def test_export_writes_a_plain_transformers_folder_and_the_package_parts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, batch = _tiny_model()
    _randomise_trainable(model)
    model.save_pretrained(tmp_path / "run" / "best")
    out = tmp_path / "export"
    done = run_inprocess(["-m", "allspark", "export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"to {out}" in done.stdout

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in exported.named_parameters())
    ids = _token_ids(model.tokenizer)
    assert torch.equal(_token_ids(tokenizer), ids)
    with torch.no_grad():
        export_logits = exported(input_ids=ids).logits
        merged_logits = model.merged_llm()(input_ids=ids).logits
        package_logits = model.llm.model(input_ids=ids).logits
    to_merged, to_package = _max_diff(export_logits, merged_logits), _max_diff(export_logits, package_logits)
    print(f"exported LLM vs merged LLM: max abs logit difference {to_merged:.3e}; vs the unmerged LoRA LLM "
          f"{to_package:.3e}")
    assert to_merged <= 1e-5 and to_package <= 1e-5

    parts = load_file(str(out / EXPORT_PARTS_DIR / "model.safetensors"))
    own = model.trainable_state_dict()
    assert sorted(parts) == sorted(k for k in own if not k.startswith("llm."))
    assert all(torch.equal(parts[k], own[k]) for k in parts)
    rebuilt = AllSpark.from_pretrained(out / EXPORT_PARTS_DIR)
    assert rebuilt.cfg.model.llm.name == str(out) and rebuilt.cfg.model.llm.adapter.type == "none"
    model.eval()
    rebuilt.eval()
    batch = {**batch, "prompt_index": torch.zeros(6, dtype=torch.long)}
    with torch.no_grad():
        head_diff = _max_diff(rebuilt(batch).predictions["logits"], model(batch).predictions["logits"])
    print(f"AllSpark rebuilt on the exported LLM vs the trained model: max abs head-logit difference {head_diff:.3e}")
    assert head_diff <= 1e-4

    again = run_inprocess(["-m", "allspark", "export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists already" in again.stderr


def test_export_refuses_the_bottleneck_adapter(tmp_path):
    model, _ = _tiny_model("model.llm.adapter.type=bottleneck", "model.llm.adapter.bottleneck_dim=8")
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / ADAPTER_DIR).exists(), "only a PEFT LoRA adapter has a PEFT folder"
    done = run_inprocess(["-m", "allspark", "export", "--checkpoint", str(tmp_path / "ckpt"),
                          "--out", str(tmp_path / "x")])
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bottleneck adapter cannot be merged" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()


# -- 3. any local causal LM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_local_causal_lm_folder_trains_one_step(tmp_path, family):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from allspark.llm import _smollm2_tokenizer

    tokenizer = _smollm2_tokenizer()
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    config = Qwen2Config(**sizes) if family == "qwen2" else LlamaConfig(**sizes)
    torch.manual_seed(3)
    llm = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / f"tiny-{family}"
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    model, batch = _tiny_model(f"model.llm.name={folder}")
    hf = model.llm.model
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    assert model.hidden_size == 32
    on_disk = load_file(str(folder / "model.safetensors"))
    assert torch.equal(hf.get_parameter("model.layers.1.mlp.up_proj.weight"), on_disk["model.layers.1.mlp.up_proj.weight"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _cloned_trainable(model)
    losses = fit_one_batch(model, batch, steps=1)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    after = model.trainable_state_dict()
    lora_b = [k for k in after if "lora_B" in k]
    assert len(lora_b) == 2 * 4  # two layers, q/k/v/o
    assert all(not torch.equal(after[k], before[k]) for k in lora_b), "one step moved every LoRA B matrix"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
