"""Quantizing a model larger than the memory the process may use (``model.lazy=true``,
issue #13): peak RSS against depth, under an enforced memory limit.

A synthetic Llama-architecture model (random weights, SmolLM2's tokenizer and vocabulary,
blocks of one width) is written as a sharded safetensors checkpoint, one shard per block, for
each depth. Each run is a ``python -m cbq`` subprocess placed in a cgroup (v1 or v2) whose
memory limit is ``--limit-gib``; a run that goes over is killed by the kernel and reported as
such. The default width (hidden 2048, MLP 6912, 32 blocks) is 2.0B parameters: 8 GB of fp32
weights against a 4 GiB limit. Eager (``model.lazy=false``) runs are made without the limit
where the model fits in RAM, for comparison.

    python -m benchmarks.lazy_memory [--depths 8 16 32] [--methods rtn gptq cbq] \\
        [--limit-gib 4] [--eager-depths 8] [--workdir /tmp/cbq-lazy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from cbq.models.loader import packaged_model_dir

CACHE = Path("~/.cache/cbq").expanduser()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GIB = 2**30
# Short runs: the point is memory, not quality.
RUN_OVERRIDES = [
    "quant=w4a16",
    "data.calib=wiki-sample",
    "data.eval=[wiki-sample]",
    "data.n_samples=4",
    "data.seqlen=128",
    "data.eval_seqlen=128",
    "data.max_eval_windows=2",
    "logger=disabled",
]
METHOD_OVERRIDES = {
    "rtn": ["method=rtn"],
    "gptq": ["method=gptq"],
    "cbq": ["method=cbq", "method.iters=2", "method.forward_batch=4"],
    # LoRA rounding: a window's rounding variables (and their gradients) are low-rank, where
    # the default's are one per weight.
    "cbq_lora": ["method=cbq", "rounding=lora", "method.iters=2", "method.forward_batch=4"],
}


@dataclass(frozen=True)
class Width:
    hidden: int = 2048
    intermediate: int = 6912
    heads: int = 16

    def config(self, depth: int, vocab: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=depth,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )


def write_synthetic(directory: Path, depth: int, width: Width, seed: int = 0) -> int:
    """A random Llama of ``depth`` blocks as a sharded fp32 checkpoint; returns its parameter
    count. Written one block at a time, so writing it needs one block of memory."""
    if (directory / "model.safetensors.index.json").exists():
        return json.loads((directory / "params.json").read_text())["params"]
    source = packaged_model_dir("smollm2-135m", CACHE)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    directory.mkdir(parents=True, exist_ok=True)
    width.config(depth, vocab).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    generator = torch.Generator().manual_seed(seed)
    h, m = width.hidden, width.intermediate

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    weight_map, params = {}, 0
    shards = [
        (
            "outside",
            {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": torch.ones(h)},
        )
    ]
    for index in range(depth):
        prefix = f"model.layers.{index}."
        shards.append(
            (
                f"block{index}",
                {
                    prefix + "input_layernorm.weight": torch.ones(h),
                    prefix + "post_attention_layernorm.weight": torch.ones(h),
                    **{prefix + f"self_attn.{p}_proj.weight": normal(h, h) for p in "qkvo"},
                    prefix + "mlp.gate_proj.weight": normal(m, h),
                    prefix + "mlp.up_proj.weight": normal(m, h),
                    prefix + "mlp.down_proj.weight": normal(h, m),
                },
            )
        )
    for name, tensors in shards:
        file = f"model-{name}.safetensors"
        save_file(tensors, str(directory / file))
        weight_map.update(dict.fromkeys(tensors, file))
        params += sum(t.numel() for t in tensors.values())
    index = {"metadata": {"total_size": 4 * params}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "params.json").write_text(json.dumps({"params": params}))
    return params


class MemoryLimit:
    """A cgroup with a memory limit that a subprocess joins before it starts. One per run: a
    cgroup keeps the page cache its last run left charged to it, and its OOM count."""

    def __init__(self, limit_bytes: int, tag: str):
        self.limit = limit_bytes
        self.path = self._create(f"cbq-lazy-{os.getpid()}-{tag}")

    def _create(self, name: str) -> Path | None:
        """cgroup v1's memory controller, else v2's; None where neither is writable."""
        if Path("/sys/fs/cgroup/memory").is_dir():
            path, limits = Path("/sys/fs/cgroup/memory", name), ["memory.limit_in_bytes"]
            limits.append("memory.memsw.limit_in_bytes")  # no escaping to swap either
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            path, limits = Path("/sys/fs/cgroup", name), ["memory.max", "memory.swap.max"]
        else:
            return None
        try:
            path.mkdir(exist_ok=True)
            for limit_file in limits:
                if (path / limit_file).exists():
                    value = "0" if limit_file == "memory.swap.max" else str(self.limit)
                    (path / limit_file).write_text(value)
        except OSError as error:
            print(f"cannot set a memory limit in {path}: {error}", file=sys.stderr)
            return None
        return path

    def join(self) -> None:
        """Run in the child before exec: move this process into the cgroup."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self) -> bool:
        events = self.path / "memory.events" if self.path else None
        if events is not None and events.exists():
            return "oom_kill 0" not in events.read_text()
        control = self.path / "memory.oom_control" if self.path else None
        return control is not None and "oom_kill 0" not in control.read_text()

    def peak_gib(self) -> float:
        """The group's peak charge (page cache included), in GiB."""
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if self.path is not None and (self.path / name).exists():
                return int((self.path / name).read_text()) / GIB
        return float("nan")

    def remove(self) -> None:
        if self.path is not None:
            self.path.rmdir()


def run_cbq(
    model_dir: Path, run_dir: Path, method: str, lazy: bool, limit: MemoryLimit | None
) -> dict:
    command = [
        sys.executable,
        "-m",
        "cbq",
        f"model.name={model_dir.name}",
        f"model.path={model_dir}",
        f"model.lazy={str(lazy).lower()}",
        *RUN_OVERRIDES,
        *METHOD_OVERRIDES[method],
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["PYTHONUNBUFFERED"] = "1"  # a run killed for memory still leaves its log
    start = time.perf_counter()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.call(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit.join if limit else None,
        )
    wall = time.perf_counter() - start
    results = run_dir / "results.json"
    record = json.loads(results.read_text()) if results.exists() else {}
    return {
        "exit": code,
        "status": record.get("status", "killed" if code else "no record"),
        "peak_rss_gib": record.get("memory", {}).get("process_peak_rss_mib", float("nan")) / 1024,
        "quantize_s": record.get("timing_s", {}).get("quantize", float("nan")),
        "wall_s": wall,
        "ppl": record.get("metrics", {}).get("ppl/wiki-sample", float("nan")),
        "log": str(log),
    }


def run_job(
    workdir: Path, model_dir: Path, depth: int, method: str, lazy: bool, limit_gib: float
) -> dict:
    """One run; a lazy one in a fresh cgroup limited to ``limit_gib``."""
    tag = f"d{depth}-{method}-{'lazy' if lazy else 'eager'}"
    run_dir = workdir / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    limit = MemoryLimit(int(limit_gib * GIB), tag) if lazy else None
    if limit is not None and limit.path is None:
        print("memory limit NOT ENFORCED: no writable cgroup", file=sys.stderr)
    try:
        result = run_cbq(model_dir, run_dir, method, lazy, limit)
        if limit is not None:
            result["cgroup_peak_gib"] = limit.peak_gib()
        if limit is not None and result["status"] != "finished" and limit.oom_killed():
            result["status"] = "killed: over the memory limit"
            result["peak_rss_gib"] = float("nan")  # the record was written when it started
    finally:
        if limit is not None:
            limit.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument(
        "--methods", nargs="+", default=["rtn", "gptq", "cbq"], choices=list(METHOD_OVERRIDES)
    )
    parser.add_argument(
        "--deepest-only",
        nargs="*",
        default=["gptq", "cbq", "cbq_lora"],
        help="methods run only at the largest depth (they cost more)",
    )
    parser.add_argument("--eager-depths", type=int, nargs="*", default=[8])
    parser.add_argument("--limit-gib", type=float, default=4.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cbq-lazy"))
    parser.add_argument("--keep-models", action="store_true")
    parser.add_argument("--hidden", type=int, default=Width.hidden)
    parser.add_argument("--intermediate", type=int, default=Width.intermediate)
    parser.add_argument("--heads", type=int, default=Width.heads)
    args = parser.parse_args()
    width = Width(args.hidden, args.intermediate, args.heads)
    rows = []
    for depth in sorted(args.depths):
        model_dir = args.workdir / f"synthetic-d{depth}"
        params = write_synthetic(model_dir, depth, width)
        deepest = depth == max(args.depths)
        jobs = [(m, True) for m in args.methods if deepest or m not in args.deepest_only]
        jobs += [("rtn", False)] if depth in args.eager_depths else []
        for method, lazy in jobs:
            result = run_job(args.workdir, model_dir, depth, method, lazy, args.limit_gib)
            rows.append((depth, params, method, lazy, result))
            row = {"depth": depth, "method": method, "lazy": lazy, **result}
            print(json.dumps(row), flush=True)
        if not args.keep_models:
            shutil.rmtree(model_dir)
    print(f"\nwidth: hidden {width.hidden}, MLP {width.intermediate}; lazy runs limited to")
    print(f"{args.limit_gib} GiB\n")
    header = ["blocks", "params", "fp32 weights (GiB)", "method", "load", "status"]
    header += ["peak RSS (GiB)", "quantize (s)", "ppl"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for depth, params, method, lazy, r in rows:
        load = "lazy" if lazy else "eager"
        size = f"{params / 1e9:.2f}B | {4 * params / GIB:.1f}"
        print(
            f"| {depth} | {size} | {method} | {load} | {r['status']} "
            f"| {r['peak_rss_gib']:.2f} | {r['quantize_s']:.0f} | {r['ppl']:.1f} |"
        )


if __name__ == "__main__":
    main()
