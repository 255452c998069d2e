"""Learned rounding: full-rank (AdaRound-style) or low-rank (CBQ's LoRA-Rounding) variables.

A rounding module maps ``W/s`` to integer offsets added to ``floor(W/s)``. The learned
variable ``D`` is a full matrix (``kind=adaround``) or ``A1 @ A2`` of rank r (``kind=lora``,
the paper's low-rank decomposition). Two forms turn ``D`` into offsets:

- ``form=offset`` (AutoRound's SignRound): ``round(W/s + clamp(D, -0.5, 0.5)) - floor(W/s)``,
  which is 0 or 1. The forward is always hard (straight-through gradient to ``D``), so there
  is no gap between the trained and the hardened weight, and ``D = 0`` is exactly RTN.
- ``form=sigmoid`` (the paper's Eq. 6, AdaRound): ``h(V0 + D)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` and AdaRound's start
  ``h(V0) = frac(W/s)``: the soft weight starts at ``W`` itself and a regulariser pushes every
  ``h`` to 0 or 1; hardening takes ``h >= 0.5``. ``V0`` is recomputed from the current step
  size at every forward, so ``D`` stays a deviation when CBQ learns ``s`` at the same time.

Why both: the previous start of the sigmoid form, ``V0 = +-2`` (round-to-nearest deep in the
sigmoid's tail), needed ``|D| > 2`` to flip a weight, which Adam at lr 1e-3 never reached in a
window's ~100 steps (1-2 of 73,728 weights moved). The docs compare the two forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from cbq.quant.quantizer import OFFSET_BOUND, round_ste

ZETA, GAMMA = 1.1, -0.1


class RoundingForm(StrEnum):
    offset = "offset"
    sigmoid = "sigmoid"


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``rectified_sigmoid(V) = h`` for ``h`` in [0, 1) (finite: the stretch keeps
    ``sigmoid(V)`` inside (0.083, 0.917))."""
    return torch.logit((h - GAMMA) / (ZETA - GAMMA))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``1 - |2h - 1|^beta``: 0 when every offset is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


class LearnedRounding(nn.Module):
    """Offsets in {0, 1} (or [0, 1] while a sigmoid form is soft) for ``W/s``."""

    def __init__(self, form: RoundingForm = RoundingForm.offset) -> None:
        super().__init__()
        self.form = RoundingForm(form)
        self.hard = self.form is RoundingForm.offset
        self._last_soft: torch.Tensor | None = None

    @property
    def has_regularizer(self) -> bool:
        return self.form is RoundingForm.sigmoid

    def deviation(self) -> torch.Tensor:
        """``D``, the learned variable."""
        raise NotImplementedError

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        scaled = scaled.detach()
        floor = scaled.floor()
        if self.form is RoundingForm.offset:
            bounded = self.deviation().clamp(-OFFSET_BOUND, OFFSET_BOUND)
            return round_ste(scaled + bounded) - floor
        variable = inverse_rectified_sigmoid(scaled - floor) + self.deviation()
        if self.hard:
            return (variable >= 0).to(scaled.dtype)
        self._last_soft = rectified_sigmoid(variable)
        return self._last_soft

    @property
    def additive_offset(self) -> Callable[[], torch.Tensor] | None:
        """The offset form's ``D``, for :func:`cbq.quant.quantizer.offset_fake_quant` to add
        to ``W/s`` (clamped to +-0.5) before rounding; None for the sigmoid form."""
        return self.deviation if self.form is RoundingForm.offset else None

    def regularizer(self, beta: float) -> torch.Tensor:
        """Regulariser on the soft offsets of the latest forward pass (sigmoid form)."""
        if self._last_soft is None:
            raise RuntimeError("regularizer() needs a soft forward pass of the sigmoid form")
        return rounding_regularizer(self._last_soft, beta)

    def harden(self) -> None:
        self.hard = True
        self._last_soft = None

    def soften(self) -> None:
        """Back to soft offsets (sigmoid form): undoes a temporary :meth:`harden`."""
        self.hard = self.form is RoundingForm.offset

    def get_extra_state(self) -> dict[str, bool | str]:
        return {"hard": self.hard, "form": self.form.value}

    def set_extra_state(self, state: dict[str, bool | str]) -> None:
        self.hard = bool(state["hard"])
        self.form = RoundingForm(state.get("form", RoundingForm.sigmoid.value))


class AdaRound(LearnedRounding):
    """One variable per weight."""

    def __init__(self, weight: torch.Tensor, form: RoundingForm = RoundingForm.offset):
        super().__init__(form)
        self.d = nn.Parameter(torch.zeros_like(weight))

    def deviation(self) -> torch.Tensor:
        return self.d


class LoRARounding(LearnedRounding):
    """``D = A1 @ A2`` of rank r: ``r * (rows + cols)`` variables instead of ``rows * cols``."""

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        generator: torch.Generator | None = None,
        form: RoundingForm = RoundingForm.offset,
    ):
        super().__init__(form)
        rows, cols = weight.shape
        rank = min(rank, rows, cols)
        init = torch.randn(rows, rank, generator=generator, dtype=weight.dtype) / rank**0.5
        self.a1 = nn.Parameter(init.to(weight.device))
        self.a2 = nn.Parameter(torch.zeros(rank, cols, dtype=weight.dtype, device=weight.device))

    def deviation(self) -> torch.Tensor:
        return self.a1 @ self.a2


def learnable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class RoundingKind(StrEnum):
    nearest = "nearest"
    adaround = "adaround"
    lora = "lora"


@dataclass
class RoundingConfig:
    kind: RoundingKind = RoundingKind.adaround
    # How the learned variable becomes a rounding offset (cbq.quant.rounding): offset is
    # AutoRound's bounded additive offset, round(W/s + V) with V in [-0.5, 0.5]; sigmoid is the
    # paper's floor(W/s) + h(V) (AdaRound, started at h = frac(W/s)) with the regulariser below.
    form: RoundingForm = RoundingForm.offset
    rank: int = 5
    # sigmoid form only: weight of the mean rounding regulariser; beta anneals from beta_start
    # to beta_end after the first reg_warmup fraction of each window's steps (AdaRound / BRECQ).
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    reg_warmup: float = 0.2

    def problems(self) -> list[str]:
        problems = []
        if self.rank < 1:
            problems.append(f"rounding.rank: {self.rank} must be a positive integer")
        if not 0 <= self.reg_warmup < 1:
            problems.append(
                f"rounding.reg_warmup: {self.reg_warmup} is not allowed; allowed: [0, 1)"
            )
        return problems
