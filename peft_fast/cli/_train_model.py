"""Model side of `peft-fast train`: the 4-bit checks, loading the base model and tokenizer, and
the adapter config built from the command line."""
from __future__ import annotations

from pathlib import Path

from ._train_util import CLIError, require_dir


def check_bitsandbytes(device) -> str:
    """bitsandbytes' version if it can quantize to 4 bit on `device`; CLIError saying why not.

    Two checks: the device *type* against the devices bitsandbytes was built for (cheap, before
    anything is loaded), then one real 4-bit quantization on the device (catches a build without
    kernels for it)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken install failing in its own import
        raise CLIError(f"--4bit needs bitsandbytes, which cannot be imported here ({type(e).__name__}: {e}); "
                       "install it with `pip install bitsandbytes`, or train without --4bit") from None
    version = getattr(bnb, "__version__", "?")
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and device.type not in supported:
        raise CLIError(f"--4bit: bitsandbytes {version} has no 4-bit kernels for device {device.type!r} "
                       f"(it supports {', '.join(sorted(supported))}); pick one with --device, or drop --4bit")
    return version


def probe_bitsandbytes(device) -> None:
    import torch
    from bitsandbytes import functional as bnbf

    try:
        q, state = bnbf.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--4bit: bitsandbytes cannot quantize to 4 bit on {device} "
                       f"({type(e).__name__}: {e}); drop --4bit or use another --device") from None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise CLIError(f"cannot load a tokenizer from model directory {str(model_dir)!r} "
                       f"({type(e).__name__}: {e})") from None


def load_base(model_dir: Path, device, dtype, four_bit: bool, gradient_checkpointing: bool):
    """The frozen base model on `device`, prepared for (k-bit) training."""
    from transformers import AutoModelForCausalLM

    import peft_fast

    kwargs = {"dtype": dtype}
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        if device.type != "cpu":
            kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"cannot load a causal LM from {str(model_dir)!r} ({type(e).__name__}: {e})") from None
    if not four_bit:
        model.to(device)
    model.config.use_cache = False
    ckpt_kwargs = {"use_reentrant": False}  # no need for grad-requiring inputs with frozen embeddings
    if four_bit:
        # PEFT's recipe: freeze, upcast norms/embeddings/head to fp32, enable checkpointing if asked
        model = peft_fast.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs)
        # DESIGN.md: a no-grad eval forward can repack bnb weights on some CPUs; stay in train mode
        model.train()
    elif gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise CLIError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parse_targets(spec: str):
    """'all-linear' stays a string (PEFT expands it); otherwise a comma-separated list of names."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise CLIError(f"--targets {spec!r} names no module")
    return names


def adapter_config(method: str, r: int, alpha: float, dropout: float, targets, base):
    import peft_fast

    if method in ("lora", "dora"):
        return peft_fast.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                    use_dora=method == "dora", task_type="CAUSAL_LM")
    # IA3 has no rank, scale or dropout
    targets, feedforward = ia3_modules(base, targets)
    return peft_fast.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


def ia3_modules(base, targets) -> tuple[list[str], list[str]]:
    """IA3 (target, feed-forward) module names, both as leaf names.

    Why not pass 'all-linear' through: PEFT expands it to full module paths but keeps its
    feed-forward default as leaf names ('down_proj'), so the saved adapter_config fails PEFT's
    own "feedforward_modules should be a subset of target_modules" check on load (in peft 0.21.2
    as in peft_fast). Leaf names on both sides load everywhere. Feed-forward modules are PEFT's
    per-architecture table entries among the targets (none for unknown architectures)."""
    from torch import nn

    from ..utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    if targets == "all-linear":
        try:
            from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers
            kinds = (nn.Linear, Conv1D)
        except ImportError:
            kinds = (nn.Linear,)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules()
                          if isinstance(m, kinds) and m is not head and name})
        if not targets:
            raise CLIError("--targets all-linear: the model has no linear layer besides its output head")
    targets = list(targets)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    # table entries may be dotted suffixes ('mlp.c_proj'); they are added to the targets as well,
    # since PEFT checks feedforward_modules against target_modules as plain string sets
    feedforward = [e for e in FF.get(model_type, []) if e.rsplit(".", 1)[-1] in targets]
    targets += [e for e in feedforward if e not in targets]
    return targets, feedforward


def attach_adapter(base, config):
    import peft_fast

    try:
        return peft_fast.get_peft_model(base, config)
    except (ValueError, NotImplementedError, TypeError, KeyError) as e:
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise CLIError(f"cannot add a {kind} adapter to this model: {e}") from None


def model_dir_of(path: str) -> Path:
    return require_dir(path, "model directory", marker="config.json",
                       hint=" (--model takes a local directory saved with save_pretrained)")
