"""`AutoPeftModel*`: load base model (transformers) + adapter from an adapter directory or Hub id (L4)."""
from __future__ import annotations

import os
from typing import Optional

from .config import PeftConfig
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    _target_class_name: Optional[str] = None
    _target_peft_class = PeftModel

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(
            f"{self.__class__.__name__} is designed to be instantiated with "
            f"`{self.__class__.__name__}.from_pretrained(pretrained_model_name_or_path)`"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None, revision: Optional[str] = None,
                        import_allowlist: Optional[list[str]] = None, **kwargs):
        """Load the base model named in adapter_config.json with transformers, then the adapter.

        `pretrained_model_name_or_path` is a local directory or a Hub repo id; `revision` and the
        ``hf_hub_download`` options in `kwargs` (``subfolder``, ``cache_dir``, ``token``,
        ``local_files_only``, ...) are the adapter's, as in PEFT. The base model is loaded at the
        revision recorded in adapter_config.json, with `kwargs` (its loading options, and the Hub
        options but ``subfolder``, which locates the adapter only: PEFT passes it on too and then looks for
        the base model in that subfolder of the base model's repo).

        The base model class is PEFT's choice: the class's own auto class for an adapter with a task
        type (``AutoPeftModel`` itself refuses those), otherwise the ``auto_mapping`` recorded in
        adapter_config.json, whose library must be in `import_allowlist`
        (default `get_default_import_allowlist()`)."""
        import transformers

        name = str(pretrained_model_name_or_path)
        peft_config = PeftConfig.from_pretrained(name, revision=revision, **kwargs)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"adapter_config.json in {name!r} names no base_model_name_or_path")
        target_class = _base_model_class(cls, peft_config, import_allowlist)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
        base_model = target_class.from_pretrained(base_path, revision=peft_config.revision, **base_kwargs)
        if _has_tokenizer(name, revision, kwargs):
            tok = transformers.AutoTokenizer.from_pretrained(
                name, revision=revision, trust_remote_code=kwargs.get("trust_remote_code", False),
                **{k: kwargs[k] for k in ("token", "cache_dir", "local_files_only") if kwargs.get(k) is not None})
            emb = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
            if emb is not None and len(tok) > emb.weight.shape[0]:
                base_model.resize_token_embeddings(len(tok))
        return cls._target_peft_class.from_pretrained(base_model, name, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, revision=revision,
                                                      **kwargs)


def get_default_import_allowlist() -> list[str]:
    """The libraries `AutoPeftModel` may import to rebuild a base model from ``auto_mapping`` (PEFT's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist, parent_name: str) -> bool:
    """Whether `parent_name` is an allowed library or one of its modules (PEFT's check: adapter configs
    name the module to import, so only known libraries are imported)."""
    if parent_name in allowlist:
        return True
    return any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


def _base_model_class(cls, peft_config: PeftConfig, import_allowlist: Optional[list[str]]):
    """PEFT's rule for the class `AutoPeftModel*` loads the base model with (same errors)."""
    import importlib

    import transformers

    from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    task_type = getattr(peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    target_class = getattr(transformers, cls._target_class_name) if cls._target_class_name is not None else None
    if target_class is None and task_type is not None:
        raise ValueError(
            "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. (e.g. "
            "`AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
        )
    if task_type is not None:
        expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
        if cls._target_peft_class.__name__ != expected.__name__:
            raise ValueError(
                f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your task type."
            )
        return target_class
    auto_mapping = getattr(peft_config, "auto_mapping", None)
    if auto_mapping is None:
        raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading the "
                         "correct model for your task type.")
    parent = auto_mapping["parent_library"]
    if not check_import_allowlist(get_default_import_allowlist() if import_allowlist is None else import_allowlist,
                                  parent):
        raise ValueError(
            f"The auto mapping wants to import '{parent}' which is not in the import allowlist. If you are sure that "
            f"importing this library is safe, specify `import_allowlist=['{parent}']` in `from_pretrained()`."
        )
    return getattr(importlib.import_module(parent), auto_mapping["base_model_class"])


def _has_tokenizer(name: str, revision: Optional[str], kwargs: dict) -> bool:
    """Whether the adapter directory or repo (its root, as in PEFT) holds a tokenizer_config.json.
    Offline, PEFT does not look (so never resizes the embeddings); here the cache is looked in."""
    if os.path.exists(os.path.join(name, TOKENIZER_CONFIG_NAME)):
        return True
    if os.path.isdir(name):
        return False
    from .utils.hub import download_adapter_file

    hub_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
    try:
        download_adapter_file(name, TOKENIZER_CONFIG_NAME, revision=revision, **hub_kwargs)
    except Exception:  # noqa: BLE001 - no tokenizer there, or the Hub cannot say: PEFT's check warns and goes on
        return False
    return True


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class_name = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class_name = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
