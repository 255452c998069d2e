"""``method=cbq``: Cross-Block Quantization (the paper's method).

The components are their own config groups (``window``, ``loss``, ``cfp``, ``rounding``) so
that the ablations of Tables 4-7 are sweeps; the method's config is the trainer's knobs
(:class:`cbq.cbd.TrainerKnobs`) plus ``resume``, and everything goes to
:class:`cbq.cbd.CBDTrainer` as one :class:`cbq.cbd.TrainerSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cbq.cbd import CBDTrainer, TrainerKnobs, TrainerSettings, refuse_unwanted_resume
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import ModelAdapter


@dataclass
class CBQConfig(TrainerKnobs, MethodConfig):
    """The trainer knobs (:class:`cbq.cbd.TrainerKnobs`) and the method's own fields."""

    name: str = "cbq"
    # Resume from <run dir>/checkpoint when it exists.
    resume: bool = True


class CrossBlockQuantization(QuantMethod):
    name = "cbq"
    config_class = CBQConfig
    ignored_groups = ()
    cfg: CBQConfig

    def settings(self) -> TrainerSettings:
        run = self.run_cfg
        return TrainerSettings(
            window=run.window,
            loss=run.loss,
            cfp=run.cfp,
            rounding=run.rounding,
            knobs=TrainerKnobs.of(self.cfg),
            seed=run.seed,
        )

    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, "CBQ needs calibration data"
        refuse_unwanted_resume(ctx.run_dir, self.cfg.resume)
        settings = self.settings()
        trainer = CBDTrainer(adapter, self.quant, settings, ctx.device, ctx.run_dir, ctx.log)
        stats = trainer.run(calib)
        stats["rounding_params_per_block"] = rounding_parameter_count(adapter, settings)
        return stats


def rounding_parameter_count(adapter: ModelAdapter, settings: TrainerSettings) -> dict[str, int]:
    """Learnable rounding variables of one block: LoRA (rank r) against full-rank AdaRound."""
    linears = adapter.linears(adapter.blocks()[0]).values()
    shapes = [getattr(m, "linear", m).weight.shape for m in linears]
    rank = settings.rounding.rank
    return {
        "adaround": sum(rows * cols for rows, cols in shapes),
        f"lora_r{rank}": sum(min(rank, rows, cols) * (rows + cols) for rows, cols in shapes),
    }
