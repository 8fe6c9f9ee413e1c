"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Module tree (transformers 5.x)::

    Qwen2VLForConditionalGeneration
    ├── model: Qwen2VLModel
    │   ├── visual: Qwen2VisionTransformerPretrainedModel            <- vision attentions (per image, cu_seqlens)
    │   └── language_model: Qwen2VLTextModel                         <- get_decoder()
    │       └── layers[i].self_attn.{q,k,v,o}_proj (GQA, mrope)       <- steered attention, o_proj pre-hook
    └── lm_head

Image tokens: ``<|image_pad|>`` (``config.image_token_id``, 151655), ``image_grid_thw.prod() / merge_size**2``
per image, each span flanked by ``<|vision_start|>`` / ``<|vision_end|>``. Positions are 3-D (mrope): an
image-free side input needs its own position ids (``position_ids_for``), never the model's cached
``rope_deltas``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from halludec.vlm_adapters.base import VLMAdapter


class QwenVLAdapter(VLMAdapter):
    """Adapter for the Qwen-VL family (qwen2_vl, qwen2_5_vl, qwen3_vl)."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    vision_tower_attr = "visual"
    wrapper_token_attrs = ("vision_start_token_id", "vision_end_token_id")

    def position_ids_for(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Explicit mrope position ids for a prefill of ``inputs``, as ``generate`` builds them.

        Args:
            inputs: Model inputs (``input_ids``, ``attention_mask``, and for images ``mm_token_type_ids`` and
                ``image_grid_thw``).

        Returns:
            ``[4, B, L]`` long tensor: text positions then the 3-D (t, h, w) positions.
        """
        ids = inputs["input_ids"]
        am = inputs.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        text = super().position_ids_for(inputs)  # [B, L]
        grid = inputs.get("image_grid_thw")
        if grid is not None and inputs.get("mm_token_type_ids") is not None:
            vision, _ = self.model.model.get_rope_index(
                ids, inputs["mm_token_type_ids"], image_grid_thw=grid, attention_mask=am
            )  # [3, B, L]
        else:
            vision = text.unsqueeze(0).expand(3, -1, -1)  # [3, B, L]
        return torch.cat([text.unsqueeze(0), vision], dim=0)  # [4, B, L]
