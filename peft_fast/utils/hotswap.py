"""Hot-swapping LoRA adapters in place, as ``peft.utils.hotswap`` (PEFT 0.21.2) does (L4).

The adapter keeps its name and its parameter objects; only their values (and the scalings) change,
so a `torch.compile`d model keeps its graph:

- `prepare_model_for_compiled_hotswap` (before compiling) turns every ``scaling[adapter]`` into a
  0-dim tensor, so a new alpha is written with ``fill_`` instead of a new Python float the graph
  was specialised on, and optionally zero-pads lora_A / lora_B of Linear and Conv2d layers to
  ``target_rank``, so smaller ranks are copied into the padded tensors (the padding adds nothing).
- `hotswap_adapter` / `hotswap_adapter_from_state_dict` copy the new weights into those tensors.

Same names, signatures, defaults, checks and errors as PEFT, PEFT's limits included: only LoRA;
the new adapter must target the same modules (keys it lacks are zeroed); adapters with an
Embedding LoRA, DoRA (file key ``lora_magnitude_vector``) or ``modules_to_save`` are refused by
`hotswap_adapter` the way PEFT refuses them (AttributeError / KeyError); a state dict with model
keys (``...lora_magnitude_vector.<adapter>.weight``) swaps DoRA magnitudes too. Quantized (bnb)
layers are not padded, as in PEFT. The fused ops read tensor scalings without leaving the graph
(functional/_common.fold_tensor_scaling).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from operator import attrgetter
from typing import Literal, Optional

import torch

from ..config import PeftConfig
from ..mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from ..tuners.lora.bnb import _QuantizedLinear
from ..tuners.lora.config import LoraConfig
from ..tuners.lora.layer import Conv2d, Linear, LoraLayer
from ..tuners.tuners_utils import BaseTunerLayer
from .constants import CONFIG_NAME, PEFT_TYPE_TO_PREFIX_MAPPING
from .other import get_pattern_key
from .peft_types import PeftType
from .save_and_load import load_peft_weights

# so far only LoRA is supported
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _fill_padded(new_layer, lora_module, padded: torch.Tensor, weight_kind: str, bias_kind: str):
    """Give `new_layer` the zero-padded weight and the old bias, with PEFT's shape checks and
    messages (weight_kind / bias_kind name the layer kind as PEFT's messages do)."""
    new_layer.weight.requires_grad_(lora_module.weight.requires_grad)
    new_layer.train(lora_module.training)  # a padded copy keeps the train/eval mode too
    if new_layer.weight.shape != padded.shape:
        raise ValueError(
            f"Something went wrong when trying to pad the LoRA {weight_kind}, the new shape should be "
            f"{padded.shape} but {new_layer.weight.shape} was found. Please open an issue on PEFT "
            "(https://github.com/huggingface/peft/issues) and report this error."
        )
    if (lora_module.bias is not None) and (new_layer.bias.shape != lora_module.bias.shape):
        raise ValueError(
            f"Something went wrong when trying to pad the LoRA {bias_kind}, the new shape should be "
            f"{lora_module.bias.shape} but {new_layer.bias.shape} was found. Please open an issue on PEFT "
            "(https://github.com/huggingface/peft/issues) and report this error."
        )
    new_layer.weight.data = padded
    if lora_module.bias is not None:
        new_layer.bias.data = lora_module.bias.data
    return new_layer


def infer_device() -> str:
    """The default accelerator, as ``peft.utils.other.infer_device`` picks it."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if hasattr(torch, "npu") and torch.npu.is_available():
        return "npu"
    return "cpu"


def _get_peft_type(model_id: str, **hf_kwargs) -> str:
    """``PeftConfig._get_peft_type``: the peft_type in ``adapter_config.json`` (local directories only)."""
    subfolder = hf_kwargs.get("subfolder", None)
    path = os.path.join(model_id, subfolder) if subfolder is not None else model_id
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"Can't find '{CONFIG_NAME}' at '{model_id}'")
    return PeftConfig.from_json_file(config_file)["peft_type"]


def _insert_adapter_name_into_state_dict(
    state_dict: dict[str, torch.Tensor], adapter_name: str, parameter_prefix: str
) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> model keys by inserting the adapter name (PEFT's helper of the same name)."""
    peft_model_state_dict = {}
    for key, val in state_dict.items():
        if parameter_prefix in key:
            _, _, suffix = key.rpartition(parameter_prefix)
            if "." in suffix:
                suffix_to_replace = ".".join(suffix.split(".")[1:])
                # only where the key ends with it: a module name may contain the same text
                key = re.sub(re.escape(suffix_to_replace) + r"$", f"{adapter_name}.{suffix_to_replace}", key)
            else:
                key = f"{key}.{adapter_name}"
        peft_model_state_dict[key] = val
    return peft_model_state_dict


def _update_scaling(lora_module: LoraLayer, adapter_name: str, scaling: float) -> None:
    """Set one adapter's scaling; a tensor (prepare_model_for_compiled_hotswap) is filled in place."""
    if lora_module.scaling[adapter_name] == scaling:
        return

    if isinstance(lora_module.scaling[adapter_name], torch.Tensor):
        lora_module.scaling[adapter_name].fill_(scaling)
    elif isinstance(lora_module.scaling[adapter_name], (float, int)):
        lora_module.scaling[adapter_name] = scaling
    else:
        raise TypeError(
            "Something went wrong when trying to set the new scale value, expected to find the old value to be of type "
            f"float or torch.Tensor, got {type(lora_module.scaling[adapter_name])} instead."
        )


def _convert_scalings_to_tensor(model) -> bool:
    """Scalings -> 0-dim tensors on the base weight's device (a new value then needs no recompile).

    Returns True if a LoRA layer was found.
    """
    found_adapter = False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue

        found_adapter = True
        scaling = module.scaling
        for key, val in scaling.items():
            if isinstance(val, float):
                # no dtype: a 0-dim tensor does not promote the tensors it multiplies
                scaling[key] = torch.tensor(val, device=module.weight.device)
            elif not isinstance(val, torch.Tensor):
                raise TypeError(
                    "Something went wrong while trying to convert the scalings, expected to find values of type float "
                    f"but found {type(val)} instead."
                )
    return found_adapter


def _get_padded_linear(lora_module: torch.nn.Module, target_rank: int, is_lora_A: bool, **kwargs) -> torch.nn.Linear:
    """A new nn.Linear for lora_A ([r, K] -> [target_rank, K]) or lora_B ([N, r] -> [N, target_rank]),
    zero-padded; the module itself when the rank already fits."""
    weight = lora_module.weight
    # the rank is out_features of lora_A and in_features of lora_B
    original_rank = weight.size(0) if is_lora_A else weight.size(1)

    if original_rank == target_rank:
        return lora_module

    if original_rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
            f"({original_rank}). This is not possible."
        )

    out_features, in_features = weight.shape

    if is_lora_A:
        padded = torch.zeros(target_rank, in_features, device=weight.device, dtype=weight.dtype)
        padded[:original_rank, :] = weight
        new_layer = torch.nn.Linear(in_features, target_rank, bias=lora_module.bias is not None)
    else:
        padded = torch.zeros(out_features, target_rank, device=weight.device, dtype=weight.dtype)
        padded[:, :original_rank] = weight
        new_layer = torch.nn.Linear(target_rank, out_features, bias=lora_module.bias is not None)
    return _fill_padded(new_layer, lora_module, padded, weight_kind="Linear weights", bias_kind="Linear bias")


def _copy_grouped_conv2d_lora_a_weights(destination: torch.Tensor, source: torch.Tensor, groups: int) -> None:
    """Copy grouped-Conv2d lora_A weights [r_src, ...] into [r_dst, ...], keeping each group's rank block."""
    destination_rank_per_group = destination.shape[0] // groups
    source_rank_per_group = source.shape[0] // groups
    for group_idx in range(groups):
        destination_start = group_idx * destination_rank_per_group
        source_start = group_idx * source_rank_per_group
        destination[destination_start : destination_start + source_rank_per_group].copy_(
            source[source_start : source_start + source_rank_per_group]
        )


def _get_padded_conv2d(lora_module: torch.nn.Module, target_rank: int, is_lora_A: bool, **kwargs) -> torch.nn.Conv2d:
    """A new nn.Conv2d for lora_A / lora_B zero-padded to target_rank; the module itself when the rank fits."""
    weight = lora_module.weight
    # [out_channels, in_channels, kernel_height, kernel_width]
    out_channels, in_channels, kh, kw = weight.shape
    groups = lora_module.groups
    base_layer_groups = kwargs.get("base_layer_groups", 1)
    # lora_B with groups > 1 holds rank // groups input channels per group; lora_A has groups=1
    original_rank = out_channels if is_lora_A else in_channels * groups

    if original_rank == target_rank:
        return lora_module

    if original_rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
            f"({original_rank}). This is not possible."
        )

    if is_lora_A:
        padded = torch.zeros(target_rank, in_channels, kh, kw, device=weight.device, dtype=weight.dtype)
        if base_layer_groups == 1:
            padded[:out_channels, :, :, :] = weight
        else:
            _copy_grouped_conv2d_lora_a_weights(padded, weight, base_layer_groups)
        new_layer = torch.nn.Conv2d(
            in_channels,
            target_rank,
            kernel_size=lora_module.kernel_size,
            stride=lora_module.stride,
            padding=lora_module.padding,
            bias=lora_module.bias is not None,
            groups=groups,
        )
    else:
        if target_rank % groups != 0:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA B with groups={groups} to target rank {target_rank}, but the target "
                f"rank is not divisible by {groups}. Please choose a target rank that is divisible by groups."
            )
        target_in_channels = target_rank // groups
        padded = torch.zeros(out_channels, target_in_channels, kh, kw, device=weight.device, dtype=weight.dtype)
        padded[:, :in_channels, :, :] = weight
        new_layer = torch.nn.Conv2d(
            target_rank,
            out_channels,
            kernel_size=lora_module.kernel_size,
            stride=lora_module.stride,
            padding=lora_module.padding,
            bias=lora_module.bias is not None,
            groups=groups,
        )
    return _fill_padded(new_layer, lora_module, padded, weight_kind=" weights", bias_kind="Conv2d bias")


def _pad_lora_weights(model: torch.nn.Module, target_rank: int) -> bool:
    """Zero-pad lora_A / lora_B of every LoRA Linear and Conv2d layer to target_rank (outputs unchanged).

    Returns True if such a layer was found.
    """
    found_adapter = False

    for module in model.modules():
        # PEFT pads its own Linear and Conv2d classes only; its bitsandbytes layers are not Linear
        # subclasses, ours are, so they are left out here to keep the same parameter shapes.
        if isinstance(module, Linear) and not isinstance(module, _QuantizedLinear):
            pad_fn = _get_padded_linear
            base_layer_groups = 1
        elif isinstance(module, Conv2d):
            pad_fn = _get_padded_conv2d
            base_layer_groups = module.get_base_layer().groups
            if target_rank % base_layer_groups != 0:
                raise ValueError(
                    f"Trying to pad a Conv2d LoRA adapter with groups={base_layer_groups} to target rank "
                    f"{target_rank}, but the target rank is not divisible by {base_layer_groups}. Please choose a "
                    f"target rank that is divisible by {base_layer_groups}."
                )
        else:
            continue

        for adapter_name, lora_A_module in module.lora_A.items():
            new_layer = pad_fn(
                lora_A_module, target_rank=target_rank, is_lora_A=True, base_layer_groups=base_layer_groups
            )
            module.lora_A[adapter_name] = new_layer

        for adapter_name, lora_B_module in module.lora_B.items():
            new_layer = pad_fn(
                lora_B_module, target_rank=target_rank, is_lora_A=False, base_layer_groups=base_layer_groups
            )
            module.lora_B[adapter_name] = new_layer

        found_adapter = True
    return found_adapter


def prepare_model_for_compiled_hotswap(
    model: torch.nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[LoraConfig | dict[str, LoraConfig]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first LoRA adapter loaded for hot-swapping after `torch.compile`.

    Needed when later adapters have other ranks and/or alphas and the compiled graph must be kept.
    Call it after loading the first adapter and before compiling. Scalings become 0-dim tensors;
    with `target_rank`, lora_A / lora_B are zero-padded to it (the largest rank to be swapped in).
    Adapters targeting other layers are still not supported. Modifies the model in place.

    Args:
        model (`nn.Module`): the model with the loaded adapter, before compilation.
        target_rank (`int`, *optional*): the rank to pad to; ranks are unchanged when None.
        config (`LoraConfig` or `dict[str, LoraConfig]`, *optional*): their `r` (and `rank_pattern`
            values) are set to `target_rank`.
        check_compiled (`str`, defaults to `"error"`): for an already compiled model, `"error"`
            raises, `"warn"` warns, `"ignore"` does nothing.

    Raises:
        ValueError: the model is already compiled (with `check_compiled="error"`), or has no LoRA layer.
    """
    is_compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False)
    if is_compiled:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        elif check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
                "result in re-compilation, hurting performance. Call the function before compiling the model."
            )
        elif check_compiled != "ignore":
            raise ValueError(
                f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
            )

    conversion_found_adapter = _convert_scalings_to_tensor(model)
    if target_rank is not None:
        padding_found_adapter = _pad_lora_weights(model, target_rank=target_rank)
    else:
        padding_found_adapter = False

    if not (conversion_found_adapter or padding_found_adapter):
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )

    if not config:
        return
    if target_rank is None:
        return

    if not isinstance(config, dict):
        # a PeftConfig, or a dict of them like PeftModel.peft_config
        config = {"dummy": config}

    for lora_config in config.values():
        lora_config.r = target_rank
        if lora_config.rank_pattern:
            for key in lora_config.rank_pattern:
                lora_config.rank_pattern[key] = target_rank


def hotswap_adapter_from_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Copy the weights of `state_dict` (model keys, adapter name inserted) into adapter `adapter_name`.

    Low level: assumes the configs were checked (`check_hotswap_configs_compatible`) and the keys
    mapped; `hotswap_adapter` does both. LoRA only. Weights the new adapter lacks are zeroed;
    smaller ranks are zero-padded into the existing tensors; a larger rank replaces the tensor
    (a compiled model then recompiles: pad with `prepare_model_for_compiled_hotswap` instead).

    Args:
        model (`nn.Module`): the model with the loaded adapter (or its `torch.compile` wrapper).
        state_dict (`dict[str, torch.Tensor]`): the new adapter's tensors, targeting the same modules.
        adapter_name (`str`): the adapter to swap, e.g. `"default"`; its name stays.
        config (`LoraConfig`): the new adapter's config (rank and alpha give the scaling).
        parameter_prefix (`str`, defaults to `"lora_"`): identifies the adapter's keys.

    Raises:
        ValueError: the adapter is merged. RuntimeError: the state dict has keys the model lacks.
    """
    target_merged = any(
        adapter_name in module.merged_adapters for module in model.modules() if isinstance(module, BaseTunerLayer)
    )
    if target_merged:
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()` (or, for diffusers "
            "models, `diffusers_model.unfuse_lora()`); unmerging after a swap of merged weights would otherwise "
            "corrupt them."
        )

    # _orig_mod is for torch.compile(model)
    is_compiled_wrapper = hasattr(model, "_orig_mod")
    missing_keys = {k for k in model.state_dict() if (parameter_prefix in k) and (adapter_name in k)}
    unexpected_keys = []

    # dry run first: nothing is written unless every key exists in the model
    for key, new_val in state_dict.items():
        try:
            attrgetter(key)(model)
        except AttributeError:
            unexpected_keys.append(key)
            continue

        if is_compiled_wrapper:
            missing_keys.remove("_orig_mod." + key)
        else:
            missing_keys.remove(key)

    # an adapter targeting new layers would need new modules, which a compiled graph cannot take
    if unexpected_keys:
        msg = f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected_keys)}."
        raise RuntimeError(msg)

    # weights the new adapter lacks are zeroed so the old adapter's values do not contribute
    for key in missing_keys:
        key = key.removeprefix("_orig_mod.")
        model.get_submodule(".".join(key.split(".")[:-3]))  # the LoRA layer must resolve, as in PEFT
        old_val = attrgetter(key)(model)
        old_val.data.fill_(0.0)

    swapped_modules = {}
    for key, new_val in state_dict.items():
        # the LoRA layer: the key without 'lora_*.<adapter-name>.weight'
        module_name = ".".join(key.split(".")[:-3])
        module = model.get_submodule(module_name)

        # rank/alpha patterns name modules (as at injection), not parameter keys: matching them
        # against the key (PEFT 0.21.2) never hits, so a rank_pattern module got alpha / r
        relative_name = _relative_module_name(module_name)
        swapped_modules[relative_name] = module
        r_key = get_pattern_key(config.rank_pattern.keys(), relative_name)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), relative_name)
        rank = config.rank_pattern.get(r_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        if config.use_rslora:
            scaling = alpha / math.sqrt(rank)
        else:
            scaling = alpha / rank
        _update_scaling(module, adapter_name=adapter_name, scaling=scaling)

        # torch resolves a compiled wrapper's attributes, no _orig_mod needed here
        old_val = attrgetter(key)(model)
        new_val = new_val.to(old_val.data.device)

        # same shape: copy; smaller rank (the current tensor is larger or padded): zero and copy
        # into the leading block; larger rank: the tensor must change (not for padded models)
        shapes_match = old_val.shape == new_val.shape
        new_is_smaller = (not shapes_match) and all(o >= n for o, n in zip(old_val.shape, new_val.shape))
        new_is_larger = (not shapes_match) and not new_is_smaller

        if shapes_match:
            old_val.data.copy_(new_val.data)
        elif new_is_smaller:
            if old_val.dim() not in (2, 4):
                raise NotImplementedError(
                    f"Trying to hotswap an adapter whose weight has {old_val.dim()} dimensions, but only Conv2d and "
                    "Linear are supported"
                )

            # Linear and Conv2d alike: the rank is dim 0 of lora_A and dim 1 of lora_B
            if old_val.shape[0] > new_val.shape[0]:
                old_val.data.fill_(0)
                requires_grouped_conv2d_lora_a_copy = (
                    isinstance(module, Conv2d) and ".lora_A." in key and module.get_base_layer().groups > 1
                )
                if not requires_grouped_conv2d_lora_a_copy:
                    old_val.data[: new_val.shape[0]].copy_(new_val.data)
                else:
                    groups = module.get_base_layer().groups
                    _copy_grouped_conv2d_lora_a_weights(old_val.data, new_val.data, groups)
            elif old_val.shape[1] > new_val.shape[1]:
                old_val.data.fill_(0)
                old_val.data[:, : new_val.shape[1]].copy_(new_val.data)
            else:
                raise ValueError(
                    f"Incompatible shapes found for LoRA weights {key}: {old_val.shape} vs {new_val.shape}. Please "
                    "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                    "peft.utils.hotswap.prepare_model_for_compiled_hotswap."
                )
        elif new_is_larger:
            requires_grad = old_val.requires_grad
            try:
                torch.utils.swap_tensors(old_val, new_val)
            except RuntimeError:
                # swap_tensors refuses tensors with weakrefs; rebinding the storage still works
                # eagerly (growing the rank of a compiled, padded model is unsupported anyway)
                old_val.data = new_val.data
            old_val.requires_grad_(requires_grad)  # a swap must not change trainability
        else:
            raise ValueError(
                "Something went wrong during hotswapping, please open an issue on PEFT: "
                "https://github.com/huggingface/peft/issues"
            )

    _sync_config_after_hotswap(model, adapter_name, config, swapped_modules)


_MODEL_PREFIXES = ("_orig_mod.", "base_model.model.")


def _relative_module_name(module_name: str) -> str:
    """A module's name inside the base model, as `rank_pattern` / `alpha_pattern` keys name it."""
    for prefix in _MODEL_PREFIXES:
        module_name = module_name.removeprefix(prefix)
    return module_name


def _sync_config_after_hotswap(model, adapter_name: str, config: LoraConfig, swapped_modules: dict) -> None:
    """Make the model's config of `adapter_name` describe the swapped-in adapter, so that saving
    and reloading give the same outputs (PEFT 0.21.2 keeps the old alpha and rank in the config).

    It takes the new adapter's r / lora_alpha / rank_pattern / alpha_pattern; where a layer's tensors
    keep a larger (padded) rank, its config rank becomes the tensor's and its alpha the one giving
    the same scaling -- through r / lora_alpha if every unpatterned layer agrees, else per-layer
    pattern entries."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config:
        return
    current = peft_config[adapter_name]
    if not isinstance(current, LoraConfig):
        return
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    r, lora_alpha = config.r, config.lora_alpha
    denom = math.sqrt if current.use_rslora else float  # scaling = alpha / denom(rank)
    fixes, unpatterned = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weights = module.lora_A if adapter_name in module.lora_A else module.lora_embedding_A
        if adapter_name not in weights:
            continue
        name = _relative_module_name(name)
        tensor = weights[adapter_name]
        rank = (tensor.weight if isinstance(tensor, torch.nn.Module) else tensor).shape[0]
        r_key, a_key = get_pattern_key(rank_pattern, name), get_pattern_key(alpha_pattern, name)
        if r_key not in rank_pattern and a_key not in alpha_pattern:
            unpatterned.append(name)
        cfg_rank, cfg_alpha = rank_pattern.get(r_key, r), alpha_pattern.get(a_key, lora_alpha)
        scaling = float(module.scaling[adapter_name])
        # layers the new adapter lacks were zeroed: only their rank matters
        scaling_ok = name not in swapped_modules or math.isclose(cfg_alpha / denom(cfg_rank), scaling, rel_tol=1e-6)
        if cfg_rank != rank or not scaling_ok:
            fixes[name] = (rank, scaling * denom(rank) if name in swapped_modules else cfg_alpha)
    added = {}
    if fixes and len(set(fixes.values())) == 1 and set(fixes) == set(unpatterned):
        r, lora_alpha = next(iter(fixes.values()))
    elif fixes:  # exact names first: get_pattern_key takes the first key that matches
        added = {re.escape(n): v for n, v in fixes.items()}
        rank_pattern = {**{k: v[0] for k, v in added.items()}, **{k: v for k, v in rank_pattern.items() if k not in added}}
        alpha_pattern = {**{k: v[1] for k, v in added.items()},
                         **{k: v for k, v in alpha_pattern.items() if k not in added}}
    current.r, current.lora_alpha = r, lora_alpha
    current.rank_pattern, current.alpha_pattern = rank_pattern, alpha_pattern
    # remembered (not saved) so that the next hot-swap's alpha_pattern check ignores these entries
    current._hotswap_pattern_keys = set(added)


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise ValueError unless two configs can be hot-swapped (same PEFT type, LoRA only, and equal
    `use_rslora`, `lora_dropout`, `alpha_pattern` and `use_dora`)."""
    if config0.peft_type != config1.peft_type:
        msg = f"Incompatible PEFT types found: {config0.peft_type.value} and {config1.peft_type.value}"
        raise ValueError(msg)

    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        msg = (
            f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK.keys())} but "
            f"{config0.peft_type.value} was passed."
        )
        raise ValueError(msg)
    config_keys_to_check = CONFIG_KEYS_TO_CHECK[config0.peft_type]

    # alpha_pattern entries written by a previous hot-swap (padded layers) are not the user's
    synced = getattr(config0, "_hotswap_pattern_keys", set())
    config0 = config0.to_dict()
    config1 = config1.to_dict()
    if synced and isinstance(config0.get("alpha_pattern"), dict):
        config0["alpha_pattern"] = {k: v for k, v in config0["alpha_pattern"].items() if k not in synced}
    sentinel = object()
    for key in config_keys_to_check:
        val0 = config0.get(key, sentinel)
        val1 = config1.get(key, sentinel)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


def hotswap_adapter(
    model: torch.nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Replace the weights (and scalings) of adapter `adapter_name` with those of the adapter saved at
    `model_name_or_path`, keeping its name and parameter objects. LoRA only.

    ```py
    model = PeftModel.from_pretrained(base_model, "path-adapter-0")
    prepare_model_for_compiled_hotswap(model, target_rank=16)   # only if ranks or alphas differ
    model = torch.compile(model)
    hotswap_adapter(model, "path-adapter-1", adapter_name="default", torch_device=device)
    ```

    Args:
        model ([`~PeftModel`]): the PEFT model with the loaded adapter (or its compiled wrapper).
        model_name_or_path (`str`): the local directory of the new adapter.
        adapter_name (`str`): the adapter to swap, e.g. `"default"`.
        torch_device (`str`, *optional*): where to load the new weights (default: the accelerator, else CPU).
        **kwargs: passed on when loading the config and the weights (e.g. `subfolder`).

    Raises:
        ValueError: incompatible configs (`check_hotswap_configs_compatible`), a merged adapter.
        RuntimeError: the new adapter targets modules the model lacks.
    """
    if torch_device is None:
        torch_device = infer_device()

    hf_kwargs = {
        "subfolder": kwargs.get("subfolder", None),
        "revision": kwargs.get("revision", None),
        "cache_dir": kwargs.get("cache_dir", None),
        "token": kwargs.get("token", None),
    }
    if use_auth_token := kwargs.get("use_auth_token", None):
        hf_kwargs["use_auth_token"] = use_auth_token
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[_get_peft_type(model_name_or_path, **hf_kwargs)]
    config = config_cls.from_pretrained(model_name_or_path, **kwargs)
    # config fields that change the output beyond what the state dict holds
    check_hotswap_configs_compatible(model.active_peft_config, config)

    state_dict = load_peft_weights(model_name_or_path, device=torch_device, **kwargs)

    parameter_prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    peft_model_state_dict = _insert_adapter_name_into_state_dict(
        state_dict, adapter_name=adapter_name, parameter_prefix=parameter_prefix
    )

    hotswap_adapter_from_state_dict(
        model=model,
        state_dict=peft_model_state_dict,
        adapter_name=adapter_name,
        parameter_prefix=parameter_prefix,
        config=config,
    )
