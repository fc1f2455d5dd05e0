"""`TrainableTokensWrapper` and `LoraConfig.trainable_token_indices` (PEFT's names and semantics).

The wrapper replaces an embedding (or a tied LM head) and holds a `TrainableTokensLayer` as
`token_adapter`; saved adapters store ``<name>.token_adapter.trainable_tokens_delta`` (PEFT's key).
`set_trainable_token_indices` is the trainable-tokens half of PEFT's
``set_additional_trainable_modules``: a list of indices targets the input embedding, a dict names
layers; with tied word embeddings the tied layers (lm_head) get a wrapper tied to the embedding's.
"""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn

from .other import AuxiliaryTrainingWrapper


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """Wraps a module (typically an embedding) so that only a few token rows are retrained."""

    adapter_layer_names: tuple[str, ...] = ("token_adapter.trainable_tokens_delta",)
    other_param_names: tuple[str, ...] = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, module_to_save: nn.Module, adapter_name: str, token_indices: list[int], tied_adapter=None):
        from ..tuners.trainable_tokens.layer import TrainableTokensLayer

        nn.Module.__init__(self)
        self._active_adapter: Union[str, list[str]] = [adapter_name]
        self._disable_adapters = False
        self._adapters: set[str] = set()
        self._check_module(module_to_save)
        self.token_adapter = TrainableTokensLayer(module_to_save, adapter_name, token_indices, tied_adapter)
        self.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)

    @property
    def original_module(self) -> nn.Module:
        # a property, so that the wrapped module appears once in the state dict (under token_adapter.base_layer)
        return self.token_adapter.base_layer

    def _error_message_name(self) -> str:
        return "trainable_token_indices"

    def _check_module(self, module: nn.Module) -> None:
        from ..tuners.tuners_utils import BaseTunerLayer

        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList, BaseTunerLayer)
        if isinstance(module, forbidden):
            raise TypeError(f"{self._error_message_name()} cannot be applied to modules of type {module.__class__}")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        modules = self.__dict__["_modules"]
        if self._disable_adapters or not self.active_adapters:
            return getattr(modules["token_adapter"].base_layer, name)
        if name == "weight":  # models read e.g. wte.weight.dtype, or the weight itself
            token_adapter = modules["token_adapter"]
            return token_adapter.get_merged_weights(token_adapter.active_adapters)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def update(self, adapter_name: str, **kwargs) -> None:
        if adapter_name not in self._adapters:
            self.token_adapter.update_layer(adapter_name, **kwargs)
        self._adapters.add(adapter_name)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and args and len(args[0]) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(args[0])} respectively."
            )
        if self._disable_adapters or any(a not in self._adapters for a in self.active_adapters):
            return self.token_adapter(*args, **kwargs)  # it handles disabled / no adapter itself
        if adapter_names is None:
            return self.token_adapter(args[0]) if self.active_adapters else self.token_adapter(*args, **kwargs)
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        if not isinstance(self.original_module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError("Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, "
                            "Conv2d, Conv3d.")
        results: list = [0] * len(x)
        for adapter in set(adapter_names):
            idx = [i for i, a in enumerate(adapter_names) if a == adapter]
            sub = x[idx]
            if adapter == "__base__":
                out = self.original_module(sub, *args, **kwargs)
            else:
                out = self.token_adapter.forward_adapters(sub, [adapter])
            for k, i in enumerate(idx):
                results[i] = out[k]
        return torch.stack(results)

    # ---- adapter management (PEFT's semantics) -------------------------------------------------
    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        self.token_adapter.enable_adapters(enabled)

    def check_set_adapter(self, adapter_name) -> Optional[str]:
        if isinstance(adapter_name, str):
            return adapter_name
        if len(adapter_name) == 0:
            raise ValueError("Please specify at least one adapter to set")
        in_module = [n for n in adapter_name if n in self.token_adapter.trainable_tokens_delta]
        if len(in_module) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self}, got {len(in_module)}")
        return in_module[0] if in_module else None

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """Activate the adapters of `adapter_names` this wrapper has (none of them: no adapter). The
        tuner checks `check_set_adapter` first, so that at most one of them is here (PEFT's `_set_adapter`);
        a direct call may activate several with disjoint tokens (PEFT's wrapper `set_adapter`)."""
        if isinstance(adapter_names, str):
            names = [adapter_names] if adapter_names in self._adapters else []
            self._active_adapter = adapter_names if names else []
        else:
            names = [n for n in adapter_names if n in self._adapters]
            self._active_adapter = names
        self.token_adapter.set_adapter(names, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self.token_adapter.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        self.token_adapter.delete_adapter(adapter_name)
        if isinstance(new_active_adapters, (list, tuple)) and len(new_active_adapters) > 1:
            raise ValueError(f"Attempted to set multiple ({new_active_adapters}) adapters at once for "
                             f"{self.__class__.__name__}, which is not allowed.")
        self._adapters.discard(adapter_name)
        if not new_active_adapters or new_active_adapters[0] not in self.token_adapter.trainable_tokens_delta:
            self._active_adapter = []
            return
        self.set_adapter(new_active_adapters[0])

    # ---- saving --------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        key = f"token_adapter.trainable_tokens_delta.{adapter_name}"
        if self.token_adapter.tied_adapter is not None or key not in state_dict:
            return {}  # a tied layer's values are the embedding's, saved there
        return {"token_adapter.trainable_tokens_delta": state_dict[key]}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        if self.token_adapter.tied_adapter is not None:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.token_adapter.get_base_layer()

    def _get_available_adapters(self) -> set[str]:
        return set(self.token_adapter.trainable_tokens_delta.keys())


def _input_embeddings_name(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    if not hasattr(model, "get_input_embeddings"):
        return default
    emb = model.get_input_embeddings()
    return next((n for n, m in model.named_modules() if m is emb), default)


def module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is tied to the input embedding (e.g. ['lm_head']), PEFT's rules."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "tuner_layer_cls"):
        model = model.model
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", None) is False:
        return []
    if not hasattr(model, "_tied_weights_keys"):
        return []
    tied: list[str] = []
    if isinstance(model._tied_weights_keys, dict):
        if not hasattr(model, "get_input_embeddings"):
            raise ValueError(
                "The supplied model implements `_tied_weights_keys` as a dict but doesn't implement "
                "'get_input_embeddings' so we can't determine which weights are tied to embeddings."
            )
        keys: dict[str, str] = {}
        for name, module in model.named_modules():
            sub = getattr(module, "_tied_weights_keys", None)
            if sub and not name:
                keys.update(sub)
            elif sub:
                keys.update({f"{name}.{k}": f"{name}.{v}" for k, v in sub.items()})
        emb_params = set(model.get_input_embeddings().parameters())
        candidates = [n for n, p in model.named_parameters(remove_duplicate=False) if p in emb_params]
        pattern = re.compile(r"[^.]+\.base_layer\.")
        reverse = {pattern.sub("", n): n for n in candidates}
        reverse.update({n.replace("base_layer.", ""): n for n in candidates})
        tied.extend(reverse.get(k, k) for k, v in keys.items() if reverse.get(v, v) in candidates)
    elif model._tied_weights_keys is not None:
        tied.extend(model._tied_weights_keys)
    return sorted({n.rpartition(".")[0] for n in tied})


def _wrap(model: nn.Module, adapter_name: str, module_names: list[str], inference_mode: bool,
          activate_adapter: bool = True, **wrapper_kwargs) -> None:
    """PEFT's `_set_trainable(..., wrapper_cls=TrainableTokensWrapper, strict_module_check=True)`."""
    from ..tuners.tuners_utils import BaseTunerLayer

    found = set()
    for key in [k for k, _ in model.named_modules(remove_duplicate=False)]:
        if not any(key.endswith(t) for t in module_names):
            continue
        parent = model.get_submodule(".".join(key.split(".")[:-1]))
        try:
            grandparent = model.get_submodule(".".join(key.split(".")[:-2]))
        except AttributeError:
            grandparent = None
        target_name = key.split(".")[-1]
        target = model.get_submodule(key)
        if isinstance(grandparent, BaseTunerLayer):
            raise ValueError(
                f"You are trying to target a module with {TrainableTokensWrapper} that is a child of "
                f"{type(grandparent)}. This is almost certainly not the intended behavior. Please ensure that the "
                f"adapter name, '{adapter_name}', does not conflict with any of the targeted modules."
            )
        if isinstance(grandparent, TrainableTokensWrapper):
            grandparent.update(adapter_name, **wrapper_kwargs)
            grandparent.set_adapter(grandparent.active_adapter, inference_mode=inference_mode)
        elif isinstance(target, TrainableTokensWrapper):
            target.update(adapter_name, **wrapper_kwargs)
            target.set_adapter(target.active_adapter, inference_mode=inference_mode)
        else:
            new = TrainableTokensWrapper(target, adapter_name, **wrapper_kwargs)
            new.set_adapter(adapter_name if activate_adapter else [], inference_mode=inference_mode)
            setattr(parent, target_name, new)
        found.add(target_name)
    if not found:
        raise ValueError(
            f"Target modules {set(module_names)} not found in the base model. Please check the target modules and "
            "try again."
        )


def set_trainable_token_indices(model: nn.Module, peft_config, model_config: dict, adapter_name: str,
                                activate_adapter: bool = True) -> None:
    """Wrap the layers `peft_config.trainable_token_indices` names (PEFT's rules and errors)."""
    indices = getattr(peft_config, "trainable_token_indices", None)
    if indices is None:
        return
    if isinstance(indices, dict):
        target_layers = indices
    else:
        target_layers = {_input_embeddings_name(model, "embed_tokens"): indices}
    modules_to_save = getattr(peft_config, "modules_to_save", None)
    if modules_to_save is not None:
        for name in target_layers:
            if name in modules_to_save:
                raise ValueError(
                    "The embedding layer is already marked to be trained fully, either specify "
                    f'`modules_to_save=[..., "{name}", ...]` or '
                    f"`trainable_tokens={{'{name}': x}}` but not both."
                )
    weights_tied = model_config.get("tie_word_embeddings", False)
    indices_mismatch, layers_to_skip = False, set()
    if len(target_layers) > 1 and weights_tied:
        tied_names = set(module_names_tied_with_embedding(model))
        emb = model.get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        tied_keys = []
        for name in target_layers:
            if emb_name.endswith(name):
                tied_keys.append(name)
                continue
            if any(t.endswith(name) or name in t.split(".") for t in tied_names):
                tied_keys.append(name)
        if len(tied_keys) >= 2:
            first = target_layers[tied_keys[0]]
            indices_mismatch = not all(target_layers[k] == first for k in tied_keys[1:])
            if not indices_mismatch:
                layers_to_skip = set(tied_keys) & tied_names
    for name, token_indices in target_layers.items():
        if name in layers_to_skip:
            continue
        _wrap(model, adapter_name, [name], peft_config.inference_mode, activate_adapter=activate_adapter,
              token_indices=token_indices)
    if weights_tied and isinstance(model.get_input_embeddings(), TrainableTokensWrapper) and not indices_mismatch:
        # layers tied to the embedding (lm_head) follow its token adapter, so that they stay in sync
        token_adapter = model.get_input_embeddings().token_adapter
        tied_names = module_names_tied_with_embedding(model)
        if tied_names:
            _wrap(model, adapter_name, tied_names, peft_config.inference_mode,
                  token_indices=token_adapter.token_indices[adapter_name], tied_adapter=token_adapter)
