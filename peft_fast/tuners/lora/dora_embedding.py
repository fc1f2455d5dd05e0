"""DoRA on nn.Embedding (L3), PEFT's ``DoraEmbeddingLayer`` / ``DoraEmbeddingVariant`` math.

The embedding weight W [num_embeddings, dim] acts as the transposed weight of a linear map, so
DoRA's magnitude is per embedding dimension: m [dim] starts as ||W^T + s B A|| over each row of
W^T (a column of W). Forward (composite path, PEFT's formula; no dropout, as in PEFT):

    c = m / ||W^T + s B A||          (detached norm, [dim])
    y = c * E(x) + c * (emb(x, A^T) @ B^T) * s   (* embed_scale on the second term)

where E(x) is the base layer's output. Merging writes W <- c (W + dW) with the norm of the
unmerged weight, cached to unmerge.
"""
from __future__ import annotations

import torch

from .dora import cached_dora_value


def dora_embedding_init_norm(layer, adapter: str) -> torch.Tensor:
    """||W^T + s B A|| per embedding dim, [dim], as PEFT's DoraLinearLayer.update_layer computes it
    (fp16 factors multiplied in fp32, then rounded back to fp16)."""
    A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    fp16 = A.dtype == torch.float16
    lora_weight = (B.float() @ A.float()).half() if fp16 else B @ A
    weight = layer.get_base_layer().weight.to(A.device).T
    full = weight + layer.scaling[adapter] * lora_weight
    return torch.linalg.norm(full, dim=1).to(full.dtype)


def dora_embedding_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W^T + dW^T|| per embedding dim, [dim], for merges (delta already scaled)."""
    full = weight.T + delta.T
    return torch.linalg.norm(full, dim=1).to(full.dtype)


def dora_embedding_forward(layer, adapter: str, x: torch.Tensor, result: torch.Tensor,
                           embed_scale) -> torch.Tensor:
    """`result` (the base output plus earlier adapters) with DoRA adapter `adapter` applied."""
    A_t, B_t = layer.lora_embedding_A[adapter].T, layer.lora_embedding_B[adapter].T  # [V, r], [r, dim]
    scaling = layer.scaling[adapter]
    lora_weight = (A_t @ B_t).T  # [dim, V]
    weight = layer.get_base_layer().weight

    def norm() -> torch.Tensor:  # DoRA section 4.3: the norm is treated as a constant (no gradient)
        full = weight.T + scaling * lora_weight.detach()
        return torch.linalg.norm(full, dim=1).to(full.dtype).detach()

    weight_norm = cached_dora_value(layer, adapter, "weight-norm", norm)
    mag_norm_scale = layer.lora_magnitude_vector[adapter].weight / weight_norm
    dora_result = mag_norm_scale * (layer._embed(x, A_t) @ B_t) * scaling
    if embed_scale is not None:
        dora_result = dora_result * embed_scale.to(dora_result.dtype)
    return mag_norm_scale * result + dora_result
