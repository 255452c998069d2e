"""Model adapters on tiny random models: block-by-block forward and exact scale folding."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from cbq.models import BlockContext, ScaleGroup, adapter_for, tiny_model, tiny_tokenizer
from cbq.models.adapter import consumer_weight, gqa_column_channels
from cbq.models.tiny import TRAINING_TEXT, tiny_config

from helpers import logits as blockwise_logits

# name -> (tiny family, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "opt": ("opt", {}),
    # opt-350m-like: post-LN blocks, 32-wide embeddings with project_in / project_out.
    "opt-postln": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    "bloom": ("bloom", {}),
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "gemma3": ("gemma3", {}),
}

QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LINEARS = {
    "opt": [*QKV, "self_attn.out_proj", "fc1", "fc2"],
    "bloom": [
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ],
    "llama": [*QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
LINEARS |= {"qwen2": LINEARS["llama"], "mistral": LINEARS["llama"], "gemma3": LINEARS["llama"]}

GROUPS = {
    "opt": ["attn_in", "mlp_in", "attn_out", "mlp_out"],
    "opt-postln": ["attn_out", "mlp_out"],
    "bloom": ["attn_in", "mlp_in", "attn_out"],
    "llama": ["attn_in", "mlp_in", "attn_out", "mlp_out"],
}
GROUPS |= {"qwen2": GROUPS["llama"], "mistral": GROUPS["llama"], "gemma3": GROUPS["llama"]}


def build(variant: str, seed: int = 0) -> nn.Module:
    family, overrides = VARIANTS[variant]
    return tiny_model(family, seed=seed, **overrides)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """2 x 32 real tokens from the tokenizer's own text."""
    tokens = tiny_tokenizer()(TRAINING_TEXT).input_ids
    return torch.tensor([tokens[:32], tokens[100:132]])


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def random_scale(n: int, seed: int) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.5)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- running blocks ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_blocks_reproduces_hf_logits(variant: str, ids: torch.Tensor) -> None:
    model = build(variant)
    assert_same(blockwise_logits(model, ids), logits(model, ids))


def test_gemma3_multimodal_text_part_reproduces_hf_logits(ids: torch.Tensor) -> None:
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    config = Gemma3Config(
        text_config=tiny_config("gemma3").to_dict(),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=511,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    adapter = adapter_for(model)
    assert adapter.config.hidden_size == 64 and len(adapter.blocks()) == 2
    assert_same(blockwise_logits(model, ids), logits(model, ids))


def test_local_attention_matters_for_gemma3(ids: torch.Tensor) -> None:
    """Block 0 is local (window 8 < 32 tokens), block 1 global; both follow the config."""
    model = build("gemma3")
    adapter = adapter_for(model)
    ctx = adapter.block_context(adapter.embed(ids))
    local = ctx.per_block[0]["attention_mask"]  # sdpa: bool, True = attend
    assert bool(local[0, 0, 20, 15]) and not bool(local[0, 0, 20, 5])
    assert ctx.per_block[1]["attention_mask"] is None  # plain causal: sdpa's is_causal path
    windowed = logits(model, ids)
    model.config.sliding_window = 64
    assert (logits(model, ids) - windowed).abs().max() > 1e-3
    assert_same(blockwise_logits(model, ids), logits(model, ids))


def test_context_serves_other_batch_sizes_and_devices(ids: torch.Tensor) -> None:
    for variant in ("bloom", "gemma3"):
        adapter = adapter_for(build(variant))
        with torch.no_grad():
            hidden = adapter.embed(ids)
            ctx = adapter.block_context(hidden)
            both = adapter.forward_block(0, hidden, ctx)
            one = adapter.forward_block(0, hidden[1:], ctx)
            moved = adapter.forward_block(0, hidden, ctx.to("cpu"))
        assert isinstance(ctx, BlockContext) and ctx.seqlen == 32
        assert_same(one, both[1:])
        assert torch.equal(moved, both)


def test_forward_block_keeps_gradients(ids: torch.Tensor) -> None:
    adapter = adapter_for(build("llama"))
    hidden = adapter.embed(ids).detach().requires_grad_(True)
    out = adapter.forward_block(0, hidden, adapter.block_context(hidden))
    out.square().mean().backward()
    assert hidden.grad is not None and adapter.blocks()[0].self_attn.q_proj.weight.grad is not None


def test_tiny_models_are_fast_deterministic_and_leave_the_rng_alone() -> None:
    state = torch.random.get_rng_state()
    start = time.perf_counter()
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama", seed=1)
    assert time.perf_counter() - start < 3.0
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training and a.config.use_cache is False
    assert a.config.vocab_size == len(tiny_tokenizer()) == 512
    assert a.config.num_key_value_heads == 2


def test_tiny_tokenizer_round_trips() -> None:
    tokenizer = tiny_tokenizer()
    text = "Quantization rounds 4096 weights, doesn't it? Ünïcödé too."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer(TRAINING_TEXT).input_ids == tiny_tokenizer()(TRAINING_TEXT).input_ids
    assert tokenizer is not tiny_tokenizer()  # fresh objects: callers may mutate them
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id is not None


# --- structure ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_linears_are_named_per_block(variant: str) -> None:
    model = build(variant)
    adapter = adapter_for(model)
    family = VARIANTS[variant][0]
    assert adapter.family == ("llama" if family in ("qwen2", "mistral") else family)
    for block in adapter.blocks():
        linears = adapter.linears(block)
        assert list(linears) == LINEARS[family] == adapter.linear_names()
        assert all(type(linear) is nn.Linear for linear in linears.values())
    n_linear = sum(isinstance(m, nn.Linear) for m in adapter.blocks().modules())
    assert n_linear == len(adapter.blocks()) * len(adapter.linear_names())


@pytest.mark.parametrize("variant", VARIANTS)
def test_scale_groups_are_consistent(variant: str) -> None:
    adapter = adapter_for(build(variant))
    block = adapter.blocks()[0]
    groups = adapter.scale_groups(block)
    assert [g.name for g in groups] == GROUPS[variant]
    for group in groups:
        assert group.consumer_names and len(group.consumer_names) == len(group.consumers)
        for name, consumer in zip(group.consumer_names, group.consumers, strict=True):
            assert block.get_submodule(name) is consumer
        assert block.get_submodule(group.producer_name) is group.producer
        columns = {consumer_weight(c).shape[1] for c in group.consumers}
        assert columns == {group.num_columns}
        assert group.expand(torch.ones(group.num_channels)).shape == (group.num_columns,)


# --- folding -----------------------------------------------------------------------------
def fold_cases() -> list[tuple[str, str]]:
    return [(variant, group) for variant in VARIANTS for group in GROUPS[variant]]


def group_named(model: nn.Module, index: int, name: str) -> ScaleGroup:
    adapter = adapter_for(model)
    return next(g for g in adapter.scale_groups(adapter.blocks()[index]) if g.name == name)


@pytest.mark.parametrize(("variant", "group_name"), fold_cases())
def test_folding_a_scale_preserves_the_function(
    variant: str, group_name: str, ids: torch.Tensor
) -> None:
    model = build(variant)
    producer_only = copy.deepcopy(model)
    reference = logits(model, ids)
    for index in range(len(adapter_for(model).blocks())):
        group = group_named(model, index, group_name)
        scale = random_scale(group.num_channels, seed=index)
        adapter_for(model).fold_scale(group, scale)
        # Half a fold must change the output, or the check above could never fail.
        adapter_for(producer_only).fold_into_producer(
            group_named(producer_only, index, group_name), scale
        )
    assert_same(logits(model, ids), reference)
    assert (logits(producer_only, ids) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_folding_every_group_at_once_preserves_the_function(
    variant: str, ids: torch.Tensor
) -> None:
    model = build(variant)
    reference = logits(model, ids)
    adapter = adapter_for(model)
    for index, block in enumerate(adapter.blocks()):
        for k, group in enumerate(adapter.scale_groups(block)):
            adapter.fold_scale(group, random_scale(group.num_channels, seed=10 * index + k))
    assert_same(logits(model, ids), reference)
    assert_same(blockwise_logits(model, ids), reference)


def test_gqa_value_scale_must_follow_the_kv_head(ids: torch.Tensor) -> None:
    """One scale per v channel, copied to the o_proj columns of every query head reading it."""
    model = build("llama")
    reference = logits(model, ids)
    group = group_named(model, 0, "attn_out")
    assert group.num_channels == 2 * 16 and group.num_columns == 4 * 16
    scale = random_scale(group.num_channels, seed=3)
    # Wrong expansion: tiling the kv channels pairs query head 1 with kv head 1 (not 0).
    attn = adapter_for(model).blocks()[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight /= scale.view(-1, 1)
        attn.o_proj.weight *= scale.repeat(2).view(1, -1)
    assert (logits(model, ids) - reference).abs().max() > 1e-3


def test_gqa_column_map_and_reduction() -> None:
    channels = gqa_column_channels(num_heads=4, num_kv_heads=2, head_dim=3)
    assert channels.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert gqa_column_channels(4, 4, 3) is None
    linear = nn.Linear(8, 6)
    group = ScaleGroup("g", linear, [nn.Linear(12, 5)], column_channels=channels)
    per_column = torch.arange(12.0)
    assert group.reduce_columns(per_column).tolist() == [3, 4, 5, 9, 10, 11]
    assert group.reduce_columns(per_column, "mean").tolist() == [1.5, 2.5, 3.5, 7.5, 8.5, 9.5]
    assert group.expand(torch.arange(6.0)).tolist() == channels.float().tolist()


def test_bloom_value_rows_pick_v_out_of_the_fused_projection() -> None:
    adapter = adapter_for(build("bloom"))
    rows = adapter.value_rows()
    head_dim = 16
    assert rows[:3].tolist() == [2 * head_dim, 2 * head_dim + 1, 2 * head_dim + 2]
    assert rows[head_dim].item() == 3 * head_dim + 2 * head_dim  # head 1 starts after q,k,v of 0
    assert rows.numel() == 64 and rows.unique().numel() == 64


class Wrapped(nn.Module):
    """Stands in for a QuantLinear: the real linear sits under ``.linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_folding_reaches_through_wrapped_linears(ids: torch.Tensor) -> None:
    model = build("qwen2")
    reference = logits(model, ids)
    adapter = adapter_for(model)
    attn = adapter.blocks()[1].self_attn
    attn.v_proj, attn.o_proj = Wrapped(attn.v_proj), Wrapped(attn.o_proj)
    for group in adapter.scale_groups(adapter.blocks()[1]):
        adapter.fold_scale(group, random_scale(group.num_channels, seed=5))
    assert_same(logits(model, ids), reference)


def test_fold_rejects_bad_scales() -> None:
    adapter = adapter_for(build("opt"))
    group = adapter.scale_groups(adapter.blocks()[0])[3]  # fc1 -> ReLU -> fc2
    with pytest.raises(ValueError, match="positive"):
        adapter.fold_scale(group, -torch.ones(group.num_channels))
    with pytest.raises(ValueError, match="channels"):
        adapter.fold_scale(group, torch.ones(group.num_channels + 1))


def test_gemma3_norm_fold_uses_one_plus_weight() -> None:
    adapter = adapter_for(build("gemma3"))
    norm = adapter.blocks()[0].input_layernorm
    before = norm.weight.detach().clone()
    group = adapter.scale_groups(adapter.blocks()[0])[0]
    adapter.fold_scale(group, torch.full((64,), 2.0))
    torch.testing.assert_close(1 + norm.weight.detach(), (1 + before) / 2)
