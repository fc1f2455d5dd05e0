"""LoRA / DoRA adapter layers with PEFT's module structure and attribute names (L3).

`Linear` (also wrapping GPT-2's Conv1D via fan_in_fan_out), `Embedding`, `Conv1d`, `Conv2d`, `Conv3d`
(`MultiheadAttention` lives in mha.py).
Forward of Linear goes through the fused autograd ops of `peft_fast.functional`; the other
layer types and unusual combinations use a composite path with PEFT's exact formula.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...functional import dora_linear, lora_linear
from ...functional._common import fold_tensor_scaling
from ...utils.other import is_conv1d, transpose, upcast_on_cpu
from ..tuners_utils import BaseTunerLayer, check_adapters_to_merge
from .dora import cached_dora_value
from .dora_embedding import dora_embedding_forward, dora_embedding_init_norm, dora_embedding_norm
from .variants import conv_variants, embedding_variants, linear_variants, resolve_lora_variant


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector as `.weight` (PEFT's `lora_magnitude_vector[name].weight`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)
        self._dora_cache: dict[str, Any] = {}  # DoraCaching (see .dora); not part of the state_dict

    def train(self, mode: bool = True):
        if mode:
            self._dora_cache.clear()
        return super().train(mode)

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class LoraLayer(BaseTunerLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.use_dora: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_variant: dict[str, Any] = {}  # adapter -> LoraVariant (variants.py), PEFT's name
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}  # adapter -> layer names kept frozen
        self._caches: dict[str, Any] = {}
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        base = self.get_base_layer()
        if getattr(self, "parameter_name", None) is not None:  # ParamWrapper: from the parameter's shape
            in_f, out_f = self._get_in_out_features(base)
        elif isinstance(base, nn.Linear):
            in_f, out_f = base.in_features, base.out_features
        elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            in_f, out_f = base.in_channels, base.out_channels
        elif isinstance(base, nn.MultiheadAttention):  # in_proj: embed_dim -> 3 * embed_dim
            in_f, out_f = base.embed_dim, 3 * base.embed_dim
        elif isinstance(base, nn.Embedding):
            in_f, out_f = base.num_embeddings, base.embedding_dim
        elif is_conv1d(base):
            in_f, out_f = base.weight.shape
        else:
            raise TypeError(f"Unsupported layer type {type(base)}")
        self.in_features, self.out_features = in_f, out_f

    # ---- creation -----------------------------------------------------------------------------
    def _common_update(self, adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias

    def _make_lora_modules(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    _UPDATE_OPTIONS = (("lora_dropout", 0.0), ("init_lora_weights", True), ("use_rslora", False),
                       ("use_dora", False), ("lora_bias", False), ("inference_mode", False))

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config=None, **kwargs) -> None:
        """Add (or re-create) adapter `adapter_name` of rank `r` on this layer.

        PEFT's signature: ``update_layer(adapter_name, r, lora_alpha, config)`` reads lora_dropout,
        init_lora_weights, use_rslora, use_dora, lora_bias and inference_mode from the LoraConfig `config`
        (r and lora_alpha come separately, rank/alpha patterns resolved). peft_fast's own callers pass those
        options as keywords instead (then the missing ones take their defaults, not the config's: LoraModel
        leaves lora_bias out for an Embedding); `config` is still read for the LoRA variants."""
        if config is not None and not any(name in kwargs for name, _ in self._UPDATE_OPTIONS):
            options = {name: getattr(config, name, default) for name, default in self._UPDATE_OPTIONS}
            if options["lora_bias"] and isinstance(self, Embedding):  # PEFT's check and text
                raise ValueError(f"lora_bias={options['lora_bias']} is not supported for {self.__class__.__name__}.")
        else:
            options = {name: kwargs.pop(name, default) for name, default in self._UPDATE_OPTIONS}
        self._update_layer(adapter_name, r, lora_alpha, config=config, **options, **kwargs)

    def _update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                      init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                      lora_bias: bool = False, inference_mode: bool = False, config=None, **kwargs) -> None:
        variant = resolve_lora_variant(self._lora_variants(), config)  # refuses before anything changes
        self._common_update(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias)
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                "has no bias. This means that merging LoRA weights won't be possible."
            )
        # creation order matches PEFT so that the same seed gives the same initial weights
        self._make_lora_modules(adapter_name, r, lora_bias)
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "mica":
            self._mica_init(adapter_name)
        elif init_lora_weights:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if use_dora:
            self._init_dora(adapter_name)
        if variant is not None:
            self.lora_variant[adapter_name] = variant
            variant.init(self, adapter_name, config=config, target_name=kwargs.get("target_name", ""))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights is False:
            return
        if adapter_name in self.lora_A:
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            elif str(init_lora_weights).lower() == "gaussian":
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"Unknown initialization {init_lora_weights=}")
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_bias[adapter_name]:
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _init_dora(self, adapter_name: str) -> None:
        raise NotImplementedError(f"DoRA is not supported for {type(self.get_base_layer()).__name__} layers")

    # ---- LoRA variants (variants.py): KaSA, MonteCLoRA, MiCA ------------------------------------
    def _lora_variants(self) -> dict:
        return conv_variants()

    def _mica_init(self, adapter_name: str) -> None:
        from .mica import mica_init_embedding, mica_init_linear

        (mica_init_linear if adapter_name in self.lora_A else mica_init_embedding)(self, adapter_name)

    def _lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (A, B) of one adapter for the fused ops (a variant may build them, e.g. BD-LoRA)."""
        variant = self.lora_variant.get(adapter)
        if variant is not None:
            return variant.lora_weights(self, adapter)
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def _variant_fusable(self, active: list[str]) -> bool:
        return all(self.lora_variant[a].fusable(self) for a in active if a in self.lora_variant)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """Keep the weights a variant declares frozen (MiCA's lora_B) frozen after set_adapter & co."""
        if not self.frozen_peft_weight_names:
            return
        if adapter_names is None:
            adapter_names = list(self.frozen_peft_weight_names)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for adapter in adapter_names:
            for layer_name in self.frozen_peft_weight_names.get(adapter, ()):
                d = getattr(self, layer_name, None)
                if layer_name in self.adapter_layer_names and d is not None and adapter in d:
                    d[adapter].requires_grad_(False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        BaseTunerLayer.set_adapter(self, adapter_names, inference_mode=inference_mode)
        self._freeze_non_trainable_peft_weights(adapter_names)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        BaseTunerLayer.set_requires_grad(self, adapter_names, requires_grad=requires_grad)
        if requires_grad:
            self._freeze_non_trainable_peft_weights(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        BaseTunerLayer.delete_adapter(self, adapter_name)
        self.lora_variant.pop(adapter_name, None)
        self.frozen_peft_weight_names.pop(adapter_name, None)

    # ---- scaling helpers (PEFT API) -----------------------------------------------------------
    def _base_scale(self, adapter: str) -> float:
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter, False) else alpha / r

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set `adapter`'s scaling to its initial value (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)
        times `scale`; an adapter this layer does not hold is ignored (PEFT; diffusers' `set_adapters`)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * self._base_scale(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scaling of every active adapter by `scale` (diffusers' ``lora_scale``).

        As in PEFT, only adapters held in ``lora_A`` are scaled: an Embedding's adapters (held in
        ``lora_embedding_A``) keep their scaling, so outputs match PEFT's."""
        if scale == 1:
            return
        for a in self.active_adapters:
            if a in self.lora_A:
                self.scaling[a] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Divide the current scaling of every active adapter (in ``lora_A``, as `scale_layer`) by `scale`;
        ``scale=None`` resets it to the initial value."""
        for a in self.active_adapters:
            if a not in self.lora_A:
                continue
            if scale is None:
                self.scaling[a] = self._base_scale(a)
            else:
                self.scaling[a] /= scale

    # ---- shared forward pieces ----------------------------------------------------------------
    def _check_forward_args(self, x, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.")
        for name in set(adapter_names) - {"__base__"}:
            if self.use_dora.get(name, False):
                raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")

    def _forward_prologue(self, x, args, kwargs: dict, mixed: bool):
        """The start every forward shares: argument checks, pops `adapter_names` from kwargs,
        disabled adapters (unmerging first) and, with `mixed`, mixed-adapter batches.
        Returns (the finished result or None, adapter_names)."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs), adapter_names
        if mixed and adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs), adapter_names
        return None, adapter_names

    def _active_present(self) -> list[str]:
        keys = set(self.lora_A.keys()) | set(self.lora_embedding_A.keys())
        return [a for a in self.active_adapters if a in keys]

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for adapter in dict.fromkeys(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            idx = [i for i, a in enumerate(adapter_names) if a == adapter]
            sub = x[idx].to(self.lora_A[adapter].weight.dtype)
            if adapter in self.lora_variant:
                sub_result = result[idx]
                out = self.lora_variant[adapter].forward(self, adapter, sub, sub_result) - sub_result
            else:
                out = self.lora_B[adapter](self.lora_A[adapter](self.lora_dropout[adapter](sub))) * self.scaling[adapter]
            result[idx] += out.to(out_dtype)
        return result

    # ---- merging (Linear, Conv): W <- W + dW, or for DoRA W <- (m / ||W0 + dW||) (W + dW) ----------
    def _factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """||W + dW|| per output channel, [N], of an unmerged weight."""
        fif = getattr(self, "fan_in_fan_out", False)
        full = transpose(weight, fif).float() + transpose(delta, fif).float()
        return full.flatten(1).norm(dim=1).to(weight.dtype)

    def _undo(self, adapter: str, w: torch.Tensor, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """w with one merged adapter taken out again."""
        delta = self.get_delta_weight(adapter)
        if adapter not in self.lora_magnitude_vector:
            return w - delta.to(w.dtype)
        norm = self._caches[f"{adapter}-weight_norm"] if norm is None else norm
        factor = self._factor_view(self.lora_magnitude_vector[adapter].weight.reshape(-1) / norm)
        return (w / factor - delta).to(w.dtype)

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge (the norm DoRA's forward uses)."""
        w = self._base_weight_data().clone()
        for adapter in reversed(self.merged_adapters):
            if adapter in self.lora_A:
                w = self._undo(adapter, w)
        return w

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            w = self._base_weight_data()
            delta = self.get_delta_weight(adapter)
            if adapter in self.lora_magnitude_vector:
                norm = self._dora_norm(self._unmerged_base_weight() if self.merged else w, delta)
                self._caches[f"{adapter}-weight_norm"] = norm
                factor = self._factor_view(self.lora_magnitude_vector[adapter].weight.reshape(-1) / norm)
                new_w = (factor * (w + delta)).to(w.dtype)
            else:
                new_w = w + delta.to(w.dtype)
            new_b = None
            if self.lora_bias[adapter]:
                if getattr(base, "bias", None) is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                new_b = base.bias.data + self.lora_B[adapter].bias.data * self.scaling[adapter]
            self._write_merged(adapter, new_w, new_b, safe_merge)

    def unmerge(self) -> None:
        for adapter in self._pop_merged():
            if adapter not in self.lora_A:
                continue
            norm = self._caches.pop(f"{adapter}-weight_norm", None)
            self._set_base_weight_data(self._undo(adapter, self._base_weight_data(), norm))
            if self.lora_bias[adapter]:
                self.get_base_layer().bias.data -= self.lora_B[adapter].bias.data * self.scaling[adapter]


class Linear(nn.Module, LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D with fan_in_fan_out=True."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, is_target_conv_1d_layer: bool = False,
                 init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False,
                 **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, **kwargs)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    # -- DoRA ----------------------------------------------------------------------------------
    def _dense_weight(self) -> torch.Tensor:
        """The frozen base weight for DoRA's norm and formula (quantized layers dequantize)."""
        return self.get_base_layer().weight.detach()

    def _weight_sqnorm(self) -> torch.Tensor:
        """||W||^2 per output row, fp32; cached until the base weight changes (merge, load)."""
        w = self.get_base_layer().weight
        if ops.is_compiling():  # traced graphs recompute it (data pointers cannot be traced)
            return transpose(self._dense_weight(), self.fan_in_fan_out).float().pow(2).sum(1)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        hit = self._caches.get("weight_sqnorm")
        if hit is None or hit[0] != key:
            wt = transpose(self._dense_weight(), self.fan_in_fan_out)
            hit = (key, wt.float().pow(2).sum(1))
            self._caches["weight_sqnorm"] = hit
        return hit[1]

    def get_weight_norm(self, adapter: str, scaling: Optional[float] = None) -> torch.Tensor:
        """||W + s B A|| per output row from the factored form (detached), [N]."""
        B, s = fold_tensor_scaling(self.lora_B[adapter].weight, self.scaling[adapter] if scaling is None else scaling)
        return ops.dora_weight_norm(
            self._dense_weight(), self.lora_A[adapter].weight, B, s, self.fan_in_fan_out, self._weight_sqnorm(),
        )

    def _init_dora(self, adapter_name: str) -> None:
        norm = self.get_weight_norm(adapter_name).to(self.lora_A[adapter_name].weight.dtype)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    def _lora_variants(self) -> dict:
        return linear_variants()

    # -- merge ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter)
        delta = variant.get_delta_weight(self, adapter) if variant is not None else None
        if delta is not None:
            return delta
        B, A = self.lora_B[adapter].weight, self.lora_A[adapter].weight
        (B, A), back = upcast_on_cpu(B.dtype, B, A)
        out = transpose(B @ A, self.fan_in_fan_out) * self.scaling[adapter]
        return out.to(back) if back else out

    def _factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        return transpose(factor.view(-1, 1), self.fan_in_fan_out)

    # -- forward -------------------------------------------------------------------------------
    def _fusable(self, x: torch.Tensor, args, kwargs) -> bool:
        base = self.base_layer
        return (
            not args and not kwargs
            # casting disabled (helpers.disable_input_dtype_casting): PEFT's formula on the raw input
            and getattr(self, "cast_input_dtype_enabled", True)
            and (type(base) is nn.Linear or is_conv1d(base))
            and not base._forward_hooks and not base._forward_pre_hooks
            and base.weight.dtype.is_floating_point
            # under autocast the fused op casts x and W itself, as nn.Linear would
            and (x.dtype == base.weight.dtype or (x.is_floating_point() and ops.autocast_dtype(x) is not None))
            and x.shape[-1] == self.in_features
        )

    def _dropout_p(self, adapter: str) -> float:
        d = self.lora_dropout[adapter]
        return float(d.p) if isinstance(d, nn.Dropout) and self.training else 0.0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        done, _ = self._forward_prologue(x, args, kwargs, mixed=True)
        if done is not None:
            return done
        active = self._active_present()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if self._fusable(x, args, kwargs):
            y = self._fused_forward(x, active)
            if y is not None:
                return y
        return self._composite_forward(x, active, *args, **kwargs)

    # -- mixed-adapter batches ---------------------------------------------------------------------
    def _lora_stack(self, names: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapters `names` stacked for the multi-LoRA op: A [n, R, K], B [n, N, R] with ranks
        zero-padded to the largest, fp32 scalings [n]. Cached until a weight or scaling changes."""
        As = [self.lora_A[a].weight for a in names]
        Bs = [self.lora_B[a].weight for a in names]
        # tensor scalings (prepare_model_for_compiled_hotswap) are keyed by identity and version:
        # reading their value would sync the device on every forward
        skey = [(id(v), v._version) if isinstance(v, torch.Tensor) else float(v)
                for v in (self.scaling[a] for a in names)]
        key = (names, tuple((A.data_ptr(), A._version, B.data_ptr(), B._version, k)
                            for A, B, k in zip(As, Bs, skey)))
        hit = self._caches.get("lora_stack")
        if hit is not None and hit[0] == key:
            return hit[1]
        R = max(A.shape[0] for A in As)
        dtype = As[0].dtype if all(t.dtype == As[0].dtype for t in As + Bs) else torch.float32
        A_st = As[0].new_zeros((len(names), R, self.in_features), dtype=dtype)
        B_st = Bs[0].new_zeros((len(names), self.out_features, R), dtype=dtype)
        with torch.no_grad():
            for i, (A, B) in enumerate(zip(As, Bs)):
                A_st[i, :A.shape[0]] = A
                B_st[i, :, :B.shape[1]] = B
        scales = torch.stack([torch.as_tensor(self.scaling[a], dtype=torch.float32, device=A_st.device).reshape(())
                              for a in names])
        self._caches["lora_stack"] = (key, (A_st, B_st, scales))
        return A_st, B_st, scales

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """One multi-LoRA op for the whole batch (tokens grouped by adapter) instead of PEFT's
        loop over adapters; PEFT's loop where that op does not apply."""
        names = tuple(sorted(a for a in set(adapter_names) if a in self.lora_A))
        if (not names or args or kwargs or type(self.base_layer) is not nn.Linear
                or any(self.lora_bias[a] or a in self.lora_magnitude_vector or a in self.lora_variant for a in names)
                # the multi-LoRA op is inference-only: with autograd on, PEFT's loop gives the gradients
                or (torch.is_grad_enabled() and (x.requires_grad or any(
                    self.lora_A[a].weight.requires_grad or self.lora_B[a].weight.requires_grad for a in names)))):
            return LoraLayer._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x)
        A_st, B_st, scales = self._lora_stack(names)
        token_idx = _token_adapter_index(adapter_names, names, x.numel() // (len(adapter_names) * x.shape[-1]),
                                         x.device)
        out = result.reshape(-1, self.out_features)
        ops.lora_mixed(x.reshape(-1, x.shape[-1]).to(A_st.dtype), A_st, B_st, scales, token_idx, out)
        return out.view(result.shape)  # `out` is a view of `result` (or its reshaped copy)

    def _fused_forward(self, x: torch.Tensor, active: list[str]) -> Optional[torch.Tensor]:
        """One fused op for the active adapters, or None where PEFT's formula is needed
        (lora_bias, several DoRA adapters, dropout under DoRA)."""
        base = self.base_layer
        if any(self.lora_bias[a] for a in active) or not self._variant_fusable(active):
            return None
        if not any(a in self.lora_magnitude_vector for a in active):
            As, Bs = zip(*(self._lora_weights(a) for a in active))
            return lora_linear(
                x, base.weight, base.bias, list(As), list(Bs), [self.scaling[a] for a in active],
                [self._dropout_p(a) for a in active], self.fan_in_fan_out,
            )
        if len(active) == 1 and self._dropout_p(active[0]) == 0.0:
            a = active[0]
            return dora_linear(
                x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                self.lora_magnitude_vector[a].weight,
                cached_dora_value(self, a, "weight-norm", lambda: self.get_weight_norm(a)), self.scaling[a],
                self.fan_in_fan_out,
            )
        return None

    def _composite_forward(self, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
        """PEFT's formula step by step (several DoRA adapters, dropout under DoRA, lora_bias, hooks)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in active:
            A, B, drop, s = self.lora_A[a], self.lora_B[a], self.lora_dropout[a], self.scaling[a]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            if a in self.lora_variant:
                result = self.lora_variant[a].forward(self, a, xa, result)
                continue
            if a not in self.lora_magnitude_vector:
                result = result + B(A(drop(xa))) * s
                continue
            base = self.get_base_layer()
            w = transpose(self._dense_weight(), self.fan_in_fan_out).to(xa.dtype)
            if isinstance(drop, nn.Identity) or not self.training:
                base_result = result if base.bias is None else result - base.bias
            else:
                xa = drop(xa)
                base_result = F.linear(xa, w)
            norm = cached_dora_value(self, a, "weight-norm", lambda: self.get_weight_norm(a))
            c = (self.lora_magnitude_vector[a].weight / norm.to(xa.dtype)).view(1, -1)
            result = result + (c - 1) * base_result + c * B(A(xa)) * s
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


_TOKEN_INDEX_CACHE: dict = {}


def _token_adapter_index(adapter_names: list[str], names: tuple, tokens_per_sample: int,
                         device: torch.device) -> torch.Tensor:
    """int64 [B * tokens_per_sample]: each token's slot in `names` (-1 for "__base__" or an adapter
    this layer lacks). Cached, so the layers of one forward share one host-to-device copy."""
    key = (tuple(adapter_names), names, tokens_per_sample, str(device))
    hit = _TOKEN_INDEX_CACHE.get(key)
    if hit is None:
        slot = {a: i for i, a in enumerate(names)}
        per_sample = torch.tensor([slot.get(a, -1) for a in adapter_names], dtype=torch.int64)
        hit = per_sample.repeat_interleave(tokens_per_sample).to(device)
        if len(_TOKEN_INDEX_CACHE) > 64:
            _TOKEN_INDEX_CACHE.clear()
        _TOKEN_INDEX_CACHE[key] = hit
    return hit


class Embedding(nn.Module, LoraLayer):
    """LoRA on nn.Embedding: lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if lora_bias:
            raise ValueError(f"lora_bias={lora_bias} is not supported for {self.__class__.__name__}.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora, **kwargs)

    def _lora_variants(self) -> dict:
        return embedding_variants()

    def _make_lora_modules(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        (A, B), back = upcast_on_cpu(A.dtype, A, B)
        out = (B @ A).T * self.scaling[adapter]
        return out.to(back) if back else out

    # -- DoRA (dora_embedding.py): magnitude per embedding dim, W <- (m / ||W^T + dW^T||) (W + dW) on merge
    def _init_dora(self, adapter_name: str) -> None:
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(dora_embedding_init_norm(self, adapter_name))

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return dora_embedding_norm(weight, delta)

    def _factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)

    def _unmerged_base_weight(self) -> torch.Tensor:
        w = self._base_weight_data().clone()
        for adapter in reversed(self.merged_adapters):
            if adapter in self.lora_embedding_A:
                w = self._undo(adapter, w)
        return w

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_embedding_A:
                continue
            w = self.get_base_layer().weight.data
            delta = self.get_delta_weight(adapter)
            if adapter in self.lora_magnitude_vector:
                norm = self._dora_norm(self._unmerged_base_weight() if self.merged else w, delta).detach()
                self._caches[f"{adapter}-weight_norm"] = norm
                factor = self._factor_view(self.lora_magnitude_vector[adapter].weight / norm)
                new_w = (factor * (w + delta)).to(w.dtype)
            else:
                new_w = w + delta.to(w.dtype)
            self._write_merged(adapter, new_w, None, safe_merge)

    def unmerge(self) -> None:
        for adapter in self._pop_merged():
            if adapter in self.lora_embedding_A:
                w = self.get_base_layer().weight
                norm = self._caches.pop(f"{adapter}-weight_norm", None)
                w.data = self._undo(adapter, w.data, norm).to(w.dtype)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.get_base_layer()
        return F.embedding(x, weight, padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                           scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)

    def _embed_scale(self):
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        LoraLayer._check_forward_args(self, x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        done, adapter_names = self._forward_prologue(x, args, kwargs, mixed=False)
        if done is not None:
            return done
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        scale = self._embed_scale()
        for a in dict.fromkeys(adapter_names) if adapter_names is not None else self.active_adapters:
            if a not in self.lora_embedding_A:
                continue
            if a in self.lora_magnitude_vector and adapter_names is None:
                result = dora_embedding_forward(self, a, x, result, scale)
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == a] if adapter_names is not None else None
            xs = x if rows is None else x[rows]
            out = (self._embed(xs, self.lora_embedding_A[a].T) @ self.lora_embedding_B[a].T) * self.scaling[a]
            if scale is not None:
                out = out * scale.to(out.dtype)
            if rows is None:
                result = result + out
            else:
                result[rows] += out.to(out_dtype)
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _ConvNd(nn.Module, LoraLayer):
    """LoRA on nn.Conv1d / nn.Conv2d / nn.Conv3d: lora_A is a conv with the base kernel, lora_B a 1x1 conv."""

    conv_fn = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if getattr(kwargs.get("config"), "velora_config", None) is not None:
            raise ValueError("VeLoRA does not support adapting conv layers.")
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        self._kernel_dim = base_layer.weight.dim()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, **kwargs)

    def _make_lora_modules(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        if r % base.groups != 0:  # lora_B is grouped like the base layer
            raise ValueError(
                f"Targeting a {base.__class__.__name__} with groups={base.groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. "
                "Either choose a different rank or do not target this specific layer."
            )
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter_name] = type(base)(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = type(base)(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _dora_lora_weight(self, adapter: str) -> torch.Tensor:
        """DoRA's s * dW, as PEFT computes it for its norm: (B.view(-1, r) @ A.view(r, -1)) reshaped
        to the base weight's shape. Equal to the conv delta for groups == 1; for grouped convs it is
        PEFT's (not a merge delta), kept so that magnitudes and outputs match PEFT's."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        r = A.shape[0]
        w = self.get_base_layer().weight
        return (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(w.shape) * self.scaling[adapter]

    def _dora_weight_norm(self, adapter: str) -> torch.Tensor:
        """||W + s dW|| per output channel, detached, shaped [1, N, 1, ...] to broadcast on outputs."""
        weight = self.get_base_layer().weight + self._dora_lora_weight(adapter).detach()
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0).detach()

    def _init_dora(self, adapter_name: str) -> None:
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(self._dora_weight_norm(adapter_name))

    def _check_merge_supported(self, adapter_names: list[str]) -> None:
        if self.get_base_layer().groups > 1 and any(a in self.lora_A for a in adapter_names):
            # https://github.com/huggingface/peft/pull/2403
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        if not isinstance(names, str):  # a str is refused with PEFT's message by LoraLayer.merge
            self._check_merge_supported(list(names))
        LoraLayer.merge(self, safe_merge=safe_merge, adapter_names=adapter_names)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        B, A = self.lora_B[adapter].weight, self.lora_A[adapter].weight
        (B, A), back = upcast_on_cpu(A.dtype, B, A)
        base = self.get_base_layer()
        r = A.shape[0]
        if base.weight.shape[2:] == (1,) * (self._kernel_dim - 2):
            out = (B.reshape(B.shape[0], r) @ A.reshape(r, -1)).reshape(base.weight.shape) * self.scaling[adapter]
        else:
            out = self.conv_fn(A.transpose(0, 1), B)
            out = out * self.scaling[adapter] if base.groups > 1 else out.transpose(0, 1) * self.scaling[adapter]
        return out.to(back) if back else out

    def _factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.reshape((-1,) + (1,) * (self._kernel_dim - 1))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        done, _ = self._forward_prologue(x, args, kwargs, mixed=True)
        if done is not None:
            return done
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        base = self.get_base_layer()
        for a in self._active_present():
            A, B, drop, s = self.lora_A[a], self.lora_B[a], self.lora_dropout[a], self.scaling[a]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            if a not in self.lora_magnitude_vector:
                result = result + B(A(drop(xa))) * s
                continue
            bias_shape = (1, -1) + (1,) * (result.dim() - 2)
            if isinstance(drop, nn.Identity) or not self.training:
                base_result = result if base.bias is None else result - base.bias.view(*bias_shape)
            else:
                xa = drop(xa)
                base_result = self.conv_fn(xa, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
            c = self.lora_magnitude_vector[a].weight / cached_dora_value(
                self, a, "weight-norm", lambda: self._dora_weight_norm(a))
            result = result + (c - 1) * base_result + c * B(A(xa)) * s
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(_ConvNd):
    conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvNd):
    conv_fn = staticmethod(F.conv2d)


class Conv3d(_ConvNd):
    conv_fn = staticmethod(F.conv3d)


# re-exported here, where PEFT defines them (peft.tuners.lora.layer.ParamWrapper)
from .param_wrapper import ParamWrapper, _LoraFactorsProxy, _LoraParameterProxy  # noqa: E402,F401
