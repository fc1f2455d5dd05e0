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
                        config: Optional[PeftConfig] = None, revision: Optional[str] = None, **kwargs):
        """Load the base model named in adapter_config.json with transformers, then the adapter.

        `pretrained_model_name_or_path` is a local directory or a Hub repo id; `revision` and the
        ``hf_hub_download`` options in `kwargs` (``subfolder``, ``cache_dir``, ``token``,
        ``local_files_only``, ...) are the adapter's, as in PEFT. The base model is loaded at the
        revision recorded in adapter_config.json, with `kwargs` (its loading options, and the Hub
        options but ``subfolder``, which locates the adapter only: PEFT passes it on too and then looks for
        the base model in that subfolder of the base model's repo)."""
        import transformers

        name = str(pretrained_model_name_or_path)
        peft_config = PeftConfig.from_pretrained(name, revision=revision, **kwargs)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"adapter_config.json in {name!r} names no base_model_name_or_path")
        if cls._target_class_name is None:
            task = peft_config.task_type
            auto_name = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                         "SEQ_CLS": "AutoModelForSequenceClassification",
                         "TOKEN_CLS": "AutoModelForTokenClassification",
                         "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}.get(
                             getattr(task, "value", task), "AutoModel")
        else:
            auto_name = cls._target_class_name
        auto_cls = getattr(transformers, auto_name)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
        base_model = auto_cls.from_pretrained(base_path, revision=peft_config.revision, **base_kwargs)
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
