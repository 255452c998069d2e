"""cbq: Cross-Block Quantization and PTQ baselines for LLMs."""

__version__ = "0.1.0"
