"""Calibration-side knob search for CBQ's learned parts on the first blocks of a packaged model.

    python -m benchmarks.rounding_slice '[{"rounding": {"kind": "lora"}, "optimizer": "signsgd"}]'

Each JSON object is a set of ``TrainerKnobs`` fields plus ``rounding``, ``loss`` and ``window``
(``RoundingConfig``, ``LossConfig`` and ``WindowConfig`` fields). The model is cut to its first
``--blocks`` blocks; CBQ runs on ``--n-samples`` x ``--seqlen`` calibration tokens of
wiki-sample (seed 0; default 16 x 256, the preset=cpu calibration) with CFP off, and each try
prints its hardened window losses, initial losses, share of weights moved and kept steps, one
JSON line a try; ``--heldout N`` adds the slice's output error on N other calibration-part windows
(seed 1). Only calibration data is used: this is where knobs are chosen, never the evaluation
text (docs/cbq_components.md lists the tries).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from cbq.cbd import CBDTrainer, TrainerKnobs, TrainerSettings, WindowConfig
from cbq.config import CFPConfig, CFPMode, QuantConfig, RoundingConfig
from cbq.data import calibration_batch
from cbq.losses import LossConfig, LossKind
from cbq.models import adapter_for
from cbq.models.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tries", help="a JSON list of knob sets")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="also score the slice's output on this many other windows of the calibration "
        "part (seed 1): relative MSE against the FP slice, the knob choice's held-out measure",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, tokenizer = load_model(args.model, None, cache_dir=Path("~/.cache/cbq").expanduser())
    layers = base.model.layers
    base.model.layers = layers[: args.blocks]
    base.config.num_hidden_layers = args.blocks
    calib = calibration_batch(
        "wiki-sample", tokenizer, n_samples=args.n_samples, seqlen=args.seqlen, seed=0
    )
    heldout = (
        calibration_batch(
            "wiki-sample", tokenizer, n_samples=args.heldout, seqlen=args.seqlen, seed=1
        )
        if args.heldout
        else None
    )
    fp_out = None if heldout is None else _slice_output(base, heldout)
    quant = QuantConfig(
        name=f"w{args.bits}a16g{args.group_size}",
        w_bits=args.bits,
        w_granularity="per_group",
        w_group_size=args.group_size,
    )
    for knobs in json.loads(args.tries):
        rounding = RoundingConfig(**knobs.pop("rounding", {}))
        loss, window = knobs.pop("loss", {}), knobs.pop("window", {})
        settings = TrainerSettings(
            window=WindowConfig(**window),
            loss=LossConfig(**{**loss, "kind": LossKind(loss.get("kind", LossKind.l2_kl))}),
            knobs=TrainerKnobs(**knobs),
            rounding=rounding,
            cfp=CFPConfig(mode=CFPMode.none),
        )
        model, started = copy.deepcopy(base), time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = CBDTrainer(
                adapter_for(model), quant, settings, torch.device("cpu"), Path(run_dir)
            )
            windows = trainer.run(calib)["windows"]
        scores = {} if heldout is None else {"heldout_rel_mse": _rel_mse(model, heldout, fp_out)}
        print(
            json.dumps(
                {
                    **scores,
                    "knobs": knobs,
                    "loss": loss,
                    "window": window,
                    "rounding": {"kind": rounding.kind.value, "rank": rounding.rank},
                    "loss_hard": [round(w["loss_hard"], 3) for w in windows],
                    "loss_init": [round(w["loss_init"], 3) for w in windows],
                    "moved": [round(w.get("rounding_moved_fraction", 0.0), 3) for w in windows],
                    "best_step": [w.get("best_step") for w in windows],
                    "seconds": round(time.perf_counter() - started),
                }
            ),
            flush=True,
        )


@torch.no_grad()
def _slice_output(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.model(t[None]).last_hidden_state for t in tokens])


def _rel_mse(model: torch.nn.Module, tokens: torch.Tensor, reference: torch.Tensor) -> float:
    error = (_slice_output(model, tokens) - reference).pow(2).mean()
    return round(float(error / reference.pow(2).mean()), 5)


if __name__ == "__main__":
    main()
