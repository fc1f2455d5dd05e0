"""Optional-dependency probes with PEFT's names (``peft.import_utils``).

Every probe is cheap: it asks `importlib.util.find_spec` / `importlib.metadata` whether a package is
installed and only imports it where PEFT does (to look for an attribute or a device). Results are
cached with `functools.lru_cache`, as PEFT does, so a probe runs once per process (tests can reset
one with ``probe.cache_clear()``). The minimum versions and error texts are PEFT's.
"""

import importlib
import importlib.metadata as importlib_metadata
import importlib.util
import platform
from functools import lru_cache

import packaging.version
import torch
import transformers

_V = packaging.version.parse
_TRANSFORMERS_VERSION = _V(transformers.__version__)

# transformers version flags (module-level booleans, as in PEFT)
is_transformers_ge_v5 = _TRANSFORMERS_VERSION >= _V("5.0.0.dev0")
is_transformers_ge_v5_1_0 = _TRANSFORMERS_VERSION >= _V("5.1.0")
is_transformers_ge_v5_4_0 = _TRANSFORMERS_VERSION >= _V("5.4.0")
is_transformers_ge_v5_6_0 = _TRANSFORMERS_VERSION >= _V("5.6.0.dev0")
# 5.13.0 introduced `distributed_config` for `from_pretrained` (replacing `tp_plan` / `tp_size`)
is_transformers_ge_v5_13_0 = _TRANSFORMERS_VERSION >= _V("5.13.0.dev0")
is_transformers_le_4_53 = _TRANSFORMERS_VERSION < _V("4.54.0.dev0")
is_transformers_ge_v5_17_0 = _TRANSFORMERS_VERSION >= _V("5.17.0")

try:
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism  # noqa: F401

    is_transformers_dtensor_tp = True
except ImportError:
    is_transformers_dtensor_tp = False


def _installed(name: str) -> bool:
    """Whether top-level package `name` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


@lru_cache
def is_bnb_available() -> bool:
    """bitsandbytes is installed."""
    return _installed("bitsandbytes")


@lru_cache
def is_bnb_4bit_available() -> bool:
    """bitsandbytes is installed and has `nn.Linear4bit`."""
    if not is_bnb_available():
        return False
    import bitsandbytes as bnb

    return hasattr(bnb.nn, "Linear4bit")


@lru_cache
def is_optimum_available() -> bool:
    """optimum is installed."""
    return _installed("optimum")


@lru_cache
def is_gptqmodel_available() -> bool:
    """gptqmodel >= 7.0.0 with optimum >= 1.24.0 is installed; False without gptqmodel, ImportError
    (PEFT's texts) when either version is too old or optimum is missing."""
    if not _installed("gptqmodel"):
        return False
    gptqmodel_min, optimum_min = _V("7.0.0"), _V("1.24.0")
    found = _V(importlib_metadata.version("gptqmodel"))
    if found < gptqmodel_min:
        raise ImportError(
            f"Found an incompatible version of gptqmodel. Found version `{found}`, "
            f"but only versions `{gptqmodel_min}` or higher are supported"
        )
    if not is_optimum_available():
        raise ImportError(f"gptqmodel requires optimum version `{optimum_min}` or higher to be installed.")
    try:
        optimum_found = _V(importlib_metadata.version("optimum"))
    except importlib_metadata.PackageNotFoundError:
        # spec found but no metadata (seen in the wild): optimistically assume it is recent enough
        return True
    if optimum_found < optimum_min:
        raise ImportError(
            f"gptqmodel requires optimum version `{optimum_min}` or higher. Found version `{optimum_found}`, "
            f"but only versions above `{optimum_min}` are supported"
        )
    return True


@lru_cache
def is_torch_tpu_available(check_device=True) -> bool:
    "Checks if `torch_xla` is installed and potentially if a TPU is in the environment"
    if not _installed("torch_xla"):
        return False
    if not check_device:
        return True
    try:  # raises RuntimeError when no XLA device is found
        import torch_xla.core.xla_model as xm

        xm.xla_device()
        return True
    except RuntimeError:
        return False


@lru_cache
def is_aqlm_available() -> bool:
    """aqlm is installed."""
    return _installed("aqlm")


@lru_cache
def is_eetq_available() -> bool:
    """eetq is installed."""
    return _installed("eetq")


@lru_cache
def is_hqq_available() -> bool:
    """hqq is installed."""
    return _installed("hqq")


@lru_cache
def is_inc_available() -> bool:
    """Intel Neural Compressor (`neural_compressor`) is installed."""
    return _installed("neural_compressor")


@lru_cache
def is_torchao_available() -> bool:
    """torchao >= 0.16.0 is installed; ImportError (PEFT's text) for an older one."""
    if not _installed("torchao"):
        return False
    minimum = _V("0.16.0")
    try:
        found = _V(importlib_metadata.version("torchao"))
    except importlib_metadata.PackageNotFoundError:
        # spec found but no metadata: treated as unavailable, as PEFT does
        return False
    if found < minimum:
        raise ImportError(
            f"Found an incompatible version of torchao. Found version {found}, "
            f"but only versions above {minimum} are supported"
        )
    return True


@lru_cache
def is_torchao_ge_v0_18_0() -> bool:
    """Return True if torchao is installed and its version is >= 0.18.0 (v2 tensor subclasses only)."""
    if not is_torchao_available():
        return False
    return _V(importlib_metadata.version("torchao")) >= _V("0.18.0")


@lru_cache
def is_xpu_available(check_device=False) -> bool:
    """
    Checks if XPU acceleration is available and potentially if a XPU is in the environment
    """
    if platform.system() == "Darwin":
        return False
    if check_device:
        try:  # raises RuntimeError when no XPU is found
            torch.xpu.device_count()
            return torch.xpu.is_available()
        except RuntimeError:
            return False
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@lru_cache
def is_diffusers_available() -> bool:
    """diffusers is installed."""
    return _installed("diffusers")


@lru_cache
def is_te_available() -> bool:
    """NVIDIA Transformer Engine (`transformer_engine`) is installed."""
    return _installed("transformer_engine")


@lru_cache
def is_te_pytorch_available() -> bool:
    """Transformer Engine is installed with its PyTorch backend."""
    if not is_te_available():
        return False
    import transformer_engine

    return hasattr(transformer_engine, "pytorch")
