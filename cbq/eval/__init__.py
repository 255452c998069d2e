"""Evaluation: perplexity (GPTQ protocol) and zero-shot tasks through lm-eval."""

from dataclasses import dataclass, field
from enum import StrEnum

from cbq.eval.offline_tasks import OFFLINE_TASKS
from cbq.eval.perplexity import perplexity
from cbq.eval.zeroshot import (
    PAPER_TASKS,
    OnMissing,
    ZeroShotConfig,
    ZeroShotResults,
    ZeroShotTasks,
    evaluate_zeroshot,
    prepare_zeroshot,
)

__all__ = [
    "OFFLINE_TASKS",
    "PAPER_TASKS",
    "EvalConfig",
    "EvalDType",
    "OnMissing",
    "ZeroShotConfig",
    "ZeroShotResults",
    "ZeroShotTasks",
    "evaluate_zeroshot",
    "perplexity",
    "prepare_zeroshot",
]


class EvalDType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class EvalConfig:
    ppl: bool = True
    batch_size: int = 1
    # bfloat16: perplexity under bf16 autocast (faster where bf16 matmuls are, as on AMX CPUs;
    # its difference from float32 is measured in docs/benchmarks.md). The tables use float32.
    dtype: EvalDType = EvalDType.float32
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def problems(self) -> list[str]:
        problems = self.zeroshot.problems()
        if self.batch_size < 1:
            problems.insert(0, f"eval.batch_size: {self.batch_size} must be >= 1")
        return problems
