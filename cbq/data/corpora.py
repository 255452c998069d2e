"""Text corpora for calibration and perplexity, named by strings.

Names (``CORPORA``) and what each one means:

- ``wikitext2``, ``c4``, ``ptb``: the usual PTQ corpora, loaded from the Hugging Face hub
  through ``datasets.load_dataset`` exactly as the GPTQ reference does. Calibration uses the
  train split; evaluation uses the WikiText2 test split, GPTQ's C4 validation shard and the
  PTB validation split (GPTQ's ``ptb``, not ``ptb-new``). When the hub cannot be reached they
  fail within seconds (one short probe, no retry loop) with an error that names the offline
  corpora. Set ``HF_DATASETS_OFFLINE=1`` to use copies already in the local HF cache.
- ``wiki-sample``: the shortened English Wikipedia dump packaged with gensim (106 articles,
  ~480k whitespace-separated words), read with gensim's ``extract_pages`` (main namespace,
  no redirects) and cleaned with ``filter_wiki``; paragraphs and section headings are kept
  as plain text.
- ``lee-news``: the Lee news corpus packaged with gensim (300 lines, one document per line;
  7 stories appear twice and are kept once, leaving 293 documents, ~59k words).
- an absolute path to a UTF-8 ``.txt`` file: its first 70% by characters (cut at the line
  boundary nearest below the mark) is the calibration part and the rest the evaluation part.
  When the file is used for evaluation only (it is not also the calibration corpus), the
  whole file is the evaluation text. Its metric name is the file stem.

Splits of the packaged corpora: the documents (articles) are shuffled with the fixed
``SPLIT_SEED`` (never the run seed, so every run evaluates on the same text) and the first
60% become the calibration part, the rest the evaluation part. No document is in both; each
part keeps the documents in their original order. A part's text is its documents joined by
a blank line (``"\\n\\n"``), as GPTQ joins WikiText2.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Part = Literal["calib", "eval"]

HUB_CORPORA: tuple[str, ...] = ("wikitext2", "c4", "ptb")
PACKAGED_CORPORA: tuple[str, ...] = ("wiki-sample", "lee-news")
CORPORA: tuple[str, ...] = HUB_CORPORA + PACKAGED_CORPORA

SPLIT_SEED = 0
CALIB_FRACTION = 0.6  # of the documents of a packaged corpus
TXT_CALIB_FRACTION = 0.7  # of the characters of a .txt file
DOC_SEPARATOR = "\n\n"

_ALLOWED = ", ".join(CORPORA) + ", or an absolute path to a .txt file"
_OFFLINE_HINT = "wiki-sample, lee-news, or an absolute path to a .txt file"
_GENSIM_DATA = ("test", "test_data")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILE = "lee_background.cor"
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    column: str
    splits: dict[str, str]  # part -> split name
    data_files: dict[str, str] | None = None  # split name -> file in the repo


_HUB: dict[str, _HubSource] = {
    "wikitext2": _HubSource(
        "wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}
    ),
    "c4": _HubSource(
        "allenai/c4",
        None,
        "text",
        {"calib": "train", "eval": "validation"},
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "ptb": _HubSource(
        "ptb_text_only", "penn_treebank", "sentence", {"calib": "train", "eval": "validation"}
    ),
}


# ---------------------------------------------------------------------------------------
# names


def is_text_file(name: str) -> bool:
    """True when ``name`` names a corpus by a path (rather than a packaged/hub name)."""
    return name not in CORPORA and name.endswith(".txt")


def validate_corpus_name(name: str, field: str = "data.calib / data.eval") -> None:
    """Raise ValueError unless ``name`` is a known corpus or an existing absolute .txt path.

    Touches neither the network nor file contents (only ``os.path.isfile``), so it can run
    while the config is checked, before anything loads.
    """
    if not isinstance(name, str):
        raise ValueError(f"{field}: corpus must be a string, got {name!r}; allowed: {_ALLOWED}")
    if name in CORPORA:
        return
    if not name.endswith(".txt"):
        problem = (
            f"corpus path {name!r} is not a .txt file"
            if os.path.isabs(name)
            else f"unknown corpus {name!r}"
        )
    elif not os.path.isabs(name):
        problem = f"corpus path {name!r} is not absolute"
    elif not os.path.isfile(name):
        problem = f"corpus file {name!r} does not exist"
    else:
        return
    raise ValueError(f"{field}: {problem}; allowed: {_ALLOWED}")


def metric_name(name: str) -> str:
    """Name under which results on this corpus are reported (the stem for a .txt path)."""
    validate_corpus_name(name)
    return Path(name).stem if is_text_file(name) else name


def corpus_key(name: str) -> tuple[Any, ...]:
    """Hashable identity of a corpus' content (a file's path, size and mtime), for caches."""
    if not is_text_file(name):
        return (name,)
    stat = os.stat(name)
    return (os.path.realpath(name), stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------------------------------
# texts


def documents(name: str, part: Part) -> list[str]:
    """The documents of one part of a corpus (a .txt file part is a single document)."""
    validate_corpus_name(name)
    if name in _HUB:
        return list(hub_split(name, part)[_HUB[name].column])
    if is_text_file(name):
        calib, evaluation = _split_text_file(_read_text_file(name))
        return [calib if part == "calib" else evaluation]
    docs = _packaged_documents(name)
    return [docs[i] for i in _split_indices(len(docs))[part]]


def calibration_text(name: str) -> str:
    """The calibration part of a corpus as one string (documents joined by a blank line).

    For ``c4`` this joins the whole train shard; calibration samples C4 by document instead
    (see ``cbq.data.calibration``).
    """
    return DOC_SEPARATOR.join(documents(name, "calib"))


def evaluation_text(name: str, *, calibrating_on_same: bool) -> str:
    """The evaluation text of a corpus.

    Packaged and hub corpora always give their evaluation part. A .txt file gives its last
    30% when it is also the calibration corpus, otherwise the whole file.
    """
    if is_text_file(name) and not calibrating_on_same:
        validate_corpus_name(name)
        return _read_text_file(name)
    return DOC_SEPARATOR.join(documents(name, "eval"))


def _split_indices(n_docs: int) -> dict[str, list[int]]:
    order = list(range(n_docs))
    random.Random(SPLIT_SEED).shuffle(order)
    n_calib = round(CALIB_FRACTION * n_docs)
    return {"calib": sorted(order[:n_calib]), "eval": sorted(order[n_calib:])}


# ---------------------------------------------------------------------------------------
# .txt files


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {path!r} is not valid UTF-8 text: {err}") from err


def _split_text_file(text: str) -> tuple[str, str]:
    """Cut at the last line boundary at or before 70% of the characters (or the first after)."""
    mark = int(TXT_CALIB_FRACTION * len(text))
    cut = text.rfind("\n", 0, mark + 1)
    if cut <= 0:
        cut = text.find("\n", mark)
    if cut <= 0 or not text[cut + 1 :].strip():
        raise ValueError(
            "a .txt corpus needs at least two non-empty lines to split into calibration "
            f"(first {TXT_CALIB_FRACTION:.0%}) and evaluation parts"
        )
    return text[:cut], text[cut + 1 :]


# ---------------------------------------------------------------------------------------
# packaged gensim corpora


def _packaged_documents(name: str) -> tuple[str, ...]:
    docs = _wiki_sample_documents() if name == "wiki-sample" else _lee_news_documents()
    # lee_background.cor repeats 7 stories: keep one copy, so no text lands in both parts
    return tuple(dict.fromkeys(docs))


def gensim_data_file(filename: str) -> Path:
    """Path of a file in gensim's packaged test data (found via importlib, not site-packages)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the packaged corpora need gensim (pip install gensim==4.4.0)")
    path = Path(spec.origin).parent.joinpath(*_GENSIM_DATA, filename)
    if not path.is_file():
        raise FileNotFoundError(f"gensim's packaged data file is missing: {path}")
    return path


@functools.cache
def _wiki_sample_documents() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(gensim_data_file(_WIKI_FILE), "rb") as f:
        # namespace "0" = articles; the dump also has a Wikipedia: project page
        for _title, markup, _page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki_text(filter_wiki(markup))
            if text:
                docs.append(text)
    return tuple(docs)


_QUOTE_MARKUP = re.compile(r"'{2,}")  # ''italic'' and '''bold'''
_EMPTY_LIST_ITEM = re.compile(r"^[*#:;]+\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_TRAILING_SPACE = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_wiki_text(text: str) -> str:
    """Plain text from ``filter_wiki`` output: drop quote markup and empty list items,
    normalise headings to ``== Title ==``, collapse spaces and runs of blank lines."""
    text = _QUOTE_MARKUP.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _EMPTY_LIST_ITEM.sub("", text)
    text = _HEADING.sub(r"\1 \2 \1", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


@functools.cache
def _lee_news_documents() -> tuple[str, ...]:
    lines = gensim_data_file(_LEE_FILE).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


# ---------------------------------------------------------------------------------------
# hub corpora


class HubUnavailableError(ConnectionError):
    """A hub corpus was asked for but the Hugging Face hub cannot be reached."""


@functools.cache
def hub_split(name: str, part: Part) -> Any:
    """The ``datasets.Dataset`` behind one part of a hub corpus (cached per process)."""
    import datasets

    source = _HUB[name]
    split = source.splits[part]
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise HubUnavailableError(_unavailable_message(name, f"cannot reach {_hub_endpoint()}"))
    kwargs: dict[str, Any] = {"split": split}
    if source.data_files is not None:
        kwargs["data_files"] = {split: source.data_files[split]}
    try:
        # attribute lookup at call time, so tests can monkeypatch datasets.load_dataset
        return datasets.load_dataset(source.path, source.config, **kwargs)
    except OSError as err:  # ConnectionError, DatasetNotFoundError, missing cache files
        reason = f"{type(err).__name__}: {err}"
        raise HubUnavailableError(_unavailable_message(name, reason)) from err
    except Exception as err:
        err.add_note(f"while loading corpus {name!r} ({source.path}, split {split!r})")
        raise


def hub_reachable(endpoint: str | None = None, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (honours HTTP(S)_PROXY); no retries."""
    request = urllib.request.Request(endpoint or _hub_endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered, so it is reachable
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unavailable_message(name: str, reason: str) -> str:
    source = _HUB[name]
    dataset = source.path + (f"/{source.config}" if source.config else "")
    return (
        f"corpus {name!r} ({dataset}) could not be loaded from the Hugging Face hub ({reason}). "
        f"Use an offline corpus instead: {_OFFLINE_HINT}; or, if the dataset is already in "
        "your local HF cache, set HF_DATASETS_OFFLINE=1."
    )


def clear_corpus_caches() -> None:
    """Forget loaded hub splits (the packaged corpora never change and stay cached)."""
    hub_split.cache_clear()
