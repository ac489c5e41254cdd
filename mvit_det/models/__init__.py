"""MViTv2 networks and the table of published checkpoints."""
from .mvitv2 import ARCHS, MViTv2, MViTv2Arch, get_arch
from .registry import MODEL_CARDS, ModelCard, get_card, list_models

__all__ = ["ARCHS", "MODEL_CARDS", "MViTv2", "MViTv2Arch", "ModelCard", "get_arch", "get_card", "list_models"]
