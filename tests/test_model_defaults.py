"""Per-model defaults: ``get_strategy(name, model=model)`` fills published settings matched by config structure."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import halludec
from tests.conftest import tiny


def _meta(model_cls, config):
    with torch.device("meta"):
        return model_cls(config)


@pytest.fixture(scope="module")
def llava_7b():
    """LLaVA-1.5-7B's real shape on the meta device (no memory, no download)."""
    from halludec.speed import shape_config

    return _meta(LlavaForConditionalGeneration, shape_config("llava-1.5-7b"))


@pytest.fixture(scope="module")
def qwen2_vl_7b():
    config = Qwen2VLConfig(
        text_config={
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "vocab_size": 152064,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={"depth": 1, "embed_dim": 64, "hidden_size": 3584, "num_heads": 2},
    )
    return _meta(Qwen2VLForConditionalGeneration, config)


def test_gift_picks_the_released_settings(llava_7b, qwen2_vl_7b):
    gift = halludec.get_strategy("gift", model=llava_7b)
    assert gift.config.saliency_layers == (11,)
    assert gift.config.enhance_layers == tuple(range(12, 23))
    assert gift.config.alpha == 5.0
    qwen = halludec.get_strategy("gift", model=qwen2_vl_7b)
    assert (qwen.config.saliency_layers, qwen.config.enhance_layers[0], qwen.config.enhance_layers[-1]) == (
        (14,),
        5,
        18,
    )
    assert qwen.config.alpha == 4.0
    assert halludec.get_strategy("gift", model=llava_7b, alpha=3.0).config.alpha == 3.0  # overrides win


def test_unknown_model_gets_generic_defaults_and_a_warning():
    model, _ = tiny("llava")
    with pytest.warns(UserWarning, match="GIFT has no released settings"):
        gift = halludec.get_strategy("gift", model=model)
    assert gift.config.saliency_layers == (1,)


def test_vhr_and_var_defaults(llava_7b):
    assert halludec.get_strategy("vhr", model=llava_7b).config.layers == (1, *range(18, 32))
    assert halludec.get_strategy("var", model=llava_7b).config.sink_dims == (1415, 2533)
    assert halludec.get_strategy("var:repro", model=llava_7b).config.skip_last_layer is False
    model, _ = tiny("qwen2_vl")
    assert halludec.get_strategy("var", model=model).config.sink_dims is None  # no table entry: the finder decides
