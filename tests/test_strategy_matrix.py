"""The strategy matrix: generic checks over every registered strategy x every tiny family.

Each registered strategy has one row: a neutral config (must equal plain ``generate`` token for token) and an
active config (must change the output), or ``None`` where a strategy has no active form (``none``).
A strategy registered without a row fails ``test_every_strategy_has_a_row``.
"""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding import STRATEGIES
from tests.helpers import assert_same_snapshot, snapshot

# name -> (neutral overrides, active overrides or None)
MATRIX: dict[str, tuple[dict, dict | None]] = {
    "none": ({}, None),
    "var": ({"sink_keep_frac": 1.0}, {"sink_dims": (0, 1, 2, 3), "sink_tau": 1.5, "sink_keep_frac": 0.0}),
    "inter": ({"interaction_weight": 0.0, "plausibility_beta": 0.0}, {"var_k": 0.0, "plausibility_beta": 0.0}),
    "vcd": ({"alpha": 0.0, "plausibility_beta": 0.0}, {"plausibility_beta": 0.0}),
    "m3id": ({"lam": 0.0}, {"lam": 0.5, "alpha": 1.0}),
    "icd": ({"lam": 0.0, "plausibility_beta": 0.0}, {"plausibility_beta": 0.0}),
    "gift": ({"alpha": 0.0}, {"alpha": 5.0}),
    "pai": ({"alpha": 0.0}, {"alpha": 2.0, "cfg_gamma": 1.5}),
    # layers 2-3: on some random tiny models layer 1's VHD is ~1e-7 (numerical noise), so its head set is a tie
    "vhr": ({"alpha": 1.0}, {"alpha": 2.0, "layers": (2, 3)}),
    "paint": ({"alpha_local": 0.0, "beta_summary": 0.0}, {"alpha_local": 3.0, "beta_summary": 3.0}),
    "vista": ({"vsv_lambda": 0.0, "sla_gamma": 0.0}, {"vsv_lambda": 0.17, "sla_gamma": 0.3}),
    "act": ({"keep_frac": 1.0}, {"keep_frac": 0.0, "threshold": 0.02, "first_layer": 1}),
    "agla": ({"alpha": 0.0, "plausibility_beta": 0.0}, {"plausibility_beta": 0.0}),
    "zerotuning": ({"gamma": 1.0}, {"gamma": 0.2}),
    "only": ({"alpha_collab": 0.0, "alpha_contrast": 0.0, "plausibility_beta": 0.0}, {"plausibility_beta": 0.0}),
    # OPERA owns the search; with one beam its neutral form is greedy (tests/test_opera.py checks 2 and 5 beams
    # against transformers' beam search); active: column penalty from the first token, rollback after 2 repeats
    "opera": (
        {"num_beams": 1, "num_attn_candidates": None, "penalty_weights": 0.0, "threshold": None},
        {"num_beams": 1, "early_tokens": 0, "threshold": 1, "fp16_scores": False},
    ),
}

# Cells a strategy declines with a clear error instead of running: (name, cell) -> regex of the ValueError.
# Cells: "sampling" (do_sample=True), "static_cache" (cache_implementation="static", compiled or not).
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("opera", "sampling"): "do_sample",
    ("opera", "static_cache"): "static cache",
}

KW = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}


def test_every_strategy_has_a_row():
    missing = sorted(set(STRATEGIES.names()) - set(MATRIX))
    assert not missing, f"strategies without a row in the strategy matrix: {missing}"


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_neutral_equals_generate(name, model_and_batch):
    model, processor, batch = model_and_batch
    neutral, _ = MATRIX[name]
    before = snapshot(model)
    plain = model.generate(**batch, **KW)
    ours = halludec.generate(model, batch, halludec.get_strategy(name, **neutral), processor=processor, **KW)
    assert torch.equal(plain, ours)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("name", sorted(n for n, (_, active) in MATRIX.items() if active is not None))
def test_active_changes_output(name, model_and_batch):
    model, processor, batch = model_and_batch
    _, active = MATRIX[name]
    before = snapshot(model)
    plain = model.generate(**batch, **KW, output_scores=True, return_dict_in_generate=True)
    ours = halludec.generate(
        model,
        batch,
        halludec.get_strategy(name, **active),
        processor=processor,
        **KW,
        output_scores=True,
        return_dict_in_generate=True,
    )
    changed = any(not torch.allclose(a, b) for a, b in zip(plain.scores, ours.scores, strict=True))
    assert changed
    assert_same_snapshot(before, snapshot(model))


ACTIVE = sorted(n for n, (_, active) in MATRIX.items() if active is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ACTIVE)
def test_active_batch_equals_singles(name, family):
    """Per-row state: a left-padded batch of 2 gives each row what it gets alone (active config)."""
    from tests.conftest import QUESTIONS, tiny
    from tests.helpers import assert_batch_equals_singles

    model, processor = tiny(family)
    strategy = halludec.get_strategy(name, **MATRIX[name][1])
    assert_batch_equals_singles(model, processor, family, strategy, QUESTIONS, **KW)


@pytest.mark.slow
@pytest.mark.parametrize("name", ACTIVE)
def test_active_beam_search_and_sampling_run(name, model_and_batch):
    model, processor, batch = model_and_batch
    strategy = halludec.get_strategy(name, **MATRIX[name][1])
    before = snapshot(model)
    beams = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, num_beams=2)
    assert beams.shape[0] == 2
    if (name, "sampling") in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[name, "sampling"]):
            halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, do_sample=True)
    else:
        torch.manual_seed(0)
        first = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, do_sample=True)
        torch.manual_seed(0)
        second = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, do_sample=True)
        assert torch.equal(first, second)  # seeded sampling is reproducible through the strategy
    assert_same_snapshot(before, snapshot(model))
