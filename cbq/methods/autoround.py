"""``method=autoround``: AutoRound's SignRound (Cheng et al., 2023), block by block.

Every linear of a block learns a rounding offset ``V`` (``round(W/s + V)``, ``V`` in
[-0.5, 0.5], full rank) and, with ``minmax_tuning``, factors in (0, 1] on each group's min and
max (step size and zero point follow by min-max). Signed gradient descent, ``lr = 1 / iters``
decayed linearly to 0, ``iters`` steps on random batches of ``batch_size`` calibration
sequences, the block-output MSE against the FP block on the FP stream, the quantized stream
as the block's input (AutoRound's ``enable_quanted_input``), and the iterate with the lowest
batch loss kept.

This is the CBD trainer (:mod:`cbq.cbd`) with AutoRound's recipe: windows of one block
without overlap, plain L2 without homologous targets, no CFP, ``rounding=adaround`` in the
offset form, ``weight_range=clip``, SignSGD, ``best_rule=batch``. ``method.best_rule=relative``
gives it CBQ's rule instead (cbq.cbd.TrainerKnobs); on SmolLM2 that rule kept steps that clip
more in the middle blocks, which cost perplexity on long evaluation windows
(docs/cbq_components.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cbq.cbd import (
    BestRule,
    CBDTrainer,
    TrainerKnobs,
    TrainerSettings,
    WindowConfig,
    refuse_unwanted_resume,
)
from cbq.cfp import CFPConfig, CFPMode
from cbq.losses import LossConfig, LossKind
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import ModelAdapter
from cbq.optim import LRSchedule, OptimizerKind
from cbq.pipeline import CacheKind
from cbq.quant.quantizer import RangeLearning
from cbq.quant.rounding import RoundingConfig, RoundingForm, RoundingKind


@dataclass
class AutoRoundConfig(MethodConfig):
    name: str = "autoround"
    # AutoRound's defaults: 200 steps of batches of 8, lr = 1 / iters.
    iters: int = 200
    batch_size: int = 8
    # null: 1 / iters.
    lr: float | None = None
    # Learning rate of the min/max factors; null: lr.
    minmax_lr: float | None = None
    minmax_tuning: bool = True
    # batch: keep the step with the lowest raw batch loss (AutoRound's); relative: CBQ's rule.
    best_rule: BestRule = BestRule.batch
    bf16: bool = False
    # Where cached activations live: cpu, device or disk.
    cache: CacheKind = CacheKind.cpu
    # Resume from <run dir>/checkpoint when it exists.
    resume: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"method.iters: {self.iters} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"method.batch_size: {self.batch_size} must be >= 1")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"method.{name}: {value} must be > 0, or null")

    @property
    def rounding_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


class AutoRound(QuantMethod):
    name = "autoround"
    config_class = AutoRoundConfig
    cfg: AutoRoundConfig

    def settings(self) -> TrainerSettings:
        cfg = self.cfg
        lr = cfg.rounding_lr
        knobs = TrainerKnobs(
            iters=cfg.iters,
            batch_size=cfg.batch_size,
            weight_range=RangeLearning.clip if cfg.minmax_tuning else RangeLearning.none,
            lr_weight_scale=cfg.minmax_lr if cfg.minmax_lr is not None else lr,
            # AutoRound keeps static activation ranges as observed.
            lr_act_scale=0.0,
            lr_rounding=lr,
            optimizer=OptimizerKind.signsgd,
            lr_schedule=LRSchedule.linear,
            keep_best=True,
            best_rule=cfg.best_rule,
            bf16=cfg.bf16,
            cache=cfg.cache,
        )
        return TrainerSettings(
            window=WindowConfig(size=1, overlap=0),
            loss=LossConfig(kind=LossKind.l2, homologous=False),
            cfp=CFPConfig(mode=CFPMode.none),
            rounding=RoundingConfig(kind=RoundingKind.adaround, form=RoundingForm.offset),
            knobs=knobs,
            seed=self.run_cfg.seed,
        )

    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, "AutoRound needs calibration data"
        refuse_unwanted_resume(ctx.run_dir, self.cfg.resume)
        trainer = CBDTrainer(
            adapter, self.quant, self.settings(), ctx.device, ctx.run_dir, ctx.log, name=self.name
        )
        return trainer.run(calib)
