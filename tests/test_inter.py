"""INTER: the interaction, variance gate and cutoff math, the three null branches, neutral/active, batches, beams."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding.contrast import CUTOFF_MARGIN
from halludec.decoding.inter import INTER, inter_combine
from halludec.decoding.side import LogitsContext
from halludec.tiny import available_tiny_families, tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import (
    assert_batch_equals_singles,
    assert_neutral_then_active,
    assert_same_snapshot,
    assert_side_logits_and_contrast,
    recording,
    snapshot,
)

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
NEUTRAL = {"interaction_weight": 0.0, "plausibility_beta": 0.0}
ACTIVE = {"var_k": 0.0, "plausibility_beta": 0.0}  # the tiny models' interaction variance is below 1

# Row 0: I = [2, -2, 2, 2] (unbiased variance 4 >= 1, gate on). Row 1: I = [0.5, 0, 0, 0.5] (variance 1/12, off).
FULL = torch.tensor([[3.0, 0.0, 1.0, -1.0], [1.0, 2.0, 0.0, 1.5]])
NO_IMAGE = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.5, 2.0, 0.0, 1.5]])
NO_TEXT = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
NEITHER = torch.tensor([[1.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.5]])


def test_interaction_gate_and_cutoff_match_hand_computed_values():
    branches = [t.clone() for t in (FULL, NO_IMAGE, NO_TEXT, NEITHER)]
    # No cutoff: row 0 gets full + I, row 1 (gate off) stays full.
    out = inter_combine(*branches, var_k=1.0, weight=1.0, beta=0.0)
    torch.testing.assert_close(out, torch.tensor([[5.0, -2.0, 3.0, 1.0], [1.0, 2.0, 0.0, 1.5]]))
    # var_k 0 opens row 1 too; weight 0.5 halves the interaction.
    out = inter_combine(*branches, var_k=0.0, weight=0.5, beta=0.0)
    torch.testing.assert_close(out, torch.tensor([[4.0, -1.0, 2.0, 0.0], [1.25, 2.0, 0.0, 1.75]]))
    # var_k 5 closes both rows.
    torch.testing.assert_close(inter_combine(*branches, var_k=5.0, weight=1.0, beta=0.0), FULL)
    # beta 0.5 on the raw full logits: row 0 keeps token 0 only (3 - 0.693), row 1 keeps tokens 1 and 3 (2 - 0.693).
    # Dropped: z - (max z - min z) - margin, with z = [5, -2, 3, 1] (span 7) and [1, 2, 0, 1.5] (span 2).
    out = inter_combine(*branches, var_k=1.0, weight=1.0, beta=0.5)
    m = CUTOFF_MARGIN
    expected = torch.tensor([[5.0, -2.0 - 7 - m, 3.0 - 7 - m, 1.0 - 7 - m], [1.0 - 2 - m, 2.0, 0.0 - 2 - m, 1.5]])
    torch.testing.assert_close(out, expected)
    for got, original in zip(branches, (FULL, NO_IMAGE, NO_TEXT, NEITHER), strict=True):
        assert torch.equal(got, original)  # inputs untouched
    # The hook: weight 0 has no side branches and, with beta 0, returns the logits unchanged.
    assert torch.equal(INTER(**NEUTRAL).edit_logits(FULL, LogitsContext(None, [], 0)), FULL)
    ctx = LogitsContext(None, [NO_IMAGE, NO_TEXT, NEITHER], 3)
    torch.testing.assert_close(INTER(plausibility_beta=0.5).edit_logits(FULL, ctx), expected)


def test_config_validation_and_preset():
    bad = [("var_k", -1.0), ("plausibility_beta", 2.0), ("interaction_weight", -0.5), ("noise_step", -1), ("seed", 0.5)]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid"):
            halludec.get_strategy("inter", **{field: value})
    with pytest.raises(ValueError, match="image_null='blank' is invalid; allowed: uniform_noise, zeros"):
        halludec.get_strategy("inter", image_null="blank")
    s = halludec.get_strategy("inter:repro")
    assert (s.config.var_k, s.config.plausibility_beta, s.config.interaction_weight) == (1.0, 0.1, 1.0)
    assert s.config.image_null == "uniform_noise"
    assert INTER.paper.endswith("2507.05056")
    assert INTER.needs_image


def test_text_masked_branch_needs_the_processor():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs the question's token span: pass `processor=`"):
        halludec.generate(model, batch, "inter", max_new_tokens=2)
    assert_same_snapshot(before, snapshot(model))


def test_zeros_null_is_refused_where_zero_images_are_padding():
    if "idefics3" not in available_tiny_families():
        pytest.skip("no idefics3 tiny model with this transformers")
    model, processor = tiny("idefics3")
    batch = tiny_batch(processor, "idefics3", QUESTIONS, seed=0)
    with pytest.raises(ValueError, match="image_null='zeros' cannot be used with 'idefics3'"):
        halludec.generate(model, batch, INTER(image_null="zeros"), processor=processor, max_new_tokens=2)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_active_side_logits_batch_and_restore(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    strategy = recording(INTER)(**ACTIVE)
    _, active = assert_neutral_then_active(model, processor, batch, [INTER(**NEUTRAL)], strategy, **GREEDY, **SCORES)

    # The three branches: null image (same prompt), question removed (image kept), both; one null-image draw.
    with halludec.apply(model, strategy, batch, processor=processor) as call:
        no_image, no_text, neither = strategy.side_inputs(call)
        spans = call.query_spans
    assert torch.equal(no_image["input_ids"], batch["input_ids"])
    assert not torch.equal(no_image["pixel_values"], batch["pixel_values"])
    assert torch.equal(no_text["pixel_values"], batch["pixel_values"])
    assert torch.equal(neither["pixel_values"], no_image["pixel_values"])
    assert torch.equal(neither["input_ids"], no_text["input_ids"])
    lengths = no_text["attention_mask"].sum(-1) + torch.tensor([e - s for s, e in spans])
    assert torch.equal(lengths, batch["attention_mask"].sum(-1))
    for row, question in enumerate(QUESTIONS):
        assert question not in processor.tokenizer.decode(no_text["input_ids"][row])
    # The side logits at the prefill equal fresh forwards; the first scores are the INTER combination.
    sides = [no_image, no_text, neither]
    combine = lambda m, *s: inter_combine(m, *s, var_k=0.0, weight=1.0, beta=0.0)  # noqa: E731
    assert_side_logits_and_contrast(model, batch, strategy, sides, active, combine)

    # A left-padded batch of 2 equals each row alone.
    assert_batch_equals_singles(model, processor, family, INTER(**ACTIVE), QUESTIONS, **GREEDY)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_sampling_beam_and_image_nulls_run(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    prompt = batch["input_ids"].shape[1]
    kw = {"processor": processor, "max_new_tokens": 3}
    outs = [halludec.generate(model, batch, INTER(image_null=null), **kw) for null in ("zeros", "noise_diffusion")]
    outs.append(halludec.generate(model, batch, "inter", num_beams=2, do_sample=False, **kw))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(halludec.generate(model, batch, "inter:repro", do_sample=True, repetition_penalty=1.5, **kw))
    assert torch.equal(runs[0], runs[1])  # seeded sampling (and seeded noise) is reproducible
    for out in [*outs, runs[0]]:
        assert out.shape[0] == 2
        assert prompt < out.shape[1] <= prompt + 3
