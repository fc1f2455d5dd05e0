"""The model under test in `peft-fast bench`: built-in Llama presets or a local model directory,
copies that share the frozen weights, the 4-bit (NF4) base for QLoRA, and each method's config.

Every provider (frozen base, peft, peft_fast, per method) is a copy of one base model whose
parameters are shared, not duplicated: only the module tree is copied, and each library then
adds its adapters to its own tree. No provider writes to the frozen weights, so sharing them
changes nothing but the memory a run needs (a 1B model once, not once per provider).
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import nn

METHODS = ("lora", "dora", "ia3", "qlora", "mixed")
TRAIN_METHODS = ("lora", "dora", "ia3", "qlora")  # the training workload; `mixed` is inference only

# Llama-architecture configs built in code (random weights from a fixed seed, no download).
# batch/seq/dtype are each preset's workload defaults.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, batch=2, seq=32, dtype="float32"),
    # the CPU default (issue #2's train-step benchmark)
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096, batch=4, seq=256, dtype="float32"),
    # the GPU default: Llama-3.2-1B-shaped (1.24 B parameters with tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               batch=4, seq=512, dtype="bfloat16"),
}
WORKLOAD_KEYS = ("batch", "seq", "dtype")
# IA3 scales the input of these (feed-forward) projections instead of their output, as PEFT's
# defaults do for Llama's down_proj
FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h", "wo")


class BenchError(Exception):
    """A bad argument or an unusable environment: reported as one clear line, exit code 2."""


def default_preset(device: torch.device) -> str:
    return "1b" if device.type == "cuda" else "small"


def check_model_dir(path: str) -> str:
    """The absolute path of a local Hugging Face model directory, or a BenchError naming `path`."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise BenchError(f"--model {path!r}: no such directory ({full})")
    if not os.path.isdir(full):
        raise BenchError(f"--model {path!r}: not a directory ({full}); a local Hugging Face model directory "
                         "(config.json + weights) is expected")
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise BenchError(f"--model {path!r}: no config.json in {full}; a local Hugging Face model directory "
                         "(as written by save_pretrained) is expected")
    return full


def build_preset_model(preset: str, dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    """LlamaForCausalLM from PRESETS[preset] with random weights (seed 0), built on `device` in `dtype`."""
    spec = {k: v for k, v in PRESETS[preset].items() if k not in WORKLOAD_KEYS}
    return build_llama(spec, dtype, device, max_positions)


def build_llama(spec: dict, dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    """LlamaForCausalLM(LlamaConfig(**spec)) with random weights (seed 0), built on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec, max_position_embeddings=max(max_positions, 512), use_cache=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype directly: a 1B fp32 detour would double the memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype)


def load_model_dir(path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained(path) in `dtype` on `device` (local files only)."""
    from transformers import AutoModelForCausalLM

    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's model directory
        raise BenchError(f"--model {path!r}: cannot load a causal LM from it: {type(e).__name__}: {e}") from e
    model.config.use_cache = False
    return model.to(device)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter (and so tied weights) with `model`."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def vocab_size(model: nn.Module) -> int:
    n = getattr(model.config, "vocab_size", None)
    if not n:
        n = model.get_input_embeddings().num_embeddings
    return int(n)


# ------------------------------------------------------------------------------------------ 4-bit base
def bnb_4bit_problem(device: torch.device) -> Optional[str]:
    """Why QLoRA cannot run here (None when it can): bitsandbytes missing or without this device."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e}); pip install bitsandbytes"
    try:  # quantize one tiny weight on the device: the cheapest proof that 4-bit works there
        p = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to(device)
        if getattr(p, "quant_state", None) is None:
            return f"bitsandbytes {bnb.__version__} did not quantize a weight on {device}"
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize on {device}: {type(e).__name__}: {e}"
    return None


def make_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """bnb.nn.Linear4bit (NF4, double quantization) holding linear's weight; linear is left unchanged."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
    # quantizing reads the weight without changing it (the Params4bit's data is rebound to the codes)
    w = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.weight = w.to(device)
    layer.quant_state = layer.weight.quant_state
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def to_4bit(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A shared copy of `model` with every nn.Linear but the output layer swapped for a bnb NF4
    Linear4bit, flagged as transformers flags a model loaded with BitsAndBytesConfig(load_in_4bit)."""
    m = shared_copy(model)
    out = m.get_output_embeddings()
    for pname, parent in list(m.named_modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not out:
                setattr(parent, cname, make_linear4bit(child, compute_dtype, device))
    m.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layer on this flag
    m.is_quantized = True
    m.quantization_method = "bitsandbytes"
    return m


# ------------------------------------------------------------------------------------------ configs
def ia3_targets(targets, model: nn.Module) -> tuple:
    """(target_modules, feedforward_modules) of the IA3 config: (None, None) without --targets, so
    both libraries take PEFT's defaults for the model type (Llama: k_proj, v_proj, down_proj;
    down_proj feed-forward)."""
    if targets is None:
        return None, None
    if targets == "all-linear":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return targets, [n for n in FEEDFORWARD_NAMES if n in present]
    return targets, [t for t in targets if t.rsplit(".", 1)[-1] in FEEDFORWARD_NAMES]


def method_config(lib, method: str, rank: int, targets, model: nn.Module):
    """The adapter config of one method, built with `lib` (peft or peft_fast: the same API)."""
    lora_targets = targets if targets is not None else "all-linear"
    if method in ("lora", "qlora"):
        return lib.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=lora_targets,
                              task_type="CAUSAL_LM")
    if method == "dora":
        return lib.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=True,
                              target_modules=lora_targets, task_type="CAUSAL_LM")
    if method == "ia3":
        t, ff = ia3_targets(targets, model)
        return lib.IA3Config(target_modules=t, feedforward_modules=ff, task_type="CAUSAL_LM")
    if method == "mixed":  # inference adapters: no dropout
        return lib.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=lora_targets,
                              task_type="CAUSAL_LM")
    raise BenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def config_summary(method: str, rank: int, targets, model: nn.Module) -> str:
    """One line for the results: what each method's adapter is."""
    lora_t = targets if targets is not None else "all-linear"
    if method == "ia3":
        t, ff = ia3_targets(targets, model)
        if t is None:
            from ..utils.constants import (
                TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TM,
            )

            mt = getattr(getattr(model, "config", None), "model_type", None)
            return f"IA3 on {TM.get(mt, '?')}, feed-forward {FF.get(mt, '?')} (PEFT's defaults for {mt})"
        return f"IA3 on {t}, feed-forward {ff}"
    if method == "dora":
        return f"DoRA r={rank} alpha={2 * rank} dropout 0 on {lora_t}"
    if method == "qlora":
        return f"LoRA r={rank} alpha={2 * rank} dropout 0.05 on {lora_t}, NF4 base (double quant)"
    if method == "mixed":
        return f"LoRA r={rank} alpha={2 * rank} on {lora_t}, one adapter per sample"
    return f"LoRA r={rank} alpha={2 * rank} dropout 0.05 on {lora_t}"
