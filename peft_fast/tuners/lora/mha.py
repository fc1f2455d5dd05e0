"""LoRA on `nn.MultiheadAttention` (L3), with PEFT's structure, names and numbers.

Like PEFT, one adapter covers both projections: the layer's own `lora_A` / `lora_B` adapt the packed
`in_proj_weight` [3 * embed_dim, embed_dim], and `base_layer.out_proj` is wrapped in a LoRA `Linear`
(state-dict keys `mha.lora_A.<name>.weight` and `mha.base_layer.out_proj.lora_A.<name>.weight`).
Only `_qkv_same_embed_dim=True` is supported, DoRA is refused, and mixed-adapter batches raise.

torch's attention reads `in_proj_weight` and `out_proj.weight` directly (out_proj's forward is never
called), so the adapters act through merged weights. PEFT merges before and unmerges after every
forward by deleting and re-registering the parameters; here the forward shadows `in_proj_weight` and
out_proj's weight (and bias) with the merged, differentiable tensors for the duration of the base
call only (`_shadowed`), so the registered parameters are never replaced or reordered. Shadowing the
instance attribute, not swapping `_parameters` (as `torch.func.functional_call` does), also works
under FSDP with `use_orig_params=True`, which sets the parameters as plain instance attributes.
Composite path (no fused op): the cost is one [3E, r] x [r, E] and one [E, r] x [r, E] product per
forward.

PEFT's merge adds out_proj's delta twice: once itself and once through `out_proj.merge()` (which
adds its delta to the already-merged weight). Forward, explicit merges and `merge_and_unload` all
share that, so out_proj's update counts double in value, while its gradient flows through one
copy. And each adapter's merge starts from the detached weight so far, so with several active
adapters only the last one's deltas receive gradients. This module reproduces both exactly, so that
outputs, gradients and merged weights equal PEFT's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ...utils.other import upcast_on_cpu
from ..tuners_utils import check_adapters_to_merge
from .layer import Linear, LoraLayer


_MISSING = object()


@contextmanager
def _shadowed(items):
    """Temporarily make `module.name` read `value` for each (module, name, value): an instance
    attribute hides the registered parameter (attribute lookup finds `__dict__` before
    `nn.Module.__getattr__`), and the previous instance attribute, if any, comes back after."""
    saved = []
    try:
        for module, name, value in items:
            saved.append((module, name, module.__dict__.get(name, _MISSING)))
            module.__dict__[name] = value
        yield
    finally:
        for module, name, prev in reversed(saved):
            if prev is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = prev


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA on nn.MultiheadAttention: in_proj through `lora_A`/`lora_B`, out_proj through a LoRA Linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: int = 1,
                 use_dora: bool = False, **kwargs) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError(
                f"Only same embed for query/key/value is supported as of now for {self.__class__.__name__}."
            )
        if use_dora:
            raise ValueError(f"{self.__class__.__name__} does not support DoRA (yet), please set use_dora to False")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        out_proj = base_layer.out_proj
        if not isinstance(out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for {self.__class__.__name__}.")
        # out_proj's adapter first, then in_proj's, then out_proj's again (update_layer): PEFT's order,
        # so that one seed gives the same initial weights
        self.base_layer.out_proj = Linear(out_proj, adapter_name, r=r, lora_alpha=lora_alpha, **kwargs)
        # PEFT re-registers both weights (_restore_weights), which moves each after its bias in the
        # parameter order (named_parameters, state_dict, optimizer groups); same objects, same order here
        for module, name in ((base_layer, "in_proj_weight"), (out_proj, "weight")):
            module._parameters[name] = module._parameters.pop(name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, **kwargs)

    # ---- the base layer's attributes, as PEFT exposes them -------------------------------------
    embed_dim = property(lambda self: self.get_base_layer().embed_dim)
    kdim = property(lambda self: self.get_base_layer().kdim)
    vdim = property(lambda self: self.get_base_layer().vdim)
    _qkv_same_embed_dim = property(lambda self: self.get_base_layer()._qkv_same_embed_dim)
    num_heads = property(lambda self: self.get_base_layer().num_heads)
    dropout = property(lambda self: self.get_base_layer().dropout)
    batch_first = property(lambda self: self.get_base_layer().batch_first)
    head_dim = property(lambda self: self.get_base_layer().head_dim)
    in_proj_weight = property(lambda self: self.get_base_layer().in_proj_weight)
    in_proj_bias = property(lambda self: self.get_base_layer().in_proj_bias)
    out_proj = property(lambda self: self.get_base_layer().out_proj.get_base_layer())
    bias_k = property(lambda self: self.get_base_layer().bias_k)
    bias_v = property(lambda self: self.get_base_layer().bias_v)
    add_zero_attn = property(lambda self: self.get_base_layer().add_zero_attn)

    def merge_masks(self, *args, **kwargs) -> tuple[Optional[torch.Tensor], Optional[int]]:
        return self.get_base_layer().merge_masks(*args, **kwargs)

    # ---- creation ------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, use_dora: bool = False, **kwargs) -> None:
        if use_dora:
            raise ValueError(f"{self.__class__.__name__} does not support DoRA (yet), please set use_dora to False")
        LoraLayer.update_layer(self, adapter_name, r, lora_alpha, **kwargs)
        self.base_layer.out_proj.update_layer(adapter_name, r, lora_alpha, **kwargs)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        # nn.MultiheadAttention has no `.weight`: adapters follow out_proj's weight, as in PEFT
        w = self.get_base_layer().out_proj.get_base_layer().weight
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name, None)
            if d is not None and adapter_name in d:
                d[adapter_name] = d[adapter_name].to(w.device, dtype=w.dtype if w.dtype.is_floating_point else None)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B @ A for in_proj, [3 * embed_dim, embed_dim] (fp32 products for 16-bit CPU weights)."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        (B, A), back = upcast_on_cpu(B.dtype, B, A)
        out = (B @ A) * self.scaling[adapter]
        return out.to(back) if back else out

    # ---- merged weights ------------------------------------------------------------------------
    def _merged_weights(self, adapters: list[str], w_in: torch.Tensor, w_out: torch.Tensor,
                        b_out: Optional[torch.Tensor]):
        """(in_proj, out_proj weight, out_proj bias) with `adapters` merged as PEFT merges them: the
        deltas carry autograd; out_proj's second copy of its delta and its lora bias do not."""
        out_lora = self.get_base_layer().out_proj
        dtype = w_out.dtype
        for a in adapters:
            # each merge starts from `.data.detach()` of the weight so far: only the last adapter's
            # deltas carry gradients (PEFT's numbers; see the module docstring)
            w_in = w_in.detach() + self.get_delta_weight(a).to(dtype)
            d_out = out_lora.get_delta_weight(a).to(dtype)
            w_out = (w_out.detach() + d_out) + d_out.detach()
            if out_lora.lora_bias[a] and b_out is not None:
                b_out = b_out + (out_lora.lora_B[a].bias * out_lora.scaling[a]).detach()
        return w_in, w_out, b_out

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        base = self.get_base_layer()
        out_lora = base.out_proj
        out_base = out_lora.get_base_layer()
        for a in check_adapters_to_merge(self, adapter_names):
            if a not in self.lora_A:
                continue
            with torch.no_grad():
                dtype = out_base.weight.dtype
                new_in = base.in_proj_weight.data + self.get_delta_weight(a).to(dtype)
                new_out = out_base.weight.data + out_lora.get_delta_weight(a).to(dtype)
                if safe_merge and not (torch.isfinite(new_in).all() and torch.isfinite(new_out).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {a} seems to be broken")
                base.in_proj_weight.data = new_in
                out_base.weight.data = new_out
                out_lora.merge(adapter_names=[a])  # adds out_proj's delta a second time (PEFT's numbers)
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        out_lora = base.out_proj
        out_base = out_lora.get_base_layer()
        with torch.no_grad():
            for a in self._pop_merged():
                if a not in self.lora_A:
                    continue
                dtype = out_base.weight.dtype
                base.in_proj_weight.data = base.in_proj_weight.data - self.get_delta_weight(a).to(dtype)
                out_base.weight.data = out_base.weight.data - out_lora.get_delta_weight(a).to(dtype)
            if out_lora.merged:
                out_lora.unmerge()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention (adapters merged first with `merge`), out_proj unwrapped."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = base.out_proj.get_base_layer()
        return base

    def _restore_weights(self) -> None:
        """PEFT re-registers the parameters its merges unregistered; here they are never unregistered
        (merges write `.data`, forward only shadows them), so there is nothing to restore."""

    # ---- forward -------------------------------------------------------------------------------
    def _check_forward_args(self, x, *args, **kwargs) -> None:
        if "adapter_names" in kwargs:
            raise TypeError(f"lora.{self.__class__.__name__} does not support mixed adapter batches.")
        LoraLayer._check_forward_args(self, x, *args, **kwargs)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        previous_dtype = query.dtype
        self._check_forward_args(query, *args, **kwargs)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(query, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(query, *args, **kwargs)
        else:
            out_lora = base.out_proj
            if out_lora.active_adapters != self.active_adapters:
                name = base.__class__.__name__
                raise ValueError(
                    f"The out_proj layer of {name} has merged layers but {name} itself doesn't; please ensure "
                    "that either both or none have merged layers"
                )
            active = [a for a in self.active_adapters if a in self.lora_A]
            out_base = out_lora.get_base_layer()
            w_in, w_out, b_out = self._merged_weights(
                active, base.in_proj_weight.detach(), out_base.weight.detach(), out_base.bias
            )
            items = [(base, "in_proj_weight", w_in), (out_base, "weight", w_out)]
            if b_out is not None and b_out is not out_base.bias:
                items.append((out_base, "bias", b_out))
            with _shadowed(items):
                result = base(query, *args, **kwargs)
        return (result[0].to(previous_dtype), result[1].to(previous_dtype) if result[1] is not None else result[1])

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
