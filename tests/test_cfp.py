"""Coarse-to-fine pre-processing on every tiny family, with a planted massive channel."""

from __future__ import annotations

import copy

import pytest
import torch

from cbq.cfp import (
    SCALED_COLUMNS_ATTR,
    activation_channel_scales,
    apply_cfp_to_block,
    collect_channel_absmax,
    migrate_activations,
    scale_activation_outliers,
    truncate_block_weights,
    truncate_weight_outliers,
)
from cbq.models import ModelAdapter, tiny_tokenizer
from cbq.models.adapter import consumer_weight
from cbq.outliers import detect_outliers
from cbq.quant.qlinear import wrap_block
from cbq.quant.quantizer import QuantSpec
from cbq.transforms import GroupSearch, capture_inputs, first_consumer

from helpers import PLANTED, W4A4, attn_in, logits, planted

FAMILIES = ["opt", "bloom", "llama", "qwen2", "mistral", "gemma3"]
# clip_to="reserved" so that the lone planted channel is really scaled (with the default
# "threshold" a single outlier channel gets s = 1).
RULE = {"clip_to": "reserved"}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    tokens = tiny_tokenizer()(
        "The river runs past the old mill and under the stone bridge before it reaches "
        "the sea. In the spring the water is high and fast, and in the summer it is low."
    ).input_ids
    return torch.tensor([tokens[:16], tokens[8:24]])


def block0_inputs(adapter: ModelAdapter, ids: torch.Tensor) -> tuple:
    with torch.no_grad():
        hidden = adapter.embed(ids)
    return hidden, adapter.block_context(hidden)


def weights(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    block = adapter.blocks()[0]
    return {name: consumer_weight(m).detach().clone() for name, m in adapter.linears(block).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_scaling_finds_the_planted_channel_and_is_exact(
    family: str, ids: torch.Tensor
) -> None:
    _, adapter = planted(family)
    reference = logits(adapter.model, ids)
    hidden, ctx = block0_inputs(adapter, ids)
    absmax = collect_channel_absmax(adapter, 0, hidden, ctx)
    group = attn_in(adapter)
    assert set(absmax) == {g.name for g in adapter.scale_groups(adapter.blocks()[0])}
    for g in adapter.scale_groups(adapter.blocks()[0]):
        assert absmax[g.name].shape == (g.num_channels,) and bool((absmax[g.name] >= 0).all())
    assert int(absmax["attn_in"].argmax()) == PLANTED

    scale = activation_channel_scales(absmax["attn_in"], **RULE)
    assert scale[PLANTED] > 5.0 and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert detect_outliers(absmax["attn_in"]).mask[PLANTED]  # the paper's default finds it

    norm_before = group.producer.weight.detach().clone()
    found = scale_activation_outliers(adapter, 0, hidden, ctx, **RULE)
    assert found["attn_in"] >= 1
    assert not torch.equal(group.producer.weight, norm_before)  # really folded
    after = logits(adapter.model, ids)
    torch.testing.assert_close(after, reference, atol=1e-4 * float(reference.abs().max()), rtol=0)
    # The planted channel is no longer an outlier of the block's attention input.
    rescaled = collect_channel_absmax(adapter, 0, hidden, ctx)["attn_in"]
    assert float(rescaled[PLANTED]) < 0.2 * float(absmax["attn_in"][PLANTED])


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_truncation_only_touches_outliers(family: str, ids: torch.Tensor) -> None:
    _, adapter = planted(family)
    hidden, ctx = block0_inputs(adapter, ids)
    scale_activation_outliers(adapter, 0, hidden, ctx, **RULE)
    block = adapter.blocks()[0]
    before = weights(adapter)
    truncated = truncate_block_weights(adapter, block, **RULE)
    after = weights(adapter)
    assert set(truncated) == set(adapter.linear_names()) and sum(truncated.values()) > 0
    for name, linear in adapter.linears(block).items():
        protected = getattr(linear, SCALED_COLUMNS_ATTR, None)
        keep = torch.ones(before[name].shape[1], dtype=torch.bool)
        if protected is not None:
            keep = ~protected
            # Columns that carry a scaled-up channel are left alone.
            assert torch.equal(after[name][:, protected], before[name][:, protected])
        old, new = before[name][:, keep], after[name][:, keep]
        outliers = detect_outliers(old, **{k: v for k, v in RULE.items() if k != "clip_to"})
        changed = old != new
        assert int(changed.sum()) == truncated[name]
        assert not bool((changed & ~outliers.mask).any())  # only outliers move
        assert torch.equal(torch.sign(new[changed]), torch.sign(old[changed]))
        if truncated[name]:
            assert float(new.abs().max()) < float(old.abs().max())
            torch.testing.assert_close(new[changed].abs().max(), new[~changed].abs().max())


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_full_cfp_on_a_block(family: str, ids: torch.Tensor) -> None:
    """weight_act: exact scaling + truncation only of unprotected outliers: small change."""
    _, adapter = planted(family)
    reference = logits(adapter.model, ids)
    hidden, ctx = block0_inputs(adapter, ids)
    stats = apply_cfp_to_block(adapter, 0, hidden, ctx, "weight+act", **RULE)
    assert stats["outlier_channels"]["attn_in"] >= 1 and sum(stats["truncated_weights"].values())
    change = (logits(adapter.model, ids) - reference).abs().max()
    assert 0 < change < 0.05 * reference.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_mode_none_changes_nothing(family: str) -> None:
    _, adapter = planted(family)
    state = copy.deepcopy(adapter.model.state_dict())
    # No forward pass either: hidden states of the wrong shape are never used.
    stats = apply_cfp_to_block(adapter, 0, torch.empty(0), None, "none")  # type: ignore[arg-type]
    assert stats == {"outlier_channels": {}, "truncated_weights": {}}
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_mode_weight_truncates_without_scaling(ids: torch.Tensor) -> None:
    _, adapter = planted("llama")
    norm = attn_in(adapter).producer.weight.detach().clone()
    hidden, ctx = block0_inputs(adapter, ids)
    stats = apply_cfp_to_block(adapter, 0, hidden, ctx, "weight", **RULE)
    assert stats["outlier_channels"] == {} and sum(stats["truncated_weights"].values()) > 0
    assert torch.equal(attn_in(adapter).producer.weight, norm)
    with pytest.raises(ValueError, match="mode"):
        apply_cfp_to_block(adapter, 0, hidden, ctx, "act")


def test_default_threshold_clip_leaves_a_lone_outlier_alone() -> None:
    weight = torch.randn(32, 16, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[0, 0] = 1.0
    before = weight.clone()
    result = truncate_weight_outliers(weight)
    assert result.outlier_count == 1 and result.truncated == 0 and torch.equal(weight, before)
    result = truncate_weight_outliers(weight, clip_to="reserved")
    assert result.truncated == 1 and float(weight[0, 0]) == result.clip < 0.1
    weight[1, 1], weight[2, 2] = -0.5, 0.6  # two far values: the gap rule takes both
    result = truncate_weight_outliers(weight, distance="gap")
    assert result.outlier_count == 2 and result.truncated == 1 and float(weight[2, 2]) == 0.5


def test_truncation_reaches_the_linear_inside_a_quant_linear(ids: torch.Tensor) -> None:
    _, adapter = planted("llama")
    block = adapter.blocks()[0]
    wrap_block(block, adapter.linear_names(), QuantSpec(bits=4), QuantSpec())
    before = weights(adapter)
    counts = truncate_block_weights(adapter, block, clip_to="reserved")
    after = weights(adapter)
    assert sum(counts.values()) > 0
    assert sum(int((before[n] != after[n]).sum()) for n in before) == sum(counts.values())


def test_absmax_batches_and_two_dimensional_inputs(ids: torch.Tensor) -> None:
    """OPT's fc1/fc2 see (b*t, h) inputs; BLOOM tiles ALiBi per batch: chunks must agree."""
    for family in ("opt", "bloom"):
        _, adapter = planted(family)
        hidden, ctx = block0_inputs(adapter, ids)
        whole = collect_channel_absmax(adapter, 0, hidden, ctx)
        chunked = collect_channel_absmax(adapter, 0, hidden, ctx, batch_size=1)
        assert whole.keys() == chunked.keys()
        for name in whole:
            torch.testing.assert_close(whole[name], chunked[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_migration_is_exact_and_lowers_the_search_error(family: str, ids: torch.Tensor) -> None:
    """act_rule=migrate: every group gets a searched strength, the fold leaves the FP model
    unchanged, the planted channel is scaled down, and at W4A4 the attention input's
    fake-quantized output error falls below that of the untransformed block."""
    _, adapter = planted(family)
    reference = logits(adapter.model, ids)
    hidden, ctx = block0_inputs(adapter, ids)
    group = attn_in(adapter)
    consumer = first_consumer(group)
    spec = (W4A4.weight_spec(), W4A4.act_spec())
    before = capture_inputs(adapter, 0, hidden, ctx, [consumer], 2, 10_000)[consumer]
    identity_error = GroupSearch(group, before, *spec).error(torch.ones(group.num_channels))

    chosen = migrate_activations(adapter, 0, hidden, ctx, *spec, [0.25, 0.5, 0.75])
    assert set(chosen) == {g.name for g in adapter.scale_groups(adapter.blocks()[0])}
    assert chosen["attn_in"] in (0.25, 0.5, 0.75)
    after = logits(adapter.model, ids)
    torch.testing.assert_close(after, reference, atol=1e-4 * float(reference.abs().max()), rtol=0)

    moved = capture_inputs(adapter, 0, hidden, ctx, [consumer], 2, 10_000)[consumer]
    planted_before = float(torch.maximum(-before.low, before.high)[PLANTED])
    assert float(torch.maximum(-moved.low, moved.high)[PLANTED]) < 0.5 * planted_before
    migrated_error = GroupSearch(group, moved, *spec).error(torch.ones(group.num_channels))
    # Measured: 0.09-0.11x on every family.
    assert migrated_error < 0.3 * identity_error, (migrated_error, identity_error)
    # The columns that grew are protected from weight truncation, as after outlier scaling.
    assert all(getattr(c, SCALED_COLUMNS_ATTR, None) is not None for c in group.consumers)


# --- per-group truncation (cfp.weight_scope=group) -----------------------------------------
def _group_weight() -> torch.Tensor:
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)) * 0.02
    weight[0, 3], weight[0, 5], weight[2, 30], weight[5, 39] = 0.5, -0.4, 0.3, -0.6
    return weight


@pytest.mark.parametrize("clip_to", ["threshold", "reserved"])
def test_group_truncation_clamps_each_group_to_its_own_level(clip_to: str) -> None:
    """Group size 16 over 40 columns (a partial last group of 8, its own group): every changed
    weight sits at its group's clip level, computed by the per-tensor rule on that group."""
    weight = _group_weight()
    before = weight.clone()
    result = truncate_weight_outliers(weight, clip_to=clip_to, group_size=16)
    changed = weight != before
    assert int(changed.sum()) == result.truncated > 0
    assert torch.equal(torch.sign(weight[changed]), torch.sign(before[changed]))
    for row in range(weight.shape[0]):
        for start in range(0, 40, 16):
            group = before[row, start : start + 16].clone()
            reference = truncate_weight_outliers(group.unsqueeze(0), clip_to=clip_to)
            expected = group.clamp(-reference.clip, reference.clip)
            torch.testing.assert_close(weight[row, start : start + 16], expected)


def test_group_scope_truncates_where_the_tensor_scope_does_not() -> None:
    """The paper's rule over the whole tensor isolates its largest values and clamps them to
    the smallest of them: one weight here (2 in all of SmolLM2). Per group, with the clamp to
    the largest reserved value (the default), every group's outliers go, the planted ones in
    rows 0, 2 and 5 included."""
    tensor_weight, group_weight = _group_weight(), _group_weight()
    assert truncate_weight_outliers(tensor_weight).truncated == 1
    result = truncate_weight_outliers(group_weight, group_size=16, clip_to="reserved")
    assert result.truncated >= 4
    assert float(group_weight[0, 3]) == pytest.approx(0.4) and abs(float(group_weight[2, 30])) < 0.1
    assert abs(float(group_weight[5, 39])) < 0.1


def test_group_truncation_leaves_protected_columns(ids: torch.Tensor) -> None:
    weight = _group_weight()
    protected = torch.zeros(40, dtype=torch.bool)
    protected[3] = protected[30] = True
    before = weight.clone()
    truncate_weight_outliers(weight, group_size=16, protected_columns=protected)
    assert torch.equal(weight[:, protected], before[:, protected])
    with pytest.raises(ValueError, match="log_space"):
        truncate_weight_outliers(weight, group_size=16, log_space=True)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_block_truncation_changes_the_weights_it_reports(family: str, ids: torch.Tensor) -> None:
    """Every reported truncation is a changed weight of the block (no more, no fewer), and the
    block's output moves with them."""
    _, adapter = planted(family)
    hidden, ctx = block0_inputs(adapter, ids)
    with torch.no_grad():
        output = adapter.forward_block(0, hidden, ctx)
    before = weights(adapter)
    truncated = truncate_block_weights(adapter, adapter.blocks()[0], group_size=16)
    after = weights(adapter)
    for name in before:
        assert int((after[name] != before[name]).sum()) == truncated[name]
    assert sum(truncated.values()) > 5
    with torch.no_grad():
        assert not torch.equal(adapter.forward_block(0, hidden, ctx), output)
