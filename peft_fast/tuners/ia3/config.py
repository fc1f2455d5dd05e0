"""`IA3Config` with PEFT's fields, defaults and validation (L3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...utils.peft_types import PeftType


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (same fields and defaults as ``peft.IA3Config``)."""

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    feedforward_modules: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_ia3_weights: bool = field(default=True)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.IA3
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            if not self.feedforward_modules.issubset(self.target_modules):
                raise ValueError("`feedforward_modules` should be a subset of `target_modules`")
