"""Tiny random models and an offline tokenizer, for tests and notebooks.

``tiny_tokenizer()`` is a byte-level BPE (vocab 512) trained, deterministically and
without any download, on the short English text below. ``tiny_model(family)`` builds a
randomly initialised causal LM of each supported family (hidden 64, 4 heads) whose
vocabulary matches that tokenizer. Norm weights and all biases are perturbed away from
their HF initial values (ones / zeros) so that tests exercise them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from cbq.models.registry import attn_implementation_for

VOCAB_SIZE = 512
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}

TRAINING_TEXT = """\
The river runs past the old mill and under the stone bridge before it reaches the sea.
In the spring the water is high and fast, and in the summer it is low and warm.
Children play on the banks, and their parents watch from the shade of the trees.
A small boat with a red sail moves slowly against the wind, and a man waves from it.
The town has one school, two churches, a market, and a library with a green door.
Every morning the baker opens his shop at six, and the smell of bread fills the street.
People stop to buy a loaf on their way to work, and they talk about the weather.
It rained all night, they say, and the roads are wet, but the sky is clearing now.
The teacher writes a question on the board: what is the largest number you can name?
One student says a million, another says a billion, and a third says there is none.
She smiles, because the third answer is the right one, and she explains why.
For any number you name, you can add one to it, and the new number is larger.
Mathematics is full of ideas like this one, simple to state and deep to understand.
Later that day the class reads a story about a king who wanted to count the stars.
He asked his wisest advisers, and each of them gave him a different answer.
The first said the stars were too many to count, the second said they were infinite.
The third advisor took a long time, then said that counting was the wrong question.
What matters, he said, is not how many stars there are but how we find our way by them.
Sailors have always used the stars to find their way across the open water at night.
They learned the positions of the bright stars and the shapes they make in the sky.
A model of language learns in a similar way: it finds patterns in a very large text.
It reads billions of words and learns which word is likely to come after the others.
Such models are large, and running them needs memory and time on fast computers.
To make them smaller, we can store each weight with fewer bits than before.
This is called quantization, and it can shrink a model by four times or more.
The difficulty is to keep the quality of the model while the numbers become coarse.
A weight that was stored with sixteen bits may be rounded to one of sixteen levels.
Rounding to the nearest level is simple, but better methods learn how to round.
Some methods look at one layer at a time, and others look at several blocks at once.
Looking across blocks lets the method account for the way errors grow with depth.
Outliers, a few very large values, make quantization harder, so they are handled first.
The weather report for tomorrow says it will be sunny in the morning and cloudy later.
Farmers hope for rain in the east, where the fields have been dry for many weeks.
In the city, the trains are running late because of work on the northern line.
The museum will open a new exhibition of paintings from the last two hundred years.
Tickets cost ten pounds for adults, five for students, and children enter for free.
A famous writer once said that a library is a place where the past talks to the future.
The old woman who lives by the bridge keeps bees, and she sells honey at the market.
Her garden is full of flowers, and the bees fly from one to another all day long.
When the sun goes down the town becomes quiet, and the lights come on one by one.
Numbers like 3, 14, 159, 2048 and 4096 appear in tables, dates and addresses.
On 12 March 1998 the council voted 7 to 2 to build a second bridge across the river.
"""


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


@functools.cache
def _tokenizer_json() -> str:
    return _train_tokenizer().to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (vocab 512); training is cached per process."""
    backend = Tokenizer.from_str(_tokenizer_json())
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def _common(vocab_size: int) -> dict[str, Any]:
    tokenizer = tiny_tokenizer()
    return {
        "vocab_size": vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": False,
    }


def _llama_like(vocab_size: int) -> dict[str, Any]:
    return {
        **_common(vocab_size),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }


def _opt(v: int) -> PretrainedConfig:
    return OPTConfig(
        **_common(v),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        dropout=0.0,
    )


def _bloom(v: int) -> PretrainedConfig:
    return BloomConfig(**_common(v), hidden_size=64, n_layer=2, n_head=4)


def _llama(v: int) -> PretrainedConfig:
    return LlamaConfig(**_llama_like(v))


def _qwen2(v: int) -> PretrainedConfig:
    return Qwen2Config(**_llama_like(v))


def _mistral(v: int) -> PretrainedConfig:
    # Every Mistral layer uses the sliding window; 8 makes it bite on 32-token inputs.
    return MistralConfig(**_llama_like(v), sliding_window=8)


def _gemma3(v: int) -> PretrainedConfig:
    return Gemma3TextConfig(
        **_llama_like(v),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )


TINY_CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "opt": _opt,
    "bloom": _bloom,
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma3": _gemma3,
}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_CONFIGS)}")
    config = TINY_CONFIGS[family](len(tiny_tokenizer()))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **config_overrides: Any) -> PreTrainedModel:
    """A random fp32 causal LM of ``family`` in eval mode (global RNG state untouched).

    ``config_overrides`` are set on the config before the model is built, e.g.
    ``tiny_model("opt", do_layer_norm_before=False, word_embed_proj_dim=32)`` for an
    opt-350m-like post-LN model with project_in/out.
    """
    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=torch.float32,
            attn_implementation=attn_implementation_for(config.model_type),
        )
        _perturb(model)
    return model.eval()


def _perturb(model: nn.Module) -> None:
    """Give norms non-trivial gains/shifts and linears non-zero biases."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02)
            elif "Norm" in type(module).__name__:
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                if weight is not None:
                    weight.add_(torch.randn_like(weight) * 0.1)
                if bias is not None:
                    bias.normal_(0.0, 0.1)
