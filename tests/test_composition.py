"""Composition: several strategies in one call (design: attention edits in list order, then logits edits)."""

from __future__ import annotations

import torch

import halludec
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_neutral_compositions_equal_plain_generate():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    plain = model.generate(**batch, **KW, **SCORES)
    combo = [
        halludec.get_strategy("vhr", alpha=1.0),
        halludec.get_strategy("pai", alpha=0.0),
        halludec.get_strategy("vcd", alpha=0.0, plausibility_beta=0.0),
    ]
    ours = halludec.generate(model, batch, combo, processor=processor, **KW, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) < 1e-5


def test_side_branches_and_edits_of_composed_strategies_stay_separate():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    pai = halludec.get_strategy("pai:repro")
    paint = halludec.get_strategy("paint")
    vcd = halludec.get_strategy("vcd")
    before = snapshot(model)
    with halludec.apply(model, [pai, paint, vcd], batch, processor=processor) as call:
        assert call.side_slots[id(pai)] == [0]
        assert call.side_slots[id(paint)] == []
        assert call.side_slots[id(vcd)] == [1]
        assert [s.name for s in call.plans[2].prob_strategies] == ["pai", "paint"]  # list order inside a layer
        assert [s.name for s in call.side.editors] == ["pai", "vcd"]
        out = model.generate(**batch, **KW, **SCORES)
    assert_same_snapshot(before, snapshot(model))
    alone = halludec.generate(model, batch, vcd, processor=processor, **KW, **SCORES)
    assert max_score_diff(out, alone) > 1e-4


def test_beam_search_with_three_composed_strategies():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    out = halludec.generate(
        model, batch, ["vhr", "pai:repro", "vcd"], processor=processor, max_new_tokens=4, num_beams=2
    )
    assert out.shape[0] == 2
