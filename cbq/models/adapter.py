"""Architecture adapters: the only place that knows how a model family is laid out.

Everything else in cbq (quantizers, methods, the CBD trainer, evaluation) talks to a
model through a :class:`ModelAdapter`, which exposes the decoder blocks, the linears in
each block, the producer/consumer pairs that an equivalent channel scaling may be folded
into, and a way to run one block in isolation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from cbq.models.residency import ResidentBlocks

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass
class BlockContext:
    """Everything a block needs besides its input hidden states (masks, rotary tables).

    Built once per sequence length by :meth:`ModelAdapter.block_context`; ``per_block``
    holds the keyword arguments for each block index (Gemma3 alternates local and global
    attention, so blocks may differ). The tensors are built for a batch of one and
    broadcast, so a context serves any batch size with the same ``seqlen``. It follows
    the hidden states to another device by itself (:meth:`on`, cached); its floating
    tensors keep the dtype they were built with (see :meth:`to` to cast).
    """

    batch_size: int
    seqlen: int
    per_block: dict[int, dict[str, Any]] = field(default_factory=dict)
    device: torch.device | None = None
    _copies: dict[torch.device, BlockContext] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device | str) -> BlockContext:
        """This context on ``device`` (itself, or a copy made once and kept)."""
        device = torch.device(device)
        if self.device is None or self.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = self.to(device)
        return self._copies[device]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BlockContext:
        """A copy with every tensor moved, floating ones optionally cast (masks stay bool)."""

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                return value.to(device=device, dtype=cast)
            if isinstance(value, tuple):
                return tuple(move(v) for v in value)
            return value

        moved: dict[int, dict[str, Any]] = {}
        done: dict[int, Any] = {}  # blocks share tensors; keep sharing them after the move
        for index, kwargs in self.per_block.items():
            moved[index] = {}
            for key, value in kwargs.items():
                if id(value) not in done:
                    done[id(value)] = move(value)
                moved[index][key] = done[id(value)]
        return BlockContext(self.batch_size, self.seqlen, moved, torch.device(device))


@dataclass
class ScaleGroup:
    """A producer whose output channels feed the inputs of ``consumers``.

    Dividing the producer's output channel j by s_j and multiplying every consumer's
    input columns fed by channel j by s_j leaves the FP function unchanged.
    ``producer`` is a norm (LayerNorm / RMSNorm, folded through its weight and bias) or
    an ``nn.Linear`` (folded through its output rows and bias).

    A scale has one entry per *producer channel* (:attr:`num_channels`). Two index maps
    cover layouts where channels and columns are not one-to-one:

    - ``producer_rows``: the producer's output rows that carry the channels, in channel
      order (BLOOM's fused query_key_value: only the value rows); ``None`` = all rows.
    - ``column_channels``: for each consumer input column, the channel feeding it
      (grouped-query attention: one value channel feeds the o_proj columns of every
      query head sharing it); ``None`` = column j is fed by channel j.

    Statistics gathered on the consumers' inputs are per column; bring them to per
    channel with :meth:`reduce_columns` before turning them into a scale.
    """

    name: str
    producer: nn.Module
    consumers: list[nn.Module]
    # Consumers' names relative to the block, for logging and for looking up activations.
    consumer_names: list[str] = field(default_factory=list)
    producer_name: str = ""
    producer_rows: torch.Tensor | None = None
    column_channels: torch.Tensor | None = None

    @property
    def num_channels(self) -> int:
        if self.producer_rows is not None:
            return int(self.producer_rows.numel())
        inner = _unwrap(self.producer)
        if isinstance(inner, nn.Linear):
            return inner.out_features
        return int(inner.weight.numel())

    @property
    def num_columns(self) -> int:
        return int(consumer_weight(self.consumers[0]).shape[1])

    def expand(self, scale: torch.Tensor) -> torch.Tensor:
        """Per-channel scale -> per consumer input column."""
        if self.column_channels is None:
            return scale
        return scale[self.column_channels.to(scale.device)]

    def reduce_columns(self, per_column: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
        """Per consumer-input-column statistic (last dim) -> per channel (``amax``/``mean``...)."""
        if self.column_channels is None:
            return per_column
        index = self.column_channels.to(per_column.device).expand_as(per_column)
        shape = (*per_column.shape[:-1], self.num_channels)
        out = per_column.new_zeros(shape)
        return out.scatter_reduce(-1, index, per_column, reduce=reduce, include_self=False)


class ModelAdapter(ABC):
    """Base class; one subclass per architecture family (see ``cbq.models.registry``)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # The attention implementation the loader and tiny models use for this family.
    attn_implementation: ClassVar[str] = "sdpa"

    def __init__(self, model: nn.Module):
        self.model = model
        # Where the blocks' weights live: all in memory, or read and written block by block
        # (``model.lazy``, cbq.models.residency).
        self.residency: ResidentBlocks = ResidentBlocks()

    @property
    def config(self) -> Any:
        return self.model.config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self.blocks())} blocks)"

    # --- structure -------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""

    @abstractmethod
    def linear_names(self) -> list[str]:
        """Names (relative to a block) of the linears to quantize, in execution order."""

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's quantizable linears (plain or already wrapped), by relative name."""
        return {name: block.get_submodule(name) for name in self.linear_names()}

    @abstractmethod
    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        """Producer/consumer pairs that an exact channel scaling can be folded into."""

    def fold_scale(self, group: ScaleGroup, scale: torch.Tensor) -> None:
        """Apply ``x_j -> x_j / s_j`` in the producer and ``W[:, cols(j)] *= s_j`` in consumers.

        ``scale`` has ``group.num_channels`` strictly positive entries (positive because
        ReLU, between OPT's fc1 and fc2, commutes only with positive scales).
        """
        scale = check_scale(group, scale)
        with torch.no_grad():
            self.fold_into_producer(group, scale)
            columns = group.expand(scale)
            for consumer in group.consumers:
                weight = consumer_weight(consumer)
                weight.mul_(columns.to(weight.device, weight.dtype).view(1, -1))

    def fold_into_producer(self, group: ScaleGroup, scale: torch.Tensor) -> None:
        """Divide the producer's output channels by ``scale`` (norms and linears)."""
        fold_into_producer(group.producer, scale, group.producer_rows)

    # --- running ---------------------------------------------------------------------
    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 (embeddings, positional terms, scaling)."""

    @abstractmethod
    def block_context(self, hidden: torch.Tensor) -> BlockContext:
        """Masks and position embeddings for full sequences shaped like ``hidden`` (b, t, h).

        Sequences start at position 0 and carry no padding.
        """

    def forward_block(self, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Run block ``index`` alone on ``hidden``; returns the block's output hidden states."""
        out = self.blocks()[index](hidden, **ctx.on(hidden.device).per_block[index])
        return out[0] if isinstance(out, tuple) else out

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block, before the LM head."""

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from the last block's output (final norm + head + any soft-capping)."""
        logits = self.lm_head()(self.final_norm()(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full model forward, block by block (used to check the adapter against HF)."""
        hidden = self.embed(input_ids)
        ctx = self.block_context(hidden)
        for index in range(len(self.blocks())):
            hidden = self.forward_block(index, hidden, ctx)
        return self.logits(hidden)


# --- helpers shared by the adapters ----------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    """The module itself, or the linear wrapped inside a QuantLinear (``.linear``)."""
    return getattr(module, "linear", module)


def consumer_weight(module: nn.Module) -> nn.Parameter:
    """The weight of a linear, or of the linear wrapped inside a QuantLinear."""
    return _unwrap(module).weight


def check_scale(group: ScaleGroup, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.detach().flatten()
    if scale.numel() != group.num_channels:
        raise ValueError(
            f"scale group {group.name!r} takes {group.num_channels} channels, got {scale.numel()}"
        )
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"scale for group {group.name!r} must be finite and strictly positive")
    return scale


def fold_into_producer(
    producer: nn.Module, scale: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Divide the producer's output channels (optionally only ``rows``) by ``scale``."""
    inner = _unwrap(producer)
    params = [inner.weight, getattr(inner, "bias", None)]
    with torch.no_grad():
        for param in params:
            if param is None:
                continue
            divisor = scale.to(param.device, param.dtype)
            if param.dim() == 2:
                divisor = divisor.view(-1, 1)
            if rows is None:
                param.div_(divisor)
            else:
                index = rows.to(param.device)
                param[index] = param[index] / divisor


def gqa_column_channels(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """For o_proj input column ``h*head_dim + d``: the v_proj row feeding it.

    Query head h reads key/value head ``h // (num_heads // num_kv_heads)`` (``repeat_kv``);
    ``None`` when every query head has its own value head.
    """
    if num_heads == num_kv_heads:
        return None
    group = num_heads // num_kv_heads
    heads = torch.arange(num_heads).repeat_interleave(head_dim) // group
    dims = torch.arange(head_dim).repeat(num_heads)
    return heads * head_dim + dims


def attention_masks(
    config: Any, probe: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]
) -> dict[str, Any]:
    """The HF masks for a batch-of-one ``probe`` (1, t, h): ``{layer_type: mask or None}``.

    ``None`` means "plain causal" (sdpa then uses its ``is_causal`` path), as in HF.
    """
    makers = {
        FULL_ATTENTION: create_causal_mask,
        SLIDING_ATTENTION: create_sliding_window_causal_mask,
    }
    return {
        kind: makers[kind](
            config=config,
            inputs_embeds=probe,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        for kind in kinds
    }


def make_context(hidden: torch.Tensor, per_block: dict[int, dict[str, Any]]) -> BlockContext:
    return BlockContext(hidden.shape[0], hidden.shape[1], per_block, hidden.device)


def positions(hidden: torch.Tensor) -> torch.Tensor:
    """Position ids (1, t) for full sequences starting at 0."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
