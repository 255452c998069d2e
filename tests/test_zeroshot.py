"""Zero-shot evaluation: generated offline tasks, lm-eval on the in-memory model, hub tasks
that cannot be loaded (the hub is offline in the tests) and the config checks."""

from __future__ import annotations

import json
import time

import datasets
import pytest
import torch

from cbq.config import ConfigError, OnMissing, ZeroShotConfig
from cbq.data import HubUnavailableError, documents
from cbq.eval import offline_tasks, zeroshot
from cbq.eval.offline_tasks import MIN_TARGET_CHARS, N_CHOICES, OFFLINE_TASKS, generate_examples
from cbq.eval.zeroshot import evaluate_zeroshot, prepare_zeroshot
from cbq.validation import validate

NEWS_TASKS = "eval.zeroshot.tasks=[cbq_lambada_news,cbq_hellaswag_news]"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_llama():
    from cbq.models import tiny_model, tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


# ---------------------------------------------------------------------------------------
# generated task data


@pytest.mark.parametrize("name", sorted(OFFLINE_TASKS))
def test_generated_data_is_seeded_and_from_the_evaluation_part_only(name):
    corpus = OFFLINE_TASKS[name].corpus
    eval_docs = [flat(doc) for doc in documents(corpus, "eval")]
    calib_docs = [flat(doc) for doc in documents(corpus, "calib")]
    examples = generate_examples(name, 40, seed=0)
    assert len(examples) == 40
    assert examples == generate_examples(name, 40, seed=0)
    assert examples != generate_examples(name, 40, seed=1)
    for example in examples:
        passage = example["context"] + " " + _true_ending(example)
        assert passage in eval_docs[example["doc"]]
        assert not any(example["context"] in doc for doc in calib_docs)


def _true_ending(example: dict) -> str:
    return example["target"] if "target" in example else example["choices"][example["label"]]


def test_lambada_targets_are_long_alphabetic_words_seen_earlier():
    for example in generate_examples("cbq_lambada_news", 30, seed=0):
        target = example["target"]
        assert target.isalpha() and len(target) >= MIN_TARGET_CHARS
        assert target.lower() in example["context"].lower()
        assert not example["context"].endswith(" ")


@pytest.mark.parametrize("name", ["cbq_hellaswag_wiki", "cbq_hellaswag_news"])
def test_distractors_come_from_other_documents(name):
    docs = [flat(doc) for doc in documents(OFFLINE_TASKS[name].corpus, "eval")]
    examples = generate_examples(name, 40, seed=0)
    for example in examples:
        choices, label = example["choices"], example["label"]
        assert len(set(choices)) == N_CHOICES
        for wrong in choices[:label] + choices[label + 1 :]:
            assert wrong not in docs[example["doc"]]
            assert any(wrong in doc for i, doc in enumerate(docs) if i != example["doc"])
    assert len({example["label"] for example in examples}) == N_CHOICES  # the gold moves


# ---------------------------------------------------------------------------------------
# lm-eval on the in-memory model


def test_lambada_scoring_counts_exactly_the_greedy_targets(tiny_llama, tmp_path, monkeypatch):
    """Targets that are the tiny model's greedy next token score 1, others 0."""
    model, tokenizer = tiny_llama
    hits, misses = _controlled_lambada_examples(model, tokenizer)
    monkeypatch.setattr(zeroshot, "generate_examples", lambda *_: hits + misses)
    cfg = ZeroShotConfig(tasks=["cbq_lambada_wiki"])
    results = evaluate_zeroshot(model, tokenizer, prepare_zeroshot(cfg, tmp_path))
    assert results.tasks["cbq_lambada_wiki"].n_examples == len(hits) + len(misses)
    assert results.metrics()["zeroshot/cbq_lambada_wiki/acc"] == len(hits) / (
        len(hits) + len(misses)
    )


def _controlled_lambada_examples(model, tokenizer) -> tuple[list[dict], list[dict]]:
    """Contexts from the tiny model's training text whose greedy next token is a word; the
    hit targets are those words, the miss targets other one-token words."""
    from cbq.models.tiny import TRAINING_TEXT

    words = [
        token.strip()
        for token in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 3
    ]
    hits, misses = [], []
    for line in TRAINING_TEXT.splitlines():
        context = " ".join(line.split()[:6])
        ids = tokenizer(context).input_ids
        with torch.no_grad():
            greedy = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        token = tokenizer.convert_ids_to_tokens(greedy)
        if token.startswith("Ġ") and token[1:].isalpha() and _one_token(tokenizer, context, token):
            hits.append({"context": context, "target": token[1:]})
            wrong = next(w for w in words if w != token and _one_token(tokenizer, context, w))
            misses.append({"context": context, "target": wrong[1:]})
    assert len(hits) >= 2, "the tiny model predicts too few whole words to build the case"
    return hits[:3], misses[:2]


def _one_token(tokenizer, context: str, token: str) -> bool:
    """`context + " word"` tokenizes as the context's tokens plus this one token."""
    whole = tokenizer(context + " " + token[1:]).input_ids
    return whole == [*tokenizer(context).input_ids, tokenizer.convert_tokens_to_ids(token)]


def test_offline_tasks_run_on_the_quantized_model_in_memory(tiny_run, tmp_path):
    overrides = [NEWS_TASKS, "eval.zeroshot.n_examples=6", "eval.zeroshot.limit=4"]
    fp, record = tiny_run("llama", "method=fp", *overrides, run_dir=tmp_path / "fp")
    rtn, _ = tiny_run("llama", "method=rtn", "quant=w2a16g64", *overrides, run_dir=tmp_path / "q")
    stats = record["stats"]
    for name in ("cbq_lambada_news", "cbq_hellaswag_news"):
        assert stats[f"zeroshot/{name}/n_examples"] == 4
        data = tmp_path / "fp" / "zeroshot" / "tasks" / f"{name}.jsonl"
        assert len(data.read_text().splitlines()) == 6
    assert stats["zeroshot/cbq_hellaswag_news/chance_acc"] == 1 / N_CHOICES
    assert stats["zeroshot/cbq_lambada_news/chance_acc"].startswith("~0")
    assert stats["zeroshot/skipped"] == {}
    for metric in ("cbq_lambada_news/acc", "cbq_hellaswag_news/acc", "cbq_hellaswag_news/acc_norm"):
        assert 0.0 <= fp[f"zeroshot/{metric}"] <= 1.0
    assert {"zeroshot_data", "eval_zeroshot"} <= set(record["timing_s"])
    # the saved model is FP: a different score means lm-eval ran the quantized model in memory
    lambada_ppl = "zeroshot/cbq_lambada_news/perplexity"
    assert rtn[lambada_ppl] != pytest.approx(fp[lambada_ppl], rel=1e-3)


# ---------------------------------------------------------------------------------------
# hub tasks without the hub


def test_missing_hub_task_is_skipped_and_recorded(tiny_run):
    metrics, record = tiny_run(
        "llama",
        "method=fp",
        "eval.ppl=false",
        "eval.zeroshot.tasks=[cbq_lambada_news,piqa]",
        "eval.zeroshot.n_examples=3",
        "eval.zeroshot.on_missing=skip",
    )
    skipped = record["stats"]["zeroshot/skipped"]
    assert list(skipped) == ["piqa"] and "piqa" in skipped["piqa"]
    assert "zeroshot/cbq_lambada_news/acc" in metrics
    assert not any(key.startswith("zeroshot/piqa") for key in metrics)


def test_missing_hub_task_fails_fast_before_the_model_loads(tiny_run, tmp_path):
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        tiny_run("llama", "method=fp", "eval.zeroshot.tasks=[cbq_lambada_news,hellaswag]")
    assert time.perf_counter() - start < 30
    assert "'hellaswag'" in str(info.value)
    assert "eval.zeroshot.on_missing=skip" in str(info.value)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "load_model" not in record["timing_s"]


def test_unreachable_hub_reads_the_local_cache(tiny_llama, tmp_path, monkeypatch):
    """Hub unreachable, offline mode not set: the task's data is loaded in offline mode (here
    a stand-in for the local HF cache: lambada_openai's format), no download is attempted."""
    offline_at_load = []

    def cached_lambada(path, name=None, **_):
        offline_at_load.append(datasets.config.HF_HUB_OFFLINE)
        texts = ["the river runs past the old mill and under the stone bridge"] * 3
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", cached_lambada)
    prepared = prepare_zeroshot(ZeroShotConfig(tasks=["lambada_openai"]), tmp_path)
    assert offline_at_load == [True] and datasets.config.HF_HUB_OFFLINE is False
    results = evaluate_zeroshot(*tiny_llama, prepared)
    assert results.tasks["lambada_openai"].n_examples == 3
    assert 0.0 <= results.metrics()["zeroshot/lambada_openai/acc"] <= 1.0


# ---------------------------------------------------------------------------------------
# config


def test_unknown_task_rejected_naming_the_field_and_the_known_tasks(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["eval.zeroshot.tasks=[cbq_lambada_wiki,lambada]"]))
    message = str(info.value)
    assert "eval.zeroshot.tasks[1]: unknown task 'lambada'" in message
    assert "cbq_hellaswag_wiki" in message and "lambada_openai" in message


def test_bad_zeroshot_sizes_rejected(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["eval.zeroshot.n_examples=0", "eval.zeroshot.limit=0"]))
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("option", ["none", "offline", "paper"])
def test_zeroshot_options_compose(compose_cfg, option):
    cfg = validate(compose_cfg([f"zeroshot={option}"])).eval.zeroshot
    assert cfg.on_missing is OnMissing.fail
    assert bool(cfg.tasks) == (option != "none")
    assert all(task in offline_tasks.OFFLINE_TASKS for task in cfg.tasks) == (option != "paper")
