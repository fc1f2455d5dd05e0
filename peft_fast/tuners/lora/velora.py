"""VeLoRA (Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections",
arXiv:2405.17991) as PEFT 0.21 implements it (L3): ``LoraConfig(velora_config=VeloraConfig(...))``.

The forward output is plain LoRA, ``y = base(x) + s * B(A(drop(x)))``. What changes is the
backward of the A projection: instead of the input ``x`` [T, K] it keeps one number per
sub-token, ``c = <x_g, v>`` [T, G] (x split into G groups of ``ceil(K / G)`` features, zero
padded; v a unit vector of that length), and the weight gradient of A uses the rank-1
reconstruction ``x_hat_g = scale * c_g * v``::

    dL/dA = (dL/dz)^T @ x_hat        (z = A x; exact would be (dL/dz)^T @ x)
    dL/dx = (dL/dz) @ A              (exact)

v (``lora_velora_embed[adapter]``, a persistent buffer saved in the adapter file as in PEFT) is
a random unit vector (`init_type='random'`), or the normalised mean sub-token of the training
batch, taken on every training forward (`'batch_average'`) or on the first one only
(`'batch_average_once'`).

Path: the approximate A gradient does not fit peft_fast's fused LoRA op (which keeps ``x`` for
dA), so training forwards with autograd on use PEFT's formula with `VeloraFunction` for A
(composite path; the base layer keeps no input either, its weight being frozen). Eval and
no-grad forwards are plain LoRA and take the fused op (`fusable`); merges use the plain
``s * B @ A`` delta. Models loaded in 8/4 bit refuse VeLoRA, as PEFT's bitsandbytes layers do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from .._buffer_dict import BufferDict
from .variants import LoraVariant


@dataclass
class VeloraConfig:
    """VeLoRA's settings (PEFT's ``peft.VeloraConfig``).

    Args:
        num_groups: groups the input features are split into before compression (more groups:
            smaller reconstruction error, more memory).
        scale: factor on the reconstructed activations in the backward pass.
        init_type: 'batch_average' (projection from every training batch), 'batch_average_once'
            (from the first one), or 'random'.
    """

    num_groups: int = field(
        default=64,
        metadata={
            "help": "Number of feature groups used by VeLoRA to split the input activation depth before compression."
        },
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "Scale applied to the reconstructed activations in the VeLoRA backward pass."},
    )
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(
        default="batch_average",
        metadata={
            "help": "Projection initialization strategy for VeLoRA. Supported values are "
            "`'batch_average_once'`, `'batch_average'`, and `'random'`."
        },
    )

    def __post_init__(self):
        if self.num_groups <= 0:
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}.")
        if self.scale <= 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in {"batch_average_once", "batch_average", "random"}:
            raise ValueError(
                "Unsupported `init_type` "
                f"{self.init_type!r}. Supported values are 'batch_average_once', "
                "'batch_average', and 'random'."
            )


# ---- compression helpers (PEFT's names: PEFT's tests import them from this module) -------------

def _get_group_dim(in_features: int, num_groups: int) -> int:
    return (in_features + num_groups - 1) // num_groups


def _reshape_to_grouped_subtokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[..., K] -> [T, G, ceil(K / G)], the last group zero padded."""
    group_dim = _get_group_dim(x.shape[-1], num_groups)
    padded = num_groups * group_dim
    if x.shape[-1] != padded:
        x = F.pad(x, (0, padded - x.shape[-1]))
    return x.reshape(-1, num_groups, group_dim)


def _compress_activations(x: torch.Tensor, embed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[..., K] -> [T, G]: each sub-token projected on `embed` [ceil(K / G)]."""
    return torch.einsum("tgd,d->tg", _reshape_to_grouped_subtokens(x, num_groups), embed)


def _reconstruct_activations(compressed: torch.Tensor, embed: torch.Tensor, in_features: int,
                             velora_scale: float) -> torch.Tensor:
    """[T, G] -> [T, K]: rank-1 sub-tokens ``c * embed``, padding dropped, times `velora_scale`."""
    grouped = compressed.unsqueeze(-1) * embed.view(1, 1, -1)
    return grouped.reshape(-1, compressed.shape[-1] * embed.numel())[:, :in_features] * velora_scale


def _normalize_projection(embed: torch.Tensor) -> torch.Tensor:
    """Unit vector in fp32 (all ones, normalised, for a zero vector)."""
    embed = embed.float()
    norm = torch.linalg.vector_norm(embed)
    if norm == 0:
        embed = torch.ones_like(embed)
        norm = torch.linalg.vector_norm(embed)
    return embed / norm


class VeloraFunction(torch.autograd.Function):
    """``F.linear(x, W, b)`` that saves the compressed input [T, G] instead of x for dW."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                num_groups: int, velora_scale: float) -> torch.Tensor:
        output = F.linear(input, weight, bias)
        ctx.input_shape = tuple(input.shape)
        ctx.input_dtype = input.dtype
        ctx.in_features = input.shape[-1]
        ctx.num_groups = num_groups
        ctx.velora_scale = velora_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        compressed = _compress_activations(input, embed.to(dtype=input.dtype), num_groups)
        ctx.save_for_backward(compressed, weight, embed)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        compressed, weight, embed = ctx.saved_tensors
        dtype = grad_output.dtype
        g = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)  # [T, R]
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (g @ weight.to(dtype)).reshape(ctx.input_shape).to(dtype=ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            x_hat = _reconstruct_activations(compressed.to(dtype), embed.to(dtype), ctx.in_features, ctx.velora_scale)
            grad_weight = (g.transpose(0, 1) @ x_hat).to(dtype=weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0).to(dtype=ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


_VELORA_STATE = ("lora_velora_embed", "lora_velora_initialized", "lora_velora_num_groups",
                 "lora_velora_init_type", "lora_velora_scale")


class VeloraLinearVariant(LoraVariant):
    """VeLoRA on a LoRA `Linear` (PEFT's ``VeloraLinearVariant``, same attributes and buffers)."""

    @classmethod
    def fusable(cls, module) -> bool:
        # outside training the math is plain LoRA: the fused op computes it
        return not (module.training and torch.is_grad_enabled())

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        vcfg = config.velora_config
        if not hasattr(module, "lora_velora_embed"):
            module.lora_velora_embed = BufferDict({}, persistent=True)
        for name in _VELORA_STATE[1:]:
            if not hasattr(module, name):
                setattr(module, name, {})
        # instance attribute, as in PEFT: delete_adapter and friends then see the VeLoRA state
        module.other_param_names = module.other_param_names + tuple(
            n for n in _VELORA_STATE if n not in module.other_param_names)
        module.lora_velora_num_groups[adapter_name] = vcfg.num_groups
        module.lora_velora_init_type[adapter_name] = vcfg.init_type
        module.lora_velora_scale[adapter_name] = vcfg.scale

        group_dim = _get_group_dim(module.in_features, vcfg.num_groups)
        weight = module.get_base_layer().weight
        if vcfg.init_type == "random":
            embed = _normalize_projection(torch.randn(group_dim, device=weight.device, dtype=weight.dtype))
            embed, initialized = embed.to(dtype=weight.dtype), True
        else:
            embed, initialized = torch.zeros(group_dim, device=weight.device, dtype=weight.dtype), False
        module.lora_velora_embed[adapter_name] = embed
        module.lora_velora_initialized[adapter_name] = initialized
        module._move_adapter_to_device_of_base_layer(adapter_name)

    @staticmethod
    def _maybe_update_embed(module, adapter_name: str, x: torch.Tensor) -> None:
        """Batch-average projections: the normalised mean sub-token of this batch."""
        if adapter_name not in module.lora_velora_initialized:
            return
        init_type = module.lora_velora_init_type[adapter_name]
        if init_type == "random" or (init_type == "batch_average_once" and module.lora_velora_initialized[adapter_name]):
            return
        with torch.no_grad():
            sub = _reshape_to_grouped_subtokens(x.detach(), module.lora_velora_num_groups[adapter_name])
            embed = _normalize_projection(sub.reshape(-1, sub.shape[-1]).mean(dim=0))
            target = module.lora_velora_embed[adapter_name]
            module.lora_velora_embed[adapter_name] = embed.to(device=target.device, dtype=target.dtype)
            module.lora_velora_initialized[adapter_name] = True

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        if module.training and torch.is_grad_enabled():
            VeloraLinearVariant._maybe_update_embed(module, active_adapter, x)
            after_A = VeloraFunction.apply(
                x, lora_A.weight, lora_A.bias, module.lora_velora_embed[active_adapter],
                module.lora_velora_num_groups[active_adapter], module.lora_velora_scale[active_adapter],
            )
        else:
            after_A = lora_A(x)
        return result + lora_B(after_A) * module.scaling[active_adapter]
