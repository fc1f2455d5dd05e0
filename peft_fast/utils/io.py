"""Atomic file writes and safe checkpoint reads: nothing half-written, nothing unpickled unsafely."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import torch


@contextmanager
def _atomic_path(path: str):
    """Yield a temp path in the target's directory; rename onto `path` only on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage: give it plain copies where needed
    clean = {}
    seen = set()
    for k, v in tensors.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if not v.is_contiguous() or ptr in seen:
            v = v.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        clean[k] = v
    with _atomic_path(path) as tmp:
        save_file(clean, tmp, metadata=metadata or {"format": "pt"})


def atomic_torch_save(obj, path: str) -> None:
    with _atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_weights_file(path: str, device: str | torch.device = "cpu") -> dict:
    """Read adapter weights: safetensors, or a torch pickle with ``weights_only=True`` only."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except Exception as exc:  # noqa: BLE001 - re-raised, same type where possible, with the file named
            raise _with_path(exc, f"Could not read adapter weights from {path!r} (corrupt or truncated "
                                  f"safetensors file?): {exc}") from exc
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"Refusing to load {path!r}: it is not a safetensors file and could not be read with "
            f"torch.load(weights_only=True) ({exc}). Convert it to safetensors or load it from a trusted source."
        ) from exc


def _with_path(exc: Exception, message: str) -> Exception:
    """`exc`'s type with `message` (callers catching e.g. SafetensorError still catch it), or a
    ValueError where that type cannot be built from a message."""
    try:
        new = type(exc)(message)
    except Exception:  # noqa: BLE001 - constructors with other signatures
        return ValueError(message)
    return new if str(new) == message else ValueError(message)
