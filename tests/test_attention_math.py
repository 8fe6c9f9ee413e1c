"""The explicit attention path on synthetic tensors, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

import halludec
from halludec.decoding.attention import apply_mask, eager_attention
from halludec.decoding.context import LayerPlan, merge_rows
from halludec.tiny import tiny_batch
from tests.conftest import tiny
from tests.helpers import LastRowProbe, Probe


class _Module(torch.nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(q, k, v, mask_bool, scale):
    """Naive per-element attention: loops, no broadcasting tricks."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    rep = H // k.shape[1]
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                logits = [
                    (sum(q[b, h, i, d].item() * k[b, h // rep, j, d].item() for d in range(D)) * scale)
                    if mask_bool[b, 0, i, j]
                    else -math.inf
                    for j in range(K)
                ]
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                s = sum(w)
                for d in range(D):
                    out[b, i, h, d] = sum(w[j] / s * v[b, h // rep, j, d].item() for j in range(K))
    return out


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_eager_matches_hand_reference(mask_kind):
    torch.manual_seed(0)
    B, H, Hkv, Q, D = 2, 4, 2, 3, 5
    q, k, v = torch.randn(B, H, Q, D), torch.randn(B, Hkv, Q, D), torch.randn(B, Hkv, Q, D)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool))
    mask_bool = causal.expand(B, 1, Q, Q).clone()
    if mask_kind != "none":
        mask_bool[1, :, :, 0] = False  # row 1 left-padded by one position
        mask_bool[1, :, 0, 0] = True  # keep the pad query row non-empty for the reference
    mask = {
        "bool": mask_bool,
        "float": torch.zeros(B, 1, Q, Q).masked_fill(~mask_bool, torch.finfo(torch.float32).min),
        "none": None,
    }[mask_kind]
    inputs = (q.clone(), k.clone(), v.clone())
    out, weights = eager_attention(_Module(groups=2), q, k, v, mask, None, scaling=0.7)
    assert weights is None
    assert out.shape == (B, Q, H, D)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask_bool, 0.7), atol=1e-5, rtol=1e-5)
    for before, after in zip(inputs, (q, k, v), strict=True):
        assert torch.equal(before, after)  # inputs not modified in place


def test_apply_mask_never_produces_nan_for_fully_masked_rows():
    scores = torch.randn(1, 2, 3, 3)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    probs = torch.softmax(apply_mask(scores, mask), dim=-1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 3))


def test_last_row_plan_equals_all_rows_plan():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool)).expand(1, 1, 6, 6)
    outs = []
    for rows, probe in (("all", Probe(layers=(0,))), ("last", LastRowProbe(layers=(0,)))):
        plan = LayerPlan(prob_strategies=[probe], rows=rows)
        outs.append(eager_attention(_Module(groups=2), q, k, v, mask, (_FakeCall(), plan), scaling=0.3)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_row_range_plan_equals_all_rows_plan():
    """rows=int: sdpa for the rows before it, explicit rows after; hooks see the rows from ``ctx.q_start`` on."""
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool)).expand(2, 1, 7, 7)
    seen = []

    class Halve(Probe):
        """Halves attention to key 0 in prompt rows >= 3 (rows located through ctx.q_start)."""

        def edit_scores(self, scores, ctx):
            return scores

        def edit_probs(self, probs, ctx):
            seen.append((ctx.q_start, probs.shape[2]))
            rows = torch.arange(probs.shape[2]) + ctx.q_start  # [q] prompt rows
            scale = torch.ones_like(probs)
            scale[:, :, rows >= 3, 0] = 0.5
            out = probs * scale
            return out / out.sum(-1, keepdim=True)

    outs = []
    for rows in ("all", 3, 5):
        plan = LayerPlan(prob_strategies=[Halve(layers=(0,))], rows=rows)
        outs.append(eager_attention(_Module(groups=2), q, k, v, mask, (_FakeCall(), plan), scaling=0.3)[0])
    assert seen == [(0, 7), (3, 4), (5, 2)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(outs[0][:, 3:5], outs[2][:, 3:5])  # rows 3-4 were left to sdpa with start 5


def test_merge_rows():
    assert merge_rows("last", "last") == "last"
    assert merge_rows("last", 4) == 4
    assert merge_rows(7, 4) == 4
    assert merge_rows(4, "all") == "all"
    with pytest.raises(ValueError, match="allowed: 'all', 'last'"):
        merge_rows("last", "first")
    with pytest.raises(ValueError, match="int >= 0"):
        merge_rows(-1, "last")


class _FakeCall:
    image_mask = torch.zeros(1, 6, dtype=torch.bool)


def _last_logits(model, batch, strategy):
    with halludec.apply(model, strategy, batch):
        return model(**batch).logits[:, -1]


def test_bias_on_selected_heads_changes_only_those_heads():
    """A bias on image keys of head 0 in layer 1 changes head 0's output there; other heads stay bit-identical."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a cat?"], seed=0)
    captured = {}

    def grab(name):
        def hook(_mod, args):
            captured[name] = args[0].detach().clone()

        return hook

    o_proj = halludec.get_adapter(model).o_proj(1)
    handle = o_proj.register_forward_pre_hook(grab("x"))
    try:
        outs = []
        for bias in (0.0, 3.0):
            with halludec.apply(model, Probe(layers=(1,), bias=bias, heads=(0,)), batch):
                model(**batch)
            outs.append(captured["x"].view(*captured["x"].shape[:2], 4, -1))  # [B, q, H, d]
    finally:
        handle.remove()
    changed = (outs[0] - outs[1]).abs().amax(dim=(0, 1, 3))  # [H]
    assert changed[0] > 1e-4
    assert torch.equal(outs[0][:, :, 1:], outs[1][:, :, 1:])


def test_head_scaling_equals_o_proj_prehook():
    """Scaling head 2 inside the attention function equals scaling the o_proj input (2e-5)."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["What is here?"], seed=0)
    adapter = halludec.get_adapter(model)
    ours = _last_logits(model, batch, Probe(layers=(2,), heads=(2,), head_scale=1.7))

    def scale(_mod, args):
        x = args[0]
        x = x.view(*x.shape[:2], 4, -1).clone()  # [B, q, H, d]
        x[:, :, 2] *= 1.7
        return (x.view(*args[0].shape),)

    handle = adapter.o_proj(2).register_forward_pre_hook(scale)
    try:
        ref = model(**batch).logits[:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_sliding_window_layer_maps_image_keys_by_absolute_position():
    """Gemma3 sliding layers keep only the last keys; image keys are found at their absolute positions."""
    model, processor = tiny("gemma3")
    batch = tiny_batch(processor, "gemma3", ["?"], seed=0)  # short: image keys stay inside the window
    adapter = halludec.get_adapter(model)
    sliding = adapter.sliding_layers()
    assert sliding == [0, 1, 2]
    seen = []

    class Recorder(Probe):
        def edit_scores(self, scores, ctx):
            if ctx.layer_idx == 0:
                seen.append((ctx.q_len, ctx.kv_len, ctx.image_keys().clone()))
            return super().edit_scores(scores, ctx)

    image = adapter.image_mask(batch["input_ids"])[0]  # [L]
    L = image.shape[0]
    n_new = 6
    out = halludec.generate(
        model, batch, Recorder(layers=(0, 3), bias=2.0, heads=(0, 1)), max_new_tokens=n_new, min_new_tokens=n_new
    )
    assert out.shape[1] == L + n_new
    decode = [(k, keys) for q, k, keys in seen if q == 1]
    assert len(decode) == n_new - 1
    for step, (kv_len, keys) in enumerate(decode, start=1):
        total = L + step  # absolute positions seen, the current token included
        assert kv_len < total  # the window really dropped keys
        expected = torch.cat([image, torch.zeros(step, dtype=torch.bool)])[total - kv_len : total]
        assert torch.equal(keys[0], expected)
    first_keys = decode[0][1][0]
    assert first_keys.any(), "the test must see image keys inside the window"
    assert not torch.equal(first_keys, image[: decode[0][0]]), "absolute mapping differs from naive slicing"


def test_score_edits_never_unmask_keys():
    """A boost that would push a masked score positive (z + 2|z| at finfo.min) leaves masked keys masked."""
    from halludec.decoding import Strategy, StrategyConfig

    class Boost(Strategy):
        config_class = StrategyConfig

        def edit_scores(self, scores, ctx):
            return scores + 2.0 * scores.abs()

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    mask = torch.tensor([[[[False, True, True, False]]]])
    out, probs = eager_attention(
        _Module(),
        q,
        k,
        v,
        mask,
        (_FakeCall(), LayerPlan(prob_strategies=[Boost()], rows="all")),
        scaling=1.0,
        keep_probs=True,
    )
    assert torch.isfinite(out).all()
    assert probs[..., 0].abs().max() == 0
    assert probs[..., 3].abs().max() == 0
