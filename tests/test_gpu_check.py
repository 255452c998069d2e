"""benchmarks/gpu_check.py: its parsing and timeouts, and the whole check in --dry-cpu mode."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_counts_reads_the_last_summary_line():
    output = "sss..F\nFAILED tests/x.py::t - boom\n1 failed, 2 passed, 3 skipped, 1 warning in 4.2s"
    assert gpu_check.pytest_counts(output) == {
        "passed": 2,
        "failed": 1,
        "skipped": 3,
        "errors": 0,
    }
    assert gpu_check.pytest_counts("1 error in 0.5s (0:00:00)")["errors"] == 1
    assert gpu_check.pytest_counts("killed")["passed"] == 0


def test_step_timeout_kills_the_run(tmp_path):
    step = gpu_check.Step(
        "sleep", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", {}
    )
    start = time.perf_counter()
    step.start()
    result = step.wait(1.0)
    assert result["status"] == "timeout" and time.perf_counter() - start < 20


def test_run_record_of_a_run_cut_short(tmp_path):
    record = {"status": "running", "metrics": {}, "timing_s": {"load_model": 1.5}, "memory": {}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    log = "window 1/29 blocks 0-1: 100%\rwindow 3/29 blocks 2-3:  40%\r"
    got = gpu_check.run_record(tmp_path, log)
    assert got["window_reached"] == "3/29" and got["ppl"] is None
    assert got["timing_s"] == {"load_model": 1.5} and got["windows_done"] == 0


def test_device_command_is_documented_and_short():
    assert len(gpu_check.DEVICE_COMMAND) < 2000
    assert gpu_check.DEVICE_COMMAND in (ROOT / "docs" / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_cpu_check_writes_a_full_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert gpu_check.main(["--out", str(tmp_path), "--dry-cpu"]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["status"] == "ok" and summary["host"]["dry_cpu"]
    assert summary["tests"]["status"] == "finished"
    assert summary["tests"]["counts"]["failed"] == 0
    assert math.isfinite(summary["model"]["fit_loss_last"])
    assert set(summary["runs"]) == {"cuda-small", "cpu-small", "cuda-paper"}
    for run in summary["runs"].values():
        assert run["status"] == "finished" and run["record_status"] == "finished"
        assert run["wall_s"] > 0 and run["timing_s"]["quantize"] > 0
        assert math.isfinite(run["ppl"]) and run["ppl"] > 1
        assert run["memory"]["peak_rss_mib"] > 0
        assert run["windows_done"] == 3  # 4 blocks, windows of 2 overlapping by 1
    assert summary["runs"]["cuda-paper"]["overrides"][0] == "preset=paper"
    # Both small runs are on the CPU here: the comparison must come out exact.
    assert summary["comparison"]["ppl_rel_diff"] == 0
    assert summary["comparison"]["window0_loss_init_rel_diff"] == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log"} <= files
    assert len(files) <= 8  # what the device tool brings back from $OUT
    assert "| cuda-paper | cpu | finished |" in (tmp_path / "gpu_check.md").read_text()
