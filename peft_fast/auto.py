"""`AutoPeftModel*`: load base model (transformers) + adapter from a local adapter directory (L4)."""
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
        """Load the base model named in adapter_config.json with transformers, then the adapter."""
        import transformers

        peft_config = PeftConfig.from_pretrained(str(pretrained_model_name_or_path))
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"adapter_config.json in {pretrained_model_name_or_path!r} names no base_model_name_or_path")
        if cls._target_class_name is None:
            task = peft_config.task_type
            name = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}.get(
                        getattr(task, "value", task), "AutoModel")
        else:
            name = cls._target_class_name
        auto_cls = getattr(transformers, name)
        base_model = auto_cls.from_pretrained(base_path, revision=revision or peft_config.revision, **kwargs)
        tokenizer_file = os.path.join(str(pretrained_model_name_or_path), "tokenizer_config.json")
        if os.path.exists(tokenizer_file):
            tok = transformers.AutoTokenizer.from_pretrained(str(pretrained_model_name_or_path))
            emb = base_model.get_input_embeddings()
            if emb is not None and len(tok) > emb.weight.shape[0]:
                base_model.resize_token_embeddings(len(tok))
        return cls._target_peft_class.from_pretrained(base_model, str(pretrained_model_name_or_path),
                                                      adapter_name=adapter_name, is_trainable=is_trainable,
                                                      config=config)


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
