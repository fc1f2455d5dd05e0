"""LoRA on an `nn.Parameter` (`LoraConfig.target_parameters`, e.g. MoE expert stacks) (L3).

`ParamWrapper` adapts one parameter of a module whose forward reads the parameter directly (no
nn.Linear to wrap): during the forward the parameter is replaced through `torch.nn.utils.parametrize`
by `W + dW`. Several parameters of one module are adapted by nesting wrappers. This is PEFT's
composite path (the fused ops of `peft_fast.functional` need an x @ W^T they can see), with PEFT's
formulas, names and error texts:

- 2d parameter [out, in]: lora_A [r, in], lora_B [out, r], dW = s * B @ A (as lora.Linear).
- 3d parameter [E, out, in] (or [E, in, out] where the module sets `is_transposed = True`):
  lora_A [r * E, in], lora_B [out, r * E]; expert e uses rows e*r..(e+1)*r of A and the columns
  e, E + e, 2E + e, ... of B (PEFT's layout, kept so that adapter files interchange). A single
  adapter on a 3d parameter folds its update with one `baddbmm` (`_LoraFactorsProxy`) instead of
  materialising dW.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ...utils.other import upcast_on_cpu
from ..tuners_utils import BaseTunerLayer, check_adapters_to_merge
from .layer import LoraLayer

# PEFT's peft.utils.constants values
ALLOWED_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
UPCAST_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _is_low_precision(dtype: torch.dtype) -> bool:
    return any(getattr(torch, name, None) == dtype for name in UPCAST_DTYPES)


class _LoraParameterProxy(nn.Module):
    """Parametrization W -> W + dW (dW precomputed, summed over the active adapters)."""

    def __init__(self, delta_weight: torch.Tensor):
        super().__init__()
        self.delta_weight = delta_weight

    @staticmethod
    def _low_prec_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # float8 has no addition: add in y's dtype, clamp to x's range (the cast does not) and cast back
        orig_dtype, upcast_dtype = x.dtype, y.dtype
        if upcast_dtype not in ALLOWED_COMPUTE_DTYPES:
            raise RuntimeError(
                f"There is an attempt to upcast the targeted parameter to {upcast_dtype} "
                f"but the only supported are: {ALLOWED_COMPUTE_DTYPES}."
            )
        z = x.to(upcast_dtype) + y
        info = torch.finfo(orig_dtype)
        return z.clamp(min=info.min, max=info.max).to(orig_dtype)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if _is_low_precision(W.dtype):
            return self._low_prec_add(W, self.delta_weight)
        return W + self.delta_weight


class _LoraFactorsProxy(nn.Module):
    """Parametrization W -> W + scaling * lhs @ rhs for one adapter on a 3d parameter (one baddbmm,
    no dW the size of the expert stack)."""

    def __init__(self, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float):
        super().__init__()
        self.lhs = lhs  # [E, rows, r]
        self.rhs = rhs  # [E, r, cols]
        self.scaling = scaling

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        # a parametrization must keep W's dtype, so autocast (which would lower baddbmm) is off here
        with torch.autocast(device_type=W.device.type, enabled=False):
            return torch.baddbmm(W, self.lhs, self.rhs, alpha=self.scaling)


class ParamWrapper(nn.Module, LoraLayer):
    """A LoRA wrapper for `nn.Parameter`, dispatched for `lora_config.target_parameters`.

    Reading the wrapped parameter directly (`module.weight`) gives the base value, without LoRA.
    Each wrapper adapts one parameter; several parameters of one module nest wrappers. Several
    adapters are supported if they all target the same set of parameters.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 0,
                 lora_alpha: int = 1, lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 is_target_conv_1d_layer: bool = False, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, inference_mode: bool = False, **kwargs) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        LoraLayer.__init__(self, base_layer, **kwargs)
        name = self.__class__.__name__
        if lora_dropout:
            # lora_B(lora_A(dropout(x))) cannot be written as a change of the parameter
            raise ValueError(f"lora.{name} does not work with lora_dropout != 0.")
        if fan_in_fan_out:
            raise ValueError(f"lora.{name} does not work with fan_in_fan_out.")
        if lora_bias:
            raise ValueError(f"lora.{name} does not work with lora_bias=True.")
        if use_dora:
            raise ValueError(f"lora.{name} does not work with use_dora=True.")
        if is_target_conv_1d_layer:
            raise ValueError(f"lora.{name} does not work with is_target_conv_1d_layer=True.")
        self.fan_in_fan_out = False
        self._did_swap_in_out_features = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, inference_mode=inference_mode)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        """(in, out) from the parameter's shape: [out, in] (2d) or [experts, in, out] (3d)."""
        shape = getattr(self.get_param(), "ds_shape", self.get_param().shape)
        if len(shape) == 3:
            num_experts, in_features, out_features = shape
        elif len(shape) == 2:
            num_experts, in_features, out_features = 1, shape[1], shape[0]
        else:
            raise ValueError(
                f"lora.{self.__class__.__name__} was initialized with {len(shape)} dimensional Parameter, but only 2d "
                "and 3d are supported."
            )
        self.num_experts = num_experts
        self._param_ndim = len(shape)
        return in_features, out_features

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, inference_mode: bool = False, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if use_dora:
            raise ValueError(f"lora.{self.__class__.__name__} does not work with LoRA variants like DoRA.")
        # 3d parameters are [experts, out, in] unless the module marks them transposed
        is_transposed = getattr(self.get_base_layer(), "is_transposed", False)
        if self._param_ndim == 3 and not is_transposed and not self._did_swap_in_out_features:
            self.in_features, self.out_features = self.out_features, self.in_features
            self._did_swap_in_out_features = True
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        if lora_dropout > 0.0:
            raise ValueError(f"lora.{self.__class__.__name__} does not work with lora_dropout != 0.")
        self.lora_dropout.update(nn.ModuleDict({adapter_name: nn.Identity()}))
        # creation order as PEFT's (same seed -> same initial weights); experts share one nn.Linear
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=lora_bias)
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = use_dora
        if init_lora_weights:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        param = self.get_param()
        meta = torch.device("meta")
        for layer_name in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, layer_name, None)
            if not isinstance(d, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in d:
                continue
            if any(p.device == meta for p in d.parameters()):
                continue
            if param.dtype.is_floating_point or param.dtype.is_complex:
                d[adapter_name] = d[adapter_name].to(param.device, dtype=param.dtype)
            else:
                d[adapter_name] = d[adapter_name].to(param.device)

    # ---- delta weight -----------------------------------------------------------------------
    def get_delta_factors(self, adapter_name: str):
        """(lhs, rhs, scaling) with dW = scaling * lhs @ rhs, per expert: [E, rows, r], [E, r, cols]."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        A = A.reshape(self.num_experts, -1, A.shape[-1])  # [E, r, in]
        B = B.reshape(B.shape[0], -1, self.num_experts).permute(2, 0, 1)  # [E, out, r]
        lhs, rhs = (B, A) if self._did_swap_in_out_features else (A.transpose(-2, -1), B.transpose(-2, -1))
        dtype = self.get_param().dtype
        return lhs.to(dtype), rhs.to(dtype), self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str, *args, **kwargs) -> torch.Tensor:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if self.num_experts == 1:
            (B, A), back = upcast_on_cpu(B.dtype, B, A)
            delta = B @ A * self.scaling[adapter_name]
            if back:
                delta = delta.to(back)
        else:
            A = A.reshape(self.num_experts, -1, A.shape[-1])  # [E, r, in]
            B = B.reshape(B.shape[0], -1, self.num_experts)  # [out, r, E]
            eq = "o r e, e r i -> e o i" if self._did_swap_in_out_features else "o r e, e r i -> e i o"
            delta = torch.einsum(eq, B, A) * self.scaling[adapter_name]
        param = self.get_param()
        if param.dtype in ALLOWED_COMPUTE_DTYPES:
            return delta.to(param.device, param.dtype)
        return delta.to(param.device)  # float8: W + dW is added in dW's dtype (_low_prec_add)

    # ---- forward --------------------------------------------------------------------------------
    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not adapters:
            yield
            return
        param = self.get_param()
        if len(adapters) == 1 and self.num_experts > 1 and not _is_low_precision(param.dtype):
            proxy = _LoraFactorsProxy(*self.get_delta_factors(adapters[0]))
        else:
            delta = None
            for a in adapters:
                delta = self.get_delta_weight(a) if delta is None else delta + self.get_delta_weight(a)
            proxy = _LoraParameterProxy(delta)
        base = self.get_base_layer()
        requires_grad = param.requires_grad
        nn.utils.parametrize.register_parametrization(base, self.parameter_name, proxy)
        base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)  # default is False
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()

    def _remove_parametrizations(self) -> None:
        base = self.get_base_layer()
        if self.parameter_name not in base.parametrizations:
            raise ValueError(
                "Something went wrong, please report this issue on PEFT: https://github.com/huggingface/peft/issues"
            )
        plist = base.parametrizations[self.parameter_name]
        if len(plist) == 1:
            nn.utils.parametrize.remove_parametrizations(base, self.parameter_name, leave_parametrized=False)
            return
        # other parametrizations of this parameter stay: take out only the (last) LoRA one
        for i in reversed(range(len(plist))):
            if isinstance(plist[i], (_LoraParameterProxy, _LoraFactorsProxy)):
                del plist[i]
                break
        else:
            warnings.warn(
                f"Could not find any LoRA parametrization on {self}, please open an issue on "
                "https://github.com/huggingface/peft/issues and report this warning."
            )

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        if kwargs.get("adapter_names", None):
            raise ValueError(f"lora.{self.__class__.__name__} does not support mixed adapter batches yet.")
        LoraLayer._check_forward_args(self, x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            raise ValueError(f"lora.{self.__class__.__name__} does not support mixed batch inference")
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        with self._activate_lora(self.active_adapters):
            return self.base_layer(x, *args, **kwargs)

    # ---- merging ----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            param = self.get_param()
            if safe_merge:
                merged = param.data.clone()
                merged += self.get_delta_weight(adapter).to(merged.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                param.data = merged
            else:
                param.data += self.get_delta_weight(adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        for adapter in self._pop_merged():
            if adapter in self.lora_A:
                param = self.get_param()
                param.data -= self.get_delta_weight(adapter).to(param.dtype)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """The base module with this wrapper and the ones it nests removed (merged first if `merge`)."""
        if not merge:
            return self.get_base_layer()
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.base_layer
        while isinstance(base, ParamWrapper):
            base.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            base = base.base_layer
        return base

    def __repr__(self) -> str:
        rep = super().__repr__()
        idx = rep.find("(") + 1
        # the parameter name tells nested wrappers of one module apart
        return "lora." + f"{rep[:idx]}\n  parameter_name='{self.parameter_name}',{rep[idx:]}"


def find_existing_param_wrapper(module: nn.Module, parameter_name: str) -> Optional[ParamWrapper]:
    """The (possibly nested) wrapper of `parameter_name` in `module`, reused by a further adapter."""
    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _strip_base_layer(name: str) -> str:
    while ".base_layer" in name:
        prefix, _, suffix = name.rpartition(".base_layer")
        name = prefix + suffix
    return name


def inject_parameters(tuner, peft_config, model: nn.Module, adapter_name: str) -> list[str]:
    """Wrap every parameter named by `peft_config.target_parameters` (exact name or dotted suffix);
    returns the matched names (PEFT's `BaseTuner._inject_parameters`)."""
    from ...utils.other import _get_submodules

    targeted: list[str] = []

    def replace(module_name: str, key: str, param_name: str) -> None:
        if module_name == "":
            # the wrapper would become a submodule of the module it wraps (a cycle)
            raise ValueError(
                f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{param_name}'). "
            )
        parent, target, target_name = _get_submodules(model, module_name)
        unwrapped_name = _strip_base_layer(module_name)
        unwrapped = model.get_submodule(unwrapped_name)
        if isinstance(unwrapped, BaseTunerLayer) and not isinstance(unwrapped, ParamWrapper):
            raise ValueError(
                f"Trying to wrap an `nn.Parameter` of layer '{unwrapped_name}' of type "
                f"{type(target).__name__}, which is not a valid target. Make sure that this layer is not "
                "also targeted with `target_modules`. For some models, PEFT will do this automatically, "
                "try setting `target_modules=[]` to prevent it."
            )
        short_name = param_name.rpartition(".")[-1]
        existing = find_existing_param_wrapper(unwrapped, short_name)
        if existing is not None:
            target = existing
        tuner._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=key,
                                  parameter_name=short_name)

    # sorted: the matching order decides how wrappers of one module nest
    target_names = sorted(set(peft_config.target_parameters))
    for module_name, module in model.named_modules():
        if hasattr(module, "parametrizations"):
            # an already parametrized parameter is not listed under its own name
            for key in target_names:
                target_module_name, _, param_name = key.rpartition(".")
                if target_module_name != module_name or getattr(module, param_name, None) is None:
                    continue
                replace(module_name, key, param_name)
                targeted.append(key)
        else:
            unwrapped_name = _strip_base_layer(module_name)
            for param_name, _ in module.named_parameters(recurse=False):
                key = f"{unwrapped_name}.{param_name}"
                if key in target_names or any(key.endswith(f".{t}") for t in target_names):
                    replace(module_name, key, param_name)
                    targeted.append(key)
    return targeted


def create_or_update_param_wrapper(tuner, lora_config, adapter_name: str, target: nn.Module, target_name: str,
                                   parent: nn.Module, parameter_name: str, kwargs: dict) -> None:
    """`LoraModel._create_and_replace` for a targeted parameter: a further adapter joins the wrapper
    of that parameter; a parameter of an already wrapped module nests a new wrapper around it."""
    for name, text in (("velora_config", "`velora_config` is set"), ("kasa_config", "`kasa_config` is set")):
        if getattr(lora_config, name, None) is not None:
            raise ValueError(f"lora.ParamWrapper does not work when {text}.")
    nest = isinstance(target, ParamWrapper) and adapter_name in target.lora_A
    if isinstance(target, LoraLayer) and not nest:
        target.update_layer(adapter_name, **kwargs)
        return
    if isinstance(target, ParamWrapper) and parameter_name == target.parameter_name:
        raise ValueError(
            "Trying to target the same nn.Parameter twice, this should not happen. Please open an issue on the "
            "PEFT repo: https://github.com/huggingface/peft/issues"
        )
    new_module = ParamWrapper(target, adapter_name, parameter_name=parameter_name,
                              fan_in_fan_out=lora_config.fan_in_fan_out, **kwargs)
    if adapter_name not in tuner.active_adapters:
        new_module.requires_grad_(False)
    tuner._replace_module(parent, target_name, new_module, target)
