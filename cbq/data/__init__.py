"""Corpora (calibration and evaluation text) and the token windows cut from them."""

from cbq.data.calibration import (
    calibration_batch,
    clear_token_cache,
    evaluation_windows,
    token_stream,
    tokenize,
)
from cbq.data.corpora import (
    CORPORA,
    HUB_CORPORA,
    PACKAGED_CORPORA,
    HubUnavailableError,
    calibration_text,
    clear_corpus_caches,
    documents,
    evaluation_text,
    is_text_file,
    metric_name,
    validate_corpus_name,
)


def clear_caches() -> None:
    """Forget cached token streams and loaded hub splits (e.g. between tests)."""
    clear_token_cache()
    clear_corpus_caches()


__all__ = [
    "CORPORA",
    "HUB_CORPORA",
    "PACKAGED_CORPORA",
    "HubUnavailableError",
    "calibration_batch",
    "calibration_text",
    "clear_caches",
    "documents",
    "evaluation_text",
    "evaluation_windows",
    "is_text_file",
    "metric_name",
    "token_stream",
    "tokenize",
    "validate_corpus_name",
]
