"""End-to-end runs through the Hydra entry point on tiny models and a small text file."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cbq.report import format_value
from cbq.report import main as report_main
from cbq.results import ResultRecord, Status
from cbq.run import run

from helpers import run_overrides

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["opt", "bloom", "llama", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp_and_rtn_run_on_every_adapter(tiny_run, tiny_corpus, tmp_path, family):
    fp, _ = tiny_run(family, "method=fp", run_dir=tmp_path / "fp")
    rtn, _ = tiny_run(family, "method=rtn", "quant=w2a16g64", run_dir=tmp_path / "rtn")
    (metric,) = fp
    assert metric == f"ppl/{tiny_corpus.stem}"
    assert 1.0 < fp[metric] < 1e4
    assert rtn[metric] != pytest.approx(fp[metric], rel=1e-4)  # quantization changed the model


def test_static_activation_rtn_calibrates(tiny_run, tiny_corpus):
    metrics, record = tiny_run("llama", "method=rtn", "quant=w8a8")
    assert record["status"] == "finished"
    assert record["calibration"] == {
        "corpus": str(tiny_corpus),
        "n_samples": 4,
        "seqlen": 32,
        "seed": 0,
    }
    assert set(record["timing_s"]) >= {"load_model", "calibration_data", "quantize", "eval_ppl"}
    assert all(value >= 0 for value in record["timing_s"].values())
    assert metrics == record["metrics"]


def test_results_file_records_provenance(tiny_run):
    _, record = tiny_run("opt", "method=rtn", "seed=7")
    assert record["seed"] == 7 and record["config"]["data"]["seed"] == 7
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["versions"]["cbq"] == "0.1.0"
    assert record["git"]["sha"] is None or len(record["git"]["sha"]) == 40
    written = datetime.fromisoformat(record["written_at"])
    assert abs((datetime.now(UTC) - written).total_seconds()) < 600
    assert 10 < record["memory"]["peak_rss_mib"] <= record["memory"]["process_peak_rss_mib"] + 1
    assert record["config"]["quant"]["name"] == "w4a16"
    assert record["calibration"]["corpus"] is None  # weight-only RTN draws no calibration data


def test_the_report_reads_the_record_the_writer_wrote(tiny_run, tmp_path):
    """The typed record is the writer's and the reader's: a real run's file reads back into
    it and writes out unchanged, with nothing left over in ``extra``."""
    _, written = tiny_run("llama", "method=rtn", "quant=w8a8")
    record = ResultRecord.load(tmp_path / "results.json")
    assert record.to_json() == written and record.extra == {}
    assert record.status is Status.finished and record.path == tmp_path
    assert record.metrics == written["metrics"] and record.stats == written["stats"]


def test_failed_run_is_recorded(compose_cfg, tiny_corpus, tmp_path):
    cfg = compose_cfg(run_overrides(tmp_path / "missing-model", tiny_corpus, "method=fp"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises
        run(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and record["error"]


def test_cli_multirun_writes_results_and_offline_wandb(
    saved_tiny_model, tiny_corpus, tmp_path, capsys
):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "cbq",
        "-m",
        "method=fp,rtn",
        "quant=w3a16,w4a16",
        *run_overrides(saved_tiny_model("llama"), tiny_corpus, logger="wandb_offline"),
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_env(), "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.rglob("results.json")]
    outcome = {(r["config"]["method"]["name"], r["config"]["quant"]["name"]): r for r in records}
    assert {key: r["status"] for key, r in outcome.items()} == {
        ("fp", "w3a16"): "finished",
        ("fp", "w4a16"): "skipped",  # fp does not read quant: it runs once per sweep
        ("rtn", "w3a16"): "finished",
        ("rtn", "w4a16"): "finished",
    }
    assert "fp does not read quant" in outcome["fp", "w4a16"]["reason"]
    assert list(sweep_dir.rglob("offline-run-*")), "W&B offline files should be in the run dir"
    _assert_summary_renders(sweep_dir, outcome, capsys)


def _assert_summary_renders(sweep_dir: Path, outcome: dict, capsys) -> None:
    """``cbq.report --runs`` (the table ``make run`` ends with) reads what the runs wrote."""
    report_main([str(sweep_dir), "--runs"])
    header, _, *rows = capsys.readouterr().out.strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["model", "setting", "variant", "status"]
    assert "quantize (s)" in columns and columns[-2:] == ["total (s)", "peak RSS (MiB)"]
    cells = {
        (row[2], row[1]): dict(zip(columns, row, strict=True))
        for row in ([c.strip() for c in line.strip("|").split("|")] for line in rows)
    }
    rtn = outcome["rtn", "w3a16"]
    assert cells["rtn", "w3a16"]["status"] == "finished"
    metric = next(k for k in rtn["metrics"] if k.startswith("ppl/"))
    assert cells["rtn", "w3a16"][metric] == format_value(rtn["metrics"][metric])
    assert cells["rtn", "w3a16"]["total (s)"] == format_value(rtn["timing_s"]["total"])
    assert cells["fp", "fp"]["status"] == "finished"
    assert len(rows) == 3  # the skipped job is left out


def test_cli_rejects_bad_config_before_loading(tmp_path):
    command = [
        sys.executable,
        "-m",
        "cbq",
        "quant.w_bits=12",
        "model.path=/nonexistent",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=_clean_env()
    )
    assert result.returncode != 0
    assert "quant.w_bits: 12 is not allowed; allowed: 2..8, or 16" in result.stderr
    assert not (tmp_path / "results.json").exists()  # failed before anything was loaded


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {
        "HF_HUB_OFFLINE": "1",
        "WANDB_SILENT": "true",
    }


def test_cbq_method_runs_through_hydra(tiny_run, tiny_corpus, tmp_path):
    metrics, record = tiny_run(
        "opt",
        "method=cbq",
        "quant=w4a8",
        "method.epochs=1",
        "window=k2_overlap1",
        "rounding=lora",
        "cfp=weight_act",
    )
    assert record["status"] == "finished" and metrics[f"ppl/{tiny_corpus.stem}"] > 1
    assert record["stats"]["windows"] and not (tmp_path / "checkpoint").exists()  # finished
    assert (
        record["stats"]["rounding_params_per_block"]["adaround"]
        > record["stats"]["rounding_params_per_block"]["lora_r5"]
    )
