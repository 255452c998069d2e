"""Helpers shared by methods that walk the model block by block on cached activations.

Only the block being processed needs to be on the device; the cached hidden states of
the calibration batch stay where the caller keeps them.
"""

from __future__ import annotations

import torch

from cbq.models.adapter import BlockContext, ModelAdapter


@torch.no_grad()
def embed_batches(
    adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Hidden states entering block 0 for every calibration sample, shaped (n, t, h)."""
    outputs = [adapter.embed(chunk.to(device)) for chunk in input_ids.split(batch_size)]
    return torch.cat(outputs)


def context_for(adapter: ModelAdapter, hidden: torch.Tensor, batch_size: int) -> BlockContext:
    """A block context for mini-batches of ``batch_size`` sequences shaped like ``hidden``."""
    return adapter.block_context(hidden[:batch_size])


@torch.no_grad()
def run_block(
    adapter: ModelAdapter,
    index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    batch_size: int,
) -> torch.Tensor:
    """Block ``index`` applied to every sample of ``hidden``, in mini-batches. Without
    autograd: the model's parameters require grad, and a stream that kept the graph of every
    block it went through would hold all their activations (18 GB for static-activation RTN
    on SmolLM2 with 8 x 512 tokens before this)."""
    device = next(adapter.blocks()[index].parameters()).device
    outputs = []
    for chunk in hidden.split(batch_size):
        chunk_ctx = ctx if chunk.shape[0] == ctx.batch_size else adapter.block_context(chunk)
        outputs.append(adapter.forward_block(index, chunk.to(device), chunk_ctx).to(hidden.device))
    return torch.cat(outputs)
