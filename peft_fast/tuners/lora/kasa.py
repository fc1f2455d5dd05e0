"""KaSA (Knowledge-aware Singular-value Adaptation, arXiv:2412.06071) for Linear layers (L3).

1. At init the frozen base weight W [out, in] is replaced by its rank-(k - r) SVD approximation
   (k = min(in, out)): the r smallest singular components are dropped, for good (disabling or
   unloading the adapter does not bring them back, as in PEFT).
2. The update carries a learnable diagonal `lora_diag` [r] between A and B:
   ``h = W x + s * B (lora_diag * (A x))``, ``dW = s * B @ diag(lora_diag) @ A``.

Forward path: PEFT's formula (composite path). The fused LoRA op takes ``s * B @ A`` per adapter
and has no per-rank scale, so it cannot express diag(lora_diag) without rebuilding B each step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...utils.other import transpose, upcast_on_cpu
from .variants import LoraVariant


def truncate_base_weight(module, r: int) -> None:
    """Base weight <- its rank-(k - r) SVD approximation, computed in fp32, stored in its dtype."""
    base = module.get_base_layer()
    weight = base.weight
    out_features, in_features = weight.shape
    k = min(in_features, out_features)
    if r >= k:
        raise ValueError(
            f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that at least one "
            "singular component of the base weight is preserved after truncation."
        )
    keep = k - r
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    base.weight.data = ((U[:, :keep] * S[:keep]) @ Vh[:keep, :]).to(weight.dtype)


class KasaLinearVariant(LoraVariant):
    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(
                "KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear layers."
            )
        if not hasattr(module, "lora_diag"):
            # registered as an adapter layer so that it is trained, saved and loaded like lora_A/B
            module.lora_diag = nn.ParameterDict({})
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_diag",)
        r = module.r[adapter_name]
        A = module.lora_A[adapter_name].weight
        # randn is harmless: lora_B is zero at init, so the update starts at zero whatever the diagonal
        module.lora_diag[adapter_name] = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
        truncate_base_weight(module, r)

    @staticmethod
    def get_delta_weight(module, adapter: str) -> torch.Tensor:
        B, A, diag = module.lora_B[adapter].weight, module.lora_A[adapter].weight, module.lora_diag[adapter]
        (B, A, diag), back = upcast_on_cpu(B.dtype, B, A, diag)
        out = transpose((B * diag) @ A, module.fan_in_fan_out) * module.scaling[adapter]
        return out.to(back) if back else out

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        A, B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        after_A = A(module.lora_dropout[active_adapter](x))
        return result + B(after_A * module.lora_diag[active_adapter]) * module.scaling[active_adapter]


def kasa_layer_regularization_loss(module, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """``beta * sum(lora_diag ** 2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)``, in fp32 (paper Eq. 9-11)."""
    diag = module.lora_diag[adapter_name].float()
    A = module.lora_A[adapter_name].weight.float()
    B = module.lora_B[adapter_name].weight.float()
    eye = torch.eye(diag.shape[0], device=diag.device, dtype=torch.float32)
    l2 = (diag ** 2).sum()
    l3 = torch.linalg.norm(B.transpose(-1, -2) @ B - eye) + torch.linalg.norm(A @ A.transpose(-1, -2) - eye)
    return beta * l2 + gamma * l3
