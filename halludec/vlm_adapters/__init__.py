"""Model-family adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from halludec.registry import Registry
from halludec.vlm_adapters.base import ModelDims, Span, VLMAdapter
from halludec.vlm_adapters.llava import LlavaAdapter
from halludec.vlm_adapters.others import Gemma3Adapter, Idefics3Adapter, InternVLAdapter, PaliGemmaAdapter
from halludec.vlm_adapters.qwen_vl import QwenVLAdapter

ADAPTERS: Registry[type[VLMAdapter]] = Registry(
    "model type",
    hint=(
        "To add a model family, subclass halludec.vlm_adapters.VLMAdapter (mostly data: model_types, "
        "vision_tower_attr, wrapper_token_attrs) and call halludec.vlm_adapters.register_adapter(YourAdapter)."
    ),
)


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Register an adapter class under each of its ``model_types``; usable as a class decorator."""
    for model_type in cls.model_types:
        ADAPTERS.register(model_type, cls)
    return cls


for _cls in (LlavaAdapter, QwenVLAdapter, Gemma3Adapter, InternVLAdapter, Idefics3Adapter, PaliGemmaAdapter):
    register_adapter(_cls)


def get_adapter(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Args:
        model: A loaded vision-language ``...ForConditionalGeneration`` model.

    Returns:
        A ``VLMAdapter`` bound to ``model``.

    Raises:
        ValueError: for an unsupported ``model_type``, listing the supported ones and how to add an adapter.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"halludec does not support this model: {ADAPTERS.unknown_message(model_type)}")
    return ADAPTERS.get(model_type)(model)


def list_adapters() -> list[str]:
    """Supported ``config.model_type`` values."""
    return ADAPTERS.names()


__all__ = ["ADAPTERS", "ModelDims", "Span", "VLMAdapter", "get_adapter", "list_adapters", "register_adapter"]
