"""``QuantLinear``: an ``nn.Linear`` with a weight quantizer and an input quantizer.

The wrapped linear keeps its FP weight; the fake-quantized weight is computed on the fly
(so step sizes and rounding variables can be learned) until :meth:`QuantLinear.materialize`
writes it into the linear once and for all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cbq.quant.quantizer import ActQuantizer, QuantSpec, WeightQuantizer


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec):
        super().__init__()
        self.linear = linear
        self.weight_quantizer = WeightQuantizer(weight_spec, linear.weight)
        self.act_quantizer = ActQuantizer(act_spec)
        # Optional learned rounding (cbq.quant.rounding), mapping W/s to offsets in {0, 1}.
        self.rounding: nn.Module | None = None
        self.weight_materialized = False
        # Memory over speed in training: the backward pass recomputes the fake-quantized weight
        # and the quantizer's masks instead of keeping them (14 bytes per weight), at about 30%
        # of a block's training step (docs/benchmarks.md). CBQ sets it for model.lazy runs.
        self.lean_backward = False

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_materialized:
            return self.linear.weight
        return self.weight_quantizer(self.linear.weight, self.rounding, self.lean_backward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_quantizer(x)
        if self.act_quantizer.observing:
            return self.linear(x)
        weight = self.quantized_weight()
        if not self._recomputes(weight):
            return nn.functional.linear(x, weight, self.linear.bias)
        with recomputed_in_backward(weight, self._quantize_again):
            return nn.functional.linear(x, weight, self.linear.bias)

    def _recomputes(self, weight: torch.Tensor) -> bool:
        """Whether the backward pass recomputes the fake-quantized weight: with
        ``lean_backward``, only one this wrapper computed (not a stored weight, see
        :func:`stored_weights`), with a gradient, and outside autocast (where the linear keeps a
        cast copy, not the weight)."""
        return (
            self.lean_backward
            and not self.weight_materialized
            and weight.requires_grad
            and not torch.is_autocast_enabled(weight.device.type)
        )

    @torch.no_grad()
    def _quantize_again(self) -> torch.Tensor:
        return self.quantized_weight()

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the fake-quantized weight into the linear; later forwards skip weight quant."""
        if self.weight_materialized:
            return
        self.linear.weight.data.copy_(self.quantized_weight())
        self.weight_quantizer.freeze()
        self.rounding = None
        self.weight_materialized = True

    def get_extra_state(self) -> dict[str, bool]:
        return {"weight_materialized": self.weight_materialized}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.weight_materialized = state["weight_materialized"]

    def extra_repr(self) -> str:
        w, a = self.weight_quantizer.spec, self.act_quantizer.spec
        return (
            f"w{w.bits} {w.granularity.value}{'' if w.group_size is None else w.group_size}, "
            f"a{a.bits} {a.granularity.value}{' dynamic' if a.dynamic else ''}"
        )


@contextmanager
def recomputed_in_backward(
    tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Inside the ``with`` statement, autograd keeps no copy of ``tensor`` (nor of a view of
    it) for the backward pass: it calls ``recompute()``, which must return the same values, when
    it needs them. A linear layer keeps its (fake-quantized) weight for the input's gradient: 4
    bytes per weight of a whole CBQ window until the window's backward pass, where recomputing
    it costs one elementwise pass (issue #13)."""

    storage = tensor.untyped_storage().data_ptr()

    def pack(saved: torch.Tensor) -> torch.Tensor | tuple[torch.Size, tuple[int, ...], int]:
        if saved.untyped_storage().data_ptr() == storage:
            return saved.size(), saved.stride(), saved.storage_offset()
        return saved

    def unpack(packed: torch.Tensor | tuple[torch.Size, tuple[int, ...], int]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        return recompute().as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextmanager
def stored_weights(qlinears: Iterable[QuantLinear]) -> Iterator[None]:
    """Forwards multiply by each ``linear.weight`` as it is instead of quantizing it.

    Before :meth:`QuantLinear.materialize` that weight is the FP one (a capture pass over
    the unquantized block), or whatever a method writes there while it trains.
    """
    qlinears = list(qlinears)
    if any(q.weight_materialized for q in qlinears):
        raise RuntimeError("stored_weights() needs QuantLinears that are not materialized yet")
    for qlinear in qlinears:
        qlinear.weight_materialized = True
    try:
        yield
    finally:
        for qlinear in qlinears:
            qlinear.weight_materialized = False


def quant_linears(module: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, child in module.named_modules():
        if isinstance(child, QuantLinear):
            yield name, child


def wrap_block(
    block: nn.Module, names: list[str], weight_spec: QuantSpec, act_spec: QuantSpec
) -> dict[str, QuantLinear]:
    """Replace the named linears of ``block`` by ``QuantLinear`` wrappers (idempotent)."""
    wrapped = {}
    for name in names:
        current = block.get_submodule(name)
        if isinstance(current, QuantLinear):
            wrapped[name] = current
            continue
        if not isinstance(current, nn.Linear):
            raise TypeError(f"{name} is a {type(current).__name__}, not nn.Linear")
        wrapped[name] = QuantLinear(current, weight_spec, act_spec)
        _set_submodule(block, name, wrapped[name])
    return wrapped


def unwrap_block(block: nn.Module) -> None:
    """Put the plain linears back (with whatever weights they hold now)."""
    for name, qlinear in list(quant_linears(block)):
        _set_submodule(block, name, qlinear.linear)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, module)


@contextmanager
def observing_activations(module: nn.Module) -> Iterator[list[ActQuantizer]]:
    """Within the block, static activation quantizers record ranges and pass inputs through."""
    quantizers = [
        q.act_quantizer for _, q in quant_linears(module) if q.act_quantizer.needs_calibration
    ]
    for quantizer in quantizers:
        quantizer.observing = True
    try:
        yield quantizers
    except BaseException:
        for quantizer in quantizers:
            quantizer.observing = False
        raise
    for quantizer in quantizers:
        quantizer.finish_observation()
