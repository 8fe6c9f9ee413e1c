"""VCD: the contrast and cutoff math, seeded per-row noise, neutral/active configs, side logits, batches, beams."""

from __future__ import annotations

import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

import halludec
from halludec.decoding.contrast import CUTOFF_MARGIN, _row_slices, diffusion_fill, replace_pixels
from halludec.decoding.side import LogitsContext
from halludec.decoding.vcd import VCD, vcd_combine
from halludec.tiny import tiny_batch
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
NEUTRAL = {"alpha": 0.0, "plausibility_beta": 0.0}


def test_combination_and_cutoff_match_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [0.5, 0.4, -1.0, 0.3]])
    noised = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.5, -0.6, 0.0, 0.3]])
    keep_l, keep_n = logits.clone(), noised.clone()
    # z = 2 l - l' = [[3, 0, 0, -6], [0.5, 1.4, -2, 0.3]]; beta 0.5 keeps l >= max(l) - 0.693:
    # row 0 only token 0, row 1 tokens 0, 1, 3. Dropped: z - (max z - min z) - margin.
    expected = torch.tensor(
        [[3.0, 0.0 - 9.0 - CUTOFF_MARGIN, 0.0 - 9.0 - CUTOFF_MARGIN, -6.0 - 9.0 - CUTOFF_MARGIN], [0.5, 1.4, 0.0, 0.3]]
    )
    expected[1, 2] = -2.0 - 3.4 - CUTOFF_MARGIN
    torch.testing.assert_close(vcd_combine(logits, noised, 1.0, 0.5), expected)
    torch.testing.assert_close(
        vcd_combine(logits, noised, 1.0, 0.0), torch.tensor([[3.0, 0, 0, -6], [0.5, 1.4, -2, 0.3]])
    )
    torch.testing.assert_close(vcd_combine(logits, noised, 0.5, 0.0), 1.5 * logits - 0.5 * noised)
    assert torch.equal(logits, keep_l)
    assert torch.equal(noised, keep_n)
    # The strategy hook: alpha 0 has no side branch and, with beta 0, returns the logits unchanged.
    ctx = LogitsContext(None, [], 0)
    assert torch.equal(VCD(**NEUTRAL).edit_logits(logits, ctx), logits)
    assert torch.equal(VCD(alpha=0.0, plausibility_beta=0.5).edit_logits(logits, ctx)[1, :2], logits[1, :2])


def test_cutoff_then_processors_never_give_nan():
    """min_new_tokens banning the only plausible token (EOS), repetition penalty and T < 1 stay finite."""
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 2.9, -1.0, 0.0]])
    z = vcd_combine(logits, torch.zeros_like(logits), 1.0, 0.1)  # row 0 keeps only token 1 (= EOS below)
    ids = torch.tensor([[3, 3], [0, 3]])
    z = MinNewTokensLengthLogitsProcessor(1, 5, eos_token_id=1)(ids, z)
    z = RepetitionPenaltyLogitsProcessor(1.5)(ids, z)
    z = TemperatureLogitsWarper(0.3)(ids, z)
    probs = z.softmax(-1)
    assert not probs.isnan().any()
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert probs[0].argmax() == 2  # falls back on the best implausible token in contrastive order
    assert probs[1, 2:].sum() == 0  # implausible tokens get exactly zero mass while a plausible one is left


def test_config_validation_and_preset():
    for field, value in [("alpha", -0.1), ("plausibility_beta", 1.5), ("noise_step", 1000), ("noise_step", 2.5)]:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid"):
            halludec.get_strategy("vcd", **{field: value})
    s = halludec.get_strategy("vcd:pope_repro")
    assert (s.config.alpha, s.config.plausibility_beta, s.config.noise_step) == (1.0, 0.2, 500)
    assert VCD.paper.endswith("2311.16922")
    assert VCD.needs_image
    assert "vcd:pope_repro" in halludec.list_strategies()


def test_row_mapping_and_padding_units():
    assert _row_slices(2, [[(0, 4)], [(1, 5)]]) == [slice(0, 1), slice(1, 2)]  # one pixel row per prompt row
    assert _row_slices(3, [[(0, 4), (6, 8)], [(1, 5)]]) == [slice(0, 2), slice(2, 3)]  # one per image
    assert _row_slices(40, [[(0, 6)], [(0, 4)]]) == [slice(0, 24), slice(24, 40)]  # Qwen patches: by tokens
    assert _row_slices(7, [[(0, 6)], [(0, 4)]]) is None
    pixels = torch.randn(2, 3, 3, 4, 4)  # [B, patches, C, H, W], row 1's last patch is padding
    pixels[1, 2] = 0
    out = replace_pixels({"pixel_values": pixels}, [[(0, 1)], [(0, 1)]], lambda u, g: u + 1, 0, "t")["pixel_values"]
    assert torch.equal(out[1, 2], torch.zeros(3, 4, 4))
    assert torch.equal(out[:, :2], pixels[:, :2] + 1)
    assert torch.equal(pixels[1, 2], torch.zeros(3, 4, 4))  # input untouched


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_noise_is_seeded_per_row(family):
    model, processor = tiny(family)
    adapter = halludec.get_adapter(model)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    fill = diffusion_fill(adapter, 500)

    def noised(inputs, seed=0):
        return replace_pixels(inputs, adapter.image_spans(inputs["input_ids"]), fill, seed, "vcd")["pixel_values"]

    both = noised(batch)
    assert torch.equal(both, noised(batch))
    assert not torch.equal(both, noised(batch, seed=1))
    assert not torch.equal(both, batch["pixel_values"])
    singles = [noised(tiny_batch(processor, family, [q], seed=0, image_seed_offset=r)) for r, q in enumerate(QUESTIONS)]
    assert torch.equal(both, torch.cat(singles))  # a row's noise does not depend on its batch


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_active_side_logits_batch_and_restore(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    strategy = recording(VCD)(plausibility_beta=0.0)
    _, active = assert_neutral_then_active(model, processor, batch, [VCD(**NEUTRAL)], strategy, **GREEDY, **SCORES)

    # The side logits at the prefill equal a fresh forward on the noised input; the first scores are the contrast.
    with halludec.apply(model, strategy, batch) as call:
        (side,) = strategy.side_inputs(call)
    assert_side_logits_and_contrast(model, batch, strategy, [side], active, lambda m, s: vcd_combine(m, s, 1.0, 0.0))

    # A left-padded batch of 2 equals each row alone (default config, cutoff on).
    assert_batch_equals_singles(model, processor, family, VCD(), QUESTIONS, **GREEDY)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_sampling_and_beam_run(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    prompt = batch["input_ids"].shape[1]
    greedy = halludec.generate(model, batch, "vcd", max_new_tokens=4, do_sample=False)
    beam = halludec.generate(model, batch, "vcd", max_new_tokens=4, num_beams=2, do_sample=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(halludec.generate(model, batch, "vcd:pope_repro", max_new_tokens=4, do_sample=True, top_p=1.0))
    assert torch.equal(runs[0], runs[1])  # seeded sampling (and seeded noise) is reproducible
    for out in (greedy, beam, runs[0]):
        assert out.shape[0] == 2
        assert prompt < out.shape[1] <= prompt + 4
