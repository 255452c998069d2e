"""Evaluation: perplexity (GPTQ protocol)."""

from cbq.eval.perplexity import perplexity

__all__ = ["perplexity"]
