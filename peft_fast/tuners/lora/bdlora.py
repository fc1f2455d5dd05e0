"""BD-LoRA (block-diagonal LoRA) as PEFT 0.21 implements it (L3):
``LoraConfig(use_bdlora=BdLoraConfig(target_modules_bd_a=[...], target_modules_bd_b=[...], nblocks=n))``.

On a module matching `target_modules_bd_a`, lora_A is block diagonal, on one matching
`target_modules_bd_b` lora_B is: n blocks on the diagonal, zeros elsewhere, so that a model
sharded n ways for serving keeps each shard's LoRA factor local (row-sharded layers: A
block-diagonal; column-sharded: B). `BlockDiagonalLinear` stores the blocks packed: a weight
[out, in / n] whose row chunk i is block i ([out / n, in / n]). State-dict keys and shapes are
PEFT's (``lora_A.weight`` [r, in / n] for A, ``lora_B.weight`` [out, r / n] for B).

Initialisation as PEFT: the plain LoRA factors are made and initialised first (same random
stream), then the block-diagonal factor replaces one of them: A with ``kaiming_uniform_`` (a=0),
B with zeros, whatever `init_lora_weights` says.

Path: the math is plain LoRA with a structured factor, so the forward goes through peft_fast's
fused LoRA op with the dense factor ``block_diag(blocks)`` (built by a differentiable op, so
the packed weight gets its gradient through it; the zeros add nothing). Merges use the dense
factor too (PEFT's delta, in the base layer's dtype). The fused op draws its own dropout masks
(as for plain LoRA); mixed-adapter batches take PEFT's per-adapter loop. Layers of models loaded
in 8/4 bit take a BD-LoRA config as plain LoRA, as PEFT's bitsandbytes layers do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ...utils.other import transpose
from .variants import LoraVariant


@dataclass
class BdLoraConfig:
    """BD-LoRA's settings (PEFT's ``peft.tuners.lora.config.BdLoraConfig``).

    Args:
        target_modules_bd_a: patterns (``pattern in module_name``) of modules whose lora_A is
            block-diagonal (row-sharded layers: out/down projections).
        target_modules_bd_b: patterns of modules whose lora_B is block-diagonal (column-sharded
            layers: q/k/v, up/gate projections).
        nblocks: number of blocks (the serving shard count).
        match_strict: every targeted module must match one of the two lists (else ValueError).
    """

    target_modules_bd_a: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules where the LoRA-A is block-diagonal. Matches each pattern in the list against the "
            "module name via `pattern is in target_name`. "
            "Usually one should specify the q,k,v,up and gate projections here. "
            "Example: ['up_proj', 'q_proj', 'v_proj', 'k_proj']"
        },
    )
    target_modules_bd_b: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules where the LoRA-B is block-diagonal. Matches each pattern in the list against the module "
            "name via `pattern is in target_name`. Usually, one should specify out and down projections here. "
            "Example: ['out_proj', 'down_proj']"
        },
    )
    nblocks: int = field(
        default=1,
        metadata={
            "help": "Number of blocks each block-diagonal matrix has. If using BD-LoRA to speed up inference, "
            "set it to be equal to the desired sharding degree during serving."
        },
    )
    match_strict: bool = field(
        default=True,
        metadata={
            "help": "If set to true, requires each target_module to have either a block-diagonal LoRA-A or LoRA-B, "
            "and raises an error otherwise. You can set this to False to mix LoRA and BD-LoRA training, "
            "e.g. if some layers in your module do not benefit from BD-LoRA."
        },
    )

    def __post_init__(self):
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError(
                "Found overlapping modules in target_modules_bd lists:"
                f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B)."
            )


class BlockDiagonalLinear(nn.Module):
    """``x @ block_diag(W_1..W_n)^T`` without a bias; `weight` [out, in / n] holds the blocks
    W_i [out / n, in / n] stacked along dim 0 (PEFT's layout)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, init_zero: bool = False,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        if in_features % nblocks != 0 or out_features % nblocks != 0:
            raise ValueError(
                f"self.in_features={self.in_features} or self.out_features={self.out_features} not divisible by {self.nblocks}"
            )
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, dtype=dtype,
                                               device=device or torch.device("cpu")))
        if init_zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        nb = self.nblocks
        m, n = x.shape[-1] // nb, self.out_features // nb
        out = torch.einsum("bim,inm->bin", x.reshape(x.shape[0], nb, m), self.weight.view(nb, n, m))
        return out.reshape(*lead, -1)

    def weight_as_blockdiagonal_matrix(self) -> torch.Tensor:
        """The dense [out, in] matrix: blocks on the diagonal, zeros elsewhere (differentiable)."""
        return torch.block_diag(*torch.chunk(self.weight, self.nblocks, dim=0))


def _dense(module: nn.Module) -> torch.Tensor:
    return module.weight_as_blockdiagonal_matrix() if isinstance(module, BlockDiagonalLinear) else module.weight


class BdLoraLinearVariant(LoraVariant):
    """BD-LoRA on a LoRA `Linear` (PEFT's ``BdLoraLinearVariant``)."""

    plain_forward = True  # B A x * s with dense factors: see `lora_weights`

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        bd = config.use_bdlora
        if isinstance(bd, dict):  # from a saved config
            bd = BdLoraConfig(**bd)
        target_name = kwargs.get("target_name", "") or ""
        in_a = any(p in target_name for p in bd.target_modules_bd_a or [])
        in_b = any(p in target_name for p in bd.target_modules_bd_b or [])
        if in_a and in_b:
            raise ValueError(f"Target {target_name} matches both A and B block-diagonal patterns")
        if bd.match_strict and not (in_a or in_b):
            raise ValueError(
                f"Target {target_name} matches neither A nor B block-diagonal patterns."
                "If this is intentional, set match_strict=False in BdLoraConfig during initialization. "
            )
        weight = module.get_base_layer().weight
        if in_a:
            module.lora_A[adapter_name] = BlockDiagonalLinear(
                module.in_features, module.lora_A[adapter_name].out_features, nblocks=bd.nblocks, init_zero=False,
                dtype=weight.dtype, device=weight.device)
        elif in_b:
            module.lora_B[adapter_name] = BlockDiagonalLinear(
                module.lora_B[adapter_name].in_features, module.out_features, nblocks=bd.nblocks, init_zero=True,
                dtype=weight.dtype, device=weight.device)

    @staticmethod
    def lora_weights(module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (A [r, in], B [out, r]) for the fused op; gradients flow back to the blocks."""
        return _dense(module.lora_A[adapter]), _dense(module.lora_B[adapter])

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module._cast_input_dtype(module.lora_dropout[active_adapter](x), lora_A.weight.dtype)
        return result + lora_B(lora_A(x)) * module.scaling[active_adapter]

    @staticmethod
    def get_delta_weight(module, adapter: str) -> torch.Tensor:
        """``s * B @ A`` of the dense factors, in the base layer's dtype (fp32 math for 16-bit on CPU)."""
        dtype = module.get_base_layer().weight.dtype
        A, B = _dense(module.lora_A[adapter]), _dense(module.lora_B[adapter])
        if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        return (transpose(B @ A, module.fan_in_fan_out) * module.scaling[adapter]).to(dtype)
