"""Reading the vision tower's attention maps (PAINT's CLS sets, visual-sensitivity scores)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from halludec.decoding import attention
from halludec.vlm_adapters import VLMAdapter


@torch.no_grad()
def vision_attentions(
    adapter: VLMAdapter, inputs: Mapping[str, Any], layers: Sequence[int] | None = None
) -> dict[int, list[torch.Tensor]]:
    """Attention probabilities of the vision tower for the images in ``inputs``.

    For this one encoder pass the vision sub-config is routed through halludec's attention function, which
    computes the selected layers explicitly in float32 and keeps their probabilities; everything is restored
    afterwards. Works whether the tower attends over a batch of images (CLIP, SigLIP) or image by image (Qwen).

    Args:
        adapter: The model's adapter.
        inputs: Model inputs holding the images (``pixel_values`` and, for Qwen, ``image_grid_thw``).
        layers: Vision layers to return (negative indices allowed); all when None.

    Returns:
        ``{layer: [probs of image 0, probs of image 1, ...]}``, each ``[H, P, P]`` (P = that image's patches,
        including a CLS token where the tower has one).
    """
    mods = adapter.vision_attention_modules()
    n = len(mods)
    wanted = sorted({(i % n) for i in layers}) if layers is not None else list(range(n))
    for i in layers or []:
        if not -n <= i < n:
            raise ValueError(
                f"Vision layer {i} is out of range; the vision tower has {n} layers (valid: {-n}..{n - 1})."
            )
    records: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    key = adapter.vision_config_key()
    previous = getattr(adapter.config, key)._attn_implementation
    with ExitStack() as stack:
        attention.register()
        adapter.model.set_attn_implementation({key: attention.ATTN_NAME})
        stack.callback(adapter.model.set_attn_implementation, {key: previous})
        for i in wanted:
            setattr(mods[i], attention.RECORD_ATTR, records[i])
            stack.callback(delattr, mods[i], attention.RECORD_ATTR)
        adapter.run_vision_tower(inputs)
    return {i: [img for probs in recs for img in probs.unbind(0)] for i, recs in records.items()}
