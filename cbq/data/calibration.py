"""Token windows: the calibration batch and the perplexity evaluation windows.

Tokenization follows GPTQ: a corpus part is joined into one text and tokenized in ONE call
with the tokenizer's default special tokens, so a tokenizer that prepends BOS (OPT, Llama,
Gemma) puts exactly one BOS at the very start of the stream and none in the middle; one
that adds none (SmolLM2) adds none. ``verbose=False`` silences transformers' "sequence
longer than the model maximum" warning, which is expected for a whole corpus.

- ``calibration_batch``: ``n_samples`` windows of ``seqlen`` tokens at random offsets in
  the calibration stream, drawn with a local ``random.Random(seed)`` in GPTQ's order
  (``randint(0, n_tokens - seqlen - 1)``), so for the same tokenizer WikiText2 windows match
  the GPTQ reference. ``c4`` follows GPTQ's C4 sampler instead: a random train document with
  more than ``seqlen`` tokens (each document tokenized on its own), then a random window in it.
- ``evaluation_windows``: GPTQ's perplexity protocol, the evaluation stream cut into
  consecutive non-overlapping windows (the tail shorter than ``seqlen`` is dropped). ``c4``
  gives GPTQ's 256 random validation windows drawn with seed 0.

Token streams are cached in memory per (corpus, tokenizer, part), as a run evaluates several
corpora and reuses the calibration part. A tokenizer is identified by its class,
``name_or_path`` and vocabulary size, or, when it has no ``name_or_path``, by the object
itself (the entries are dropped when it is garbage-collected).
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from cbq.data.corpora import (
    calibration_text,
    corpus_key,
    evaluation_text,
    hub_split,
    is_text_file,
    validate_corpus_name,
)

C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0
_C4_MAX_DRAWS = 1000  # documents tried per window before giving up (only tiny fixtures hit it)

_STREAMS: dict[tuple[Any, ...], torch.Tensor] = {}
_WATCHED: set[int] = set()


@dataclass
class DataConfig:
    calib: str = "wiki-sample"
    eval: list[str] = field(default_factory=lambda: ["wiki-sample"])
    n_samples: int = 128
    seqlen: int = 2048
    # Seed of the calibration sampler (the split of packaged corpora never changes).
    seed: int = "${seed}"  # type: ignore[assignment]
    # Perplexity window length; null means ``seqlen``.
    eval_seqlen: int | None = None
    # Evaluate on the first N windows only (quick CPU runs); null means all.
    max_eval_windows: int | None = None

    def problems(self) -> list[str]:
        problems = []
        names = [("data.calib", self.calib)]
        names += [(f"data.eval[{i}]", name) for i, name in enumerate(self.eval)]
        for field_name, name in names:
            try:
                validate_corpus_name(name, field=field_name)
            except ValueError as error:
                problems.append(str(error))
        for field_name, value in [("data.n_samples", self.n_samples), ("data.seqlen", self.seqlen)]:
            if value < 1:
                problems.append(f"{field_name}: {value} must be a positive integer")
        for field_name, value in [
            ("data.eval_seqlen", self.eval_seqlen),
            ("data.max_eval_windows", self.max_eval_windows),
        ]:
            if value is not None and value < 1:
                problems.append(f"{field_name}: {value} must be a positive integer or null")
        return problems


def calibration_batch(
    corpus: str, tokenizer: Any, *, n_samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens from the calibration part.

    Returns a LongTensor of shape (n_samples, seqlen). Uses no global RNG state.
    """
    validate_corpus_name(corpus)
    _check_positive(n_samples=n_samples, seqlen=seqlen)
    rng = random.Random(seed)
    if corpus == "c4":
        return torch.stack([_c4_window("calib", tokenizer, seqlen, rng) for _ in range(n_samples)])
    stream = token_stream(corpus, tokenizer, part="calib")
    if stream.numel() < seqlen + 1:
        raise ValueError(
            f"the calibration part of corpus {corpus!r} has {stream.numel()} tokens, fewer "
            f"than seqlen + 1 = {seqlen + 1}; use a shorter seqlen or a larger corpus"
        )
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(n_samples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def evaluation_windows(
    corpus: str,
    tokenizer: Any,
    *,
    seqlen: int,
    calibrating_on_same: bool,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of the evaluation text, in order (GPTQ protocol).

    Returns a LongTensor of shape (n_windows, seqlen); ``max_windows`` keeps the first N.
    ``calibrating_on_same`` matters only for a .txt file (its last 30% vs the whole file).
    """
    validate_corpus_name(corpus)
    _check_positive(seqlen=seqlen, max_windows=1 if max_windows is None else max_windows)
    if corpus == "c4":
        n = C4_EVAL_WINDOWS if max_windows is None else min(max_windows, C4_EVAL_WINDOWS)
        return _c4_eval_windows(tokenizer, seqlen, n).clone()
    part = "eval" if calibrating_on_same or not is_text_file(corpus) else "whole"
    stream = token_stream(corpus, tokenizer, part=part)
    n = stream.numel() // seqlen
    if n == 0:
        raise ValueError(
            f"the evaluation text of corpus {corpus!r} has {stream.numel()} tokens, fewer "
            f"than one window of seqlen = {seqlen}"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].reshape(n, seqlen).clone()


def token_stream(corpus: str, tokenizer: Any, *, part: str) -> torch.Tensor:
    """The tokenized text of one part, 1-D, cached: ``calib``, ``eval`` or ``whole``
    (``whole``: the entire .txt file, its evaluation text when it is not also calibrating)."""
    if part not in ("calib", "eval", "whole"):
        raise ValueError(f"part must be 'calib', 'eval' or 'whole', got {part!r}")
    validate_corpus_name(corpus)
    if part == "whole" and not is_text_file(corpus):
        part = "eval"  # only a .txt file has a "whole" evaluation text
    key = _cache_key(corpus, tokenizer, part)
    if key is not None and key in _STREAMS:
        return _STREAMS[key]
    if part == "calib":
        text = calibration_text(corpus)
    else:
        text = evaluation_text(corpus, calibrating_on_same=part == "eval")
    stream = tokenize(tokenizer, text)
    if key is not None:
        _STREAMS[key] = stream
    return stream


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, from one call with default special tokens."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def clear_token_cache() -> None:
    """Forget every cached token stream."""
    _STREAMS.clear()


# ---------------------------------------------------------------------------------------
# C4 (GPTQ's document sampler)


def _c4_eval_windows(tokenizer: Any, seqlen: int, n: int) -> torch.Tensor:
    key = _cache_key("c4", tokenizer, f"eval-windows-{seqlen}-{n}")
    if key is not None and key in _STREAMS:
        return _STREAMS[key]
    rng = random.Random(C4_EVAL_SEED)
    windows = torch.stack([_c4_window("eval", tokenizer, seqlen, rng) for _ in range(n)])
    if key is not None:
        _STREAMS[key] = windows
    return windows


def _c4_window(part: str, tokenizer: Any, seqlen: int, rng: random.Random) -> torch.Tensor:
    """A random window inside a random document longer than ``seqlen`` tokens (GPTQ order)."""
    data = hub_split("c4", part)
    for _ in range(_C4_MAX_DRAWS):
        ids = tokenize(tokenizer, data[rng.randint(0, len(data) - 1)]["text"])
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            return ids[start : start + seqlen]
    raise ValueError(
        f"corpus 'c4': no document with more than seqlen = {seqlen} tokens in "
        f"{_C4_MAX_DRAWS} random draws from the {part} split"
    )


# ---------------------------------------------------------------------------------------
# cache keys


def _cache_key(corpus: str, tokenizer: Any, part: str) -> tuple[Any, ...] | None:
    tok = _tokenizer_key(tokenizer)
    return None if tok is None else (corpus_key(corpus), tok, part)


def _tokenizer_key(tokenizer: Any) -> tuple[Any, ...] | None:
    name = getattr(tokenizer, "name_or_path", None)
    if name:
        return ("named", type(tokenizer).__qualname__, str(name), _vocab_size(tokenizer))
    obj_id = id(tokenizer)
    if obj_id not in _WATCHED:
        try:
            weakref.finalize(tokenizer, _forget_tokenizer, obj_id)
        except TypeError:  # not weak-referenceable: its id could be reused, so don't cache
            return None
        _WATCHED.add(obj_id)
    return ("object", obj_id)


def _forget_tokenizer(obj_id: int) -> None:
    _WATCHED.discard(obj_id)
    for key in [k for k in _STREAMS if k[1] == ("object", obj_id)]:
        del _STREAMS[key]


def _vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
