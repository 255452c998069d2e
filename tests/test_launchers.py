"""Sweep launchers (conf/hydra/launcher/): the configs compose, and a two-job multirun of a
tiny model runs through joblib and a local Ray. Each launcher's test skips when its Hydra
plugin (an optional extra: ``.[joblib]``, ``.[ray]``, ``.[slurm]``) is not installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from cbq.config import register_configs

from helpers import run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
LAUNCHERS = ("local_parallel", "slurm", "ray_local", "ray_cluster")
PLUGINS = {
    "local_parallel": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "ray_local": "hydra_plugins.hydra_ray_launcher",
    "ray_cluster": "hydra_plugins.hydra_ray_launcher",
}
TARGETS = {
    "local_parallel": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "ray_local": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "ray_cluster": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
}


def hydra_cfg(*overrides: str) -> DictConfig:
    """The composed config of ``python -m cbq``, with its ``hydra`` node."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def launcher_options() -> list[str]:
    """The options of the hydra/launcher group that Hydra sees from conf/."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.get_group_options("hydra/launcher")


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a multirun: offline, no pytest variables, no thread count (each
    launcher sets its jobs' own), then ``extra``."""
    drop = ("PYTEST", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", **extra}


def multirun(launcher: str, sweep_dir: Path, model_dir: Path, corpus: Path, *extra: str) -> list:
    """Runs ``method=fp,rtn`` through ``hydra/launcher=<launcher>``; the jobs' results.json
    records, by job number."""
    command = [
        sys.executable,
        "-m",
        "cbq",
        "-m",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        "method=fp,rtn",
        *run_overrides(model_dir, corpus, max_eval_windows=4),
        *extra,
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=job_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = sorted(sweep_dir.glob("*/results.json"))
    return [json.loads(path.read_text()) for path in paths]


def assert_finished(records: list[dict], corpus: Path) -> None:
    """Both jobs ran to the end with a finite perplexity."""
    assert [r["config"]["method"]["name"] for r in records] == ["fp", "rtn"]
    for record in records:
        assert record["status"] == "finished"
        assert math.isfinite(record["metrics"][f"ppl/{corpus.stem}"])


def test_launcher_configs_are_in_the_search_path():
    assert set(LAUNCHERS) <= set(launcher_options())


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_config_composes(launcher):
    pytest.importorskip(PLUGINS[launcher])
    cfg = hydra_cfg(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_ == TARGETS[launcher]


def test_slurm_jobs_get_one_thread_per_cpu():
    pytest.importorskip(PLUGINS["slurm"])
    launcher = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=6").hydra.launcher
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    assert "export OMP_NUM_THREADS=6" in launcher.setup


def test_joblib_multirun_runs_both_jobs(saved_tiny_model, tiny_corpus, tmp_path):
    pytest.importorskip(PLUGINS["local_parallel"])
    from joblib import cpu_count

    records = multirun(
        "local_parallel",
        tmp_path / "sweep",
        saved_tiny_model("opt"),
        tiny_corpus,
        "hydra.launcher.n_jobs=2",
    )
    assert_finished(records, tiny_corpus)
    # loky workers share the cores: cpu_count // n_jobs torch threads each
    assert {r["host"]["cpu_threads"] for r in records} == {max(cpu_count() // 2, 1)}


def test_ray_local_multirun_runs_both_jobs(saved_tiny_model, tiny_corpus, tmp_path):
    pytest.importorskip(PLUGINS["ray_local"])
    records = multirun(
        "ray_local",
        tmp_path / "sweep",
        saved_tiny_model("opt"),
        tiny_corpus,
        "hydra.launcher.ray.init.num_cpus=2",
    )
    assert_finished(records, tiny_corpus)
    # a job of num_cpus=1 runs one torch thread
    assert {r["host"]["cpu_threads"] for r in records} == {1}
