"""Helpers shared by the layers above (file I/O, key formats, enums, constants)."""

from .other import prepare_model_for_kbit_training

__all__ = ["prepare_model_for_kbit_training"]
