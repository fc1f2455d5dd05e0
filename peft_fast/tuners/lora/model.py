"""`LoraModel`: injects LoRA/DoRA layers and implements PEFT's LoRA-specific model API (L3)."""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import replace
from functools import reduce
from typing import Optional

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.other import ModulesToSaveWrapper, _get_submodules, get_pattern_key, is_conv1d
from ...utils.transaction import rollback_on_error
from ..tuners_utils import BaseTuner, BaseTunerLayer
from .config import LoraConfig
from .bnb import Linear4bit, Linear8bitLt, is_bnb_4bit, is_bnb_8bit
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .mha import MultiheadAttention
from .param_wrapper import create_or_update_param_wrapper, inject_parameters
from ...utils.merge_utils import MERGE_FUNCTIONS, check_merge_arguments, merge_task_tensors


def _new_lora_module(target: nn.Module, adapter_name: str, fan_in_fan_out: bool, **kwargs) -> nn.Module:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if is_bnb_4bit(base):  # before nn.Linear: bitsandbytes' layers subclass it
        return Linear4bit(target, adapter_name, **kwargs)
    if is_bnb_8bit(base):
        return Linear8bitLt(target, adapter_name, **kwargs)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    if isinstance(base, nn.Conv2d):
        return Conv2d(target, adapter_name, **kwargs)
    if isinstance(base, nn.Conv3d):
        return Conv3d(target, adapter_name, **kwargs)
    if isinstance(base, nn.Conv1d):
        return Conv1d(target, adapter_name, **kwargs)
    if isinstance(base, nn.MultiheadAttention):
        return MultiheadAttention(target, adapter_name, **kwargs)
    if isinstance(base, nn.Linear):
        if fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.")
        return Linear(target, adapter_name, fan_in_fan_out=False, **kwargs)
    if is_conv1d(base):
        if not fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.")
        return Linear(target, adapter_name, fan_in_fan_out=True, is_target_conv_1d_layer=True, **kwargs)
    raise ValueError(
        f"Target module {base} is not supported. Currently, only the following modules are supported: "
        "`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, "
        "`transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention.`."
    )


class LoraModel(BaseTuner):
    """Creates a LoRA (or DoRA) model from a pretrained model (same API as ``peft.LoraModel``)."""

    prefix = "lora_"
    tuner_layer_cls = LoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        if len(self.peft_config) > 1 and sum(c.bias != "none" for c in self.peft_config.values()) > 1:
            raise ValueError(
                f"{self.__class__.__name__} supports only 1 adapter with bias. When using multiple adapters, "
                "set bias to 'none' for all adapters."
            )
        # KaSA truncates the base weights at init, so what another adapter sees depends on it
        new_uses_kasa = getattr(config, "kasa_config", None) is not None
        for name, other in self.peft_config.items():
            other_uses_kasa = getattr(other, "kasa_config", None) is not None
            if other is not config and new_uses_kasa is not other_uses_kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                    f"weights: the new adapter {'uses' if new_uses_kasa else 'does not use'} KaSA but adapter "
                    f"'{name}' {'does not' if new_uses_kasa else 'does'}."
                )
        # which parameter a wrapper's LoRA weights belong to is its place in the nesting: adapters
        # that target parameters must all target the same ones
        target_parameters = getattr(config, "target_parameters", None)
        if target_parameters:
            for name, other in self.peft_config.items():
                other_tp = getattr(other, "target_parameters", None)
                if other is not config and other_tp and set(other_tp) != set(target_parameters):
                    raise ValueError(
                        "When using multiple adapters with `target_parameters`, all adapters must target the same set "
                        f"of parameters, but got {sorted(target_parameters)} for the new adapter and "
                        f"{sorted(other_tp)} for adapter '{name}'."
                    )

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None and getattr(peft_config, "target_parameters", None):
            model_type = model_config.get("model_type")
            if model_type in self.target_module_mapping:
                peft_config.target_modules = set(self.target_module_mapping[model_type])
            return peft_config
        return super()._prepare_adapter_config(peft_config, model_config)

    def _inject_parameters(self, peft_config, model: nn.Module, adapter_name: str) -> list[str]:
        return inject_parameters(self, peft_config, model, adapter_name)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, *,
                            parameter_name: Optional[str] = None):
        r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), current_key), lora_config.r)
        alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), current_key),
                                              lora_config.lora_alpha)
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=lora_config.lora_dropout,
                      init_lora_weights=lora_config.init_lora_weights, use_rslora=lora_config.use_rslora,
                      use_dora=lora_config.use_dora, lora_bias=lora_config.lora_bias,
                      inference_mode=lora_config.inference_mode)
        if parameter_name is not None:  # target_parameters
            create_or_update_param_wrapper(self, lora_config, adapter_name, target, target_name, parent,
                                           parameter_name, kwargs)
            return
        kwargs["config"] = lora_config  # LoRA variants (variants.py) read their sub-config from it
        kwargs["target_name"] = current_key  # and BD-LoRA matches its patterns against it
        if isinstance(target, LoraLayer):
            if isinstance(target, Embedding):
                kwargs.pop("lora_bias")
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = _new_lora_module(target, adapter_name, lora_config.fan_in_fan_out, **kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    # ---- variant losses (to be added to the task loss by the user, as in PEFT) --------------------
    def _get_monteclora_loss(self, adapter_names=None):
        """MonteCLoRA's KL + entropy terms, averaged over the samplers of `adapter_names` (default: active)."""
        from .monteclora import monteclora_loss

        names = self.active_adapters if adapter_names is None else adapter_names
        return monteclora_loss(self, [names] if isinstance(names, str) else list(names))

    def _get_kasa_loss(self, adapter_names=None):
        """KaSA's regularizers (beta, gamma from each adapter's KasaConfig) summed over its layers."""
        from .kasa import kasa_layer_regularization_loss

        names = self.active_adapters if adapter_names is None else adapter_names
        names = [names] if isinstance(names, str) else list(names)
        total = 0.0
        for module in self.modules():
            diag = getattr(module, "lora_diag", None) if isinstance(module, LoraLayer) else None
            for name in names if diag is not None else ():
                if name in diag:
                    cfg = self.peft_config[name].kasa_config
                    total = total + kasa_layer_regularization_loss(module, name, cfg.beta, cfg.gamma)
        return total

    # ---- add_weighted_adapter ------------------------------------------------------------------
    def _check_add_weighted_adapter(self, adapters: list[str], combination_type: str, svd_rank: Optional[int]):
        for a in adapters:
            if a not in self.peft_config:
                raise ValueError(f"Adapter {a} does not exist")
        for a in adapters:
            if getattr(self.peft_config[a], "target_parameters", None):
                raise ValueError(
                    f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{a}')"
                )
        wrappers = [m for m in self.modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(sum(a in w.modules_to_save for a in adapters) > 1 for w in wrappers):
            raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save.")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
                 for c in (self.peft_config[a] for a in adapters)]
        if combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
            if len(set(ranks)) != 1:
                raise ValueError(
                    "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                    "dare_linear."
                )
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type.endswith("svd") and combination_type in MERGE_FUNCTIONS:
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"Invalid combination_type: {combination_type!r} (supported: 'cat', "
                             f"{', '.join(repr(c) for c in MERGE_FUNCTIONS)})")
        types = {type(self.peft_config[a].target_modules) for a in adapters}
        if len(types) > 1:
            raise ValueError("all adapter configs should follow the same target modules type.")
        if str in types:
            new_targets = "|".join(f"({self.peft_config[a].target_modules})" for a in adapters)
        else:
            new_targets = reduce(operator.or_, (set(self.peft_config[a].target_modules) for a in adapters))
        return combination_type, new_rank, new_targets

    def _check_svd_rank_fits(self, adapters: list[str], new_rank: int) -> None:
        """A truncated SVD keeps at most min(rows, cols) singular vectors of the (flattened) delta
        weight: a larger rank would build an adapter whose factors do not fit its layer (peft adds
        it and fails on the first forward)."""
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and any(a in module.lora_A or a in module.lora_embedding_A for a in adapters):
                w = module.get_base_layer().weight
                limit = min(w.shape[0], w[0].numel())
                if new_rank > limit:
                    raise ValueError(f"add_weighted_adapter: svd_rank={new_rank} exceeds min(in, out)={limit} of "
                                     f"layer {name!r}; pass svd_rank <= {limit}")

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Combine adapters into a new one: 'linear' (weighted sum of A and B), 'cat'
        (concatenated ranks, exact) or 'svd' (truncated SVD of the weighted delta); 'ties', 'dare_linear',
        'dare_ties', 'magnitude_prune' merge A and B with that method (`density`, `majority_sign_method`),
        their '_svd' forms merge the delta weights that way and then truncate as 'svd' does."""
        if adapter_name in self.peft_config:
            return
        if not adapters or weights is None or len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter needs one weight per adapter: got weights={weights!r} for "
                             f"adapters={adapters!r}")
        for a, w in zip(adapters, weights):
            if isinstance(w, bool) or not isinstance(w, (int, float, torch.Tensor)) \
                    or (isinstance(w, torch.Tensor) and w.numel() != 1) or not math.isfinite(float(w)):
                raise ValueError(f"add_weighted_adapter: the weight of adapter {a!r} must be a finite real number, "
                                 f"got {w!r}")
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 0):
            raise ValueError(f"add_weighted_adapter: svd_rank must be a positive integer (or None), got {svd_rank!r}")
        combination_type, new_rank, new_targets = self._check_add_weighted_adapter(adapters, combination_type, svd_rank)
        check_merge_arguments(combination_type, density, majority_sign_method)
        if combination_type.endswith("svd"):
            self._check_svd_rank_fits(adapters, new_rank)
        with rollback_on_error(self):  # a failure leaves no half-added adapter
            self._add_weighted_adapter(adapters, weights, adapter_name, combination_type, new_rank, new_targets,
                                       svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)

    def _add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, new_rank, new_targets,
                              svd_clamp, svd_full_matrices, svd_driver, density=None,
                              majority_sign_method="total") -> None:
        self.peft_config[adapter_name] = replace(self.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank,
                                                 target_modules=new_targets, alpha_pattern={}, rank_pattern={})
        self.inject_adapter(self.model, adapter_name)
        for m in self.model.modules():
            if isinstance(m, LoraLayer):
                for layer_name in m.adapter_layer_names:
                    d = getattr(m, layer_name)
                    if adapter_name in d:
                        d[adapter_name].requires_grad_(False)
        for key in [k for k, _ in self.model.named_modules() if self.prefix not in k]:
            _, target, _ = _get_submodules(self.model, key)
            if not isinstance(target, LoraLayer):
                continue
            if adapter_name in target.lora_A:
                tA, tB = target.lora_A[adapter_name].weight, target.lora_B[adapter_name].weight
            elif adapter_name in target.lora_embedding_A:
                tA, tB = target.lora_embedding_A[adapter_name], target.lora_embedding_B[adapter_name]
            else:
                continue
            tA.data.zero_()
            tB.data.zero_()
            pairs = [(a, w) for a, w in zip(adapters, weights) if a in target.lora_A or a in target.lora_embedding_A]
            if not pairs:
                raise ValueError("No matching LoRAs found.")

            def ab(a):
                if a in target.lora_A:
                    return target.lora_A[a].weight.data, target.lora_B[a].weight.data
                return target.lora_embedding_A[a].data, target.lora_embedding_B[a].data

            if combination_type == "cat":
                As = torch.cat([ab(a)[0] * w * target.scaling[a] for a, w in pairs], dim=0)
                Bs = torch.cat([ab(a)[1] for a, w in pairs], dim=1)
                tA.data[: As.shape[0]] = As
                tB.data[:, : Bs.shape[1]] = Bs
            elif not combination_type.endswith("svd"):  # linear, ties, dare_*, magnitude_prune: on A and B
                # A gets sign(w s) sqrt|w s|, B sqrt|w s|, so that B A carries w s
                wA, wB = [], []
                for a, w in pairs:
                    ws = float(w) * target.scaling[a]
                    wA.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                    wB.append(math.sqrt(abs(ws)))
                As, Bs = [ab(a)[0] for a, _ in pairs], [ab(a)[1] for a, _ in pairs]
                tA.data = merge_task_tensors(combination_type, As, torch.tensor(wA).to(As[0].device), density,
                                             majority_sign_method).to(As[0].dtype)
                tB.data = merge_task_tensors(combination_type, Bs, torch.tensor(wB).to(Bs[0].device), density,
                                             majority_sign_method).to(As[0].dtype)
            else:
                tA.data, tB.data = self._svd_weighted(pairs, new_rank, target, tA, tB, svd_clamp,
                                                      svd_full_matrices, svd_driver, combination_type, density,
                                                      majority_sign_method)

    @staticmethod
    def _svd_weighted(pairs, new_rank, target, tA, tB, clamp, full_matrices, driver, combination_type="svd",
                      density=None, majority_sign_method="total"):
        deltas = [target.get_delta_weight(a) for a, _ in pairs]
        weights = torch.tensor([float(w) for _, w in pairs]).to(deltas[0].device)
        delta = merge_task_tensors(combination_type, deltas, weights, density, majority_sign_method)
        conv2d = isinstance(target, Conv2d)
        if conv2d:
            delta = delta.squeeze() if target.weight.shape[2:4] == (1, 1) else delta.flatten(start_dim=1)
        if getattr(target, "fan_in_fan_out", False) or isinstance(target, Embedding):
            delta = delta.T
        U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices, driver=driver)
        U = U[:, :new_rank] @ torch.diag(S[:new_rank])
        Vh = Vh[:new_rank, :]
        if clamp is not None:
            hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        if conv2d:
            U, Vh = U.reshape(tB.shape), Vh.reshape(tA.shape)
        return Vh.to(tA.dtype), U.to(tB.dtype)
