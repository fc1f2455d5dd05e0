"""Module-tree helpers and the `modules_to_save` wrapper, with PEFT's names and key layout."""
from __future__ import annotations

import copy
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as stored by the layer -> W[out, in] (Conv1D stores W[in, out])."""
    return weight.T if fan_in_fan_out else weight


def get_conv1d_cls():
    """transformers' GPT-2 ``Conv1D`` class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional at run time
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = get_conv1d_cls()
    return cls is not None and isinstance(module, cls)


def _get_submodules(model: nn.Module, key: str):
    parent = model.get_submodule(".".join(key.split(".")[:-1]))
    target_name = key.split(".")[-1]
    target = model.get_submodule(key)
    return parent, target, target_name


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """First rank/alpha pattern that matches the end of the module name (PEFT semantics)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def set_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(requires_grad)


class ModulesToSaveWrapper(nn.Module):
    """Keeps `original_module` frozen and trains a per-adapter copy in `modules_to_save[name]`.

    State-dict keys: ``<name>.original_module.*`` and ``<name>.modules_to_save.<adapter>.*``;
    in saved adapters the copy is stored as ``<name>.*`` (PEFT's format).
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        if isinstance(module_to_save, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module_to_save)}")
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self._adapters: set[str] = set()
        self.update(adapter_name)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self):
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else a

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules")
        if modules is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        if self._disable_adapters or not self.active_adapters or self.active_adapters[0] not in modules["modules_to_save"]:
            return getattr(modules["original_module"], name)
        return getattr(modules["modules_to_save"][self.active_adapters[0]], name)

    def update(self, adapter_name: str, **kwargs) -> None:
        self._adapters.add(adapter_name)
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        set_requires_grad(self.original_module, False)
        if adapter_name in self.active_adapters:
            set_requires_grad(self.modules_to_save[adapter_name], True)

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        active = self.active_adapters
        if self._disable_adapters or not active or any(a not in self._adapters for a in active):
            return self.original_module(*args, **kwargs)
        if adapter_names is None:
            return self.modules_to_save[active[0]](*args, **kwargs)
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        results: list[Any] = [None] * len(x)
        for adapter in dict.fromkeys(adapter_names):
            idx = [i for i, a in enumerate(adapter_names) if a == adapter]
            mod = self.original_module if adapter == "__base__" else self.modules_to_save[adapter]
            out = mod(x[idx], *args, **kwargs)
            for k, i in enumerate(idx):
                results[i] = out[k]
        return torch.stack(results)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        for name, module in self.modules_to_save.items():
            set_requires_grad(module, enabled and name in self.active_adapters)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self._adapters]
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        if not names:
            self._active_adapter = []
            return
        for name, module in self.modules_to_save.items():
            set_requires_grad(module, name == names[0] and not inference_mode)
        self._active_adapter = names[0]

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        self._adapters.discard(adapter_name)
        remaining = [a for a in (new_active_adapters or []) if a in self.modules_to_save]
        self.set_adapter(remaining[:1])

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        if adapter_name not in self._adapters:
            return {}
        return {k: state_dict[f"modules_to_save.{adapter_name}.{k}"] for k in self.modules_to_save[adapter_name].state_dict()}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        if adapter_name not in self._adapters:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]


def set_trainable(model: nn.Module, adapter_name: str, module_names, inference_mode: bool) -> None:
    """Wrap every module whose name ends with one of `module_names` in a ModulesToSaveWrapper."""
    if not module_names:
        return
    from peft_fast.tuners.tuners_utils import BaseTunerLayer

    for key in [k for k, _ in model.named_modules(remove_duplicate=False)]:
        if not any(key.endswith(t) for t in module_names):
            continue
        parent, target, target_name = _get_submodules(model, key)
        if isinstance(parent, ModulesToSaveWrapper) or isinstance(parent, nn.ModuleDict):
            continue
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"modules_to_save cannot be applied to the adapter layer {key!r}")
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapters or adapter_name, inference_mode=inference_mode)
        else:
            new = ModulesToSaveWrapper(target, adapter_name)
            new.set_adapter(adapter_name, inference_mode=inference_mode)
            setattr(parent, target_name, new)
