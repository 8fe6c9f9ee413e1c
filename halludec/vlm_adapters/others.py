"""Gemma3, InternVL, SmolVLM / Idefics3 and PaliGemma: the common API holds, only data differs.

Module trees (transformers 5.x)::

    Gemma3ForConditionalGeneration / InternVLForConditionalGeneration / PaliGemmaForConditionalGeneration
    ├── model
    │   ├── vision_tower (SigLIP / InternVL ViT)            <- vision attentions
    │   ├── multi_modal_projector
    │   └── language_model                                  <- get_decoder(); layers[i].self_attn
    └── lm_head

    SmolVLMForConditionalGeneration / Idefics3ForConditionalGeneration
    ├── model
    │   ├── vision_model                                    <- vision attentions
    │   ├── connector
    │   └── text_model                                      <- get_decoder(); layers[i].self_attn
    └── lm_head

Gemma3 mixes sliding-window and full-attention layers: a sliding layer's cache keeps only the last keys, so key
index != absolute position there (``VLMAdapter.sliding_layers``); ``LayerContext.keys`` maps prompt positions to
key indices with the window offset, read from the cache.
"""

from __future__ import annotations

from halludec.vlm_adapters.base import VLMAdapter


class Gemma3Adapter(VLMAdapter):
    """Gemma3 (``<start_of_image>`` ... ``<end_of_image>`` around 256 soft tokens per image)."""

    model_types = ("gemma3",)
    wrapper_token_attrs = ("boi_token_index", "eoi_token_index")


class InternVLAdapter(VLMAdapter):
    """InternVL (``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``)."""

    model_types = ("internvl",)


class Idefics3Adapter(VLMAdapter):
    """SmolVLM and Idefics3 (image tiles as runs of ``<image>`` between ``<fake_token_around_image>``)."""

    model_types = ("smolvlm", "idefics3")
    vision_tower_attr = "vision_model"


class PaliGemmaAdapter(VLMAdapter):
    """PaliGemma (``<image>`` x N, then ``<bos>``, the prefix and ``\\n``)."""

    model_types = ("paligemma",)
