"""AGLA: assembly and cutoff math, the mask rule, attention relevance, pixel layouts, and the strategy end to end."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding.agla import AGLA, agla_combine, attention_relevance
from halludec.decoding.agla_masks import gaussian_blur, keep_masks
from halludec.decoding.contrast import CUTOFF_MARGIN
from halludec.decoding.side import LogitsContext
from halludec.tiny import build_tiny, tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, snapshot

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
NEUTRAL = {"alpha": 0.0, "plausibility_beta": 0.0}


def test_assembly_and_cutoff_match_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [0.5, 0.4, -1.0, 0.3]])
    local = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.5, -0.6, 0.0, 0.3]])
    keep_l, keep_loc = logits.clone(), local.clone()
    # z = l + 2 l_loc = [[4, 5, 0, -3], [1.5, -0.8, -1, 0.9]]; beta 0.5 keeps l >= max(l) - log 2:
    # row 0 only token 0 (1.0 < 2 - 0.693), row 1 tokens 0, 1, 3.
    z = torch.tensor([[4.0, 5.0, 0.0, -3.0], [1.5, -0.8, -1.0, 0.9]])
    expected = z.clone()
    expected[0, 1:] = z[0, 1:] - 8.0 - CUTOFF_MARGIN  # span of row 0 = 5 - (-3)
    expected[1, 2] = -1.0 - 2.5 - CUTOFF_MARGIN  # span of row 1 = 1.5 - (-1)
    torch.testing.assert_close(agla_combine(logits, local, 2.0, 0.5), expected)
    torch.testing.assert_close(agla_combine(logits, local, 2.0, 0.0), z)
    assert expected[0].argmax() == 0  # the cutoff overrides the local view's preference for token 1
    assert torch.equal(logits, keep_l)
    assert torch.equal(local, keep_loc)
    ctx = LogitsContext(None, [], 0)
    assert torch.equal(AGLA(**NEUTRAL).edit_logits(logits, ctx), logits)


def test_mask_rule_keeps_the_top_ranked_pixels():
    # 2 x 3 map at its own size, no blur: ranks 6 > 5 > 4 > 3 > 2 > 1.
    m = torch.tensor([[1.0, 6.0, 3.0], [5.0, 2.0, 4.0]])
    before = m.clone()
    (k,) = keep_masks([m], [(2, 3)], 0.5, 0.0)  # threshold = ranked[int(6 * 0.5)] = 3: keeps 6, 5, 4, 3
    assert torch.equal(k, torch.tensor([[False, True, True], [True, False, True]]))
    assert torch.equal(keep_masks([m], [(2, 3)], 1.0, 0.0)[0], torch.ones(2, 3, dtype=torch.bool))  # clamped
    assert keep_masks([m], [(2, 3)], 0.0, 0.0)[0].sum() == 1  # the top pixel always stays
    (t,) = keep_masks([m], [(2, 3)], torch.tensor(0.7), 0.0)  # adaptive (tensor) keep: ranked[4] = 2
    assert int(t.sum()) == 5
    assert torch.equal(m, before)
    # Two maps of one image are thresholded jointly: the low map loses all of its pixels.
    low, high = torch.zeros(2, 2), torch.ones(2, 2)
    a, b = keep_masks([low, high + torch.arange(4.0).view(2, 2)], [(2, 2), (2, 2)], 0.25, 0.0)
    assert not a.any()
    assert int(b.sum()) == 3
    # Upsampling: a 1 x 2 map [hi, lo] keeps the left part of a 4 x 8 plane.
    (u,) = keep_masks([torch.tensor([[1.0, 0.0]])], [(4, 8)], 0.45, 0.0)
    assert u[:, :3].all()
    assert not u[:, 5:].any()


def test_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 1, 20, 33, generator=torch.Generator().manual_seed(0))
    for sigma in (0.6, 2.5):
        ref = torch.from_numpy(ndimage.gaussian_filter(x[0, 0].double().numpy(), sigma)).float()
        torch.testing.assert_close(gaussian_blur(x, sigma)[0, 0], ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_attention_relevance_weights_rows_and_skips_beam_copies():
    probs = torch.rand(4, 2, 3, 5, generator=torch.Generator().manual_seed(1))  # [B * 2 beams, H, q, K]
    weights = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    out = attention_relevance(probs, weights, batch=2)
    ref = torch.stack([probs[0].mean(0)[1:].mean(0), probs[2].mean(0)[0]])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(attention_relevance(probs, None, batch=2), probs[::2].mean(1)[:, -1])


def test_config_validation_presets_and_to_dict():
    for field, value in [("alpha", -1.0), ("plausibility_beta", 1.5), ("mask_ratio", 1.2), ("work_side", 4)]:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid"):
            halludec.get_strategy("agla", **{field: value})
    for field, value in [("relevance_queries", "all"), ("fill", "white"), ("relevance_fn", 3)]:
        with pytest.raises(ValueError, match=f"{field}="):
            halludec.get_strategy("agla", **{field: value})
    with pytest.raises(ValueError, match="relevance_layers"):
        halludec.get_strategy("agla", relevance_layers=())
    s = halludec.get_strategy("agla")
    assert (s.config.alpha, s.config.plausibility_beta, s.config.mask_ratio) == (2.0, 0.5, 0.2)
    assert halludec.get_strategy("agla:last_row").config.relevance_queries == "last"
    assert AGLA.paper.endswith("2406.12718")
    assert AGLA.needs_image

    def my_gradcam(inputs, questions):
        return torch.ones(1, 2, 2)

    assert (
        halludec.get_strategy("agla", relevance_fn=my_gradcam)
        .describe()["config"]["relevance_fn"]
        .endswith("my_gradcam")
    )


def _plane(family, inputs, local):
    """The first row's image plane (original, local) as [C, h, w] from the family's pixel layout."""
    pv = inputs["pixel_values"]
    if family.startswith("qwen"):
        t, h, w = inputs["image_grid_thw"][0].tolist()

        def unflatten(x):  # rows (bh, bw, mh, mw) of (C, T, P, P) -> [C, hP, wP]
            x = x[: t * h * w].view(h // 2, w // 2, 2, 2, 3, 2, 14, 14)[..., 0, :, :]  # first frame
            return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * 14, w * 14)

        return unflatten(pv), unflatten(local)
    return (pv[0], local[0]) if pv.dim() == 4 else (pv[0, 0], local[0, 0])


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_external_relevance_masks_the_irrelevant_half(family):
    """A user relevance map (left half relevant) masks the right half to black, in every tile / patch layout."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS[:1], seed=0)
    if family.startswith("qwen"):
        _, h, w = batch["image_grid_thw"][0].tolist()
        size = (h * 14, w * 14)
    else:
        size = tuple(batch["pixel_values"].shape[-2:])
    seen = {}

    def relevance(inputs, questions):
        seen["questions"] = questions
        rel = torch.zeros(1, *size)
        rel[..., : size[1] // 2] = 1.0
        return rel

    s = AGLA(relevance_fn=relevance, mask_ratio=0.55, blur=0.0)
    with halludec.apply(model, s, batch, processor=processor) as call:
        local = call.state[s.state_key].pixels
    assert seen["questions"] == QUESTIONS[:1]  # located in the prompt through the processor
    original, masked = _plane(family, batch, local)
    black = -torch.tensor(processor.image_processor.image_mean) / torch.tensor(processor.image_processor.image_std)
    half = size[1] // 2
    assert torch.equal(masked[..., :half], original[..., :half])
    torch.testing.assert_close(masked[..., half:], black.view(3, 1, 1).expand(3, size[0], size[1] - half))
    if family == "llava_next":  # 30 x 60 image -> base tile + 2 high-res tiles (left half kept, right half black)
        assert torch.equal(local[0, 1], batch["pixel_values"][0, 1])
        torch.testing.assert_close(local[0, 2], black.view(3, 1, 1).expand_as(local[0, 2]))
    # Adaptive ratio: a similarity of 0.6 masks 30 % of the pixels (the paper's sim / 2).
    noise = torch.rand(1, *size, generator=torch.Generator().manual_seed(0))
    s = AGLA(relevance_fn=lambda i, q: (noise, torch.tensor([0.6])), blur=0.0)
    with halludec.apply(model, s, batch, processor=processor) as call:
        _, masked = _plane(family, batch, call.state[s.state_key].pixels)
    kept = (masked != black.view(3, 1, 1)).any(0).float().mean()
    assert abs(float(kept) - 0.7) < 0.01


class RecordingAGLA(AGLA):
    """AGLA that keeps the side logits of the prefill."""

    def edit_logits(self, logits, ctx):
        if isinstance(ctx.step, int) and ctx.step == 0:
            self.prefill_side = ctx.side[0].clone()
        return super().edit_logits(logits, ctx)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_attention_variant_reads_the_prefill_and_feeds_the_local_branch(family):
    """The relevance equals the eager attention of the question rows; the local branch sees the masked pixels."""
    model, processor = build_tiny(family, seed=0)  # own model: switched to eager for the reference below
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    s = RecordingAGLA(relevance_layers=(1, 2))
    with halludec.apply(model, s, batch, processor=processor) as call:
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        state, spans = call.state[s.state_key], call.query_spans
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions
    ref = torch.zeros_like(state.acc)
    for row, (a, b) in enumerate(spans):
        ref[row] = sum(att[layer][row].mean(0)[a:b].mean(0) for layer in (1, 2))
    torch.testing.assert_close(state.acc, ref, atol=1e-5, rtol=1e-4)
    # The local branch's prefill saw the masked pixels (written during the main prefill).
    with torch.no_grad():
        local = {**batch, "pixel_values": state.pixels}
        fresh = model(**local).logits[:, -1]
    torch.testing.assert_close(s.prefill_side, fresh, atol=1e-4, rtol=1e-4)
    assert not torch.equal(state.pixels, batch["pixel_values"])


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_active_batch_and_restore(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **GREEDY, **SCORES)
    neutral = halludec.generate(model, batch, AGLA(**NEUTRAL), processor=processor, **GREEDY)
    assert torch.equal(plain.sequences, neutral)
    active = halludec.generate(model, batch, AGLA(plausibility_beta=0.0), processor=processor, **GREEDY, **SCORES)
    assert any(not torch.allclose(a, b) for a, b in zip(plain.scores, active.scores, strict=True))
    # Per-row relevance and masks: a left-padded batch of 2 equals each row alone (default config, cutoff on).
    assert_batch_equals_singles(model, processor, family, AGLA(), QUESTIONS, **GREEDY)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_beams_and_sampling_run(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    beams = halludec.generate(model, batch, "agla", processor=processor, max_new_tokens=3, num_beams=2)
    assert beams.shape[0] == 2
    s = halludec.get_strategy("agla:last_row")
    torch.manual_seed(0)
    first = halludec.generate(model, batch, s, processor=processor, max_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(first, halludec.generate(model, batch, s, processor=processor, max_new_tokens=3, do_sample=True))
    assert_same_snapshot(before, snapshot(model))


def test_black_fill_needs_the_processor_and_external_maps_are_checked():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    with pytest.raises(ValueError, match="fill='mean'"):
        halludec.generate(model, batch, AGLA(relevance_queries="last"), max_new_tokens=1)
    out = halludec.generate(model, batch, AGLA(relevance_queries="last", fill="mean"), max_new_tokens=1)
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match="one map per row"):
        halludec.generate(model, batch, AGLA(relevance_fn=lambda i, q: torch.ones(1, 3, 3)), processor=processor)
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        halludec.generate(model, batch, AGLA(relevance_fn=lambda i, q: "map"), processor=processor)
