"""(IA)^3 adapter layers with PEFT's structure (`base_layer`, `ia3_l`) (L3)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ... import ops
from ...functional import ia3_linear
from ...utils.other import is_conv1d, transpose
from ..tuners_utils import BaseTunerLayer, check_adapters_to_merge


class IA3Layer(BaseTunerLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, **kwargs) -> None:
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.is_feedforward = is_feedforward
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, (nn.Conv2d, nn.Conv3d)):
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif is_conv1d(base):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"Unsupported layer type {type(base)}")

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True, inference_mode: bool = False) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn(shape))  # randn first: same RNG use as PEFT
        if init_ia3_weights:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _scaling(self) -> Optional[torch.Tensor]:
        """Product of the active adapters' vectors (flattened), or None."""
        scale = None
        for a in self.active_adapters:
            if a in self.ia3_l:
                v = self.ia3_l[a].flatten()
                scale = v if scale is None else scale * v
        return scale


    # ---- merging: W <- W * l (and b <- b * l for output-feature layers), shared by every kind
    def _weight_factor(self, adapter: str) -> torch.Tensor:
        """ia3_l shaped to broadcast against the base weight."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for a in check_adapters_to_merge(self, adapter_names):
            if a not in self.ia3_l:
                continue
            base = self.get_base_layer()
            new_w = torch.mul(base.weight.data, self._weight_factor(a)).to(base.weight.dtype)
            new_b = None
            if not self.is_feedforward and base.bias is not None:
                new_b = torch.mul(base.bias.data, self.ia3_l[a].data.reshape(base.bias.shape))
            self._write_merged(a, new_w, new_b, safe_merge)

    def unmerge(self) -> None:
        for a in self._pop_merged():
            if a not in self.ia3_l:
                continue
            base = self.get_base_layer()
            base.weight.data = torch.div(base.weight.data, self._weight_factor(a) + 1e-8).to(base.weight.dtype)
            if not self.is_feedforward and base.bias is not None:
                base.bias.data = torch.div(base.bias.data, self.ia3_l[a].data.reshape(base.bias.shape) + 1e-8
                                           ).to(base.bias.dtype)


class Linear(nn.Module, IA3Layer):
    """(IA)^3 on nn.Linear / Conv1D: output scaling, or input scaling for feed-forward layers."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False,
                 is_feedforward: bool = False, is_target_conv_1d_layer: bool = False,
                 init_ia3_weights: bool = True, inference_mode: bool = False, **kwargs) -> None:
        super().__init__()
        IA3Layer.__init__(self, base_layer, is_feedforward=is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_ia3_weights, inference_mode)

    def _weight_factor(self, adapter: str) -> torch.Tensor:
        return transpose(self.ia3_l[adapter].data, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self._scaling()
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if (not args and not kwargs and (type(base) is nn.Linear or is_conv1d(base)) and not base._forward_hooks
                and not base._forward_pre_hooks
                and (x.dtype == base.weight.dtype == scale.dtype
                     or (x.is_floating_point() and ops.autocast_dtype(x) is not None))):  # the op casts
            return ia3_linear(x, base.weight, base.bias, scale, self.is_feedforward, self.fan_in_fan_out)
        # PEFT's composite formula (mixed dtypes, hooked or exotic base layers)
        previous_dtype = x.dtype
        if self.is_feedforward:
            return base((x.to(scale.dtype) * scale).to(previous_dtype), *args, **kwargs)
        result = base(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class _ConvNd(nn.Module, IA3Layer):
    """(IA)^3 on nn.Conv2d / nn.Conv3d: vectors shaped (1, C, 1, ...) as in PEFT; PEFT's formula
    (no fused op: the scaling is a broadcast multiply around the base conv)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool = False,
                 init_ia3_weights: bool = True, inference_mode: bool = False, fan_in_fan_out: bool = False,
                 **kwargs) -> None:
        super().__init__()
        IA3Layer.__init__(self, base_layer, is_feedforward=is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self._kernel_dim = base_layer.weight.dim()
        self.update_layer(adapter_name, init_ia3_weights, inference_mode)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True, inference_mode: bool = False) -> None:
        n = self.in_features if self.is_feedforward else self.out_features
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn((1, n) + (1,) * (self._kernel_dim - 2)))
        if init_ia3_weights:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _weight_factor(self, adapter: str) -> torch.Tensor:
        l = self.ia3_l[adapter].data
        if not self.is_feedforward:
            return l.transpose(0, 1)
        base = self.get_base_layer()
        if base.groups == 1:
            return l
        # grouped conv: weight is [out, in / groups, ...]; each group's outputs see their group's inputs
        g, in_g, out_g = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        l = l.reshape(g, 1, in_g, *l.shape[2:]).expand(g, out_g, in_g, *l.shape[2:])
        return l.reshape(base.out_channels, in_g, *l.shape[3:])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        scale = None
        for a in self.active_adapters:
            if a in self.ia3_l:
                dtype = self.ia3_l[a].dtype
                scale = self.ia3_l[a] if scale is None else scale * self.ia3_l[a]
        if scale is None:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if self.is_feedforward:
            interm = (x.to(dtype) * scale).to(self.get_base_layer().weight.dtype)
            result = self.base_layer(interm, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(dtype) * scale
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Conv2d(_ConvNd):
    """(IA)^3 on nn.Conv2d."""


class Conv3d(_ConvNd):
    """(IA)^3 on nn.Conv3d."""
