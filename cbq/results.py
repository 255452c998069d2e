"""The run record: metrics, config, phase timings, memory and provenance -> results.json.

The file is written atomically (temporary file + rename), so a reader never sees half a
record, and rewritten after every phase, so an interrupted run still leaves what it did.
Each save stamps ``written_at`` (UTC), which orders runs when a later run of the same cell
replaces an earlier one, also in copies whose file times were lost (a git clone).

``python -m cbq.results archive <sweep dirs> --to DIR`` copies the finished runs' records,
and nothing else, into ``DIR/<sweep name>/...``, for committing next to the tables in docs/.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

from cbq.files import atomic_write

RESULTS_FILE = "results.json"
TRACKED_PACKAGES = ("cbq", "torch", "transformers", "lm-eval", "hydra-core", "datasets", "wandb")


class Status(StrEnum):
    running = "running"
    finished = "finished"
    failed = "failed"
    skipped = "skipped"  # a sweep job not worth running (cbq.sweep), with its reason


@dataclass
class ResultRecord:
    """One run's ``results.json``, typed: what :class:`RunRecord` writes and what
    ``cbq.report`` reads. Fields a record does not have (an older run's) take their defaults;
    keys this class does not know are kept in ``extra`` and written back as they were."""

    status: Status = Status.running
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    calibration: dict[str, Any] | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    written_at: str | None = None
    error: str | None = None
    reason: str | None = None  # why a skipped job was skipped
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the record was read from (not written).
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> ResultRecord:
        known = {f.name for f in fields(cls)} - {"extra", "path"}
        values = {key: value for key, value in data.items() if key in known}
        values["status"] = Status(values.get("status", Status.running))
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**values, extra=extra, path=path)

    @classmethod
    def load(cls, path: Path) -> ResultRecord:
        """The record in ``path`` (a results.json); ``path`` is set to its run dir."""
        return cls.from_json(json.loads(path.read_text()), path.parent)

    def to_json(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "path")
        }
        data["status"] = self.status.value
        for optional in ("error", "reason"):
            if data[optional] is None:
                del data[optional]
        return data | self.extra

    def save(self, path: Path) -> None:
        """Write atomically to ``path``, stamping ``written_at``."""
        self.written_at = utc_stamp()
        write_json_atomic(path, self.to_json())

    def written_timestamp(self) -> float:
        """When the record was last written: its stamp, else its file's mtime."""
        if self.written_at:
            return datetime.fromisoformat(self.written_at).timestamp()
        if self.path is None:
            return 0.0
        return (self.path / RESULTS_FILE).stat().st_mtime


def utc_stamp(timestamp: float | None = None) -> str:
    """``timestamp`` (seconds since the epoch; default: now) as an ISO 8601 UTC string."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


@functools.cache
def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the cbq checkout; nulls outside a git checkout. Read once per
    process: a multirun's later jobs run the code its first job loaded, whatever the checkout
    has become since."""
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def process_peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


class RSSSampler:
    """Peak RSS of this run alone: the process peak never resets, and a Hydra multirun runs
    every job in one process, so the run's own peak is sampled in a background thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_skipped(run_dir: Path, config: dict[str, Any], reason: str) -> Path:
    """The record of a sweep job that was not run, and why (see :mod:`cbq.sweep`)."""
    path = run_dir / RESULTS_FILE
    record = ResultRecord(
        Status.skipped, reason=reason, versions=package_versions(), git=git_state(), config=config
    )
    record.save(path)
    return path


class RunRecord:
    """Accumulates one run's results and keeps ``results.json`` up to date."""

    def __init__(
        self, run_dir: Path, config: dict[str, Any], seed: int, calibration: dict[str, Any]
    ):
        self.path = run_dir / RESULTS_FILE
        self.rss = RSSSampler()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.record = ResultRecord(
            seed=seed,
            calibration=calibration,
            versions=package_versions(),
            git=git_state(),
            host={"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
            config=config,
        )
        self.save()

    @property
    def metrics(self) -> dict[str, float]:
        return self.record.metrics

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (model load, calibration, quantization, eval) and save afterwards."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record.timing_s[name] = round(time.perf_counter() - start, 3)
            self._update_memory()
            self.save()

    def add_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self.save()

    def add_stats(self, stats: dict[str, Any]) -> None:
        self.record.stats.update(stats)
        self.save()

    def finish(self, status: Status = Status.finished, error: str | None = None) -> None:
        self.record.status = status
        self.record.error = error or None
        timing = self.record.timing_s
        timing["total"] = round(sum(v for k, v in timing.items() if k != "total"), 3)
        self._update_memory()
        self.rss.stop()
        self.save()

    def _update_memory(self) -> None:
        memory = self.record.memory
        memory["peak_rss_mib"] = round(self.rss.peak_mib, 1)
        memory["process_peak_rss_mib"] = round(process_peak_rss_mib(), 1)
        if torch.cuda.is_available():
            memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def save(self) -> None:
        self.record.save(self.path)


def archive(sweeps: list[Path], destination: Path) -> list[Path]:
    """Copy each finished run's results.json under ``sweeps`` to ``destination/<sweep
    name>/<its path in the sweep>``. A record without a ``written_at`` stamp (older runs)
    gets one from its file's mtime, so the copies keep their order."""
    copied = []
    for sweep in sweeps:
        for source in sorted(sweep.rglob(RESULTS_FILE)):
            record = ResultRecord.load(source)
            if record.status is not Status.finished:
                continue
            record.written_at = record.written_at or utc_stamp(source.stat().st_mtime)
            target = destination / sweep.name / source.relative_to(sweep)
            write_json_atomic(target, record.to_json())
            shutil.copystat(source, target)
            copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cbq.results", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    archive_parser = commands.add_parser("archive", help="copy finished runs' results.json")
    archive_parser.add_argument("sweeps", nargs="+", type=Path)
    archive_parser.add_argument("--to", type=Path, required=True, dest="destination")
    args = parser.parse_args(argv)
    copied = archive(args.sweeps, args.destination)
    print(f"archived {len(copied)} finished runs into {args.destination}")


if __name__ == "__main__":
    main()
