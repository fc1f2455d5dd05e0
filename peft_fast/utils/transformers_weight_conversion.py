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

4. MoE expert fusions (transformers v5 stores the experts of Mixtral, Qwen2-MoE, ... as one 3-d
   ``gate_up_proj`` (w1/gate_proj and w3/up_proj of every expert, MergeModulelist + Concatenate) and one
   ``down_proj`` (w2, MergeModulelist)): the per-expert LoRA factors of an adapter trained on the v4 layout
   are fused the same way, into the layout of peft_fast's `ParamWrapper` (PEFT's): lora_A
   ``(experts * r, in)`` expert-major, lora_B ``(out, r * experts)`` rank-major; for ``gate_up_proj`` the
   two projections' A factors are concatenated along the rank and their B factors put block-diagonally,
   so each keeps its own rank (``W01 + [B0 0; 0 B1] @ [A0; A1] = [W0 + B0 A0; W1 + B1 A1]``).

`convert_peft_config_for_transformers` rewrites a LoRA config written for the v4 layout (``target_modules``
naming w1/w2/w3, gate_proj/up_proj/down_proj of the experts, the router ``gate``) into ``target_parameters``
of the fused parameters, doubling rank and alpha of ``gate_up_proj`` (two fused projections, same scale);
every tuner calls it when injecting into a transformers model, as PEFT does.

`convert_peft_adapter_state_dict_for_transformers` does the same fusion of the factors on a checkpoint
state dict, for loaders that do not go through transformers (`PeftModel.from_pretrained`, `load_adapter`).

Errors: ValueError when a config targets only one of two fused projections; NotImplementedError for a
regex ``target_modules`` that names fused experts (give the names as a list).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from .constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, PEFT_TYPE_TO_PREFIX_MAPPING

__all__ = ["build_peft_weight_mapping", "convert_peft_adapter_state_dict_for_transformers",
           "convert_peft_config_for_transformers"]


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


def _leaf_names(conversion) -> list[str]:
    """The module names of a fusion's sources, in order: ['.experts.*.w1.weight', '.experts.*.w3.weight'] ->
    ['w1', 'w3']."""
    leaves = []
    for pattern in conversion.source_patterns:
        parts = [p for p in pattern.split(".") if p]
        if len(parts) >= 2 and parts[-2] not in leaves:
            leaves.append(parts[-2])
    return leaves


_OPS: dict[str, type] = {}


def _ops() -> dict[str, type]:
    """The conversion ops (transformers' ConversionOps subclasses, built on first use: transformers v5 only)."""
    if _OPS:
        return _OPS
    import torch
    from transformers.core_model_loading import Concatenate, ConversionOps

    def _ordered(input_dict, source_patterns):
        extra = set(input_dict) - set(source_patterns)
        if extra:
            raise ValueError(f"LoRA expert fusion got tensors for {sorted(extra)}, not among {source_patterns}")
        return [input_dict[p] for p in source_patterns if p in input_dict]

    class LoraBlockDiagConcatenate(Concatenate):
        """The B factors of fused projections, block-diagonally: 2-d (out, r) each -> (n*out, n*r); 3-d
        (experts, out, r) each -> per expert (experts, n*out, n*r), then laid out as (n*out, n*r*experts)
        rank-major (ParamWrapper's lora_B)."""

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            tensors = [t if isinstance(t, torch.Tensor) else torch.stack(t) for t in _ordered(input_dict, source_patterns)]
            for p in source_patterns:
                input_dict.pop(p, None)
            ndims = {t.dim() for t in tensors}
            target = self.get_target_pattern(target_patterns)
            if ndims == {2}:
                return {target: torch.block_diag(*tensors)}
            if ndims != {3} or len({t.shape[0] for t in tensors}) != 1:
                raise ValueError(f"LoRA B factors to fuse must all be 2-d or all 3-d with the same number of experts, "
                                 f"got shapes {[tuple(t.shape) for t in tensors]}")
            per_expert = torch.stack([torch.block_diag(*(t[e] for t in tensors)) for e in range(tensors[0].shape[0])])
            # (experts, n*out, n*r) -> (n*r, experts, n*out) -> (n*r*experts, n*out) -> (n*out, n*r*experts)
            return {target: per_expert.permute(2, 0, 1).flatten(0, 1).T.contiguous()}

        @property
        def reverse_op(self):
            raise NotImplementedError("Reversing the LoRA expert fusion (LoraBlockDiagConcatenate) is not supported.")

    class _Reshape(ConversionOps):
        def __init__(self, dims):
            self.dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)

        def __repr__(self):
            return f"{type(self).__name__}(dims={self.dims})"

        @property
        def reverse_op(self):
            raise NotImplementedError(f"Reversing {type(self).__name__} is not supported.")

    class FlattenDims(_Reshape):
        """Flatten each tensor from dims[0] to dims[1]."""

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            return {k: v.flatten(*self.dims) for k, v in input_dict.items()}

    class PermuteDims(_Reshape):
        """Permute the dimensions of each tensor."""

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            return {k: v.permute(*self.dims) for k, v in input_dict.items()}

    _OPS.update(LoraBlockDiagConcatenate=LoraBlockDiagConcatenate, FlattenDims=FlattenDims, PermuteDims=PermuteDims)
    return _OPS


def _expert_lora_converters(conversion, fused: str, adapter_name: str) -> list[Any]:
    """For one expert fusion of the base model, the converters of its LoRA factors (lora_A and lora_B).

    Sources: the per-expert factors (``.experts.*.w1.lora_A.*``); target: the ParamWrapper's factor
    (``gate_up_proj`` is the inner wrapper, reached as ``base_layer``; ``down_proj`` the outer one)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    ops = _ops()
    target = conversion.target_patterns[0]
    if fused == "gate_up_proj":
        target = target.replace("gate_up_proj", "base_layer")
    else:
        target = target.replace(".down_proj", "")
    converters = []
    for factor in ("lora_A", "lora_B"):
        steps = []
        for op in conversion.operations:
            if isinstance(op, MergeModulelist):
                steps.append(op)  # per-expert factors -> (experts, ...)
                if fused == "down_proj":
                    if factor == "lora_A":
                        steps.append(ops["FlattenDims"]((0, 1)))  # (experts, r, in) -> (experts*r, in)
                    else:  # (experts, out, r) -> (out, r*experts), rank-major
                        steps += [ops["PermuteDims"]((2, 0, 1)), ops["FlattenDims"]((0, 1)), Transpose(dim0=0, dim1=1)]
            elif isinstance(op, Concatenate) and fused == "gate_up_proj":
                if factor == "lora_A":  # (experts, r, in) x n -> (experts, n*r, in) -> (experts*n*r, in)
                    steps += [op, ops["FlattenDims"]((0, 1))]
                else:
                    steps.append(ops["LoraBlockDiagConcatenate"](dim=op.dim))
        if not steps:
            continue
        sources = [f"{pattern.rsplit('.', 1)[0]}.{factor}.*" for pattern in conversion.source_patterns]
        new = type(conversion)(source_patterns=sources, target_patterns=[f"{target}.{factor}.{adapter_name}.weight"],
                               operations=steps)
        new.distributed_operation = getattr(conversion, "distributed_operation", None)
        new.quantization_operation = getattr(conversion, "quantization_operation", None)
        converters.append(new)
    return converters


def _expert_fusions(conversions) -> dict[str, list[str]]:
    """{'gate_up_proj': ['w1', 'w3'], 'down_proj': ['w2']} from a model's conversion list (empty: none)."""
    fusions: dict[str, list[str]] = {}
    for conversion in conversions or ():
        fused = _fused_expert_conversion(conversion)
        if fused is not None:
            fusions.setdefault(fused, [])
            fusions[fused] += [leaf for leaf in _leaf_names(conversion) if leaf not in fusions[fused]]
    return fusions


def _router_is_parameter(model) -> bool:
    """transformers v5 routers ('...mlp.gate') are modules holding a `weight` parameter, not nn.Linear."""
    from torch import nn

    for name, module in model.named_modules():
        if name.endswith(".gate") and not isinstance(module, nn.Linear) and \
                isinstance(getattr(module, "weight", None), nn.Parameter):
            return True
    return False


def convert_peft_config_for_transformers(peft_config, model, conversions: Optional[list[Any]] = None) -> None:
    """Rewrite, in place, a LoRA config written for transformers v4's per-expert MoE layout to target v5's
    fused expert parameters (module docstring). A no-op for other methods, non-transformers models and
    models without expert fusions. `conversions`: the model's conversion list (looked up when None)."""
    if _type_key(getattr(peft_config, "peft_type", None)) != "LORA":
        return
    if not hasattr(getattr(model, "config", None), "model_type"):
        return
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ImportError:  # transformers v4: nothing was fused
            return
        conversions = get_model_conversion_mapping(model)
    fusions = _expert_fusions(conversions)
    if not fusions:
        return
    old_to_new = {old: new for new, olds in fusions.items() for old in olds}
    if _router_is_parameter(model):
        old_to_new.setdefault("gate", "gate.weight")

    targets = peft_config.target_modules
    if isinstance(targets, str):
        if targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            from ..tuners.tuners_utils import _maybe_include_all_linear_layers
            import copy

            resolved = _maybe_include_all_linear_layers(copy.copy(peft_config), model).target_modules
            targets = {name.rsplit(".", 1)[-1] for name in resolved} | set(old_to_new)
        else:
            named = [f"x.{old}" for old in old_to_new] + [f"experts.0.{old}" for old in old_to_new]
            if any(re.fullmatch(targets, key) or re.search(targets, key) for key in named):
                raise NotImplementedError(
                    f"peft_fast does not resolve the regex target_modules={targets!r} against the MoE experts that "
                    f"transformers v5 fuses ({', '.join(f'{o} -> {n}' for o, n in old_to_new.items())}); list the "
                    "module names instead")
            return

    new_params = set(peft_config.target_parameters or [])
    remaining = set()
    present: dict[str, set[str]] = {new: set() for new in fusions}
    for target in targets or ():
        old = next((o for o in old_to_new if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.add(target)
            continue
        new_params.add(old_to_new[old])
        if old_to_new[old] in present:
            present[old_to_new[old]].add(old)
    for new, olds in fusions.items():
        got = present[new]
        if got and len(got) < len(olds):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(got))} without also targeting "
                             f"{', '.join(sorted(set(olds) - got))} because they are fused into {new}.")
        if len(olds) > 1 and len(got) == len(olds):
            key = rf".*\.{re.escape(new)}"
            peft_config.rank_pattern = dict(peft_config.rank_pattern or {})
            peft_config.alpha_pattern = dict(peft_config.alpha_pattern or {})
            peft_config.rank_pattern[key] = peft_config.r * len(olds)
            peft_config.alpha_pattern[key] = peft_config.lora_alpha * len(olds)
    if new_params == set(peft_config.target_parameters or []):
        return  # nothing targeted the experts or the router
    peft_config.target_parameters = sorted(new_params)
    peft_config.target_modules = remaining


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
        mapping.extend(_expert_lora_converters(conversion, fused, adapter_name))
    return mapping


def _fuse_factor(per_leaf: list, factor: str):
    """Per-expert LoRA factors of the fused projections -> the ParamWrapper's factor.

    `per_leaf`: for each fused projection (source order), its experts' factors in expert order. lora_A
    (r, in) each -> (experts * n*r, in), expert-major; lora_B (out, r) each -> per expert block-diagonal
    (n*out, n*r), laid out (n*out, n*r * experts) rank-major. n=1 (down_proj) is the same formula."""
    import torch

    stacked = [torch.stack(tensors) for tensors in per_leaf]  # (experts, r, in) / (experts, out, r)
    if factor == "lora_A":
        return torch.cat(stacked, dim=1).flatten(0, 1)
    experts = stacked[0].shape[0]
    per_expert = torch.stack([torch.block_diag(*(t[e] for t in stacked)) for e in range(experts)])
    return per_expert.permute(2, 0, 1).flatten(0, 1).T.contiguous()


def convert_peft_adapter_state_dict_for_transformers(model, peft_config, adapter_state_dict: dict,
                                                     adapter_name: str = "default") -> dict:
    """A LoRA checkpoint state dict (PEFT's serialized keys) of transformers v4's per-expert MoE layout, with
    the experts' factors fused for v5's ``gate_up_proj``/``down_proj`` (module docstring) and the model's own
    key renamings (``block_sparse_moe`` -> ``mlp``) applied to the LoRA keys. Unchanged for other methods,
    non-transformers models, models without expert fusions and checkpoints already in the v5 layout."""
    if _type_key(getattr(peft_config, "peft_type", None)) != "LORA":
        return adapter_state_dict
    if not hasattr(getattr(model, "config", None), "model_type"):
        return adapter_state_dict
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return adapter_state_dict
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    conversions = get_model_conversion_mapping(base)
    fusions = [(c, _fused_expert_conversion(c)) for c in conversions or ()]
    fusions = [(c, f) for c, f in fusions if f is not None]
    if not fusions:
        return adapter_state_dict
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    prefix = "base_model.model."

    def rename(key: str) -> str:
        for r in renamings:
            key, _ = r.rename_source_key(key)
        return key

    # '<module>.experts.<e>.<leaf>.<lora_A|lora_B>.weight', one pattern per fusion
    matchers = []
    for conversion, fused in fusions:
        leaves = _leaf_names(conversion)
        container = conversion.source_patterns[0].rsplit(".", 1)[0]  # '.experts.*.w1'
        container = container[: container.index("*")].rstrip(".")  # '.experts'
        pattern = re.compile(rf"^(?P<mod>.*?){re.escape(container.lstrip('.'))}\.(?P<e>\d+)\.(?P<leaf>"
                             rf"{'|'.join(map(re.escape, leaves))})\.(?P<factor>lora_A|lora_B)\.weight$")
        target_leaf = conversion.target_patterns[0].rsplit(".", 1)[0].split(".")[-1]  # 'experts'
        matchers.append((pattern, leaves, fused, target_leaf))

    out, groups = {}, {}
    for key, value in adapter_state_dict.items():
        if ".lora_" not in key:
            out[key] = value
            continue
        had_prefix = key.startswith(prefix)
        bare = key[len(prefix):] if had_prefix else key
        for pattern, leaves, fused, target_leaf in matchers:
            m = pattern.match(bare)
            if m is None:
                continue
            wrapper = rename(f"{m['mod']}{target_leaf}")
            if fused == "gate_up_proj":
                wrapper += ".base_layer"  # the inner ParamWrapper (PEFT's layout)
            group = groups.setdefault((had_prefix, wrapper, m["factor"]), {"leaves": leaves, "t": {}})
            group["t"].setdefault(m["leaf"], {})[int(m["e"])] = value
            break
        else:
            out[(prefix if had_prefix else "") + rename(bare)] = value
    for (had_prefix, wrapper, factor), group in groups.items():
        missing = [leaf for leaf in group["leaves"] if leaf not in group["t"]]
        if missing:
            raise ValueError(f"Cannot fuse the LoRA weights of {wrapper}: the checkpoint has no {factor} for "
                             f"{', '.join(missing)} (fused with {', '.join(group['t'])}).")
        experts = sorted(group["t"][group["leaves"][0]])
        per_leaf = []
        for leaf in group["leaves"]:
            if sorted(group["t"][leaf]) != experts or experts != list(range(len(experts))):
                raise ValueError(f"Cannot fuse the LoRA weights of {wrapper}: experts {sorted(group['t'][leaf])} "
                                 f"of {leaf} are not 0..{len(experts) - 1}.")
            per_leaf.append([group["t"][leaf][e] for e in experts])
        out[f"{prefix if had_prefix else ''}{wrapper}.{factor}.weight"] = _fuse_factor(per_leaf, factor)
    return out
