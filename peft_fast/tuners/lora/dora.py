"""DoRA inference caching (PEFT's ``peft.tuners.lora.dora.ENABLE_DORA_CACHING``).

`peft.helpers.DoraCaching` flips `ENABLE_DORA_CACHING`. While it is on and the layer is in eval
mode, a DoRA layer's per-adapter weight norm ``||W + s B A||`` is computed once and kept in the
adapter's magnitude module (``lora_magnitude_vector[name]._dora_cache``, PEFT's attribute name);
any forward with caching off or in training mode, and switching to training mode, clears it. As in
PEFT the cache is not keyed on the weights: change weights only outside the caching context.
"""
from typing import Any, Callable

ENABLE_DORA_CACHING = False
"""Whether to enable DoRA caching, which makes it faster at inference but requires more memory"""


def cached_dora_value(layer, adapter: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, memoized in the adapter's magnitude module while caching is on in eval mode."""
    magnitude = layer.lora_magnitude_vector[adapter]
    cache = magnitude.__dict__.setdefault("_dora_cache", {})  # also for magnitudes built before caching existed
    if not ENABLE_DORA_CACHING or layer.training:
        cache.clear()
        return compute()
    cache_key = f"{key}-{adapter}"
    value = cache.get(cache_key)
    if value is None:
        value = compute()
        cache[cache_key] = value
    return value
