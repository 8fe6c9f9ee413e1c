"""Side branches batched into the main forward: exact main output, exact side logits, beams, restoration."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import halludec
from halludec.decoding import Strategy, StrategyConfig
from halludec.tiny import available_tiny_families, tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import assert_same_snapshot, max_score_diff, snapshot


@dataclass
class ContrastConfig(StrategyConfig):
    alpha: float = 0.0
    branches: tuple[str, ...] = ("noised", "text")
    record: list = field(default_factory=list)
    steps: list = field(default_factory=list)


class Contrast(Strategy):
    """VCD-style contrast with a noised-image branch and an image-free branch (test-only)."""

    name = "contrast"
    config_class = ContrastConfig

    def side_inputs(self, call):
        adapter = call.adapter
        make = {
            "noised": lambda: adapter.noised_image_inputs(call.inputs, 500, torch.Generator().manual_seed(0)),
            "text": lambda: adapter.text_only_inputs(call.inputs),
        }
        return [make[kind]() for kind in self.config.branches]

    def edit_logits(self, logits, ctx):
        self.config.record.append([s.clone() for s in ctx.side])
        self.config.steps.append(ctx.step)
        out = logits
        for side in ctx.side:
            out = out + self.config.alpha * (logits - side)
        return out


GREEDY = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
FAMILIES = [f for f in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3") if f in available_tiny_families()]


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_side_branches_equal_plain_generate(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **GREEDY, **SCORES)
    ours = halludec.generate(model, batch, Contrast(alpha=0.0), **GREEDY, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) < 1e-5
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_side_logits_equal_fresh_forward_of_the_side_input(family):
    """At every step, each branch's logits equal a fresh full forward on that side input + the tokens so far."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    strategy = Contrast(alpha=0.0)
    out = halludec.generate(model, batch, strategy, **GREEDY)
    new = out[:, batch["input_ids"].shape[1] :]  # [B, T]
    assert strategy.config.steps == list(range(GREEDY["max_new_tokens"]))
    sides = strategy.side_inputs(_FakeCall(adapter, batch))
    for step, recorded in enumerate(strategy.config.record):
        for side, got in zip(sides, recorded, strict=True):
            ids = torch.cat([side["input_ids"], new[:, :step]], dim=1)
            am = torch.cat([side["attention_mask"], torch.ones_like(new[:, :step])], dim=1)
            inputs = {**side, "input_ids": ids, "attention_mask": am}
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in side:
                    inputs[key] = torch.cat([side[key], torch.zeros_like(new[:, :step])], dim=1)
            inputs["position_ids"] = adapter.position_ids_for(inputs)
            ref = model(**inputs).logits[:, -1]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


class _FakeCall:
    def __init__(self, adapter, inputs):
        self.adapter, self.inputs = adapter, inputs


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_beam_search_with_side_branches(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    kw = {"max_new_tokens": 5, "num_beams": 2, "do_sample": False}
    assert torch.equal(model.generate(**batch, **kw), halludec.generate(model, batch, Contrast(alpha=0.0), **kw))


def test_active_contrast_changes_output_and_restores():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    before = snapshot(model)
    plain = model.generate(**batch, **GREEDY, **SCORES)
    ours = halludec.generate(model, batch, Contrast(alpha=1.0), **GREEDY, **SCORES)
    assert max_score_diff(plain, ours) > 1e-3
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_side_branches_on_static_cache(family):
    """Static cache: main tokens and every step's side logits equal the default cache's; the step is a tensor."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    default, static = Contrast(alpha=0.0), Contrast(alpha=0.0)
    ours_default = halludec.generate(model, batch, default, **GREEDY)
    ours_static = halludec.generate(model, batch, static, **GREEDY, cache_implementation="static")
    assert torch.equal(model.generate(**batch, **GREEDY, cache_implementation="static"), ours_static)
    assert torch.equal(ours_default, ours_static)
    assert all(isinstance(step, torch.Tensor) and step.dim() == 0 for step in static.config.steps[1:])
    assert [int(step) for step in static.config.steps] == list(range(GREEDY["max_new_tokens"]))
    for a, b in zip(default.config.record, static.config.record, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert_same_snapshot(before, snapshot(model))


class Padded(Contrast):
    """One side branch: the main prompt behind ``pad`` more pad tokens, i.e. longer than the main prompt."""

    pad = 3

    def side_inputs(self, call):
        inputs = dict(call.inputs)
        ids = inputs["input_ids"]
        inputs["input_ids"] = torch.nn.functional.pad(ids, (self.pad, 0), value=call.adapter.pad_token_id)
        for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                inputs[key] = torch.nn.functional.pad(inputs[key], (self.pad, 0))
        return [inputs]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_side_prompt_longer_than_main(family, cache):
    """Longer side prompts pad the main rows in the cache: side logits equal the main ones (same real tokens) and
    image keys stay aligned for attention strategies composed with the branch (PAI's bias on image keys)."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    kw = {**GREEDY, "cache_implementation": cache} if cache else GREEDY
    padded = Padded(alpha=0.0)
    out = halludec.generate(model, batch, padded, **kw, output_logits=True, return_dict_in_generate=True)
    for step, (side,) in enumerate(padded.config.record):
        torch.testing.assert_close(side, out.logits[step], atol=1e-4, rtol=1e-4)
    pai = halludec.get_strategy("pai", alpha=2.0)
    alone = halludec.generate(model, batch, pai, processor=processor, **GREEDY, **SCORES)
    composed = halludec.generate(model, batch, [pai, Padded(alpha=0.0)], processor=processor, **kw, **SCORES)
    assert torch.equal(alone.sequences, composed.sequences)
    assert max_score_diff(alone, composed) < 1e-5  # misaligned image keys give ~1e-3 (LLaVA) to ~0.1 (Gemma3)


def test_side_input_with_wrong_rows_is_a_clear_error():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)

    class Bad(Contrast):
        def side_inputs(self, call):
            return [{k: v[:1] for k, v in call.adapter.text_only_inputs(call.inputs).items()}]

    with pytest.raises(ValueError, match=r"Side branch 0 must have input_ids with 2 rows"):
        halludec.generate(model, batch, Bad(), max_new_tokens=2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_side_branches_with_two_images_in_a_row(family):
    from tests.test_adapters import two_image_batch

    model, _ = tiny(family)
    batch = two_image_batch(family)
    plain = model.generate(**batch, **GREEDY, **SCORES)
    ours = halludec.generate(model, batch, Contrast(alpha=0.0), **GREEDY, **SCORES)
    assert torch.equal(plain.sequences, ours.sequences)
    assert max_score_diff(plain, ours) < 1e-5
