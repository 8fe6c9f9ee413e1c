"""ONLY: outlier dropping, TVER head selection, the gated combination, the one-layer path against a reference built
from the released code's operations, batches, beams, sampling, composition and restoration."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.decoding import Strategy
from halludec.decoding.contrast import CUTOFF_MARGIN
from halludec.decoding.only import ONLY, drop_outliers, enhanced_probs, gated_combine, group_entropy
from halludec.tiny import build_tiny, tiny_batch
from halludec.vlm_adapters import get_adapter
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, snapshot

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}


class _Echo(Strategy):
    """Test-only: one side branch (the prompt itself) whose logits are ignored."""

    name = "echo"

    def side_inputs(self, call):
        return [dict(call.inputs)]

    def edit_logits(self, logits, ctx):
        return logits


def test_drop_outliers_matches_hand_computed_values():
    # group = keys 0..3: mean 0.25, unbiased std of [0.1, 0.1, 0.1, 0.7] = 0.3 -> cut 0.55: key 2 (0.7) dropped;
    # key 4 is outside the group and kept although it is the largest.
    probs = torch.tensor([[[0.1, 0.1, 0.7, 0.1, 0.9]]])  # [1, 1, 5]
    group = torch.tensor([[True, True, True, True, False]])
    keep = probs.clone()
    out = drop_outliers(probs, group)
    torch.testing.assert_close(out, torch.tensor([[[0.1, 0.1, 0.0, 0.1, 0.9]]]))
    assert torch.equal(probs, keep)
    # A group of one key (std undefined in the code: NaN, nothing dropped) and an empty group change nothing.
    one = torch.tensor([[False, False, True, False, False]])
    assert torch.equal(drop_outliers(probs, one), probs)
    assert torch.equal(drop_outliers(probs, torch.zeros_like(one)), probs)


def test_group_entropy_and_tver_head_selection():
    # 3 heads, keys: 0 = first token (neither group), 1..4 text, 5..8 image.
    text = torch.tensor([[False, True, True, True, True, False, False, False, False]])
    image = torch.tensor([[False, False, False, False, False, True, True, True, True]])
    probs = torch.tensor(
        [
            [
                [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # uniform text and image: ratio 1
                [0.2, 0.2, 0.2, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1],  # text on 2 keys: ratio log2 / log4 = 0.5
                [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.0, 0.0],  # image on 2 keys: ratio log4 / log2 = 2
            ]
        ]
    )
    # Entropy of the renormalised group (the code's p log(p + 1e-6)); no outliers here (all equal or two-valued
    # with std >= the gap).
    expected_text = torch.tensor([[4 * 0.25 * -torch.log(torch.tensor(0.25 + 1e-6)), 0.0, 0.0]])
    expected_text[0, 1] = 2 * 0.5 * -torch.log(torch.tensor(0.5 + 1e-6))
    expected_text[0, 2] = expected_text[0, 0]
    torch.testing.assert_close(group_entropy(probs, text, 0.0), expected_text)
    enhanced, keep = enhanced_probs(probs, text, image)
    # ratios [1, 0.5, 2] (up to the 1e-6 in the log); mean 1.17: only head 2 is kept.
    assert keep.tolist() == [[False, False, True]]
    torch.testing.assert_close(enhanced[0, :2], torch.zeros(2, 9))
    torch.testing.assert_close(enhanced[0, 2], probs[0, 2])  # nothing above mean + std in its groups
    # No image mass: image entropy inf (the code's NaN -> inf), every ratio 0, every head kept.
    _, keep = enhanced_probs(probs, text, torch.zeros_like(image))
    assert keep.all()


def test_gated_combine_modes_and_cutoff():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    close = logits + 0.01  # the same distribution: distance 0
    far = torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 3.0]])
    keep_l = logits.clone()
    torch.testing.assert_close(gated_combine(logits, close, 3.0, 1.0, 0.2, 0.0), logits + 3.0 * close)
    # row 0 is far (distance ~1.7 > 0.2): contrastive; row 1 identical (distance 0): collaborative
    out = gated_combine(logits, far, 3.0, 1.0, 0.2, 0.0)
    torch.testing.assert_close(out[0], 2.0 * logits[0] - far[0])
    torch.testing.assert_close(out[1], logits[1] + 3.0 * far[1])
    # gamma 2 (the distance's maximum): always collaborative; gamma 0: always contrastive
    torch.testing.assert_close(gated_combine(logits, far, 3.0, 1.0, 2.0, 0.0), logits + 3.0 * far)
    torch.testing.assert_close(gated_combine(logits, close, 3.0, 1.0, 0.0, 0.0), 2.0 * logits - close)
    # cutoff on the main logits: beta 0.5 keeps only token 0 in row 0
    cut = gated_combine(logits, far, 3.0, 1.0, 0.2, 0.5)
    assert cut[0, 0] == out[0, 0]
    assert (cut[0, 1:] < out[0, 0] - CUTOFF_MARGIN).all()
    assert torch.equal(logits, keep_l)


def _reference_first_logits(gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-step logits of ONLY computed with the released code's operations (eager attention, bs 1)."""
    model, processor = build_tiny("llava", seed=0)
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    ours = halludec.generate(
        model,
        batch,
        halludec.get_strategy("only", plausibility_beta=0.0, gamma=gamma),
        processor=processor,
        max_new_tokens=1,
        output_scores=True,
        return_dict_in_generate=True,
    ).scores[0][0]
    adapter = get_adapter(model)
    last = adapter.layers[-1]
    caught = {}
    handles = [
        adapter.attention(0).v_proj.register_forward_hook(lambda m, i, o: caught.__setitem__("v", o)),
        last.register_forward_pre_hook(
            lambda m, a, k: caught.__setitem__("res", a[0] if a else k["hidden_states"]), with_kwargs=True
        ),
        adapter.decoder.norm.register_forward_hook(lambda m, i, o: caught.__setitem__("final", o)),
    ]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    for h in handles:
        h.remove()
    d = adapter.dims
    probs = out.attentions[0][0, :, -1].float()  # [H, K]
    image = batch["input_ids"][0] == adapter.image_token_id
    text = ~image
    text[0] = False  # the code's 1:35 slice: BOS left out

    def drop(w):
        return torch.where(w > w.mean(-1, keepdim=True) + w.std(-1, keepdim=True), torch.zeros_like(w), w)

    cd = probs.clone()
    cd[:, text], cd[:, image] = drop(probs[:, text]), drop(probs[:, image])
    nt = cd[:, text] / cd[:, text].sum(-1, keepdim=True)
    ni = cd[:, image] / cd[:, image].sum(-1, keepdim=True)
    ratio = (nt * torch.log(nt + 1e-6)).sum(-1) / (ni * torch.log(ni + 1e-6)).sum(-1)
    cd[ratio < ratio.mean()] = 0
    v = caught["v"][0].view(-1, d.num_kv_heads, d.head_dim).transpose(0, 1)  # [Hkv, K, d]
    v = v.repeat_interleave(d.num_heads // d.num_kv_heads, 0)  # [H, K, d]
    with torch.no_grad():
        a = adapter.o_proj(0)(torch.einsum("hk,hkd->hd", cd, v).reshape(1, 1, -1))
        x = last.input_layernorm(a) + 0.2 * caught["res"][:, -1:]
        y = x + last.mlp(last.post_attention_layernorm(x))
        enhanced = model.lm_head(adapter.decoder.norm(y) + 0.5 * caught["final"][:, -1:])[0, -1]
    main = out.logits[0, -1]
    distance = (main.softmax(-1) - enhanced.softmax(-1)).abs().sum()
    expected = main + 3.0 * enhanced if distance < gamma else 2.0 * main - enhanced
    return ours, expected


@pytest.mark.parametrize("gamma", [0.0, 2.0])  # always contrastive, always collaborative
def test_one_layer_path_matches_reference_from_released_code(gamma):
    ours, expected = _reference_first_logits(gamma)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_config_validation_presets_and_errors():
    with pytest.raises(ValueError, match=r"gamma=3\.0 is invalid; allowed: a number in \[0\.0, 2\.0\]"):
        ONLY(gamma=3.0)
    with pytest.raises(ValueError, match="layer=-1 is invalid"):
        ONLY(layer=-1)
    with pytest.raises(ValueError, match="plausibility_beta"):
        ONLY(plausibility_beta=1.5)
    with pytest.raises(ValueError, match="skip_first_key"):
        ONLY(skip_first_key="yes")
    assert halludec.get_strategy("only:repro").config == ONLY().config
    assert halludec.get_strategy("only:chair").config.gamma == 0.25
    assert halludec.get_strategy("only:mme").config.plausibility_beta == 0.4
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="Layer index 9 is out of range"):
        halludec.generate(model, batch, ONLY(layer=9), processor=processor, max_new_tokens=1)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_batch_equals_singles_and_searches_run(family):
    model, processor = tiny(family)
    before = snapshot(model)
    strategy = ONLY(layer=1)
    assert_batch_equals_singles(model, processor, family, strategy, QUESTIONS, **GREEDY)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    beams = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, num_beams=2)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    first = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    again = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=3, do_sample=True)
    assert torch.equal(first, again)
    assert_same_snapshot(before, snapshot(model))


def test_composes_with_side_branches_and_only_the_cutoff_without_alphas():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    kw = {**GREEDY, "output_scores": True, "return_dict_in_generate": True}
    alone = halludec.generate(model, batch, ONLY(), processor=processor, **kw)
    # A side branch (a copy of the prompt) rides in the same forwards and changes nothing: ONLY reads main rows only.
    both = halludec.generate(model, batch, [ONLY(), _Echo()], processor=processor, **kw)
    assert torch.equal(alone.sequences, both.sequences)
    for a, b in zip(alone.scores, both.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # No alphas: no enhanced branch, only the plausibility cutoff on the plain logits.
    plain = model.generate(**batch, **kw)
    cut = halludec.generate(model, batch, ONLY(alpha_collab=0.0, alpha_contrast=0.0), processor=processor, **kw)
    assert torch.equal(plain.sequences, cut.sequences)
