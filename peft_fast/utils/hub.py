"""The Hugging Face Hub (L4): ``PeftModel.push_to_hub``, and reading adapter files from a Hub repo.

``push_to_hub``: PEFT inherits it from transformers' ``PushToHubMixin`` (same signature here,
transformers 5). One difference, on purpose: transformers replaces the README.md that PEFT's
``save_pretrained`` just wrote with the repo's existing card (or a generic transformers card), which
loses ``library_name: peft``. Here the repo's card, when there is one, is *updated* with PEFT's
metadata instead (its tags kept), and `tags` are added to it.

Reading (``PeftConfig.from_pretrained``, ``load_peft_weights`` and so every ``from_pretrained`` /
``load_adapter``): ``hf_hub_download`` with PEFT's options (``revision``, ``subfolder``, ``cache_dir``,
``token``, ``local_files_only``, ...); with ``HF_HUB_OFFLINE=1`` only the cache is read. A missing
repo, revision or file is reported by `hub_error_detail`, naming it and what the cache holds.
Needs huggingface_hub (imported on use; it comes with transformers).
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Union

from .model_card import MODEL_CARD_NAME


def _remote_card_into(directory: str, repo_id: str, token) -> list[str]:
    """Put the repo's current README.md (if any) where save_pretrained will update it; returns its
    tags (save_pretrained sets PEFT's tags, as PEFT does, so they are added back afterwards)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        card = ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:  # a new repo, or one without a card
        return []
    with open(os.path.join(directory, MODEL_CARD_NAME), "w", encoding="utf-8", newline="") as f:
        f.write(str(card))
    return list(card.data.tags or [])


def _add_tags(directory: str, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    path = os.path.join(directory, MODEL_CARD_NAME)
    card = ModelCard.load(path)
    current = list(card.data.tags or [])
    card.data.tags = current + [t for t in tags if t not in current]
    card.save(path)


def push_to_hub(model, repo_id: str, *, commit_message: Optional[str] = None,
                commit_description: Optional[str] = None, private: Optional[bool] = None,
                token: Optional[Union[bool, str]] = None, revision: Optional[str] = None, create_pr: bool = False,
                max_shard_size: Optional[Union[int, str]] = "50GB", tags: Optional[list[str]] = None,
                **save_kwargs):
    """Create `repo_id` if needed, ``model.save_pretrained`` into a temp folder and upload it in one
    commit (to branch `revision`, created if missing, or as a PR). Returns the ``CommitInfo``."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:  # pragma: no cover - comes with transformers
        raise ImportError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from e
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        remote_tags = _remote_card_into(tmp, repo_id, token)
        # max_shard_size is accepted as transformers passes it; adapters are saved unsharded, as by PEFT
        model.save_pretrained(tmp, **save_kwargs)
        if remote_tags or tags:
            _add_tags(tmp, remote_tags + list(tags or []))
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload model",
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)


# ---- reading adapters from the Hub ------------------------------------------------------------------
# hf_hub_download's own arguments are not download options
_NOT_DOWNLOAD_KWARGS = frozenset({"repo_id", "filename", "subfolder"})


def hub_download_kwargs(kwargs: dict) -> dict:
    """The ``hf_hub_download`` options among `kwargs` (PEFT's ``_split_kwargs``): ``revision``,
    ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``repo_type``, ...; PEFT's
    deprecated ``use_auth_token`` is the ``token`` when none is given. Options set to None are dropped."""
    import inspect

    from huggingface_hub import file_download  # its function's signature, even where the public name is wrapped

    names = set(inspect.signature(file_download.hf_hub_download).parameters) - _NOT_DOWNLOAD_KWARGS
    out = {k: v for k, v in kwargs.items() if k in names and v is not None}
    if out.get("token") is None and kwargs.get("use_auth_token") is not None:
        out["token"] = kwargs["use_auth_token"]
    return out


def download_adapter_file(model_id: str, filename: str, subfolder: Optional[str] = None, **kwargs) -> str:
    """Local path of `filename` (in `subfolder`) of the Hub repo `model_id`, downloaded or read from
    the Hugging Face cache; offline (``HF_HUB_OFFLINE=1``) only the cache is read, as in PEFT.
    huggingface_hub's errors propagate (``EntryNotFoundError`` when the repo has no such file,
    ``LocalEntryNotFoundError`` when it is not cached and cannot be fetched); see `hub_error_detail`."""
    from huggingface_hub import constants, hf_hub_download

    hub_kwargs = hub_download_kwargs(kwargs)
    if constants.HF_HUB_OFFLINE:
        hub_kwargs["local_files_only"] = True
    return hf_hub_download(model_id, filename, subfolder=subfolder or None, **hub_kwargs)


def _cached_refs(storage: str) -> list[str]:
    refs_dir = os.path.join(storage, "refs")
    return sorted(os.path.relpath(os.path.join(root, n), refs_dir).replace(os.sep, "/")
                  for root, _, names in os.walk(refs_dir) for n in names)


def _cache_miss(model_id: str, files: str, revision: Optional[str], hub_kwargs: dict, exc: Exception) -> str:
    """Why the cache could not answer: the repo, the revision, or the file is not there."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    if constants.HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE=1), so nothing is downloaded"
    elif hub_kwargs.get("local_files_only"):
        why = "local_files_only=True, so nothing is downloaded"
    else:
        cause = exc.__cause__ or exc.__context__
        why = f"the Hub could not be reached ({cause or exc})"
    cache_dir = str(hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE)
    repo_type = hub_kwargs.get("repo_type") or "model"
    storage = os.path.join(cache_dir, repo_folder_name(repo_id=model_id, repo_type=repo_type))
    if not os.path.isdir(storage):
        return f"repo {model_id!r} is not in the Hugging Face cache ({cache_dir}) and {why}"
    rev = revision or "main"
    commit = rev if REGEX_COMMIT_HASH.fullmatch(rev) else None
    ref_file = os.path.join(storage, "refs", *rev.split("/"))
    if commit is None and os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8") as f:
            commit = f.read().strip()
    if commit is None or not os.path.isdir(os.path.join(storage, "snapshots", commit)):
        snapshots = os.path.join(storage, "snapshots")
        commits = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
        at = f"revision {rev!r}" + (f" (commit {commit})" if commit and commit != rev else "")
        return (f"{at} of repo {model_id!r} is not in the Hugging Face cache ({cache_dir}; cached there: branches/tags "
                f"{_cached_refs(storage)}, commits {commits}) and {why}")
    at = f"revision {rev!r}" + (f" (commit {commit})" if commit != rev else "")
    return f"the cached snapshot of repo {model_id!r} at {at} has no {files} ({cache_dir}), and {why}"


def hub_error_detail(model_id: str, filenames: list[str], subfolder: Optional[str], exc: Exception,
                     kwargs: dict) -> str:
    """A sentence naming what is missing for `exc` raised while fetching `filenames` from `model_id`:
    the repo id, the revision and the file(s), and for a cache miss what the cache does hold."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_kwargs = hub_download_kwargs(kwargs)
    revision = hub_kwargs.get("revision")
    files = " or ".join(repr(f"{subfolder}/{f}" if subfolder else f) for f in filenames)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        return f"the local directory {local!r} has no {files}"
    if isinstance(exc, HFValidationError):
        return f"{model_id!r} is neither a local directory nor a valid Hugging Face Hub repo id ({exc})"
    if isinstance(exc, GatedRepoError):
        return f"repo {model_id!r} on the Hugging Face Hub is gated and the token gives no access to it"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"the Hugging Face Hub has no repo {model_id!r} (or it is private and the token gives no access "
                "to it)")
    if isinstance(exc, RevisionNotFoundError):
        return f"repo {model_id!r} on the Hugging Face Hub has no revision {revision!r}"
    if isinstance(exc, LocalEntryNotFoundError):
        return _cache_miss(model_id, files, revision, hub_kwargs, exc)
    if isinstance(exc, EntryNotFoundError):
        return f"repo {model_id!r} at revision {revision or 'main'!r} has no {files}"
    return f"{type(exc).__name__}: {exc}"
