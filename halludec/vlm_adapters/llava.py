"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision.

Module tree (transformers 5.x, whatever layout the checkpoint was saved with)::

    LlavaForConditionalGeneration
    ├── model: LlavaModel
    │   ├── vision_tower: CLIPVisionModel (SigLIP for OneVision)   <- vision attentions
    │   ├── multi_modal_projector
    │   └── language_model: LlamaModel / Qwen2Model                <- get_decoder()
    │       └── layers[i].self_attn.{q,k,v,o}_proj                  <- steered attention, o_proj pre-hook
    └── lm_head

Image tokens: ``config.image_token_index`` (``<image>``, 32000 in llava-hf 7B), expanded by the processor into
576 tokens (LLaVA-1.5, 336 px / 14) or a variable anyres count with one newline token per row (NeXT,
OneVision); the newline embeddings sit inside the span, so the span is not a square grid.
"""

from __future__ import annotations

from halludec.vlm_adapters.base import VLMAdapter


class LlavaAdapter(VLMAdapter):
    """Adapter for the LLaVA family (llava, llava_next, llava_onevision)."""

    model_types = ("llava", "llava_next", "llava_onevision")
