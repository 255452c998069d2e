"""Optimizers and learning-rate schedules of the reconstruction trainers.

- ``adam``: torch's Adam (CBQ's default; moves each variable by about ``lr`` a step).
- ``signsgd``: ``p -= lr * sign(grad)``, AutoRound's SignRound optimizer: every variable moves
  by exactly ``lr`` a step, so a rounding offset bounded to [-0.5, 0.5] crosses its range in
  ``1 / lr`` steps whatever the scale of its gradient.

Schedules scale every group's ``lr`` by a factor of the step: ``constant`` (1), ``linear``
(1 -> 0, AutoRound's) or ``cosine`` (1 -> 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import torch


class OptimizerKind(StrEnum):
    adam = "adam"
    signsgd = "signsgd"


class LRSchedule(StrEnum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 5e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def build_optimizer(kind: OptimizerKind, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if OptimizerKind(kind) is OptimizerKind.signsgd:
        return SignSGD(groups)
    return torch.optim.Adam(groups)


def schedule_factor(schedule: LRSchedule, step: int, total: int) -> float:
    """The learning-rate factor at ``step`` of ``total`` (1 at step 0)."""
    progress = step / max(total, 1)
    schedule = LRSchedule(schedule)
    if schedule is LRSchedule.linear:
        return 1.0 - progress
    if schedule is LRSchedule.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(schedule, step, total)
    )
