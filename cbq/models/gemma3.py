"""Gemma 3 text decoder (``gemma3_text``, and the text part of the multimodal ``gemma3``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from cbq.models.adapter import (
    BlockContext,
    ScaleGroup,
    attention_masks,
    fold_into_producer,
    make_context,
    positions,
)
from cbq.models.llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    """Gemma3 blocks: Llama-like linears, with four RMSNorms per block and per-head
    q/k norms inside attention.

    - ``input_layernorm`` feeds q/k/v and ``pre_feedforward_layernorm`` feeds gate/up:
      those are the norm producers. ``post_attention_layernorm`` and
      ``post_feedforward_layernorm`` normalise the *outputs* of o_proj / down_proj before
      the residual add, so they feed no linear and are no producers.
    - Gemma3's RMSNorm computes ``x_hat * (1 + w)``: folding a scale sets
      ``w' = (1 + w) / s - 1``.
    - Layers alternate local (sliding-window) and global attention, each with its own
      mask and rotary table (``config.layer_types``).
    - Embeddings are scaled by sqrt(hidden) inside ``embed_tokens``.
    """

    family = "gemma3"
    model_types = ("gemma3_text", "gemma3")
    mlp_norm_name = "pre_feedforward_layernorm"

    @property
    def config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def inner(self) -> nn.Module:
        inner = self.model.model
        # Gemma3ForConditionalGeneration: the text decoder sits under model.language_model.
        return getattr(inner, "language_model", inner)

    def layer_types(self) -> list[str]:
        return list(self.config.layer_types[: len(self.blocks())])

    def fold_into_producer(self, group: ScaleGroup, scale: torch.Tensor) -> None:
        norm = group.producer
        if not isinstance(norm, Gemma3RMSNorm):
            fold_into_producer(norm, scale, group.producer_rows)
            return
        with torch.no_grad():
            gain = (1.0 + norm.weight.float()) / scale.to(norm.weight.device, torch.float32)
            norm.weight.copy_((gain - 1.0).to(norm.weight.dtype))

    def block_context(self, hidden: torch.Tensor) -> BlockContext:
        if self.config.use_bidirectional_attention:
            raise NotImplementedError("Gemma3 with use_bidirectional_attention=True (an encoder)")
        probe, position_ids = hidden[:1], positions(hidden)
        types = self.layer_types()
        masks = attention_masks(self.config, probe, position_ids, set(types))
        per_kind = {
            kind: {
                "attention_mask": mask,
                "position_embeddings": self.inner.rotary_emb(probe, position_ids, kind),
                "position_ids": position_ids,
            }
            for kind, mask in masks.items()
        }
        per_block = {i: per_kind[kind] for i, kind in enumerate(types)}
        return make_context(hidden, per_block)
