"""Reading runs: the records under a sweep, lookups into them, what each measured, and the
labels and reference values of CBQ's components."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from cbq.cbd import WindowConfig
from cbq.cfp import CFPConfig
from cbq.losses import LossConfig
from cbq.methods import METHODS
from cbq.quant.rounding import RoundingConfig
from cbq.results import RESULTS_FILE, ResultRecord

Record = ResultRecord


def load_results(root: Path) -> list[Record]:
    """Every results.json under ``root`` (a run dir or a sweep dir), oldest first."""
    records = [ResultRecord.load(path) for path in root.rglob(RESULTS_FILE)]
    return sorted(records, key=ResultRecord.written_timestamp)


def load_many(roots: Iterable[Path]) -> list[Record]:
    """The runs under several roots, oldest first across all of them; a run under two of
    the roots (nested roots) counts once."""
    seen: dict[str, tuple[float, Record]] = {}
    for root in roots:
        for record in load_results(root):
            assert record.path is not None
            seen[str(record.path.resolve())] = (record.written_timestamp(), record)
    return [record for _, record in sorted(seen.values(), key=lambda item: item[0])]


def setting(record: Record) -> str | None:
    """The column a run belongs to in a results table: ``fp``, or the quant preset."""
    if record.config.get("method", {}).get("name") == "fp":
        return "fp"
    return record.config.get("quant", {}).get("name")


def bits_order(record: Record) -> tuple[bool, float, float, float]:
    """Sort key of a setting: weight-only settings before those that also quantize the
    activations; within each, weight bits, activation bits, then the weight group size
    (per channel, then larger groups), most precise first."""
    a_bits = lookup(record, "quant.a_bits") or 16
    group = lookup(record, "quant.w_group_size")
    return (a_bits < 16, -(lookup(record, "quant.w_bits") or 0), -a_bits, -(group or math.inf))


def lookup(record: Record, dotted: str) -> Any:
    """``quant.name`` style lookups in the config, then in the record; ``setting`` is
    derived (see :func:`setting`)."""
    if dotted == "setting":
        return setting(record)
    for root in (record.config, record.to_json()):
        node: Any = root
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def matching(records: Iterable[Record], conditions: Sequence[str]) -> list[Record]:
    """The runs for which every ``key=value`` condition holds (``model.name=smollm2-135m``,
    ``setting=w4a16``); a value may list alternatives: ``method.name=rtn,cbq``."""
    parsed = []
    for condition in conditions:
        key, sep, values = condition.partition("=")
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE[,VALUE...], got {condition!r}")
        parsed.append((key, set(values.split(","))))
    return [r for r in records if all(str(lookup(r, k)) in allowed for k, allowed in parsed)]


def metric_value(record: Record, metric: str) -> Any:
    """A key of the run's metrics (``ppl/wiki-sample``), else a dotted path into the record
    (``timing_s.quantize``, ``memory.peak_rss_mib``)."""
    value = record.metrics.get(metric)
    return lookup(record, metric) if value is None and "." in metric else value


# --- what a run measured -----------------------------------------------------------------


def method_name(record: Record) -> str | None:
    return lookup(record, "method.name")


def is_cbq(record: Record) -> bool:
    return method_name(record) == "cbq"


def model_setting(record: Record) -> str:
    """``smollm2-135m (w8a8)``: the column group of the ablation tables."""
    return f"{lookup(record, 'model.name')} ({lookup(record, 'quant.name')})"


def ppl_corpora(record: Record) -> list[str]:
    """The corpora a run measured perplexity on, or was configured to (a failed run)."""
    corpora = [key.split("/", 1)[1] for key in record.metrics if key.startswith("ppl/")]
    configured = lookup(record, "data.eval") or []
    for corpus in [configured] if isinstance(configured, str) else configured:
        if corpus not in corpora:
            corpora.append(corpus)
    return corpora


def ppl(record: Record, corpus: str) -> float | None:
    return record.metrics.get(f"ppl/{corpus}")


def zeroshot_metric(key: str) -> tuple[str, str] | None:
    """``zeroshot/<task>/<metric>`` -> (task, metric) for the accuracies of a task, else
    None (stderr, a task's perplexity). lm-eval's ``acc,none`` filter suffix is dropped."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "zeroshot":
        return None
    metric = parts[2].split(",")[0]
    if not metric.startswith("acc") or "stderr" in metric:
        return None
    return parts[1], metric


def zeroshot_info(record: Record) -> dict[str, dict[str, Any]]:
    """Per task, what the run recorded about its examples (count, chance) in ``stats``,
    either as ``zeroshot/<task>/<field>`` keys or as ``stats["zeroshot"][task]``."""
    stats = record.stats
    info: dict[str, dict[str, Any]] = {}
    nested = stats.get("zeroshot")
    if isinstance(nested, dict):
        for task, fields in nested.items():
            if isinstance(fields, dict):
                info.setdefault(task, {}).update(
                    {k: v for k, v in fields.items() if not isinstance(v, dict | list)}
                )
    for key, value in stats.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "zeroshot":
            info.setdefault(parts[1], {})[parts[2]] = value
    return info


def quantize_seconds(record: Record) -> int | None:
    seconds = record.timing_s.get("quantize")
    return None if seconds is None else round(seconds)


def peak_memory(record: Record) -> tuple[str, int | None]:
    """(column name, MiB): the accelerator's peak where one was used, else the peak RSS."""
    memory = record.memory
    if memory.get("peak_cuda_mib") is not None:
        return "peak CUDA (MiB)", round(memory["peak_cuda_mib"])
    rss = memory.get("peak_rss_mib")
    return "peak RSS (MiB)", None if rss is None else round(rss)


def optimizer_steps(record: Record) -> int | None:
    """Optimizer steps of the whole run: as recorded, else windows x epochs x batches."""
    stats = record.stats
    for key in ("optimizer_steps", "steps"):
        if isinstance(stats.get(key), int):
            return stats[key]
    windows = stats.get("windows")
    if not windows:
        return None
    if all("steps" in window for window in windows):
        return sum(window["steps"] for window in windows)
    epochs, samples = lookup(record, "method.epochs"), lookup(record, "data.n_samples")
    batch = lookup(record, "method.batch_size")
    if None in (epochs, samples, batch):
        return None
    return len(windows) * epochs * math.ceil(samples / batch)


def rounding_params(record: Record) -> int | None:
    """Learnable rounding variables per block of the run's own rounding kind; CBQ records
    the counts of both kinds (``{"adaround": n, "lora_r5": m}``)."""
    kind = lookup(record, "rounding.kind")
    if kind == "nearest":
        return 0
    counts = record.stats.get("rounding_params_per_block")
    if not isinstance(counts, dict):
        return counts
    key = "adaround" if kind == "adaround" else f"lora_r{lookup(record, 'rounding.rank')}"
    return counts.get(key)


def window_label(record: Record) -> str:
    """``K=2 ov1``: blocks per window and blocks shared with the next window."""
    size, overlap = lookup(record, "window.size"), lookup(record, "window.overlap")
    return f"K={size}" + (f" ov{overlap}" if overlap else "")


def method_label(record: Record) -> str:
    """The method, and for CBQ its window (Table 3 compares one block at a time to CBD)."""
    name = str(method_name(record))
    return f"{name} {window_label(record)}" if name == "cbq" else name


def label_rank(labels: Sequence[str]) -> Callable[[tuple[Any, ...]], int]:
    """Rows by the first word of their first component, in the order of ``labels``
    (unknown ones last); ties keep the order the rows first appeared in."""

    def rank(key: tuple[Any, ...]) -> int:
        first_word = str(key[0]).split(" ")[0]
        return labels.index(first_word) if first_word in labels else len(labels)

    return rank


def rounding_label(record: Record) -> str:
    """The rounding kind, and ", sigmoid" for the paper's form (offset is the default)."""
    kind = lookup(record, "rounding.kind")
    if kind == "nearest":
        return "nearest (no rounding learning)"
    label = f"lora r={lookup(record, 'rounding.rank')}" if kind == "lora" else None
    label = label or {"adaround": "adaround (full rank)"}.get(kind, str(kind))
    return label + (", sigmoid" if lookup(record, "rounding.form") == "sigmoid" else "")


def loss_label(record: Record) -> str:
    label = str(lookup(record, "loss.kind"))
    label += " +hom" if lookup(record, "loss.homologous") else ""
    return label + (" (relative l2)" if lookup(record, "loss.l2_relative") else "")


def cfp_label(record: Record) -> str:
    """The CFP mode, and the split's variant where it is not the paper's."""
    label, distance = str(lookup(record, "cfp.mode")), lookup(record, "cfp.distance")
    variant = [] if distance in (None, "mean") else [str(distance)]
    variant += ["log"] if lookup(record, "cfp.log_space") else []
    variant += ["migrate"] if lookup(record, "cfp.act_rule") == "migrate" else []
    variant += ["per group"] if lookup(record, "cfp.weight_scope") == "group" else []
    variant += ["to reserved"] if lookup(record, "cfp.clip_to") == "reserved" else []
    return label + (f" ({', '.join(variant)})" if variant else "")


# --- reference values of the CBQ components ------------------------------------------------

# The fields that tell two settings of a component apart (not its hyper-parameters).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "window": ("size", "overlap"),
    "loss": ("kind", "homologous", "l2_relative"),
    "cfp": ("mode", "distance", "log_space", "act_rule", "weight_scope", "clip_to"),
    "rounding": ("kind", "rank", "form"),
}
_DEFAULTS = {
    "window": WindowConfig(),
    "loss": LossConfig(),
    "cfp": CFPConfig(),
    "rounding": RoundingConfig(),
}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def default_component(name: str) -> tuple[Any, ...]:
    return tuple(_plain(getattr(_DEFAULTS[name], part)) for part in COMPONENTS[name])


def component(record: Record, name: str) -> tuple[Any, ...]:
    """A run's setting of a component; a field the run does not record (an older run) at
    its default."""
    values = (lookup(record, f"{name}.{part}") for part in COMPONENTS[name])
    return tuple(
        default if value is None else value
        for value, default in zip(values, default_component(name), strict=True)
    )


COMPONENT_LABELS: dict[str, Callable[[Record], str]] = {
    "window": window_label,
    "loss": loss_label,
    "cfp": cfp_label,
    "rounding": rounding_label,
}


# Method fields that change how a run goes, not its result.
RESULT_NEUTRAL_FIELDS = {"name", "resume", "cache", "forward_batch"}


def method_changes(record: Record) -> list[str]:
    """The method's fields that differ from its config defaults: ``act_order=True``."""
    raw = lookup(record, "method") or {}
    config_class = getattr(METHODS.get(raw.get("name")), "config_class", None)
    if config_class is None:  # not one of ours (the auto-round library's records)
        return []
    defaults = dataclasses.asdict(config_class())
    return [
        f"{key}={value}"
        for key, value in raw.items()
        if key in defaults and key not in RESULT_NEUTRAL_FIELDS and _plain(defaults[key]) != value
    ]


def variant_label(record: Record) -> str:
    """The method with its fields that differ from their defaults, and for CBQ the
    components that differ from the paper's: ``gptq (act_order=True)``, ``cbq (cfp:
    weight_act (migrate))``; ``[eval bf16]`` after a run scored under bf16 autocast. The
    ``--rows variant`` key."""
    name = str(method_name(record))
    changed = method_changes(record)
    if is_cbq(record):
        changed = [
            f"{part}: {COMPONENT_LABELS[part](record)}"
            for part in COMPONENTS
            if component(record, part) != default_component(part)
        ] + changed
    name = f"{name} ({'; '.join(changed)})" if changed else name
    return f"{name} [eval bf16]" if lookup(record, "eval.dtype") == "bfloat16" else name


def references(records: Sequence[Record], table: int | None) -> dict[str, tuple[Any, ...]]:
    """Each component's reference (see the module doc): ``table`` None takes every CBQ run
    as the table's own."""
    own = [
        r
        for r in records
        if is_cbq(r) and (table is None or lookup(r, "experiment.table") == table)
    ]
    chosen = {}
    for name in COMPONENTS:
        values = [component(r, name) for r in own]
        default = default_component(name)
        chosen[name] = default if default in values or not values else _most_common(values)
    return chosen


def _most_common(values: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    return Counter(values).most_common(1)[0][0]


def at_reference(
    records: Sequence[Record], ablates: Sequence[str] = (), table: int | None = None
) -> list[Record]:
    """The runs to show: non-CBQ runs, and CBQ runs whose components other than ``ablates``
    are at their reference."""
    chosen = references(records, table)
    fixed = [name for name in COMPONENTS if name not in ablates]
    return [r for r in records if not is_cbq(r) or all(component(r, n) == chosen[n] for n in fixed)]
