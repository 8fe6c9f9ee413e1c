"""ZeroTuning: initial-token scaling math, the head rule, left padding, decoding modes, head profiling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import halludec
from halludec.decoding.profile import HeadProfile, save_profile
from halludec.decoding.zerotuning import head_gammas, profile_heads, scale_initial
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import assert_batch_equals_singles, max_score_diff

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_scale_initial_hand_computed_and_equals_a_logit_shift():
    probs = torch.tensor([[[[0.5, 0.3, 0.2]]]])  # [B=1, H=1, q=1, K=3]
    before = probs.clone()
    out = scale_initial(probs, torch.tensor([[True, False, False]]), torch.tensor([2.0]))
    assert torch.equal(probs, before)  # not in place
    torch.testing.assert_close(out, torch.tensor([[[[1.0 / 1.5, 0.3 / 1.5, 0.2 / 1.5]]]]))
    # the released code's form (multiply by a scale matrix, renormalise) == adding log(gamma) to the logit
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 6, generator=g)  # [B, H, q, K]
    initial = torch.zeros(2, 6, dtype=torch.bool)
    initial[0, 0], initial[1, 2] = True, True  # row 1 is left-padded by 2
    gamma = torch.tensor([0.3, 1.0, 4.0])
    shifted = z + torch.log(gamma)[None, :, None, None] * initial[:, None, None, :]
    torch.testing.assert_close(scale_initial(torch.softmax(z, -1), initial, gamma), torch.softmax(shifted, -1))
    probs = torch.softmax(z, -1)
    assert torch.equal(scale_initial(probs, initial, gamma)[:, 1], probs[:, 1])  # gamma 1: bit for bit
    assert torch.equal(scale_initial(probs, torch.zeros_like(initial), gamma), probs)  # no initial key: unchanged


def test_head_rule():
    scores = torch.tensor([[0.5, -0.1, 0.0], [0.2, float("nan"), -0.3]])  # 2 up-effective, 2 down-effective
    torch.testing.assert_close(head_gammas(scores, 2.0, "dominant"), torch.tensor([[2.0, 1, 1], [2.0, 1, 1]]))
    torch.testing.assert_close(head_gammas(scores, 0.5, "both"), torch.tensor([[2.0, 0.5, 1], [2.0, 1, 0.5]]))
    down = torch.tensor([[0.5, -0.1, -0.2]])  # down-effective heads dominate: they are sharpened
    torch.testing.assert_close(head_gammas(down, 2.0, "dominant"), torch.tensor([[1.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="rule='up' is invalid"):
        head_gammas(scores, 2.0, "up")


def test_neutral_scores_are_bit_exact_and_the_default_head_rule_warns():
    """What the strategy matrix does not check: gamma=1 gives plain generate's scores bit for bit (the matrix compares
    tokens), and the default call says it scales every head. Neutral/active/batch/restore on every family are the
    matrix's cells."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(model, batch, halludec.get_strategy("zerotuning", gamma=1.0), **KW, **SCORES)
    assert max_score_diff(plain, neutral) == 0.0
    with pytest.warns(UserWarning, match="every head of all layers is scaled by gamma=0.5"):
        active = halludec.generate(model, batch, "zerotuning", **KW, **SCORES)
    assert max_score_diff(plain, active) > 1e-3  # the default gamma (the matrix uses 0.2) changes the scores


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_of_two_equals_singles(family):
    """The initial token is each row's first non-pad key: a left-padded row gets what it gets alone."""
    model, processor = tiny(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_batch_equals_singles(model, processor, family, "zerotuning:flatten", QUESTIONS, **KW)


def test_initial_token_beam_sampling_static_cache():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    strategy = halludec.get_strategy("zerotuning", heads=((0, 1), (3, 2)), gamma=0.2)
    with halludec.apply(model, strategy, batch) as call:
        assert set(call.plans) == {0, 3}
        assert call.plans[0].rows == "all"
        state = call.state[strategy.state_key]
        first = batch["attention_mask"].argmax(-1)
        assert state.initial.nonzero().tolist() == [[0, first[0].item()], [1, first[1].item()]]
        assert first.tolist() != [0, 0]  # the batch is left-padded
        assert state.gammas[0].tolist() == pytest.approx([1.0, 0.2, 1.0, 1.0])
        dynamic = model.generate(**batch, **KW)
    assert torch.equal(dynamic, halludec.generate(model, batch, strategy, cache_implementation="static", **KW))
    assert halludec.generate(model, batch, strategy, max_new_tokens=3, num_beams=2).shape[0] == 2
    torch.manual_seed(0)
    first_run = halludec.generate(model, batch, strategy, max_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(first_run, halludec.generate(model, batch, strategy, max_new_tokens=3, do_sample=True))


def test_profile_heads_and_profile_rule(tmp_path):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)

    def evaluate(strategy):  # the held-out "metric": log-probability of a fixed next token
        out = halludec.generate(model, batch, strategy, max_new_tokens=1, do_sample=False, **SCORES)
        return torch.log_softmax(out.scores[0][0], -1)[7].item()

    gains = profile_heads(evaluate, model, probe_gamma=2.0, layers=[0, 1])
    assert gains.shape == (4, 4)
    assert gains[2:].eq(0).all()
    assert gains[:2].ne(0).all()
    path = tmp_path / "zt.json"
    save_profile(HeadProfile.for_model(model, gains, "zerotuning", data="synthetic"), path)
    strategy = halludec.get_strategy("zerotuning", profile=str(path), gamma=0.5)
    with halludec.apply(model, strategy, batch) as call:
        table = torch.ones(4, 4)
        for layer, scales in call.state[strategy.state_key].gammas.items():
            table[layer] = scales.cpu()
    torch.testing.assert_close(table, head_gammas(gains, 0.5, "dominant"))
    up, down = int((gains > 0).sum()), int((gains < 0).sum())
    tuned = table != 1.0
    assert int(tuned.sum()) == (up if up >= down else down)
    assert set(table[tuned].tolist()) == ({2.0} if up >= down else {0.5})
    # a profile of another criterion is read as signed gains, with a warning
    save_profile(HeadProfile.for_model(model, gains.abs(), "vhd", data="synthetic"), tmp_path / "vhd.json")
    with pytest.warns(UserWarning, match="criterion 'vhd'"):
        halludec.generate(model, batch, halludec.get_strategy("zerotuning", profile=str(tmp_path / "vhd.json")), **KW)


def test_config_errors():
    with pytest.raises(ValueError, match=r"gamma=0\.0 is invalid"):
        halludec.get_strategy("zerotuning", gamma=0.0)
    with pytest.raises(ValueError, match="head_rule='up' is invalid"):
        halludec.get_strategy("zerotuning", head_rule="up")
    with pytest.raises(ValueError, match=r"layers=.* is invalid"):
        halludec.get_strategy("zerotuning", layers=(-1,))
    with pytest.raises(ValueError, match="pass one of them"):
        halludec.get_strategy("zerotuning", heads=((0, 0),), profile="p.json")
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    with pytest.raises(ValueError, match="9"):
        halludec.generate(model, batch, halludec.get_strategy("zerotuning", layers=(9,)), max_new_tokens=1)
    assert math.isclose(halludec.get_strategy("zerotuning:flatten").config.gamma, 2.0)


def test_composes_with_act_and_a_side_branch_strategy():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    plain = model.generate(**batch, **KW)
    neutral = [
        halludec.get_strategy("act", keep_frac=1.0),
        halludec.get_strategy("zerotuning", gamma=1.0),
        halludec.get_strategy("vcd", alpha=0.0, plausibility_beta=0.0),
    ]
    assert torch.equal(plain, halludec.generate(model, batch, neutral, **KW))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steered = [halludec.get_strategy("act", keep_frac=0.0, threshold=0.02), "zerotuning:flatten", "vcd"]
        out = halludec.generate(model, batch, steered, max_new_tokens=3, num_beams=2)
    assert out.shape[0] == 2
