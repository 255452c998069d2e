"""``method=gptq``: GPTQ (Frantar et al., 2022), second-order weight rounding per linear.

Each linear's weight ``W`` is quantized column by column; the rounding error of a column is
spread over the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ``||WX - QX||^2``, ``H = 2 X^T X / n`` (X: the linear's inputs, one row
per token). The upper Cholesky factor of ``H^-1`` gives every update in closed form, and
updates are applied lazily in blocks of ``block_size`` columns.

The pipeline is block-sequential: the calibration batch is embedded once; for each decoder
block the linears are wrapped in ``QuantLinear`` (so the weight grid is exactly that of
their ``WeightQuantizer``), their inputs are captured with forward pre-hooks, GPTQ runs, the
weights are materialized, and the calibration stream goes through the *quantized* block to
become the next block's input. With ``true_sequential`` the linears are taken in stages of
execution order (linears reading the same input tensor, e.g. q/k/v, form one stage) and each
stage's inputs are captured after the earlier stages are quantized.

Step sizes: a group's min-max parameters are fitted when its first column (in processing
order) is reached, from the current, already updated weights of the whole group, and are
written into the ``WeightQuantizer``, so the materialized weight is ``WeightQuantizer(Q)``
with ``Q`` on its grid. Groups are contiguous input columns as in ``WeightQuantizer``, also
under ``act_order``: there a group is fitted when its first column in the permuted order is
reached (the reference instead forms groups of consecutive *permuted* columns, which needs a
column-to-group index at inference). ``static_groups`` fits every group on the original
weights before any update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import BlockContext, ModelAdapter
from cbq.pipeline import Streams
from cbq.quant import (
    Granularity,
    QuantLinear,
    WeightQuantizer,
    fake_quant,
    minmax_params,
    observing_activations,
    stored_weights,
    wrap_block,
)


@dataclass
class GPTQConfig(MethodConfig):
    name: str = "gptq"
    # Dampening added to H's diagonal, as a fraction of its mean diagonal.
    percdamp: float = 0.01
    # Columns per lazy batch update (a speed knob; results are identical up to float error).
    block_size: int = 128
    # Quantize columns by descending H diagonal (largest input energy first).
    act_order: bool = False
    # Fit every group's step size on the original weights before any update.
    static_groups: bool = False
    # Capture each stage's inputs after the earlier linears of the block are quantized.
    true_sequential: bool = True
    # Calibration sequences per block forward.
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not self.percdamp >= 0:
            raise ValueError(f"method.percdamp: {self.percdamp} must be >= 0")
        if self.block_size < 1:
            raise ValueError(f"method.block_size: {self.block_size} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"method.batch_size: {self.batch_size} must be >= 1")


class GPTQError(RuntimeError):
    """GPTQ cannot proceed on a linear (e.g. a Hessian that is not positive definite)."""


# --- Hessian accumulation ------------------------------------------------------------------
class HessianAccumulator:
    """``H = 2 X^T X / n`` over every token that reaches a linear.

    Each mini-batch's ``X^T X`` is computed in float32 (speed); the running sum is kept in
    float64 so that adding hundreds of batches of very different magnitude loses nothing.
    """

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).to(self.sum.device, torch.float32)
        self.sum += (x.T @ x).double()
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise GPTQError("no calibration tokens reached this linear")
        return self.sum * (2.0 / self.tokens)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean over tokens of ``||delta x||^2`` (summed over outputs), from ``H = 2 X^T X / n``."""
    delta = delta.float()
    return 0.5 * float(((delta @ hessian.to(delta)) * delta).sum())


# --- the solver ----------------------------------------------------------------------------
class _Grid:
    """The ``WeightQuantizer``'s layout: which columns share step sizes; fit and apply them."""

    def __init__(self, quantizer: WeightQuantizer, columns: int):
        self.quantizer = quantizer
        self.spec = quantizer.spec
        self.columns = columns
        per_group = self.spec.granularity is Granularity.per_group
        self.size = quantizer.group_size if per_group else columns
        self.groups = math.ceil(columns / self.size)

    def members(self, group: int) -> torch.Tensor:
        end = min((group + 1) * self.size, self.columns)
        return torch.arange(group * self.size, end)

    def fit(self, group: int, values: torch.Tensor) -> None:
        """Min-max step size and zero point of ``group`` from its current ``values``."""
        if self.spec.granularity is Granularity.per_tensor:
            low, high = values.amin().reshape(1), values.amax().reshape(1)
        else:
            low, high = values.amin(dim=1), values.amax(dim=1)
        ratio = self.quantizer.clip_ratio
        scale, zero = minmax_params(low.float() * ratio, high.float() * ratio, self.spec)
        self.quantizer.scale.data[:, group] = scale.to(self.quantizer.scale.dtype)
        self.quantizer.zero.data[:, group] = zero.to(self.quantizer.zero.dtype)

    def quantize(self, column: torch.Tensor, index: int) -> torch.Tensor:
        """Column ``index`` (original order) rounded to nearest on its group's grid."""
        group = index // self.size
        scale = self.quantizer.scale[:, group].to(column.dtype)
        zero = self.quantizer.zero[:, group].to(column.dtype)
        return fake_quant(column, scale, zero, self.spec.qmax)

    def first_positions(self, inverse_order: torch.Tensor) -> dict[int, int]:
        """``{position in processing order: group}`` where each group's first column comes."""
        return {int(inverse_order[self.members(g)].min()): g for g in range(self.groups)}


def _upper_inverse_cholesky(hessian: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` for a float64 ``hessian``, which is
    dampened in place. At most two more (n, n) float64 matrices are alive at once: at a 7B
    model's MLP width (n = 11008) each is 0.97 GB."""
    diagonal = torch.diagonal(hessian)
    diagonal += percdamp * diagonal.mean()
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(factor)
        del factor
        factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
    if int(info) != 0:
        raise GPTQError(
            f"GPTQ: the Hessian of {name} is not positive definite after dampening "
            f"(percdamp={percdamp}); raise method.percdamp (e.g. 0.1) or calibrate on "
            "more tokens"
        )
    return factor


@torch.no_grad()
def gptq_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: WeightQuantizer,
    cfg: GPTQConfig,
    name: str = "linear",
) -> torch.Tensor:
    """GPTQ-quantized ``weight`` (float32, original column order), on ``quantizer``'s grid.

    Writes the step sizes and zero points it uses into ``quantizer`` (``scale``, ``zero``),
    so ``quantizer(result) == result``.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise GPTQError(f"GPTQ: the Hessian of {name} has non-finite entries (inputs overflow?)")
    work = weight.detach().float().clone()
    hessian = hessian.to(work.device, torch.float64).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    grid = _Grid(quantizer, work.shape[1])
    if cfg.static_groups:
        quantizer.reset(work)
    if cfg.act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        work = work[:, order]
        hessian = hessian[order[:, None], order]  # one copy, not two
    else:
        order = torch.arange(work.shape[1], device=work.device)
    upper = _upper_inverse_cholesky(hessian, cfg.percdamp, name).float()
    del hessian
    inverse_order = torch.argsort(order).cpu()
    fits = {} if cfg.static_groups else grid.first_positions(inverse_order)
    quantized = _sweep(work, upper, grid, order.tolist(), fits, inverse_order, cfg.block_size)
    return quantized[:, inverse_order.to(quantized.device)]


def _sweep(
    work: torch.Tensor,
    upper: torch.Tensor,
    grid: _Grid,
    order: list[int],
    fits: dict[int, int],
    inverse_order: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Quantize the (permuted) columns of ``work`` in place order, updating the rest."""
    quantized = torch.zeros_like(work)
    columns = work.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        chunk = work[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        local = upper[start:end, start:end]
        for i in range(end - start):
            position = start + i
            if position in fits:
                group = fits[position]
                positions = inverse_order[grid.members(group)].to(work.device)
                grid.fit(group, _current(work, chunk, errors, upper, start, i, positions))
            column = chunk[:, i]
            q = grid.quantize(column, order[position])
            quantized[:, position] = q
            error = (column - q) / local[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
            errors[:, i] = error
        work[:, end:] -= errors @ upper[start:end, end:]
    return quantized


def _current(
    work: torch.Tensor,
    chunk: torch.Tensor,
    errors: torch.Tensor,
    upper: torch.Tensor,
    start: int,
    done: int,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Current values of the not-yet-quantized columns at ``positions`` (permuted order).

    Columns inside the current block are up to date in ``chunk``; those after it still lack
    the lazy update from the ``done`` columns of this block quantized so far.
    """
    end = start + chunk.shape[1]
    inside = positions < end
    values = torch.empty(work.shape[0], positions.numel(), dtype=work.dtype, device=work.device)
    values[:, inside] = chunk[:, positions[inside] - start]
    after = positions[~inside]
    pending = errors[:, :done] @ upper[start : start + done][:, after]
    values[:, ~inside] = work[:, after] - pending
    return values


# --- capturing inputs inside a block -------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once every input a capture pass needs has been seen."""


@dataclass
class BlockStream:
    """The calibration stream entering block ``index``, run in mini-batches."""

    adapter: ModelAdapter
    index: int
    hidden: torch.Tensor
    ctx: BlockContext
    batch_size: int

    def run(self, limit: int | None = None) -> None:
        """Forward the first ``limit`` (default: all) sequences; outputs are discarded."""
        hidden = self.hidden if limit is None else self.hidden[:limit]
        device = next(self.adapter.blocks()[self.index].parameters()).device
        for chunk in hidden.split(self.batch_size):
            same = chunk.shape[0] == self.ctx.batch_size
            chunk_ctx = self.ctx if same else self.adapter.block_context(chunk)
            with suppress(_StopForward):
                self.adapter.forward_block(self.index, chunk.to(device), chunk_ctx)


def execution_stages(stream: BlockStream, qlinears: dict[str, QuantLinear]) -> list[list[str]]:
    """The linears in execution order, grouped into stages of consecutive linears that read
    the very same input tensor (q/k/v, gate/up), from one probing forward of one sequence."""
    calls: list[tuple[str, torch.Tensor]] = []

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if all(seen != name for seen, _ in calls):
                calls.append((name, args[0]))

        return hook

    handles = [q.register_forward_pre_hook(record(n)) for n, q in qlinears.items()]
    try:
        stream.run(limit=1)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(qlinears) - {name for name, _ in calls})
    if missing:
        raise GPTQError(f"GPTQ: block {stream.index}: no input reached {', '.join(missing)}")
    stages: list[list[str]] = []
    for position, (name, x) in enumerate(calls):
        if position and x is calls[position - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def capture_hessians(
    stream: BlockStream, qlinears: dict[str, QuantLinear], stages: list[list[str]]
) -> dict[str, HessianAccumulator]:
    """One pass over the stream accumulating the Hessian of every linear in ``stages``.

    A linear's input is taken after its activation quantizer (what its weight multiplies).
    Linears of one stage without activation quantization share one accumulator. The pass
    stops right after the last linear of the last stage.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    feeds: list[tuple[QuantLinear, HessianAccumulator]] = []
    for stage in stages:
        shared: HessianAccumulator | None = None
        for name in stage:
            qlinear = qlinears[name]
            if qlinear.act_quantizer.spec.enabled:
                accumulators[name] = HessianAccumulator(qlinear.in_features, qlinear.weight.device)
                feeds.append((qlinear, accumulators[name]))
                continue
            if shared is None:
                shared = HessianAccumulator(qlinear.in_features, qlinear.weight.device)
                feeds.append((qlinear, shared))
            accumulators[name] = shared

    def feed(accumulator: HessianAccumulator) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            assert isinstance(module, QuantLinear)
            accumulator.add(module.act_quantizer(args[0]))

        return hook

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise _StopForward

    handles = [q.register_forward_pre_hook(feed(acc)) for q, acc in feeds]
    # Registered last, so it fires after the accumulating hooks of the same linear.
    handles.append(qlinears[stages[-1][-1]].register_forward_pre_hook(stop))
    try:
        stream.run()
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


# --- one linear, one block, the method -----------------------------------------------------
def quantize_linear(
    qlinear: QuantLinear, hessian: torch.Tensor, cfg: GPTQConfig, name: str
) -> dict[str, float]:
    """Run GPTQ on ``qlinear`` and materialize it; return its output error and RTN's."""
    original = qlinear.linear.weight.detach().float().clone()
    weight_quantizer = qlinear.weight_quantizer
    rtn = WeightQuantizer(weight_quantizer.spec, original, weight_quantizer.clip_ratio)(original)
    quantized = gptq_solve(original, hessian, weight_quantizer, cfg, name)
    qlinear.linear.weight.data.copy_(quantized)
    qlinear.materialize()
    return {
        "error": output_error(quantized - original, hessian),
        "rtn_error": output_error(rtn - original, hessian),
    }


class GPTQ(QuantMethod):
    name = "gptq"
    config_class = GPTQConfig
    needs_calibration = True
    cfg: GPTQConfig

    @torch.no_grad()
    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, "GPTQ needs calibration data"
        started = time.perf_counter()
        batch_size = self.cfg.batch_size
        pipeline = self.block_pipeline(adapter, calib, ctx, batch_size)

        def work(index: int, streams: Streams, block_ctx: BlockContext) -> dict[str, Any]:
            stream = BlockStream(adapter, index, streams.quantized, block_ctx, batch_size)
            block_layers = self.quantize_block(stream)
            if block_layers:
                ratio = mean_error_ratio(block_layers.values())
                ctx.log({"gptq/block": index, "gptq/error_vs_rtn": ratio})
            return {f"{index}.{name}": errors for name, errors in block_layers.items()}

        layers = {
            name: errors for block in pipeline.run(calib, work) for name, errors in block.items()
        }
        return {
            "n_quantized_linears": len(adapter.blocks()) * len(adapter.linear_names()),
            "time_s": round(time.perf_counter() - started, 3),
            # Geometric mean over linears of E||(W - Q) x||^2 relative to RTN's.
            "error_vs_rtn": mean_error_ratio(layers.values()) if layers else None,
            "layers": layers,
        } | pipeline.resume_stats()

    def quantize_block(self, stream: BlockStream) -> dict[str, dict[str, float]]:
        """Wrap, calibrate activations, GPTQ every linear and materialize block ``index``."""
        block = stream.adapter.blocks()[stream.index]
        names = stream.adapter.linear_names()
        weight_spec, act_spec = self.quant.weight_spec(), self.quant.act_spec()
        qlinears = wrap_block(block, names, weight_spec, act_spec)
        if act_spec.enabled and not act_spec.dynamic:
            with observing_activations(block):
                stream.run()
        errors: dict[str, dict[str, float]] = {}
        if weight_spec.enabled:
            stages = execution_stages(stream, qlinears)
            passes = (
                stages if self.cfg.true_sequential else [[n for stage in stages for n in stage]]
            )
            for names_in_pass in passes:
                errors |= self._quantize_pass(stream, qlinears, names_in_pass, stages)
        for qlinear in qlinears.values():
            qlinear.materialize()
        return errors

    def _quantize_pass(
        self,
        stream: BlockStream,
        qlinears: dict[str, QuantLinear],
        names: list[str],
        stages: list[list[str]],
    ) -> dict[str, dict[str, float]]:
        """Capture the inputs of ``names`` in one pass, then GPTQ each of them."""
        wanted = [[n for n in stage if n in names] for stage in stages]
        wanted = [stage for stage in wanted if stage]
        if self.cfg.true_sequential:
            accumulators = capture_hessians(stream, qlinears, wanted)
        else:
            with stored_weights(qlinears.values()):  # still the FP weights here
                accumulators = capture_hessians(stream, qlinears, wanted)
        errors = {}
        for name in names:
            label = f"block {stream.index} {name}"
            try:
                hessian = accumulators.pop(name).hessian()
            except GPTQError as error:
                raise GPTQError(f"GPTQ: {label}: {error}") from error
            errors[name] = quantize_linear(qlinears[name], hessian, self.cfg, label)
        return errors


def mean_error_ratio(errors: Any) -> float:
    """Geometric mean over linears of GPTQ's output error relative to RTN's."""
    ratios = [e["error"] / e["rtn_error"] for e in errors if e["rtn_error"] > 0]
    if not ratios:
        return 1.0
    return math.exp(sum(math.log(max(r, 1e-12)) for r in ratios) / len(ratios))
