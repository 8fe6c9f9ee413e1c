"""VHR: the head rule on synthetic numbers, the lockstep pass against separate forwards, generation."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding.vhd import head_divergence, lockstep_prefill, vhr_head_mask
from halludec.decoding.vhr import default_layers
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_head_divergence_hand_computed():
    o_full = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])  # [B=1, H=2, d=2]
    o_text = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    vhd, ta = head_divergence(o_full, o_text)
    torch.testing.assert_close(vhd, torch.tensor([[5.0, 1.0]]))
    torch.testing.assert_close(ta, torch.tensor([[0.0, 5.0]]))


def test_head_rule_hand_computed():
    # 6 heads; head 5 has a huge VHD *and* a huge text energy: a negative-sensitivity outlier, zeroed.
    vhd = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 100.0]])
    ta = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 50.0]])
    before = vhd.clone()
    mask = vhr_head_mask(vhd, ta)
    assert torch.equal(vhd, before)  # not in place
    # after zeroing: [1, 2, 3, 4, 5, 0]; torch.median (lower middle) = 2 -> heads with VHD > 2: 2, 3, 4
    assert mask.tolist() == [[False, False, True, True, True, False]]
    # without the filter the outlier is kept and the median is 3 -> heads 3, 4, 5
    assert vhr_head_mask(vhd, ta, outlier_filter=False).tolist() == [[False, False, False, True, True, True]]
    # a large VHD with an ordinary TA is not an outlier
    assert vhr_head_mask(vhd, torch.ones_like(ta))[0, 5]


def test_default_layers():
    assert default_layers(32) == (1, *range(18, 32))
    assert default_layers(28) == (1, *range(16, 28))
    assert default_layers(4) == (1, 2, 3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_lockstep_pass_matches_separate_forwards(family):
    """Unreinforced, the lockstep batch gives each branch the head outputs it gets alone (padding, mrope)."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    seen = {}

    def record(layer, o_full, o_text):
        seen[layer] = (o_full.clone(), o_text.clone())

    lockstep_prefill(model, adapter, batch, [1, 3], record)
    text = adapter.text_only_inputs(batch)
    for branch, inputs in ((0, batch), (1, text)):
        captured = {}

        def grab(_mod, args, layer, store=captured):
            store[layer] = args[0][:, -1].clone()

        hooks = [
            adapter.o_proj(layer).register_forward_pre_hook(lambda m, a, layer=layer: grab(m, a, layer))
            for layer in (1, 3)
        ]
        try:
            with torch.no_grad():
                model(**inputs, position_ids=adapter.position_ids_for(inputs))
        finally:
            for h in hooks:
                h.remove()
        for layer in (1, 3):
            ref = captured[layer].view(2, 4, -1)  # [B, H, d]
            torch.testing.assert_close(seen[layer][branch], ref, atol=1e-4, rtol=1e-4)


def test_reinforcement_cascades_layer_by_layer():
    """Layer 3's divergence is measured after layer 1's heads were reinforced (the paper's single pass)."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    with halludec.apply(model, halludec.get_strategy("vhr", alpha=1.0, layers=(1, 3)), batch) as call:
        plain_vhd = call.state["vhr_vhd"]
    with halludec.apply(model, halludec.get_strategy("vhr", alpha=2.0, layers=(1, 3)), batch) as call:
        vhd, scale = call.state["vhr_vhd"], call.state["vhr_scale"]
    torch.testing.assert_close(vhd[1], plain_vhd[1])  # first layer: nothing reinforced before it
    assert not torch.allclose(vhd[3], plain_vhd[3])
    for layer in (1, 3):
        assert set(scale[layer].unique().tolist()) == {1.0, 2.0}
        assert ((scale[layer] == 2.0).sum(-1) >= 1).all()  # some heads reinforced in every row


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_equals_generate_and_active_changes(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(model, batch, halludec.get_strategy("vhr", alpha=1.0), **KW, **SCORES)
    assert torch.equal(plain.sequences, neutral.sequences)
    assert max_score_diff(plain, neutral) < 1e-5
    active = halludec.generate(model, batch, "vhr", **KW, **SCORES)
    assert max_score_diff(plain, active) > 1e-3
    assert_same_snapshot(before, snapshot(model))


def test_batch_of_two_equals_singles():
    model, processor = tiny("qwen2_vl")
    assert_batch_equals_singles(model, processor, "qwen2_vl", "vhr", QUESTIONS, **KW)


def test_beam_sampling_and_errors():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    assert halludec.generate(model, batch, "vhr", max_new_tokens=3, num_beams=2).shape[0] == 2
    torch.manual_seed(0)
    assert halludec.generate(model, batch, "vhr", max_new_tokens=3, do_sample=True).shape[0] == 2
    with pytest.raises(ValueError, match="Layer index 7 is out of range"):
        halludec.generate(model, batch, halludec.get_strategy("vhr", layers=(1, 7)), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"layers=\(\) is invalid"):
        halludec.get_strategy("vhr", layers=())
