"""Adapter state dicts in PEFT's on-disk key format, and reading adapter files (L4).

Model keys carry the adapter name (``q_proj.lora_A.default.weight``); checkpoint keys do
not (``q_proj.lora_A.weight``), and DoRA's magnitude is stored as ``...lora_magnitude_vector``.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
from torch import nn

from .constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .io import load_weights_file
from .other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

_PEFT_PREFIX = "base_model.model."


# Wrappers whose state_dict() drops their own attribute name from the keys (torch FSDP, activation
# checkpointing): module names are matched against state-dict keys without them.
_TRANSPARENT_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _named_modules(model: nn.Module):
    """``model.named_modules()`` with names as they appear in ``model.state_dict()`` keys."""
    for name, module in model.named_modules():
        if "_wrapped_module" in name:
            name = ".".join(p for p in name.split(".") if p not in _TRANSPARENT_WRAPPER_NAMES)
        yield name, module


def _remove_adapter_name(key: str, adapter_name: str) -> str:
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{suffix}"


def _to_checkpoint_key(key: str, adapter_name: str) -> str:
    if key.endswith(f"lora_magnitude_vector.{adapter_name}.weight"):
        key = key[: -len(".weight")]
    return _remove_adapter_name(key, adapter_name)


def _adapter_model_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """Model state-dict keys of one adapter's tuner-layer tensors, found structurally."""
    from ..tuners.tuners_utils import BaseTunerLayer

    keys = []
    for name, module in _named_modules(model):
        if not isinstance(module, BaseTunerLayer):
            continue
        for layer_name, item in module.adapter_items(adapter_name):
            prefix = f"{name}.{layer_name}.{adapter_name}" if name else f"{layer_name}.{adapter_name}"
            if isinstance(item, torch.Tensor):
                keys.append(prefix)
            else:
                keys.extend(f"{prefix}.{k}" for k in item.state_dict())
    return keys


def _tuner_config(model, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} not found. Available adapters: {sorted(configs or {})}")
    return configs[adapter_name]


def get_peft_model_state_dict(model, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict:
    """The adapter's tensors with checkpoint keys (adapter name removed), as PEFT saves them."""
    from ..tuners.tuners_utils import BaseTunerLayer

    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = _tuner_config(model, adapter_name)
    if state_dict is None:
        state_dict = model.state_dict()
    out = {k: state_dict[k] for k in _adapter_model_keys(model, adapter_name) if k in state_dict}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update({k: v for k, v in state_dict.items() if k == "bias" or k.endswith(".bias")})
    elif bias.endswith("_only"):
        for name, module in _named_modules(model):
            if isinstance(module, BaseTunerLayer):
                key = f"{name}.base_layer.bias" if name else "base_layer.bias"
                if key in state_dict:
                    out[key] = state_dict[key]
    for name, module in _named_modules(model):
        if isinstance(module, AuxiliaryTrainingWrapper):
            local = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
            out.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, local).items()})
    if _save_embeddings(model, config, save_embedding_layers):
        for name, module in _named_modules(model):
            if isinstance(module, BaseTunerLayer) and any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES):
                out.update({k: v for k, v in state_dict.items() if k.startswith(f"{name}.")
                            and (k.startswith(f"{name}.base_layer.") or f".{adapter_name}" in k)})
    return {_to_checkpoint_key(k, adapter_name): v for k, v in out.items()}


def _save_embeddings(model, config, save_embedding_layers) -> bool:
    if save_embedding_layers is not True and save_embedding_layers != "auto":
        return False
    targets = getattr(config, "target_modules", None)
    targeted = False
    if isinstance(targets, str) and targets != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        targeted = any(re.match(rf"(.*\.)?{e}$", n) and re.fullmatch(targets, n)
                       for n, _ in _named_modules(model) for e in EMBEDDING_LAYER_NAMES)
    elif targets and not isinstance(targets, str):
        targeted = any(e in targets for e in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto" and targeted:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
    return targeted if save_embedding_layers == "auto" else True


def set_peft_model_state_dict(model, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """Load checkpoint-format adapter tensors into `adapter_name` of the model.

    Raises ValueError naming the key when a tensor's shape does not fit the model (unless
    ignore_mismatched_sizes, which skips it with a warning). Returns load_state_dict's result.
    """
    config = _tuner_config(model, adapter_name)
    if hasattr(getattr(model, "config", None), "model_type"):
        # transformers v5 fused the MoE experts of some models: fuse a v4-layout checkpoint's factors too (PEFT)
        from .transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

        peft_model_state_dict = convert_peft_adapter_state_dict_for_transformers(
            model, config, peft_model_state_dict, adapter_name=adapter_name)
    model_sd = model.state_dict()
    has_prefix = any(k.startswith(_PEFT_PREFIX) for k in model_sd)
    ckpt = {}
    for k, v in peft_model_state_dict.items():
        if has_prefix and not k.startswith(_PEFT_PREFIX):
            k = _PEFT_PREFIX + k
        elif not has_prefix and k.startswith(_PEFT_PREFIX):
            k = k[len(_PEFT_PREFIX):]
        ckpt[k] = v
    mapping = {_to_checkpoint_key(k, adapter_name): k for k in _adapter_model_keys(model, adapter_name)}
    for name, module in _named_modules(model):
        if isinstance(module, AuxiliaryTrainingWrapper):
            for k, target in module.adapter_state_dict_load_map(adapter_name).items():
                mapping[f"{name}.{k}"] = f"{name}.{target}"
    to_load, unexpected, mismatched = {}, [], []
    for k, v in ckpt.items():
        mk = mapping.get(k, k)
        if mk not in model_sd:
            unexpected.append(k)
            continue
        if model_sd[mk].shape != v.shape:
            if not ignore_mismatched_sizes:
                raise ValueError(
                    f"Shape mismatch for {k!r}: the checkpoint has {tuple(v.shape)} but the model expects "
                    f"{tuple(model_sd[mk].shape)}. The adapter was trained for a different base model or rank."
                )
            mismatched.append((k, tuple(v.shape), tuple(model_sd[mk].shape)))
            continue
        to_load[mk] = v
    if unexpected:
        warnings.warn(f"Unexpected keys in the adapter checkpoint were ignored: {unexpected[:10]}"
                      + (" ..." if len(unexpected) > 10 else ""))
    if mismatched:
        warnings.warn("Some adapter weights were ignored because of shape mismatches: "
                      + "; ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched))
    missing = [mk for mk in mapping.values() if mk not in to_load and mk in model_sd]
    if missing and not mismatched:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing[:10]}")
    result = model.load_state_dict(to_load, strict=False, assign=low_cpu_mem_usage)
    return type(result)(missing_keys=missing, unexpected_keys=unexpected)


def _apply_key_mapping(weights: dict, key_mapping: Optional[dict[str, str]]) -> dict:
    """PEFT's `key_mapping`: each key loses its ``base_model.model.`` (else ``base_model.``) prefix,
    the first regex `pattern` of `key_mapping` (in order) that matches it is substituted everywhere
    (``re.subn``) by its `replacement`, and the prefix is put back. An empty/None mapping changes
    nothing; a key with neither prefix is PEFT's ValueError; a bad pattern raises ``re.error``."""
    if not key_mapping:
        return weights
    remapped = {}
    for key, value in weights.items():
        if key.startswith("base_model.model."):
            prefix = "base_model.model."
        elif key.startswith("base_model."):
            prefix = "base_model."
        else:
            raise ValueError(
                "An error occurred while trying to load a PEFT state_dict with key_mapping. This should not "
                "happen. Please open an issue on https://github.com/huggingface/peft/issues and report the error."
            )
        key = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new_key, n = re.subn(pattern, replacement, key)
            if n > 0:
                key = new_key
                break
        remapped[prefix + key] = value
    return remapped


def load_peft_weights(model_id: str, device: Optional[str] = None, key_mapping: Optional[dict[str, str]] = None,
                      **hf_hub_download_kwargs) -> dict:
    """Read ``adapter_model.safetensors`` (or, failing that, ``adapter_model.bin`` with
    weights_only=True) from a local directory or, when `model_id` is not one, from the Hugging Face
    Hub repo of that name (``subfolder`` and the ``hf_hub_download`` options ``revision``,
    ``cache_dir``, ``token``, ``local_files_only``, ... as in PEFT; ``HF_HUB_OFFLINE=1`` reads the cache).

    `key_mapping` (PEFT's): ``{regex: replacement}`` applied to each key after its
    ``base_model.model.`` prefix is removed (the adapter name is not in checkpoint keys), e.g. for
    transformers models whose module names changed; see `_apply_key_mapping`.

    No weights file: ValueError with PEFT's text (``LocalEntryNotFoundError``, as PEFT raises, when
    the cache could not answer), naming the repo, revision and files and what the cache holds."""
    return _apply_key_mapping(_load_peft_weights_file(model_id, device, **hf_hub_download_kwargs), key_mapping)


def _load_peft_weights_file(model_id: str, device: Optional[str] = None, **kwargs) -> dict:
    subfolder = kwargs.get("subfolder")
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    names = [SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME]
    if os.path.isdir(path):
        filename = next((f for f in (os.path.join(path, n) for n in names) if os.path.isfile(f)), None)
        if filename is None:
            raise ValueError(
                f"Can't find weights for {model_id} in {model_id} or in the Hugging Face Hub. Please check that the "
                f"file {WEIGHTS_NAME} or {SAFETENSORS_WEIGHTS_NAME} is present at {model_id}."
            )
        return load_weights_file(filename, device or "cpu")
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from .hub import download_adapter_file, hub_error_detail

    missing = None
    for name in names:  # safetensors first, as in PEFT
        try:
            return load_weights_file(download_adapter_file(model_id, name, **kwargs), device or "cpu")
        except EntryNotFoundError as exc:  # no such file in the repo (or in the cache): try the next
            missing = exc
    detail = hub_error_detail(model_id, names, subfolder, missing, kwargs)
    message = (f"Can't find weights for {model_id} in {model_id} or in the Hugging Face Hub. Please check that the file "
               f"{WEIGHTS_NAME} or {SAFETENSORS_WEIGHTS_NAME} is present at {model_id}. "
               f"{detail[:1].upper()}{detail[1:]}.")
    error_type = LocalEntryNotFoundError if isinstance(missing, LocalEntryNotFoundError) else ValueError
    raise error_type(message) from missing


# ---- the base model's own weights, under its original keys ----------------------------------------
def _base_root(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_key_map(model) -> dict[str, str]:
    """Original (pre-PEFT) key -> key in the wrapped model, for every non-adapter tensor.

    Adapter tensors are everything on a tuner layer except its ``base_layer`` and the copies of a
    ModulesToSaveWrapper; the ``base_layer`` / ``original_module`` infixes are dropped only where
    the enclosing module really is a tuner layer / wrapper (PEFT's rule, so a user's module that
    happens to be called ``base_layer`` keeps its name).
    """
    from ..tuners.tuners_utils import BaseTunerLayer

    out: dict[str, str] = {}

    def walk(module: nn.Module, peft_prefix: str, orig_prefix: str) -> None:
        is_tuner = isinstance(module, BaseTunerLayer)
        is_wrapper = isinstance(module, AuxiliaryTrainingWrapper)
        for kind in (module.named_parameters, module.named_buffers):
            for name, _ in kind(recurse=False):
                if is_tuner or is_wrapper:
                    continue  # a tuner layer's / wrapper's own tensors belong to its adapters
                out[orig_prefix + name] = peft_prefix + name
        for name, child in module.named_children():
            if is_tuner and name != "base_layer":
                continue
            if is_wrapper and name not in ("original_module", "token_adapter"):
                continue
            if is_wrapper and name == "token_adapter":  # TrainableTokensWrapper: only its base_layer is base model
                child = child.base_layer
            infix = (is_tuner and name == "base_layer") or is_wrapper
            if is_wrapper and name == "token_adapter":
                name = "token_adapter.base_layer"
            walk(child, f"{peft_prefix}{name}.", orig_prefix if infix else f"{orig_prefix}{name}.")

    walk(_base_root(model), "", "")
    return out


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys: adapter tensors left out, the
    ``base_layer`` / ``original_module`` infixes PEFT inserted removed (PEFT's function)."""
    state_dict = _base_root(model).state_dict()
    return {orig: state_dict[key] for orig, key in _base_key_map(model).items() if key in state_dict}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a state dict with the original model keys into the base weights of a PEFT model;
    the inverse of :func:`get_base_model_state_dict`. Returns (missing_keys, unexpected_keys);
    with ``strict`` a mismatch raises RuntimeError, as in PEFT."""
    from collections import namedtuple

    incompatible = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
    root = _base_root(model)
    current = root.state_dict()
    mapping = {orig: key for orig, key in _base_key_map(model).items() if key in current}
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = []
        if missing:
            msgs.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return incompatible(missing_keys=missing, unexpected_keys=unexpected)


# ---- save_pretrained(path_initial_model_for_weight_conversion=...) -----------------------------------
def convert_mutated_init_to_lora(peft_model, peft_config, path_initial_model_for_weight_conversion: str,
                                 output_state_dict: dict, kwargs: Optional[dict] = None) -> dict:
    """PEFT's conversion of an adapter trained from a base-mutating initialisation (PiSSA/CorDA/OLoRA:
    ``W = W_res + B0 A0``) into a plain LoRA adapter for the unmutated base: with the initial adapter
    (A0, B0) saved in `path_initial_model_for_weight_conversion` and the trained one (A, B),
    ``dW = B A - B0 A0 = [B | -B0] [A ; A0]``, i.e. rank 2r (the caller doubles r and alpha).

    The initial adapter is loaded (from ``dirname(path)``, subfolder and adapter name ``basename(path)``,
    its ``adapter_config.json`` having first been rewritten by the caller with init_lora_weights=True),
    used and deleted again. Only ``lora_A``/``lora_B`` tensors are kept, as in PEFT. LoRA only: other
    tuners raise PEFT's ValueError; rsLoRA with rank_pattern/alpha_pattern too."""
    kwargs = kwargs or {}
    tuner_name = type(peft_model.base_model).__name__
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    if peft_type != "LORA":
        raise ValueError(f"Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         f"for {tuner_name}.")
    if peft_config.use_rslora and (peft_config.rank_pattern or peft_config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    if not any(str(peft_config.init_lora_weights).lower().startswith(prefix)
               for prefix in ("pissa", "corda", "olora", "lora_ga", "true")):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a "
                      "PiSSA/CorDA/OLoRA/LoRA-GA adapter to a LoRA adapter")
    initial_name = os.path.basename(path_initial_model_for_weight_conversion)
    try:
        peft_model.load_adapter(os.path.dirname(path_initial_model_for_weight_conversion), subfolder=initial_name,
                                adapter_name=initial_name)
        init = str(peft_model.peft_config[initial_name].init_lora_weights).lower()
        if init.startswith("pissa") or init in ("corda", "olora", "lora_ga"):
            raise ValueError(
                "The `init_lora_weights` parameter of the initial adapter should be set to `True`. "
                "Otherwise, `self.load_adapter` will subtract the decomposed values again based on the "
                "residual model."
            )
        if initial_name.startswith("pissa") and any(
                p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                for p in peft_model.get_base_model().parameters()):
            warnings.warn(
                r"Note that Quant(W_res) + AB != Quant(W) + \Delta(AB); "
                "the converted LoRA, when combined with W or Quant(W), may introduce a certain gap in the fine-tuned "
                "model. Therefore, we recommend directly using the Quant(W_res) in conjunction with the PiSSA adapter. "
            )
        initial = get_peft_model_state_dict(peft_model, state_dict=kwargs.get("state_dict"), adapter_name=initial_name)
        converted = {}
        for name, value in output_state_dict.items():
            if "lora_A" in name:  # [A ; A0]: rows are ranks
                converted[name] = torch.cat([value, initial[name]], dim=0)
            elif "lora_B" in name:  # [B | -B0]
                converted[name] = torch.cat([value, -initial[name]], dim=1)
        return converted
    finally:
        if initial_name in peft_model.peft_config:
            peft_model.delete_adapter(initial_name)
