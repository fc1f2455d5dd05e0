"""The adapter's model card (``README.md``), written by ``save_pretrained`` as PEFT writes it (L4).

Same metadata as ``peft.PeftModel.create_or_update_model_card``: ``library_name: peft``, the tags
(``lora`` for LoRA, ``transformers`` for transformers models, ``base_model:adapter:<name>``), the
``base_model`` from a transformers config, the pipeline tag of causal LMs and a "Framework versions"
line. An existing card is updated, not replaced.
huggingface_hub (a dependency of transformers and PEFT) builds the card; it works offline. Without
it a card with the same front matter is written by hand.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .io import atomic_write_text

MODEL_CARD_NAME = "README.md"
_FRAMEWORK_HEADING = "### Framework versions"


def _model_config(peft_model) -> Optional[dict]:
    """PEFT's BaseTuner.get_model_config, with its dummy config mapped to None."""
    import dataclasses

    config = getattr(peft_model.get_base_model(), "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return config if isinstance(config, dict) and config != {"model_type": "custom"} else None


def peft_model_tags(peft_model) -> list[str]:
    """PEFT's ``_get_peft_specific_model_tags``."""
    peft_type = peft_model.active_peft_config.peft_type
    peft_type = getattr(peft_type, "value", peft_type)
    base = peft_model.get_base_model()
    tags = []
    transformers = sys.modules.get("transformers")  # a transformers model implies it is imported
    if transformers is not None and isinstance(base, transformers.PreTrainedModel):
        tags.append("transformers")
    if peft_type == "LORA":
        tags.append("lora")
    name = getattr(base, "name_or_path", None)
    if name is not None:
        tags.append(f"base_model:adapter:{name}")
    return tags


def _card_lines(text: str) -> str:
    from ..config import PEFT_FORMAT_VERSION

    lines = text.splitlines()
    # PEFT (0.21) means to list a bitsandbytes quantization config here but tests for it on the config
    # *dict* with hasattr, so it never does; cards stay identical to PEFT's by not writing it either
    version_line = f"- PEFT {PEFT_FORMAT_VERSION}"
    if version_line not in lines:
        if _FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(_FRAMEWORK_HEADING) + 2, version_line)
        else:
            lines.append(f"{_FRAMEWORK_HEADING}\n\n{version_line}")
    return "\n".join(lines)


def create_or_update_model_card(peft_model, output_dir: str) -> None:
    """Write or update ``output_dir/README.md`` for `peft_model` (atomically)."""
    filename = os.path.join(output_dir, MODEL_CARD_NAME)
    model_config = _model_config(peft_model)
    tags = set(getattr(peft_model.get_base_model(), "model_tags", None) or []) | set(peft_model_tags(peft_model))
    causal_lm = type(peft_model).__name__ == "PeftModelForCausalLM"
    base_model = model_config.get("_name_or_path") if model_config and "_name_or_path" in model_config else None
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        atomic_write_text(filename, _plain_card(sorted(tags), causal_lm, base_model))
        return
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and causal_lm:
        card.data.pipeline_tag = "text-generation"
    if base_model is not None:
        card.data["base_model"] = base_model
    card.text = _card_lines(card.text)
    atomic_write_text(filename, str(card))


def _plain_card(tags, causal_lm, base_model) -> str:
    import json

    meta = [f"base_model: {json.dumps(base_model)}"] if base_model is not None else []
    meta.append("library_name: peft")
    if causal_lm:
        meta.append("pipeline_tag: text-generation")
    if tags:
        meta.append("tags:")
        meta.extend(f"- {json.dumps(t)}" for t in tags)
    body = _card_lines("")
    return "---\n" + "\n".join(meta) + "\n---\n\n" + body + "\n"
