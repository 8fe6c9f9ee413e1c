"""GIFT: saliency and enhancement math against hand-computed values, the informative-word filter, and end-to-end
behaviour on tiny models (neutral = plain generate, batches = single rows, one-pass = extra pass, restore)."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import halludec
from halludec.decoding import Strategy, gift, informative
from halludec.decoding.context import CallContext
from halludec.decoding.gift_math import enhance_last_row, gaze_shifts, saliency_log_gains
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_same_snapshot, max_score_diff, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:GIFT has no released settings")
KW = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}


def _plan(call, strategy):
    return call.state[strategy.state_key]


# ------------------------------------------------------------------------------------------ Stage A (math)
def _stage_a_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 heads, 4 rows, keys: 0 text, 1..3 image; informative rows 2 and 3."""
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0, 1] = torch.tensor([0.4, 0.2, 0.2, 0.2])
    probs[0, 0, 2] = torch.tensor([0.1, 0.5, 0.2, 0.2])
    probs[0, 0, 3] = torch.tensor([0.1, 0.3, 0.2, 0.4])
    probs[0, 1, 1] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    probs[0, 1, 2] = torch.tensor([0.6, 0.1, 0.2, 0.1])
    probs[0, 1, 3] = torch.tensor([0.6, 0.1, 0.2, 0.1])
    rows = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    visual = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    return probs, rows, visual


def test_gaze_shifts_hand_computed():
    probs, rows, visual = _stage_a_example()
    before = probs.clone()
    shift, total = gaze_shifts(probs, rows, visual, lo=2, hi=4, head_frac=0.5)
    # head 0: row2-row1 = [.3, 0, 0], row3-row2 = [-.2 -> 0, 0, .2] (total .5); head 1: [0, .1, 0] + 0 (total .1)
    # top half of 2 heads = head 0; its shifts summed over rows: [.3, 0, .2]
    assert torch.allclose(shift, torch.tensor([[0.0, 0.3, 0.0, 0.2]]), atol=1e-6)
    assert torch.allclose(total, torch.tensor([0.6]), atol=1e-6)
    assert torch.equal(probs, before)


def test_saliency_gains_hand_computed():
    mean = torch.tensor([[0.0, 0.15, 0.0, 0.1]])  # head-0 shifts / (1 layer * 1 head * 2 rows)
    image_id = torch.tensor([[0, 1, 1, 1]])
    # 3 sigma: no clipping; min-max over the image -> [1, 0, 2/3]; G = exp(2 s)
    log_gain = saliency_log_gains(mean, image_id, 1, alpha=2.0, clip_sigma=3.0)
    assert torch.allclose(log_gain, torch.tensor([[0.0, 2.0, 0.0, 4 / 3]]), atol=1e-6)
    # 1 sigma: bounds mean +- unbiased std clip the 0 up to the lower bound before min-max
    vals = [0.15, 0.0, 0.1]
    m = sum(vals) / 3
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 2)
    lo, hi = m - sd, m + sd
    clipped = [min(max(v, lo), hi) for v in vals]
    expected = [(c - min(clipped)) / (max(clipped) - min(clipped)) for c in clipped]
    log_gain = saliency_log_gains(mean, image_id, 1, alpha=1.0, clip_sigma=1.0)
    assert torch.allclose(log_gain[0, 1:], torch.tensor(expected), atol=1e-6)


def test_saliency_gains_per_image_and_flat_maps_never_nan():
    shift = torch.tensor([[0.0, 1.0, 3.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    image_id = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 0, 0]])
    log_gain = saliency_log_gains(shift, image_id, 2, alpha=1.0, clip_sigma=3.0)
    # row 0: image 1 -> [0, 1]; image 2 -> [1, 1, 0] (each normalised on its own); row 1: flat -> G = 1
    assert torch.allclose(log_gain[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(log_gain[1], torch.zeros(6))
    assert torch.isfinite(log_gain).all()


def _reference_saliency(attn, v0, v1, q0, q1, informative_rows, alpha, sigma=3.0):
    """The released algorithm restated for one row: inclusive spans, rows q0..q1, image keys v0..v1."""
    shift = attn[:, :, q0 : q1 + 1, v0 : v1 + 1] - attn[:, :, q0 - 1 : q1, v0 : v1 + 1]  # [n, H, Nq, Nv]
    shift = shift.clamp_min(0.0)[:, :, informative_rows]
    top = shift.sum(dim=(2, 3)).topk(shift.shape[1] // 2, dim=-1).indices  # [n, H/2]
    shift = shift.gather(1, top[:, :, None, None].expand(-1, -1, *shift.shape[2:]))
    heat = shift.mean(dim=(0, 1, 2))
    heat = heat.clamp(heat.mean() - sigma * heat.std(), heat.mean() + sigma * heat.std())
    return torch.exp(alpha * (heat - heat.min()) / (heat.max() - heat.min()))


def test_stage_a_matches_released_algorithm_per_row():
    gen = torch.Generator().manual_seed(0)
    batch, heads, length, n_layers = 3, 4, 20, 2
    probs = [torch.softmax(torch.randn(batch, heads, length, length, generator=gen), -1) for _ in range(n_layers)]
    # per row (left padding): image [v0, v1), question [q0, q1), informative offsets inside the question
    layout = [((2, 8), (9, 15), [0, 2, 3]), ((4, 10), (11, 18), [1, 6]), ((1, 9), (10, 12), [0, 1])]
    rows = torch.zeros(batch, length)
    image_id = torch.zeros(batch, length, dtype=torch.long)
    for b, ((v0, v1), (q0, _), inf) in enumerate(layout):
        rows[b, [q0 + i for i in inf]] = 1.0
        image_id[b, v0:v1] = 1
    visual = (image_id > 0).float()
    shift = sum(gaze_shifts(p, rows, visual, lo=9, hi=18, head_frac=0.5)[0] for p in probs)
    mean = shift / (n_layers * 2 * rows.sum(1, keepdim=True))
    gain = saliency_log_gains(mean, image_id, 1, alpha=5.0, clip_sigma=3.0).exp()
    for b, ((v0, v1), (q0, q1), inf) in enumerate(layout):
        attn = torch.stack([p[b] for p in probs])  # [n, H, T, T]
        ref = _reference_saliency(attn, v0, v1 - 1, q0, q1 - 1, inf, alpha=5.0)
        assert torch.allclose(gain[b, v0:v1], ref, atol=1e-5)
        assert torch.equal(gain[b, :v0], torch.ones(v0))


# ------------------------------------------------------------------------------------------ Stage B (math)
def test_enhancement_hand_computed():
    a = torch.tensor([[[0.2, 0.3, 0.1, 0.2, 0.2], [0.4, 0.05, 0.05, 0.2, 0.3]]])  # [1, H=2, K=5]
    visual = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    query = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
    gain = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0]])
    before = a.clone()
    out = enhance_last_row(a, gain, visual, query, head_frac=0.5, beta=1.0)
    # vision head = 0 (visual mass .4 vs .1): [.2, .6, .3, .2, .2], r = .9 / .4 = 2.25
    # question head = 1 (question mass .5 vs .4): [.4, .05, .05, .45, .675]; rows renormalised
    head0 = torch.tensor([0.2, 0.6, 0.3, 0.2, 0.2]) / 1.5
    head1 = torch.tensor([0.4, 0.05, 0.05, 0.45, 0.675]) / 1.625
    assert torch.allclose(out[0], torch.stack([head0, head1]), atol=1e-6)
    assert torch.equal(a, before)
    out = enhance_last_row(a, gain, visual, query, head_frac=0.5, beta=0.5)  # question x beta * r = 1.125
    head1 = torch.tensor([0.4, 0.05, 0.05, 0.225, 0.3375]) / 1.0625
    assert torch.allclose(out[0, 1], head1, atol=1e-6)


def _reference_enhance(a, v0, v1, q0, q1, gain, beta):
    """The released Stage B restated for one row: inclusive spans, ``a`` is ``[H, K]``."""
    a = a.clone()
    k = a.shape[0] // 2
    vision = a[:, v0 : v1 + 1].sum(-1).topk(k).indices
    orig = a[vision, v0 : v1 + 1].sum()
    a[vision, v0 : v1 + 1] = a[vision, v0 : v1 + 1] * gain
    ratio = a[vision, v0 : v1 + 1].sum() / orig
    question = a[:, q0 : q1 + 1].sum(-1).topk(k).indices
    a[question, q0 : q1 + 1] = a[question, q0 : q1 + 1] * beta * ratio
    return a / a.sum(-1, keepdim=True)


def test_enhancement_matches_released_algorithm_per_row():
    gen = torch.Generator().manual_seed(1)
    batch, heads, keys = 3, 8, 24
    a = torch.softmax(torch.randn(batch, heads, keys, generator=gen), -1)
    layout = [((2, 10), (11, 16)), ((5, 12), (13, 22)), ((0, 6), (7, 9))]
    visual, query, gain = torch.zeros(batch, keys), torch.zeros(batch, keys), torch.ones(batch, keys)
    for b, ((v0, v1), (q0, q1)) in enumerate(layout):
        visual[b, v0:v1], query[b, q0:q1] = 1.0, 1.0
        gain[b, v0:v1] = torch.exp(3.0 * torch.rand(v1 - v0, generator=gen))
    out = enhance_last_row(a, gain, visual, query, head_frac=0.5, beta=0.7)
    for b, ((v0, v1), (q0, q1)) in enumerate(layout):
        ref = _reference_enhance(a[b], v0, v1 - 1, q0, q1 - 1, gain[b, v0:v1], beta=0.7)
        assert torch.allclose(out[b], ref, atol=1e-6)  # r is one scalar per row, not per batch
    assert torch.allclose(out.sum(-1), torch.ones(batch, heads), atol=1e-6)
    assert torch.allclose(enhance_last_row(a, torch.ones_like(gain), visual, query, 0.5, 1.0), a, atol=1e-6)


def test_math_has_no_graph_breaks():
    a = torch.softmax(torch.randn(2, 4, 10), -1)
    visual, query = torch.zeros(2, 10), torch.zeros(2, 10)
    visual[:, 2:5], query[:, 6:9] = 1.0, 1.0
    probs = torch.softmax(torch.randn(2, 4, 10, 10), -1)
    assert torch._dynamo.explain(enhance_last_row)(a, visual + 1, visual, query, 0.5, 1.0).graph_break_count == 0
    assert torch._dynamo.explain(gaze_shifts)(probs, query, visual, 6, 9, 0.5).graph_break_count == 0
    assert torch._dynamo.explain(saliency_log_gains)(visual, visual.long(), 1, 5.0, 3.0).graph_break_count == 0


# --------------------------------------------------------------------------------- informative-word filter
@pytest.mark.parametrize(
    ("question", "words"),
    [
        ("Is there a red cube in the image?", ["red", "cube"]),
        ("What is on the table?", ["table"]),
        ("Describe the colours and the shapes that you can see in this picture, please.", ["colours", "shapes"]),
        ("How many dogs are there? 3 or 4?", ["dogs", "3", "4"]),
        ("What's the man's shirt colour?", ["man's", "shirt", "colour"]),
        ("Please describe this image in detail.", []),
        ("Is there a cat in the image?\nAnswer the question using a single word or phrase.", ["cat"]),
    ],
)
def test_builtin_filter_on_sample_questions(question, words):
    spans = informative.informative_word_spans(question, "builtin")
    assert [question[a:b] for a, b in spans] == words


def test_positions_on_tiny_tokenizer():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS)
    adapter = halludec.get_adapter(model)
    spans = adapter.query_spans(batch["input_ids"], processor.tokenizer, None, chat_template_owner=processor)
    positions, used = informative.informative_positions(batch["input_ids"], spans, processor, "builtin")
    assert used == "builtin"
    texts = [processor.tokenizer.decode(batch["input_ids"][r, pos].tolist()) for r, pos in enumerate(positions)]
    assert texts == ["redcube", "table"]
    assert all(s <= p < e for (s, e), pos in zip(spans, positions, strict=True) for p in pos)
    every, _ = informative.informative_positions(batch["input_ids"], spans, processor, "all")
    assert every == [list(range(s, e)) for s, e in spans]


def _trained_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["Is there a café or a 日本 sign near the red cube?", "What colour is the naïve dog's ball?"] * 20
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # sentencepiece-like: metaspace pieces with the "▁" prefix
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
    tok.train_from_iterator(text, trainer)
    return tok


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_word_to_token_mapping_bpe_and_sentencepiece(kind):
    tok = _trained_tokenizer(kind)
    question = "Is there a café or a 日本 sign near the red cube?"
    ids = tok.encode(question).ids
    text, ranges = informative.token_char_ranges(tok, ids)
    assert text.strip() == question
    assert all(a <= b for a, b in ranges)
    assert ranges[-1][1] == len(text)
    input_ids = torch.tensor([[0, *ids]])
    (positions,), _ = informative.informative_positions(input_ids, [(1, 1 + len(ids))], tok, "builtin")
    chosen = tok.decode(input_ids[0, positions].tolist())
    for word in ("café", "日本", "sign", "red", "cube"):
        assert word in chosen.replace(" ", "").replace("▁", "") or word in chosen
    assert "there" not in chosen


def test_spacy_filter_used_when_available(monkeypatch):
    class FakeToken(SimpleNamespace):
        pass

    def fake_nlp(text):
        out, at = [], 0
        for word in text.split():
            at = text.index(word, at)
            pos = "NOUN" if word.strip("?") in ("cube", "image") else "DET"
            out.append(FakeToken(text=word.strip("?"), idx=at, pos_=pos))
            at += len(word)
        return out

    monkeypatch.setattr(informative, "_spacy_nlp", lambda: fake_nlp)
    assert informative.resolve_word_filter("auto") == "spacy"
    q = "Is there a cube in the image?"
    assert [q[a:b] for a, b in informative.informative_word_spans(q, "spacy")] == ["cube", "image"]
    monkeypatch.setattr(informative, "_spacy_nlp", lambda: None)
    assert informative.resolve_word_filter("auto") == "builtin"
    with pytest.raises(ValueError, match="en_core_web_sm"):
        informative.resolve_word_filter("spacy")


# ---------------------------------------------------------------------------------------- config, defaults
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("saliency_layers", ()),
        ("saliency_layers", "best"),
        ("enhance_layers", (-1,)),
        ("alpha", -1.0),
        ("beta", -0.5),
        ("head_frac", 0.0),
        ("clip_sigma", 0.0),
        ("word_filter", "pos"),
        ("saliency_pass", "split"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        halludec.get_strategy("gift", **{field: value})


def _fake_adapter(model_type, layers, heads, kv, hidden, sliding=()):
    dims = SimpleNamespace(num_layers=layers, num_heads=heads, num_kv_heads=kv, hidden_size=hidden)
    return SimpleNamespace(dims=dims, config=SimpleNamespace(model_type=model_type), sliding_layers=lambda: sliding)


def test_presets_validate():
    assert halludec.get_strategy("gift:repro").config.word_filter == "spacy"


def test_per_model_defaults():
    name, sal, band, alpha = gift.default_settings(_fake_adapter("llava", 32, 32, 32, 4096))
    assert (name, sal, band, alpha) == ("llava-1.5-7b", (11,), tuple(range(12, 23)), 5.0)
    assert gift.default_settings(_fake_adapter("llava", 40, 40, 40, 5120))[1:] == ((10,), tuple(range(14, 21)), 5.0)
    assert gift.default_settings(_fake_adapter("qwen2_vl", 28, 28, 4, 3584))[1:] == ((14,), tuple(range(5, 19)), 4.0)
    assert gift.default_settings(_fake_adapter("mistral3", 32, 32, 8, 4096))[:3] == (
        "generic",
        (11,),
        tuple(range(12, 23)),
    )
    sliding = [i for i in range(48) if i % 6 != 5]  # Gemma-3 style: full attention every 6th layer
    assert gift.default_settings(_fake_adapter("gemma3", 48, 16, 8, 3840, sliding))[1] == (17,)


# ------------------------------------------------------------------------------------------- end to end
# Saliency inside the main prefill (tiny defaults: layer 1, band 2-3) on two families, the extra pass (saliency
# layer 2 inside the band 1-3, as Qwen2-VL-7B's defaults) on the other two.
EXTRA = {"saliency_layers": (2,), "enhance_layers": (1, 2, 3)}
PASSES = {"llava": {}, "qwen2_vl": {}, "llava_next": EXTRA, "qwen2_5_vl": EXTRA}


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_equals_generate_and_batch_equals_single_rows(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS)
    before = snapshot(model)
    plain = model.generate(**batch, **KW)
    neutral = halludec.get_strategy("gift", alpha=0.0, **PASSES[family])
    assert torch.equal(halludec.generate(model, batch, neutral, processor=processor, **KW), plain)
    active = halludec.get_strategy("gift", beta=0.8, **PASSES[family])
    out = halludec.generate(model, batch, active, processor=processor, **KW)
    for row, question in enumerate(QUESTIONS):
        single = tiny_batch(processor, family, [question], image_seed_offset=row)
        one = halludec.generate(model, single, active, processor=processor, **KW)
        assert torch.equal(out[row, batch["input_ids"].shape[1] :], one[0, single["input_ids"].shape[1] :])
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_one_pass_equals_extra_pass_and_released_saliency(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS[:1])
    kw = {**KW, "output_scores": True, "return_dict_in_generate": True}
    runs = {}
    for mode in ("inline", "extra"):
        strategy = halludec.get_strategy("gift", saliency_layers=(1,), enhance_layers=(2, 3), saliency_pass=mode)
        with halludec.apply(model, strategy, batch, processor=processor) as call:
            runs[mode] = (model.generate(**batch, **kw), _plan(call, strategy), call)
    (inline, plan_in, call), (extra, plan_ex, _) = runs["inline"], runs["extra"]
    assert plan_in.inline
    assert not plan_ex.inline
    assert call.plans[1].rows == plan_in.lo - 1 > 0  # inline saliency: rows from the question on, sdpa before
    assert torch.equal(inline.sequences, extra.sequences)
    assert max_score_diff(inline, extra) < 1e-4
    assert torch.allclose(plan_in.log_gain, plan_ex.log_gain, atol=1e-4)
    # the released algorithm on eager attentions of a plain forward
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = model(**batch, output_attentions=True).attentions[1][None, 0]  # [1, H, T, T]
    finally:
        model.set_attn_implementation("sdpa")
    (q0, q1), ((v0, v1),) = call.query_spans[0], call.image_spans[0]
    inf = [p - q0 for p in plan_in.rows[0].nonzero()[:, 0].tolist()]
    ref = _reference_saliency(attn.float(), v0, v1 - 1, q0, q1 - 1, inf, alpha=plan_in.alpha)
    assert torch.allclose(plan_in.log_gain[0, v0:v1].exp(), ref, rtol=1e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_several_images_are_normalised_per_image(family):
    from tests.test_adapters import two_image_batch

    model, processor = tiny(family)
    batch = two_image_batch(family)
    plans = []
    for mode in ("inline", "extra"):
        strategy = halludec.get_strategy("gift", alpha=2.0, saliency_pass=mode)
        with halludec.apply(model, strategy, batch, processor=processor) as call:
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        plans.append(_plan(call, strategy))
    assert torch.allclose(plans[0].log_gain, plans[1].log_gain, atol=1e-4)
    for row, spans in enumerate(call.image_spans):
        for start, end in spans:  # each image is min-max normalised on its own: its gains span [1, e^alpha]
            assert plans[0].log_gain[row, start:end].min().item() == pytest.approx(0.0, abs=1e-6)
            assert plans[0].log_gain[row, start:end].max().item() == pytest.approx(2.0, abs=1e-5)


def test_auto_saliency_layer_picks_per_row():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS)
    strategy = halludec.get_strategy("gift", saliency_layers="auto", enhance_layers=(2, 3))
    with halludec.apply(model, strategy, batch, processor=processor) as call:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    plan = _plan(call, strategy)
    assert len(plan.chosen) == 2
    assert all(0 <= c < 4 for c in plan.chosen)
    for row, layer in enumerate(plan.chosen):
        fixed = halludec.get_strategy("gift", saliency_layers=(layer,), enhance_layers=(2, 3), saliency_pass="extra")
        with halludec.apply(model, fixed, batch, processor=processor) as call_fixed:
            pass
        assert torch.allclose(plan.log_gain[row], _plan(call_fixed, fixed).log_gain[row], atol=1e-6)


def test_beams_sampling_and_static_cache_run():
    model, processor = tiny("qwen2_5_vl")
    batch = tiny_batch(processor, "qwen2_5_vl", QUESTIONS)
    strategy = halludec.get_strategy("gift")
    out = halludec.generate(model, batch, strategy, processor=processor, **KW, num_beams=2)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    torch.manual_seed(0)
    out = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape[0] == 2
    greedy = halludec.generate(model, batch, strategy, processor=processor, **KW)
    static = halludec.generate(model, batch, strategy, processor=processor, **KW, cache_implementation="static")
    assert torch.equal(greedy, static)


def test_fallbacks_warn_and_never_nan(monkeypatch):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["What is in the image?", "What is on the table?"])
    strategy = halludec.get_strategy("gift", word_filter="builtin")
    with (
        pytest.warns(UserWarning, match="no informative word in the question '[^']*image") as said,
        halludec.apply(model, strategy, batch, processor=processor) as call,
    ):
        model.generate(**batch, **KW)
    (told,) = [w for w in said if "informative" in str(w.message)]  # one per question text, not one per row
    assert told.filename == __file__  # it points at the caller's line, not at halludec's internals
    with warnings.catch_warnings(record=True) as again:  # the same instance on the next batch: said already
        warnings.simplefilter("always")
        halludec.generate(model, batch, strategy, processor=processor, **KW)
    assert not [w for w in again if "informative" in str(w.message)]
    plan = _plan(call, strategy)
    (q0, q1) = call.query_spans[0]
    assert plan.rows[0, q0:q1].eq(1).all()
    assert torch.isfinite(plan.log_gain).all()
    # an empty question span: GIFT leaves the row unchanged (G = 1, no question heads)
    plain = model.generate(**batch, **KW)
    monkeypatch.setattr(CallContext, "query_spans", property(lambda self: [(60, 60), (60, 60)]))
    with pytest.warns(UserWarning, match="empty question span"):
        out = halludec.generate(model, batch, halludec.get_strategy("gift", beta=2.0), processor=processor, **KW)
    assert torch.equal(out, plain)


def test_needs_processor_and_restores_on_error():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS)
    before = snapshot(model)
    with pytest.raises(ValueError, match="processor="):
        halludec.generate(model, batch, "gift", max_new_tokens=2)
    strategy = halludec.get_strategy("gift", saliency_layers=(2,), enhance_layers=(1, 2), saliency_pass="inline")
    with pytest.raises(ValueError, match="saliency_pass='inline'"):
        halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        halludec.generate(model, batch, halludec.get_strategy("gift", enhance_layers=(9,)), processor=processor)
    assert_same_snapshot(before, snapshot(model))


class _IdleSideBranch(Strategy):
    """A side branch (image removed) whose logits edit changes nothing."""

    name = "idle_side_branch"

    def side_inputs(self, call):
        return [call.adapter.text_only_inputs(call.inputs)]

    def edit_logits(self, logits, ctx):
        return logits


def test_composes_with_side_branches():
    model, processor = tiny("qwen2_vl")
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS)
    for config in ({}, {"saliency_layers": (2,), "enhance_layers": (1, 2, 3)}):
        alone = halludec.generate(model, batch, halludec.get_strategy("gift", **config), processor=processor, **KW)
        composed = halludec.generate(
            model, batch, [halludec.get_strategy("gift", **config), _IdleSideBranch()], processor=processor, **KW
        )
        assert torch.equal(alone, composed)
