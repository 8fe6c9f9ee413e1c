"""PAINT: token selection on synthetic scores, patch-to-token mapping, CLS sets vs an eager reference, generation."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding.paint import select_tokens
from halludec.decoding.vision_tokens import cls_scores, received_scores, tokens_from_patches
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_select_tokens_hand_computed():
    local = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.7, 0.4])
    summary = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0])  # Q1 = Q3 = 1 -> outlier: index 7
    loc, summ = select_tokens(local, summary, local_ratio=0.25)
    assert summ.nonzero().flatten().tolist() == [7]
    assert loc.nonzero().flatten().tolist() == [0, 2]  # top 2 of 8
    # a summary token is never local
    loc2, summ2 = select_tokens(summary, summary, local_ratio=0.25)
    assert summ2.nonzero().flatten().tolist() == [7]
    assert not (loc2 & summ2).any()
    # the spatial stream adds its own top share
    spatial = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    loc3, _ = select_tokens(local, summary, 0.25, spatial, 0.125)
    assert loc3.nonzero().flatten().tolist() == [0, 2, 5]


def test_scores_hand_computed():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]).repeat(2, 1, 1)  # [H=2, 3, 3]
    torch.testing.assert_close(cls_scores(probs), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(received_scores(probs), 2 * probs[0].mean(0))
    torch.testing.assert_close(received_scores(probs, skip_cls=True), 2 * probs[0, 1:, 1:].mean(0))


def test_qwen_grouping_and_window_order():
    model, processor = tiny("qwen2_5_vl")
    batch = tiny_batch(processor, "qwen2_5_vl", QUESTIONS[:1], seed=0, image_sizes=[(112, 112)])
    adapter = halludec.get_adapter(model)
    grid = batch["image_grid_thw"]
    n_tokens = int(grid.prod()) // 4
    from halludec.decoding.vision_tokens import _window_index

    window = _window_index(adapter, grid)
    raster = torch.arange(n_tokens, dtype=torch.float32)
    permuted_patches = raster[window].repeat_interleave(4) / 4  # the tower sees units in window order
    (tokens,) = tokens_from_patches(adapter, batch, [permuted_patches], [n_tokens])
    torch.testing.assert_close(tokens, raster)
    assert not torch.equal(window, torch.arange(n_tokens)), "the test image must span several windows"


def test_pooled_layouts():
    model, _ = tiny("gemma3")
    adapter = halludec.get_adapter(model)
    patches = torch.arange(64, dtype=torch.float32)  # 8 x 8 grid -> 4 x 4 tokens
    (tokens,) = tokens_from_patches(adapter, {}, [patches], [16])
    assert tokens[0] == (0 + 1 + 8 + 9) / 4
    assert tokens.shape == (16,)
    with pytest.raises(ValueError, match="Cannot map 60 vision patches onto 16 image tokens"):
        tokens_from_patches(adapter, {}, [torch.zeros(60)], [16])


def test_llava_sets_match_an_eager_reference():
    """Local/summary sets on LLaVA equal a hand selection from CLIP's own eager attentions (CLS row)."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    with halludec.apply(model, "paint", batch) as call:
        local, summary = call.state["paint_local"], call.state["paint_summary"]
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        attn = adapter.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    for row, ((start, end),) in enumerate(adapter.image_spans(batch["input_ids"])):
        cls0 = attn[0][row, :, 0, 1:].sum(0)
        cls_p = attn[model.config.vision_feature_layer][row, :, 0, 1:].sum(0)
        ref_local, ref_summary = select_tokens(cls0, cls_p, 0.25)
        assert torch.equal(local[row, start:end], ref_local)
        assert torch.equal(summary[row, start:end], ref_summary)
        assert not local[row, :start].any()
        assert not local[row, end:].any()


def test_anyres_uses_the_base_tile():
    model, processor = tiny("llava_next")
    batch = tiny_batch(processor, "llava_next", QUESTIONS, seed=0)
    with halludec.apply(model, "paint", batch) as call:
        local = call.state["paint_local"]
        spans = call.image_spans
    for row, ((start, _end),) in enumerate(spans):
        hits = local[row].nonzero().flatten()
        assert hits.numel() == int(25 * 0.25)
        assert ((hits >= start) & (hits < start + 25)).all()  # base tile = first 25 tokens of the span


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_equals_generate_and_active_changes(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(
        model, batch, halludec.get_strategy("paint", alpha_local=0.0, beta_summary=0.0), **KW, **SCORES
    )
    assert torch.equal(plain.sequences, neutral.sequences)
    assert max_score_diff(plain, neutral) == 0.0
    active = halludec.generate(
        model, batch, halludec.get_strategy("paint", alpha_local=3.0, beta_summary=3.0), **KW, **SCORES
    )
    assert max_score_diff(plain, active) > 1e-4
    repro = halludec.generate(model, batch, "paint:repro", **KW, **SCORES)
    assert max_score_diff(plain, repro) > 1e-4
    assert_same_snapshot(before, snapshot(model))


def test_batch_of_two_equals_singles_and_beams():
    model, processor = tiny("llava")
    strategy = halludec.get_strategy("paint", alpha_local=2.0)
    assert_batch_equals_singles(model, processor, "llava", strategy, QUESTIONS, **KW)
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    assert halludec.generate(model, batch, "paint", max_new_tokens=3, num_beams=2).shape[0] == 2
