"""`TrainableTokensLayer`: new values for a few rows (token indices) of an embedding matrix (L3).

Per adapter: `trainable_tokens_delta[name]` [n_tokens, dim] holds the *values* of the selected
rows (not differences; PEFT's name), `trainable_tokens_original[name]` the rows it replaced
(non-persistent buffer, used to unmerge), `token_indices[name]` the rows. The forward writes the
values into a copy of the weight (``index_copy``) and embeds with it (F.linear for a tied LM head),
exactly as PEFT, so outputs and gradients match. A layer tied to another (LM head tied to the input
embedding) shares that layer's containers and owns nothing.

Unlike PEFT's it is not a tuner layer of the model: the `TrainableTokensWrapper` around it
(utils/trainable_tokens.py) drives it, so the LoRA model's layer loops leave it alone.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.other import AdapterStateMixin
from .._buffer_dict import BufferDict


class TrainableTokensLayer(AdapterStateMixin, nn.Module):
    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None,
                 tied_adapter: Optional["TrainableTokensLayer"] = None, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter: Union[str, list[str]] = adapter_name
        self._disable_adapters = False
        self.kwargs = kwargs
        # a list keeps the tied layer out of named_modules() and so out of the state dict
        self._tied_adapter = [tied_adapter] if tied_adapter else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict({})
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[1], w.shape[0]) if isinstance(base_layer, nn.Linear) \
            else (w.shape[0], w.shape[1])

    # ---- bookkeeping (BaseTunerLayer's API) ------------------------------------------------------
    @property
    def tied_adapter(self):
        return self._tied_adapter[0] if self._tied_adapter else None

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, p in self.trainable_tokens_delta.items():
            p.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, p in self.trainable_tokens_delta.items():
            if key in names:
                p.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            self.trainable_tokens_delta.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        for d in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
            if adapter_name in d:
                del d[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining:
                remaining = sorted(self.trainable_tokens_delta.keys())[:1]
                if remaining:
                    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                                  f"{remaining[0]}.")
            self.set_adapter(remaining)

    # ---- creation ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config=None, tied_adapter=None, **kwargs) -> None:
        if tied_adapter is not None:  # a tied layer follows the layer it is tied to
            return
        token_indices = config.token_indices if config is not None else kwargs["token_indices"]
        init_weights = config.init_weights if config is not None else kwargs.get("init_weights", True)
        self.token_indices[adapter_name] = token_indices
        base = self.get_base_layer()
        weight = base.weight
        embed_dim = base.embedding_dim if hasattr(base, "embedding_dim") else base.in_features
        originals = weight[token_indices]  # [n, dim]
        if init_weights:
            values = originals
        else:
            values = torch.randn((len(token_indices), embed_dim), dtype=weight.dtype, device=weight.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone(), requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals.detach().clone()
        self.trainable_tokens_delta[adapter_name].data = self.trainable_tokens_delta[adapter_name].data.to(weight.device)

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """PEFT's error for adapters whose token indices overlap (merged ones count too)."""
        to_check = list(dict.fromkeys(self.merged_adapters + adapter_names))
        if len(to_check) <= 1:
            return
        seen: set = set()
        for name in to_check:
            idx = set(self.token_indices[name])
            if seen & idx:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in "
                    "undefined merging behavior. Only disjunct token indices are currently supported."
                )
            seen |= idx

    # ---- merging -------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if adapter_names is None:
            adapter_names = self.active_adapters
        adapter_names = [a for a in adapter_names if a not in self.merged_adapters]
        if not adapter_names:
            return
        self._check_overlapping_tokens(adapter_names)
        merged = self.base_layer.weight.data
        for name in adapter_names:
            index = torch.tensor(self.token_indices[name]).to(merged.device)
            merged = merged.index_copy(dim=0, index=index, source=self.trainable_tokens_delta[name].to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.base_layer.weight.data = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.base_layer.weight
            index = torch.tensor(self.token_indices[name]).to(w.device)
            w.data.index_copy_(dim=0, index=index, source=self.trainable_tokens_original[name].to(w))

    def get_merged_weights(self, active_adapters) -> torch.Tensor:
        """The weight with the adapters' rows written in (a tensor, differentiable in the values)."""
        W = self.base_layer.weight
        for name in active_adapters:
            index = torch.tensor(self.token_indices[name]).to(W.device)
            W = W.index_copy(dim=0, index=index, source=self.trainable_tokens_delta[name].to(W))
        return W

    # ---- forward -------------------------------------------------------------------------------
    def _get_embed_scale(self):
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.disable_adapters or not active_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        W = self.get_merged_weights(active_adapters)
        if isinstance(base, nn.Embedding):
            result = F.embedding(x, W, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                                 scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            scale = self._get_embed_scale()  # e.g. Gemma's scaled embeddings apply it in their forward
            return result * scale.to(result.dtype) if scale is not None else result
        if isinstance(base, nn.Linear):  # an LM head tied to the input embedding
            return F.linear(x, W)
        raise ValueError("TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer?")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)
