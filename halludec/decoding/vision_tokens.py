"""From vision-tower patch scores to the LLM's image-token positions, per model family.

A vision tower attends over patches; the LLM sees image tokens made from them: the same patches (LLaVA-1.5 after
dropping CLS, PaliGemma), groups of ``merge**2`` consecutive patches (Qwen2-VL; Qwen2.5-VL also permutes the
groups into attention windows inside the tower), spatially pooled / pixel-shuffled patches (Gemma 3, InternVL,
SmolVLM, Idefics3), or several tiles per image plus newline tokens (LLaVA-NeXT, OneVision: only the base tile,
the first tokens of each image's span, is mapped). This module maps per-patch scores to per-token scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from halludec.vlm_adapters import VLMAdapter

ANYRES = ("llava_next", "llava_onevision")


def has_cls(adapter: VLMAdapter) -> bool:
    """Whether the vision tower's sequence starts with a CLS token that the LLM drops (``"default"`` selection)."""
    return getattr(adapter.config, "vision_feature_select_strategy", None) == "default"


def cls_scores(probs: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention summed over heads.

    Args:
        probs: One image's attention ``[H, P, P]`` with CLS at index 0.

    Returns:
        ``[P - 1]`` scores of the patches.
    """
    return probs[:, 0, 1:].float().sum(0)  # [P-1]


def received_scores(probs: torch.Tensor, skip_cls: bool = False) -> torch.Tensor:
    """Attention each patch receives, averaged over the patch query rows, summed over heads (towers without CLS).

    Args:
        probs: One image's attention ``[H, P, P]``.
        skip_cls: Drop a leading CLS row and column first.

    Returns:
        ``[P]`` (or ``[P - 1]``) scores.
    """
    p = probs[:, 1:, 1:] if skip_cls else probs  # [H, P', P']
    return p.float().mean(1).sum(0)  # [P']


def tiles_per_image(adapter: VLMAdapter, inputs: Mapping[str, Any]) -> list[int]:
    """How many vision-tower inputs (tiles) each image of ``inputs`` becomes."""
    if adapter.config.model_type not in ANYRES or inputs.get("image_sizes") is None:
        pixels = inputs["pixel_values"]
        n = inputs["image_grid_thw"].shape[0] if inputs.get("image_grid_thw") is not None else pixels.shape[0]
        return [1] * n
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = adapter.config
    return [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in inputs["image_sizes"].tolist()
    ]


def tokens_from_patches(
    adapter: VLMAdapter, inputs: Mapping[str, Any], per_image: list[torch.Tensor], span_lengths: list[int]
) -> list[torch.Tensor]:
    """Map per-patch scores of each image to per-token scores of that image's span.

    Args:
        adapter: The model's adapter.
        inputs: The model inputs (Qwen's ``image_grid_thw`` is read here).
        per_image: One score vector per image (CLS already removed), in tower order (for anyres families: base
            tiles only, one per image).
        span_lengths: Number of image tokens of each image in the LLM sequence.

    Returns:
        Per image, scores over its first ``n`` image tokens (``n = span length``, or the base tile's token count
        for anyres families).

    Raises:
        ValueError: when the patch count cannot be mapped to the span (unsupported layout).
    """
    model_type = adapter.config.model_type
    if model_type.startswith("qwen"):
        return _qwen(adapter, inputs, per_image)
    out = []
    for scores, n_tokens in zip(per_image, span_lengths, strict=True):
        p = scores.shape[0]
        if model_type in ANYRES or p == n_tokens:
            out.append(scores)
            continue
        side, grid = math.isqrt(p), math.isqrt(n_tokens)
        if side * side != p or grid * grid != n_tokens or side % grid:
            raise ValueError(
                f"Cannot map {p} vision patches onto {n_tokens} image tokens for model type {model_type!r}; this "
                "layout needs its own mapping in halludec/decoding/vision_tokens.py."
            )
        k = side // grid
        pooled = F.avg_pool2d(scores.view(1, 1, side, side), kernel_size=k)  # [1, 1, grid, grid]
        out.append(pooled.flatten())  # raster order of the pooled grid
    return out


def _qwen(adapter: VLMAdapter, inputs: Mapping[str, Any], per_image: list[torch.Tensor]) -> list[torch.Tensor]:
    """Qwen: sums over each group of ``merge**2`` consecutive patches; Qwen2.5 also undoes the window order."""
    vision = adapter.config.vision_config
    unit = vision.spatial_merge_size**2
    grouped = [s.view(-1, unit).sum(-1) for s in per_image]  # per image [P / unit]
    if adapter.config.model_type != "qwen2_5_vl":
        return grouped
    window_index = _window_index(adapter, inputs["image_grid_thw"])  # [total tokens]
    permuted = torch.cat(grouped)
    raster = torch.empty_like(permuted)
    raster[window_index.to(permuted.device)] = permuted
    return list(raster.split([g.shape[0] for g in grouped]))


def _window_index(adapter: VLMAdapter, grid_thw: torch.Tensor) -> torch.Tensor:
    vision = adapter.config.vision_config
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers < 5.23 keeps it on the vision model
        return adapter.vision_tower.get_window_index(grid_thw)[0]
    return get_vision_window_index(
        grid_thw,
        spatial_merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        patch_size=vision.patch_size,
    )[0]


def full_attention_layers(adapter: VLMAdapter) -> list[int] | None:
    """Vision layers that attend over whole images (Qwen2.5-VL windows the others); None = all of them."""
    blocks = getattr(adapter.config.vision_config, "fullatt_block_indexes", None)
    return list(blocks) if blocks else None
