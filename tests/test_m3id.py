"""M3ID: the gated PMI math, the step weight, neutral/active configs, side logits, batches, beams.

Every other tiny family runs through the strategy matrix (tests/test_strategy_matrix.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import halludec
from halludec.decoding.m3id import M3ID, MAX_WEIGHT, m3id_combine, m3id_weight
from halludec.decoding.side import LogitsContext
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
ACTIVE = {"lam": 0.5, "alpha": 1.0}


def test_combination_matches_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 0 top p = e^2/(e^2+2) = 0.787; row 1 p = 1/3
    no_image = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    keep_l, keep_u = logits.clone(), no_image.clone()
    logp, logq = logits.log_softmax(-1), no_image.log_softmax(-1)
    w = 0.5
    # alpha 0.5: row 0 is confident (0.787 >= 0.5) and kept as is; row 1 (1/3 < 0.5) gets l + w (log p - log q).
    out = m3id_combine(logits, no_image, w, 0.5)
    assert torch.equal(out[0], logits[0])
    torch.testing.assert_close(out[1], logits[1] + w * (logp[1] - logq[1]))
    # By hand for row 1: log p = -log 3 everywhere; log q = [1, 0, 0] - log(e + 2).
    lse = math.log(math.e + 2.0)
    expected = torch.tensor([-math.log(3) - (1 - lse), -math.log(3) + lse, -math.log(3) + lse]) * w
    torch.testing.assert_close(out[1], expected)
    # alpha 0.9 opens both rows; alpha 0 none; the distribution equals the paper's l_c + w (l_c - l_u) on log-probs.
    both = m3id_combine(logits, no_image, w, 0.9)
    paper = logp + w * (logp - logq)
    torch.testing.assert_close(both.log_softmax(-1), paper.log_softmax(-1))
    assert torch.equal(m3id_combine(logits, no_image, w, 0.0), logits)
    assert torch.equal(logits, keep_l)
    assert torch.equal(no_image, keep_u)


def test_step_weight_follows_exp_lambda_t_minus_one():
    assert m3id_weight(0.0, 10) == 0.0
    assert m3id_weight(0.02, 0) == pytest.approx(math.exp(0.02) - 1.0)  # the first token is t = 1
    assert m3id_weight(0.02, 9) == pytest.approx(math.exp(0.2) - 1.0)
    gamma = math.exp(-0.03 * 5)
    assert m3id_weight(0.03, 4) == pytest.approx((1 - gamma) / gamma)
    assert m3id_weight(1.0, 10_000) == MAX_WEIGHT  # finite for long generations
    weight = m3id_weight(0.02, torch.tensor(9))  # the static-cache path hands a 0-dim tensor: no host sync
    assert isinstance(weight, torch.Tensor)
    torch.testing.assert_close(weight, torch.tensor(math.exp(0.2) - 1.0))
    assert m3id_weight(1.0, torch.tensor(10_000)).item() == MAX_WEIGHT
    ctx = LogitsContext(None, [torch.zeros(1, 3)], 0)
    logits = torch.tensor([[1.0, 0.0, 0.0]])  # top p = e / (e + 2) < 1: the gate is open
    out = M3ID(lam=1.0, alpha=1.0).edit_logits(logits, ctx)
    w = math.e - 1.0  # t = 1
    torch.testing.assert_close(out, logits + w * (logits - math.log(math.e + 2.0) + math.log(3.0)))
    later = M3ID(lam=1.0, alpha=1.0).edit_logits(logits, LogitsContext(None, [torch.zeros(1, 3)], 2))  # t = 3
    torch.testing.assert_close(
        later, logits + (math.exp(3.0) - 1.0) * (logits - math.log(math.e + 2.0) + math.log(3.0))
    )


def test_config_validation():
    for field, value in [("lam", -0.1), ("alpha", 1.5), ("alpha", -0.1), ("lam", "x")]:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid"):
            halludec.get_strategy("m3id", **{field: value})
    s = halludec.get_strategy("m3id")
    assert (s.config.lam, s.config.alpha) == (0.02, 0.3)
    assert M3ID.paper.endswith("2403.14003")
    assert M3ID.needs_image
    assert "m3id" in halludec.list_strategies()


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_active_side_logits_batch_and_restore(family):
    model, processor = tiny(family)
    adapter = halludec.get_adapter(model)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    strategy = recording(M3ID)(**ACTIVE)
    neutrals = [M3ID(lam=0.0), M3ID(alpha=0.0)]
    _, active = assert_neutral_then_active(model, None, batch, neutrals, strategy, **GREEDY, **SCORES)

    # The side logits at the prefill equal a fresh forward on the image-free prompt; the first scores are M3ID's.
    side = adapter.text_only_inputs(batch)
    assert not adapter.image_mask(side["input_ids"]).any()
    assert "pixel_values" not in side
    combine = lambda m, s: m3id_combine(m, s, m3id_weight(0.5, 0), 1.0)  # noqa: E731
    assert_side_logits_and_contrast(model, batch, strategy, [side], active, combine)

    # A left-padded batch of 2 equals each row alone (the step weight and the gate are per row).
    assert_batch_equals_singles(model, processor, family, M3ID(lam=0.3, alpha=0.5), QUESTIONS, **GREEDY)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_sampling_and_beam_run(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    prompt = batch["input_ids"].shape[1]
    strategy = M3ID(**ACTIVE)
    greedy = halludec.generate(model, batch, strategy, max_new_tokens=4, do_sample=False)
    beam = halludec.generate(model, batch, strategy, max_new_tokens=4, num_beams=2, do_sample=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(halludec.generate(model, batch, strategy, max_new_tokens=4, do_sample=True, top_p=1.0))
    assert torch.equal(runs[0], runs[1])
    for out in (greedy, beam, runs[0]):
        assert out.shape[0] == 2
        assert prompt < out.shape[1] <= prompt + 4
