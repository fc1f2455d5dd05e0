"""`BufferDict`: a dict of buffers registered on a module (PEFT's ``peft.tuners._buffer_dict``).

Adapter state that is not trained (e.g. VeLoRA's projection ``lora_velora_embed``) lives here:
it moves with ``.to()``, and with ``persistent=True`` it is part of the state dict (and so of
the adapter file, as in PEFT).
"""
from __future__ import annotations

import collections.abc
from collections import OrderedDict

import torch
from torch.nn import Module


class BufferDict(Module):
    """Buffers indexed like a dict, in insertion order; `persistent` applies to every entry."""

    def __init__(self, buffers=None, persistent: bool = False):
        super().__init__()
        self.persistent = persistent
        if buffers is not None:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.keys())

    def __contains__(self, key) -> bool:
        return key in self._buffers

    def clear(self) -> None:
        self._buffers.clear()
        self._non_persistent_buffers_set.clear()

    def pop(self, key: str) -> torch.Tensor:
        v = self[key]
        del self[key]
        return v

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()

    def values(self):
        return self._buffers.values()

    def update(self, buffers) -> None:
        if not isinstance(buffers, collections.abc.Iterable):
            raise TypeError(
                "BuffersDict.update should be called with an iterable of key/value pairs, but got "
                + type(buffers).__name__
            )
        if isinstance(buffers, (OrderedDict, BufferDict)):
            pairs = buffers.items()
        elif isinstance(buffers, collections.abc.Mapping):
            pairs = sorted(buffers.items())
        else:
            pairs = []
            for j, p in enumerate(buffers):
                if not isinstance(p, collections.abc.Iterable) or len(p) != 2:
                    raise ValueError(f"BufferDict update sequence element #{j} must be a (key, buffer) pair, got {p!r}")
                pairs.append(tuple(p))
        for key, buffer in pairs:
            self[key] = buffer

    def extra_repr(self) -> str:
        lines = []
        for k, p in self._buffers.items():
            size_str = "x".join(str(size) for size in p.size())
            device_str = "" if not p.is_cuda else f" (GPU {p.get_device()})"
            lines.append(f"  ({k}): Buffer containing: [{torch.typename(p)} of size {size_str}{device_str}]")
        return "\n".join(lines)
