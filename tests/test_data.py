"""cbq.data: corpora, their fixed splits, calibration sampling and evaluation windows."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from cbq import data
from cbq.data import calibration, corpora

ALLOWED = "allowed: wikitext2, c4, ptb, wiki-sample, lee-news, or an absolute path to a .txt file"
BOS = 256


class ByteTokenizer:
    """Stand-in for an HF tokenizer: UTF-8 bytes as ids and, by default, one BOS in front."""

    def __init__(self, *, bos: bool = True, name_or_path: str = "test/bytes") -> None:
        self.bos = bos
        self.name_or_path = name_or_path
        self.calls = 0

    def __len__(self) -> int:
        return 257

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict:
        self.calls += 1
        ids = list(text.encode("utf-8"))
        return {"input_ids": [BOS, *ids] if add_special_tokens and self.bos else ids}


@pytest.fixture(autouse=True)
def _fresh_caches():
    data.clear_caches()
    yield
    data.clear_caches()


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def txt_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_notes.txt"
    path.write_text("".join(f"line {i:03d} of the notes file.\n" for i in range(100)), "utf-8")
    return path


def is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    views = stream.unfold(0, window.numel(), 1)
    return bool((views == window).all(dim=1).any())


# --- names -------------------------------------------------------------------------------


def test_validate_accepts_names_and_existing_absolute_txt(txt_file: Path) -> None:
    for name in data.CORPORA:
        data.validate_corpus_name(name)
    data.validate_corpus_name(str(txt_file))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("wikitext", "unknown corpus 'wikitext'"),
        ("notes.txt", "corpus path 'notes.txt' is not absolute"),
        ("/nonexistent/notes.txt", "corpus file '/nonexistent/notes.txt' does not exist"),
        ("/etc/hostname.json", "corpus path '/etc/hostname.json' is not a .txt file"),
    ],
)
def test_validate_rejects_with_field_and_allowed_names(value: str, problem: str) -> None:
    with pytest.raises(ValueError) as err:
        data.validate_corpus_name(value, field="data.eval[1]")
    assert str(err.value) == f"data.eval[1]: {problem}; {ALLOWED}"


def test_validate_default_field_message() -> None:
    with pytest.raises(ValueError, match=r"^data\.calib / data\.eval: unknown corpus 'x'; allowed"):
        data.validate_corpus_name("x")


def test_metric_name(txt_file: Path) -> None:
    assert data.metric_name("wiki-sample") == "wiki-sample"
    assert data.metric_name("c4") == "c4"
    assert data.metric_name(str(txt_file)) == "my_notes"


# --- packaged corpora --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_docs", "n_words"),
    [("wiki-sample", (95, 115), (420_000, 520_000)), ("lee-news", (290, 300), (55_000, 65_000))],
)
def test_packaged_split_is_disjoint_and_60_40(name: str, n_docs: tuple, n_words: tuple) -> None:
    calib, evaluation = data.documents(name, "calib"), data.documents(name, "eval")
    everything = calib + evaluation
    assert n_docs[0] <= len(everything) <= n_docs[1]
    assert n_words[0] <= sum(len(d.split()) for d in everything) <= n_words[1]
    assert calib and evaluation
    assert not set(calib) & set(evaluation)
    assert abs(len(calib) / len(everything) - 0.6) < 0.02
    # the split seed is fixed: asking again gives the same parts
    assert data.documents(name, "eval") == evaluation
    assert data.evaluation_text(name, calibrating_on_same=False) == "\n\n".join(evaluation)
    assert data.calibration_text(name) == "\n\n".join(calib)


def test_wiki_sample_is_clean_text_with_paragraphs() -> None:
    text = data.calibration_text("wiki-sample")
    assert "\n\n" in text and "\n\n\n" not in text
    assert "''" not in text and "#REDIRECT" not in text.upper()
    assert "[[" not in text and "{{" not in text


# --- calibration sampling ----------------------------------------------------------------


def test_calibration_batch_is_seeded_shaped_and_contiguous(tok: ByteTokenizer) -> None:
    batch = data.calibration_batch("lee-news", tok, n_samples=8, seqlen=32, seed=3)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    again = data.calibration_batch("lee-news", tok, n_samples=8, seqlen=32, seed=3)
    other = data.calibration_batch("lee-news", tok, n_samples=8, seqlen=32, seed=4)
    assert torch.equal(batch, again)
    assert not torch.equal(batch, other)
    stream = data.token_stream("lee-news", tok, part="calib")
    assert all(is_slice_of(window, stream) for window in batch)
    evaluation = data.token_stream("lee-news", tok, part="eval")
    assert not any(is_slice_of(window, evaluation) for window in batch)


def test_calibration_does_not_touch_global_rng(tok: ByteTokenizer) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    data.calibration_batch("lee-news", tok, n_samples=4, seqlen=16, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_needs_seqlen_plus_one_tokens(tmp_path: Path, tok: ByteTokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij\n" * 7 + "klm\n" * 3, "utf-8")  # calib part: 76 + BOS tokens
    n_calib = data.token_stream(str(path), tok, part="calib").numel()
    data.calibration_batch(str(path), tok, n_samples=2, seqlen=n_calib - 1, seed=0)
    with pytest.raises(ValueError, match=r"fewer than seqlen \+ 1"):
        data.calibration_batch(str(path), tok, n_samples=2, seqlen=n_calib, seed=0)


# --- evaluation windows ------------------------------------------------------------------


def test_evaluation_windows_are_consecutive_and_truncatable(tok: ByteTokenizer) -> None:
    stream = data.token_stream("lee-news", tok, part="eval")
    windows = data.evaluation_windows("lee-news", tok, seqlen=128, calibrating_on_same=True)
    assert windows.shape == (stream.numel() // 128, 128)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    first = data.evaluation_windows(
        "lee-news", tok, seqlen=128, calibrating_on_same=False, max_windows=3
    )
    assert torch.equal(first, windows[:3])
    first.zero_()  # callers may write into the result without corrupting the cache
    assert torch.equal(data.token_stream("lee-news", tok, part="eval"), stream)


def test_one_bos_at_the_start_of_a_stream_only(tok: ByteTokenizer) -> None:
    stream = data.token_stream("wiki-sample", tok, part="eval")
    assert stream[0] == BOS and int((stream == BOS).sum()) == 1
    plain = data.token_stream(
        "wiki-sample", ByteTokenizer(bos=False, name_or_path="b"), part="eval"
    )
    assert torch.equal(plain, stream[1:])


def test_token_streams_are_cached_per_tokenizer(tok: ByteTokenizer) -> None:
    first = data.token_stream("lee-news", tok, part="calib")
    assert data.token_stream("lee-news", ByteTokenizer(), part="calib") is first  # same name
    assert tok.calls == 1
    unnamed = ByteTokenizer(name_or_path="")
    data.token_stream("lee-news", unnamed, part="calib")
    data.token_stream("lee-news", unnamed, part="calib")
    assert unnamed.calls == 1
    n_cached = len(calibration._STREAMS)
    del unnamed
    gc.collect()
    assert len(calibration._STREAMS) == n_cached - 1


def test_real_hf_tokenizer_without_length_warning(capfd: pytest.CaptureFixture) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(data.calibration_text("lee-news").split()))
    vocab = {"[UNK]": 0, "<s>": 1} | {w: i + 2 for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", unk_token="[UNK]", model_max_length=64
    )
    batch = data.calibration_batch("lee-news", hf, n_samples=4, seqlen=64, seed=0)
    stream = data.token_stream("lee-news", hf, part="calib")
    assert batch.shape == (4, 64) and stream[0] == 1 and int((stream == 1).sum()) == 1
    assert int((stream == 0).sum()) == 0  # every calibration word is in the vocabulary
    assert "longer than the specified maximum" not in capfd.readouterr().err


# --- .txt files --------------------------------------------------------------------------


def test_txt_file_split_and_whole_file_for_eval_only(txt_file: Path, tok: ByteTokenizer) -> None:
    name, text = str(txt_file), txt_file.read_text("utf-8")
    calib = data.calibration_text(name)
    held_out = data.evaluation_text(name, calibrating_on_same=True)
    assert calib + "\n" + held_out == text
    assert calib.endswith(".") and held_out.startswith("line 070")  # cut at a line boundary
    assert abs(len(calib) / len(text) - 0.7) < 0.02
    assert data.evaluation_text(name, calibrating_on_same=False) == text
    whole = data.evaluation_windows(name, tok, seqlen=16, calibrating_on_same=False)
    part = data.evaluation_windows(name, tok, seqlen=16, calibrating_on_same=True)
    assert whole.shape[0] == (len(text) + 1) // 16
    assert part.shape[0] == (len(held_out) + 1) // 16


def test_txt_file_errors(tmp_path: Path, tok: ByteTokenizer) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\nbar\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        data.calibration_text(str(latin))
    one_line = tmp_path / "one.txt"
    one_line.write_text("no newline anywhere", "utf-8")
    with pytest.raises(ValueError, match="at least two non-empty lines"):
        data.calibration_text(str(one_line))
    assert data.evaluation_text(str(one_line), calibrating_on_same=False) == "no newline anywhere"
    with pytest.raises(ValueError, match="unknown corpus 'my_notes'"):
        data.evaluation_windows("my_notes", tok, seqlen=8, calibrating_on_same=False)


# --- hub corpora (in-memory fixtures in the real format) ---------------------------------

WIKITEXT = {
    "train": ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a game . \n"]
    * 20,
    "test": ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n"] * 20,
}
PTB = {
    "train": [" aer banknote berlitz calloway centrust cluett fromstein"] * 30,
    "validation": [" consumers may want to move their telephones a little closer"] * 30,
}
C4 = {  # documents of 20 to 200 bytes: about half are longer than seqlen = 100
    split: [f"{split} document {i}: " + "w " * (2 + 3 * i) for i in range(30)]
    for split in ("train", "validation")
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((path, name, kwargs))
        split = kwargs["split"]
        if path == "wikitext":
            return datasets.Dataset.from_dict({"text": WIKITEXT[split]})
        if path == "ptb_text_only":
            return datasets.Dataset.from_dict({"sentence": PTB[split], "x": [0] * 30})
        return datasets.Dataset.from_dict({"text": C4[split], "url": ["u"] * 30})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: True)
    return calls


def test_wikitext2_and_ptb_use_the_gptq_splits(hub: list, tok: ByteTokenizer) -> None:
    assert data.evaluation_text("wikitext2", calibrating_on_same=True) == "\n\n".join(
        WIKITEXT["test"]
    )
    assert data.calibration_text("ptb") == "\n\n".join(PTB["train"])
    windows = data.evaluation_windows("ptb", tok, seqlen=64, calibrating_on_same=False)
    expected = tok("\n\n".join(PTB["validation"]))["input_ids"]
    assert torch.equal(windows.flatten(), torch.tensor(expected[: windows.numel()]))
    batch = data.calibration_batch("wikitext2", tok, n_samples=5, seqlen=40, seed=0)
    assert batch.shape == (5, 40)
    assert all(is_slice_of(w, data.token_stream("wikitext2", tok, part="calib")) for w in batch)
    assert [(c[0], c[1], c[2]["split"]) for c in hub] == [
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("ptb_text_only", "penn_treebank", "train"),
        ("ptb_text_only", "penn_treebank", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "train"),
    ]


def test_c4_samples_documents_like_gptq(hub: list, tok: ByteTokenizer) -> None:
    seqlen = 100
    long_docs = [torch.tensor(tok(d)["input_ids"]) for d in C4["train"]]
    long_docs = [d for d in long_docs if d.numel() > seqlen]
    batch = data.calibration_batch("c4", tok, n_samples=6, seqlen=seqlen, seed=0)
    assert batch.shape == (6, seqlen)
    assert torch.equal(batch, data.calibration_batch("c4", tok, n_samples=6, seqlen=seqlen, seed=0))
    assert all(any(is_slice_of(w, d) for d in long_docs) for w in batch)
    windows = data.evaluation_windows("c4", tok, seqlen=seqlen, calibrating_on_same=False)
    assert windows.shape == (256, seqlen)
    first = data.evaluation_windows(
        "c4", tok, seqlen=seqlen, calibrating_on_same=False, max_windows=5
    )
    assert torch.equal(first, windows[:5])
    files = {c[2]["split"]: c[2]["data_files"] for c in hub}
    assert files == {
        "train": {"train": "en/c4-train.00000-of-01024.json.gz"},
        "validation": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
    }
    with pytest.raises(ValueError, match="no document with more than seqlen = 1000"):
        data.calibration_batch("c4", tok, n_samples=1, seqlen=1000, seed=0)


def test_hub_unreachable_fails_fast_naming_offline_corpora(
    monkeypatch: pytest.MonkeyPatch, tok: ByteTokenizer
) -> None:
    def must_not_be_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_dataset must not be retried against an unreachable hub")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(data.HubUnavailableError) as err:
        data.evaluation_windows("wikitext2", tok, seqlen=8, calibrating_on_same=False)
    assert "'wikitext2'" in str(err.value) and "wiki-sample, lee-news" in str(err.value)


def test_hub_probe_answers_within_seconds() -> None:
    start = time.monotonic()
    assert not corpora.hub_reachable("http://127.0.0.1:9", timeout=2.0)
    assert time.monotonic() - start < 3.0


def test_hub_load_errors_name_the_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_miss(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline_miss)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # skips the probe
    with pytest.raises(data.HubUnavailableError, match=r"corpus 'ptb'.*HF_DATASETS_OFFLINE"):
        data.calibration_text("ptb")


def test_with_the_tiny_tokenizer() -> None:
    tiny = pytest.importorskip("cbq.models.tiny").tiny_tokenizer()
    batch = data.calibration_batch("lee-news", tiny, n_samples=4, seqlen=128, seed=0)
    windows = data.evaluation_windows(
        "lee-news", tiny, seqlen=128, calibrating_on_same=True, max_windows=4
    )
    assert batch.shape == windows.shape == (4, 128)
    assert int(batch.max()) < len(tiny) and int(windows.max()) < len(tiny)
    head = tiny.decode(data.token_stream("lee-news", tiny, part="eval")[:20])
    assert data.evaluation_text("lee-news", calibrating_on_same=True).startswith(head)
