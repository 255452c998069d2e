"""The ``auto-round`` library on this project's calibration and evaluation windows.

    make peers   # once: the library in its own venv (.venv-peers), the project's pins intact
    python -m benchmarks.autoround_library model=smollm2-135m quant=w3a16g128 preset=cpu \\
        method=autoround_cpu "data.eval=[wiki-sample,lee-news]" hydra.run.dir=<dir>

Takes the usual run overrides. It draws the calibration windows a run with them draws, hands
them to the library (``benchmarks/peers/autoround_library.py``, with ``method=autoround``'s
iters and batch size and the quant's bits and group size, asymmetric), and scores the
library's fake-quantized checkpoint with the project's own perplexity code, through
``cbq.run`` (``method=fp`` on that checkpoint). The results.json it leaves in the run dir
is then relabelled ``method.name=autoround_lib``, with the library's quantize time and the
calibration it got, so that ``cbq.report`` puts it beside ``method=autoround``.

``--rope-per-layer`` (Gemma-3) corrects the library's rotary tables, block by block; the record
is then ``autoround_lib_rope``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbq.config import register_configs
from cbq.data import calibration_batch
from cbq.methods import method_config
from cbq.models.loader import load_model
from cbq.results import ResultRecord
from cbq.run import calibration_record, run
from cbq.validation import validate

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "autoround_library.py"
LABEL = "autoround_lib"
# Gemma-3 only: the library's block inputs carry the first block's rotary table to every block
# (benchmarks/peers/autoround_library.py, rope_per_layer); this flag corrects that.
ROPE_FLAG = "--rope-per-layer"


def compose_run(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str]) -> None:
    if not PEERS_PYTHON.exists():
        sys.exit(f"{PEERS_PYTHON} is missing: run `make peers` first")
    run_dir = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), ""))
    if not str(run_dir):
        sys.exit("give hydra.run.dir=<dir> (the library's checkpoint and the record go there)")
    rope_fix = ROPE_FLAG in argv
    overrides = [a for a in argv if not a.startswith("hydra.") and a != ROPE_FLAG]
    cfg = validate(compose_run(overrides))
    method = method_config(cfg.method)
    if method.name != "autoround":
        sys.exit("method= must be autoround or autoround_cpu (its iters and batch size are used)")
    quant = cfg.quant.weight_spec()
    if cfg.quant.act_spec().enabled:
        sys.exit(f"quant={cfg.quant.name}: the library comparison is for weight-only settings")
    model_dir = run_dir / "library_model"
    cache = Path(cfg.model.cache_dir).expanduser()
    _, tokenizer = load_model(cfg.model.name, cfg.model.path, cache_dir=cache)
    calib = calibration_batch(
        cfg.data.calib,
        tokenizer,
        n_samples=cfg.data.n_samples,
        seqlen=cfg.data.seqlen,
        seed=cfg.data.seed,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(calib, run_dir / "calib_ids.pt")
    source = Path(cfg.model.path) if cfg.model.path else cache / cfg.model.name
    group = quant.group_size if quant.group_size else -1
    subprocess.run(
        [
            str(PEERS_PYTHON), str(PEER_SCRIPT),
            "--model", str(source), "--calib", str(run_dir / "calib_ids.pt"),
            "--out", str(model_dir), "--bits", str(quant.bits), "--group-size", str(group),
            "--iters", str(method.iters), "--batch-size", str(method.batch_size),
            "--seed", str(cfg.seed),
        ] + (["--sym"] if quant.symmetric else []) + ([ROPE_FLAG] if rope_fix else []),
        check=True,
        env=os.environ | {"PYTHONPATH": ""},
    )  # fmt: skip
    peer = json.loads((model_dir / "peer.json").read_text())
    scored = compose_run(
        [*overrides, "method=fp", f"model.path={model_dir}", f"model.name={cfg.model.name}"]
    )
    run(scored, run_dir)
    relabel(run_dir / "results.json", cfg, method, peer, rope_fix)


def relabel(path: Path, cfg, method, peer: dict, rope_fix: bool = False) -> None:
    """The fp-run record of the library's checkpoint, as a record of the library's method."""
    record = ResultRecord.load(path)
    record.config["method"] = {
        "name": LABEL + ("_rope" if rope_fix else ""),
        "iters": method.iters,
        "batch_size": method.batch_size,
        "library": f"{peer['library']}=={peer['version']}",
        "rope_per_layer": rope_fix,
    }
    record.config["quant"] = OmegaConf.to_container(OmegaConf.structured(cfg.quant))
    record.calibration = calibration_record(cfg, True)
    record.timing_s["quantize"] = peer["quantize_s"]
    record.save(path)


if __name__ == "__main__":
    main(sys.argv[1:])
