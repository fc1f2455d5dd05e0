"""Shared helpers of the train / env / merge commands: user-facing errors, devices, dtypes,
directories written atomically (DESIGN.md: nothing half-written to disk)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

# Files a tokenizer may consist of (transformers' slow and fast tokenizers, sentencepiece, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "tiktoken.model", "chat_template.jinja", "chat_template.json",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 2."""


def report(prog: str, err: BaseException) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def require_dir(path: str, what: str, marker: Optional[str] = None, hint: str = "") -> Path:
    """`path` as a Path if it is a directory (holding `marker`, when given); CLIError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} {str(path)!r} does not exist{hint}")
    if not p.is_dir():
        raise CLIError(f"{what} {str(path)!r} is not a directory{hint}")
    if marker is not None and not (p / marker).is_file():
        raise CLIError(f"{what} {str(path)!r} has no {marker}{hint}")
    return p


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def resolve_device(name: str):
    """torch.device for --device ('auto': cuda if available, else cpu). Checks nothing else."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a torch device ({e})") from None


def check_device_usable(device) -> None:
    """CLIError unless tensors can be created on `device` (named in the message)."""
    import torch

    if device.type == "meta":
        raise CLIError("--device meta holds no data and cannot train or merge")
    available = {"cuda": torch.cuda.is_available,
                 "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}.get(device.type)
    if available is not None and not available():
        raise CLIError(f"--device {device} was asked for, but torch {torch.__version__} sees no {device.type} device")
    try:
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001 - any backend failure is the user's device problem
        raise CLIError(f"cannot create tensors on --device {device}: {e}") from None


def resolve_dtype(name: str, device):
    """torch dtype for --dtype; 'auto' is bf16 on GPUs that support it and fp32 elsewhere."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside `target`; on success it replaces `target` by renames.

    On any error the temp directory is removed and `target` is left exactly as it was. With
    `overwrite`, an existing `target` is moved aside first and deleted only after the new one is
    in place; without it an existing non-empty `target` is refused before anything is written.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise CLIError(f"{str(target)!r} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CLIError(f"output directory {str(target)!r} exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "d")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous contents back
                os.replace(old / "d", target)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_files_into(src: Path, dst: Path) -> None:
    """Rename every file of `src` into `dst` (each rename is atomic; same file system)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        os.replace(f, dst / f.name)
