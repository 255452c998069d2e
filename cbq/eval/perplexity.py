"""Perplexity with the GPTQ protocol: mean next-token NLL over fixed windows, exponentiated.

Each window is scored on its own (no context carried across windows); the NLL of every
predicted token (``seqlen - 1`` per window) counts equally. Logits are produced in chunks
of tokens so that a 262k-token vocabulary (Gemma3) never needs a full (t, vocab) tensor.

A lazily loaded model (``model.lazy``) is scored layer by layer, as GPTQ's reference does:
every window through block i, then every window through block i + 1, so that one block is in
memory at a time; the hidden states of all windows are kept instead.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from cbq.models.adapter import ModelAdapter

LOGIT_CHUNK_TOKENS = 512


@torch.no_grad()
def window_nll(adapter: ModelAdapter, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens for a batch of windows (b, t)."""
    hidden = adapter.embed(window)
    ctx = adapter.block_context(hidden)
    for index in range(len(adapter.blocks())):
        hidden = adapter.forward_block(index, hidden, ctx)
    return output_nll(adapter, hidden, window)


@torch.no_grad()
def output_nll(
    adapter: ModelAdapter, hidden: torch.Tensor, window: torch.Tensor
) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens, from the last block's output ``hidden``."""
    hidden, targets = hidden[:, :-1], window[:, 1:]
    total = 0.0
    for start in range(0, hidden.shape[1], LOGIT_CHUNK_TOKENS):
        logits = adapter.logits(hidden[:, start : start + LOGIT_CHUNK_TOKENS]).float()
        chunk_targets = targets[:, start : start + LOGIT_CHUNK_TOKENS]
        total += functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk_targets.reshape(-1), reduction="sum"
        ).item()
    return total, targets.numel()


def perplexity(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    desc: str = "ppl",
    bf16: bool = False,
) -> float:
    """exp(mean NLL) of the model over ``windows`` shaped (n, seqlen); with ``bf16`` the
    forward runs under bf16 autocast (the NLL itself is always taken in float32)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(
            f"expected a non-empty (n_windows, seqlen) tensor, got {tuple(windows.shape)}"
        )
    total_nll, total_tokens = 0.0, 0
    batches = [batch.to(device) for batch in windows.split(batch_size)]
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        if adapter.residency.lazy:
            scores = layerwise_nll(adapter, batches, desc)
        else:
            scores = (window_nll(adapter, batch) for batch in tqdm(batches, desc=desc, leave=False))
        for nll, count in scores:
            total_nll += nll
            total_tokens += count
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def layerwise_nll(
    adapter: ModelAdapter, batches: list[torch.Tensor], desc: str
) -> list[tuple[float, int]]:
    """:func:`window_nll` of every batch, computed block by block over all batches: each
    block is acquired once, run on every batch and evicted."""
    hidden = [adapter.embed(batch) for batch in batches]
    contexts = {h.shape[0]: adapter.block_context(h) for h in hidden}
    for index in tqdm(range(len(adapter.blocks())), desc=desc, unit="block", leave=False):
        adapter.residency.acquire(index)
        hidden = [adapter.forward_block(index, h, contexts[h.shape[0]]) for h in hidden]
        adapter.residency.evict(index)
    return [output_nll(adapter, h, batch) for h, batch in zip(hidden, batches, strict=True)]
