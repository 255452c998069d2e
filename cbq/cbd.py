"""The cross-block dependency (CBD) trainer: sliding windows of K blocks, reconstructed jointly.

Two cached streams feed each window: ``x_q``, the output of the already-committed quantized
blocks, and ``x_fp``, the FP model's hidden states at the same depth. For a window of blocks
``[start, end)``:

1. blocks entering the window are prepared (CFP, FP copy kept as the target, QuantLinear
   wrapping, static activation ranges, rounding variables);
2. targets: normal ``Y = F_fp(x_fp)`` and homologous ``Y_h = F_fp(x_q)``, both through the FP
   copies (weight truncation changes only the blocks being quantized);
3. step sizes (or clipping ranges) and rounding variables of the window's blocks are learned
   so that ``F_q(x_q)`` matches the targets: a set number of optimizer steps (``iters``, or
   ``epochs`` over the calibration set), a learning-rate schedule, and the best iterate kept;
4. the blocks that leave the window (``[start, start + stride)``) are committed: rounding
   hardened, weights materialized, parameters frozen; both streams advance through the
   committed blocks only (the FP stream on the FP outputs already computed as targets).

Every window records what it did (``stats["windows"]``): optimizer steps, the window loss
before training (RTN at the initial ranges), at the end and after hardening, the L2 and KL
terms of the loss before training and after hardening (their balance), the fraction of
weights whose learned rounding differs from round-to-nearest, the weights CFP truncated.

The trainer is the work of one window on the shared pipeline (:mod:`cbq.pipeline`), which
runs the schedule of windows, keeps the streams (``method.cache``), advances the quantized
one, and checkpoints after every window: each committed block once, the streams, and the
trainer's :meth:`CBDTrainer.state` (the blocks trained but not yet committed, their FP
copies). A run restarted in the same directory resumes after the last finished window and
ends with the same model as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cbq import cfp
from cbq.blockwise import run_block
from cbq.cfp import ActRule, CFPConfig, CFPMode, WeightScope
from cbq.losses import LossConfig, check_finite, reconstruction_terms
from cbq.models.adapter import BlockContext, ModelAdapter
from cbq.models.residency import park, unpark
from cbq.optim import LRSchedule, OptimizerKind, build_optimizer, build_scheduler
from cbq.pipeline import (
    QUANTIZED,
    BlockPipeline,
    CacheKind,
    Checkpoint,
    Streams,
    Window,
    cpu_state,
    settings_fingerprint,
    window_schedule,
)
from cbq.quant import QuantLinear, observing_activations, quant_linears, wrap_block
from cbq.quant.quantizer import Granularity, QuantConfig, RangeLearning
from cbq.quant.rounding import AdaRound, LearnedRounding, LoRARounding, RoundingConfig, RoundingKind

log = logging.getLogger(__name__)
MIN_STEP = 1e-8


def refuse_unwanted_resume(run_dir: Path, resume: bool) -> None:
    """``method.resume=false`` with a checkpoint in the run dir: stop rather than resume."""
    checkpoint = run_dir / "checkpoint"
    if not resume and checkpoint.exists():
        raise RuntimeError(f"{checkpoint} exists and method.resume=false; delete it first")


@dataclass
class WindowConfig:
    """CBQ's sliding window: K blocks trained together; consecutive windows share ``overlap``."""

    size: int = 2
    overlap: int = 1

    def problems(self) -> list[str]:
        problems = []
        if self.size < 1:
            problems.append(f"window.size: {self.size} must be a positive integer")
        if not 0 <= self.overlap < max(self.size, 1):
            problems.append(
                f"window.overlap: {self.overlap} is not allowed; "
                f"allowed: 0..{self.size - 1} (less than window.size)"
            )
        return problems


class BestRule(StrEnum):
    relative = "relative"
    batch = "batch"


@dataclass
class TrainerKnobs:
    """The trainer's own knobs; ``method=cbq`` exposes them as fields of its CBQConfig."""

    epochs: int = 3
    # Optimizer steps per window; null means epochs x ceil(n_samples / batch_size).
    iters: int | None = None
    # Calibration sequences per optimisation step.
    batch_size: int = 1
    # Calibration sequences per no-grad pass (streams, targets, scoring, CFP statistics):
    # speed and memory only.
    forward_batch: int = 8
    # How weight ranges are learned, per row and group (cbq.quant.quantizer.RangeLearning):
    # step (LSQ on log s), clip (min/max clipping factors) or none.
    weight_range: RangeLearning = RangeLearning.step
    # Learning rates. lr_weight_scale is relative to each row's or group's own step (or a
    # clipping factor's unit); lr_act_scale relative to the activation step (_relative_group).
    lr_weight_scale: float = 1e-2
    lr_act_scale: float = 1e-2
    lr_rounding: float = 5e-3
    # signsgd moves every variable by exactly lr a step (AutoRound's); adam by about lr.
    optimizer: OptimizerKind = OptimizerKind.signsgd
    lr_schedule: LRSchedule = LRSchedule.linear
    # Keep the window's best iterate. best_rule=relative: the step whose batch loss is lowest
    # relative to the same samples' initial loss, kept when it also beats the last step on
    # the whole calibration set; best_rule=batch (AutoRound's): the step with the lowest raw
    # batch loss, kept as it is.
    keep_best: bool = True
    best_rule: BestRule = BestRule.relative
    bf16: bool = False
    # Where cached activations live: cpu, device or disk (memory-mapped).
    cache: CacheKind = CacheKind.cpu

    def __post_init__(self) -> None:
        problems = [
            f"method.{name}: {getattr(self, name)} must be >= {low}"
            for name, low in (("epochs", 0), ("batch_size", 1), ("forward_batch", 1))
            if getattr(self, name) < low
        ]
        if self.iters is not None and self.iters < 0:
            problems.append(f"method.iters: {self.iters} must be >= 0, or null")
        problems += [
            f"method.{name}: {getattr(self, name)} must be >= 0"
            for name in ("lr_weight_scale", "lr_act_scale", "lr_rounding")
            if not getattr(self, name) >= 0
        ]
        if problems:
            raise ValueError("\n".join(problems))

    @classmethod
    def of(cls, config: TrainerKnobs) -> TrainerKnobs:
        """Only the trainer knobs of ``config`` (a CBQConfig adds ``name`` and ``resume``)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class TrainerSettings:
    """Everything the trainer reads: CBQ's component configs, its knobs and the run seed."""

    window: WindowConfig = field(default_factory=WindowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cfp: CFPConfig = field(default_factory=CFPConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    knobs: TrainerKnobs = field(default_factory=TrainerKnobs)
    seed: int = 0

    def fingerprint(self, quant: QuantConfig, calib: torch.Tensor) -> str:
        """Identifies a run's checkpoint: changes with any setting, ``quant`` or ``calib``."""
        return settings_fingerprint({"settings": asdict(self), "quant": str(asdict(quant))}, calib)


class CBDTrainer:
    """CBQ's work for one window on the shared pipeline (:mod:`cbq.pipeline`), which owns the
    streams, the schedule, the blocks' residency and the checkpoints."""

    def __init__(
        self,
        adapter: ModelAdapter,
        quant: QuantConfig,
        settings: TrainerSettings,
        device: torch.device,
        run_dir: Path,
        log_metrics: Callable[[dict[str, float]], None] = lambda metrics: None,
        stop_after_window: int | None = None,
        name: str = "cbq",
    ):
        self.adapter, self.quant, self.s = adapter, quant, settings
        self.device, self.log_metrics = device, log_metrics
        self.checkpoint_folder = run_dir / "checkpoint" / name
        self.name = name
        self.fp_blocks: dict[int, nn.Module] = {}
        # Lazy models: FP copies written to disk while their window trains (see _park_fp_copies).
        self.parked: set[int] = set()
        self.prepared: set[int] = set()
        self.committed: set[int] = set()
        self.stats: dict[str, Any] = {"cfp": {}}
        self.ctx: BlockContext | None = None
        # Test hook: simulate a crash after this window's checkpoint.
        self.stop_after_window = stop_after_window

    # --- the outer loop ----------------------------------------------------------------
    def run(self, calib: torch.Tensor) -> dict[str, Any]:
        window = self.s.window
        checkpoint = Checkpoint(
            self.checkpoint_folder, self.s.fingerprint(self.quant, calib), self._restore
        )
        schedule = window_schedule(len(self.adapter.blocks()), window.size, window.overlap)
        self.n_windows = len(schedule)
        pipeline = BlockPipeline(
            self.adapter,
            self.device,
            self.s.knobs.forward_batch,
            self.name,
            checkpoint,
            fp_stream=True,
            schedule=schedule,
            cache=self.s.knobs.cache,
        )
        if self.stop_after_window is not None:
            pipeline.stop_after_window = self.stop_after_window
        self.store = pipeline.store
        windows = pipeline.run_windows(calib, self)
        return {"windows": windows} | self.stats | pipeline.resume_stats()

    def _restore(self, index: int) -> None:
        """A committed block's modules, as :meth:`_commit` leaves them, to load its state."""
        self._wrap(index)
        self.adapter.blocks()[index].requires_grad_(False)

    def state(self) -> dict[str, Any]:
        """The blocks prepared and not yet committed (trained in a window that overlaps the
        next), their FP copies and the statistics so far."""
        blocks = self.adapter.blocks()
        pending = sorted(self.prepared - self.committed)
        for index in pending:
            self._unpark(index)  # the next window needs them first
        return {
            "prepared": sorted(self.prepared),
            "committed": sorted(self.committed),
            "blocks": {i: cpu_state(blocks[i]) for i in pending},
            "fp_blocks": {i: cpu_state(b) for i, b in self.fp_blocks.items()},
            "stats": self.stats,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        blocks = self.adapter.blocks()
        for index, block_state in state["blocks"].items():
            self.adapter.residency.acquire(index)
            fp_copy = copy.deepcopy(blocks[index]).requires_grad_(False)
            fp_copy.load_state_dict(state["fp_blocks"][index])
            self.fp_blocks[index] = fp_copy
            self._attach_rounding(index, self._wrap(index).values())
            blocks[index].load_state_dict(block_state)
        self.prepared, self.committed = set(state["prepared"]), set(state["committed"])
        self.stats = state["stats"]

    # --- one window ----------------------------------------------------------------------
    def __call__(
        self, number: int, window: Window, streams: Streams, ctx: BlockContext
    ) -> dict[str, Any]:
        start, end, commit_end = window
        if self.ctx is None:  # the training steps' batches are method.batch_size, not ctx's
            self.ctx = self.adapter.block_context(self.store.batch(QUANTIZED, torch.arange(1)))
        x_fp = streams.fp
        entering = []
        for index in window.blocks:
            if index not in self.prepared:
                self._prepare(index, x_fp)
                entering.append(index)
            self._unpark(index)
            self.fp_blocks[index].to(self.device)  # a resumed run's copies start on the CPU
            x_fp = self._fp_output(index, x_fp)
        self.store.put("y", x_fp)
        if self.s.loss.homologous:
            self.store.put("y_h", self._fp_range(start, end, streams.quantized))
        self._park_fp_copies(window)
        record = self._train(number, self.n_windows, start, end)
        record["truncated_weights"] = sum(
            sum(self.stats["cfp"][i].get("weight", {}).values()) for i in entering
        )
        self.log_metrics({"cbq/window": number} | _numbers(record, "cbq"))
        self._commit(window)
        streams.fp_next = self.store.get(_fp_output_name(commit_end - 1))
        for index in window.committed:
            del self.fp_blocks[index]
            self.parked.discard(index)
            self._parked_path(index).unlink(missing_ok=True)
            self.store.drop(_fp_output_name(index))
        return record

    def _park_fp_copies(self, window: Window) -> None:
        """With ``model.lazy``, write the window's FP copies to disk once its targets exist: they
        are not read while it trains, and its peak memory is its training (a 2048-wide block's
        copy is 236 MB of fp32). An eager model keeps them in memory."""
        if not self.adapter.residency.lazy:
            return
        for index in window.blocks:
            park(self.fp_blocks[index], self._parked_path(index))
            self.parked.add(index)

    def _unpark(self, index: int) -> None:
        if index in self.parked:
            unpark(self.fp_blocks[index], self._parked_path(index), self.device)
            self.parked.discard(index)

    def _snapshot(self, name: str) -> _Snapshot:
        """Where a window keeps a copy of its variables: on disk with ``model.lazy`` (a full-rank
        rounding's copy is 4 bytes per weight of the window), in memory otherwise."""
        lazy = self.adapter.residency.lazy
        return _Snapshot(
            self.checkpoint_folder / "snapshots" / f"{name}.safetensors" if lazy else None
        )

    def _parked_path(self, index: int) -> Path:
        return self.checkpoint_folder / "fp_copies" / f"block_{index}.safetensors"

    def _prepare(self, index: int, x_fp: torch.Tensor) -> None:
        """CFP, the FP target copy, wrapping, activation ranges and rounding for one block."""
        block = self.adapter.blocks()[index]
        stats: dict[str, Any] = {}
        if self.s.cfp.mode == CFPMode.weight_act:
            stats["act"] = self._scale_activations(index, x_fp)
        self.fp_blocks[index] = copy.deepcopy(block).requires_grad_(False)
        if self.s.cfp.mode in (CFPMode.weight, CFPMode.weight_act):
            stats["weight"] = cfp.truncate_block_weights(
                self.adapter,
                block,
                self.s.cfp.lambda1,
                self.s.cfp.lambda2,
                group_size=self._truncation_group_size(),
                **self._split_rule(),
            )
        self.stats["cfp"][index] = stats
        wrapped = self._wrap(index)
        if any(q.act_quantizer.needs_calibration for q in wrapped.values()):
            with torch.no_grad(), observing_activations(block):
                self._run(block, index, x_fp)
        self._attach_rounding(index, wrapped.values())
        self.prepared.add(index)

    def _scale_activations(self, index: int, x_fp: torch.Tensor) -> dict[str, Any]:
        """CFP's activation step (an exact fold): outlier channels only, or a migration."""
        rule = self.s.cfp
        if rule.act_rule == ActRule.migrate:
            return cfp.migrate_activations(
                self.adapter,
                index,
                x_fp,
                self.ctx,
                self.quant.weight_spec(),
                self.quant.act_spec(),
                rule.alphas,
                search_tokens=rule.search_tokens,
                seed=self.s.seed + index,
                batch_size=self.s.knobs.forward_batch,
            )
        return cfp.scale_activation_outliers(
            self.adapter,
            index,
            x_fp,
            self.ctx,
            rule.lambda1,
            rule.lambda2,
            batch_size=self.s.knobs.forward_batch,
            **self._split_rule(),
        )

    def _truncation_group_size(self) -> int | None:
        """cfp.weight_scope=group: the weight grid's group size (0: whole rows); else None."""
        spec = self.quant.weight_spec()
        if self.s.cfp.weight_scope is WeightScope.tensor or not spec.enabled:
            return None
        if spec.granularity is Granularity.per_group:
            return spec.group_size
        return 0 if spec.granularity is Granularity.per_channel else None

    def _split_rule(self) -> dict[str, Any]:
        return {
            "distance": self.s.cfp.distance.value,
            "log_space": self.s.cfp.log_space,
            "clip_to": self.s.cfp.clip_to.value,
        }

    def _wrap(self, index: int) -> dict[str, QuantLinear]:
        """The block's linears wrapped; with ``model.lazy`` (memory first), their backward
        passes recompute what a window would otherwise keep per weight (``lean_backward``)."""
        qlinears = wrap_block(
            self.adapter.blocks()[index],
            self.adapter.linear_names(),
            self.quant.weight_spec(),
            self.quant.act_spec(),
        )
        for qlinear in qlinears.values():
            qlinear.lean_backward = self.adapter.residency.lazy
        return qlinears

    def _attach_rounding(self, index: int, qlinears: Iterator[QuantLinear] | Any) -> None:
        """Learned rounding and learned weight ranges for the linears of block ``index``."""
        generator = torch.Generator().manual_seed(self.s.seed * 1000 + index)
        form = self.s.rounding.form
        for qlinear in qlinears:
            weight = qlinear.linear.weight.detach()
            if self.s.rounding.kind == RoundingKind.adaround:
                qlinear.rounding = AdaRound(weight, form)
            elif self.s.rounding.kind == RoundingKind.lora:
                qlinear.rounding = LoRARounding(weight, self.s.rounding.rank, generator, form)
            if qlinear.weight_quantizer.spec.enabled:
                qlinear.weight_quantizer.learn_range(self.s.knobs.weight_range, weight)
            qlinear.linear.requires_grad_(False)

    # --- training ------------------------------------------------------------------------
    def _qlinears(self, start: int, end: int) -> list[QuantLinear]:
        blocks = self.adapter.blocks()
        return [q for i in range(start, end) for _, q in quant_linears(blocks[i])]

    def _parameter_groups(self, start: int, end: int) -> list[dict[str, Any]]:
        knobs, groups = self.s.knobs, []
        for qlinear in self._qlinears(start, end):
            ranges = qlinear.weight_quantizer.range_parameters()
            if ranges and not qlinear.weight_materialized:
                groups.append({"params": ranges, "lr": knobs.lr_weight_scale})
            act = qlinear.act_quantizer
            if act.needs_calibration:
                groups.append(_relative_group(act.scale, knobs.lr_act_scale))
            if qlinear.rounding is not None:
                groups.append(
                    {"params": list(qlinear.rounding.parameters()), "lr": knobs.lr_rounding}
                )
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return groups

    def _roundings(self, start: int, end: int) -> list[LearnedRounding]:
        return [
            q.rounding
            for q in self._qlinears(start, end)
            if isinstance(q.rounding, LearnedRounding)
        ]

    def steps_per_window(self, n_samples: int) -> int:
        knobs = self.s.knobs
        if knobs.iters is not None:
            return knobs.iters
        return knobs.epochs * math.ceil(n_samples / knobs.batch_size)

    def _batches(self, n: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """``steps`` batches of sample indices: shuffled passes over the calibration set."""
        generator = torch.Generator().manual_seed(seed)
        produced = 0
        while produced < steps:
            for index in torch.randperm(n, generator=generator).split(self.s.knobs.batch_size):
                if produced == steps:
                    return
                produced += 1
                yield index

    def _train(self, number: int, total: int, start: int, end: int) -> dict[str, Any]:
        """Learn the window's variables; returns the window's record (see the module doc)."""
        groups = self._parameter_groups(start, end)
        roundings = self._roundings(start, end)
        n = self.store.get(QUANTIZED).shape[0]
        steps = self.steps_per_window(n) if groups else 0
        record: dict[str, Any] = {"blocks": [start, end], "steps": steps}
        with _hardened(roundings):  # RTN at the initial ranges, whatever the rounding's form
            initial, initial_terms = self._sample_distances(start, end)
        record["loss_init"] = initial.mean().item()
        record["loss_terms_init"] = initial_terms
        if steps == 0:
            record["final_loss"] = record["loss_hard"] = record["loss_init"]
            record["loss_terms_hard"] = initial_terms
            return record
        optimizer = build_optimizer(self.s.knobs.optimizer, groups)
        optimizer.zero_grad(set_to_none=True)
        scheduler = build_scheduler(optimizer, self.s.knobs.lr_schedule, steps)
        params = [p for group in groups for p in group["params"]]
        tracks_best = self.s.knobs.keep_best and all(r.hard for r in roundings)
        best = _BestIterate(params, self._snapshot("best")) if tracks_best else None
        # keep_best also means never ending a window worse than it started (RTN)
        at_start = self._snapshot("start").put(params) if self.s.knobs.keep_best else None
        bar = tqdm(
            total=steps,
            desc=f"window {number + 1}/{total} blocks {start}-{end - 1}",
            unit="step",
            leave=False,
        )
        losses: list[float] = []
        unit = 1.0 / max(record["loss_init"], 1e-30)
        for step, index in enumerate(self._batches(n, steps, self.s.seed * 1000 + number)):
            loss, distance = self._loss(start, end, index, roundings, step / steps, unit)
            value = loss.item()
            check_finite(
                value,
                f"CBQ window {number} (blocks {start}-{end - 1}), step {step}",
                "Lower the learning rates (method.lr_*), use fp32 (method.bf16=false) or "
                "check the calibration data.",
                bar.close,
            )
            if best is not None:
                best.offer(self._best_score(distance, initial[index]), step)
            loss.backward()
            optimizer.step()
            # Freed before the next forward pass: a full-rank rounding's gradient is 4 bytes
            # per weight of the window.
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self._project(groups, start, end)
            losses.append(value)
            bar.update()
            bar.set_postfix(loss=f"{value:.4g}")
        bar.close()
        tail = losses[-max(1, len(losses) // 10) :]
        record["train_loss_tail"] = sum(tail) / len(tail)
        if not all(r.hard for r in roundings):
            record["loss_soft"] = self._evaluate(start, end).loss
        with _hardened(roundings):
            hard, record["best_step"] = self._evaluate(start, end), None
            if best is not None and 0 <= best.step < steps - 1:
                hard, record["best_step"] = self._keep_best(best, start, end, hard)
            if at_start is not None and hard.loss > record["loss_init"]:
                _load_values(params, at_start.get(self.device))
                hard, record["best_step"] = Score(record["loss_init"], initial_terms), 0
                record["reverted_to_start"] = True
            record["loss_hard"], record["loss_terms_hard"] = hard.loss, hard.terms
            record |= self._rounding_moved(start, end)
        record["final_loss"] = record["loss_hard"]
        record |= self._clip_range(start, end)
        return record

    def _best_score(self, distance: float, initial: torch.Tensor) -> float:
        if self.s.knobs.best_rule is BestRule.batch:
            return distance
        # Against the same samples' initial distance, so that easy batches do not win.
        return distance / initial.mean().clamp_min(1e-30).item()

    def _keep_best(
        self, best: _BestIterate, start: int, end: int, last_score: Score
    ) -> tuple[Score, int | None]:
        """Load the best step's variables; under best_rule=relative only when they also score
        better than the last ones on the whole calibration set. Returns the score on the
        calibration set and the step kept (None for the last)."""
        last = [p.detach().clone() for p in best.params]
        best.load(best.saved.get(self.device))
        best_score = self._evaluate(start, end)
        if best_score.loss < last_score.loss or self.s.knobs.best_rule is BestRule.batch:
            return best_score, best.step
        best.load(last)
        return last_score, None

    def _project(self, groups: list[dict[str, Any]], start: int, end: int) -> None:
        with torch.no_grad():
            for group in groups:
                if group.get("is_step"):
                    for p in group["params"]:
                        p.clamp_(min=MIN_STEP)
            for qlinear in self._qlinears(start, end):
                qlinear.weight_quantizer.project_range()

    @torch.no_grad()
    def _sample_distances(self, start: int, end: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The window's reconstruction distance of every calibration sample (no regulariser),
        run in batches, and the calibration-set mean of each of the distance's terms."""
        n = self.store.get(QUANTIZED).shape[0]
        distances, term_sums = [], {}
        for chunk in torch.arange(n).split(self.s.knobs.forward_batch):
            output = self._output(start, end, chunk)
            for i in range(len(chunk)):
                terms = self._terms_of(output[i : i + 1], chunk[i : i + 1])
                distances.append(sum(terms.values()).item())
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0.0) + value.item()
        return torch.tensor(distances), {name: total / n for name, total in term_sums.items()}

    def _evaluate(self, start: int, end: int) -> Score:
        distances, terms = self._sample_distances(start, end)
        return Score(distances.mean().item(), terms)

    def _output(self, start: int, end: int, index: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.knobs.bf16):
            return self._forward(start, end, self.store.batch(QUANTIZED, index))

    def _distance(self, start: int, end: int, index: torch.Tensor) -> torch.Tensor:
        terms = self._terms_of(self._output(start, end, index), index)
        return sum(terms.values())

    def _terms_of(self, output: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The distance's terms (l2, kl), each averaged over the targets (normal, homologous)."""
        targets = ["y", "y_h"] if self.s.loss.homologous else ["y"]
        loss = self.s.loss
        per_target = [
            reconstruction_terms(
                output,
                self.store.batch(name, index),
                loss.kind,
                loss.l2_weight,
                loss.kl_weight,
                loss.l2_relative,
            )
            for name in targets
        ]
        return {term: sum(t[term] for t in per_target) / len(targets) for term in per_target[0]}

    def _loss(
        self,
        start: int,
        end: int,
        index: torch.Tensor,
        roundings: list[LearnedRounding],
        progress: float,
        unit: float = 1.0,
    ) -> tuple[torch.Tensor, float]:
        """The training loss and the distance alone. The loss is the distance in units of the
        window's initial loss plus the rounding regulariser: every window trains on the same
        scale however deep it is (the raw loss grows ~10^4 over Gemma-3's depth), which keeps
        the regulariser's weight meaning one thing and the gradients far above Adam's eps."""
        distance = self._distance(start, end, index)
        loss = distance * unit
        rounding = self.s.rounding
        regularized = [r for r in roundings if r.has_regularizer and not r.hard]
        if regularized and progress >= rounding.reg_warmup:
            beta = _annealed_beta(rounding, progress)
            regularizer = sum(r.regularizer(beta) for r in regularized) / len(regularized)
            loss = loss + rounding.reg_weight * regularizer
        return loss, distance.item()

    def _rounding_moved(self, start: int, end: int) -> dict[str, Any]:
        """Weights whose (hardened) learned rounding differs from RTN at the same ranges."""
        counts = [_moved_weights(q) for q in self._qlinears(start, end) if q.rounding is not None]
        if not counts:
            return {}
        moved, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return {"rounding_moved": moved, "rounding_moved_fraction": moved / total}

    def _clip_range(self, start: int, end: int) -> dict[str, float]:
        ranges = [
            r
            for q in self._qlinears(start, end)
            if (r := q.weight_quantizer.clip_factor_range()) is not None
        ]
        if not ranges:
            return {}
        return {"clip_min": min(r[0] for r in ranges), "clip_max": max(r[1] for r in ranges)}

    # --- committing and advancing --------------------------------------------------------
    def _commit(self, window: Window) -> None:
        """Harden, materialize and freeze the blocks leaving the window; the pipeline then
        advances the quantized stream through them."""
        blocks = self.adapter.blocks()
        moved = self.stats.setdefault("rounding_moved", {})
        with torch.no_grad():
            for index in window.committed:
                for _, qlinear in quant_linears(blocks[index]):
                    if isinstance(qlinear.rounding, LearnedRounding):
                        qlinear.rounding.harden()
                        counts = moved.setdefault(index, [0, 0])
                        for i, count in enumerate(_moved_weights(qlinear)):
                            counts[i] += count
                    qlinear.materialize()
                blocks[index].requires_grad_(False)
                self.committed.add(index)

    # --- running blocks ------------------------------------------------------------------
    def _forward(self, start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        for index in range(start, end):
            hidden = self.adapter.forward_block(index, hidden, self.ctx)
        return hidden

    @torch.no_grad()
    def _run(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``block`` (the model's or an FP copy standing in for block ``index``) on every sample."""
        blocks = self.adapter.blocks()
        original = blocks[index]
        blocks[index] = block
        try:
            return run_block(self.adapter, index, hidden, self.ctx, self.s.knobs.forward_batch)
        finally:
            blocks[index] = original

    def _fp_output(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The FP stream after block ``index`` (``hidden`` is the stream entering it), computed
        once per run: the windows that share a block and the commit after them reuse it."""
        name = _fp_output_name(index)
        if not self.store.has(name):
            self.store.put(name, self._run(self.fp_blocks[index], index, hidden))
        return self.store.get(name)

    def _fp_range(self, start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        """The FP copies of blocks [start, end) on ``hidden`` (the homologous targets)."""
        for index in range(start, end):
            hidden = self._run(self.fp_blocks[index], index, hidden)
        return hidden


def _fp_output_name(index: int) -> str:
    return f"fp_out_{index}"


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a window's record as flat metric names (``cbq/loss_terms_init/kl``)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}/{key}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


@dataclass(frozen=True)
class Score:
    """A window's reconstruction distance on the whole calibration set, and its terms'."""

    loss: float
    terms: dict[str, float]


class _Snapshot:
    """A copy of a list of tensors, in memory or, given a path, on disk until read back."""

    def __init__(self, path: Path | None):
        self.path = path
        self.values: list[torch.Tensor] = []

    def put(self, tensors: list[nn.Parameter]) -> _Snapshot:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({str(i): t.detach().cpu() for i, t in enumerate(tensors)}, self.path)
        elif self.values:  # in place: a second copy of a window's variables is not free
            _load_values(self.values, tensors)
        else:
            self.values = [t.detach().clone() for t in tensors]
        return self

    def get(self, device: torch.device | str) -> list[torch.Tensor]:
        if self.path is None:
            return self.values
        loaded = load_file(self.path, device=str(device))
        return [loaded[str(i)] for i in range(len(loaded))]


class _BestIterate:
    """The variables at the step with the lowest score seen so far (``_best_score``)."""

    def __init__(self, params: list[nn.Parameter], saved: _Snapshot):
        self.params, self.saved, self.score, self.step = params, saved, math.inf, -1

    def offer(self, score: float, step: int) -> None:
        """Called before the step's update: the current variables scored ``score``."""
        if score < self.score:
            self.score, self.step = score, step
            self.saved.put(self.params)

    def load(self, values: list[torch.Tensor]) -> None:
        _load_values(self.params, values)


@torch.no_grad()
def _load_values(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for target, value in zip(targets, values, strict=True):
        target.copy_(value)


@contextmanager
def _hardened(roundings: list[LearnedRounding]) -> Iterator[None]:
    """Hard rounding within the block; soft ones soften again after (blocks that stay)."""
    soft = [r for r in roundings if not r.hard]
    for rounding in soft:
        rounding.harden()
    try:
        yield
    finally:
        for rounding in soft:
            rounding.soften()


@torch.no_grad()
def _moved_weights(qlinear: QuantLinear) -> tuple[int, int]:
    """(weights whose learned rounding differs from RTN at the same ranges, all weights)."""
    weight = qlinear.linear.weight
    quantizer = qlinear.weight_quantizer
    learned, nearest = quantizer(weight, qlinear.rounding), quantizer(weight)
    return int(torch.count_nonzero(learned != nearest)), weight.numel()


def _annealed_beta(rounding: RoundingConfig, progress: float) -> float:
    """The regulariser's beta: beta_start at the end of the warm-up, beta_end at the last step."""
    ramp = (progress - rounding.reg_warmup) / max(1 - rounding.reg_warmup, 1e-8)
    return rounding.beta_start + (rounding.beta_end - rounding.beta_start) * ramp


def _relative_group(step: nn.Parameter, relative_lr: float) -> dict[str, Any]:
    """Adam moves a parameter by about lr per step, so step sizes get an lr relative to their
    own magnitude: the same setting suits 4-bit weight steps (~1e-3) and activation steps (~1)."""
    step.requires_grad_(True)
    magnitude = step.detach().abs().mean().clamp(min=MIN_STEP).item()
    return {"params": [step], "lr": relative_lr * magnitude, "is_step": True}
