"""PEFT's user helpers (``peft.helpers``) with PEFT's names, signatures and behaviour.

- `update_forward_signature` / `update_generate_signature` / `update_signature`: give a PeftModel's
  ``*args, **kwargs`` forward/generate the base model's docstring, name and annotations.
- `check_if_peft_model`: whether a local directory or Hub id holds a PEFT adapter config.
- `rescale_adapter_scale`: temporarily multiply every LoRA layer's `scaling` (floats or tensors).
- `disable_input_dtype_casting`: temporarily stop tuner layers from casting the input to the
  adapter weights' dtype (peft_fast's LoRA layers read ``cast_input_dtype_enabled`` in
  `BaseTunerLayer._cast_input_dtype`, used by every composite forward; while casting is disabled
  Linear skips its fused op and runs PEFT's formula on the uncast input).
- `DoraCaching`: cache DoRA weight norms in eval mode (`peft_fast.tuners.lora.dora`).
- `MontecloraTrainerMixin`: adds MonteCLoRA's variational loss to a Trainer's `compute_loss`.
- `KappaTuneSelector` / `find_kappa_target_modules`: pick LoRA targets by weight condition number.

No forward math lives here; the layers' own paths (fused or composite) are unchanged.
"""

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import update_wrapper
from types import MethodType
from typing import Any, Optional, Union

import torch
from torch import nn

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

from tqdm.auto import tqdm

from .config import PeftConfig
from .peft_model import PeftModel
from .tuners.lora import dora
from .tuners.lora.layer import LoraLayer
from .tuners.lora.model import LoraModel
from .tuners.tuners_utils import BaseTunerLayer

_SIGNATURE_ATTRS = ("__doc__", "__name__", "__annotations__")


def _is_args_kwargs_only(signature: inspect.Signature, allow_kwargs_only: bool = False) -> bool:
    params = signature.parameters
    if len(params) == 2 and "args" in params and "kwargs" in params:
        return True
    return allow_kwargs_only and len(params) == 1 and "kwargs" in params


def _rebind_with_parent_signature(model: PeftModel, method: str) -> None:
    """Replace ``model.<method>`` by a copy of the bound function wearing the base model class's
    docstring, name and annotations (the original function object is left untouched)."""
    func = deepcopy(getattr(model, method).__func__)
    update_wrapper(func, getattr(type(model.get_base_model()), method), assigned=_SIGNATURE_ATTRS)
    setattr(model, method, MethodType(func, model))


def update_forward_signature(model: PeftModel) -> None:
    """
    Updates the forward signature of the PeftModel to include parents class signature
        model (`PeftModel`): Peft model to update the forward signature

    Only a forward whose signature is exactly ``(*args, **kwargs)`` is updated.
    """
    if _is_args_kwargs_only(inspect.signature(model.forward)):
        _rebind_with_parent_signature(model, "forward")


def update_generate_signature(model: PeftModel) -> None:
    """
    Updates the generate signature of a PeftModel with overriding generate to include parents class signature
        model (`PeftModel`): Peft model to update the generate signature

    A model without `generate` is left alone; only ``(*args, **kwargs)`` or ``(**kwargs)`` is updated.
    """
    if not hasattr(model, "generate"):
        return
    if _is_args_kwargs_only(inspect.signature(model.generate), allow_kwargs_only=True):
        _rebind_with_parent_signature(model, "generate")


def update_signature(model: PeftModel, method: str = "all") -> None:
    """
    Updates the signature of a PeftModel include parents class signature for forward or generate method
        model (`PeftModel`): Peft model to update generate or forward signature method (`str`): method to update
        signature choose one of "forward", "generate", "all"
    """
    if method not in ("forward", "generate", "all"):
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
    if method in ("forward", "all"):
        update_forward_signature(model)
    if method in ("generate", "all"):
        update_generate_signature(model)


def check_if_peft_model(model_name_or_path: str) -> bool:
    """
    Check if the model is a PEFT model.

    Args:
        model_name_or_path (`str`):
            Model id to check, can be local or on the Hugging Face Hub.

    Returns:
        `bool`: True if the model is a PEFT model, False otherwise. Any failure to load a PEFT config
        (missing or broken file, unknown repo, no network) counts as False.
    """
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # broad on purpose: Hub errors change over time
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """
    Context manager to temporarily rescale the scaling of the LoRA adapter in a model.

    The original scaling values are restored when the context manager exits. For LoRA, a multiplier in
    [0, 1] is equivalent to wise-ft (https://huggingface.co/papers/2109.01903).

    Args:
        model: The model containing `LoraLayer` modules whose scaling is to be adjusted.
        multiplier (float or int):
            The multiplier that rescales the `scaling` attribute. Must be of type float or int.

    Raises:
        ValueError: If the model does not contain any `LoraLayer`
            instances, indicating that the model does not support scaling.
    """
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")

    # a new dict per layer (never mutated in place), so the originals, tensor scalings included,
    # come back untouched and the layers' scaling-keyed caches see a changed value
    original_scaling = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            original_scaling[module] = module.scaling.copy()
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}

    if not original_scaling:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in original_scaling.items():
            module.scaling = scaling


_MISSING = object()


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """
    Context manager disables input dtype casting to the dtype of the weight.

    Useful where dtypes are handled by forward hooks (e.g. diffusers' layerwise casting), with which
    PEFT's own cast would interfere.

    Parameters:
        model (nn.Module):
            The model containing PEFT modules whose input dtype casting is to be adjusted.
        active (bool):
            Whether the context manager is active (default) or inactive.
    """
    if not active:
        yield
        return

    original_values = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            original_values[name] = module.__dict__.get("cast_input_dtype_enabled", _MISSING)
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer) or name not in original_values:
                continue
            value = original_values[name]
            if value is _MISSING:  # the layer relied on the class default (True)
                module.__dict__.pop("cast_input_dtype_enabled", None)
            else:
                module.cast_input_dtype_enabled = value


class MontecloraTrainerMixin:
    """
    Mixin class for adding Monteclora variational loss to the Trainer's compute_loss method.

    Use with any Trainer class (Trainer, SFTTrainer, ...)::

        class MontecloraTrainer(MontecloraTrainerMixin, Trainer):
            pass
    """

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """
        Compute loss with Monteclora variational regularization: the task loss plus the variational
        loss (KL divergence + entropy) of the MonteCLoRA samplers, averaged over the LoraModels found
        (normally one; 0.0 for plain LoRA).

        Returns:
            loss or (loss, outputs) depending on return_outputs
        """
        if return_outputs:
            task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        else:
            task_loss = super().compute_loss(model, inputs, return_outputs=False, **kwargs)
            outputs = None

        monteclora_loss = 0.0
        num_lora_models = 0
        for module in model.modules():
            if isinstance(module, LoraModel):
                monteclora_loss = monteclora_loss + module._get_monteclora_loss()
                num_lora_models += 1
        if num_lora_models > 1:
            monteclora_loss = monteclora_loss / num_lora_models

        total_loss = task_loss + monteclora_loss
        return (total_loss, outputs) if return_outputs else total_loss


class DoraCaching:
    """Context manager to enable DoRA caching, which improves speed of DoRA inference at the expense of memory.

    With active caching, each DoRA adapter's weight norm (base weight + LoRA weight) is cached. Even within the
    caching context, if the model is in training mode, caching is disabled. When the model switches to training mode,
    the cache is cleared. ``DoraCaching()(enabled=True)`` enables caching permanently, ``(enabled=False)`` disables it.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prev_value = None

    def __enter__(self):
        self.prev_value = dora.ENABLE_DORA_CACHING
        dora.ENABLE_DORA_CACHING = self.enabled

    def __exit__(self, type, value, traceback):
        dora.ENABLE_DORA_CACHING = self.prev_value
        self.prev_value = None

    def __call__(self, enabled: bool = True):
        dora.ENABLE_DORA_CACHING = enabled


def _condition_number(w: torch.Tensor) -> float:
    """sigma_max / (sigma_min + 1e-8) of a 2D view of `w`."""
    s = torch.linalg.svdvals(w.view(w.size(0), -1))
    return (s[0] / (s[-1] + 1e-8)).item()


def _dense_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """fp32 copy of a Linear weight, dequantized when it is a bitsandbytes 4-bit / int8 weight."""
    if bnb is not None:
        if hasattr(weight, "quant_state"):
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        if hasattr(weight, "state") and hasattr(weight.state, "CB"):
            return bnb.functional.int8_vectorwise_dequant(weight.state.CB, weight.state.SCB).float()
    return weight.data.detach().float()


def _select(scores: dict[str, float], top_p, num_modules, threshold) -> list[str]:
    """Names sorted by ascending score, cut by num_modules, else top_p, else threshold."""
    ranked = sorted(scores.items(), key=lambda kv: kv[1])
    if num_modules is not None:
        return [name for name, _ in ranked[: min(num_modules, len(ranked))]]
    if top_p is not None:
        return [name for name, _ in ranked[: max(1, int(len(ranked) * top_p))]]
    if threshold is not None:
        return [name for name, kappa in ranked if kappa <= threshold]
    return [name for name, _ in ranked]


class KappaTuneSelector:
    """
    Lightweight utility to compute per-module / per-parameter condition numbers and return the best LoRA targets.

    Supports nn.Linear modules (returned as `target_modules`) and fused MoE weights stored as 3D
    nn.Parameter (``gate_up_proj`` / ``down_proj`` / ``gate_proj`` / ``up_proj``; returned as
    `target_parameters`, condition number averaged over experts). Matrices with a dimension above
    `max_dim_size_to_analyze` are skipped. SVD can take minutes on large models; `show_progress`
    toggles the progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        max_dim_size_to_analyze: int = 16384,
        moe_param_suffixes: Optional[tuple[str, ...]] = None,
        show_progress: bool = True,
    ):
        self.model = model
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        self.show_progress = show_progress
        self.moe_param_suffixes = moe_param_suffixes or (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")
        self._condition_numbers: Optional[dict[str, float]] = None
        self._parameter_condition_numbers: Optional[dict[str, float]] = None

    def _progress(self, items: list, desc: str, unit: str):
        return tqdm(items, desc=desc, unit=unit) if self.show_progress else items

    def _compute_kappas(self) -> None:
        if self._condition_numbers is not None:
            return
        limit = self.max_dim_size_to_analyze

        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        condition_numbers: dict[str, float] = {}
        for name, module in self._progress(linears, "Computing SVD (linear layers)", "layer"):
            w = _dense_linear_weight(module.weight)
            if any(dim > limit for dim in w.shape):
                continue
            condition_numbers[name] = _condition_number(w)
        self._condition_numbers = condition_numbers

        moe_params = [
            (n, p) for n, p in self.model.named_parameters()
            if any(n.endswith(s) for s in self.moe_param_suffixes) and p.dim() == 3
        ]
        parameter_condition_numbers: dict[str, float] = {}
        for name, param in self._progress(moe_params, "Computing SVD (MoE parameters)", "param"):
            w = param.data.detach().float()
            if any(dim > limit for dim in w.shape[1:]):
                continue
            kappas = [_condition_number(w[e]) for e in range(w.shape[0])]
            parameter_condition_numbers[name] = sum(kappas) / len(kappas)
        self._parameter_condition_numbers = parameter_condition_numbers

    def get_best_targets(
        self, top_p: Optional[float] = None, num_modules: Optional[int] = None, threshold: Optional[float] = None
    ) -> list[str]:
        """Linear module names with the lowest condition numbers (see `_select` for the cut)."""
        return self._best("_condition_numbers", top_p, num_modules, threshold)

    def get_best_target_parameters(
        self, top_p: Optional[float] = None, num_modules: Optional[int] = None, threshold: Optional[float] = None
    ) -> list[str]:
        """Fused MoE parameter names with the lowest condition numbers."""
        return self._best("_parameter_condition_numbers", top_p, num_modules, threshold)

    def _best(self, attr: str, top_p, num_modules, threshold) -> list[str]:
        self._compute_kappas()
        numbers = getattr(self, attr)
        return _select(numbers, top_p, num_modules, threshold) if numbers else []


def find_kappa_target_modules(
    model: nn.Module,
    top_p: float = 0.2,
    max_dim_size_to_analyze: int = 16384,
    moe_param_suffixes: Optional[tuple[str, ...]] = None,
    show_progress: bool = True,
) -> dict[str, Optional[list[str]]]:
    """
    One-liner convenience function for KappaTune target selection. Returns both target_modules and target_parameters.

    Args:
        model (nn.Module): Base model whose weights will be analyzed for condition numbers.
        top_p (float, optional): Fraction of candidates with the lowest condition numbers to select.
        max_dim_size_to_analyze (int, optional): Largest matrix dimension analyzed via SVD. Defaults to 16384.
        moe_param_suffixes (Optional[tuple[str, ...]], optional): Name suffixes of fused MoE tensors.
        show_progress (bool, optional): Show a progress bar while computing condition numbers.

    Returns:
        ``{"target_modules": [...], "target_parameters": [...] or None}`` (None without MoE tensors).
    """
    selector = KappaTuneSelector(
        model,
        max_dim_size_to_analyze=max_dim_size_to_analyze,
        moe_param_suffixes=moe_param_suffixes,
        show_progress=show_progress,
    )
    target_modules = selector.get_best_targets(top_p=top_p)
    target_parameters = selector.get_best_target_parameters(top_p=top_p) or None
    return {"target_modules": target_modules, "target_parameters": target_parameters}
