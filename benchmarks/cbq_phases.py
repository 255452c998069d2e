"""Where a CBQ window's time goes: a per-phase breakdown on the first blocks of a model.

The packaged model is cut to its first ``--blocks`` blocks and CBQ runs with its defaults
(K=2, overlap 1, CFP weight_act, full-rank offset rounding, homologous L2+KL) on the
preset=cpu calibration (16 x 256 tokens of wiki-sample, seed 0) at W3 g128. The trainer's
and the pipeline's phases are timed by wrapping their methods; each variant is one run, side
by side in one process:

- ``cbq``: the defaults (48 steps of one sequence a window);
- ``cbq-fb1``: the same with one sequence per no-grad pass (``method.forward_batch=1``);
- ``cbq-25x8`` / ``autoround-25x8``: CBQ and AutoRound (``method=autoround``: windows of one
  block, L2 only, no CFP, clipping factors) at the same 25 steps of batches of 8 a window.

    python -m benchmarks.cbq_phases [--blocks 3] [--variants cbq cbq-fb1 cbq-25x8 autoround-25x8]

Phases (seconds over the whole run, inclusive of what they call):
- prepare: CFP (activation scaling, weight truncation), FP copies, wrapping, ranges;
- FP stream: the FP blocks on the FP stream (targets; once per block);
- homologous targets: the FP blocks on the quantized stream, once per window;
- training: the optimizer steps (train minus scoring);
- scoring: the whole-calibration-set distances (initial, hardened, best iterate);
- commit: hardening and materializing;
- q stream: the quantized stream through the committed blocks (the pipeline's);
- checkpoint: writing the checkpoint (the pipeline's).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from benchmarks.common import first_blocks
from cbq.cbd import CBDTrainer, TrainerKnobs, TrainerSettings
from cbq.config import Config, QuantConfig
from cbq.methods.autoround import AutoRound, AutoRoundConfig
from cbq.models import adapter_for
from cbq.pipeline import BlockPipeline

W3G128 = QuantConfig(name="w3a16g128", w_bits=3, w_granularity="per_group", w_group_size=128)
VARIANTS: dict[str, Callable[[], TrainerSettings]] = {
    "cbq": TrainerSettings,
    "cbq-fb1": lambda: TrainerSettings(knobs=TrainerKnobs(forward_batch=1)),
    "cbq-25x8": lambda: TrainerSettings(knobs=TrainerKnobs(iters=25, batch_size=8)),
    "autoround-25x8": lambda: AutoRound(AutoRoundConfig(iters=25), Config(quant=W3G128)).settings(),
}


@contextmanager
def timed(trainer: CBDTrainer, totals: dict[str, float]) -> Iterator[None]:
    """Wrap the trainer's and the pipeline's phase methods so that their time adds up in
    ``totals``; the pipeline's are restored on exit."""
    with ExitStack() as stack:

        def wrap(owner: Any, method: str, phase: Callable[..., str]) -> None:
            original = getattr(owner, method)

            def timed_call(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    totals[phase(*args, **kwargs)] += time.perf_counter() - started

            stack.enter_context(patch.object(owner, method, timed_call))

        wrap(trainer, "_prepare", lambda *a: "prepare")
        wrap(trainer, "_fp_output", lambda *a: "FP stream")
        wrap(trainer, "_fp_range", lambda *a: "homologous targets")
        wrap(trainer, "_train", lambda *a: "train")
        wrap(trainer, "_sample_distances", lambda *a: "scoring")
        wrap(trainer, "_commit", lambda *a: "commit")
        wrap(BlockPipeline, "_advance", lambda *a: "q stream")
        wrap(BlockPipeline, "_save", lambda *a: "checkpoint")
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    base, calib = first_blocks(args.model, args.blocks)
    runs: dict[str, dict[str, float]] = {}
    for variant in args.variants:
        totals: dict[str, float] = defaultdict(float)
        settings = VARIANTS[variant]()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = CBDTrainer(
                adapter_for(copy.deepcopy(base)),
                W3G128,
                settings,
                torch.device("cpu"),
                Path(run_dir),
            )
            with timed(trainer, totals):
                started = time.perf_counter()
                trainer.run(calib)
                totals["whole run"] = time.perf_counter() - started
        totals["training"] = totals.pop("train") - totals["scoring"]
        runs[variant] = totals

    print(
        f"{args.model}, first {args.blocks} blocks, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, 16 x 256 calibration tokens, W3 g128\n"
    )
    print("| phase | " + " | ".join(f"{v} (s)" for v in runs) + " |")
    print("|---|" + "---|" * len(runs))
    order = ["prepare", "FP stream", "homologous targets", "training", "scoring", "commit"]
    for phase in [*order, "q stream", "checkpoint", "whole run"]:
        cells = " | ".join(f"{runs[v].get(phase, 0.0):.2f}" for v in runs)
        print(f"| {phase} | {cells} |")


if __name__ == "__main__":
    main()
