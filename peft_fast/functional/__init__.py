"""Two things share this name:

- Layer L2: one torch.autograd.Function per fused op, backward derived in its docstring
  (`lora_linear`, `dora_linear`, `ia3_linear`, `qlora_linear`).
- PEFT's ``peft.functional``: the functions integrations (transformers, diffusers) call on any
  nn.Module: `inject_adapter_in_model`, `set_adapter`, `delete_adapter`, `set_requires_grad`,
  `cast_adapter_dtype`, `get_peft_model_state_dict`, `set_peft_model_state_dict`. They are loaded
  on first use (the adapter layers import this package, so importing the tuners here would be a cycle).
"""
from .dora import dora_linear
from .ia3 import ia3_linear
from .lora import lora_linear
from .qlora import qlora_linear

# PEFT's peft.functional names -> the peft_fast module that defines them
_PEFT_FUNCTIONAL = {
    "cast_adapter_dtype": "peft_fast.tuners.tuners_utils",
    "delete_adapter": "peft_fast.tuners.tuners_utils",
    "get_peft_model_state_dict": "peft_fast.utils.save_and_load",
    "inject_adapter_in_model": "peft_fast.mapping",
    "set_adapter": "peft_fast.tuners.tuners_utils",
    "set_peft_model_state_dict": "peft_fast.utils.save_and_load",
    "set_requires_grad": "peft_fast.tuners.tuners_utils",
}

__all__ = ["lora_linear", "dora_linear", "ia3_linear", "qlora_linear", *sorted(_PEFT_FUNCTIONAL)]


def __getattr__(name: str):
    module = _PEFT_FUNCTIONAL.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PEFT_FUNCTIONAL))
