"""Offline tokenizers, chat templates and processors for the tiny models of :mod:`halludec.tiny`.

Everything here is built in code: a byte-level BPE tokenizer without merges (so any text round-trips and
every byte is one token), a small Jinja chat template per family that looks like the real one, and the
family's real processor class. Where the real processor insists on a video processor (which needs
torchvision) or on ``num2words``, a thin subclass drops that requirement and changes nothing else.

This module imports the processor classes eagerly and is therefore imported lazily by
:mod:`halludec.tiny`.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLProcessor,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SiglipImageProcessorPil,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

# ---------------------------------------------------------------------------------------------------------
# Geometry shared by the processors and the model configs (single source of truth).
# ---------------------------------------------------------------------------------------------------------
CLIP_IMAGE, CLIP_PATCH = 30, 6  # LLaVA / LLaVA-NeXT: (30 / 6)^2 = 25 patches (+CLS, dropped by "default")
NEXT_GRID = [[30, 30], [30, 60], [60, 30]]
OV_IMAGE, OV_PATCH = 32, 8  # LLaVA-OneVision SigLIP: 16 patches per tile
OV_GRID = [[32, 32], [32, 64], [64, 32]]
QWEN_PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}  # spatial merge 2 -> factor 28 / 32
GEMMA3_IMAGE, GEMMA3_PATCH, GEMMA3_TOKENS = 32, 4, 16  # 8x8 patches avg-pooled to 4x4
INTERNVL_IMAGE, INTERNVL_PATCH, INTERNVL_TOKENS = 28, 7, 4  # 4x4 patches, pixel shuffle 0.5 -> 2x2
IDEFICS_IMAGE, IDEFICS_PATCH, IDEFICS_TOKENS = 32, 8, 4  # 4x4 patches, scale factor 2 -> 2x2
PALIGEMMA_IMAGE, PALIGEMMA_PATCH, PALIGEMMA_TOKENS = 28, 7, 16  # 4x4 patches

#: Default ``(height, width)`` of the noise images per family, and the image-token count it yields.
DEFAULT_IMAGE_SIZE: dict[str, tuple[int, int]] = {
    "llava": (30, 30),  # 25 <image>
    "llava_next": (30, 60),  # 80 <image>: 25 base + 5x10 from the 1x2 tiles + 5 newlines
    "llava_onevision": (32, 64),  # 52 <image>
    "qwen2_vl": (56, 84),  # 4x6 patches / 2x2 merge = 6 <|image_pad|>
    "qwen2_5_vl": (56, 84),  # 6 <|image_pad|>
    "qwen3_vl": (64, 96),  # 6 <|image_pad|>
    "gemma3": (32, 32),  # 16 <image_soft_token>
    "internvl": (28, 28),  # 4 <IMG_CONTEXT>
    "smolvlm": (32, 32),  # 4 <image>
    "idefics3": (32, 32),  # 4 <image>
    "paligemma": (28, 28),  # 16 <image>
}

_PAD, _UNK = "<pad>", "<unk>"


def byte_level_tokenizer(
    bos: str, eos: str, named: dict[str, str], extra: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Build an offline byte-level BPE tokenizer with no merges.

    Ids 0-255 are the 256 byte symbols, then ``<pad>``, ``bos``, ``eos``, ``<unk>``, the named model-specific
    special tokens and ``extra``, in that order. Every byte of ordinary text is one token, so a string's
    tokens are the same wherever it appears in a prompt, and ``decode(encode(text)) == text`` for any text.

    Args:
        bos: Beginning-of-sequence token.
        eos: End-of-sequence token (the family's end-of-turn token).
        named: Model-specific special tokens, e.g. ``{"image_token": "<image>"}``; each becomes an attribute
            ``tokenizer.<name>`` and ``tokenizer.<name>_id``.
        extra: Further special tokens without a name.

    Returns:
        A left-padding ``PreTrainedTokenizerFast``.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([_PAD, bos, eos, _UNK, *named.values(), *extra]))
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=_PAD,
        unk_token=_UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        extra_special_tokens=dict(named),
    )


def _content(image: str) -> str:
    """Jinja fragment rendering one message's content: ``image`` for an image part, the text verbatim."""
    return (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


def _chatml(image: str) -> str:
    """ChatML template (Qwen, LLaVA-OneVision, InternVL) with the given image placeholder."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _content(image) + "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


#: "USER: <image>\n{q} ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: " + _content("<image>\n") + " {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: "<bos><start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n"
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    + _content("<start_of_image>")
    + "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
#: "<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant:"
IDEFICS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}:"
    + _content("<image>")
    + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: "<image>{q}"; the processor then inserts <bos> after the image tokens and appends "\n".
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}" + _content("<image>") + "{% endif %}{% endfor %}"
)


class _NoVideoMixin(ProcessorMixin):
    """Sits between a family processor and ``ProcessorMixin`` and drops the video processor it passes on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("video_processor", None)
        super().__init__(*args[:2], **kwargs)  # (image_processor, tokenizer)


def _no_video(base: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """Subclass ``base`` so that it needs no video processor (those need torchvision).

    ``ProcessorMixin.get_attributes()`` reads the ``__init__`` signature, so the subclass' signature without
    ``video_processor`` removes the attribute; the family's own ``__init__`` still runs and sets its tokens.
    """

    class _Tiny(base, _NoVideoMixin):  # type: ignore[valid-type,misc]
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
        ) -> None:
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    _Tiny.__name__ = _Tiny.__qualname__ = f"Tiny{base.__name__}"
    return _Tiny


TinyQwen2VLProcessor = _no_video(Qwen2VLProcessor)
TinyQwen2_5_VLProcessor = _no_video(Qwen2_5_VLProcessor)
TinyQwen3VLProcessor = _no_video(Qwen3VLProcessor)
TinyLlavaOnevisionProcessor = _no_video(LlavaOnevisionProcessor)
TinyInternVLProcessor = _no_video(InternVLProcessor)
TinyInternVLProcessor.images_kwargs = {"crop_to_patches": False}  # one 28x28 tile per image


class TinySmolVLMProcessor(SmolVLMProcessor):
    """``SmolVLMProcessor`` without the video processor and the ``num2words`` requirement (videos only)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_len: int = 169,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.fake_image_token = tokenizer.fake_image_token
        self.image_token = tokenizer.image_token
        self.image_token_id = tokenizer.image_token_id
        self.end_of_utterance_token = tokenizer.end_of_utterance_token
        self.global_image_token = tokenizer.global_image_token
        self.image_seq_len = image_seq_len
        self.video_token = "<video>"
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    # SmolVLM's override reads video-processor defaults; the generic one is all images need.
    apply_chat_template = ProcessorMixin.apply_chat_template


def _llava(model_type: str) -> ProcessorMixin:
    tok = byte_level_tokenizer("<s>", "</s>", {"image_token": "<image>"})
    size = {"shortest_edge": CLIP_IMAGE}
    crop = {"height": CLIP_IMAGE, "width": CLIP_IMAGE}
    common: dict[str, Any] = {
        "tokenizer": tok,
        "patch_size": CLIP_PATCH,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_TEMPLATE,
    }
    if model_type == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop), **common)
    image_processor = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=NEXT_GRID)
    return LlavaNextProcessor(image_processor=image_processor, **common)


def _llava_onevision(model_type: str) -> ProcessorMixin:
    tok = byte_level_tokenizer("<|endoftext|>", "<|im_end|>", {"image_token": "<image>"}, ("<|im_start|>",))
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": OV_IMAGE, "width": OV_IMAGE}, image_grid_pinpoints=OV_GRID
    )
    return TinyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_chatml("<image>\n"),
        num_image_tokens=(OV_IMAGE // OV_PATCH) ** 2,
        vision_feature_select_strategy="full",
    )


def _qwen(model_type: str) -> ProcessorMixin:
    named = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    tok = byte_level_tokenizer("<|endoftext|>", "<|im_end|>", named, ("<|im_start|>",))
    factor = QWEN_PATCH[model_type] * 2  # patch * spatial merge
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2},
        patch_size=QWEN_PATCH[model_type],
        merge_size=2,
        temporal_patch_size=2,
    )
    cls = {
        "qwen2_vl": TinyQwen2VLProcessor,
        "qwen2_5_vl": TinyQwen2_5_VLProcessor,
        "qwen3_vl": TinyQwen3VLProcessor,
    }
    template = _chatml("<|vision_start|><|image_pad|><|vision_end|>")
    return cls[model_type](image_processor=image_processor, tokenizer=tok, chat_template=template)


def _gemma3(model_type: str) -> ProcessorMixin:
    named = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    tok = byte_level_tokenizer("<bos>", "<end_of_turn>", named, ("<eos>", "<start_of_turn>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": GEMMA3_IMAGE, "width": GEMMA3_IMAGE})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=GEMMA3_TOKENS,
    )


def _internvl(model_type: str) -> ProcessorMixin:
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = byte_level_tokenizer("<|endoftext|>", "<|im_end|>", named, ("<|im_start|>",))
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_IMAGE, "width": INTERNVL_IMAGE}, crop_to_patches=False
    )
    return TinyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_chatml("<IMG_CONTEXT>\n"),
        image_seq_length=INTERNVL_TOKENS,
    )


def _idefics(model_type: str) -> ProcessorMixin:
    named = {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    tok = byte_level_tokenizer("<|im_start|>", "<end_of_utterance>", named)
    kwargs: dict[str, Any] = {
        "size": {"longest_edge": IDEFICS_IMAGE},
        "max_image_size": {"longest_edge": IDEFICS_IMAGE},
        "do_image_splitting": False,
    }
    if model_type == "smolvlm":
        return TinySmolVLMProcessor(
            image_processor=SmolVLMImageProcessorPil(**kwargs),
            tokenizer=tok,
            image_seq_len=IDEFICS_TOKENS,
            chat_template=IDEFICS_TEMPLATE,
        )
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**kwargs),
        tokenizer=tok,
        image_seq_len=IDEFICS_TOKENS,
        chat_template=IDEFICS_TEMPLATE,
    )


def _paligemma(model_type: str) -> ProcessorMixin:
    tok = byte_level_tokenizer("<bos>", "<eos>", {"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": PALIGEMMA_IMAGE, "width": PALIGEMMA_IMAGE})
    image_processor.image_seq_length = PALIGEMMA_TOKENS  # the hub's preprocessor_config.json carries it
    # Note: PaliGemmaProcessor adds its 1152 <locXXXX>/<segXXX> tokens to the tokenizer.
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "smolvlm": _idefics,
    "idefics3": _idefics,
    "paligemma": _paligemma,
}


def build_processor(model_type: str) -> ProcessorMixin:
    """Build the tiny processor (tokenizer + image processor + chat template) of a family.

    Args:
        model_type: A key of ``DEFAULT_IMAGE_SIZE`` (a ``config.model_type``).

    Returns:
        The family's processor with a fresh tokenizer (``padding_side="left"``).
    """
    return _BUILDERS[model_type](model_type)
