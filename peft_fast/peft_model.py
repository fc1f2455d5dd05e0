"""`PeftModel` and its task classes: PEFT's user-facing model API (L4)."""
from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .config import PeftConfig
from .mapping import base_model_name_or_path, tuner_class_for, warn_if_adapter_name_in_prefix
from .tuners.tuners_utils import BaseTunerLayer
from .utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .utils.hub import push_to_hub
from .utils.io import atomic_save_safetensors, atomic_torch_save
from .utils.model_card import create_or_update_model_card
from .utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, set_trainable
from .utils.peft_types import TaskType
from .utils.save_and_load import (convert_mutated_init_to_lora, get_peft_model_state_dict, load_peft_weights,
                                  set_peft_model_state_dict)
from .utils.transaction import rollback_on_error


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):
            n = p.ds_numel
        if p.__class__.__name__ == "Params4bit":  # bnb packs two 4-bit values a byte
            n = n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


class PeftModel(nn.Module):
    """Base model + adapters. ``model.base_model`` is the tuner (e.g. LoraModel), whose
    ``.model`` is the user's model with adapter layers injected."""

    _task_modules_to_save: Optional[list[str]] = None

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self.training = model.training  # report the base model's mode; its modules keep theirs
        self._adapters_disabled = False  # inside disable_adapter()
        self._extend_task_modules_to_save(peft_config)
        with rollback_on_error(model):  # a failed injection leaves the user's model untouched
            self.base_model = tuner_class_for(peft_config)(model, {adapter_name: peft_config}, adapter_name,
                                                           low_cpu_mem_usage=low_cpu_mem_usage)
            self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            if self._task_modules_to_save and hasattr(peft_config, "modules_to_save"):
                set_trainable(self.base_model.model, adapter_name, peft_config.modules_to_save,
                              inference_mode=peft_config.inference_mode)

    # ---- properties -----------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.base_model.peft_config = value

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter if hasattr(self, "base_model") else self._active_adapter

    @active_adapter.setter
    def active_adapter(self, value) -> None:
        self._active_adapter = value

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        a = self.active_adapter
        return self.peft_config[a if isinstance(a, str) else a[0]]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names = set()
        for cfg in self.peft_config.values():
            names |= set(getattr(cfg, "modules_to_save", None) or [])
        return names or None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _extend_task_modules_to_save(self, config: PeftConfig) -> None:
        """Add the task head (e.g. 'classifier') to modules_to_save before injection, as PEFT does,
        so that the injection itself wraps it with the right trainability."""
        extra = self._task_modules_to_save
        if not extra or not hasattr(config, "modules_to_save"):
            return
        if config.modules_to_save is None:
            config.modules_to_save = list(extra)
        else:
            config.modules_to_save = list(config.modules_to_save) + [m for m in extra if m not in config.modules_to_save]

    # ---- forward --------------------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route `adapter_names` (mixed-adapter batches) to every adapter layer. Inside
        disable_adapter() there is nothing to route: the base model answers every row (as PEFT)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None or not self.has_active_enabled_adapter:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set(self.peft_config) | {"__base__"}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        # PEFT silently ignores adapter_names for methods without mixed batches; say so instead
        other = sorted(n for n in self.peft_config if str(getattr(self.peft_config[n].peft_type, "value",
                                                                   self.peft_config[n].peft_type)) != "LORA")
        if other:
            raise ValueError(f"adapter_names (mixed-adapter batches) is supported for LoRA adapters only; adapter(s) "
                             f"{', '.join(repr(n) for n in other)} are {self.peft_config[other[0]].peft_type}")
        handles = []

        def pre_hook(_module, args, kw):
            kw["adapter_names"] = adapter_names
            return args, kw

        for module in self.base_model.model.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and hasattr(module, "_mixed_batch_forward"):
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, *args: Any, **kwargs: Any):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an inactive adapter; with `autocast_adapter_dtype` its fp16/bf16 weights become fp32."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        warn_if_adapter_name_in_prefix(adapter_name, peft_config)
        if peft_config.peft_type != self.peft_type:
            raise ValueError(f"Cannot combine adapters with different peft types. Found {self.peft_type} and {peft_config.peft_type}.")
        self._extend_task_modules_to_save(peft_config)
        with rollback_on_error(self):  # nothing half-added
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.base_model.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
            self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found. Available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable (default) or disable gradients on the given adapter(s); others are unchanged."""
        self.base_model.set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside disable_adapter() while an adapter is active (PEFT's property, same truth table)."""
        return not self.__dict__.get("_adapters_disabled", False) or not self.active_adapters

    @contextmanager
    def disable_adapter(self):
        """Context in which the model runs as the plain base model. Reentrant: on exit every
        layer is enabled or disabled as it was on entry, and requires_grad flags the disabling
        turned off are restored (ones changed inside the block are left as set there).
        If some layers were enabled and others disabled on entry, PEFT's warning is given and
        every layer is enabled on exit, as in PEFT."""
        layers = self.base_model._tuner_layers()
        was_disabled = [m.disable_adapters for m in layers]
        irregular = len(set(was_disabled)) > 1
        if irregular:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. "
                "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                "will be enabled"
            )
        # adapter parameters of layers this block will switch on from disabled take the state enabling gives
        newly_enabled = {id(p) for m, disabled in zip(layers, was_disabled) if irregular and disabled
                         for name in m.adapter_layer_names for p in getattr(m, name).parameters()}
        was_adapters_disabled = self.__dict__.get("_adapters_disabled", False)
        params = list(self.parameters())
        before = [p.requires_grad for p in params]
        self.base_model.disable_adapter_layers()
        self._adapters_disabled = True
        during = [p.requires_grad for p in params]
        try:
            yield
        finally:
            at_exit = [p.requires_grad for p in params]
            for m, disabled in zip(layers, was_disabled):
                m.enable_adapters(irregular or not disabled)
            for p, b, d, e in zip(params, before, during, at_exit):
                if e != d:
                    p.requires_grad_(e)
                elif id(p) not in newly_enabled:
                    p.requires_grad_(b)
            self._adapters_disabled = was_adapters_disabled

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, **kwargs):
        """Load a PEFT-format adapter (safetensors preferred) as `adapter_name` from a local directory or
        a Hub repo id (`kwargs`: ``subfolder`` and the ``hf_hub_download`` options, as in PEFT).
        `key_mapping` (PEFT's): ``{regex: replacement}`` renames applied to the checkpoint keys, without
        their ``base_model.model.`` prefix, before loading (see `load_peft_weights`)."""
        model_id = str(model_id)
        with rollback_on_error(self):  # a bad file or a shape mismatch leaves no half-added adapter
            if adapter_name not in self.peft_config:
                config = PeftConfig.from_pretrained(model_id, **kwargs)
                config.inference_mode = not is_trainable
                self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                                 autocast_adapter_dtype=autocast_adapter_dtype)
                # the new adapter is inactive, hence frozen; only it becomes trainable (as in PEFT)
                if is_trainable:
                    self.set_requires_grad(adapter_name)
            weights = load_peft_weights(model_id, device=torch_device, key_mapping=key_mapping, **kwargs)
            try:
                result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                                   low_cpu_mem_usage=low_cpu_mem_usage)
            except ValueError as e:  # e.g. a shape mismatch: say which files did not fit
                raise ValueError(f"{e} (while loading adapter {adapter_name!r} from {model_id!r})") from e
            self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not is_trainable:
            self.eval()
        return result

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict[str, str]] = None,
                        **kwargs) -> "PeftModel":
        """Wrap `model` and load the adapter saved in `model_id`, a local directory or a Hub repo id
        (`kwargs`: ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ...).
        `key_mapping` (PEFT's): regex renames of the checkpoint keys (see `load_adapter`); when None, and
        the adapter is not prompt learning, the model's ``_checkpoint_conversion_mapping`` (transformers)
        is used, as in PEFT."""
        model_id = str(model_id)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **kwargs)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        config.inference_mode = not is_trainable
        if key_mapping is None and not config.is_prompt_learning:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", {})
        task = config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type
        if cls is PeftModel and task in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
        with rollback_on_error(model):  # a failed load leaves the user's model as it was
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=low_cpu_mem_usage)
            peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                    autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping, **kwargs)
        return peft_model

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs) -> None:
        """Write each adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout:
        'default' in `save_directory`, others in sub-folders). Files are written atomically.

        `path_initial_model_for_weight_conversion` (PEFT's): the folder where the adapter was saved right
        after a base-mutating initialisation (PiSSA/CorDA/OLoRA) and before training; the adapter is then
        saved as the equivalent plain LoRA of rank 2r for the unmutated base (``[B | -B0] [A ; A0]``,
        r and lora_alpha doubled, alpha by sqrt(2) with rsLoRA, init_lora_weights=True), and that
        folder's ``adapter_config.json`` is rewritten with init_lora_weights=True, as in PEFT. LoRA only
        (other tuners: PEFT's ValueError)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if selected_adapters is None:
            selected_adapters = list(self.peft_config)
        elif any(a not in self.peft_config for a in selected_adapters):
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names are"
                             f" {list(self.peft_config.keys())} - got {selected_adapters}.")
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
        for adapter_name in selected_adapters:
            config = self.peft_config[adapter_name]
            # every rank builds the state dict (under FSDP, state_dict() is a collective); only the main one writes
            state = get_peft_model_state_dict(self, state_dict=kwargs.get("state_dict"), adapter_name=adapter_name,
                                              save_embedding_layers=save_embedding_layers)
            if not is_main_process:
                continue
            cfg = copy.deepcopy(config)
            if path_initial_model_for_weight_conversion is not None:
                init_cfg = copy.deepcopy(config)
                if str(getattr(init_cfg.peft_type, "value", init_cfg.peft_type)) == "LORA":
                    init_cfg.init_lora_weights = True
                else:
                    init_cfg.init_weights = True
                init_cfg.save_pretrained(path_initial_model_for_weight_conversion)
                state = convert_mutated_init_to_lora(self, init_cfg, path_initial_model_for_weight_conversion,
                                                     state, kwargs)
            out_dir = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
            os.makedirs(out_dir, exist_ok=True)
            if safe_serialization:
                atomic_save_safetensors(state, os.path.join(out_dir, SAFETENSORS_WEIGHTS_NAME))
            else:
                atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(out_dir, WEIGHTS_NAME))
            if cfg.base_model_name_or_path is None:
                cfg.base_model_name_or_path = base_model_name_or_path(self.get_base_model())
            cfg.inference_mode = True
            base = self.get_base_model()
            # PEFT records the class of task-less models so AutoPeftModel can rebuild them
            auto_mapping = None if cfg.task_type is not None else {
                "base_model_class": type(base).__name__, "parent_library": type(base).__module__}
            if path_initial_model_for_weight_conversion is not None:  # the rank-2r plain LoRA (as in PEFT)
                cfg.init_lora_weights = True
                cfg.r *= 2
                # same scaling: alpha / r, or alpha / sqrt(r) with rsLoRA
                cfg.lora_alpha *= 2 if not cfg.use_rslora else 2 ** 0.5
                if cfg.rank_pattern:
                    cfg.rank_pattern = {key: 2 * val for key, val in cfg.rank_pattern.items()}
                if cfg.alpha_pattern:
                    cfg.alpha_pattern = {key: 2 * val for key, val in cfg.alpha_pattern.items()}
            cfg.save_pretrained(out_dir, auto_mapping_dict=auto_mapping)
        if is_main_process:  # last (PEFT writes it first): a failed save leaves no card behind either
            self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write or update ``README.md`` with PEFT's metadata (library_name, tags, base_model)."""
        create_or_update_model_card(self, output_dir)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                    commit_description: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[Union[bool, str]] = None, revision: Optional[str] = None, create_pr: bool = False,
                    max_shard_size: Optional[Union[int, str]] = "50GB", tags: Optional[list[str]] = None, **kwargs):
        """Save the adapters (``save_pretrained`` layout, model card included; extra `kwargs` such as
        ``safe_serialization`` go to it) and upload them to the Hub repo `repo_id` in one commit, with
        the signature of transformers' ``PushToHubMixin.push_to_hub`` (PEFT's base class). Returns the
        ``CommitInfo``. Needs huggingface_hub."""
        return push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                           private=private, token=token, revision=revision, create_pr=create_pr,
                           max_shard_size=max_shard_size, tags=tags, **kwargs)

    # ---- misc PEFT API ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self)

    def get_layer_status(self):
        return [(n, type(m).__name__, m.active_adapters, m.merged_adapters)
                for n, m in self.named_modules() if isinstance(m, BaseTunerLayer)]

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        return self.base_model.unload()


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    _task_modules_to_save = ["classifier", "score"]


class PeftModelForTokenClassification(PeftModel):
    _task_modules_to_save = ["classifier", "score"]


class PeftModelForQuestionAnswering(PeftModel):
    _task_modules_to_save = ["qa_outputs"]


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
