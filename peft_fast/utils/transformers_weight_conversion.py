"""PEFT's ``peft.utils.transformers_weight_conversion``: how transformers (v5) maps the keys of a saved
adapter onto the adapter parameters of a model, in ``PreTrainedModel.load_adapter``.

transformers hands `build_peft_weight_mapping` the conversions it applies to the base model's own
checkpoint keys (`get_model_conversion_mapping(model)`: legacy renamings such as ``LayerNorm.gamma`` ->
``LayerNorm.weight`` and, for some MoE models, the fusion of per-expert weights) and loads the adapter file
through the list returned:

1. ``base_model.model.model.`` -> ``model.`` and ``base_model.model.`` -> ``""``: a saved adapter's keys
   carry PeftModel's prefix, the model's own keys do not;
2. the method's parameter prefix gets the adapter name: ``...q_proj.lora_A.weight`` ->
   ``...q_proj.lora_A.<adapter>.weight``, ``...k_proj.ia3_l`` -> ``...k_proj.ia3_l.<adapter>``;
3. the model's own renamings, unchanged.

MoE expert fusions (``gate_up_proj`` built by Concatenate + MergeModulelist, ``down_proj`` by
MergeModulelist: Mixtral, Qwen2-MoE, ...) need the LoRA factors of the experts fused the same way and
the adapter config rewritten to target the fused parameters; peft_fast does not do that conversion.
An adapter whose config targets those experts raises NotImplementedError naming the conversion; one
that does not (e.g. attention-only LoRA on Mixtral) loads, the expert fusions never touching its keys.

Errors: NotImplementedError as above.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from .constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, PEFT_TYPE_TO_PREFIX_MAPPING

__all__ = ["build_peft_weight_mapping"]


def _type_key(peft_type) -> Optional[str]:
    if peft_type is None:
        return None
    return getattr(peft_type, "value", peft_type)


def _adapter_prefixes(peft_config) -> list[str]:
    """The parameter prefix of `peft_config`'s method, or every method's where it is not known."""
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(_type_key(getattr(peft_config, "peft_type", None)))
    return [prefix] if prefix else sorted(set(PEFT_TYPE_TO_PREFIX_MAPPING.values()))


def _fused_expert_conversion(conversion) -> Optional[str]:
    """'gate_up_proj' / 'down_proj' for transformers' MoE expert fusions, None for anything else."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    targets = list(getattr(conversion, "target_patterns", ()))
    ops = getattr(conversion, "operations", ())
    if len(targets) != 1 or not any(isinstance(op, (Concatenate, MergeModulelist)) for op in ops):
        return None
    for name in ("gate_up_proj", "down_proj"):
        if targets[0].endswith(name):
            return name
    return None


def _leaf_names(conversion) -> set[str]:
    """The module names of a fusion's sources: '.experts.*.w1.weight' -> 'w1'."""
    leaves = set()
    for pattern in conversion.source_patterns:
        parts = [p for p in pattern.split(".") if p]
        if len(parts) >= 2:
            leaves.add(parts[-2])
    return leaves


def _config_targets(peft_config, names: set[str]) -> bool:
    """Whether `peft_config` (LoRA) would adapt modules or parameters called one of `names`."""
    if peft_config is None:
        return True  # unknown: refuse rather than silently skip expert weights
    if _type_key(getattr(peft_config, "peft_type", None)) != "LORA":
        return False  # PEFT converts LoRA only; other methods load without the fusions
    targets: list[str] = []
    for attr in ("target_modules", "target_parameters"):
        value = getattr(peft_config, attr, None)
        if value is None:
            continue
        if isinstance(value, str):
            if value.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
                return True
            if any(re.search(rf"(^|[^A-Za-z0-9_]){re.escape(n)}($|[^A-Za-z0-9_])", value) for n in names):
                return True
            continue
        targets.extend(value)
    return any(t == n or t.endswith(f".{n}") for t in targets for n in names)


def build_peft_weight_mapping(weight_conversions: Optional[list[Any]], adapter_name: str,
                              peft_config=None) -> list[Any]:
    """The WeightRenaming/WeightConverter list transformers loads an adapter's file with (module docstring).

    `weight_conversions` are the base model's conversions (empty or None: no mapping at all, as in PEFT);
    `adapter_name` is inserted after the method's prefix; `peft_config` picks the prefix (all methods'
    prefixes without it) and tells whether MoE expert fusions would have to be applied to it.
    """
    if not weight_conversions:
        return []
    from transformers.core_model_loading import WeightRenaming

    mapping: list[Any] = [
        WeightRenaming("base_model.model.model.", "model."),
        WeightRenaming("base_model.model.", ""),
    ]
    for prefix in _adapter_prefixes(peft_config):
        # 'lora_A' -> 'lora_A.<adapter>' ('lora_A.weight' -> 'lora_A.<adapter>.weight', 'ia3_l' -> 'ia3_l.<adapter>')
        mapping.append(WeightRenaming(source_patterns=rf"({re.escape(prefix)}[^\.]*)",
                                      target_patterns=rf"\1.{adapter_name}"))
    for conversion in weight_conversions:
        if isinstance(conversion, WeightRenaming):
            mapping.append(conversion)
            continue
        fused = _fused_expert_conversion(conversion)
        if fused is None:
            continue  # PEFT passes on only renamings and the two expert fusions
        leaves = _leaf_names(conversion)
        if _config_targets(peft_config, leaves):
            raise NotImplementedError(
                f"peft_fast does not convert LoRA weights of MoE experts fused by transformers into "
                f"`{conversion.target_patterns[0]}` (the `{fused}` conversion of {sorted(leaves)}: "
                f"{', '.join(type(op).__name__ for op in conversion.operations)}). Load this adapter with real "
                f"peft (peft_fast.uninstall_as_peft()), or target modules other than the experts.")
    return mapping
