"""``method=cbq``: Cross-Block Quantization (the paper's method).

The components are their own config groups (``window``, ``loss``, ``cfp``, ``rounding``) so
that the ablations of Tables 4-7 are sweeps; this module holds the trainer knobs and hands
everything to :class:`cbq.cbd.CBDTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cbq.cbd import CBDTrainer, TrainerSettings
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import ModelAdapter


@dataclass
class CBQConfig(MethodConfig):
    name: str = "cbq"
    epochs: int = 3
    # Calibration sequences per optimisation step.
    batch_size: int = 1
    # Step-size learning rates are relative to each step size's magnitude (see cbq.cbd).
    lr_weight_scale: float = 1e-2
    lr_act_scale: float = 1e-2
    lr_rounding: float = 1e-3
    bf16: bool = False
    # Where cached activations live: cpu, device or disk (memory-mapped).
    cache: str = "cpu"
    # Resume from <run dir>/checkpoint when it exists.
    resume: bool = True


class CrossBlockQuantization(QuantMethod):
    name = "cbq"
    config_class = CBQConfig
    cfg: CBQConfig

    def settings(self) -> TrainerSettings:
        run = self.run_cfg
        return TrainerSettings(
            window_size=run.window.size,
            window_overlap=run.window.overlap,
            epochs=self.cfg.epochs,
            batch_size=self.cfg.batch_size,
            loss=run.loss.kind.value,
            homologous=run.loss.homologous,
            l2_weight=run.loss.l2_weight,
            kl_weight=run.loss.kl_weight,
            cfp_mode=run.cfp.mode.value,
            lambda1=run.cfp.lambda1,
            lambda2=run.cfp.lambda2,
            cfp_distance=run.cfp.distance.value,
            cfp_log_space=run.cfp.log_space,
            cfp_clip_to=run.cfp.clip_to.value,
            rounding=run.rounding.kind.value,
            rank=run.rounding.rank,
            reg_weight=run.rounding.reg_weight,
            beta_start=run.rounding.beta_start,
            beta_end=run.rounding.beta_end,
            reg_warmup=run.rounding.reg_warmup,
            lr_weight_scale=self.cfg.lr_weight_scale,
            lr_act_scale=self.cfg.lr_act_scale,
            lr_rounding=self.cfg.lr_rounding,
            bf16=self.cfg.bf16,
            cache=self.cfg.cache,
            seed=run.seed,
        )

    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, "CBQ needs calibration data"
        checkpoint = ctx.run_dir / "checkpoint"
        if not self.cfg.resume and checkpoint.exists():
            raise RuntimeError(f"{checkpoint} exists and method.resume=false; delete it first")
        trainer = CBDTrainer(adapter, self.quant, self.settings(), ctx.device, ctx.run_dir, ctx.log)
        stats = trainer.run(calib)
        stats["rounding_params_per_block"] = rounding_parameter_count(adapter, self.settings())
        return stats


def rounding_parameter_count(adapter: ModelAdapter, settings: TrainerSettings) -> dict[str, int]:
    """Learnable rounding variables of one block: LoRA (rank r) against full-rank AdaRound."""
    linears = adapter.linears(adapter.blocks()[0]).values()
    shapes = [getattr(m, "linear", m).weight.shape for m in linears]
    return {
        "adaround": sum(rows * cols for rows, cols in shapes),
        f"lora_r{settings.rank}": sum(
            min(settings.rank, rows, cols) * (rows + cols) for rows, cols in shapes
        ),
    }
