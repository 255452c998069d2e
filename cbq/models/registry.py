"""Pick the :class:`ModelAdapter` for a model by its ``config.model_type``."""

from __future__ import annotations

from torch import nn

from cbq.models.adapter import ModelAdapter
from cbq.models.bloom import BloomAdapter
from cbq.models.gemma3 import Gemma3Adapter
from cbq.models.llama import LlamaAdapter
from cbq.models.opt import OPTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (OPTAdapter, BloomAdapter, LlamaAdapter, Gemma3Adapter)
_BY_MODEL_TYPE: dict[str, type[ModelAdapter]] = {
    model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"no cbq model adapter for model_type {model_type!r}; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for a Hugging Face causal LM, chosen by ``model.config.model_type``."""
    _decompress(model)
    return adapter_class(model.config.model_type)(model)


def _decompress(model: nn.Module) -> None:
    """Decompress a compressed-tensors checkpoint loaded by ``from_pretrained``: its linears
    hold the packed (or int8) weights until a hook on the model's own forward decompresses
    them, and an adapter runs the blocks without that forward."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None and hasattr(model, "ct_decompress_hook"):
        compressor.decompress_model(model)


def attn_implementation_for(model_type: str) -> str:
    """The attention implementation cbq runs a family with (``sdpa``, or ``eager`` for BLOOM)."""
    return adapter_class(model_type).attn_implementation
