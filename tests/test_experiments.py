"""Paper tables as multiruns (experiments/experiment/*.yaml), and which sweep jobs run."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbq.config import EXPERIMENTS_DIR, Config, ConfigError, register_configs
from cbq.methods import METHODS
from cbq.run import tracking_labels
from cbq.sweep import skip_reason, swept_axes
from cbq.validation import validate

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TABLES = sorted(p.stem for p in (EXPERIMENTS_DIR / "experiment").glob("table*.yaml"))


def table_config(table: str, *overrides: str, hydra: bool = True):
    """The composed config of ``+experiment=<table>``; with Hydra's node (sweeper params) or
    without (a job's config, as the run sees it)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"+experiment={table}", *overrides],
            return_hydra_config=hydra,
        )


def expand_jobs(cfg) -> list[list[str]]:
    """The overrides of every job the table's sweep launches (Hydra's basic sweeper)."""
    params = cfg.hydra.sweeper.params
    axes = [
        [f"{key}={value}" for value in swept_axes([f"{key}={params[key]}"]).get(key, [params[key]])]
        for key in params
    ]
    return [list(job) for job in itertools.product(*axes)]


def test_there_is_one_experiment_per_paper_table():
    assert [name[: len("tableN")] for name in TABLES] == [f"table{n}" for n in range(1, 8)]


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("table", TABLES)
def test_every_value_of_every_table_validates(table, scale):
    """Each swept value, in one job each (validating the whole product takes minutes)."""
    jobs = expand_jobs(table_config(table, f"experiment.scale={scale}"))
    assert jobs
    first_job_with = {value: tuple(job) for job in reversed(jobs) for value in job}
    for job in sorted(set(first_job_with.values())):
        cfg = validate(table_config(table, f"experiment.scale={scale}", *job, hydra=False))
        assert cfg.experiment.table == int(table[len("table")])
        assert cfg.experiment.scale == scale
        assert cfg.logger.group == f"{table}-{scale}"
        if scale == "cpu":
            assert cfg.model.name in ("smollm2-135m", "gemma3-270m")
            assert cfg.data.calib == "wiki-sample" and cfg.data.n_samples == 16


def test_table4_sweeps_the_window_at_the_papers_setting():
    jobs = expand_jobs(table_config("table4_window", "experiment.scale=paper"))
    assert [j[-1] for j in jobs] == [
        f"window={w}"
        for w in ("k1_overlap0", "k2_overlap0", "k2_overlap1", "k4_overlap0", "k4_overlap2")
    ]
    assert all("model=bloom-1b7" in j and "quant=w8a8" in j for j in jobs)


def test_an_unknown_scale_names_the_allowed_ones():
    cfg = table_config("table4_window", "experiment.scale=gpu")
    with pytest.raises(
        Exception, match=re.escape("experiment.scale: 'gpu' is not allowed; allowed: paper, cpu")
    ):
        OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)


def test_plain_runs_have_no_experiment():
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = validate(compose(config_name="config"))
    assert cfg.experiment.name is None and not cfg.experiment.scales


def test_a_direct_bad_scale_is_rejected_by_validation():
    cfg = OmegaConf.structured(Config)
    cfg.experiment.scales = {"cpu": {"model": "smollm2-135m"}}
    cfg.experiment.scale = "tpu"
    with pytest.raises(
        ConfigError, match=re.escape("experiment.scale: 'tpu' is not allowed; allowed: cpu")
    ):
        validate(cfg)


def _config(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def test_swept_axes_keeps_only_sweeps_and_the_last_override_wins():
    axes = swept_axes(
        ["quant=w4a16,w8a8", "method=cbq", "window=k1_overlap0,k2_overlap1", "window=k1_overlap0"]
    )
    assert axes == {"quant": ["w4a16", "w8a8"]}


def test_fp_runs_once_per_sweep_over_quant():
    axes = {"quant": ["w4a16", "w8a8"], "method": ["fp", "rtn"]}
    assert (
        skip_reason(_config("method=fp", "quant=w4a16"), METHODS["fp"], {"quant": "w4a16"}, axes)
        is None
    )
    reason = skip_reason(_config("method=fp", "quant=w8a8"), METHODS["fp"], {"quant": "w8a8"}, axes)
    assert reason == "fp does not read quant: it runs once, at quant=w4a16"
    assert (
        skip_reason(_config("method=rtn", "quant=w8a8"), METHODS["rtn"], {"quant": "w8a8"}, axes)
        is None
    )


def test_only_cbq_runs_for_every_window():
    axes = {"window": ["k1_overlap0", "k2_overlap1"]}
    choices = {"window": "k2_overlap1"}
    assert skip_reason(_config("method=cbq"), METHODS["cbq"], choices, axes) is None
    assert "gptq does not read window" in skip_reason(
        _config("method=gptq"), METHODS["gptq"], choices, axes
    )


@pytest.mark.parametrize(
    ("method", "quant", "skipped"),
    [
        ("awq", "w4a8", True),
        ("awq", "w4a16", False),
        ("osplus", "w4a16", True),
        ("smoothquant", "w8a8", False),
        ("gptq", "w4a4", False),
    ],
)
def test_methods_outside_their_purpose_are_skipped_in_sweeps(method, quant, skipped):
    reason = skip_reason(_config(f"method={method}", f"quant={quant}"), METHODS[method], {}, {})
    assert (reason is not None) == skipped


def test_wandb_group_and_tags():
    cfg = _config("method=cbq", "quant=w4a8", "logger.group=ablation", "+logger.tags=[mine]")
    assert tracking_labels(cfg) == ("ablation", ["smollm2-135m", "w4a8", "cbq", "mine"])
    fp = _config("method=fp", "quant=w4a8")
    assert tracking_labels(fp) == (None, ["smollm2-135m", "fp"])


def test_the_main_table_gives_every_method_the_same_calibration_and_protocol():
    jobs = expand_jobs(table_config("main_weight_only"))
    methods = {arg.split("=", 1)[1] for job in jobs for arg in job if arg.startswith("method=")}
    assert methods == {"fp", "rtn", "gptq", "awq", "omniquant_cpu", "autoround_cpu", "cbq"}
    for job in (jobs[0], jobs[-1]):
        cfg = validate(table_config("main_weight_only", *job, hydra=False))
        assert (cfg.data.n_samples, cfg.data.seqlen, cfg.data.eval_seqlen) == (32, 512, 512)
        assert cfg.data.calib == "wiki-sample"
        assert list(cfg.data.eval) == ["wiki-sample", "lee-news"]
