"""The neutral path: halludec with nothing steered equals plain ``model.generate`` on every family."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import LastRowProbe, Probe, max_score_diff

GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}


def test_none_equals_generate_greedy(model_and_batch):
    model, _, batch = model_and_batch
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    plain = model.generate(**batch, **GREEDY, **SCORES)
    ours = halludec.generate(model, batch, "none", **GREEDY, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) == 0.0


@pytest.mark.slow
def test_none_equals_generate_beam(model_and_batch):
    model, _, batch = model_and_batch
    kw = {"max_new_tokens": 5, "num_beams": 2, "do_sample": False}
    assert torch.equal(model.generate(**batch, **kw), halludec.generate(model, batch, "none", **kw))


@pytest.mark.slow
def test_none_equals_generate_seeded_sampling(model_and_batch):
    model, _, batch = model_and_batch
    kw = {"max_new_tokens": 5, "do_sample": True, "top_k": 20, "temperature": 1.0}
    torch.manual_seed(123)
    plain = model.generate(**batch, **kw)
    torch.manual_seed(123)
    ours = halludec.generate(model, batch, "none", **kw)
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("probe_cls", [Probe, LastRowProbe])
def test_explicit_attention_path_matches_sdpa(model_and_batch, probe_cls):
    """Every layer through the float32 eager path (no edits) reproduces sdpa: tokens equal, logits to 2e-5."""
    model, _, batch = model_and_batch
    n_layers = halludec.get_adapter(model).dims.num_layers
    probe = probe_cls(layers=tuple(range(n_layers)))
    plain = model.generate(**batch, **GREEDY, **SCORES)
    ours = halludec.generate(model, batch, probe, **GREEDY, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) < 2e-5
    calls = probe.config.seen
    prefill_len = batch["input_ids"].shape[1]
    assert (0, prefill_len, prefill_len) in calls  # prefill
    assert any(q == 1 and k > prefill_len for (_, q, k) in calls)  # cached decode steps


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_singles(family):
    """A left-padded batch of 2 gives each row what that row gives alone (catches a missing mask function)."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    n_layers = halludec.get_adapter(model).dims.num_layers
    for strategy in ("none", Probe(layers=tuple(range(n_layers)))):
        both = halludec.generate(model, batch, strategy, **GREEDY, **SCORES)
        for row, question in enumerate(QUESTIONS):
            single = tiny_batch(processor, family, [question], seed=0, image_seed_offset=row)
            alone = halludec.generate(model, single, strategy, **GREEDY, **SCORES)
            new = both.sequences[row, batch["input_ids"].shape[1] :]
            assert torch.equal(new, alone.sequences[0, single["input_ids"].shape[1] :])
            for step_both, step_alone in zip(both.scores, alone.scores, strict=True):
                a, b = step_both[row].nan_to_num(neginf=0.0), step_alone[0].nan_to_num(neginf=0.0)
                assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_static_cache_explicit_attention_path(family):
    """With cache_implementation='static', the neutral and the explicit-attention paths equal plain static generate."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    kw = {**GREEDY, **SCORES, "cache_implementation": "static"}
    plain = model.generate(**batch, **kw)
    for strategy in ("none", Probe(layers=(0, 1, 2, 3))):
        ours = halludec.generate(model, batch, strategy, **kw)
        assert torch.equal(plain.sequences, ours.sequences)
        assert max_score_diff(plain, ours) < 2e-5
