"""Registry, strategy configs and the errors users see on bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import halludec
from halludec.decoding import STRATEGIES, Strategy, StrategyConfig, check_range, get_strategy, register_strategy
from halludec.registry import Registry
from halludec.tiny import tiny_batch
from tests.conftest import tiny
from tests.helpers import Probe


def test_registry_did_you_mean_and_duplicates():
    reg: Registry[int] = Registry("widget", hint="Add one with reg.register().")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    with pytest.raises(KeyError, match=r"Unknown widget 'alpah'. Did you mean 'alpha'\? Available: alpha, beta"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 3)
    assert reg.names() == ["alpha", "beta"]


def test_unknown_strategy_suggests_names():
    with pytest.raises(KeyError, match="Did you mean 'none'"):
        halludec.get_strategy("nonee")


@dataclass
class _Cfg(StrategyConfig):
    alpha: float = 0.5

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)


class _Toy(Strategy):
    config_class = _Cfg
    presets: ClassVar[dict] = {"strong": {"alpha": 0.9}}
    needs_image = True


@pytest.fixture
def toy():
    register_strategy("toy_for_tests")(_Toy)
    yield
    STRATEGIES.unregister("toy_for_tests")


def test_config_validation_names_field_value_and_range(toy):
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid; allowed: a number in \[0.0, 1.0\]"):
        get_strategy("toy_for_tests", alpha=1.5)
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['alpah'\].*fields are: alpha"):
        get_strategy("toy_for_tests", alpah=0.1)


def test_presets(toy):
    s = get_strategy("toy_for_tests:strong")
    assert s.config.alpha == 0.9
    assert s.describe() == {"name": "toy_for_tests", "preset": "strong", "config": {"alpha": 0.9}}
    assert "toy_for_tests:strong" in halludec.list_strategies()
    with pytest.raises(ValueError, match="has no preset 'weak'; available: strong"):
        get_strategy("toy_for_tests:weak")


def test_strategy_needing_image_rejects_text_only_prompt(toy):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a dog?", "And a cat?"], seed=0)
    text_only = halludec.get_adapter(model).text_only_inputs(batch)
    with pytest.raises(ValueError, match=r"needs image tokens in every prompt, but rows \[0, 1\]"):
        halludec.generate(model, text_only, "toy_for_tests", max_new_tokens=2)


def test_unsupported_model_type_lists_supported_and_how_to_add():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Unknown model type 'gpt2'.*Available: .*llava.*qwen2_vl.*register_adapter"):
        halludec.get_adapter(model)


def test_layer_out_of_range_is_a_clear_error():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a dog?"], seed=0)
    with pytest.raises(ValueError, match=r"Layer index 9 is out of range .* 4 decoder layers \(valid: 0..3\)"):
        halludec.generate(model, batch, Probe(layers=(9,)), max_new_tokens=2)


def test_missing_input_ids_is_a_clear_error():
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="needs `input_ids`"), halludec.apply(model, "none", {"x": torch.zeros(1)}):
        pass


def test_composition_accepts_lists_and_rejects_empty():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", ["Is there a dog?"], seed=0)
    kw = {"max_new_tokens": 3, "do_sample": False}
    assert torch.equal(halludec.generate(model, batch, ["none", "none"], **kw), model.generate(**batch, **kw))
    with pytest.raises(ValueError, match="empty strategy list"):
        halludec.generate(model, batch, [], **kw)


def test_two_search_owners_cannot_be_composed():
    class OwnsA(Strategy):
        name = "owns_a"
        owns_search = True

    class OwnsB(OwnsA):
        name = "owns_b"

    with pytest.raises(ValueError, match=r"\['owns_a', 'owns_b'\] each replace generate's search loop"):
        halludec.decoding.resolve_strategies([OwnsA(), OwnsB()])


def test_config_fingerprint_is_structural():
    a = halludec.get_adapter(tiny("llava")[0]).config_fingerprint()
    b = halludec.get_adapter(tiny("llava_next")[0]).config_fingerprint()
    c = halludec.get_adapter(tiny("qwen2_vl")[0]).config_fingerprint()
    assert len(a) == 64
    assert len({a, b, c}) == 3  # model_type is part of the fingerprint
    from halludec.tiny import build_tiny

    assert halludec.get_adapter(build_tiny("llava", seed=5)[0]).config_fingerprint() == a  # weights do not matter
