"""Test-only strategies and comparison helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import halludec
from halludec.decoding import Strategy, StrategyConfig


@dataclass
class ProbeConfig(StrategyConfig):
    layers: tuple[int, ...] = ()
    bias: float = 0.0
    heads: tuple[int, ...] = ()
    head_scale: float = 1.0
    rows: str = "all"
    seen: list = field(default_factory=list)


class Probe(Strategy):
    """Explicit attention in ``layers``: optional bias on image keys of ``heads``, optional head-output scaling.

    Neutral (bias 0, scale 1) it must reproduce sdpa; it records (layer, q_len, K) of every steered call.
    """

    name = "probe"
    config_class = ProbeConfig

    def attention_layers(self, call):
        return set(self.config.layers)

    def edit_scores(self, scores, ctx):
        self.config.seen.append((ctx.layer_idx, ctx.q_len, ctx.kv_len))
        expected_rows = 1 if type(self).attention_rows == "last" else ctx.q_len
        if scores.shape[2] != expected_rows:
            raise AssertionError(f"scores have {scores.shape[2]} query rows, expected {expected_rows}")
        if self.config.bias == 0.0 or not self.config.heads:
            return scores
        heads = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        heads[list(self.config.heads)] = True
        keys = ctx.image_keys()  # [B, K]
        sel = heads[None, :, None, None] & keys[:, None, None, :]  # [B, H, 1, K]
        return scores + self.config.bias * sel

    def edit_head_outputs(self, out, ctx):
        if self.config.head_scale == 1.0 or not self.config.heads:
            return out
        scale = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        scale[list(self.config.heads)] = self.config.head_scale
        return out * scale[None, None, :, None]


class LastRowProbe(Probe):
    attention_rows = "last"


def max_score_diff(a, b) -> float:
    """Largest absolute difference of per-step scores, ignoring -inf entries masked by processors."""
    return max(
        (x.nan_to_num(neginf=0.0, posinf=0.0) - y.nan_to_num(neginf=0.0, posinf=0.0)).abs().max().item()
        for x, y in zip(a.scores, b.scores, strict=True)
    )


def snapshot(model) -> dict:
    """Everything apply() may touch: attention implementations, hooks, halludec attributes, forward, weights."""
    configs = {"": model.config._attn_implementation}
    for key in model.config.sub_configs:
        sub = getattr(model.config, key, None)
        if sub is not None:
            configs[key] = sub._attn_implementation
    hooks = {}
    attrs = {}
    for name, mod in model.named_modules():
        hooks[name] = tuple(
            len(getattr(mod, h))
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")
        )
        attrs[name] = sorted(k for k in vars(mod) if k.startswith("_halludec"))
    return {
        "configs": configs,
        "hooks": hooks,
        "attrs": attrs,
        "forward": model.forward,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": model.training,
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["configs"] == after["configs"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]
    assert before["forward"] == after["forward"]
    assert before["training"] == after["training"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def assert_batch_equals_singles(model, processor, family, strategy, questions, atol=1e-4, **generate_kwargs) -> None:
    """A left-padded batch gives each row the tokens and scores that row gets alone (per-row state, masks)."""
    import halludec
    from halludec.tiny import tiny_batch

    kw = {"output_scores": True, "return_dict_in_generate": True, **generate_kwargs}
    batch = tiny_batch(processor, family, questions, seed=0)
    both = halludec.generate(model, batch, strategy, processor=processor, **kw)
    for row, question in enumerate(questions):
        single = tiny_batch(processor, family, [question], seed=0, image_seed_offset=row)
        alone = halludec.generate(model, single, strategy, processor=processor, **kw)
        new_both = both.sequences[row, batch["input_ids"].shape[1] :]
        assert torch.equal(new_both, alone.sequences[0, single["input_ids"].shape[1] :])
        for a, b in zip(both.scores, alone.scores, strict=True):
            finite = torch.isfinite(a[row])
            assert torch.equal(finite, torch.isfinite(b[0]))
            torch.testing.assert_close(a[row][finite], b[0][finite], atol=atol, rtol=atol)


def recording(cls: type[Strategy]) -> type[Strategy]:
    """A subclass of the logits strategy ``cls`` that keeps the side logits it saw at the prefill (``prefill_side``)."""

    class Recording(cls):
        def edit_logits(self, logits, ctx):
            if not hasattr(self, "prefill_side"):  # the first call is the prefill
                self.prefill_side = [s.clone() for s in ctx.side]
            return super().edit_logits(logits, ctx)

    Recording.__name__ = Recording.__qualname__ = f"Recording{cls.__name__}"
    return Recording


def assert_neutral_then_active(model, processor, batch, neutrals, active, **generate_kwargs):
    """Each ``neutrals`` strategy gives plain ``generate``'s tokens; ``active`` changes the scores; model restored.

    Returns:
        ``(plain, active_output)``, both with scores (``generate_kwargs`` must request them).
    """
    before = snapshot(model)
    plain = model.generate(**batch, **generate_kwargs)
    for neutral in neutrals:
        out = halludec_generate(model, batch, neutral, processor, **generate_kwargs)
        assert torch.equal(plain.sequences, out.sequences), f"{neutral!r} is not plain generate"
    out = halludec_generate(model, batch, active, processor, **generate_kwargs)
    assert any(not torch.allclose(a, b) for a, b in zip(plain.scores, out.scores, strict=True))
    assert_same_snapshot(before, snapshot(model))
    return plain, out


def halludec_generate(model, batch, strategy, processor, **generate_kwargs):
    import halludec

    return halludec.generate(model, batch, strategy, processor=processor, **generate_kwargs)


def assert_side_logits_and_contrast(model, batch, strategy, sides, active, combine):
    """A side-branch strategy's prefill: the side logits it saw (``strategy.prefill_side``, from :func:`recording`)
    equal plain forwards on each side input, and its first scores (``active``) equal ``combine(main, *sides)`` of
    fresh logits wherever they are finite (``min_new_tokens`` sets EOS to -inf).

    Args:
        model: The model.
        batch: The main inputs.
        strategy: The recorded strategy instance that produced ``active``.
        sides: The side inputs, in the strategy's order.
        active: ``generate``'s output with ``output_scores=True, return_dict_in_generate=True``.
        combine: ``(main_logits, *side_logits) -> scores``, the strategy's own combination at step 0.
    """
    adapter = halludec.get_adapter(model)
    with torch.no_grad():
        fresh = [model(**side, position_ids=adapter.position_ids_for(side)).logits[:, -1] for side in sides]
        fresh_main = model(**batch).logits[:, -1]
    for got, ref in zip(strategy.prefill_side, fresh, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    finite = active.scores[0].isfinite()
    expected = combine(fresh_main, *fresh)
    torch.testing.assert_close(active.scores[0][finite], expected[finite], atol=1e-4, rtol=1e-4)
