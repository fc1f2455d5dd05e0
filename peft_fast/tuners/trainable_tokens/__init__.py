"""Trainable tokens (PEFT's peft.tuners.trainable_tokens): retrain a few rows of an embedding matrix."""
from .layer import TrainableTokensLayer

__all__ = ["TrainableTokensLayer"]
