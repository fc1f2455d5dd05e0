"""What PEFT 0.21.2 exports, for the `peft` alias (peft_fast/peft_alias.py): its top-level names, its
module paths, and each module's public classes and functions (ALL_CAPS constants left out). A name or module
listed here that peft_fast does not provide is answered, under the alias, by a placeholder that raises a
clear error when used, instead of an ImportError when the importing library loads. Generated from the pinned
peft by `python tests/test_peft_alias.py > peft_fast/_peft_manifest.py`; a test there checks it matches.
"""
PEFT_VERSION = '0.21.2'

PEFT_ALL = (
    'AdaLoraConfig', 'AdaLoraModel', 'AdamssConfig', 'AdamssModel', 'AdaptionPromptConfig',
    'AdaptionPromptModel', 'ArrowConfig', 'AutoPeftModel', 'AutoPeftModelForCausalLM',
    'AutoPeftModelForFeatureExtraction', 'AutoPeftModelForQuestionAnswering', 'AutoPeftModelForSeq2SeqLM',
    'AutoPeftModelForSequenceClassification', 'AutoPeftModelForTokenClassification', 'BOFTConfig',
    'BOFTModel', 'BdLoraConfig', 'BeftConfig', 'BeftModel', 'C3AConfig', 'C3AModel', 'CPTConfig',
    'CPTEmbedding', 'CartridgeConfig', 'CartridgeEncoder', 'DeftConfig', 'DeftModel', 'DeloraConfig',
    'DeloraModel', 'EvaConfig', 'FourierFTConfig', 'FourierFTModel', 'FrodConfig', 'FrodModel', 'GloraConfig',
    'GloraModel', 'GraloraConfig', 'GraloraModel', 'HRAConfig', 'HRAModel', 'HiraConfig', 'HiraModel',
    'IA3Config', 'IA3Model', 'KasaConfig', 'LNTuningConfig', 'LNTuningModel', 'LilyConfig', 'LilyModel',
    'LoHaConfig', 'LoHaModel', 'LoKrConfig', 'LoKrModel', 'LoftQConfig', 'LoraConfig', 'LoraGAConfig',
    'LoraModel', 'LoraRuntimeConfig', 'MODEL_TYPE_TO_PEFT_MODEL_MAPPING', 'MissConfig', 'MissModel',
    'MontecloraConfig', 'MultitaskPromptTuningConfig', 'MultitaskPromptTuningInit',
    'NoMatchingPeftModuleError', 'OFTConfig', 'OFTModel', 'OSFConfig', 'OSFModel',
    'PEFT_TYPE_TO_CONFIG_MAPPING', 'PEFT_TYPE_TO_MIXED_MODEL_MAPPING', 'PEFT_TYPE_TO_TUNER_MAPPING',
    'PeanutConfig', 'PeanutModel', 'PeftConfig', 'PeftError', 'PeftMixedModel', 'PeftModel',
    'PeftModelForCausalLM', 'PeftModelForFeatureExtraction', 'PeftModelForQuestionAnswering',
    'PeftModelForSeq2SeqLM', 'PeftModelForSequenceClassification', 'PeftModelForTokenClassification',
    'PeftType', 'PeftWarning', 'PolyConfig', 'PolyModel', 'PrefixEncoder', 'PrefixTuningConfig',
    'PromptEmbedding', 'PromptEncoder', 'PromptEncoderConfig', 'PromptEncoderReparameterizationType',
    'PromptLearningConfig', 'PromptTuningConfig', 'PromptTuningInit', 'PsoftConfig', 'PsoftModel',
    'PveraConfig', 'PveraModel', 'RandLoraConfig', 'RandLoraModel', 'RoadConfig', 'RoadModel', 'ShadowConfig',
    'ShadowModel', 'ShiraConfig', 'ShiraModel', 'SupertuningConfig', 'SupertuningModel',
    'TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING', 'TaskType', 'TinyLoraConfig', 'TinyLoraModel',
    'TrainableTokensConfig', 'TrainableTokensModel', 'UniLoraConfig', 'UniLoraModel', 'VBLoRAConfig',
    'VBLoRAModel', 'VeloraConfig', 'VeraConfig', 'VeraModel', 'WaveFTConfig', 'WaveFTModel', 'XLoraConfig',
    'XLoraModel', 'bloom_model_postprocess_past_key_value', 'cast_mixed_precision_params',
    'compose_cartridge_adapters', 'convert_to_lora', 'create_arrow_model', 'find_kappa_target_modules',
    'get_base_model_state_dict', 'get_eva_state_dict', 'get_layer_status', 'get_model_status',
    'get_peft_config', 'get_peft_model', 'get_peft_model_state_dict',
    'initialize_kv_prefix_from_past_key_values', 'initialize_kv_prefix_from_text',
    'initialize_lora_eva_weights', 'inject_adapter_in_model', 'load_peft_weights',
    'prepare_model_for_kbit_training', 'preprocess_loraga', 'prompt_embeddings_from_past_key_values',
    'replace_lora_weights_loftq', 'save_as_lora', 'set_base_model_state_dict', 'set_peft_model_state_dict',
    'shift_tokens_right',
)

PEFT_MODULES = (
    'peft.auto', 'peft.config', 'peft.functional', 'peft.helpers', 'peft.import_utils', 'peft.mapping',
    'peft.mapping_func', 'peft.mixed_model', 'peft.optimizers', 'peft.optimizers.lorafa',
    'peft.optimizers.loraplus', 'peft.optimizers.riemannian', 'peft.peft_model', 'peft.tuners',
    'peft.tuners._buffer_dict', 'peft.tuners.adalora', 'peft.tuners.adalora.bnb',
    'peft.tuners.adalora.config', 'peft.tuners.adalora.gptq', 'peft.tuners.adalora.layer',
    'peft.tuners.adalora.model', 'peft.tuners.adamss', 'peft.tuners.adamss.asa_callback',
    'peft.tuners.adamss.config', 'peft.tuners.adamss.layer', 'peft.tuners.adamss.model',
    'peft.tuners.adamss.utils', 'peft.tuners.adaption_prompt', 'peft.tuners.adaption_prompt.config',
    'peft.tuners.adaption_prompt.layer', 'peft.tuners.adaption_prompt.model',
    'peft.tuners.adaption_prompt.utils', 'peft.tuners.beft', 'peft.tuners.beft.config',
    'peft.tuners.beft.layer', 'peft.tuners.beft.model', 'peft.tuners.boft', 'peft.tuners.boft.config',
    'peft.tuners.boft.fbd', 'peft.tuners.boft.layer', 'peft.tuners.boft.model', 'peft.tuners.c3a',
    'peft.tuners.c3a.config', 'peft.tuners.c3a.layer', 'peft.tuners.c3a.model', 'peft.tuners.c3a.utils',
    'peft.tuners.cartridge', 'peft.tuners.cartridge.config', 'peft.tuners.cartridge.model',
    'peft.tuners.cartridge.utils', 'peft.tuners.cpt', 'peft.tuners.cpt.config', 'peft.tuners.cpt.model',
    'peft.tuners.deft', 'peft.tuners.deft.config', 'peft.tuners.deft.layer', 'peft.tuners.deft.model',
    'peft.tuners.delora', 'peft.tuners.delora.config', 'peft.tuners.delora.layer', 'peft.tuners.delora.model',
    'peft.tuners.fourierft', 'peft.tuners.fourierft.config', 'peft.tuners.fourierft.layer',
    'peft.tuners.fourierft.model', 'peft.tuners.frod', 'peft.tuners.frod.config', 'peft.tuners.frod.layer',
    'peft.tuners.frod.model', 'peft.tuners.glora', 'peft.tuners.glora.config', 'peft.tuners.glora.layer',
    'peft.tuners.glora.model', 'peft.tuners.gralora', 'peft.tuners.gralora.config',
    'peft.tuners.gralora.layer', 'peft.tuners.gralora.model', 'peft.tuners.hira', 'peft.tuners.hira.bnb',
    'peft.tuners.hira.config', 'peft.tuners.hira.layer', 'peft.tuners.hira.model', 'peft.tuners.hra',
    'peft.tuners.hra.config', 'peft.tuners.hra.layer', 'peft.tuners.hra.model', 'peft.tuners.ia3',
    'peft.tuners.ia3.bnb', 'peft.tuners.ia3.config', 'peft.tuners.ia3.layer', 'peft.tuners.ia3.model',
    'peft.tuners.lily', 'peft.tuners.lily.config', 'peft.tuners.lily.layer', 'peft.tuners.lily.model',
    'peft.tuners.ln_tuning', 'peft.tuners.ln_tuning.config', 'peft.tuners.ln_tuning.layer',
    'peft.tuners.ln_tuning.model', 'peft.tuners.loha', 'peft.tuners.loha.config', 'peft.tuners.loha.layer',
    'peft.tuners.loha.model', 'peft.tuners.lokr', 'peft.tuners.lokr.config', 'peft.tuners.lokr.layer',
    'peft.tuners.lokr.model', 'peft.tuners.lora', 'peft.tuners.lora.aqlm', 'peft.tuners.lora.arrow',
    'peft.tuners.lora.awq', 'peft.tuners.lora.bnb', 'peft.tuners.lora.config', 'peft.tuners.lora.conversion',
    'peft.tuners.lora.corda', 'peft.tuners.lora.dora', 'peft.tuners.lora.eetq', 'peft.tuners.lora.eva',
    'peft.tuners.lora.gptq', 'peft.tuners.lora.hqq', 'peft.tuners.lora.inc', 'peft.tuners.lora.intruders',
    'peft.tuners.lora.layer', 'peft.tuners.lora.loraga', 'peft.tuners.lora.model',
    'peft.tuners.lora.monteclora', 'peft.tuners.lora.te', 'peft.tuners.lora.torchao',
    'peft.tuners.lora.tp_layer', 'peft.tuners.lora.variants', 'peft.tuners.lora.velora',
    'peft.tuners.lycoris_utils', 'peft.tuners.miss', 'peft.tuners.miss.config', 'peft.tuners.miss.layer',
    'peft.tuners.miss.model', 'peft.tuners.mixed', 'peft.tuners.mixed.model',
    'peft.tuners.multitask_prompt_tuning', 'peft.tuners.multitask_prompt_tuning.config',
    'peft.tuners.multitask_prompt_tuning.model', 'peft.tuners.oft', 'peft.tuners.oft.config',
    'peft.tuners.oft.layer', 'peft.tuners.oft.model', 'peft.tuners.osf', 'peft.tuners.osf.config',
    'peft.tuners.osf.layer', 'peft.tuners.osf.model', 'peft.tuners.osf.utils', 'peft.tuners.p_tuning',
    'peft.tuners.p_tuning.config', 'peft.tuners.p_tuning.model', 'peft.tuners.peanut',
    'peft.tuners.peanut.config', 'peft.tuners.peanut.layer', 'peft.tuners.peanut.model', 'peft.tuners.poly',
    'peft.tuners.poly.config', 'peft.tuners.poly.layer', 'peft.tuners.poly.model', 'peft.tuners.poly.router',
    'peft.tuners.prefix_tuning', 'peft.tuners.prefix_tuning.config', 'peft.tuners.prefix_tuning.model',
    'peft.tuners.prompt_tuning', 'peft.tuners.prompt_tuning.config', 'peft.tuners.prompt_tuning.model',
    'peft.tuners.psoft', 'peft.tuners.psoft.config', 'peft.tuners.psoft.layer', 'peft.tuners.psoft.model',
    'peft.tuners.pvera', 'peft.tuners.pvera.bnb', 'peft.tuners.pvera.config', 'peft.tuners.pvera.layer',
    'peft.tuners.pvera.model', 'peft.tuners.randlora', 'peft.tuners.randlora.bnb',
    'peft.tuners.randlora.config', 'peft.tuners.randlora.layer', 'peft.tuners.randlora.model',
    'peft.tuners.road', 'peft.tuners.road.bnb', 'peft.tuners.road.config', 'peft.tuners.road.layer',
    'peft.tuners.road.model', 'peft.tuners.shadow', 'peft.tuners.shadow.config',
    'peft.tuners.shadow.diffusion_models', 'peft.tuners.shadow.layers', 'peft.tuners.shadow.model',
    'peft.tuners.shira', 'peft.tuners.shira.config', 'peft.tuners.shira.layer',
    'peft.tuners.shira.mask_functions', 'peft.tuners.shira.model', 'peft.tuners.supertuning',
    'peft.tuners.supertuning.config', 'peft.tuners.supertuning.layer', 'peft.tuners.supertuning.model',
    'peft.tuners.tinylora', 'peft.tuners.tinylora.config', 'peft.tuners.tinylora.layer',
    'peft.tuners.tinylora.model', 'peft.tuners.trainable_tokens', 'peft.tuners.trainable_tokens.config',
    'peft.tuners.trainable_tokens.layer', 'peft.tuners.trainable_tokens.model', 'peft.tuners.tuners_utils',
    'peft.tuners.unilora', 'peft.tuners.unilora.config', 'peft.tuners.unilora.layer',
    'peft.tuners.unilora.model', 'peft.tuners.vblora', 'peft.tuners.vblora.config',
    'peft.tuners.vblora.layer', 'peft.tuners.vblora.model', 'peft.tuners.vera', 'peft.tuners.vera.config',
    'peft.tuners.vera.layer', 'peft.tuners.vera.model', 'peft.tuners.waveft', 'peft.tuners.waveft.config',
    'peft.tuners.waveft.constants', 'peft.tuners.waveft.layer', 'peft.tuners.waveft.model',
    'peft.tuners.waveft.wavelet', 'peft.tuners.waveft.waverec2d', 'peft.tuners.xlora',
    'peft.tuners.xlora.classifier', 'peft.tuners.xlora.config', 'peft.tuners.xlora.layer',
    'peft.tuners.xlora.model', 'peft.utils', 'peft.utils.constants', 'peft.utils.error', 'peft.utils.hotswap',
    'peft.utils.incremental_pca', 'peft.utils.integrations', 'peft.utils.loftq_utils',
    'peft.utils.merge_utils', 'peft.utils.other', 'peft.utils.peft_types', 'peft.utils.quantization_utils',
    'peft.utils.save_and_load', 'peft.utils.transformers_weight_conversion', 'peft.utils.warning',
)

PEFT_MODULE_NAMES = {
    'peft.auto': (
        'AutoPeftModel', 'AutoPeftModelForCausalLM', 'AutoPeftModelForFeatureExtraction',
        'AutoPeftModelForQuestionAnswering', 'AutoPeftModelForSeq2SeqLM',
        'AutoPeftModelForSequenceClassification', 'AutoPeftModelForTokenClassification',
        'check_import_allowlist', 'get_default_import_allowlist',
    ),
    'peft.config': (
        'PeftConfig', 'PeftConfigMixin', 'PromptLearningConfig',
    ),
    'peft.functional': (
        'cast_adapter_dtype', 'delete_adapter', 'get_peft_model_state_dict', 'inject_adapter_in_model',
        'set_adapter', 'set_peft_model_state_dict', 'set_requires_grad',
    ),
    'peft.helpers': (
        'DoraCaching', 'KappaTuneSelector', 'MontecloraTrainerMixin', 'check_if_peft_model',
        'disable_input_dtype_casting', 'find_kappa_target_modules', 'rescale_adapter_scale',
        'update_forward_signature', 'update_generate_signature', 'update_signature',
    ),
    'peft.import_utils': (
        'is_aqlm_available', 'is_bnb_4bit_available', 'is_bnb_available', 'is_diffusers_available',
        'is_eetq_available', 'is_gptqmodel_available', 'is_hqq_available', 'is_inc_available',
        'is_optimum_available', 'is_te_available', 'is_te_pytorch_available', 'is_torch_tpu_available',
        'is_torchao_available', 'is_torchao_ge_v0_18_0', 'is_xpu_available',
    ),
    'peft.mapping': (
        'get_peft_config', 'inject_adapter_in_model',
    ),
    'peft.mapping_func': (
        'get_peft_model',
    ),
    'peft.mixed_model': (
        'PeftMixedModel',
    ),
    'peft.optimizers': (
        'create_lorafa_optimizer', 'create_loraplus_optimizer', 'create_riemannian_optimizer',
    ),
    'peft.optimizers.lorafa': (
        'LoraFAOptimizer', 'create_lorafa_optimizer',
    ),
    'peft.optimizers.loraplus': (
        'create_loraplus_optimizer',
    ),
    'peft.optimizers.riemannian': (
        'create_riemannian_optimizer',
    ),
    'peft.peft_model': (
        'PeftModel', 'PeftModelForCausalLM', 'PeftModelForFeatureExtraction', 'PeftModelForQuestionAnswering',
        'PeftModelForSeq2SeqLM', 'PeftModelForSequenceClassification', 'PeftModelForTokenClassification',
        'TunerLayerStatus', 'TunerModelStatus', 'get_layer_status', 'get_model_status',
    ),
    'peft.tuners': (
        'AdaLoraConfig', 'AdaLoraModel', 'AdamssConfig', 'AdamssModel', 'AdaptionPromptConfig',
        'AdaptionPromptModel', 'ArrowConfig', 'BOFTConfig', 'BOFTModel', 'BdLoraConfig', 'BeftConfig',
        'BeftModel', 'C3AConfig', 'C3AModel', 'CPTConfig', 'CPTEmbedding', 'CartridgeConfig',
        'CartridgeEncoder', 'DeftConfig', 'DeftModel', 'DeloraConfig', 'DeloraModel', 'EvaConfig',
        'FourierFTConfig', 'FourierFTModel', 'FrodConfig', 'FrodModel', 'GloraConfig', 'GloraModel',
        'GraloraConfig', 'GraloraModel', 'HRAConfig', 'HRAModel', 'HiraConfig', 'HiraModel', 'IA3Config',
        'IA3Model', 'KasaConfig', 'LNTuningConfig', 'LNTuningModel', 'LilyConfig', 'LilyModel', 'LoHaConfig',
        'LoHaModel', 'LoKrConfig', 'LoKrModel', 'LoftQConfig', 'LoraConfig', 'LoraGAConfig', 'LoraModel',
        'LoraRuntimeConfig', 'MissConfig', 'MissModel', 'MixedModel', 'MontecloraConfig',
        'MultitaskPromptEmbedding', 'MultitaskPromptTuningConfig', 'MultitaskPromptTuningInit', 'OFTConfig',
        'OFTModel', 'OSFConfig', 'OSFModel', 'PeanutConfig', 'PeanutModel', 'PolyConfig', 'PolyModel',
        'PrefixEncoder', 'PrefixTuningConfig', 'PromptEmbedding', 'PromptEncoder', 'PromptEncoderConfig',
        'PromptEncoderReparameterizationType', 'PromptTuningConfig', 'PromptTuningInit', 'PsoftConfig',
        'PsoftModel', 'PveraConfig', 'PveraModel', 'RandLoraConfig', 'RandLoraModel', 'RoadConfig',
        'RoadModel', 'ShadowConfig', 'ShadowModel', 'ShiraConfig', 'ShiraModel', 'SupertuningConfig',
        'SupertuningModel', 'TinyLoraConfig', 'TinyLoraModel', 'TrainableTokensConfig',
        'TrainableTokensModel', 'UniLoraConfig', 'UniLoraModel', 'VBLoRAConfig', 'VBLoRAModel',
        'VeloraConfig', 'VeraConfig', 'VeraModel', 'WaveFTConfig', 'WaveFTModel', 'XLoraConfig', 'XLoraModel',
        'convert_to_lora', 'create_arrow_model', 'get_eva_state_dict', 'initialize_lora_eva_weights',
        'preprocess_loraga', 'save_as_lora',
    ),
    'peft.tuners._buffer_dict': (
        'BufferDict',
    ),
    'peft.tuners.adalora': (
        'AdaLoraConfig', 'AdaLoraLayer', 'AdaLoraModel', 'RankAllocator', 'SVDConv2d', 'SVDLinear',
        'SVDQuantLinear',
    ),
    'peft.tuners.adalora.bnb': (
        'SVDLinear4bit', 'SVDLinear8bitLt',
    ),
    'peft.tuners.adalora.config': (
        'AdaLoraConfig',
    ),
    'peft.tuners.adalora.gptq': (
        'SVDQuantLinear',
    ),
    'peft.tuners.adalora.layer': (
        'AdaLoraLayer', 'RankAllocator', 'SVDConv2d', 'SVDLinear',
    ),
    'peft.tuners.adalora.model': (
        'AdaLoraModel',
    ),
    'peft.tuners.adamss': (
        'AdamssConfig', 'AdamssLayer', 'AdamssModel', 'Linear',
    ),
    'peft.tuners.adamss.asa_callback': (
        'AdamssAsaCallback',
    ),
    'peft.tuners.adamss.config': (
        'AdamssConfig',
    ),
    'peft.tuners.adamss.layer': (
        'AdamssLayer', 'Linear',
    ),
    'peft.tuners.adamss.model': (
        'AdamssModel',
    ),
    'peft.tuners.adamss.utils': (
        'clustering_Z', 'get_trainable_subspaces', 'seg_locations', 'slice_pca',
    ),
    'peft.tuners.adaption_prompt': (
        'AdaptedAttention', 'AdaptionPromptConfig', 'AdaptionPromptModel',
    ),
    'peft.tuners.adaption_prompt.config': (
        'AdaptionPromptConfig', 'ModelTypeConfig', 'prepare_config',
    ),
    'peft.tuners.adaption_prompt.layer': (
        'AdaptedAttention', 'AdaptedAttentionGPT',
    ),
    'peft.tuners.adaption_prompt.model': (
        'AdaptionPromptModel',
    ),
    'peft.tuners.adaption_prompt.utils': (
        'gpt2_compute_query_states', 'is_adaption_prompt_trainable', 'llama_apply_rotary_pos_emb',
        'llama_compute_query_states', 'llama_rotate_half',
    ),
    'peft.tuners.beft': (
        'BeftConfig', 'BeftLayer', 'BeftModel', 'Linear',
    ),
    'peft.tuners.beft.config': (
        'BeftConfig',
    ),
    'peft.tuners.beft.layer': (
        'BeftLayer', 'Linear',
    ),
    'peft.tuners.beft.model': (
        'BeftModel',
    ),
    'peft.tuners.boft': (
        'BOFTConfig', 'BOFTLayer', 'BOFTModel',
    ),
    'peft.tuners.boft.config': (
        'BOFTConfig',
    ),
    'peft.tuners.boft.layer': (
        'BOFTLayer', 'Conv2d', 'FastBlockDiag', 'Linear', 'MultiplicativeDropoutLayer', 'get_fbd_cuda',
        'patch_environment',
    ),
    'peft.tuners.boft.model': (
        'BOFTModel',
    ),
    'peft.tuners.c3a': (
        'C3AConfig', 'C3ALayer', 'C3ALinear', 'C3AModel',
    ),
    'peft.tuners.c3a.config': (
        'C3AConfig',
    ),
    'peft.tuners.c3a.layer': (
        'C3ALayer', 'C3ALinear',
    ),
    'peft.tuners.c3a.model': (
        'C3AModel',
    ),
    'peft.tuners.c3a.utils': (
        'BlockCircularConvolution', 'get_circulant_fast',
    ),
    'peft.tuners.cartridge': (
        'CartridgeConfig', 'CartridgeEncoder',
    ),
    'peft.tuners.cartridge.config': (
        'CartridgeConfig',
    ),
    'peft.tuners.cartridge.model': (
        'CartridgeEncoder',
    ),
    'peft.tuners.cartridge.utils': (
        'compose_cartridge_adapters', 'initialize_kv_prefix_from_past_key_values',
        'initialize_kv_prefix_from_text', 'prompt_embeddings_from_past_key_values',
    ),
    'peft.tuners.cpt': (
        'CPTConfig', 'CPTEmbedding',
    ),
    'peft.tuners.cpt.config': (
        'CPTConfig',
    ),
    'peft.tuners.cpt.model': (
        'CPTEmbedding',
    ),
    'peft.tuners.deft': (
        'DeftConfig', 'DeftLayer', 'DeftLinear', 'DeftModel',
    ),
    'peft.tuners.deft.config': (
        'DeftConfig',
    ),
    'peft.tuners.deft.layer': (
        'DeftLayer', 'DeftLinear',
    ),
    'peft.tuners.deft.model': (
        'DeftModel',
    ),
    'peft.tuners.delora': (
        'DeloraConfig', 'DeloraLayer', 'DeloraLinear', 'DeloraModel',
    ),
    'peft.tuners.delora.config': (
        'DeloraConfig',
    ),
    'peft.tuners.delora.layer': (
        'DeloraLayer', 'DeloraLinear',
    ),
    'peft.tuners.delora.model': (
        'DeloraModel',
    ),
    'peft.tuners.fourierft': (
        'FourierFTConfig', 'FourierFTLayer', 'FourierFTLinear', 'FourierFTModel',
    ),
    'peft.tuners.fourierft.config': (
        'FourierFTConfig',
    ),
    'peft.tuners.fourierft.layer': (
        'FourierFTLayer', 'FourierFTLinear',
    ),
    'peft.tuners.fourierft.model': (
        'FourierFTModel',
    ),
    'peft.tuners.frod': (
        'FrodConfig', 'FrodLayer', 'FrodModel', 'Linear',
    ),
    'peft.tuners.frod.config': (
        'FrodConfig',
    ),
    'peft.tuners.frod.layer': (
        'FrodLayer', 'Linear',
    ),
    'peft.tuners.frod.model': (
        'FrodModel',
    ),
    'peft.tuners.glora': (
        'GloraConfig', 'GloraLayer', 'GloraLinear', 'GloraModel',
    ),
    'peft.tuners.glora.config': (
        'GloraConfig',
    ),
    'peft.tuners.glora.layer': (
        'GloraEmptyPath', 'GloraLayer', 'GloraLinear', 'GloraLoraPath', 'GloraPath', 'GloraScalarPath',
        'GloraVectorPath',
    ),
    'peft.tuners.glora.model': (
        'GloraModel',
    ),
    'peft.tuners.gralora': (
        'GraloraConfig', 'GraloraLayer', 'GraloraModel',
    ),
    'peft.tuners.gralora.config': (
        'GraloraConfig',
    ),
    'peft.tuners.gralora.layer': (
        'GraloraLayer', 'Linear',
    ),
    'peft.tuners.gralora.model': (
        'GraloraModel',
    ),
    'peft.tuners.hira': (
        'Conv2d', 'Conv3d', 'Embedding', 'HiraConfig', 'HiraLayer', 'HiraModel', 'Linear',
    ),
    'peft.tuners.hira.bnb': (
        'Linear4bit', 'Linear8bitLt', 'dispatch_bnb_4bit', 'dispatch_bnb_8bit',
    ),
    'peft.tuners.hira.config': (
        'HiraConfig',
    ),
    'peft.tuners.hira.layer': (
        'Conv1d', 'Conv2d', 'Conv3d', 'Embedding', 'HiraLayer', 'Linear', 'dispatch_default',
    ),
    'peft.tuners.hira.model': (
        'HiraModel',
    ),
    'peft.tuners.hra': (
        'HRAConfig', 'HRAConv2d', 'HRALayer', 'HRALinear', 'HRAModel',
    ),
    'peft.tuners.hra.config': (
        'HRAConfig',
    ),
    'peft.tuners.hra.layer': (
        'HRAConv2d', 'HRALayer', 'HRALinear',
    ),
    'peft.tuners.hra.model': (
        'HRAModel',
    ),
    'peft.tuners.ia3': (
        'Conv2d', 'Conv3d', 'IA3Config', 'IA3Layer', 'IA3Model', 'Linear',
    ),
    'peft.tuners.ia3.bnb': (
        'Linear4bit', 'Linear8bitLt',
    ),
    'peft.tuners.ia3.config': (
        'IA3Config',
    ),
    'peft.tuners.ia3.layer': (
        'Conv2d', 'Conv3d', 'IA3Layer', 'Linear',
    ),
    'peft.tuners.ia3.model': (
        'IA3Model',
    ),
    'peft.tuners.lily': (
        'LilyConfig', 'LilyLayer', 'LilyModel', 'Linear',
    ),
    'peft.tuners.lily.config': (
        'LilyConfig',
    ),
    'peft.tuners.lily.layer': (
        'LilyLayer', 'Linear',
    ),
    'peft.tuners.lily.model': (
        'LilyModel',
    ),
    'peft.tuners.ln_tuning': (
        'LNTuningConfig', 'LNTuningModel',
    ),
    'peft.tuners.ln_tuning.config': (
        'LNTuningConfig',
    ),
    'peft.tuners.ln_tuning.layer': (
        'LNTuningLayer',
    ),
    'peft.tuners.ln_tuning.model': (
        'LNTuningModel',
    ),
    'peft.tuners.loha': (
        'Conv2d', 'Linear', 'LoHaConfig', 'LoHaLayer', 'LoHaModel',
    ),
    'peft.tuners.loha.config': (
        'LoHaConfig',
    ),
    'peft.tuners.loha.layer': (
        'Conv1d', 'Conv2d', 'HadaWeight', 'HadaWeightCP', 'Linear', 'LoHaLayer', 'make_weight',
        'make_weight_cp',
    ),
    'peft.tuners.loha.model': (
        'LoHaModel',
    ),
    'peft.tuners.lokr': (
        'Conv2d', 'Linear', 'LoKrConfig', 'LoKrLayer', 'LoKrModel',
    ),
    'peft.tuners.lokr.config': (
        'LoKrConfig',
    ),
    'peft.tuners.lokr.layer': (
        'Conv1d', 'Conv2d', 'Linear', 'LoKrLayer', 'factorization', 'make_kron', 'make_weight_cp',
    ),
    'peft.tuners.lokr.model': (
        'LoKrModel',
    ),
    'peft.tuners.lora': (
        'ArrowConfig', 'BdLoraConfig', 'Conv2d', 'Conv3d', 'Embedding', 'EvaConfig', 'GPTQLoraLinear',
        'KasaConfig', 'Linear', 'LoftQConfig', 'LoraConfig', 'LoraGAConfig', 'LoraLayer', 'LoraModel',
        'LoraRuntimeConfig', 'MontecloraConfig', 'ParamWrapper', 'VeloraConfig', 'convert_to_lora',
        'create_arrow_model', 'get_eva_state_dict', 'initialize_lora_eva_weights', 'preprocess_loraga',
        'save_as_lora',
    ),
    'peft.tuners.lora.aqlm': (
        'AqlmLoraLinear', 'dispatch_aqlm',
    ),
    'peft.tuners.lora.arrow': (
        'ArrowLoraLinearLayer', 'check_loaded_lora_compatibility_arrow', 'create_arrow_model',
        'ensure_adapters_target_linear_layers_only',
    ),
    'peft.tuners.lora.awq': (
        'AwqLoraLinear', 'dispatch_awq',
    ),
    'peft.tuners.lora.bnb': (
        'Linear4bit', 'Linear8bitLt', 'dispatch_bnb_4bit', 'dispatch_bnb_8bit',
    ),
    'peft.tuners.lora.config': (
        'ArrowConfig', 'BdLoraConfig', 'CordaConfig', 'EvaConfig', 'KasaConfig', 'LoftQConfig', 'LoraConfig',
        'LoraGAConfig', 'LoraRuntimeConfig', 'MontecloraConfig', 'VeloraConfig',
    ),
    'peft.tuners.lora.conversion': (
        'convert_to_lora', 'save_as_lora',
    ),
    'peft.tuners.lora.dora': (
        'DoraConv1dLayer', 'DoraConv2dLayer', 'DoraConv3dLayer', 'DoraEmbeddingLayer', 'DoraLinearLayer',
        'cache_decorator',
    ),
    'peft.tuners.lora.eetq': (
        'dispatch_eetq',
    ),
    'peft.tuners.lora.eva': (
        'HashHook', 'SVDHook', 'find_equal_values', 'forward_fn_dict', 'get_device_with_meta_params',
        'get_eva_state_dict', 'initialize_lora_eva_weights', 'move_inputs_to_device',
        'prepare_layer_inputs_fn_language_modeling', 'prepare_model_inputs_fn_language_modeling',
    ),
    'peft.tuners.lora.gptq': (
        'GPTQLoraLinear', 'dispatch_gptq',
    ),
    'peft.tuners.lora.hqq': (
        'dispatch_hqq',
    ),
    'peft.tuners.lora.inc': (
        'dispatch_inc',
    ),
    'peft.tuners.lora.intruders': (
        'reduce_intruder_dimension',
    ),
    'peft.tuners.lora.layer': (
        'Conv1d', 'Conv2d', 'Conv3d', 'Embedding', 'Linear', 'LoraEmbeddingATPHolder', 'LoraLayer',
        'LoraVariant', 'MultiheadAttention', 'ParamWrapper', 'dispatch_default',
    ),
    'peft.tuners.lora.loraga': (
        'estimate_gradients', 'get_model_device', 'get_target_modules', 'preprocess_loraga',
    ),
    'peft.tuners.lora.model': (
        'LoraModel', 'add_lora_tp_hooks_dtensor', 'get_tp_plan_and_mesh',
    ),
    'peft.tuners.lora.monteclora': (
        'BufferedMontecloraSampler', 'MontecloraSampler',
    ),
    'peft.tuners.lora.te': (
        'TeLinear', 'dispatch_transformer_engine',
    ),
    'peft.tuners.lora.torchao': (
        'TorchaoLoraLinear', 'dispatch_torchao',
    ),
    'peft.tuners.lora.tp_layer': (
        'LoraParallelLinear', 'dispatch_megatron', 'get_default_module_allowlist',
    ),
    'peft.tuners.lora.variants': (
        'ALoraLinearVariant', 'ArrowLinearVariant', 'BdLoraLinearVariant', 'BlockDiagonalLinear',
        'DoraConv1dVariant', 'DoraConv2dVariant', 'DoraConv3dVariant', 'DoraEmbeddingVariant',
        'DoraLinearVariant', 'KasaLinearVariant', 'MiCAEmbeddingVariant', 'MiCALinearVariant',
        'MontecloraLinearVariant', 'QALoraLinearVariant', 'VeloraLinearVariant', 'calculate_alora_offsets',
        'get_alora_offsets_for_forward', 'get_alora_offsets_for_generate', 'is_alora_relevant_in_batch',
    ),
    'peft.tuners.lora.velora': (
        'VeloraFunction',
    ),
    'peft.tuners.lycoris_utils': (
        'LycorisConfig', 'LycorisLayer', 'LycorisTuner',
    ),
    'peft.tuners.miss': (
        'MissConfig', 'MissLayer', 'MissLinear', 'MissModel',
    ),
    'peft.tuners.miss.config': (
        'MissConfig',
    ),
    'peft.tuners.miss.layer': (
        'MissLayer', 'MissLinear',
    ),
    'peft.tuners.miss.model': (
        'MissModel',
    ),
    'peft.tuners.mixed': (
        'MixedModel',
    ),
    'peft.tuners.mixed.model': (
        'MixedModel',
    ),
    'peft.tuners.multitask_prompt_tuning': (
        'MultitaskPromptEmbedding', 'MultitaskPromptTuningConfig', 'MultitaskPromptTuningInit',
    ),
    'peft.tuners.multitask_prompt_tuning.config': (
        'MultitaskPromptTuningConfig', 'MultitaskPromptTuningInit',
    ),
    'peft.tuners.multitask_prompt_tuning.model': (
        'MultitaskPromptEmbedding',
    ),
    'peft.tuners.oft': (
        'Conv2d', 'Embedding', 'Linear', 'OFTConfig', 'OFTLayer', 'OFTModel',
    ),
    'peft.tuners.oft.config': (
        'OFTConfig',
    ),
    'peft.tuners.oft.layer': (
        'Conv2d', 'Embedding', 'Linear', 'MultiplicativeDropoutLayer', 'OFTLayer', 'OFTRotationModule',
    ),
    'peft.tuners.oft.model': (
        'OFTModel',
    ),
    'peft.tuners.osf': (
        'Linear', 'OSFConfig', 'OSFLayer', 'OSFModel',
    ),
    'peft.tuners.osf.config': (
        'OSFConfig',
    ),
    'peft.tuners.osf.layer': (
        'Linear', 'OSFLayer', 'dispatch_default',
    ),
    'peft.tuners.osf.model': (
        'OSFModel',
    ),
    'peft.tuners.osf.utils': (
        'decompose_weight_matrix', 'project_gradient_to_orthogonal_space',
    ),
    'peft.tuners.p_tuning': (
        'PromptEncoder', 'PromptEncoderConfig', 'PromptEncoderReparameterizationType',
    ),
    'peft.tuners.p_tuning.config': (
        'PromptEncoderConfig', 'PromptEncoderReparameterizationType',
    ),
    'peft.tuners.p_tuning.model': (
        'PromptEncoder',
    ),
    'peft.tuners.peanut': (
        'Linear', 'PeanutConfig', 'PeanutLayer', 'PeanutModel',
    ),
    'peft.tuners.peanut.config': (
        'PeanutConfig',
    ),
    'peft.tuners.peanut.layer': (
        'Linear', 'PeanutLayer',
    ),
    'peft.tuners.peanut.model': (
        'PeanutModel',
    ),
    'peft.tuners.poly': (
        'Linear', 'PolyConfig', 'PolyLayer', 'PolyModel',
    ),
    'peft.tuners.poly.config': (
        'PolyConfig',
    ),
    'peft.tuners.poly.layer': (
        'Linear', 'PolyLayer',
    ),
    'peft.tuners.poly.model': (
        'PolyModel',
    ),
    'peft.tuners.poly.router': (
        'PolyRouter', 'Router', 'get_router',
    ),
    'peft.tuners.prefix_tuning': (
        'PrefixEncoder', 'PrefixTuningConfig',
    ),
    'peft.tuners.prefix_tuning.config': (
        'PrefixTuningConfig',
    ),
    'peft.tuners.prefix_tuning.model': (
        'PrefixEncoder',
    ),
    'peft.tuners.prompt_tuning': (
        'PromptEmbedding', 'PromptTuningConfig', 'PromptTuningInit',
    ),
    'peft.tuners.prompt_tuning.config': (
        'PromptTuningConfig', 'PromptTuningInit',
    ),
    'peft.tuners.prompt_tuning.model': (
        'PromptEmbedding',
    ),
    'peft.tuners.psoft': (
        'Linear', 'PsoftConfig', 'PsoftLayer', 'PsoftModel',
    ),
    'peft.tuners.psoft.config': (
        'PsoftConfig',
    ),
    'peft.tuners.psoft.layer': (
        'Linear', 'OrthLayer', 'PsoftLayer', 'dispatch_default',
    ),
    'peft.tuners.psoft.model': (
        'PsoftModel',
    ),
    'peft.tuners.pvera': (
        'Linear', 'PveraConfig', 'PveraLayer', 'PveraModel',
    ),
    'peft.tuners.pvera.bnb': (
        'Linear4bit', 'Linear8bitLt',
    ),
    'peft.tuners.pvera.config': (
        'PveraConfig',
    ),
    'peft.tuners.pvera.layer': (
        'Linear', 'PveraLayer',
    ),
    'peft.tuners.pvera.model': (
        'PveraModel',
    ),
    'peft.tuners.randlora': (
        'Linear', 'RandLoraConfig', 'RandLoraLayer', 'RandLoraModel',
    ),
    'peft.tuners.randlora.bnb': (
        'Linear4bit', 'Linear8bitLt',
    ),
    'peft.tuners.randlora.config': (
        'RandLoraConfig',
    ),
    'peft.tuners.randlora.layer': (
        'Linear', 'RandLoraLayer', 'UniqueBaseGrad',
    ),
    'peft.tuners.randlora.model': (
        'RandLoraModel',
    ),
    'peft.tuners.road': (
        'Linear', 'RoadConfig', 'RoadLayer', 'RoadModel',
    ),
    'peft.tuners.road.bnb': (
        'Linear4bit', 'Linear8bitLt', 'dispatch_bnb_4bit', 'dispatch_bnb_8bit',
    ),
    'peft.tuners.road.config': (
        'RoadConfig',
    ),
    'peft.tuners.road.layer': (
        'Linear', 'RoadLayer', 'dispatch_default',
    ),
    'peft.tuners.road.model': (
        'RoadModel',
    ),
    'peft.tuners.shadow': (
        'DetachedShadowModel', 'ShadowCache', 'ShadowCarrier', 'ShadowConfig', 'ShadowLayer', 'ShadowModel',
    ),
    'peft.tuners.shadow.config': (
        'ShadowConfig',
    ),
    'peft.tuners.shadow.diffusion_models': (
        'DetachedFluxShadowModel', 'DiffusionShadowBackend', 'Flux2ShadowBackend',
        'freeze_flux_stem_embeddings', 'get_diffusion_shadow_backend', 'validate_pretrained_flux_shadow',
    ),
    'peft.tuners.shadow.layers': (
        'DetachedShadowModel', 'ShadowCache', 'ShadowCarrier', 'ShadowLayer',
    ),
    'peft.tuners.shadow.model': (
        'ShadowModel',
    ),
    'peft.tuners.shira': (
        'Linear', 'ShiraConfig', 'ShiraLayer', 'ShiraModel',
    ),
    'peft.tuners.shira.config': (
        'ShiraConfig',
    ),
    'peft.tuners.shira.layer': (
        'Linear', 'ShiraLayer',
    ),
    'peft.tuners.shira.mask_functions': (
        'random_mask',
    ),
    'peft.tuners.shira.model': (
        'ShiraModel',
    ),
    'peft.tuners.supertuning': (
        'Linear', 'SupertuningConfig', 'SupertuningLayer', 'SupertuningModel',
    ),
    'peft.tuners.supertuning.config': (
        'SupertuningConfig',
    ),
    'peft.tuners.supertuning.layer': (
        'Linear', 'SupertuningLayer',
    ),
    'peft.tuners.supertuning.model': (
        'SupertuningModel',
    ),
    'peft.tuners.tinylora': (
        'Embedding', 'Linear', 'TinyLoraConfig', 'TinyLoraLayer', 'TinyLoraModel',
    ),
    'peft.tuners.tinylora.config': (
        'TinyLoraConfig',
    ),
    'peft.tuners.tinylora.layer': (
        'Embedding', 'Linear', 'TinyLoraLayer',
    ),
    'peft.tuners.tinylora.model': (
        'TinyLoraModel',
    ),
    'peft.tuners.trainable_tokens': (
        'TrainableTokensConfig', 'TrainableTokensLayer', 'TrainableTokensModel',
    ),
    'peft.tuners.trainable_tokens.config': (
        'TrainableTokensConfig',
    ),
    'peft.tuners.trainable_tokens.layer': (
        'TrainableTokensLayer',
    ),
    'peft.tuners.trainable_tokens.model': (
        'TrainableTokensModel',
    ),
    'peft.tuners.tuners_utils': (
        'BasePromptEncoder', 'BaseTuner', 'BaseTunerLayer', 'cast_adapter_dtype', 'check_adapters_to_merge',
        'check_target_module_exists', 'clone_module', 'delete_adapter', 'find_parameter_name_by_module',
        'get_device_map', 'inspect_matched_modules', 'onload_layer', 'replicate_layers', 'set_adapter',
        'set_requires_grad',
    ),
    'peft.tuners.unilora': (
        'Linear', 'UniLoraConfig', 'UniLoraLayer', 'UniLoraModel',
    ),
    'peft.tuners.unilora.config': (
        'UniLoraConfig',
    ),
    'peft.tuners.unilora.layer': (
        'Linear', 'UniLoraLayer',
    ),
    'peft.tuners.unilora.model': (
        'UniLoraModel',
    ),
    'peft.tuners.vblora': (
        'Linear', 'VBLoRAConfig', 'VBLoRALayer', 'VBLoRAModel',
    ),
    'peft.tuners.vblora.config': (
        'VBLoRAConfig',
    ),
    'peft.tuners.vblora.layer': (
        'Linear', 'VBLoRALayer',
    ),
    'peft.tuners.vblora.model': (
        'VBLoRAModel',
    ),
    'peft.tuners.vera': (
        'Linear', 'VeraConfig', 'VeraLayer', 'VeraModel',
    ),
    'peft.tuners.vera.config': (
        'VeraConfig',
    ),
    'peft.tuners.vera.layer': (
        'Linear', 'VeraLayer',
    ),
    'peft.tuners.vera.model': (
        'VeraModel',
    ),
    'peft.tuners.waveft': (
        'WaveFTConfig', 'WaveFTLayer', 'WaveFTLinear', 'WaveFTModel',
    ),
    'peft.tuners.waveft.config': (
        'WaveFTConfig',
    ),
    'peft.tuners.waveft.layer': (
        'WaveFTLayer', 'WaveFTLinear',
    ),
    'peft.tuners.waveft.model': (
        'WaveFTModel',
    ),
    'peft.tuners.waveft.wavelet': (
        'Wavelet', 'wavelist',
    ),
    'peft.tuners.waveft.waverec2d': (
        'Wavelet', 'WaveletDetailTuple2d', 'WaveletTensorTuple', 'waverec2d',
    ),
    'peft.tuners.xlora': (
        'XLoraConfig', 'XLoraModel',
    ),
    'peft.tuners.xlora.classifier': (
        'TemperatureScaledSoftmax', 'XLoraClassifier',
    ),
    'peft.tuners.xlora.config': (
        'XLoraConfig',
    ),
    'peft.tuners.xlora.layer': (
        'XLoraConv2dLayer', 'XLoraEmbeddingLayer', 'XLoraLayer', 'XLoraLinearLayer',
    ),
    'peft.tuners.xlora.model': (
        'XLoraModel', 'convert_layers_to_xlora',
    ),
    'peft.utils': (
        'AuxiliaryTrainingWrapper', 'ModulesToSaveWrapper', 'NoMatchingPeftModuleError', 'PeftError',
        'PeftType', 'PeftWarning', 'TaskType', 'TrainableTokensWrapper',
        'bloom_model_postprocess_past_key_value', 'cast_mixed_precision_params', 'get_base_model_state_dict',
        'get_gptqmodel_quant_linear', 'get_peft_model_state_dict', 'get_quantization_config',
        'get_quantization_kwargs', 'id_tensor_storage', 'infer_device', 'load_peft_weights',
        'map_cache_to_layer_device_map', 'prepare_model_for_kbit_training', 'quantization_extra_repr',
        'register_peft_method', 'replace_lora_weights_loftq', 'resolve_quantization_backend',
        'set_additional_trainable_modules', 'set_base_model_state_dict', 'set_peft_model_state_dict',
        'shift_tokens_right', 'transpose',
    ),
    'peft.utils.constants': (
        'bloom_model_postprocess_past_key_value', 'starcoder_model_postprocess_past_key_value',
    ),
    'peft.utils.error': (
        'NoMatchingPeftModuleError', 'PeftError',
    ),
    'peft.utils.hotswap': (
        'check_hotswap_configs_compatible', 'hotswap_adapter', 'hotswap_adapter_from_state_dict',
        'prepare_model_for_compiled_hotswap',
    ),
    'peft.utils.incremental_pca': (
        'IncrementalPCA',
    ),
    'peft.utils.integrations': (
        'TpInfo', 'check_deepspeed_zero3_enabled', 'dequantize_bnb_weight', 'dequantize_module_weight',
        'dtensor_from_local_like', 'gather_params_ctx', 'get_bnb_param_type', 'get_layer_device_map',
        'init_empty_weights', 'map_cache_to_layer_device_map', 'skip_init_on_device',
    ),
    'peft.utils.loftq_utils': (
        'loftq_init', 'replace_lora_weights_loftq',
    ),
    'peft.utils.merge_utils': (
        'calculate_majority_sign_mask', 'dare_linear', 'dare_ties', 'disjoint_merge',
        'magnitude_based_pruning', 'magnitude_prune', 'prune', 'random_pruning',
        'reshape_weight_task_tensors', 'task_arithmetic', 'ties',
    ),
    'peft.utils.other': (
        'AuxiliaryTrainingWrapper', 'ModulesToSaveWrapper', 'TrainableTokensWrapper',
        'bloom_model_postprocess_past_key_value', 'cast_mixed_precision_params',
        'check_file_exists_on_hf_hub', 'create_attention_mask', 'fsdp_auto_wrap_policy',
        'get_gptqmodel_quant_linear', 'get_pattern_key', 'get_quantization_config', 'id_tensor_storage',
        'infer_device', 'is_gptqmodel_awq_layer', 'is_gptqmodel_quant_linear', 'match_target_against_key',
        'prepare_model_for_kbit_training', 'set_additional_trainable_modules', 'shift_tokens_right',
        'starcoder_model_postprocess_past_key_value', 'str_to_bool', 'transpose',
    ),
    'peft.utils.peft_types': (
        'PeftType', 'TaskType', 'register_peft_method',
    ),
    'peft.utils.quantization_utils': (
        'Bnb4bitBackend', 'Bnb8bitBackend', 'ForwardOnlyQuantizationBackend', 'HqqBackend',
        'QuantizationBackend', 'TorchaoBackend', 'get_quantization_kwargs', 'quantization_extra_repr',
        'resolve_quantization_backend',
    ),
    'peft.utils.save_and_load': (
        'get_base_model_state_dict', 'get_embedding_layer_name', 'get_peft_model_state_dict',
        'has_valid_embedding_base_layer', 'load_peft_weights', 'set_base_model_state_dict',
        'set_peft_model_state_dict', 'torch_load',
    ),
    'peft.utils.transformers_weight_conversion': (
        'FlattenDims', 'PeftConcatenate', 'PermuteDims', 'build_peft_weight_mapping',
        'convert_peft_adapter_state_dict_for_transformers', 'convert_peft_config_for_transformers',
    ),
    'peft.utils.warning': (
        'PeftWarning',
    ),
}

# adapter layer classes: (adapter_layer_names, other_param_names), static metadata libraries read
PEFT_LAYER_ATTRIBUTES = {
    'peft.tuners.adalora.bnb.SVDLinear8bitLt': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adalora.bnb.SVDLinear4bit': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adalora.gptq.SVDQuantLinear': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adalora.layer.AdaLoraLayer': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adalora.layer.SVDLinear': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adalora.layer.SVDConv2d': (
        ('lora_A', 'lora_B', 'lora_E', 'lora_embedding_A', 'lora_embedding_B'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'ranknum'),
    ),
    'peft.tuners.adamss.layer.AdamssLayer': (
        ('adamss_A', 'adamss_B'),
        ('num_subspaces', 'train_subspace_index', 'seg_result', 'scatter_index', 'exp_avg_ipt_A', 'exp_avg_ipt_B', 'exp_avg_unc_A', 'exp_avg_unc_B', 'adamss_newB'),
    ),
    'peft.tuners.adamss.layer.Linear': (
        ('adamss_A', 'adamss_B'),
        ('num_subspaces', 'train_subspace_index', 'seg_result', 'scatter_index', 'exp_avg_ipt_A', 'exp_avg_ipt_B', 'exp_avg_unc_A', 'exp_avg_unc_B', 'adamss_newB'),
    ),
    'peft.tuners.beft.layer.BeftLayer': (
        ('beft_bias',),
        (),
    ),
    'peft.tuners.beft.layer.Linear': (
        ('beft_bias',),
        (),
    ),
    'peft.tuners.boft.layer.BOFTLayer': (
        ('boft_R', 'boft_s'),
        ('boft_block_size', 'boft_block_num', 'boft_dropout'),
    ),
    'peft.tuners.boft.layer.Linear': (
        ('boft_R', 'boft_s'),
        ('boft_block_size', 'boft_block_num', 'boft_dropout'),
    ),
    'peft.tuners.boft.layer.Conv2d': (
        ('boft_R', 'boft_s'),
        ('boft_block_size', 'boft_block_num', 'boft_dropout'),
    ),
    'peft.tuners.c3a.layer.C3ALayer': (
        ('c3a_kernel',),
        ('block_size',),
    ),
    'peft.tuners.c3a.layer.C3ALinear': (
        ('c3a_kernel',),
        ('block_size',),
    ),
    'peft.tuners.deft.layer.DeftLayer': (
        ('deft_P', 'deft_R'),
        ('deft_r', 'deft_decomposition', 'deft_init_scale', 'deft_para', 'deft_scaling', 'deft_dropout', '_cached_merge_factor'),
    ),
    'peft.tuners.deft.layer.DeftLinear': (
        ('deft_P', 'deft_R'),
        ('deft_r', 'deft_decomposition', 'deft_init_scale', 'deft_para', 'deft_scaling', 'deft_dropout', '_cached_merge_factor'),
    ),
    'peft.tuners.delora.layer.DeloraLayer': (
        ('delora_A', 'delora_B', 'delora_lambda'),
        ('r', 'delora_dropout', 'delora_w_norm'),
    ),
    'peft.tuners.delora.layer.DeloraLinear': (
        ('delora_A', 'delora_B', 'delora_lambda'),
        ('r', 'delora_dropout', 'delora_w_norm'),
    ),
    'peft.tuners.fourierft.layer.FourierFTLayer': (
        ('fourierft_spectrum',),
        ('fourierft_n_frequency', 'fourierft_scaling', 'fourierft_random_loc_seed', 'indices'),
    ),
    'peft.tuners.fourierft.layer.FourierFTLinear': (
        ('fourierft_spectrum',),
        ('fourierft_n_frequency', 'fourierft_scaling', 'fourierft_random_loc_seed', 'indices'),
    ),
    'peft.tuners.frod.layer.FrodLayer': (
        ('frod_lambda_l', 'frod_lambda_s_values'),
        ('r', 'frod_V', 'frod_U', 'frod_s_indices', 'frod_s_size', 'runtime_offload_base_weight', 'frod_dropout'),
    ),
    'peft.tuners.frod.layer.Linear': (
        ('frod_lambda_l', 'frod_lambda_s_values'),
        ('r', 'frod_V', 'frod_U', 'frod_s_indices', 'frod_s_size', 'runtime_offload_base_weight', 'frod_dropout'),
    ),
    'peft.tuners.glora.layer.GloraLayer': (
        ('glora_A', 'glora_B', 'glora_C', 'glora_D', 'glora_E'),
        ('r',),
    ),
    'peft.tuners.glora.layer.GloraLinear': (
        ('glora_A', 'glora_B', 'glora_C', 'glora_D', 'glora_E'),
        ('r',),
    ),
    'peft.tuners.gralora.layer.GraloraLayer': (
        ('gralora_A', 'gralora_B', 'gralora_A_general', 'gralora_B_general'),
        ('r', 'hybrid_r', 'alpha', 'scaling', 'gralora_dropout', 'gralora_k'),
    ),
    'peft.tuners.gralora.layer.Linear': (
        ('gralora_A', 'gralora_B', 'gralora_A_general', 'gralora_B_general'),
        ('r', 'hybrid_r', 'alpha', 'scaling', 'gralora_dropout', 'gralora_k'),
    ),
    'peft.tuners.hira.bnb.Linear8bitLt': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.bnb.Linear4bit': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.HiraLayer': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.Linear': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.Embedding': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer._ConvNd': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.Conv2d': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.Conv1d': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hira.layer.Conv3d': (
        ('hira_A', 'hira_B', 'hira_embedding_A', 'hira_embedding_B'),
        ('r', 'hira_dropout'),
    ),
    'peft.tuners.hra.layer.HRALayer': (
        ('hra_u',),
        ('hra_r', 'hra_apply_GS'),
    ),
    'peft.tuners.hra.layer.HRALinear': (
        ('hra_u',),
        ('hra_r', 'hra_apply_GS'),
    ),
    'peft.tuners.hra.layer.HRAConv2d': (
        ('hra_u',),
        ('hra_r', 'hra_apply_GS'),
    ),
    'peft.tuners.ia3.bnb.Linear8bitLt': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.bnb.Linear4bit': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.layer.IA3Layer': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.layer.Linear': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.layer._ConvNd': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.layer.Conv2d': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.ia3.layer.Conv3d': (
        ('ia3_l',),
        (),
    ),
    'peft.tuners.lily.layer.LilyLayer': (
        ('lily_A', 'lily_B', 'lily_router'),
        ('r', 'scaling', 'stride_A', 'num_B'),
    ),
    'peft.tuners.lily.layer.Linear': (
        ('lily_A', 'lily_B', 'lily_router'),
        ('r', 'scaling', 'stride_A', 'num_B'),
    ),
    'peft.tuners.ln_tuning.layer.LNTuningLayer': (
        ('ln_tuning_layers',),
        (),
    ),
    'peft.tuners.loha.layer.LoHaLayer': (
        ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.loha.layer.Linear': (
        ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.loha.layer.Conv2d': (
        ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.loha.layer.Conv1d': (
        ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.lokr.layer.LoKrLayer': (
        ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.lokr.layer.Linear': (
        ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.lokr.layer.Conv2d': (
        ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.lokr.layer.Conv1d': (
        ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2'),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.lora.aqlm.AqlmLoraLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.awq.AwqLoraLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.bnb.Linear8bitLt': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.bnb.Linear4bit': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.gptq.GPTQLoraLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.LoraLayer': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.Linear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.Embedding': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer._ConvNd': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.Conv2d': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.Conv1d': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.Conv3d': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.MultiheadAttention': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.layer.ParamWrapper': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.te.TeLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.torchao.TorchaoLoraLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lora.tp_layer.LoraParallelLinear': (
        ('lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'),
        ('r', 'lora_alpha', 'scaling', 'lora_dropout', 'use_dora', 'use_rslora', 'lora_bias'),
    ),
    'peft.tuners.lycoris_utils.LycorisLayer': (
        (),
        ('r', 'alpha', 'scaling', 'rank_dropout', 'rank_dropout_scale', 'module_dropout'),
    ),
    'peft.tuners.miss.layer.MissLayer': (
        ('miss_block',),
        ('miss_r', 'miss_dropout', 'miss_mini_r'),
    ),
    'peft.tuners.miss.layer.MissLinear': (
        ('miss_block',),
        ('miss_r', 'miss_dropout', 'miss_mini_r'),
    ),
    'peft.tuners.oft.layer.OFTLayer': (
        ('oft_R', 'oft_embedding_R'),
        ('r', 'oft_block_size', 'oft_dropout'),
    ),
    'peft.tuners.oft.layer.Linear': (
        ('oft_R', 'oft_embedding_R'),
        ('r', 'oft_block_size', 'oft_dropout'),
    ),
    'peft.tuners.oft.layer.Conv2d': (
        ('oft_R', 'oft_embedding_R'),
        ('r', 'oft_block_size', 'oft_dropout'),
    ),
    'peft.tuners.oft.layer.Embedding': (
        ('oft_R', 'oft_embedding_R'),
        ('r', 'oft_block_size', 'oft_dropout'),
    ),
    'peft.tuners.osf.layer.OSFLayer': (
        ('osf_svd_params',),
        ('_osf_U_low_init', '_osf_S_low_init', '_osf_V_low_init', '_osf_U_high', '_osf_V_high', 'effective_rank'),
    ),
    'peft.tuners.osf.layer.Linear': (
        ('osf_svd_params',),
        ('_osf_U_low_init', '_osf_S_low_init', '_osf_V_low_init', '_osf_U_high', '_osf_V_high', 'effective_rank'),
    ),
    'peft.tuners.peanut.layer.PeanutLayer': (
        ('peanut_A', 'peanut_B', 'peanut_encoders', 'peanut_decoders'),
        ('r', 'depth', 'scaling', 'act_fn', 'res_num'),
    ),
    'peft.tuners.peanut.layer.Linear': (
        ('peanut_A', 'peanut_B', 'peanut_encoders', 'peanut_decoders'),
        ('r', 'depth', 'scaling', 'act_fn', 'res_num'),
    ),
    'peft.tuners.poly.layer.PolyLayer': (
        ('poly_lora_A', 'poly_lora_B', 'poly_router'),
        ('r', 'n_tasks', 'n_skills', 'n_splits', 'poly_type'),
    ),
    'peft.tuners.poly.layer.Linear': (
        ('poly_lora_A', 'poly_lora_B', 'poly_router'),
        ('r', 'n_tasks', 'n_skills', 'n_splits', 'poly_type'),
    ),
    'peft.tuners.psoft.layer.PsoftLayer': (
        ('psoft_R',),
        ('r', 'psoft_alpha', 'scaling', 'psoft_dropout', 'psoft_svd', 'psoft_svd_lowrank_niter', 'random_seed', 'ab_svd_init', '_psoft_A_cache', '_psoft_B_cache'),
    ),
    'peft.tuners.psoft.layer.Linear': (
        ('psoft_R',),
        ('r', 'psoft_alpha', 'scaling', 'psoft_dropout', 'psoft_svd', 'psoft_svd_lowrank_niter', 'random_seed', 'ab_svd_init', '_psoft_A_cache', '_psoft_B_cache'),
    ),
    'peft.tuners.pvera.bnb.Linear8bitLt': (
        ('pvera_lambda_b', 'pvera_lambda_d'),
        ('pvera_A', 'pvera_B', 'pvera_dropout', 'r', 'sample_at_inference', 'pvera_generator'),
    ),
    'peft.tuners.pvera.bnb.Linear4bit': (
        ('pvera_lambda_b', 'pvera_lambda_d'),
        ('pvera_A', 'pvera_B', 'pvera_dropout', 'r', 'sample_at_inference', 'pvera_generator'),
    ),
    'peft.tuners.pvera.layer.PveraLayer': (
        ('pvera_lambda_b', 'pvera_lambda_d'),
        ('pvera_A', 'pvera_B', 'pvera_dropout', 'r', 'sample_at_inference', 'pvera_generator'),
    ),
    'peft.tuners.pvera.layer.Linear': (
        ('pvera_lambda_b', 'pvera_lambda_d'),
        ('pvera_A', 'pvera_B', 'pvera_dropout', 'r', 'sample_at_inference', 'pvera_generator'),
    ),
    'peft.tuners.randlora.bnb.Linear8bitLt': (
        ('randlora_lambda', 'randlora_gamma'),
        ('randlora_A', 'randlora_B', 'randlora_dropout', 'r', 'scaling'),
    ),
    'peft.tuners.randlora.bnb.Linear4bit': (
        ('randlora_lambda', 'randlora_gamma'),
        ('randlora_A', 'randlora_B', 'randlora_dropout', 'r', 'scaling'),
    ),
    'peft.tuners.randlora.layer.RandLoraLayer': (
        ('randlora_lambda', 'randlora_gamma'),
        ('randlora_A', 'randlora_B', 'randlora_dropout', 'r', 'scaling'),
    ),
    'peft.tuners.randlora.layer.Linear': (
        ('randlora_lambda', 'randlora_gamma'),
        ('randlora_A', 'randlora_B', 'randlora_dropout', 'r', 'scaling'),
    ),
    'peft.tuners.road.bnb.Linear8bitLt': (
        ('road_theta', 'road_alpha'),
        ('variant', 'group_size'),
    ),
    'peft.tuners.road.bnb.Linear4bit': (
        ('road_theta', 'road_alpha'),
        ('variant', 'group_size'),
    ),
    'peft.tuners.road.layer.RoadLayer': (
        ('road_theta', 'road_alpha'),
        ('variant', 'group_size'),
    ),
    'peft.tuners.road.layer.Linear': (
        ('road_theta', 'road_alpha'),
        ('variant', 'group_size'),
    ),
    'peft.tuners.shadow.layers.ShadowLayer': (
        ('shadow_down', 'shadow_up', 'shadow_update_transform', 'shadow_update_gate', 'shadow_dropout'),
        ('shadow_r', 'shadow_alpha'),
    ),
    'peft.tuners.shira.layer.ShiraLayer': (
        ('shira_weight',),
        ('r', 'scaling', 'shira_indices'),
    ),
    'peft.tuners.shira.layer.Linear': (
        ('shira_weight',),
        ('r', 'scaling', 'shira_indices'),
    ),
    'peft.tuners.supertuning.layer.SupertuningLayer': (
        ('supertuning_values', 'supertuning_lora_A', 'supertuning_lora_B'),
        ('supertuning_indices', 'supertuning_rank', 'supertuning_lora_alpha', 'supertuning_lora_dropout'),
    ),
    'peft.tuners.supertuning.layer.Linear': (
        ('supertuning_values', 'supertuning_lora_A', 'supertuning_lora_B'),
        ('supertuning_indices', 'supertuning_rank', 'supertuning_lora_alpha', 'supertuning_lora_dropout'),
    ),
    'peft.tuners.tinylora.layer.TinyLoraLayer': (
        ('tinylora_v',),
        ('tinylora_A', 'tinylora_B', 'tinylora_P'),
    ),
    'peft.tuners.tinylora.layer.Linear': (
        ('tinylora_v',),
        ('tinylora_A', 'tinylora_B', 'tinylora_P'),
    ),
    'peft.tuners.tinylora.layer.Embedding': (
        ('tinylora_v',),
        ('tinylora_A', 'tinylora_B', 'tinylora_P'),
    ),
    'peft.tuners.trainable_tokens.layer.TrainableTokensLayer': (
        ('trainable_tokens_delta',),
        ('token_indices', 'trainable_tokens_original'),
    ),
    'peft.tuners.tuners_utils.BaseTunerLayer': (
        (),
        (),
    ),
    'peft.tuners.unilora.layer.UniLoraLayer': (
        ('unilora_theta_d',),
        ('r', 'unilora_indices_A', 'unilora_indices_B', 'unilora_scales_A', 'unilora_scales_B', 'unilora_dropout'),
    ),
    'peft.tuners.unilora.layer.Linear': (
        ('unilora_theta_d',),
        ('r', 'unilora_indices_A', 'unilora_indices_B', 'unilora_scales_A', 'unilora_scales_B', 'unilora_dropout'),
    ),
    'peft.tuners.vblora.layer.VBLoRALayer': (
        ('vblora_logits_A', 'vblora_logits_B', 'vblora_vector_bank'),
        ('r', 'topk', 'vblora_dropout'),
    ),
    'peft.tuners.vblora.layer.Linear': (
        ('vblora_logits_A', 'vblora_logits_B', 'vblora_vector_bank'),
        ('r', 'topk', 'vblora_dropout'),
    ),
    'peft.tuners.vera.layer.VeraLayer': (
        ('vera_lambda_b', 'vera_lambda_d'),
        ('vera_A', 'vera_B', 'vera_dropout', 'r'),
    ),
    'peft.tuners.vera.layer.Linear': (
        ('vera_lambda_b', 'vera_lambda_d'),
        ('vera_A', 'vera_B', 'vera_dropout', 'r'),
    ),
    'peft.tuners.waveft.layer.WaveFTLayer': (
        ('waveft_spectrum',),
        ('waveft_n_frequency', 'waveft_scaling', 'waveft_random_loc_seed', 'waveft_wavelet_family', 'waveft_indices', 'waveft_use_idwt'),
    ),
    'peft.tuners.waveft.layer.WaveFTLinear': (
        ('waveft_spectrum',),
        ('waveft_n_frequency', 'waveft_scaling', 'waveft_random_loc_seed', 'waveft_wavelet_family', 'waveft_indices', 'waveft_use_idwt'),
    ),
}
