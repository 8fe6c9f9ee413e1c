"""PAI: attention boost math, CFG math, neutral equivalence, per-row batching, the repro preset."""

from __future__ import annotations

import math

import pytest
import torch

import halludec
from halludec.decoding.pai import boost_image_scores, cfg_combine
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_boost_matches_hand_computed():
    scores = torch.tensor([[[[-2.0, 1.0, 3.0, -0.5]]]])  # [B=1, H=1, q=1, K=4]
    image = torch.tensor([[False, True, True, False]])
    before = scores.clone()
    out = boost_image_scores(scores, image, 0.5)
    assert torch.equal(scores, before)  # not in place
    torch.testing.assert_close(out, torch.tensor([[[[-2.0, 1.5, 4.5, -0.5]]]]))
    neg = boost_image_scores(torch.tensor([[[[-2.0, -4.0]]]]), torch.tensor([[False, True]]), 0.5)
    torch.testing.assert_close(neg, torch.tensor([[[[-2.0, -2.0]]]]))  # z + a|z| moves negatives toward 0


def test_cfg_matches_hand_computed():
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    no_image = torch.tensor([[1.0, 1.0, 1.0]])
    s = torch.log_softmax(logits, -1)
    u = torch.log_softmax(no_image, -1)
    out = cfg_combine(logits, no_image, gamma=1.1, beta=0.1)
    expected = 1.1 * (s - u) + u
    torch.testing.assert_close(out[0, :2], expected[0, :2])
    assert s[0, 2] < s.max() + math.log(0.1)  # token 2 is implausible
    assert out[0, 2] < out[0, :2].min() - 1e3  # cut: far below every plausible token, but finite
    assert torch.isfinite(out).all()
    torch.testing.assert_close(cfg_combine(logits, no_image, 1.0, 0.0), s)  # gamma 1, no cutoff: plain log-probs


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_equals_generate_and_active_changes(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(model, batch, halludec.get_strategy("pai", alpha=0.0), **KW, **SCORES)
    assert torch.equal(plain.sequences, neutral.sequences)
    assert max_score_diff(plain, neutral) == 0.0
    active = halludec.generate(model, batch, halludec.get_strategy("pai", alpha=2.0), **KW, **SCORES)
    assert max_score_diff(plain, active) > 1e-4
    cfg = halludec.generate(model, batch, "pai:repro", **KW, **SCORES)
    assert max_score_diff(plain, cfg) > 1e-4
    assert_same_snapshot(before, snapshot(model))


def test_boost_acts_on_image_keys_of_boosted_layers_only():
    """With layers [2, 3) boosted, layers 0-1 are plain; alpha on a prompt without image keys is rejected."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    strategy = halludec.get_strategy("pai", alpha=1.0, first_layer=2, last_layer=3)
    with halludec.apply(model, strategy, batch) as call:
        assert set(call.plans) == {2}
        assert call.plans[2].rows == "last"
    with pytest.raises(ValueError, match="last_layer=9 is beyond this model's 4 decoder layers"):
        halludec.generate(model, batch, halludec.get_strategy("pai", last_layer=9), max_new_tokens=1)


def test_skip_first_token_leaves_the_first_step_plain():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    plain = model.generate(**batch, **KW, **SCORES)
    ours = halludec.generate(
        model, batch, halludec.get_strategy("pai", alpha=2.0, skip_first_token=True), **KW, **SCORES
    )
    torch.testing.assert_close(plain.scores[0], ours.scores[0], atol=2e-5, rtol=0)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(plain.scores[1:], ours.scores[1:], strict=True))


@pytest.mark.parametrize("strategy", ["pai", "pai:repro"])
def test_batch_of_two_equals_singles(strategy):
    model, processor = tiny("llava")
    assert_batch_equals_singles(model, processor, "llava", strategy, QUESTIONS, **KW)


def test_beam_and_sampling_run():
    model, processor = tiny("llava_next")
    batch = tiny_batch(processor, "llava_next", QUESTIONS, seed=0)
    out = halludec.generate(model, batch, "pai:repro", max_new_tokens=4, num_beams=2)
    assert out.shape[0] == 2
    torch.manual_seed(0)
    out = halludec.generate(model, batch, "pai:repro", max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape[0] == 2
