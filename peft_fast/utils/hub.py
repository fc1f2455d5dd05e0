"""``PeftModel.push_to_hub``: save the adapters and upload them to a Hub repo in one commit (L4).

PEFT inherits this from transformers' ``PushToHubMixin`` (same signature here, transformers 5).
One difference, on purpose: transformers replaces the README.md that PEFT's ``save_pretrained``
just wrote with the repo's existing card (or a generic transformers card), which loses
``library_name: peft``. Here the repo's card, when there is one, is *updated* with PEFT's
metadata instead (its tags kept), and `tags` are added to it. Needs huggingface_hub (imported on use).
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
_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only")


def download_adapter_file(model_id: str, filename: str, subfolder: Optional[str] = None, **kwargs) -> Optional[str]:
    """Local path of `filename` from the Hub repo `model_id` (downloaded or from the cache), or None
    when the repo has no such file. Offline (HF_HUB_OFFLINE=1) only the cache is read, as in PEFT;
    other Hub errors (unknown repo, no network) propagate."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub_kwargs = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if kwargs.get(k) is not None}
    if kwargs.get("token") is None and kwargs.get("use_auth_token") is not None:
        hub_kwargs["token"] = kwargs["use_auth_token"]
    if constants.HF_HUB_OFFLINE:
        hub_kwargs["local_files_only"] = True
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder or None, **hub_kwargs)
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        if hub_kwargs.get("local_files_only"):
            return None
        raise
