"""Llama family: Llama, Mistral, Qwen2 and SmolLM2 (which is a Llama)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cbq.models.adapter import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    BlockContext,
    ModelAdapter,
    ScaleGroup,
    attention_masks,
    gqa_column_channels,
    make_context,
    positions,
)


class LlamaAdapter(ModelAdapter):
    """Pre-norm RMSNorm blocks with rotary attention (optionally GQA) and a gated MLP
    ``down(act(gate(x)) * up(x))``.

    Scale groups: ``input_layernorm -> q,k,v``, ``post_attention_layernorm -> gate,up``,
    ``v_proj -> o_proj`` (one scale per value channel; under GQA it multiplies the o_proj
    columns of every query head that reads that value head) and ``up_proj -> down_proj``
    (the MLP is linear in ``up``). Qwen2's q/k/v biases fold with their rows.
    """

    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    # The norm in front of the MLP (Gemma3 has a post-attention norm before it).
    mlp_norm_name: ClassVar[str] = "post_attention_layernorm"

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    def blocks(self) -> nn.ModuleList:
        return self.inner.layers

    def linear_names(self) -> list[str]:
        return [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        attn, mlp = block.self_attn, block.mlp
        return [
            ScaleGroup(
                "attn_in",
                block.input_layernorm,
                [attn.q_proj, attn.k_proj, attn.v_proj],
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "input_layernorm",
            ),
            ScaleGroup(
                "mlp_in",
                block.get_submodule(self.mlp_norm_name),
                [mlp.gate_proj, mlp.up_proj],
                ["mlp.gate_proj", "mlp.up_proj"],
                self.mlp_norm_name,
            ),
            ScaleGroup(
                "attn_out",
                attn.v_proj,
                [attn.o_proj],
                ["self_attn.o_proj"],
                "self_attn.v_proj",
                column_channels=value_column_channels(attn, self.config),
            ),
            ScaleGroup("mlp_out", mlp.up_proj, [mlp.down_proj], ["mlp.down_proj"], "mlp.up_proj"),
        ]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids)

    def layer_types(self) -> list[str]:
        """Attention kind per block, following each model's own forward."""
        n = len(self.blocks())
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return list(types[:n])
        if self.config.model_type == "mistral" and self.config.sliding_window is not None:
            return [SLIDING_ATTENTION] * n
        return [FULL_ATTENTION] * n

    def block_context(self, hidden: torch.Tensor) -> BlockContext:
        probe, position_ids = hidden[:1], positions(hidden)
        types = self.layer_types()
        masks = attention_masks(self.config, probe, position_ids, set(types))
        rotary = self.inner.rotary_emb(probe, position_ids=position_ids)
        per_kind = {
            kind: {
                "attention_mask": mask,
                "position_embeddings": rotary,
                "position_ids": position_ids,
            }
            for kind, mask in masks.items()
        }
        per_block = {i: per_kind[kind] for i, kind in enumerate(types)}
        return make_context(hidden, per_block)

    def final_norm(self) -> nn.Module:
        return self.inner.norm


def value_column_channels(attn: nn.Module, config: Any) -> torch.Tensor | None:
    """o_proj column -> v_proj row map for this attention module (GQA aware)."""
    heads = config.num_attention_heads
    kv_heads = heads // attn.num_key_value_groups
    return gqa_column_channels(heads, kv_heads, attn.head_dim)
