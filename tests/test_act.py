"""ACT: sink statistic and calibration math vs the released code's loop, head sets, decoding, calibration helper."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding.act import ACT, calibrate, calibrate_act_heads, find_sinks, received_attention
from halludec.decoding.profile import HeadProfile, save_profile
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import max_score_diff

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
ACTIVE = {"keep_frac": 0.0, "threshold": 0.02, "first_layer": 1}


def _causal(t: int, heads: int, seed: int) -> torch.Tensor:
    """Random causal attention ``[heads, t, t]`` with a strong sink at key 2."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(heads, t, t, generator=g)
    z[:, :, 2] += 3.0
    z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(z, dim=-1)


def _released(m: torch.Tensor, keep: float, thres: float) -> torch.Tensor:
    """GATECH-EIC/ACT ``atten_process_eval`` on one head ``[T, T]``, written out (BOS is a sink here, so the
    released ``indices[1:]`` drops exactly the initial token)."""
    t = m.shape[0]
    recv = m.sum(0) / torch.arange(t, 0, -1, dtype=m.dtype)
    sinks = [j for j in range(t) if recv[j] > thres]
    assert sinks[0] == 0
    sinks = sinks[1:]
    out, orig = m.clone(), m.clone()
    freed = out[:, sinks].sum(1) * (1 - keep)
    out[:, sinks] *= keep
    orig[1:, sinks] = 0
    ratios = orig / orig.sum(1, keepdim=True)
    out = out + freed[:, None] * ratios
    out[0, 0] = 1
    return out


def test_received_attention_hand_computed():
    probs = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]]]])  # [1, 1, 3, 3]
    valid = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(received_attention(probs, valid), torch.tensor([[[1.7 / 3, 0.7 / 2, 0.6]]]))
    # a static cache adds keys beyond the prompt: never seen, 0
    wide = torch.nn.functional.pad(probs, (0, 2))
    assert received_attention(wide, valid)[0, 0, 3:].eq(0).all()
    # sliding window of 2: key 0 is seen by rows 0 and 1 only
    torch.testing.assert_close(received_attention(probs, valid, window=2)[0, 0, 0], torch.tensor(1.7 / 2))
    initial = torch.tensor([[True, False, False]])
    sinks = find_sinks(probs, valid, valid, initial, threshold=0.4)
    assert sinks.tolist() == [[[False, False, True]]]  # key 0 exceeds 0.4 too but is the initial token


def test_calibration_matches_released_code_and_is_not_in_place():
    heads, t, keep, thres = 3, 7, 0.4, 0.1
    probs = _causal(t, heads, seed=0)[None]  # [1, H, T, T]
    before = probs.clone()
    valid = torch.ones(1, t, dtype=torch.bool)
    initial = torch.zeros(1, t, dtype=torch.bool)
    initial[0, 0] = True
    sinks = find_sinks(probs, valid, valid, initial, thres)
    assert sinks[0, :, 2].all()  # the planted sink
    on = torch.tensor([True, False, True])
    out = calibrate(probs, sinks, keep, on)
    assert torch.equal(probs, before)
    for h in range(heads):
        want = _released(probs[0, h], keep, thres) if on[h] else probs[0, h]
        torch.testing.assert_close(out[0, h], want, atol=1e-6, rtol=0)
    assert torch.equal(out[0, 1], probs[0, 1])  # an unselected head is untouched, bit for bit
    torch.testing.assert_close(out.sum(-1), torch.ones(1, heads, t))


def test_left_padded_row_equals_unpadded_row():
    """Padding rows/keys take no part: a row padded by 2 gives the unpadded row's sinks and calibration."""
    t, pad = 6, 2
    inner = _causal(t, 2, seed=1)  # [H, T, T]
    padded = torch.zeros(2, t + pad, t + pad)
    padded[:, pad:, pad:] = inner
    padded[:, :pad, :] = 1.0 / (t + pad)  # garbage pad rows (uniform, as sdpa's pad rows)
    valid = torch.tensor([[False] * pad + [True] * t])
    initial = torch.zeros(1, t + pad, dtype=torch.bool)
    initial[0, pad] = True
    sinks = find_sinks(padded[None], valid, valid, initial, 0.1)
    out = calibrate(padded[None], sinks, 0.4, torch.ones(2, dtype=torch.bool))
    for h in range(2):
        torch.testing.assert_close(out[0, h, pad:, pad:], _released(inner[h], 0.4, 0.1), atol=1e-6, rtol=0)


def test_neutral_scores_are_bit_exact_and_the_band_default_warns():
    """What the strategy matrix does not check: keep_frac=1 gives plain generate's scores bit for bit (the matrix
    compares tokens), and without heads or a profile ACT says it steers the whole band. Neutral/active/batch/restore
    on every family are the matrix's cells."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(model, batch, halludec.get_strategy("act", keep_frac=1.0), **KW, **SCORES)
    assert max_score_diff(plain, neutral) == 0.0
    with pytest.warns(UserWarning, match="every head of layers 1..2"):
        halludec.generate(model, batch, halludec.get_strategy("act", **ACTIVE), **KW, **SCORES)


def test_sinks_frozen_at_prefill_used_at_decode_beam_and_static_cache():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    strategy = halludec.get_strategy("act", heads=((1, 0), (2, 3)), keep_frac=0.0, threshold=0.02)
    with halludec.apply(model, strategy, batch) as call:
        assert set(call.plans) == {1, 2}
        assert call.plans[1].rows == "all"
        dynamic = model.generate(**batch, **KW)
        state = call.state[strategy.state_key]
        length = batch["input_ids"].shape[1]
        assert state.sinks[1].shape == (2, 4, length)
        assert state.sinks[1].any()
        assert not (state.sinks[1] & state.initial[:, None, :]).any()  # the initial token is never a sink
        assert not (state.sinks[1] & ~state.valid[:, None, :]).any()  # nor is padding
    static = halludec.generate(model, batch, strategy, cache_implementation="static", **KW)
    assert torch.equal(dynamic, static)
    beams = halludec.generate(model, batch, strategy, max_new_tokens=3, num_beams=2)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    first = halludec.generate(model, batch, strategy, max_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(first, halludec.generate(model, batch, strategy, max_new_tokens=3, do_sample=True))


def test_head_sets_profile_and_errors(tmp_path):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    table = torch.zeros(4, 4)
    table[0, 1], table[2, 2], table[3, 0] = 3.0, 2.0, 1.0
    path = tmp_path / "p.json"
    save_profile(HeadProfile.for_model(model, table, "image_attention", data="synthetic"), path)
    strategy = halludec.get_strategy("act", profile=str(path), profile_k=3 / 16)
    with halludec.apply(model, strategy, batch) as call:
        state = call.state[strategy.state_key]
        assert set(state.heads) == {2}  # top-3 heads, restricted to the band 2..2 of a 4-layer model
        assert state.heads[2].tolist() == [False, False, True, False]
    narrow = halludec.get_strategy("act", profile=str(path), profile_k=1 / 16)
    with pytest.warns(UserWarning, match="no head among its top"), halludec.apply(model, narrow, batch) as call:
        assert call.plans == {}
    with pytest.raises(ValueError, match=r"Head \(7, 0\) is outside"):
        halludec.generate(model, batch, halludec.get_strategy("act", heads=((7, 0),)), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"keep_frac=1\.5 is invalid"):
        halludec.get_strategy("act", keep_frac=1.5)
    with pytest.raises(ValueError, match=r"heads=.* is invalid"):
        halludec.get_strategy("act", heads=((1,),))
    with pytest.raises(ValueError, match="pass one of them"):
        halludec.get_strategy("act", heads=((1, 0),), profile=str(path))
    assert halludec.get_strategy("act:chat").config.threshold == 0.15


def test_calibrate_act_heads_keeps_heads_that_help():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    target = 7

    def evaluate(strategy):  # the held-out "metric": log-probability of a fixed next token
        out = halludec.generate(model, batch, strategy, max_new_tokens=1, do_sample=False, **SCORES)
        return torch.log_softmax(out.scores[0][0], -1)[target].item()

    config = halludec.get_strategy("act", keep_frac=0.0, threshold=0.02).config
    kept, gains = calibrate_act_heads(evaluate, model, config, layers=[1, 2])
    assert gains.shape == (4, 4)
    assert gains[[0, 3]].eq(0).all()
    assert gains[1:3].ne(0).any()
    assert kept == sorted(((la, h) for la in (1, 2) for h in range(4) if gains[la, h] > 0), key=lambda x: -gains[x])
    if kept:  # the kept heads together move the metric the same way (not guaranteed in general; true here)
        assert evaluate(ACT(config, heads=tuple(kept))) > evaluate(halludec.get_strategy("none"))
