"""LoRA variants as PEFT models them (L3): a `LoraVariant` hooks a layer's init, forward and merge
for one adapter; `resolve_lora_variant` picks it from the config, as PEFT's ``LoraLayer.resolve_lora_variant``.

DoRA is not a variant here (layer.py builds it into the fused ops), but it takes part in the
resolution so that combinations PEFT refuses (e.g. DoRA + KaSA) are refused with PEFT's text.
The variants themselves live one per file: kasa.py, monteclora.py, mica.py.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class LoraVariant:
    """Per-adapter hooks of a LoRA variant (static methods, as PEFT's ``LoraVariant``).

    `plain_forward` True means the variant computes plain LoRA (``B A x * s``), so the fused op
    stays usable; otherwise the layer calls `forward` on its composite path."""

    plain_forward = False

    @classmethod
    def fusable(cls, module) -> bool:
        """Whether the layer may take the fused LoRA op for this adapter now."""
        return cls.plain_forward

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        pass

    @staticmethod
    def lora_weights(module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) as dense matrices, what the fused op takes (BD-LoRA expands its blocks)."""
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight

    @staticmethod
    def get_delta_weight(module, adapter: str) -> Optional[torch.Tensor]:
        """The merge delta, or None for the layer's own ``s * B @ A``."""
        return None

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError


def _requested(config) -> tuple[str, ...]:
    keys = []
    if getattr(config, "use_dora", False):
        keys.append("use_dora")
    if getattr(config, "kasa_config", None):
        keys.append("kasa_config")
    if getattr(config, "monteclora_config", None):
        keys.append("monteclora_config")
    if getattr(config, "init_lora_weights", None) == "mica":
        keys.append("mica")
    if getattr(config, "velora_config", None):
        keys.append("velora_config")
    if getattr(config, "use_bdlora", None):
        keys.append("use_bdlora")
    return tuple(sorted(keys))


def linear_variants() -> dict:
    from .kasa import KasaLinearVariant
    from .mica import MiCALinearVariant
    from .monteclora import MontecloraLinearVariant

    return {(): None, ("use_dora",): None, ("kasa_config",): KasaLinearVariant,
            ("monteclora_config",): MontecloraLinearVariant, ("mica",): MiCALinearVariant,
            ("velora_config",): VeloraLinearVariant, ("use_bdlora",): BdLoraLinearVariant}


def embedding_variants() -> dict:
    from .mica import MiCAEmbeddingVariant

    return {(): None, ("use_dora",): None, ("mica",): MiCAEmbeddingVariant}


def conv_variants() -> dict:
    return {(): None, ("use_dora",): None}


def resolve_lora_variant(mapping: dict, config) -> Optional[LoraVariant]:
    """The variant `config` asks for on a layer whose supported variants are `mapping`
    (None for plain LoRA or DoRA); PEFT's ValueError for a combination the layer lacks."""
    if config is None:
        return None
    keys = _requested(config)
    if keys not in mapping:
        raise ValueError(f"Invalid or unsupported variant combination: {keys}")
    cls = mapping[keys]
    return cls() if cls is not None else None


# PEFT defines every variant in this module; here each lives in its own file and is re-exported.
# Those files import LoraVariant from here, so these imports come last (the package __init__
# imports this module before any variant file).
from .bdlora import BdLoraLinearVariant, BlockDiagonalLinear  # noqa: E402,F401
from .velora import VeloraLinearVariant  # noqa: E402,F401
