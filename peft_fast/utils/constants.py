"""File names and per-architecture defaults, identical to PEFT's so files and configs match."""

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]
# PEFT fills the state-dict prefix of each method from this table
PEFT_TYPE_TO_PREFIX_MAPPING = {"LORA": "lora_", "IA3": "ia3_"}

_QV = ["q_proj", "v_proj"]
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _QV, "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": _QV, "gptj": _QV, "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV, "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "llama": _QV,
    "llama4": _QV, "gpt_bigcode": ["c_attn"], "falcon": ["query_key_value"], "mistral": _QV,
    "mixtral": _QV, "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": _QV, "gemma2": _QV,
    "qwen2": _QV, "qwen3": _QV, "distilbert": ["q_lin", "v_lin"],
}

# PEFT's default-target tables of other methods that reuse LoRA's (peft.utils.constants); only the
# tables: code that reads or patches them (PEFT's tests do) works, the methods are not implemented
TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.copy()

TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"], "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"], "bart": ["fc2"], "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"],
    "llama4": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "bert": ["output.dense"],
    "deberta-v2": ["output.dense"], "deberta": ["output.dense"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}
