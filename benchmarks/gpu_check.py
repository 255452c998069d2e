"""The GPU check (issue #13): CUDA tests, then CBQ on CUDA against the same run on CPU.

One short script for a lent GPU machine (a scarce 15 minutes; docs/gpu_check.md has the
exact call). It ends within ``--budget-s`` (default 420 s) and writes what it has after
every step, so a run cut short still leaves a summary. Steps, most informative first:

1. ``pytest -q tests/test_cuda.py``: pass/fail counts.
2. The model and corpus every run shares (below), in a temporary directory.
3. ``cuda-small``: ``python3 -m cbq method=cbq device=cuda`` at a small size.
4. ``cpu-small``: the same run with ``device=cpu`` (beside step 5, on all but 2 cores).
5. ``cuda-paper``: ``device=cuda preset=paper`` (128 x 2048-token calibration windows,
   the paper's 3 epochs), with whatever time is left; cut short, it reports the CBQ window
   it reached.

The summary (``gpu_check.json``, ``gpu_check.md`` in ``--out``) holds each run's wall time
and phases (results.json ``timing_s``), peak CUDA memory (``memory``), perplexity, and the
CUDA-vs-CPU differences of the small pair: perplexity, and the first window's initial
reconstruction loss (RTN before any training: this one should agree to float32 rounding,
well under 1e-3; the trained result drifts further, as sign-SGD amplifies rounding
differences).

Deviation from the issue: the packaged models (~540 MB) cannot travel to the GPU machine
(64 MiB), so every run uses a SmolLM2-135M-shaped Llama (30 blocks, hidden 576, 9 heads,
3 KV heads, vocabulary 49152, tied embeddings) with random weights, fitted for
``--fit-steps`` AdamW steps on the corpus so that perplexity is not just the vocabulary
size (random weights score ~50k), saved with
the tiny byte-level BPE tokenizer (``cbq.models.tiny``, vocabulary 512: only the first 512
embedding rows are ever used) and loaded through ``model.path=<dir>``. The packaged corpora
need gensim, which the machine lacks, so the corpus is this repository's ``README.md`` and
``docs/*.md`` written to one ``.txt`` file (``data.calib`` and ``data.eval``: first 70%
calibration, last 30% evaluation). Perplexities are therefore not comparable with the
tables in docs/, only with each other.

``--dry-cpu`` runs every step on the CPU, one thread, with a 4-block tiny Llama and the
paper run shrunk: it checks the script itself (tests/test_gpu_check.py).

    python3 -m benchmarks.gpu_check --out DIR [--dry-cpu] [--budget-s 420] [--skip-paper]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from cbq.models.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}
DRY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
}
# The CPU comparison's size: 4 calibration windows of 256 tokens, one epoch (4 steps a
# window), perplexity on 8 windows of 256 tokens.
SMALL = [
    "data.n_samples=4",
    "data.seqlen=256",
    "method.epochs=1",
    "data.eval_seqlen=256",
    "data.max_eval_windows=8",
]
PAPER = ["preset=paper"]
DRY_PAPER = ["data.n_samples=4", "data.seqlen=128", "data.max_eval_windows=2"]
TESTS = "tests/test_cuda.py"
# The `run` tool's command (docs/gpu_check.md): install the carried wheels, then the check.
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
    "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT"
)
# Seconds a step may take at most (each also stops at the overall budget).
CAPS = {"tests": 150.0, "cuda-small": 150.0, "cpu-small": 240.0}
SPARE_S = 10.0  # left at the end of the budget to write the summary
MIN_RUN_S = 30.0  # a run is not started with less time than this


@dataclass
class Step:
    """One subprocess: a pytest run or a ``python -m cbq`` run."""

    name: str
    command: list[str]
    log: Path
    env: dict[str, str]
    run_dir: Path | None = None
    device: str | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.started = time.perf_counter()
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None
        status = "finished"
        try:
            returncode = self.proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            returncode = self.proc.wait()
            status = "timeout"
        wall = time.perf_counter() - self.started
        if status == "finished" and returncode != 0:
            status = "failed"
        self.result = {
            "status": status,
            "returncode": returncode,
            "wall_s": round(wall, 1),
            "timeout_s": round(timeout_s, 1),
        }
        return self.result


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 skipped in 2.1s")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ \w+.* in [\d.]+s", line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (\w+)", lines[-1] if lines else ""):
        key = "errors" if word in ("error", "errors") else word
        if key in counts:
            counts[key] = int(number)
    return counts


def run_record(run_dir: Path, log: str) -> dict[str, Any]:
    """What a cbq run left: status, phases, memory, perplexity, first window's losses."""
    path = run_dir / "results.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    windows = record.get("stats", {}).get("windows") or []
    ppl = [v for k, v in record.get("metrics", {}).items() if k.startswith("ppl/")]
    reached = re.findall(r"window (\d+)/(\d+)", log)
    return {
        "record_status": record.get("status"),
        "error": record.get("error"),
        "timing_s": record.get("timing_s", {}),
        "memory": record.get("memory", {}),
        "ppl": ppl[0] if ppl else None,
        "windows_done": len(windows),
        "window_reached": "/".join(reached[-1]) if reached else None,
        "window0_loss_init": windows[0]["loss_init"] if windows else None,
        "window0_loss_hard": windows[0].get("loss_hard") if windows else None,
    }


def write_corpus(path: Path) -> int:
    """README.md and docs/*.md as one text file; returns its size in characters."""
    parts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in parts if p.exists())
    path.write_text(text + "\n", encoding="utf-8")
    return len(text)


def build_model(
    directory: Path, corpus: Path, shape: dict[str, int], steps: int, device: str
) -> dict[str, Any]:
    """A random Llama of ``shape``, fitted for ``steps`` AdamW steps on the corpus' first 70%
    (the calibration part), saved with the tiny tokenizer into ``directory``."""
    start = time.perf_counter()
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        **shape,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    ids = tokenizer(corpus.read_text(), return_tensors="pt", verbose=False).input_ids[0]
    ids = ids[: int(0.7 * len(ids))]
    losses = []
    if steps:
        seqlen, batch = 256, 8
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 10)
        )
        generator = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seqlen, (batch,), generator=generator)
            x = torch.stack([ids[s : s + seqlen] for s in starts.tolist()]).to(device)
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            warmup.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the fit diverged: loss {losses[-1]}")
        del optimizer
    model.eval().to("cpu").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "shape": shape,
        "parameters_m": round(parameters / 1e6, 2),
        "corpus_tokens": int(len(ids) / 0.7),
        "fit_steps": steps,
        "fit_loss_first": round(losses[0], 4) if losses else None,
        "fit_loss_last": round(losses[-1], 4) if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def cbq_command(
    device: str, model_dir: Path, corpus: Path, run_dir: Path, extra: list[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cbq",
        "method=cbq",
        f"device={device}",
        "model.name=smollm2-shaped-random",
        f"model.path={model_dir}",
        f"data.calib={corpus}",
        f"data.eval=[{corpus}]",
        "logger=disabled",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return (a - b) / abs(b)


def host_info(dry: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "dry_cpu": dry,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_count": os.cpu_count(),
    }


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def rel(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2e}"


def markdown(summary: dict[str, Any]) -> str:
    host, model, tests = summary["host"], summary.get("model", {}), summary.get("tests", {})
    lines = [
        "# GPU check",
        "",
        f"- host: {host['gpu'] or 'no GPU'}, {host['cpu_count']} CPUs, torch {host['torch']}, "
        f"transformers {host['transformers']}, Python {host['python']}"
        + (" (**dry run on CPU**)" if host["dry_cpu"] else ""),
        f"- total: {fmt(summary.get('total_s'))} s of a {summary['budget_s']:.0f} s budget; "
        f"status: **{summary.get('status', 'running')}**",
        f"- model: {model.get('shape', {}).get('num_hidden_layers', '?')}-block random Llama "
        f"fitted {model.get('fit_steps', '?')} steps (loss {fmt(model.get('fit_loss_first'))} "
        f"-> {fmt(model.get('fit_loss_last'))}), {fmt(model.get('seconds'))} s",
    ]
    if tests:
        counts = ", ".join(f"{v} {k}" for k, v in tests.get("counts", {}).items() if v)
        lines.append(
            f"- `pytest {TESTS}`: {tests['status']}, {counts or 'no summary line'}, "
            f"{tests['wall_s']} s"
        )
    lines += [
        "",
        "| run | device | status | wall s | quantize s | eval s | peak CUDA MiB | "
        "peak RSS MiB | ppl | window 0 loss_init |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        timing, memory = run.get("timing_s", {}), run.get("memory", {})
        status = run.get("status", "?")
        if status == "timeout":
            status += f" at window {run.get('window_reached')}"
        lines.append(
            f"| {name} | {run['device']} | {status} | {fmt(run.get('wall_s'))} | "
            f"{fmt(timing.get('quantize'))} | {fmt(timing.get('eval_ppl'))} | "
            f"{fmt(memory.get('peak_cuda_mib'))} | {fmt(memory.get('peak_rss_mib'))} | "
            f"{fmt(run.get('ppl'), 6)} | {fmt(run.get('window0_loss_init'), 6)} |"
        )
    comparison = summary.get("comparison", {})
    if comparison:
        lines += [
            "",
            "CUDA against CPU (small runs), relative differences: perplexity "
            f"{rel(comparison.get('ppl_rel_diff'))}, window 0's initial loss "
            f"{rel(comparison.get('window0_loss_init_rel_diff'))}, its hardened loss "
            f"{rel(comparison.get('window0_loss_hard_rel_diff'))}.",
        ]
    if summary.get("error"):
        lines += ["", f"Error: {summary['error']}"]
    return "\n".join(lines) + "\n"


class Check:
    """The steps, the budget, and the summary rewritten after each step."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work, self.out = args, work, args.out
        self.began = time.perf_counter()
        self.summary: dict[str, Any] = {
            "host": host_info(args.dry_cpu),
            "budget_s": args.budget_s,
            "runs": {},
        }
        self.log_parts: list[str] = []
        self.corpus, self.model_dir = work / "docs.txt", work / "model"
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - SPARE_S - (time.perf_counter() - self.began)

    def env(self, threads: int) -> dict[str, str]:
        return os.environ | {
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def save(self) -> None:
        self.summary["total_s"] = round(time.perf_counter() - self.began, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.summary, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.summary))
        (self.out / "gpu_check.log").write_text("\n".join(self.log_parts))

    def note_log(self, step: Step, lines: int = 150) -> str:
        text = log_text(step.log)
        tail = "\n".join(text.splitlines()[-lines:])
        self.log_parts.append(f"===== {step.name}: {' '.join(step.command)}\n{tail}\n")
        return text

    def cbq_step(self, name: str, device: str, extra: list[str], threads: int) -> Step:
        run_dir = self.work / name
        command = cbq_command(device, self.model_dir, self.corpus, run_dir, extra)
        step = Step(name, command, self.work / f"{name}.log", self.env(threads), run_dir, device)
        self.summary["runs"][name] = {"device": device, "overrides": extra, "status": "pending"}
        return step

    def finish_run(self, step: Step, cap_s: float) -> None:
        """Wait for the run (starting it first, if there is time), then record what it left."""
        timeout = min(cap_s, self.left())
        if step.proc is None:
            if timeout < MIN_RUN_S:
                self.summary["runs"][step.name]["status"] = "skipped: out of budget"
                self.save()
                return
            step.start()
        step.wait(timeout)
        text = self.note_log(step)
        assert step.run_dir is not None
        self.summary["runs"][step.name] |= step.result | run_record(step.run_dir, text)
        record = step.run_dir / "results.json"
        if record.exists():
            shutil.copy(record, self.out / f"results-{step.name}.json")
        self.save()

    def prepare(self, device: str) -> None:
        """The corpus and the model; a fit that fails on ``device`` leaves random weights."""
        write_corpus(self.corpus)
        dry = self.args.dry_cpu
        shape = DRY_SHAPE if dry else SMOLLM2_SHAPE
        steps = self.args.fit_steps if self.args.fit_steps is not None else (30 if dry else 100)
        try:
            self.summary["model"] = build_model(self.model_dir, self.corpus, shape, steps, device)
        except Exception as error:  # still worth running the CBQ runs on random weights
            self.summary["model"] = build_model(self.model_dir, self.corpus, shape, 0, "cpu")
            self.summary["model"]["fit_error"] = f"{type(error).__name__}: {error}"
        self.save()

    def run(self) -> int:
        args, dry = self.args, self.args.dry_cpu
        if not dry and not torch.cuda.is_available():
            self.summary["error"] = "torch sees no CUDA device (use --dry-cpu to test on CPU)"
            self.summary["status"] = "failed"
            self.save()
            return 1
        gpu = "cpu" if dry else "cuda"
        cores = os.cpu_count() or 1
        # Threads: pytest all cores, the CUDA runs 2 (they only feed the GPU), the CPU run
        # the rest; one each when dry.
        threads = 1 if dry else 2

        tests = Step(
            "tests",
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS],
            self.work / "tests.log",
            self.env(1 if dry else cores),
        )
        tests.start()
        tests.wait(min(CAPS["tests"], self.left()))
        self.summary["tests"] = tests.result | {"counts": pytest_counts(self.note_log(tests))}
        self.save()

        self.prepare(gpu)
        self.finish_run(self.cbq_step("cuda-small", gpu, SMALL, threads), CAPS["cuda-small"])
        cpu = self.cbq_step("cpu-small", "cpu", SMALL, 1 if dry else max(1, cores - 2))
        if dry or args.skip_paper:
            self.finish_run(cpu, CAPS["cpu-small"])
        else:  # beside the paper run: the GPU machine's cores are idle otherwise
            cpu.start()
        if not args.skip_paper:
            extra = PAPER + (DRY_PAPER if dry else [])
            self.finish_run(self.cbq_step("cuda-paper", gpu, extra, threads), self.left())
        if not cpu.result:
            self.finish_run(cpu, CAPS["cpu-small"] - (time.perf_counter() - cpu.started))

        runs = self.summary["runs"]
        small = runs["cuda-small"], runs["cpu-small"]
        self.summary["comparison"] = {
            f"{key}_rel_diff": relative(small[0].get(key), small[1].get(key))
            for key in ("ppl", "window0_loss_init", "window0_loss_hard")
        }
        # On a GPU machine, tests that all skip (no CUDA seen) are no pass.
        passed = dry or self.summary["tests"]["counts"]["passed"] > 0
        ok = (tests.result["status"] == "finished" and passed) and all(
            r.get("status") == "finished" for r in runs.values()
        )
        self.summary["status"] = "ok" if ok else "incomplete"
        self.save()
        print(markdown(self.summary))
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the summary goes")
    parser.add_argument("--dry-cpu", action="store_true", help="everything on CPU, tiny model")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole check's limit")
    parser.add_argument("--skip-paper", action="store_true", help="no preset=paper run")
    parser.add_argument("--fit-steps", type=int, default=None, help="default 100 (dry: 30)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        return Check(args, Path(work)).run()


if __name__ == "__main__":
    sys.exit(main())
