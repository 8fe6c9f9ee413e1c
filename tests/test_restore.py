"""``apply`` restores the model exactly: after a normal exit and after an exception inside ``generate``."""

from __future__ import annotations

import pytest
import torch

import halludec
from tests.helpers import Probe, assert_same_snapshot, snapshot


def _active_probe(model) -> Probe:
    n = halludec.get_adapter(model).dims.num_layers
    return Probe(layers=tuple(range(n)), bias=1.0, heads=(0,), head_scale=2.0)


def test_restored_after_generate(model_and_batch):
    model, _, batch = model_and_batch
    before = snapshot(model)
    with halludec.apply(model, _active_probe(model), batch) as call:
        assert model.config.get_text_config()._attn_implementation == "halludec"
        assert call.plans  # steering installed
        model.generate(**batch, max_new_tokens=3)
    assert_same_snapshot(before, snapshot(model))


def test_restored_after_exception(model_and_batch):
    model, _, batch = model_and_batch
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), halludec.apply(model, _active_probe(model), batch):
        raise RuntimeError("boom")
    assert_same_snapshot(before, snapshot(model))

    class Exploding(Probe):
        def edit_probs(self, probs, ctx):
            raise RuntimeError("exploded inside generate")

    with pytest.raises(RuntimeError, match="exploded inside generate"):
        halludec.generate(model, batch, Exploding(layers=(0,)), max_new_tokens=3)
    assert_same_snapshot(before, snapshot(model))


def test_model_unchanged_after_steered_call(model_and_batch):
    """A steered call leaves no trace: plain generate afterwards gives the same as before."""
    model, _, batch = model_and_batch
    kw = {"max_new_tokens": 4, "do_sample": False}
    first = model.generate(**batch, **kw)
    halludec.generate(model, batch, _active_probe(model), **kw)
    assert torch.equal(first, model.generate(**batch, **kw))


def test_nested_apply_restores_the_outer_call():
    from halludec.tiny import tiny_batch
    from tests.conftest import tiny

    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a cat?"], seed=0)
    before = snapshot(model)
    outer = _active_probe(model)
    with halludec.apply(model, outer, batch) as outer_call:
        with halludec.apply(model, "none", batch) as inner_call:
            assert halludec.get_adapter(model).attention(0)._halludec_call is inner_call
        assert halludec.get_adapter(model).attention(0)._halludec_call is outer_call
        assert model.config.get_text_config()._attn_implementation == "halludec"
    assert_same_snapshot(before, snapshot(model))


def test_hooks_registered_by_a_strategy_are_removed():
    from halludec.decoding import Strategy
    from halludec.tiny import tiny_batch
    from tests.conftest import tiny

    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a cat?"], seed=0)
    seen = []

    class Reads(Strategy):
        def prepare(self, call):
            layer = call.adapter.layers[2]
            call.register_hook(
                layer, lambda mod, args, kwargs: seen.append(args[0].shape if args else None), with_kwargs=True
            )

    before = snapshot(model)
    halludec.generate(model, batch, Reads(), max_new_tokens=3)
    assert len(seen) == 3  # prefill + 2 decode steps
    assert_same_snapshot(before, snapshot(model))
