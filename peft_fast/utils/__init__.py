"""Helpers shared by the layers above (file I/O, key formats, enums, constants)."""

from .other import _get_submodules, infer_device, prepare_model_for_kbit_training

__all__ = ["_get_submodules", "infer_device", "prepare_model_for_kbit_training"]
