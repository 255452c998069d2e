"""BLOOM (bigscience/bloom-*): fused query_key_value, ALiBi, GELU MLP."""

from __future__ import annotations

import torch
from torch import nn

from cbq.models.adapter import (
    FULL_ATTENTION,
    BlockContext,
    ModelAdapter,
    ScaleGroup,
    attention_masks,
    make_context,
    positions,
)


class BloomAdapter(ModelAdapter):
    """BLOOM blocks: ``self_attention.query_key_value`` (fused, per-head interleaved
    ``[q_h, k_h, v_h]`` rows), ``self_attention.dense``, ``mlp.dense_h_to_4h`` -> GELU ->
    ``mlp.dense_4h_to_h``.

    Scale groups: ``input_layernorm -> query_key_value``, ``post_attention_layernorm ->
    dense_h_to_4h`` (both only when the residual is taken before the norm, the BLOOM
    default), and the value rows of ``query_key_value -> dense``. GELU is not
    homogeneous, so there is no ``dense_h_to_4h -> dense_4h_to_h`` group.

    BLOOM's attention is hand-written (scores + ALiBi + additive mask), so it always runs
    with the eager mask.
    """

    family = "bloom"
    model_types = ("bloom",)
    attn_implementation = "eager"

    @property
    def transformer(self) -> nn.Module:
        return self.model.transformer

    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def linear_names(self) -> list[str]:
        return [
            "self_attention.query_key_value",
            "self_attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ]

    def value_rows(self) -> torch.Tensor:
        """Rows of query_key_value holding v, in the order of dense's input columns."""
        heads, head_dim = self.config.n_head, self.config.hidden_size // self.config.n_head
        head = torch.arange(heads).repeat_interleave(head_dim)
        dim = torch.arange(head_dim).repeat(heads)
        return head * 3 * head_dim + 2 * head_dim + dim

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        attn, mlp = block.self_attention, block.mlp
        groups = []
        if not self.config.apply_residual_connection_post_layernorm:
            groups += [
                ScaleGroup(
                    "attn_in",
                    block.input_layernorm,
                    [attn.query_key_value],
                    ["self_attention.query_key_value"],
                    "input_layernorm",
                ),
                ScaleGroup(
                    "mlp_in",
                    block.post_attention_layernorm,
                    [mlp.dense_h_to_4h],
                    ["mlp.dense_h_to_4h"],
                    "post_attention_layernorm",
                ),
            ]
        groups.append(
            ScaleGroup(
                "attn_out",
                attn.query_key_value,
                [attn.dense],
                ["self_attention.dense"],
                "self_attention.query_key_value",
                producer_rows=self.value_rows(),
            )
        )
        return groups

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings_layernorm(
            self.transformer.word_embeddings(input_ids)
        )

    def block_context(self, hidden: torch.Tensor) -> BlockContext:
        probe = hidden[:1]
        mask = attention_masks(self.config, probe, positions(hidden), {FULL_ATTENTION})
        ones = torch.ones(probe.shape[:2], device=hidden.device)
        alibi = self.transformer.build_alibi_tensor(ones, self.config.n_head, hidden.dtype)
        kwargs = {"attention_mask": mask[FULL_ATTENTION], "alibi": alibi}
        per_block = {i: kwargs for i in range(len(self.blocks()))}
        return make_context(hidden, per_block)

    def forward_block(self, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        kwargs = dict(ctx.on(hidden.device).per_block[index])
        # ALiBi is laid out (batch * heads, 1, t) for baddbmm: it must be tiled per batch.
        kwargs["alibi"] = kwargs["alibi"].repeat(hidden.shape[0], 1, 1)
        out = self.blocks()[index](hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f
