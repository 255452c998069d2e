"""cbq: Cross-Block Quantization and PTQ baselines for LLMs."""

import logging

__version__ = "0.1.0"

# transformers imports torchao (cbq.lowbit's kernels) whenever it is installed. On a CPU torch,
# torchao warns that its CUDA extensions do not load and torch warns as torchao registers its
# enums: four lines of noise at the start of every run, about nothing cbq uses.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
