"""Module-tree helpers and the `modules_to_save` wrapper, with PEFT's names and key layout."""
from __future__ import annotations

import copy
import inspect
import re
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as stored by the layer -> W[out, in] (Conv1D stores W[in, out])."""
    return weight.T if fan_in_fan_out else weight


def upcast_on_cpu(dtype: torch.dtype, *factors: torch.Tensor):
    """(factors, dtype to cast their product back to, or None): 16-bit (`dtype`) factors on CPU are
    multiplied in fp32 (CPU half/bfloat16 matmuls are slow and less accurate); elsewhere untouched."""
    if factors[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return [f.float() for f in factors], dtype
    return list(factors), None


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


class AdapterStateMixin:
    """Which adapters are active and whether adapters are disabled, read the same way by every
    adapter-holding module (tuner layers, ModulesToSaveWrapper, TrainableTokensWrapper, ...).
    Classes using it set `_active_adapter` (a name or a list of names) and `_disable_adapters`."""

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self):
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)


class AuxiliaryTrainingWrapper(AdapterStateMixin, nn.Module):
    """Base of the modules trained and saved beside an adapter (PEFT's name): `ModulesToSaveWrapper`
    (full copies) and `TrainableTokensWrapper` (a few embedding rows, utils/trainable_tokens.py).
    Tuners, saving and loading treat both through the same methods (set_adapter, delete_adapter,
    adapter_state_dict, adapter_state_dict_load_map, unload_and_optionally_merge_module, ...).
    Subclasses set `_active_adapter` (a name or a list) and `_disable_adapters`."""


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps `original_module` frozen and trains a per-adapter copy in `modules_to_save[name]`.

    State-dict keys: ``<name>.original_module.*`` and ``<name>.modules_to_save.<adapter>.*``;
    in saved adapters the copy is stored as ``<name>.*`` (PEFT's format).
    """

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()
    merged_adapters: list[str] = []

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

    def check_set_adapter(self, adapter_name):
        """The adapter this wrapper would switch to for `adapter_name` (None: none of its copies);
        a copy replaces the module, so two adapters with a copy here cannot be active together."""
        if isinstance(adapter_name, str):
            return adapter_name
        if len(adapter_name) == 0:
            raise ValueError("Please specify at least one adapter to set")
        in_module = [n for n in adapter_name if n in self.modules_to_save]
        if len(in_module) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self}, got {len(in_module)}")
        return in_module[0] if in_module else None

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self._adapters]
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        # as PEFT: the copies that were in use are frozen, the new one follows inference_mode, and the
        # others keep their requires_grad
        for name in self.active_adapters:
            if name in self.modules_to_save:
                set_requires_grad(self.modules_to_save[name], False)
        if not names:
            self._active_adapter = []
            return
        set_requires_grad(self.modules_to_save[names[0]], not inference_mode)
        self._active_adapter = names[0]

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Enable or disable gradients on the copies of the given adapter(s)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, module in self.modules_to_save.items():
            if name in names:
                set_requires_grad(module, requires_grad)

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


def set_trainable(model: nn.Module, adapter_name: str, module_names, inference_mode: bool,
                  activate_adapter: bool = True) -> None:
    """Wrap every module whose name ends with one of `module_names` in a ModulesToSaveWrapper.
    A new wrapper uses the adapter's copy only if `activate_adapter` (the adapter is active)."""
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
            # the copy in use stays in use; an inactive adapter's copy is not switched on
            target.set_adapter(target.active_adapters or (adapter_name if activate_adapter else []),
                               inference_mode=inference_mode)
        else:
            new = ModulesToSaveWrapper(target, adapter_name)
            new.training = new.modules_to_save.training = target.training  # not recursive: copies keep theirs
            new.set_adapter(adapter_name if activate_adapter else [], inference_mode=inference_mode)
            setattr(parent, target_name, new)


# Quantization backends whose fp16/bf16 parameters PEFT leaves alone (their kernels want them so).
_NO_UPCAST_QUANT_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """PEFT 0.21.2's ``prepare_model_for_kbit_training``, step for step (transformers models only).

    1. Freeze every parameter of `model`.
    2. Unless the model is GPTQ/AQLM/EETQ/HQQ/torchao-quantized, cast every fp16/bf16 parameter
       that is not a bitsandbytes ``Params4bit`` to fp32 -- norms, embeddings, lm_head, and (as in
       PEFT) also on a model that is not quantized at all. int8 weights are left as they are.
    3. If the model is quantized (``is_loaded_in_8bit``/``is_loaded_in_4bit`` or one of the methods
       above) and `use_gradient_checkpointing`: unless ``use_reentrant=False`` is passed, make the
       input embeddings' output require grad (``enable_input_require_grads``, else a forward hook
       on ``get_input_embeddings()``) so reentrant checkpointing sees a grad-requiring input; then
       ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` (kwargs dropped with a
       FutureWarning where that method takes none). A missing ``use_reentrant`` counts as True here,
       as in PEFT, although transformers itself defaults to ``use_reentrant=False``.
    4. `auto_clear_cache`: empty the CUDA/XPU caching allocator after the casts.

    Returns `model` (modified in place).
    """
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    is_hqq = method == "hqq" or getattr(model, "hqq_quantized", False)
    skip_upcast = is_hqq or method in _NO_UPCAST_QUANT_METHODS

    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}

    for param in model.parameters():
        param.requires_grad = False

    if not skip_upcast:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if hasattr(torch, "xpu") and torch.xpu.is_available():
                torch.xpu.empty_cache()

    if (loaded_in_kbit or skip_upcast) and use_gradient_checkpointing:
        # with use_reentrant=False the checkpoint needs no grad-requiring input
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                def make_inputs_require_grad(module, input, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)

        supports_gc_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(
            model.gradient_checkpointing_enable).parameters
        if not supports_gc_kwargs and len(gradient_checkpointing_kwargs) > 0:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported in this version of transformers. The passed kwargs "
                "will be ignored. if you want to use that feature, please upgrade to the latest version of "
                "transformers.", FutureWarning)
        gc_enable_kwargs = {"gradient_checkpointing_kwargs": gradient_checkpointing_kwargs} if supports_gc_kwargs else {}
        model.gradient_checkpointing_enable(**gc_enable_kwargs)
    return model


def infer_device() -> str:
    """The accelerator torch sees, as PEFT names it: "cuda", "mps", "xpu", "npu" or "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return "xpu"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


def _set_adapter(model: nn.Module, adapter_name, inference_mode: bool = False) -> None:
    """PEFT's helper: switch every AuxiliaryTrainingWrapper (modules_to_save copies, trainable tokens)
    of `model` to `adapter_name`; a wrapper that holds none of the names gets no active adapter."""
    for module in model.modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        name = module.check_set_adapter(adapter_name)
        if name is not None and name in module._adapters:
            module.set_adapter(name, inference_mode=inference_mode)
        else:
            module.set_adapter([], inference_mode=inference_mode)


def _get_no_split_modules(model: nn.Module) -> set:
    """The class names transformers keeps on one device (`_no_split_modules`) of `model` and of the
    pretrained models inside it."""
    names: set = set()
    todo = [model]
    while todo:
        module = todo.pop()
        if type(module).__name__ in names:
            continue
        own = getattr(module, "_no_split_modules", None)
        if own:
            names.update(own)
        todo.extend(module.children())
    return names


def fsdp_auto_wrap_policy(model: nn.Module):
    """PEFT's FSDP auto-wrap policy: wrap each transformer block (`_no_split_modules`, or the
    comma-separated class names in FSDP_TRANSFORMER_CLS_TO_WRAP) and, separately, every leaf module
    whose weight is trainable (the adapter layers), so frozen and trainable weights are never in one
    flat parameter."""
    import functools
    import os

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    try:
        from accelerate import FullyShardedDataParallelPlugin

        get_module_class_from_name = FullyShardedDataParallelPlugin.get_module_class_from_name
    except (ImportError, AttributeError):
        from accelerate.utils.dataclasses import get_module_class_from_name

    default_names = ",".join(sorted(_get_no_split_modules(model)))
    class_names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", default_names).split(",")
    to_wrap = set()
    for class_name in class_names:
        if not class_name:
            continue
        cls = get_module_class_from_name(model, class_name)
        if cls is None:
            raise TypeError("Could not find the transformer layer class to wrap in the model.")
        to_wrap.add(cls)

    def _trainable_leaf(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return len(list(module.named_children())) == 0 and weight is not None and weight.requires_grad

    policies = [functools.partial(lambda_auto_wrap_policy, lambda_fn=_trainable_leaf),
                functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=to_wrap)]
    return functools.partial(_or_policy, policies=policies)


def __getattr__(name: str):
    # PEFT defines TrainableTokensWrapper here; it lives in trainable_tokens.py (imported lazily: it
    # needs the tuner layer classes, which import this module)
    if name == "TrainableTokensWrapper":
        from .trainable_tokens import TrainableTokensWrapper

        return TrainableTokensWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
