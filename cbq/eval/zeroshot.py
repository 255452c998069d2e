"""Zero-shot evaluation through lm-eval's ``simple_evaluate`` on the in-memory model.

The model object and its tokenizer go into lm-eval's ``HFLM`` as they are (fake-quantized
weights, activation quantizers and all): nothing is saved or reloaded. Every task runs with
0 shots and lm-eval's seeds set to ``eval.zeroshot.seed``.

Tasks, by their lm-eval names:

- offline: generated from the evaluation part of the packaged text
  (:mod:`cbq.eval.offline_tasks`), written as jsonl + YAML under the run directory;
- paper: the CBQ paper's zero-shot tasks (``PAPER_TASKS``), with lm-eval's own configs;
  their data comes from the Hugging Face hub or the local HF datasets cache.

:func:`prepare_zeroshot` loads the data of every task, before the model loads. When the hub
cannot be reached (one short probe), the data is read in offline mode: from the local HF
datasets cache, or not at all, so nothing waits on download retries. A task whose data
cannot be loaded stops the run (``on_missing=fail``) with a message naming the task and
the option, or is recorded as skipped (``on_missing=skip``).
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbq.data.corpora import HubUnavailableError, hub_reachable
from cbq.eval.offline_tasks import (
    LAMBADA_CHANCE,
    OFFLINE_TASKS,
    generate_examples,
    write_task,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The paper's tasks -> the folder of lm-eval's task configs that defines each. Indexing only
# these folders takes a second; indexing all of lm-eval's tasks takes 10-15 s.
PAPER_TASKS: dict[str, str] = {
    "lambada_openai": "lambada",
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "mutual": "mutual",
    "ethics_cm": "hendrycks_ethics",
    "ethics_deontology": "hendrycks_ethics",
    "ethics_justice": "hendrycks_ethics",
    "ethics_utilitarianism": "hendrycks_ethics",
    "ethics_virtue": "hendrycks_ethics",
}
KNOWN_TASKS: tuple[str, ...] = (*OFFLINE_TASKS, *PAPER_TASKS)
# Standard errors: closed form for accuracies; perplexity's is bootstrapped (1 chunk).
BOOTSTRAP_ITERS = 1000


def unknown_task_problem(name: str, field_name: str) -> str | None:
    """The config problem of a task name that is neither offline nor a paper task."""
    if name in KNOWN_TASKS:
        return None
    return (
        f"{field_name}: unknown task {name!r}; allowed: offline: {', '.join(OFFLINE_TASKS)}; "
        f"paper (need the hub or the local HF datasets cache): {', '.join(PAPER_TASKS)}"
    )


class OnMissing(StrEnum):
    fail = "fail"
    skip = "skip"


@dataclass
class ZeroShotConfig:
    """Zero-shot evaluation through lm-eval on the in-memory (quantized) model."""

    # lm-eval task names: the offline tasks generated from the packaged text
    # (cbq.eval.offline_tasks) or the paper's tasks, which need the hub (cbq.eval.zeroshot).
    tasks: list[str] = field(default_factory=list)
    # Evaluate only the first N examples of each task; null means all.
    limit: int | None = None
    batch_size: int = 1
    # A task whose data cannot be loaded (hub unreachable, not cached): stop the run before
    # the model loads (fail), or record it as skipped and evaluate the others (skip).
    on_missing: OnMissing = OnMissing.fail
    # Examples per generated offline task (fewer when the corpus has fewer).
    n_examples: int = 200
    # Seed of the generated tasks' data and of lm-eval; fixed rather than the run seed, so
    # every run is scored on the same examples.
    seed: int = 0

    def problems(self) -> list[str]:
        problems = [
            problem
            for i, name in enumerate(self.tasks)
            if (problem := unknown_task_problem(name, f"eval.zeroshot.tasks[{i}]"))
        ]
        duplicates = sorted({name for name in self.tasks if self.tasks.count(name) > 1})
        if duplicates:
            problems.append(f"eval.zeroshot.tasks: {', '.join(duplicates)} listed more than once")
        for field_name, value in [
            ("eval.zeroshot.batch_size", self.batch_size),
            ("eval.zeroshot.n_examples", self.n_examples),
        ]:
            if value < 1:
                problems.append(f"{field_name}: {value} must be a positive integer")
        if self.limit is not None and self.limit < 1:
            problems.append(f"eval.zeroshot.limit: {self.limit} must be a positive integer or null")
        return problems


# ---------------------------------------------------------------------------------------
# preparing: task data, before the model loads


@dataclass
class ZeroShotTasks:
    """The tasks of a run with their data loaded (lm-eval ``Task`` objects), and those
    skipped with the reason."""

    cfg: ZeroShotConfig
    tasks: dict[str, Any]
    task_manager: Any
    skipped: dict[str, str] = field(default_factory=dict)


def prepare_zeroshot(cfg: ZeroShotConfig, work_dir: Path) -> ZeroShotTasks:
    """Generate the offline tasks' data under ``work_dir`` and load every task's data.

    Raises HubUnavailableError for a task whose data cannot be loaded, unless
    ``cfg.on_missing`` is ``skip``.
    """
    from lm_eval.tasks import TaskManager

    task_dir = work_dir / "tasks"
    for name in cfg.tasks:
        if name in OFFLINE_TASKS:
            write_task(name, generate_examples(name, cfg.n_examples, cfg.seed), task_dir)
    manager = TaskManager(include_path=_config_dirs(cfg.tasks, task_dir), include_defaults=False)
    tasks, skipped = _load_tasks(manager, cfg)
    return ZeroShotTasks(cfg, tasks, manager, skipped)


def _load_tasks(manager: Any, cfg: ZeroShotConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The loaded tasks, and the reasons of those skipped (``on_missing=skip``)."""
    tasks, skipped = {}, {}
    needs_hub = any(name in PAPER_TASKS for name in cfg.tasks)
    with _offline_unless_hub_reachable(needs_hub) as forced_offline:
        for name in cfg.tasks:
            try:
                tasks[name] = manager.load([name])["tasks"][name]
            except OSError as error:  # ConnectionError, DatasetNotFoundError, missing cache
                if name in OFFLINE_TASKS:
                    raise  # local files: not a matter of reaching the hub
                reason = _missing_reason(error, forced_offline)
                if cfg.on_missing is OnMissing.fail:
                    raise HubUnavailableError(_missing_message(name, reason)) from error
                log.warning("zero-shot task %s skipped: %s", name, reason)
                skipped[name] = reason
    return tasks, skipped


def _config_dirs(names: list[str], task_dir: Path) -> list[str]:
    import lm_eval

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    paper_dirs = {str(lm_eval_tasks / PAPER_TASKS[name]) for name in names if name in PAPER_TASKS}
    return sorted(paper_dirs) + ([str(task_dir)] if task_dir.is_dir() else [])


@contextmanager
def _offline_unless_hub_reachable(needs_hub: bool) -> Iterator[bool]:
    """Switch datasets and huggingface_hub to offline mode while loading when the hub cannot
    be reached: they then read the local cache or fail at once, where online they retry for
    tens of seconds. Yields whether it switched."""
    import datasets
    from huggingface_hub import constants as hub_constants

    switch = needs_hub and not datasets.config.HF_HUB_OFFLINE and not hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if switch:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield switch
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _missing_reason(error: OSError, forced_offline: bool) -> str:
    reason = f"{type(error).__name__}: {error}"
    if forced_offline:
        reason += "; the hub is unreachable, so only the local HF datasets cache was tried"
    return reason


def _missing_message(name: str, reason: str) -> str:
    return (
        f"zero-shot task {name!r}: its data could not be loaded: {reason}. "
        "Set eval.zeroshot.on_missing=skip to record it as skipped and evaluate the other "
        f"tasks, or use the offline tasks ({', '.join(OFFLINE_TASKS)}: zeroshot=offline)."
    )


# ---------------------------------------------------------------------------------------
# evaluating: lm-eval on the in-memory model


@dataclass(frozen=True)
class TaskResult:
    metrics: dict[str, float]  # lm-eval's metrics (acc, acc_norm, perplexity, ...)
    stderr: dict[str, float]
    n_examples: int
    chance: float | str  # expected acc of a uniform guess


@dataclass
class ZeroShotResults:
    tasks: dict[str, TaskResult]
    skipped: dict[str, str]

    def metrics(self) -> dict[str, float]:
        """``zeroshot/<task>/<metric>`` -> value."""
        return {
            f"zeroshot/{name}/{metric}": value
            for name, result in self.tasks.items()
            for metric, value in result.metrics.items()
        }

    def stats(self) -> dict[str, Any]:
        """Examples, chance level and standard errors per task, and the skipped tasks."""
        stats: dict[str, Any] = {"zeroshot/skipped": dict(self.skipped)}
        for name, result in self.tasks.items():
            stats[f"zeroshot/{name}/n_examples"] = result.n_examples
            stats[f"zeroshot/{name}/chance_acc"] = result.chance
            for metric, value in result.stderr.items():
                stats[f"zeroshot/{name}/{metric}_stderr"] = value
        return stats


def evaluate_zeroshot(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prepared: ZeroShotTasks
) -> ZeroShotResults:
    """Run the prepared tasks through ``lm_eval.simple_evaluate`` on ``model`` as it is."""
    if not prepared.tasks:
        return ZeroShotResults({}, dict(prepared.skipped))
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    cfg = prepared.cfg
    output = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size),
        tasks=list(prepared.tasks.values()),
        task_manager=prepared.task_manager,
        num_fewshot=0,
        limit=cfg.limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    results = {name: _task_result(name, task, output) for name, task in prepared.tasks.items()}
    return ZeroShotResults(results, dict(prepared.skipped))


def _task_result(name: str, task: Any, output: dict[str, Any]) -> TaskResult:
    names = output["higher_is_better"][name]  # the task's metrics
    metrics, stderr = {}, {}
    for key, value in output["results"][name].items():
        metric = key.split(",")[0]  # "acc,none": metric, filter
        if not isinstance(value, int | float):
            continue  # "N/A": a standard error lm-eval did not compute
        if metric in names:
            metrics[metric] = float(value)
        elif metric.removesuffix("_stderr") in names:
            stderr[metric.removesuffix("_stderr")] = float(value)
    n_examples = int(output["n-samples"][name]["effective"])
    return TaskResult(metrics, stderr, n_examples, chance_level(task, n_examples))


def chance_level(task: Any, n_examples: int) -> float | str:
    """Mean of 1/(number of choices) over the evaluated examples of a multiple-choice task;
    a note for open-vocabulary tasks (LAMBADA)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return LAMBADA_CHANCE
    docs = itertools.islice(task.eval_docs, n_examples)
    return statistics.fmean(1 / len(task.doc_to_choice(doc)) for doc in docs)
