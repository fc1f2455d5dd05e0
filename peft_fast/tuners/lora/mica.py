"""MiCA (Minor Component Adaptation, arXiv:2604.01694): an init plus a frozen lora_B (L3).

At init lora_B takes the `r` left singular vectors of the base weight with the smallest singular
values and lora_A is zero, so the adapter starts as a no-op; only lora_A trains. Forward and merge
are plain LoRA (``s * B @ A``), so MiCA layers keep the fused LoRA op.
"""
from __future__ import annotations

from typing import Any

import torch

from ...utils.other import transpose
from .variants import LoraVariant


def _check_dtype(weight: torch.Tensor) -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")


def mica_init_linear(layer, adapter_name: str) -> None:
    """lora_B <- U[:, -r:] of the base weight [out, in], lora_A <- 0."""
    B = layer.lora_B[adapter_name].weight
    if B.device.type == "meta":  # filled from a checkpoint later
        return
    weight = layer.get_base_layer().weight
    dtype = weight.dtype
    _check_dtype(weight)
    weight = transpose(weight.to(torch.float32), getattr(layer, "fan_in_fan_out", False))
    r = layer.r[adapter_name]
    B = _minor_left_singular_vectors(weight, r, "in_features, out_features", "a layer", tuple(weight.shape))
    layer.lora_B[adapter_name].weight.data = B.to(dtype)
    layer.lora_A[adapter_name].weight.data = torch.zeros(r, weight.shape[1], device=weight.device).to(dtype)


def _minor_left_singular_vectors(weight: torch.Tensor, r: int, dims: str, what: str, shape: tuple) -> torch.Tensor:
    """[rows, r]: the left singular vectors of the r smallest singular values of fp32 `weight`;
    ValueError (PEFT's text, naming `dims`, `what` and `shape`) when r > min(weight.shape)."""
    max_r = min(weight.shape)
    if r > max_r:
        raise ValueError(
            f"MiCA requires `r` <= min({dims}) but got r={r} for {what} with "
            f"weight shape {shape} (max usable r is {max_r})."
        )
    U, _, _ = torch.linalg.svd(weight.data, full_matrices=False)
    return U[:, -r:].contiguous()


def mica_init_embedding(layer, adapter_name: str) -> None:
    """lora_embedding_B <- minor left singular vectors of weight.T [dim, num_embeddings], A <- 0."""
    if layer.lora_embedding_B[adapter_name].device.type == "meta":
        return
    weight = layer.get_base_layer().weight
    dtype = weight.dtype
    _check_dtype(weight)
    weight = weight.to(torch.float32).T
    r = layer.r[adapter_name]
    B = _minor_left_singular_vectors(weight, r, "num_embeddings, embedding_dim", "an embedding layer",
                                     tuple(layer.get_base_layer().weight.shape))
    layer.lora_embedding_B[adapter_name].data = B.to(dtype)
    layer.lora_embedding_A[adapter_name].data = torch.zeros(r, weight.shape[1], device=weight.device).to(dtype)


def register_frozen_peft_weight(layer, adapter_name: str, weight_name: str) -> None:
    """Declare `weight_name` of `adapter_name` frozen on this layer (kept frozen by set_adapter & co)."""
    frozen = dict(layer.frozen_peft_weight_names)
    frozen.setdefault(adapter_name, ())
    if weight_name not in frozen[adapter_name]:
        frozen[adapter_name] += (weight_name,)
    layer.frozen_peft_weight_names = frozen
    layer._freeze_non_trainable_peft_weights(adapter_name)


class MiCALinearVariant(LoraVariant):
    plain_forward = True

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        register_frozen_peft_weight(module, adapter_name, "lora_B")

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        A, B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + B(A(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]


class MiCAEmbeddingVariant(LoraVariant):
    plain_forward = True

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        register_frozen_peft_weight(module, adapter_name, "lora_embedding_B")
