"""Zero-shot tasks generated from the packaged text, for machines without the hub.

Every example comes from the evaluation part of a packaged corpus (``documents(corpus,
"eval")``), never from calibration text. A document's prose paragraphs (lines that are not
headings, tables or lists) are split into sentences; a *chunk* is a run of consecutive
sentences of one paragraph (the context, ``CONTEXT_WORDS[kind]`` words) and the sentence after
it (``ENDING_WORDS`` words); every sentence fit to end one ends one chunk, so the contexts of
chunks may overlap. A seeded shuffle picks which chunks become examples, so the data
depends only on the corpus, the task and the seed. A sentence that also occurs in the
calibration part (some Wikipedia articles share sentences) is never used.

- LAMBADA-style (``cbq_lambada_<corpus>``): the chunk without its final word; predict that
  word. Scored like ``lambada_openai``: ``acc`` counts an example when the continuation
  " <word>" is the model's greedy continuation (every token the argmax), plus the
  perplexity of the target. The word is alphabetic, at least ``MIN_TARGET_CHARS`` letters,
  ends its sentence, and occurs earlier in the passage: as in LAMBADA, guessing it should
  take the wider context. Open vocabulary: chance is ~0.
- HellaSwag-style (``cbq_hellaswag_<corpus>``): the context, and four endings: the sentence
  that follows it and three sentences of similar length (within ``DISTRACTOR_LENGTH_RATIO``)
  from other documents that name nobody and nothing the passage names (a capitalised word
  inside a sentence): lee-news tells some stories in several documents, and a sentence of
  the same story would be a second true ending. ``acc`` and ``acc_norm`` (per byte);
  chance 1/4.

Each task is written as a jsonl file and an lm-eval YAML config that reads it (``json``
builder, ``test`` split), loaded through ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cbq.data import documents

TaskKind = Literal["lambada", "hellaswag"]

# Words of context before the final sentence (LAMBADA: a wide context, as in LAMBADA's
# passages) or before the true ending (HellaSwag: one to three sentences, as in HellaSwag;
# it is scored four times, once per ending). 200 examples of each then take about 5 minutes
# for a 135M model on one CPU core.
CONTEXT_WORDS: dict[TaskKind, tuple[int, int]] = {"lambada": (30, 70), "hellaswag": (15, 40)}
ENDING_WORDS = (8, 30)  # words of the final sentence / of every ending
# the shortest chunk: context and ending
MIN_PARAGRAPH_WORDS = min(least for least, _ in CONTEXT_WORDS.values()) + ENDING_WORDS[0]
MIN_TARGET_CHARS = 4
N_CHOICES = 4
DISTRACTOR_LENGTH_RATIO = 1.5
LAMBADA_CHANCE = "~0 (open-vocabulary word prediction; not meaningful)"


@dataclass(frozen=True)
class OfflineTask:
    kind: TaskKind
    corpus: str


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "cbq_lambada_wiki": OfflineTask("lambada", "wiki-sample"),
    "cbq_hellaswag_wiki": OfflineTask("hellaswag", "wiki-sample"),
    "cbq_lambada_news": OfflineTask("lambada", "lee-news"),
    "cbq_hellaswag_news": OfflineTask("hellaswag", "lee-news"),
}


@dataclass(frozen=True)
class Chunk:
    doc: int  # index of the document in the corpus' evaluation part
    context_sentences: tuple[str, ...]
    final: str  # the sentence right after the context

    @property
    def context(self) -> str:
        return " ".join(self.context_sentences)

    def shares_a_sentence(self, sentences: set[str]) -> bool:
        return not sentences.isdisjoint((*self.context_sentences, self.final))


# ---------------------------------------------------------------------------------------
# text -> sentences -> chunks

_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”’']))\s+(?=[\"“‘']?[A-Z])")
_CLEAN_SENTENCE = re.compile(r"^[\"“]?[A-Z].*[.!?][\"”]?$")
_FINAL_WORD = re.compile(rf"\s([A-Za-z]{{{MIN_TARGET_CHARS},}})[.!?]$")
_NAME = re.compile(r"\b[A-Z][A-Za-z]{2,}\b")


def n_words(text: str) -> int:
    return len(text.split())


def lines(doc: str) -> list[str]:
    """The document's lines, spaces collapsed (lee-news has double spaces)."""
    return [" ".join(line.split()) for line in doc.split("\n")]


def prose_paragraphs(doc: str) -> list[str]:
    """Lines long enough to hold a chunk and ending like prose (no headings, list items)."""
    return [
        line
        for line in lines(doc)
        if not line.startswith(("=", "*", "#", "|", "{"))
        and line.endswith((".", "!", "?", '"', "”"))
        and n_words(line) >= MIN_PARAGRAPH_WORDS
    ]


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(paragraph) if s]


def is_ending(sentence: str) -> bool:
    """A sentence fit to end a chunk or be a distractor: clean start and end, mid-length."""
    return bool(_CLEAN_SENTENCE.match(sentence)) and (
        ENDING_WORDS[0] <= n_words(sentence) <= ENDING_WORDS[1]
    )


def _paragraph_chunks(
    sentences: list[str], context_words: tuple[int, int]
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(context, final sentence) for every sentence fit to end a chunk: the context is the
    shortest run of sentences right before it with at least ``context_words[0]`` words."""
    least, most = context_words
    for end in range(1, len(sentences)):
        start, words = end, 0
        while start > 0 and words < least:
            start -= 1
            words += n_words(sentences[start])
        if least <= words <= most and is_ending(sentences[end]):
            yield tuple(sentences[start:end]), sentences[end]


def chunks(docs: list[str], context_words: tuple[int, int]) -> list[Chunk]:
    return [
        Chunk(index, context, final)
        for index, doc in enumerate(docs)
        for paragraph in prose_paragraphs(doc)
        for context, final in _paragraph_chunks(split_sentences(paragraph), context_words)
    ]


def all_sentences(docs: list[str]) -> set[str]:
    """Every sentence of every line, prose or not."""
    return {sentence for doc in docs for line in lines(doc) for sentence in split_sentences(line)}


# ---------------------------------------------------------------------------------------
# examples


def lambada_example(chunk: Chunk) -> dict[str, Any] | None:
    """Context and target word of a chunk, or None when its final word is unfit."""
    match = _FINAL_WORD.search(chunk.final)
    if match is None:
        return None
    target = match.group(1)
    context = f"{chunk.context} {chunk.final[: match.start()]}"
    if not re.search(rf"\b{target}\b", context, flags=re.IGNORECASE):
        return None
    return {"context": context, "target": target, "doc": chunk.doc}


def proper_names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence: names, places, organisations."""
    names = set()
    for sentence in split_sentences(text):
        _first_word, _, rest = sentence.partition(" ")
        names.update(_NAME.findall(rest))
    return names


@dataclass(frozen=True)
class Ending:
    docs: frozenset[int]  # the documents the sentence occurs in
    names: frozenset[str]
    words: int


def ending_pool(docs: list[str], exclude: set[str]) -> dict[str, Ending]:
    """Every sentence fit to be an ending (a distractor candidate) and not in ``exclude``,
    with the documents it occurs in."""
    found: dict[str, set[int]] = {}
    for index, doc in enumerate(docs):
        for paragraph in prose_paragraphs(doc):
            for sentence in filter(is_ending, split_sentences(paragraph)):
                if sentence not in exclude:
                    found.setdefault(sentence, set()).add(index)
    return {
        text: Ending(frozenset(where), frozenset(proper_names(text)), n_words(text))
        for text, where in found.items()
    }


def distractors(chunk: Chunk, pool: dict[str, Ending], rng: random.Random) -> list[str] | None:
    """N_CHOICES - 1 endings of similar length from other documents that share no name with
    the passage (None if there are too few)."""
    length = n_words(chunk.final)
    names = proper_names(f"{chunk.context} {chunk.final}")
    similar = [
        text
        for text, ending in pool.items()
        if chunk.doc not in ending.docs
        and not names & ending.names
        and length / DISTRACTOR_LENGTH_RATIO <= ending.words <= length * DISTRACTOR_LENGTH_RATIO
    ]
    if len(similar) < N_CHOICES - 1:
        return None
    return rng.sample(similar, N_CHOICES - 1)


def hellaswag_example(
    chunk: Chunk, pool: dict[str, Ending], rng: random.Random
) -> dict[str, Any] | None:
    wrong = distractors(chunk, pool, rng)
    if wrong is None:
        return None
    label = rng.randrange(N_CHOICES)
    choices = [*wrong[:label], chunk.final, *wrong[label:]]
    return {"context": chunk.context, "choices": choices, "label": label, "doc": chunk.doc}


def generate_examples(name: str, n_examples: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n_examples`` examples of offline task ``name``, deterministic in ``seed``."""
    task = OFFLINE_TASKS[name]
    docs = documents(task.corpus, "eval")
    calibration = all_sentences(documents(task.corpus, "calib"))
    rng = random.Random(f"{name}:{seed}")  # str seeds hash stably, unlike hash()
    candidates = [
        chunk
        for chunk in chunks(docs, CONTEXT_WORDS[task.kind])
        if not chunk.shares_a_sentence(calibration)
    ]
    rng.shuffle(candidates)
    pool = ending_pool(docs, exclude=calibration) if task.kind == "hellaswag" else {}
    examples = []
    for chunk in candidates:
        if len(examples) == n_examples:
            break
        if task.kind == "lambada":
            example = lambada_example(chunk)
        else:
            example = hellaswag_example(chunk, pool, rng)
        if example is not None:
            examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------
# lm-eval task files

_METRICS: dict[TaskKind, list[dict[str, Any]]] = {
    "lambada": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
    "hellaswag": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}

_TEMPLATES: dict[TaskKind, dict[str, str]] = {
    # like lambada_openai: the target carries its leading space
    "lambada": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
    },
    "hellaswag": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
    },
}


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    kind = OFFLINE_TASKS[name].kind
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "num_fewshot": 0,
        **_TEMPLATES[kind],
        "metric_list": _METRICS[kind],
        "metadata": {"version": 1.0},
    }


def write_task(name: str, examples: list[dict[str, Any]], directory: Path) -> Path:
    """Write ``<name>.jsonl`` and the lm-eval config ``<name>.yaml``; returns the YAML path."""
    directory.mkdir(parents=True, exist_ok=True)
    data_file = directory / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
    config_file = directory / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(task_config(name, data_file), sort_keys=False))
    return config_file
