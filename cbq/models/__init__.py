"""Models: loading (hub, local, packaged GGUF), per-family adapters, tiny test models."""

from cbq.models.adapter import BlockContext, ModelAdapter, ScaleGroup
from cbq.models.loader import PACKAGED_MODELS, load_model
from cbq.models.registry import adapter_for, attn_implementation_for, supported_model_types
from cbq.models.tiny import tiny_model, tiny_tokenizer

__all__ = [
    "PACKAGED_MODELS",
    "BlockContext",
    "ModelAdapter",
    "ScaleGroup",
    "adapter_for",
    "attn_implementation_for",
    "load_model",
    "supported_model_types",
    "tiny_model",
    "tiny_tokenizer",
]
