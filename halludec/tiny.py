"""Tiny random-weight vision-language models for tests and demos.

:func:`build_tiny` builds a model of a given family from configs written in code (4-layer, 64-wide GQA
text model, 2-layer vision tower) together with the family's real processor, an offline byte-level
tokenizer and a small chat template that looks like the real one. :func:`tiny_batch` renders questions
about random-noise images with that chat template and returns a left-padded batch ready for
``model.generate``. Nothing is downloaded; everything is deterministic for a seed.

Example:
    >>> model, processor = build_tiny("qwen2_vl")
    >>> batch = tiny_batch(processor, "qwen2_vl", list(TINY_QUESTIONS))
    >>> out = model.generate(**batch, max_new_tokens=5, do_sample=False)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import BatchFeature, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.processing_utils import ProcessorMixin

__all__ = ["TINY_FAMILIES", "TINY_QUESTIONS", "available_tiny_families", "build_tiny", "tiny_batch"]

#: ``config.model_type`` of every family :func:`build_tiny` can build.
TINY_FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "internvl",
    "smolvlm",
    "idefics3",
    "paligemma",
)

#: Two questions of different lengths (so a batch of them is left-padded). Every chat template renders the
#: user's question verbatim, and with the byte-level tokenizer its ids,
#: ``processor.tokenizer.encode(question, add_special_tokens=False)``, appear contiguously in the prompt.
TINY_QUESTIONS: tuple[str, ...] = (
    "What is in the image?",
    "Describe the colours and the shapes that you can see in this picture, please.",
)

# Shared text-model size: GQA with 4 query and 2 key/value heads of dim 16.
_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}
# Shared vision-tower size for the ViT-style towers (CLIP, SigLIP, InternViT, Idefics3).
_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
# Multimodal RoPE: the (temporal, height, width) sections sum to head_dim / 2 = 8.
_MROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}


def _check(model_type: str) -> None:
    """Raise ``ValueError`` for a family :func:`build_tiny` does not know."""
    if model_type not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny family {model_type!r}; expected one of {TINY_FAMILIES}.")


def _text_kwargs(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Shared text-config kwargs with the vocabulary and special ids of ``tok``."""
    return {
        **_TEXT,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _llava_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    kwargs: dict[str, Any] = {
        "text_config": tf.LlamaConfig(**_text_kwargs(tok)),
        "vision_config": tf.CLIPVisionConfig(
            **_VISION, image_size=tp.CLIP_IMAGE, patch_size=tp.CLIP_PATCH, projection_dim=32
        ),
        "image_token_index": tok.image_token_id,
        "image_seq_length": (tp.CLIP_IMAGE // tp.CLIP_PATCH) ** 2,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    if model_type == "llava":
        return tf.LlavaConfig(**kwargs)
    return tf.LlavaNextConfig(**kwargs, image_grid_pinpoints=tp.NEXT_GRID)


def _onevision_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    return tf.LlavaOnevisionConfig(
        text_config=tf.Qwen2Config(**_text_kwargs(tok)),
        vision_config=tf.SiglipVisionConfig(**_VISION, image_size=tp.OV_IMAGE, patch_size=tp.OV_PATCH),
        image_token_index=tok.image_token_id,
        video_token_index=tok.image_token_id,  # no video token; never used
        image_grid_pinpoints=tp.OV_GRID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def _qwen_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    ids = {
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.video_token_id,
        "vision_start_token_id": tok.vision_start_token_id,
        "vision_end_token_id": tok.vision_end_token_id,
    }
    patch = {"patch_size": tp.QWEN_PATCH[model_type], "spatial_merge_size": 2, "temporal_patch_size": 2}
    vit = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64}
    if model_type == "qwen2_vl":
        text = tf.Qwen2VLTextConfig(**_text_kwargs(tok), rope_parameters=dict(_MROPE))
        vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, **patch)
        return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if model_type == "qwen2_5_vl":
        text = tf.Qwen2_5_VLTextConfig(**_text_kwargs(tok), rope_parameters=dict(_MROPE))
        vision = tf.Qwen2_5_VLVisionConfig(**vit, window_size=56, fullatt_block_indexes=[1], **patch)
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    text = tf.Qwen3VLTextConfig(**_text_kwargs(tok), rope_parameters={**_MROPE, "mrope_interleaved": True})
    vision = tf.Qwen3VLVisionConfig(**vit, num_position_embeddings=16, deepstack_visual_indexes=[1], **patch)
    return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


def _gemma3_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    text = tf.Gemma3TextConfig(
        **_text_kwargs(tok),
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    vision = tf.SiglipVisionConfig(**_VISION, image_size=tp.GEMMA3_IMAGE, patch_size=tp.GEMMA3_PATCH)
    return tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tp.GEMMA3_TOKENS,
        image_token_index=tok.image_token_id,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
    )


def _internvl_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    size, patch = [tp.INTERNVL_IMAGE] * 2, [tp.INTERNVL_PATCH] * 2
    return tf.InternVLConfig(
        text_config=tf.Qwen2Config(**_text_kwargs(tok)),
        vision_config=tf.InternVLVisionConfig(**_VISION, image_size=size, patch_size=patch),
        image_token_id=tok.context_image_token_id,
        image_seq_length=tp.INTERNVL_TOKENS,
        downsample_ratio=0.5,
    )


def _idefics_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    vision_cls, config_cls = (
        (tf.SmolVLMVisionConfig, tf.SmolVLMConfig)
        if model_type == "smolvlm"
        else (tf.Idefics3VisionConfig, tf.Idefics3Config)
    )
    return config_cls(
        text_config=tf.LlamaConfig(**_text_kwargs(tok)),
        vision_config=vision_cls(**_VISION, image_size=tp.IDEFICS_IMAGE, patch_size=tp.IDEFICS_PATCH),
        image_token_id=tok.image_token_id,
        scale_factor=2,
        pad_token_id=tok.pad_token_id,  # deprecated top-level copy; its default (128002) is out of range
    )


def _paligemma_config(model_type: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    import transformers as tf

    from halludec import _tiny_processors as tp

    return tf.PaliGemmaConfig(
        text_config=tf.GemmaConfig(**_text_kwargs(tok)),
        vision_config=tf.SiglipVisionConfig(**_VISION, image_size=tp.PALIGEMMA_IMAGE, patch_size=tp.PALIGEMMA_PATCH),
        image_token_index=tok.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tok),
    )


_CONFIGS = {
    "llava": _llava_config,
    "llava_next": _llava_config,
    "llava_onevision": _onevision_config,
    "qwen2_vl": _qwen_config,
    "qwen2_5_vl": _qwen_config,
    "qwen3_vl": _qwen_config,
    "gemma3": _gemma3_config,
    "internvl": _internvl_config,
    "smolvlm": _idefics_config,
    "idefics3": _idefics_config,
    "paligemma": _paligemma_config,
}


@functools.cache
def available_tiny_families() -> tuple[str, ...]:
    """The families of :data:`TINY_FAMILIES` whose processors build with the installed transformers.

    Some image processors need torchvision in older transformers releases (SmolVLM in 5.17); those families are
    left out here rather than failing.

    Returns:
        A sub-tuple of :data:`TINY_FAMILIES`, in the same order.
    """
    from halludec import _tiny_processors as tp

    ok = []
    for model_type in TINY_FAMILIES:
        try:
            tp.build_processor(model_type)
        except ImportError:
            continue
        ok.append(model_type)
    return tuple(ok)


def build_tiny(model_type: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny random-weight model of a family and its processor, offline.

    The model is float32, in ``eval()`` mode, uses SDPA attention, and has random weights drawn under
    ``torch.manual_seed(seed)`` inside a forked RNG (the global torch RNG is left untouched). Its
    ``generation_config`` carries the tokenizer's bos/eos/pad ids. The processor is the family's real
    processor class (for Qwen*, LLaVA-OneVision, InternVL and SmolVLM a thin subclass that needs no
    video processor) with an offline byte-level tokenizer (``padding_side="left"``) and a chat template.

    Args:
        model_type: One of :data:`TINY_FAMILIES`.
        seed: Seed of the weight initialisation.

    Returns:
        ``(model, processor)``. ``model.save_pretrained`` output reloads with
        ``AutoModelForImageTextToText.from_pretrained``.

    Raises:
        ValueError: If ``model_type`` is not in :data:`TINY_FAMILIES`.
    """
    _check(model_type)
    import transformers as tf

    from halludec import _tiny_processors as tp

    processor = tp.build_processor(model_type)
    tok = processor.tokenizer  # built first: PaliGemma's processor adds tokens to it
    config = _CONFIGS[model_type](model_type, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    model.eval()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tok, name))
    return model, processor


def _noise_images(sizes: list[tuple[int, int]], seed: int, first_index: int) -> list[Any]:
    """Uniform RGB noise images, one per ``(height, width)``.

    Image ``k`` (``k = first_index + row``) is drawn from its own ``numpy.random.default_rng([seed, k])``, so
    it does not depend on the other rows.
    """
    from PIL import Image

    images = []
    for row, (height, width) in enumerate(sizes):
        rng = np.random.default_rng([seed, first_index + row])
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3)
        images.append(Image.fromarray(pixels))
    return images


def tiny_batch(
    processor: ProcessorMixin,
    model_type: str,
    questions: list[str],
    image_sizes: list[tuple[int, int]] | None = None,
    seed: int = 0,
    image_seed_offset: int = 0,
) -> BatchFeature:
    """Build a left-padded generation batch: one random-noise image and one question per row.

    Each row is the conversation ``[{"role": "user", "content": [image, question]}]`` rendered by the
    processor's chat template with ``add_generation_prompt=True`` (the question appears verbatim), then
    processed by the family's real processor, which expands the image placeholder into the image tokens
    and pads on the left to the longest row. No inputs are built by hand.

    Args:
        processor: The processor returned by :func:`build_tiny` for ``model_type``.
        model_type: One of :data:`TINY_FAMILIES`.
        questions: One question per row; e.g. :data:`TINY_QUESTIONS`.
        image_sizes: ``(height, width)`` of each row's image; defaults to a size that suits the family
            (LLaVA 30x30, LLaVA-NeXT 30x60, OneVision 32x64, Qwen2/2.5-VL 56x84, Qwen3-VL 64x96,
            Gemma3/SmolVLM/Idefics3 32x32, InternVL/PaliGemma 28x28).
        seed: Seed of the noise images: row ``i`` draws from
            ``numpy.random.default_rng([seed, image_seed_offset + i])``.
        image_seed_offset: Index of the first row's image. A one-row batch with ``image_seed_offset=i`` (and
            the same size) reproduces the image of row ``i`` of a batch built with offset 0.

    Returns:
        A ``BatchFeature`` of torch tensors that ``model.generate(**batch)`` accepts: ``input_ids`` and
        ``attention_mask`` (B, T) plus the family's vision inputs, e.g. ``pixel_values``,
        ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen), ``image_sizes`` (LLaVA-NeXT/OneVision),
        ``token_type_ids`` (Gemma3, PaliGemma), ``pixel_attention_mask`` (SmolVLM, Idefics3).

    Raises:
        ValueError: If ``model_type`` is unknown, ``questions`` is empty, or ``image_sizes`` has the wrong
            length.
    """
    _check(model_type)
    from halludec import _tiny_processors as tp

    if not questions:
        raise ValueError("tiny_batch needs at least one question.")
    default = tp.DEFAULT_IMAGE_SIZE[model_type]
    sizes = list(image_sizes) if image_sizes is not None else [default] * len(questions)
    if len(sizes) != len(questions):
        raise ValueError(f"Got {len(sizes)} image sizes for {len(questions)} questions.")
    from halludec.vlm_adapters.inputs import chat_inputs

    return chat_inputs(processor, _noise_images(sizes, seed, image_seed_offset), questions)
