"""VISTA: the steering rule, vectors and SLA on synthetic numbers; a hand-written reference decode; generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import halludec
from halludec.decoding.vista_math import (
    last_token_states,
    sla_hidden,
    sla_window,
    steer,
    steering_directions,
)
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_steer_hand_computed():
    x = torch.tensor([[[3.0, 4.0], [-3.0, 4.0]]])  # [B=1, q=2, D=2], both of norm 5
    v = torch.tensor([[1.0, 0.0]])  # [B, D] unit
    before = x.clone()
    out = steer(x, v, 0.5)
    assert torch.equal(x, before)  # not in place
    # row 0: cos(x, -v) = -0.6 -> gain 1: (0.6, 0.8) + (0.5, 0) = (1.1, 0.8), rescaled to norm 5
    # row 1: cos(x, -v) = 0.6 -> gain 1.6: (-0.6, 0.8) + (0.8, 0) = (0.2, 0.8), rescaled to norm 5
    expect = torch.tensor([[[1.1, 0.8], [0.2, 0.8]]])
    expect = expect / expect.norm(dim=-1, keepdim=True) * 5.0
    torch.testing.assert_close(out, expect)
    # simple mode (no similarity gain): (-0.6, 0.8) + (0.5, 0) = (-0.1, 0.8)
    simple = steer(x, v, 0.5, similarity_gain=False)[0, 1]
    torch.testing.assert_close(simple, torch.tensor([-0.1, 0.8]) / math.hypot(0.1, 0.8) * 5.0)
    torch.testing.assert_close(steer(x, v, 0.0), x)  # lambda 0: only renormalisation


def test_steer_per_row_and_dtype():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    v = F.normalize(torch.randn(2, 8), dim=-1)
    out = steer(x, v, 0.3)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, 8)
    for row in range(2):
        torch.testing.assert_close(out[row : row + 1], steer(x[row : row + 1], v[row : row + 1], 0.3))
    torch.testing.assert_close(out.norm(dim=-1), x.float().norm(dim=-1))  # norm preserved


def test_steering_directions_hand_computed():
    pos = {0: torch.tensor([[3.0, 4.0]]), 1: torch.tensor([[1.0, 1.0]])}
    neg = {0: torch.tensor([[0.0, 0.0]]), 1: torch.tensor([[1.0, 0.0]])}
    saved = {k: v.clone() for k, v in pos.items()}
    out = steering_directions(pos, neg)
    torch.testing.assert_close(out[0], torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 1.0]]))
    # the released code's PCA artefact: +1 on layer 0's first coordinate, before normalising
    quirk = steering_directions(pos, neg, pca_offset=True)
    torch.testing.assert_close(quirk[0], torch.tensor([[4.0, 4.0]]) / math.sqrt(32.0))
    torch.testing.assert_close(quirk[1], out[1])
    assert all(torch.equal(pos[k], saved[k]) for k in pos)
    # a difference at the rounding-noise level (image out of a sliding window) is no direction: zero, not noise
    noisy = steering_directions(
        {0: torch.tensor([[10.0, 0.0], [10.0, 0.0]])}, {0: torch.tensor([[10.0, 1e-3], [9.0, 0.0]])}
    )
    torch.testing.assert_close(noisy[0], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    x = torch.tensor([[[3.0, 4.0]], [[1.0, 2.0]]])
    torch.testing.assert_close(steer(x, noisy[0], 0.5)[0], x[0])  # a zero vector leaves the state alone


def test_sla_window():
    assert sla_window(32, 5) == (26, 27, 28, 29, 30)  # paper: the 5 layers before the last
    assert sla_window(32, 6) == (25, 26, 27, 28, 29, 30)  # released code's "25,30"
    assert sla_window(4, 5) == (0, 1, 2)
    assert sla_window(1, 5) == ()


def test_sla_hidden_gives_the_papers_logits():
    """head(sla_hidden) = (1 - gamma) * head(n_L) + gamma * mean_l head(norm(h_l)) (Eq. 7-8), bias included."""
    torch.manual_seed(0)
    head = nn.Linear(4, 6)
    norm = nn.LayerNorm(4)
    final = torch.randn(2, 4)  # [B, D] the final norm's output
    early = torch.randn(3, 2, 4)  # [w, B, D]
    saved = (final.clone(), early.clone())
    with torch.no_grad():
        paper = 0.7 * head(final) + 0.3 * torch.stack([head(norm(h)) for h in early]).mean(0)
        torch.testing.assert_close(head(sla_hidden(final, early, 0.3, norm)), paper)
        raw = 0.7 * head(final) + 0.3 * torch.stack([head(h) for h in early]).mean(0)  # released code: no norm
        torch.testing.assert_close(head(sla_hidden(final, early, 0.3)), raw)
    # hand-computed: D = 1, no norm: 0.5 * 2 + 0.5 * mean(1, 3) = 2
    torch.testing.assert_close(
        sla_hidden(torch.tensor([[2.0]]), torch.tensor([[[1.0]], [[3.0]]]), 0.5), torch.tensor([[2.0]])
    )
    assert torch.equal(final, saved[0])
    assert torch.equal(early, saved[1])


def _reference_decode(model, adapter, inputs, lam, gamma, window, steps):
    """Plain greedy decode of one unpadded row with VISTA written out by hand (no cache, no halludec)."""
    n = adapter.dims.num_layers
    text = adapter.text_only_inputs(inputs)
    pos = last_token_states(model, adapter, inputs, range(n))
    neg = last_token_states(model, adapter, text, range(n))
    dirs = steering_directions(pos, neg)
    outs: dict[int, torch.Tensor] = {}
    handles = [
        adapter.layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: steer(o, dirs[i], lam)) for i in range(n)
    ]
    handles += [adapter.layers[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in range(n)]
    ids, scores = inputs["input_ids"], []
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[:, -1]
                layers = sla_window(n, window)
                aug = torch.stack([model.lm_head(adapter.decoder.norm(outs[i][:, -1])) for i in layers]).mean(0)
                mixed = (1 - gamma) * logits + gamma * aug
                scores.append(mixed)
                ids = torch.cat([ids, mixed.argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return ids, scores


def test_matches_hand_written_reference():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    adapter = halludec.get_adapter(model)
    ids, scores = _reference_decode(model, adapter, batch, 0.5, 0.4, 2, steps=4)
    strategy = halludec.get_strategy("vista", vsv_lambda=0.5, sla_gamma=0.4, sla_window=2)
    out = halludec.generate(model, batch, strategy, max_new_tokens=4, do_sample=False, **SCORES)
    assert torch.equal(out.sequences, ids)
    for ours, ref in zip(out.scores, scores, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_equals_generate_and_active_changes(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.get_strategy("vista", vsv_lambda=0.0, sla_gamma=0.0)
    ours = halludec.generate(model, batch, neutral, **KW, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) == 0.0
    for name in ("vista", "vista:vsv_only", "vista:sla_only", "vista:repro"):
        assert max_score_diff(plain, halludec.generate(model, batch, name, **KW, **SCORES)) > 1e-3, name
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_batch_of_two_equals_singles(family):
    model, processor = tiny(family)
    assert_batch_equals_singles(model, processor, family, "vista", QUESTIONS, **KW)


def test_beam_sampling_residual_site_and_composition():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    before = snapshot(model)
    assert halludec.generate(model, batch, "vista", max_new_tokens=3, num_beams=2).shape[0] == 2
    torch.manual_seed(0)
    first = halludec.generate(model, batch, "vista", max_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(first, halludec.generate(model, batch, "vista", max_new_tokens=3, do_sample=True))
    residual = halludec.get_strategy("vista", vsv_site="residual")
    assert halludec.generate(model, batch, residual, max_new_tokens=3).shape[0] == 2
    # side rows of another strategy ride in the same forward: only the main rows are steered and read
    alone = halludec.generate(model, batch, "vista", **KW, **SCORES)
    idle_vcd = halludec.get_strategy("vcd", alpha=0.0, plausibility_beta=0.0)
    both = halludec.generate(model, batch, ["vista", idle_vcd], **KW, **SCORES)
    assert torch.equal(alone.sequences, both.sequences)
    assert max_score_diff(alone, both) < 1e-4
    assert_same_snapshot(before, snapshot(model))


def test_config_errors():
    with pytest.raises(ValueError, match=r"sla_gamma=1.5 is invalid"):
        halludec.get_strategy("vista", sla_gamma=1.5)
    with pytest.raises(ValueError, match=r"vsv_lambda=-0.1 is invalid"):
        halludec.get_strategy("vista", vsv_lambda=-0.1)
    with pytest.raises(ValueError, match=r"vsv_site='attn' is invalid"):
        halludec.get_strategy("vista", vsv_site="attn")
    with pytest.raises(ValueError, match=r"sla_window=0 is invalid"):
        halludec.get_strategy("vista", sla_window=0)
    with pytest.raises(ValueError, match=r"vsv_layers=\(\) is invalid"):
        halludec.get_strategy("vista", vsv_layers=())
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    with pytest.raises(ValueError, match="Layer index 9 is out of range"):
        halludec.generate(model, batch, halludec.get_strategy("vista", sla_layers=(1, 9)), max_new_tokens=1)
