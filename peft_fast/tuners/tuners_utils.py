"""Shared tuner machinery (L3): target matching, module injection, adapter bookkeeping.

`BaseTunerLayer` is the mixin of every adapter layer; `BaseTuner` wraps the user's model,
replaces targeted modules and implements merge/unload/enable/disable/delete with PEFT's
semantics and names.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._buffer_dict import BufferDict
from ..config import PeftConfig
from ..utils.error import NoMatchingPeftModuleError
from ..utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from ..utils.other import AdapterStateMixin, AuxiliaryTrainingWrapper, ModulesToSaveWrapper, _get_submodules, get_conv1d_cls, set_trainable
from ..utils.trainable_tokens import set_trainable_token_indices


class _ExcludedModule:
    """Result of target matching for a module excluded on purpose (falsy)."""

    def __bool__(self):
        return False


def check_target_module_exists(config, key: str) -> Union[bool, "re.Match[str]", None]:
    """Whether module `key` is targeted by `config` (PEFT's rules: list = exact name or
    suffix after a dot, str = full regex match; exclude_modules; layers_to_transform)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _ExcludedModule()
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _ExcludedModule()
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return _ExcludedModule()
    targets = config.target_modules
    if targets is None and getattr(config, "target_parameters", None) is not None:
        return False  # only parameters are targeted
    if isinstance(targets, str):
        return re.fullmatch(targets, key)
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layer_indexes = getattr(config, "layers_to_transform", None)
    layers_pattern = getattr(config, "layers_pattern", None)
    using_indexes = layer_indexes is not None and (len(layer_indexes) != 0 if isinstance(layer_indexes, list) else True)
    if using_indexes and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        found = idx == layer_indexes if isinstance(layer_indexes, int) else idx in layer_indexes
    return found


def _maybe_include_all_linear_layers(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Expand target_modules='all-linear' to every Linear/Conv1D except the output head."""
    targets = getattr(config, "target_modules", None)
    if not (isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return config
    conv1d = get_conv1d_cls()
    classes = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    names = {n for n, m in model.named_modules() if isinstance(m, classes)}
    names |= {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "Linear" in type(m).__name__}
    exclude = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        exclude |= {n for n, m in model.named_modules() if m is out_emb}
    elif str(getattr(config, "task_type", None) or "").endswith("SEQ_CLS"):
        for head in SEQ_CLS_HEAD_NAMES:
            mod = getattr(model, head, None)
            if mod is not None:
                exclude |= {n for n, m in model.named_modules() if m is mod}
                break
    for prefix, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            exclude |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
    config.target_modules = names - exclude
    return config


def check_adapters_to_merge(module: "BaseTunerLayer", adapter_names: Optional[list[str]] = None) -> list[str]:
    if adapter_names is None:
        adapter_names = module.active_adapters
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    if module.merged:
        merged = set(module.merged_adapters)
        adapter_names = [n for n in adapter_names if n not in merged]
        if not adapter_names:
            warnings.warn(f"All adapters are already merged, nothing to do. Merged: {sorted(merged)}")
    return adapter_names


class BaseTunerLayer(AdapterStateMixin):
    """Mixin of every adapter layer: adapter bookkeeping shared by LoRA and IA3."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _active_adapter: Union[str, list[str]] = "default"
    merged_adapters: list[str] = []

    def get_base_layer(self) -> nn.Module:
        base = self
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _adapter_dicts(self):
        for name in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, name, None)
            if isinstance(d, (dict, nn.ModuleDict, nn.ParameterDict, BufferDict)):
                yield name, d

    def adapter_items(self, adapter_name: str):
        """(layer_name, module or Parameter) of one adapter on this layer, e.g. ('lora_A', Linear);
        also (name, buffer) of the persistent BufferDicts among `other_param_names` (VeLoRA's
        projection), which PEFT saves with the adapter."""
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name, None)
            if d is not None and adapter_name in d:
                yield layer_name, d[adapter_name]
        for name in self.other_param_names:
            d = getattr(self, name, None)
            if isinstance(d, BufferDict) and d.persistent and adapter_name in d:
                yield name, d[adapter_name]

    def _all_available_adapter_names(self) -> list[str]:
        """Sorted names of the adapters this layer holds (PEFT's order: a deleted active adapter is
        replaced by the first of these)."""
        names = set()
        for _, d in self._adapter_dicts():
            names.update(d.keys())
        return sorted(names)

    def _set_adapter_grad(self, names: set[str], requires_grad: bool, only_in: bool = True) -> None:
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name)
            for key, layer in d.items():
                if (key in names) == only_in:
                    if isinstance(layer, nn.Parameter):
                        layer.requires_grad_(requires_grad)
                    else:
                        layer.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._set_adapter_grad(set(names), not inference_mode, only_in=True)
        self._set_adapter_grad(set(names), False, only_in=False)
        self._active_adapter = names[0] if isinstance(adapter_names, str) else names

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self._set_adapter_grad(names, requires_grad, only_in=True)

    def _check_merge_supported(self, adapter_names: list[str]) -> None:
        """Raise before anything is merged if this layer cannot merge `adapter_names`."""

    def delete_adapter(self, adapter_name: str) -> None:
        for _, d in self._adapter_dicts():
            if adapter_name in d:
                del d[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining:
                remaining = self._all_available_adapter_names()[:1]
                if remaining:
                    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                                  f"to {remaining[0]}.")
            if remaining:
                self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)
            else:
                self._active_adapter = []

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        w = getattr(base, "weight", None)
        if w is None:
            return
        device, dtype = w.device, w.dtype
        floating = dtype.is_floating_point
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name, None)
            if d is None or adapter_name not in d:
                continue
            target = d[adapter_name]
            if isinstance(target, nn.Parameter):
                target.data = target.data.to(device, dtype=dtype if floating else None)
            else:
                d[adapter_name] = target.to(device, dtype=dtype) if floating else target.to(device)

    def _write_merged(self, adapter: str, new_w: torch.Tensor, new_b: Optional[torch.Tensor] = None,
                      safe_merge: bool = False) -> None:
        """Store merged base weights (checked first under safe_merge) and record the merge."""
        if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base = self.get_base_layer()
        self._set_base_weight_data(new_w)
        if new_b is not None:
            base.bias.data = new_b.to(base.bias.dtype)
        self.merged_adapters.append(adapter)

    def _base_weight_data(self) -> torch.Tensor:
        """The base weight as a dense tensor (quantized layers dequantize here)."""
        return self.get_base_layer().weight.data

    def _set_base_weight_data(self, new_w: torch.Tensor) -> None:
        """Store a dense base weight (quantized layers quantize it again here)."""
        w = self.get_base_layer().weight
        w.data = new_w.to(w.dtype)

    def _pop_merged(self):
        """Yield the merged adapters, last merged first, removing them from the record."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            yield self.merged_adapters.pop()

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x is None or not getattr(self, "cast_input_dtype_enabled", True) or x.dtype == dtype:
            return x
        return x.to(dtype=dtype)


def _adapter_to_meta(model: nn.Module, adapter_name: str) -> None:
    """low_cpu_mem_usage: the new adapter's tensors become empty meta tensors (same requires_grad),
    to be replaced by the loaded ones (load_state_dict(assign=True)), as PEFT's init_empty_weights."""
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for _, item in layer.adapter_items(adapter_name):
            modules = [item] if isinstance(item, nn.Module) else []
            for m in (sub for mod in modules for sub in mod.modules()):
                for name, p in list(m._parameters.items()):
                    if p is not None and p.device.type != "meta":
                        m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            if isinstance(item, nn.Parameter) and item.device.type != "meta":
                for d_name, d in layer._adapter_dicts():
                    if isinstance(d, nn.ParameterDict) and d.get(adapter_name) is item:
                        d[adapter_name] = nn.Parameter(item.to("meta"), requires_grad=item.requires_grad)


class BaseTuner(nn.Module):
    """Wraps a model, injects adapter layers into the targeted modules and manages them."""

    # whether the tuner keeps adapter state shared between layers (PEFT's flag; none here does)
    uses_shared_state: bool = False
    prefix: str = ""
    tuner_layer_cls: type = BaseTunerLayer
    target_module_mapping: dict = {}

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict] = None) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        if not hasattr(self, "peft_config"):  # (found on the model too: a model PEFT already modified)
            self.peft_config = {adapter_name: peft_config} if isinstance(peft_config, PeftConfig) else peft_config
        else:
            warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                          "adapters in the model. Make sure to know what you are doing!")
            if isinstance(peft_config, PeftConfig):
                self.peft_config[adapter_name] = peft_config
            else:
                self.peft_config.update(peft_config)
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.training = model.training  # the wrapper reports the base model's mode (not recursive)
        self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.model.peft_config = self.peft_config

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else a

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- injection ---------------------------------------------------------------------------
    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        cfg = getattr(model, "config", None)
        if cfg is None:
            return {"model_type": "custom"}
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            # the table may be patched by users (or tests) with a str (a regex) as well as a list
            target_modules = self.target_module_mapping.get(model_type)
            if target_modules is None:
                raise ValueError(
                    f"Please specify `target_modules` in `peft_config`: no default is known for model_type {model_type!r}"
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast the fp16/bf16 (and float8) weights of `adapter_name` to fp32 (PEFT's helper)."""
        cast_adapter_dtype(self.model, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        pass

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key):
        raise NotImplementedError

    def _inject_parameters(self, peft_config, model: nn.Module, adapter_name: str) -> list[str]:
        """Adapt the parameters named by `peft_config.target_parameters`; returns the matched names."""
        raise ValueError(f"{type(self).__name__} does not support `target_parameters`")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        if hasattr(getattr(model, "config", None), "model_type"):
            # transformers v5 fused the MoE experts of some models (Mixtral, Qwen2-MoE, ...): a config naming
            # the v4 per-expert modules is rewritten in place to target the fused parameters, as in PEFT
            from ..utils.transformers_weight_conversion import convert_peft_config_for_transformers

            convert_peft_config_for_transformers(self.peft_config[adapter_name], model=model)
        peft_config = self.peft_config[adapter_name]
        self._check_new_adapter_config(peft_config)
        peft_config = self._prepare_adapter_config(peft_config, self.get_model_config(model))
        named = list(model.named_modules())
        existing = [k + "." for k, m in named if isinstance(m, BaseTunerLayer)]
        # adding an adapter never changes the trainability of what was already there (other adapters,
        # their modules_to_save copies, the base model); only the first adapter freezes the base model
        prior_grads = [(p, p.requires_grad) for p in model.parameters()] if existing else []
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        if getattr(peft_config, "target_parameters", None) and state_dict:
            raise ValueError(
                "Trying to inject a PEFT adapter from a state_dict but the PEFT config uses `target_parameters`. This "
                "is not supported -- when using `target_parameters`, please inject the adapter without the state_dict."
            )
        from_state = None
        if state_dict is not None:
            from_state = {k.rsplit("." + self.prefix, 1)[0] for k in state_dict}
        excluded, matched = [], []
        for key, module in named:
            if not key or any(key.startswith(p) for p in existing):
                continue
            if (isinstance(module, AuxiliaryTrainingWrapper) or ".modules_to_save." in key or ".original_module" in key
                    or ".token_adapter" in key):
                continue
            result = (key in from_state) if from_state is not None else check_target_module_exists(peft_config, key)
            if isinstance(result, _ExcludedModule):
                excluded.append(key)
            elif result:
                matched.append(key)
                parent, target, target_name = _get_submodules(model, key)
                self._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=key)
        matched_params = []
        if getattr(peft_config, "target_parameters", None):
            matched_params = self._inject_parameters(peft_config, model, adapter_name)
        if not matched and not matched_params:
            targets = peft_config.target_modules
            if not excluded and not targets:
                raise NoMatchingPeftModuleError(
                    "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                    "these arguments."
                )
            if excluded:
                raise NoMatchingPeftModuleError(
                    f"All modules were excluded. Target modules {sorted(targets) if isinstance(targets, set) else targets!r}"
                    f" and exclude_modules {getattr(peft_config, 'exclude_modules', None)!r} leave nothing to adapt."
                )
            raise NoMatchingPeftModuleError(
                f"Target modules {sorted(targets) if isinstance(targets, set) else targets!r} not found in the base "
                f"model. Please check the target modules and try again."
            )
        self.targeted_module_names.extend(k for k in matched if k not in self.targeted_module_names)
        if peft_config.target_modules and not matched:
            warnings.warn(f"target_modules={peft_config.target_modules} were set but no module was matched.",
                          RuntimeWarning)
        elif getattr(peft_config, "target_parameters", None) and not matched_params:
            warnings.warn(f"target_parameters={peft_config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning)
        self.targeted_parameter_names.extend(k for k in matched_params if k not in self.targeted_parameter_names)
        # the new adapter's modules follow their layer's train/eval mode (a dropout created in
        # train mode inside an eval model would make inference random)
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                for _, d in m._adapter_dicts():
                    item = d[adapter_name] if adapter_name in d else None
                    if isinstance(item, nn.Module):
                        item.train(m.training)
        self.set_adapter(self.active_adapter, inference_mode=peft_config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_trainable(model, adapter_name, getattr(peft_config, "modules_to_save", None),
                      inference_mode=peft_config.inference_mode, activate_adapter=adapter_name in self.active_adapters)
        set_trainable_token_indices(model, peft_config, self.get_model_config(model), adapter_name,
                                    activate_adapter=adapter_name in self.active_adapters)
        for p, requires_grad in prior_grads:
            p.requires_grad = requires_grad
        if low_cpu_mem_usage:
            _adapter_to_meta(model, adapter_name)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        # the adapter layer takes the train/eval mode of the module it wraps (the base layer keeps its own)
        for name, sub in new_module.named_modules():
            if not name.startswith("base_layer"):
                sub.training = child.training
        base = child.base_layer if hasattr(child, "base_layer") else child
        weight = getattr(base, "weight", None)
        if weight is None:
            return
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(weight.device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # adapter parameters are found structurally, not by name: a base module whose name contains
        # the prefix ("lora_proj") is frozen too; modules_to_save copies manage their own requires_grad
        keep = set()
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                for _, d in m._adapter_dicts():
                    if isinstance(d, nn.Module):
                        keep.update(id(p) for p in d.parameters())
            elif isinstance(m, ModulesToSaveWrapper):
                keep.update(id(p) for p in m.modules_to_save.parameters())
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad = False
        for active in self.active_adapters:
            bias = getattr(self.peft_config[active], "bias", "none")
            if bias == "none":
                continue
            if bias == "all":
                for n, p in model.named_parameters():
                    if n == "bias" or n.endswith(".bias"):
                        p.requires_grad = True
            elif bias.endswith("_only"):
                for m in model.modules():
                    if isinstance(m, self.tuner_layer_cls) and getattr(m, "bias", None) is not None:
                        m.bias.requires_grad = True
            else:
                raise NotImplementedError(f"Requested bias: {bias!r}, is not implemented.")

    # ---- adapter management ------------------------------------------------------------------
    def _tuner_layers(self):
        return [m for m in self.model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for m in self._tuner_layers():
            m.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for active in self.active_adapters:
            if getattr(self.peft_config[active], "bias", "none") != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be "
                    f"'{self.peft_config[active].bias}' does not produce the same output as the base model would "
                    "without adaption."
                )
        self._enable_adapter_layers(False)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found. Available adapters: {sorted(self.peft_config)}")
        for m in self.model.modules():  # every check before any layer switches
            if isinstance(m, AuxiliaryTrainingWrapper):
                m.check_set_adapter(adapter_name)
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                if m.merged:
                    warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                    m.unmerge()
                m.set_adapter(adapter_name, inference_mode=inference_mode)
            elif isinstance(m, AuxiliaryTrainingWrapper):
                m.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable or disable gradients on the given adapter(s) (their layers and modules_to_save
        copies); other adapters are left as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known_adapters(names, "adapter_names")
        set_requires_grad(self.model, names, requires_grad=requires_grad)

    def _check_known_adapters(self, adapter_names, arg: str = "adapter_names") -> None:
        """ValueError naming the unknown adapter(s) and the known ones (PEFT skips them silently)."""
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise ValueError(f"{arg} should be a list of strings, got {adapter_names!r}.")
        unknown = [a for a in adapter_names if a not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown} in `{arg}`. Available adapters: {sorted(self.peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        _check_adapters_not_merged(self.model, adapter_name)
        del self.peft_config[adapter_name]
        new_active: list[str] = []
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                m.delete_adapter(adapter_name)
                new_active = new_active or m.active_adapters
        if not new_active:
            new_active = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        for m in self.model.modules():
            if isinstance(m, AuxiliaryTrainingWrapper):
                m.delete_adapter(adapter_name, new_active)
        self.active_adapter = new_active[0] if len(new_active) == 1 else new_active

    def _check_merge_allowed(self) -> None:
        pass

    def _check_merge_inputs(self, adapter_names: Optional[list[str]]) -> None:
        """Every check a merge needs, before any weight changes: no half-merged model on bad input."""
        self._check_merge_allowed()
        self._check_known_adapters(adapter_names)
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                m._check_merge_supported(m.active_adapters if adapter_names is None else list(adapter_names))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_inputs(adapter_names)
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer) and m.merged:
                m.unmerge()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge_inputs(adapter_names)
        keys = [k for k, _ in self.model.named_modules() if self.prefix not in k]
        for key in _progress(keys, progressbar, "Unloading " + ("and merging " if merge else "") + "model"):
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BaseTunerLayer) and hasattr(target, "unload_and_optionally_merge_module"):
                # layers with their own unloading (MultiheadAttention unwraps its out_proj too)
                setattr(parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
            elif isinstance(target, BaseTunerLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, target_name, target.get_base_layer())
            elif isinstance(target, AuxiliaryTrainingWrapper):
                setattr(parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
        for attr in ("peft_config",):
            if attr in self.model.__dict__:
                del self.model.__dict__[attr]
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model."""
        return self._unload_and_optionally_merge(merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                 adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer and return the original base model, unchanged."""
        return self._unload_and_optionally_merge(merge=False)


def _check_adapters_not_merged(model: nn.Module, adapter_names: Union[str, Sequence[str]]) -> None:
    """A merged adapter lives in the base weights: deleting it would leave them changed for good."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    merged = {a for m in model.modules() if isinstance(m, BaseTunerLayer) for a in m.merged_adapters}
    still_merged = sorted(set(names) & merged)
    if still_merged:
        raise ValueError(f"Cannot delete adapter(s) {still_merged} while they are merged. Please unmerge them first.")


# float8 dtypes are upcast too; only those this torch build has
_UPCAST_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """PEFT's autocast_adapter_dtype: every fp16/bf16/float8 tensor of `adapter_name` held by a
    tuner layer's ModuleDict/ParameterDict/BufferDict (lora_A, lora_B, lora_magnitude_vector, ia3_l, ...)
    becomes fp32; fp32/fp64 and integer tensors are left alone. Parameters are cast in place, so
    they keep their identity (optimizers, hooks) and their requires_grad."""
    if not autocast_adapter_dtype:
        return
    to_fp32 = {torch.float16, torch.bfloat16}
    to_fp32.update(d for d in (getattr(torch, n, None) for n in _UPCAST_DTYPES) if d is not None)
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for sub in module.modules():
            is_dict = isinstance(sub, (nn.ModuleDict, nn.ParameterDict)) or type(sub).__name__ == "BufferDict"
            if not is_dict or adapter_name not in sub:
                continue
            item = sub[adapter_name]
            if isinstance(item, torch.Tensor):
                params = [item]
            else:
                params = list(item.parameters())
            for p in params:
                if p.dtype in to_fp32:
                    p.data = p.data.to(torch.float32)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


# ---- PEFT's module-level functions (peft.functional): adapters on any nn.Module, no tuner wrapper ----------
def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]], inference_mode: bool = False,
                layer_cls: type = BaseTunerLayer) -> None:
    """Make `adapter_name` (a name or a list) the active adapter(s) of every adapter layer of `model`
    and of its auxiliary wrappers (modules_to_save, trainable tokens). A merged layer is unmerged first
    (with PEFT's warning); `inference_mode=True` freezes the activated adapters."""
    from ..utils.other import _set_adapter

    _set_adapter(model, adapter_name, inference_mode=inference_mode)
    for module in model.modules():
        if isinstance(module, layer_cls):
            if module.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                module.unmerge()
            module.set_adapter(adapter_name, inference_mode=inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str,
                   layer_cls: type = BaseTunerLayer) -> Optional[list[str]]:
    """Remove adapter `adapter_name` from every adapter layer and auxiliary wrapper of `model`.

    `prefix` is the method's parameter prefix (``"lora_"``, ``"ia3_"``): modules whose name contains
    it (the adapter's own sub-modules) are skipped. The config stored on the model is left alone, as
    in PEFT. Returns the adapters active after the deletion (None when no adapter layer was found).
    """
    new_active: Optional[list[str]] = None
    for key, module in model.named_modules():
        if prefix in key:
            continue
        if isinstance(module, layer_cls):
            module.delete_adapter(adapter_name)
            if new_active is None:
                new_active = list(module.active_adapters)
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.delete_adapter(adapter_name, new_active_adapters=new_active)
    return new_active


def set_requires_grad(model: nn.Module, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
    """Turn gradients of the given adapter(s) on (default) or off, in every adapter layer and auxiliary
    wrapper of `model`; other adapters are left as they are."""
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module.set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)
