"""The lab model's architecture, tokenizer and processor: a real ``LlavaForConditionalGeneration``, only tiny.

A word-level tokenizer (``tokenizers`` WordLevel, lower-cased, punctuation split off) over the lab's closed
vocabulary, a CLIP-style vision tower and a Llama text model, wrapped in the ordinary ``LlavaProcessor`` with a chat
template — so the shipped folder loads with ``AutoModelForImageTextToText.from_pretrained`` /
``AutoProcessor.from_pretrained`` like any LLaVA checkpoint, and halludec finds image and question spans the way it
does on real models.
"""

from __future__ import annotations

from typing import Any

from halludec.lab.scenes import IMAGE_SIZE, OBJECTS

PATCH_SIZE = 16  # the default; the shipped model's value is in its config.json


def image_tokens(patch_size: int = PATCH_SIZE) -> int:
    """Image tokens per picture: one per patch (the CLS token is dropped by the "default" feature strategy)."""
    return (IMAGE_SIZE // patch_size) ** 2


SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
SYSTEM = "a chat about a picture ."
#: Every word the lab model knows (the prompts' words, the answers' words and the object kinds).
WORDS: tuple[str, ...] = (
    *("a", "chat", "about", "picture", ".", "user", ":", "assistant"),
    *("is", "there", "in", "the", "image", "?", "yes", "no", "and"),
    *("describe", "this"),
    *OBJECTS,
)
QUESTION = "Is there a {obj} in the image?"
CAPTION_PROMPT = "Describe this picture."

#: The chat template shipped with the processor (user turns may hold an image and text).
CHAT_TEMPLATE = (
    "{{ bos_token }} " + SYSTEM + " "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : "
    "{% else %}ASSISTANT : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tokenizer() -> Any:
    """The lab's word-level tokenizer (``PreTrainedTokenizerFast``), built offline.

    Returns:
        The tokenizer: ids 0-4 are ``<pad> <unk> <s> </s> <image>``, then :data:`WORDS` in order.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )


def build_processor(tokenizer: Any | None = None, patch_size: int = PATCH_SIZE) -> Any:
    """The lab's ``LlavaProcessor``: CLIP image preprocessing at 64 px and the lab chat template.

    Args:
        tokenizer: Reuse this tokenizer (None: :func:`build_tokenizer`).
        patch_size: The vision tower's patch size (sets the number of image tokens).

    Returns:
        The processor.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(text_layers: int = 4, patch_size: int = PATCH_SIZE) -> Any:
    """The lab model's ``LlavaConfig``.

    Args:
        text_layers: Decoder layers of the Llama text model.
        patch_size: The vision tower's patch size.

    Returns:
        The config (CLIP tower 96 x 3 layers on 64 px / patch 8; Llama 192 hidden, 4 heads, tied embeddings).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size = len(SPECIALS) + len(WORDS)
    vision = CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=96,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIALS.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.pad_token_id = 0
    return config
