"""VAR: redistribution and selection math, the sink finder, known constants, and VAR end to end on tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlavaConfig, Qwen2_5_VLConfig, Qwen2VLConfig

import halludec
from halludec.decoding import sinks as sinks_mod
from halludec.decoding.sinks import (
    BackboneShape,
    KnownSinkDims,
    find_sink_dimensions,
    known_sink_dims,
    rms_normalized,
    sink_mask,
)
from halludec.decoding.var import clear_sink_dimension_cache, redistribute, select_rows
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
# Tiny random models have no massive activations (|x/RMS(x)| <= sqrt(64) = 8 anyway): low tau, explicit dims.
ACTIVE = {"sink_dims": (0, 1, 2, 3), "sink_tau": 1.5, "sink_keep_frac": 0.0}
PLANTED = (5, 17)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_sink_dimension_cache()
    yield
    clear_sink_dimension_cache()


# ------------------------------------------------------------------------------------------------ math
# keys: 0 BOS (text sink), 1 text, 2 image sink, 3 image, 4 image, 5 text
SINKS = torch.tensor([[True, False, True, False, False, False]])
IMAGE = torch.tensor([[False, False, True, True, True, False]])


def test_redistribution_matches_hand_computed():
    probs = torch.tensor(
        [
            [0.30, 0.10, 0.15, 0.20, 0.05, 0.20],  # selected: visual mass 0.4, sink share 0.375
            [0.20, 0.10, 0.30, 0.05, 0.05, 0.30],  # sink share 0.75 > 0.5: untouched
            [0.50, 0.30, 0.00, 0.05, 0.05, 0.10],  # visual mass 0.1 < 0.2: untouched
        ]
    )[None, None]  # [B=1, H=1, q=3, K=6]
    before = probs.clone()
    eligible = torch.ones(1, 3, dtype=torch.bool)
    selected = select_rows(probs, SINKS, IMAGE, eligible, 0.5, 0.2)
    assert selected.tolist() == [[[True, False, False]]]
    out = redistribute(probs, SINKS, IMAGE, selected, keep=0.6)
    assert torch.equal(probs, before)  # not in place
    # sinks keep 60 %: 0.30 -> 0.18, 0.15 -> 0.09; freed 0.4 * 0.45 = 0.18 goes to image keys 3, 4 as 0.8 : 0.2.
    expected = torch.tensor([0.18, 0.10, 0.09, 0.20 + 0.144, 0.05 + 0.036, 0.20])
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 0, 0].sum(), torch.tensor(1.0))  # row sum preserved
    assert out[0, 0, 0, [1, 5]].tolist() == probs[0, 0, 0, [1, 5]].tolist()  # text non-sinks untouched
    assert torch.equal(out[0, 0, 1:], probs[0, 0, 1:])  # unselected rows untouched
    # keep 1.0 changes nothing, bit for bit
    assert torch.equal(redistribute(probs, SINKS, IMAGE, selected, keep=1.0), probs)


def test_selection_rule():
    probs = torch.tensor([[0.30, 0.10, 0.15, 0.20, 0.05, 0.20]])[None, None].expand(2, 2, 1, 6)  # [2, 2, 1, 6]
    all_rows = torch.ones(2, 1, dtype=torch.bool)
    sinks = torch.cat([SINKS, torch.tensor([[True, False, False, False, False, False]])])  # row 1: no image sink
    image = IMAGE.expand(2, 6)
    sel = select_rows(probs, sinks, image, all_rows, 0.5, 0.2)
    assert sel[0].all()
    assert not sel[1].any()  # no image sink in this layer: no VAR
    # paper rho: the non-sink share of visual attention is 0.625; 0.8 needs >= 0.8
    assert not select_rows(probs, sinks, image, all_rows, 0.8, 0.2).any()
    assert select_rows(probs, sinks, image, all_rows, 0.6, 0.2)[0].all()
    assert not select_rows(probs, sinks, image, all_rows, 0.5, 0.41).any()  # visual mass 0.4
    # prefill rows before the image end are never eligible
    assert not select_rows(probs, sinks, image, torch.zeros(2, 1, dtype=torch.bool), 0.5, 0.2).any()


def test_rows_without_nonsink_visual_attention_give_no_nan():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0, 0.0]])[None, None]  # image attention only on the sink
    eligible = torch.ones(1, 1, dtype=torch.bool)
    selected = select_rows(probs, SINKS, IMAGE, eligible, 0.0, 0.0)
    assert not selected.any()
    out = redistribute(probs, SINKS, IMAGE, torch.ones_like(selected), keep=0.6)  # forced: still no NaN
    assert torch.isfinite(out).all()


def test_rms_normalized_and_sink_mask_on_planted_dims():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4096, generator=gen)  # [B, T, D] (|x/RMS| <= sqrt(D): tau 20 needs a wide D)
    x[0, 0, list(PLANTED)] = 400.0  # BOS-like sink of row 0
    x[1, 3, 17] = -400.0  # a sink in the middle of row 1 (the sign does not matter)
    x[1, 0, 5] = 400.0  # a padding position of row 1: never a sink
    r = rms_normalized(x.half())
    assert r.dtype == torch.float32
    torch.testing.assert_close(r.pow(2).mean(-1), torch.ones(2, 7), atol=1e-3, rtol=1e-3)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 0] = False
    mask = sink_mask(x, PLANTED, 20.0, valid)
    assert torch.nonzero(mask).tolist() == [[0, 0], [1, 3]]
    assert not sink_mask(x, (0, 1), 20.0, valid).any()  # other dims carry nothing


def _plant(model, batch, image_row_offset: int = 3):
    """Pre-hook on layer 0 adding a massive activation in PLANTED dims at each row's first token, one image token
    and the first padding position (which must never count). Returns (handle, {row: [planted real positions]})."""
    adapter = halludec.get_adapter(model)
    am = batch["attention_mask"]
    first = am.argmax(-1).tolist()
    image_pos = [int(torch.nonzero(m)[image_row_offset]) for m in adapter.image_mask(batch["input_ids"])]
    pads = [int(torch.nonzero(m == 0)[0]) if (m == 0).any() else None for m in am]

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != am.shape[1]:
            return None
        h = hidden.clone()
        for b in range(h.shape[0]):
            for pos in (first[b], image_pos[b], pads[b]):
                if pos is not None:
                    h[b, pos, PLANTED[0]] += 1000.0
                    h[b, pos, PLANTED[1]] -= 1000.0
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    return handle, {b: sorted({first[b], image_pos[b]}) for b in range(len(first))}


def test_finder_finds_planted_dims_and_tokens():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    before = snapshot(model)
    with pytest.warns(UserWarning, match="no hidden dimension"):
        assert find_sink_dimensions(model, batch).dims == []  # tiny random model: no massive activations
    handle, planted = _plant(model, batch)
    try:
        report = find_sink_dimensions(model, batch, tau=4.0)  # two dims of 1000 in 64: |x/RMS| ~ 5.7
    finally:
        handle.remove()
    assert report.dims == list(PLANTED)
    assert sorted(report.sink_tokens) == [0, 1, 2, 3]
    for layer in range(4):
        for row, positions in planted.items():
            assert set(positions) <= set(report.sink_tokens[layer][row])
            assert all(batch["attention_mask"][row, p] == 1 for p in report.sink_tokens[layer][row])
    assert_same_snapshot(before, snapshot(model))


def test_var_with_found_dims_on_planted_model():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    handle, planted = _plant(model, batch)
    try:
        plain = model.generate(**batch, **KW, **SCORES)
        strategy = halludec.get_strategy("var", sink_tau=4.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with halludec.apply(model, strategy, batch) as call:
                out = model.generate(**batch, **KW, **SCORES)
                state = call.state[strategy.state_key]
    finally:
        handle.remove()
    assert any("finder found [5, 17]" in str(w.message) for w in caught)
    assert state.dims == PLANTED
    assert state.source == "finder"
    assert sorted(state.sinks) == [2]  # 4 layers: 2..L-2
    sinks = state.sinks[2]
    assert sinks.shape == batch["input_ids"].shape
    for row, positions in planted.items():
        assert torch.nonzero(sinks[row]).flatten().tolist() == positions
    assert max_score_diff(plain, out) > 1e-4


# ------------------------------------------------------------------------------------------- end to end
def test_no_sinks_found_warns_and_equals_generate():
    for family in ("llava", "qwen2_vl"):
        model, processor = tiny(family)
        batch = tiny_batch(processor, family, QUESTIONS, seed=0)
        before = snapshot(model)
        plain = model.generate(**batch, **KW, **SCORES)
        with pytest.warns(UserWarning, match="leaves attention unchanged"):
            ours = halludec.generate(model, batch, "var", **KW, **SCORES)
        assert torch.equal(plain.sequences, ours.sequences)
        assert max_score_diff(plain, ours) == 0.0
        assert_same_snapshot(before, snapshot(model))


def _boom(input_ids, scores):
    raise RuntimeError("boom")


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_active_changes_output_and_restores(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **KW, **SCORES)
    neutral = halludec.generate(
        model, batch, halludec.get_strategy("var", **{**ACTIVE, "sink_keep_frac": 1.0}), **KW, **SCORES
    )
    assert torch.equal(plain.sequences, neutral.sequences)
    assert max_score_diff(plain, neutral) == 0.0
    strategy = halludec.get_strategy("var", **ACTIVE)
    with halludec.apply(model, strategy, batch) as call:
        active = model.generate(**batch, **KW, **SCORES)
        sinks = dict(call.state[strategy.state_key].sinks)
    assert max_score_diff(plain, active) > 1e-4
    assert sinks
    assert all(s.shape == batch["input_ids"].shape for s in sinks.values())
    assert not any((s & (batch["attention_mask"] == 0)).any() for s in sinks.values())  # padding never a sink
    with pytest.raises(RuntimeError, match="boom"):  # restored also when generate raises mid-decoding
        halludec.generate(model, batch, strategy, max_new_tokens=3, logits_processor=[_boom])
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_of_two_equals_singles(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    strategy = halludec.get_strategy("var", **ACTIVE)
    both = halludec.generate(model, batch, strategy, **KW, **SCORES)
    for row, question in enumerate(QUESTIONS):
        single = tiny_batch(processor, family, [question], seed=0, image_seed_offset=row)
        alone = halludec.generate(model, single, strategy, **KW, **SCORES)
        assert torch.equal(
            both.sequences[row, batch["input_ids"].shape[1] :], alone.sequences[0, single["input_ids"].shape[1] :]
        )
        for step_both, step_alone in zip(both.scores, alone.scores, strict=True):
            a, b = step_both[row].nan_to_num(neginf=0.0), step_alone[0].nan_to_num(neginf=0.0)
            assert torch.allclose(a, b, atol=1e-4)


def test_beam_sampling_and_static_cache_run():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    strategy = halludec.get_strategy("var:repro", **ACTIVE)
    beams = halludec.generate(model, batch, strategy, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    sampled = halludec.generate(model, batch, strategy, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape[0] == 2
    dynamic = halludec.generate(model, batch, strategy, **KW)
    static = halludec.generate(model, batch, strategy, **KW, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_layers_and_presets():
    model, _ = tiny("llava")  # 4 decoder layers
    batch = tiny_batch(tiny("llava")[1], "llava", QUESTIONS[:1], seed=0)
    for spec, layers in (("var", {2}), ("var:repro", {2, 3})):
        strategy = halludec.get_strategy(spec, sink_dims=(0,))
        with halludec.apply(model, strategy, batch) as call:
            assert strategy.attention_layers(call) == layers
            assert set(call.plans) == layers
    assert halludec.get_strategy("var:general").config.min_nonsink_ratio == 0.8
    assert halludec.get_strategy("var:vision_centric").config.min_nonsink_ratio == 0.9
    with (
        pytest.warns(UserWarning, match="i.e. none"),
        halludec.apply(model, halludec.get_strategy("var", first_layer=3, sink_dims=(0,)), batch) as call,
    ):
        assert not call.plans


def test_config_errors():
    with pytest.raises(ValueError, match="min_nonsink_ratio"):
        halludec.get_strategy("var", min_nonsink_ratio=1.5)
    with pytest.raises(ValueError, match="sink_dims"):
        halludec.get_strategy("var", sink_dims=())
    with pytest.raises(ValueError, match="first_layer"):
        halludec.get_strategy("var", first_layer=-1)
    assert halludec.get_strategy("var", sink_dims=[3, 4]).config.sink_dims == (3, 4)
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    with pytest.raises(ValueError, match="hidden size 64"):
        halludec.generate(model, batch, halludec.get_strategy("var", sink_dims=(70,)), max_new_tokens=1)


def test_known_sink_dims_lookup(monkeypatch):
    llava7b = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008}
    )
    known = known_sink_dims(llava7b)
    assert known is not None
    assert (known.dims, known.status) == ((1415, 2533), "confirmed")
    llama3 = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336}
    )
    assert known_sink_dims(llama3) is None
    shape = {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944}
    qwen2 = known_sink_dims(Qwen2VLConfig(text_config=shape))
    assert qwen2 is not None
    assert (qwen2.dims, qwen2.status) == ((458, 2570), "unconfirmed")
    assert known_sink_dims(Qwen2_5_VLConfig(text_config=shape)) is None  # Qwen2.5 base LLM: not Qwen2's dims

    # A confirmed entry for the tiny LLaVA's shape is used directly, without the finder.
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    entry = KnownSinkDims("tiny", (0, 1, 2, 3), "confirmed", "test")
    monkeypatch.setitem(sinks_mod.KNOWN_SINK_DIMS, BackboneShape(("llama",), 64, 4, 128), entry)
    strategy = halludec.get_strategy("var")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no finder, no warning
        with halludec.apply(model, strategy, batch) as call:
            state = call.state[strategy.state_key]
            assert state.dims == (0, 1, 2, 3)
            assert state.source.startswith("known")
