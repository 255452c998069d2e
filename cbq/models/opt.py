"""OPT (facebook/opt-*)."""

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


class OPTAdapter(ModelAdapter):
    """OPT decoder blocks: q/k/v/out_proj attention, fc1 -> ReLU -> fc2.

    Scale groups (pre-LN models, ``do_layer_norm_before=True``, i.e. all OPT sizes but 350m):
    ``self_attn_layer_norm -> q,k,v``, ``final_layer_norm -> fc1``, ``v_proj -> out_proj``
    and ``fc1 -> fc2`` (exact for positive scales only: ReLU(x/s) = ReLU(x)/s when s > 0).

    Post-LN models (opt-350m, ``do_layer_norm_before=False``) apply each LayerNorm *after*
    the residual add, so its output is also the next residual: scaling it would change
    the residual stream. They get no norm groups, only ``v_proj -> out_proj`` and
    ``fc1 -> fc2``. opt-350m also projects embeddings (512 -> 1024) with ``project_in``
    before block 0 and ``project_out`` after the last block; :meth:`embed` and
    :meth:`final_norm` include them.
    """

    family = "opt"
    model_types = ("opt",)

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    def blocks(self) -> nn.ModuleList:
        return self.decoder.layers

    def linear_names(self) -> list[str]:
        return [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ]

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        attn = block.self_attn
        groups = []
        if self.config.do_layer_norm_before and self.config.layer_norm_elementwise_affine:
            groups += [
                ScaleGroup(
                    "attn_in",
                    block.self_attn_layer_norm,
                    [attn.q_proj, attn.k_proj, attn.v_proj],
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    producer_name="self_attn_layer_norm",
                ),
                ScaleGroup(
                    "mlp_in", block.final_layer_norm, [block.fc1], ["fc1"], "final_layer_norm"
                ),
            ]
        groups.append(
            ScaleGroup(
                "attn_out", attn.v_proj, [attn.out_proj], ["self_attn.out_proj"], "self_attn.v_proj"
            )
        )
        if self.config.activation_function == "relu":
            groups.append(ScaleGroup("mlp_out", block.fc1, [block.fc2], ["fc2"], "fc1"))
        return groups

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        embeds = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            embeds = decoder.project_in(embeds)
        ones = torch.ones(input_ids.shape, device=input_ids.device, dtype=torch.long)
        # OPTLearnedPositionalEmbedding adds its offset (2) to the position ids itself.
        pos = decoder.embed_positions(ones, 0, position_ids=positions(input_ids))
        return embeds + pos.to(embeds.device)

    def block_context(self, hidden: torch.Tensor) -> BlockContext:
        mask = attention_masks(self.config, hidden[:1], positions(hidden), {FULL_ATTENTION})
        kwargs = {"attention_mask": mask[FULL_ATTENTION]}
        per_block = {i: kwargs for i in range(len(self.blocks()))}
        return make_context(hidden, per_block)

    def final_norm(self) -> nn.Module:
        parts = [
            m for m in (self.decoder.final_layer_norm, self.decoder.project_out) if m is not None
        ]
        return nn.Sequential(*parts)
