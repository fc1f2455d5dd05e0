"""`LoraConfig` with PEFT's fields, defaults and validation (L3)."""
from __future__ import annotations

import warnings
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...utils.peft_types import PeftType
from .bdlora import BdLoraConfig
from .velora import VeloraConfig


@dataclass
class LoraRuntimeConfig:
    """Run-time only options; never written to adapter_config.json."""

    ephemeral_gpu_offload: bool = False


# Fields PEFT has for LoRA variants peft_fast does not implement. Their default values are
# accepted and written back unchanged (so files match PEFT's); anything else is refused.
_UNSUPPORTED_FIELDS = (
    "megatron_config", "eva_config", "corda_config", "lora_ga_config",
    "alora_invocation_tokens", "layer_replication",
    "arrow_config",
)
SUPPORTED_INITS = (True, False, "gaussian", "mica")


def _get_lora_subconfig(value, config_cls):
    """A nested sub-config as its dataclass: None, an instance, or the dict adapter_config.json holds."""
    if value is None or isinstance(value, config_cls):
        return value
    if isinstance(value, dict):
        init_keys = {f.name for f in dataclasses.fields(config_cls) if f.init}
        return config_cls(**{k: v for k, v in value.items() if k in init_keys})
    raise TypeError(f"`{config_cls.__name__}` must be a `{config_cls.__name__}`, a dict, or None.")


@dataclass
class KasaConfig:
    """KaSA (Knowledge-aware Singular-value Adaptation, arXiv:2412.06071): the base weight loses its `r`
    smallest singular components at init and the update is ``scaling * B @ diag(lora_diag) @ A``.
    `beta` weighs ``sum(lora_diag ** 2)`` and `gamma` ``||B^T B - I||_F + ||A A^T - I||_F`` in
    `LoraModel._get_kasa_loss` (to be added to the task loss by the user)."""

    beta: float = field(default=1e-4)
    gamma: float = field(default=1e-3)

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")


@dataclass
class MontecloraConfig:
    """MonteCLoRA (Monte Carlo LoRA): during training lora_A is replaced by a learned mixture of
    `num_samples` noisy copies (see `monteclora.MontecloraSampler`); eval and merges use plain LoRA."""

    num_samples: int = field(default=8)
    use_entropy: bool = field(default=False)
    dirichlet_prior: float = field(default=0.1)
    sample_scaler: float = field(default=1e-4)
    kl_loss_weight: float = field(default=1e-5)
    buffer_size: int = field(default=150)

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError("`num_samples` must be greater than 0.")
        if self.dirichlet_prior <= 0:
            raise ValueError("`dirichlet_prior` must be greater than 0.")
        if self.buffer_size <= 0:
            raise ValueError("`buffer_size` must be greater than 0.")


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA / DoRA adapter (same fields and defaults as ``peft.LoraConfig``)."""

    r: int = field(default=8, metadata={"help": "LoRA attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    lora_alpha: int = field(default=8)
    lora_dropout: float = field(default=0.0)
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_lora_weights: Union[bool, str] = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Union[list[int], dict]] = field(default=None)
    loftq_config: Union[dict, object] = field(default_factory=dict)
    eva_config: Optional[object] = field(default=None)
    corda_config: Optional[object] = field(default=None)
    lora_ga_config: Optional[object] = field(default=None)
    use_dora: bool = field(default=False)
    velora_config: Optional[Union[VeloraConfig, dict]] = field(default=None)
    alora_invocation_tokens: Optional[list[int]] = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    monteclora_config: Optional[MontecloraConfig] = field(default=None)
    layer_replication: Optional[list] = field(default=None)
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = field(default=False)
    target_parameters: Optional[list[str]] = field(default=None)
    use_bdlora: Optional[BdLoraConfig] = field(default=None)
    arrow_config: Optional[object] = field(default=None)
    kasa_config: Optional[KasaConfig] = field(default=None)
    ensure_weight_tying: bool = field(default=False)

    def to_dict(self) -> dict:
        rv = super().to_dict()
        rv.pop("runtime_config", None)
        return rv

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.monteclora_config, dict):
            self.monteclora_config = MontecloraConfig(**self.monteclora_config)
        self.kasa_config = _get_lora_subconfig(self.kasa_config, KasaConfig)
        self.velora_config = _get_lora_subconfig(self.velora_config, VeloraConfig)
        self.use_bdlora = _get_lora_subconfig(self.use_bdlora, BdLoraConfig)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be one of 'none', 'all', 'lora_only', got {self.bias!r}")
        for k, v in (self.rank_pattern or {}).items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"rank_pattern[{k!r}] should be a positive integer, got {v!r}")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights} instead."
            )
        if self.lora_bias and self.use_dora:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        init = self.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and init.lower() in ("gaussian", "mica"))):
            raise NotImplementedError(
                f"init_lora_weights={init!r} is not supported by peft_fast (supported: True, False, 'gaussian', 'mica')"
            )
        if self.loftq_config:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
            self.loftq_config = {}
        for name in _UNSUPPORTED_FIELDS:
            if getattr(self, name) not in (None, [], {}):
                raise NotImplementedError(f"LoraConfig.{name}={getattr(self, name)!r} is not supported by peft_fast")
        for name in ("use_qalora", "ensure_weight_tying"):
            if getattr(self, name):
                raise NotImplementedError(f"LoraConfig.{name}=True is not supported by peft_fast")
