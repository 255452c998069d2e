"""Evaluation: perplexity (GPTQ protocol) and zero-shot tasks through lm-eval."""

from cbq.eval.offline_tasks import OFFLINE_TASKS
from cbq.eval.perplexity import perplexity
from cbq.eval.zeroshot import (
    PAPER_TASKS,
    ZeroShotResults,
    ZeroShotTasks,
    evaluate_zeroshot,
    prepare_zeroshot,
)

__all__ = [
    "OFFLINE_TASKS",
    "PAPER_TASKS",
    "ZeroShotResults",
    "ZeroShotTasks",
    "evaluate_zeroshot",
    "perplexity",
    "prepare_zeroshot",
]
