"""AGLA's augmented (local) view: relevance maps -> keep masks -> masked pixels, per model family.

The released AGLA code (``Lackel/AGLA``, ``eval/augmentation.py``) turns a 24x24 relevance map into a pixel mask by
min-max normalising it, resizing it bicubically to the 384x384 image, blurring it with a Gaussian of
``sigma = 0.02 * 384`` and keeping the pixels whose value is at least the value ranked ``int(N * keep)`` in
descending order (``N`` pixels, ``keep = 1 - mask ratio``); the other pixels are set to black before the image
goes through the VLM's processor. Rank thresholds ignore monotone rescaling, so the normalisations are skipped here.

halludec only has the processed ``pixel_values``, so the mask is built on each image's *plane* (the image as the
model sees it) and written into the pixel layout of the family:

- **tiles** (LLaVA-1.5, Gemma 3, PaliGemma, InternVL, SmolVLM / Idefics3): every pixel unit (image or tile) of a
  row carries ``g x g`` image tokens in raster order; each unit is its own plane, thresholded jointly per image.
- **anyres** (LLaVA-NeXT, OneVision): relevance from the base tile's ``g x g`` tokens (the first of the span; the
  base tile is the whole image resized to a square); the mask is written to the base tile and, through the
  processor's canvas geometry (best resolution, aspect-preserving resize, centred padding), to every high-res tile.
- **qwen** (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): flattened patches ``(t, h/m, w/m, m, m)`` of ``C x T x P x P`` values;
  the tokens are the merged ``(h/m) x (w/m)`` grid in raster order; the plane is the resized ``hP x wP`` image.

Everything except :func:`keep_masks` and the painters runs on the host in ``prepare``; those two use tensor ops
only, with shapes fixed in ``prepare``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Painter = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor], None]
"""``paint(new_pixels, old_pixels, keeps, fill)``: writes the masked pixels of one image into ``new_pixels``."""


@dataclass
class Source:
    """One relevance map of an image: a grid of image tokens over one plane.

    Attributes:
        positions: ``[gh * gw]`` token positions in the row (raster order of the grid).
        grid: ``(gh, gw)``.
        work: ``(h, w)`` resolution at which the map is upsampled, blurred and thresholded.
    """

    positions: torch.Tensor
    grid: tuple[int, int]
    work: tuple[int, int]


@dataclass
class ImagePlan:
    """How one image of one prompt row is masked."""

    row: int
    sources: list[Source]
    painters: list[Painter] = field(default_factory=list)


def work_size(height: int, width: int, side: int) -> tuple[int, int]:
    """The plane scaled so that its long side is at most ``side`` (the paper works at 384 px)."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur as scipy's ``gaussian_filter`` (mode ``"reflect"``: edge repeated, truncate 4).

    Args:
        maps: ``[N, 1, h, w]`` float32.
        sigma: Standard deviation in pixels; ``<= 0`` returns ``maps``.

    Returns:
        Blurred maps, same shape (identical to scipy while the radius ``int(4 sigma + 0.5)`` fits in the map).
    """
    if sigma <= 0:
        return maps
    out = maps
    radius_full = int(4.0 * sigma + 0.5)
    for dim in (2, 3):
        size = maps.shape[dim]
        radius = min(radius_full, size)
        if radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()  # [2r + 1]
        before = out.narrow(dim, 0, radius).flip(dim)  # symmetric padding: d c b a | a b c d
        after = out.narrow(dim, size - radius, radius).flip(dim)
        padded = torch.cat([before, out, after], dim=dim)  # [N, 1, h (+ 2r), w (+ 2r)]
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        out = F.conv2d(padded, kernel.view(shape))  # [N, 1, h, w]
    return out


def keep_masks(
    maps: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], keep: float | torch.Tensor, blur: float
) -> list[torch.Tensor]:
    """The paper's mask rule on one image's relevance maps, thresholded jointly.

    Each map is resized bicubically to its size and blurred (``sigma = blur * long side``); a pixel is kept when its
    value is at least the value ranked ``floor(N * keep)`` in descending order over all ``N`` pixels (clamped to the
    last one: ``keep = 1`` keeps everything; ties are kept).

    Args:
        maps: Relevance maps ``[gh, gw]`` (any scale; higher = more relevant).
        sizes: Target ``(h, w)`` per map.
        keep: Fraction of pixels kept, a float or a 0-dim tensor (adaptive ratio).
        blur: Gaussian sigma as a fraction of the long side (0.02 in the paper; 0 = none).

    Returns:
        One bool mask ``[h, w]`` per map (True = kept).
    """
    smooth = []
    for m, (h, w) in zip(maps, sizes, strict=True):
        grid = m.float().reshape(1, 1, *m.shape[-2:])  # [1, 1, gh, gw]
        up = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1, 1, h, w]
        smooth.append(gaussian_blur(up, blur * max(h, w)).flatten())  # [h * w]
    values = torch.cat(smooth)  # [N]
    n = values.shape[0]
    ranked = values.sort(descending=True).values  # [N]
    if isinstance(keep, torch.Tensor):
        index = (keep.float() * n).floor().long().clamp(0, n - 1).to(values.device)  # 0-dim
        threshold = ranked.gather(0, index.reshape(1))  # [1]
    else:
        threshold = ranked[min(int(n * keep), n - 1)]  # 0-dim
    kept = values >= threshold  # [N]
    return [k.view(h, w) for k, (h, w) in zip(kept.split([h * w for h, w in sizes]), sizes, strict=True)]


def fill_values(fill: str, processor: Any, channels: int) -> torch.Tensor:
    """The processed value of a masked pixel per channel: black (``-mean / std``, as the paper) or the mean (0).

    Args:
        fill: ``"black"`` or ``"mean"``.
        processor: The processor that built the inputs (its image processor's ``image_mean`` / ``image_std``).
        channels: Image channels.

    Returns:
        ``[channels]`` float32.

    Raises:
        ValueError: for ``"black"`` when the processor does not tell its normalisation.
    """
    if fill == "mean":
        return torch.zeros(channels)
    image_processor = getattr(processor, "image_processor", processor)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError(
            "AGLA masks pixels to black, which needs the image processor's image_mean / image_std; got processor="
            f"{type(processor).__name__}. Pass processor= (the processor that built the inputs), or set "
            "fill='mean' to mask with the normalised mean colour."
        )
    mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten().expand(channels)
    std_t = torch.as_tensor(std, dtype=torch.float32).flatten().expand(channels)
    return -mean_t / std_t


# ------------------------------------------------------------------------------------------------- layouts
def plan_images(
    adapter: Any, inputs: Mapping[str, Any], image_spans: Sequence[Sequence[tuple[int, int]]], side: int
) -> list[ImagePlan]:
    """Per image of every row, its relevance sources and pixel painters (host side, once per call).

    Args:
        adapter: The model's ``VLMAdapter``.
        inputs: The model inputs (``pixel_values`` and the family's image-layout tensors).
        image_spans: Per row, its image spans (``call.image_spans``).
        side: Long side of the work resolution.

    Returns:
        The image plans, rows in order.

    Raises:
        ValueError: when the pixel layout cannot be mapped to the image tokens.
    """
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        raise ValueError("AGLA masks the image and needs `pixel_values` in the inputs; build them with the processor.")
    model_type = adapter.config.model_type
    if model_type.startswith("qwen") and inputs.get("image_grid_thw") is not None:
        return _qwen(adapter, inputs, image_spans, side)
    if model_type in ("llava_next", "llava_onevision") and inputs.get("image_sizes") is not None:
        return _anyres(adapter, inputs, image_spans, side)
    return _tiles(pixels, image_spans, model_type, side)


def _unsupported(model_type: str, detail: str) -> ValueError:
    return ValueError(
        f"AGLA cannot map the image layout of model type {model_type!r} to its image tokens ({detail}). Supported: "
        "one square token grid per image or tile (LLaVA-1.5, Gemma 3, PaliGemma, InternVL, SmolVLM), LLaVA-NeXT / "
        "OneVision anyres, Qwen-VL patches; add a layout to halludec/decoding/agla_masks.py."
    )


def _tiles(
    pixels: torch.Tensor, image_spans: Sequence[Sequence[tuple[int, int]]], model_type: str, side: int
) -> list[ImagePlan]:
    if pixels.dim() not in (4, 5):
        raise _unsupported(model_type, f"pixel_values of shape {tuple(pixels.shape)}")
    per = 1 if pixels.dim() == 4 else pixels.shape[1]  # units per pixel_values row
    units = pixels.reshape(-1, *pixels.shape[-3:])  # [N * per, C, H, W]
    real = units.flatten(1).ne(0).any(1).tolist()  # all-zero units are padding
    rows, images = len(image_spans), sum(len(s) for s in image_spans)
    h, w = units.shape[-2:]
    groups: list[tuple[int, list[int], list[int]]] = []  # (row, unit indices, token positions)
    if pixels.shape[0] == rows:  # one pixel row per prompt row (its tiles may be separate spans)
        for r, spans in enumerate(image_spans):
            tokens = [p for s, e in spans for p in range(s, e)]
            groups.append((r, [u for u in range(r * per, (r + 1) * per) if real[u]], tokens))
    elif pixels.shape[0] == images:  # one pixel row per image
        i = 0
        for r, spans in enumerate(image_spans):
            for s, e in spans:
                groups.append((r, [u for u in range(i * per, (i + 1) * per) if real[u]], list(range(s, e))))
                i += 1
    else:
        raise _unsupported(model_type, f"{pixels.shape[0]} pixel rows for {rows} prompts with {images} images")
    plans = []
    for r, unit_ids, tokens in groups:
        k = len(tokens) // max(len(unit_ids), 1)
        g = math.isqrt(k)
        if not unit_ids or k * len(unit_ids) != len(tokens) or g * g != k:
            raise _unsupported(model_type, f"{len(tokens)} image tokens over {len(unit_ids)} pixel units")
        plan = ImagePlan(row=r, sources=[])
        for j, u in enumerate(unit_ids):
            pos = torch.tensor(tokens[j * k : (j + 1) * k], dtype=torch.long)
            plan.sources.append(Source(pos, (g, g), work_size(h, w, side)))
            plan.painters.append(_unit_painter(u, j, (h, w)))
        plans.append(plan)
    return plans


def _unit_painter(unit: int, source: int, size: tuple[int, int]) -> Painter:
    """Mask one ``[C, H, W]`` unit of ``pixel_values`` (viewed ``[-1, C, H, W]``) with source ``source``'s mask."""

    def paint(new: torch.Tensor, old: torch.Tensor, keeps: list[torch.Tensor], fill: torch.Tensor) -> None:
        keep = _resize_mask(keeps[source], size)  # [H, W]
        flat_new, flat_old = new.view(-1, *new.shape[-3:]), old.reshape(-1, *old.shape[-3:])  # [N, C, H, W]
        fv = fill.to(old.device, old.dtype)[:, None, None]  # [C, 1, 1]
        flat_new[unit] = torch.where(keep[None], flat_old[unit], fv)

    return paint


def _resize_mask(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(keep.shape) == tuple(size):
        return keep
    up = F.interpolate(keep[None, None].float(), size=size, mode="nearest")  # [1, 1, H, W]
    return up[0, 0] > 0.5


def _anyres(
    adapter: Any, inputs: Mapping[str, Any], image_spans: Sequence[Sequence[tuple[int, int]]], side: int
) -> list[ImagePlan]:
    from transformers.image_processing_utils import select_best_resolution

    cfg = adapter.config
    pixels = inputs["pixel_values"]  # [n_images, tiles, C, H, W]
    sizes = inputs["image_sizes"].tolist()
    spans = [(r, s) for r, row in enumerate(image_spans) for s in row]
    if pixels.dim() != 5 or len(sizes) != len(spans) or pixels.shape[0] != len(spans):
        raise _unsupported(cfg.model_type, f"pixel_values {tuple(pixels.shape)} for {len(spans)} image spans")
    tile_h, tile_w = pixels.shape[-2:]
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size  # base-tile token grid
    plans = []
    for i, ((r, (start, end)), (height, width)) in enumerate(zip(spans, sizes, strict=True)):
        if end - start < g * g:
            raise _unsupported(cfg.model_type, f"an image span of {end - start} tokens, base tile needs {g * g}")
        source = Source(torch.arange(start, start + g * g), (g, g), work_size(tile_h, tile_w, side))
        plan = ImagePlan(row=r, sources=[source], painters=[_unit_painter(i * pixels.shape[1], 0, (tile_h, tile_w))])
        best_h, best_w = select_best_resolution((height, width), cfg.image_grid_pinpoints)
        scale_h, scale_w = best_h / height, best_w / width
        if scale_w < scale_h:  # the processor's aspect-preserving resize (get_patch_output_size)
            new_h, new_w = min(math.ceil(height * scale_w), best_h), best_w
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        n_rows, n_cols = best_h // tile_h, best_w // tile_w
        if 1 + n_rows * n_cols > pixels.shape[1]:
            raise _unsupported(cfg.model_type, f"{1 + n_rows * n_cols} tiles expected, {pixels.shape[1]} given")
        for t in range(n_rows * n_cols):
            tr, tc = divmod(t, n_cols)
            ys = (tr * tile_h + torch.arange(tile_h) + 0.5 - top) / new_h  # [H] in image units
            xs = (tc * tile_w + torch.arange(tile_w) + 0.5 - left) / new_w  # [W]
            plan.painters.append(_sampled_painter(i * pixels.shape[1] + 1 + t, ys, xs))
        plans.append(plan)
    return plans


def _sampled_painter(unit: int, ys: torch.Tensor, xs: torch.Tensor) -> Painter:
    """Mask a high-res tile whose pixel centres sit at image coordinates ``ys`` x ``xs`` (in [0, 1] inside)."""
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), dim=-1)  # [H, W, 2] (x, y)
    inside = ((ys >= 0) & (ys <= 1))[:, None] & ((xs >= 0) & (xs <= 1))[None, :]  # [H, W]

    def paint(new: torch.Tensor, old: torch.Tensor, keeps: list[torch.Tensor], fill: torch.Tensor) -> None:
        base = keeps[0][None, None].float()  # [1, 1, h, w]
        g = grid.to(base.device)[None]  # [1, H, W, 2]
        sampled = F.grid_sample(base, g, mode="nearest", align_corners=False)[0, 0] > 0.5  # [H, W]
        keep = sampled | ~inside.to(base.device)  # padding outside the image stays
        flat_new, flat_old = new.view(-1, *new.shape[-3:]), old.reshape(-1, *old.shape[-3:])
        fv = fill.to(old.device, old.dtype)[:, None, None]  # [C, 1, 1]
        flat_new[unit] = torch.where(keep[None], flat_old[unit], fv)

    return paint


def _qwen(
    adapter: Any, inputs: Mapping[str, Any], image_spans: Sequence[Sequence[tuple[int, int]]], side: int
) -> list[ImagePlan]:
    vision = adapter.config.vision_config
    merge, patch = vision.spatial_merge_size, vision.patch_size
    temporal = getattr(vision, "temporal_patch_size", 1)
    pixels = inputs["pixel_values"]  # [patches, C * T * P * P]
    channels = pixels.shape[-1] // (temporal * patch * patch)
    grids = inputs["image_grid_thw"].tolist()
    spans = [(r, s) for r, row in enumerate(image_spans) for s in row]
    if len(grids) != len(spans) or channels * temporal * patch * patch != pixels.shape[-1]:
        raise _unsupported(adapter.config.model_type, f"{len(grids)} image grids for {len(spans)} image spans")
    plans, row_start = [], 0
    for (r, (start, end)), (t, h, w) in zip(spans, grids, strict=True):
        gh, gw = h // merge, w // merge
        if end - start != t * gh * gw:
            raise _unsupported(adapter.config.model_type, f"a span of {end - start} tokens for grid {(t, h, w)}")
        source = Source(torch.arange(start, start + gh * gw), (gh, gw), work_size(h * patch, w * patch, side))
        painter = _qwen_painter(row_start, (t, h, w), merge, patch, temporal, channels)
        plans.append(ImagePlan(row=r, sources=[source], painters=[painter]))
        row_start += t * h * w
    return plans


def _qwen_painter(start: int, thw: tuple[int, int, int], merge: int, patch: int, temporal: int, ch: int) -> Painter:
    t, h, w = thw

    def paint(new: torch.Tensor, old: torch.Tensor, keeps: list[torch.Tensor], fill: torch.Tensor) -> None:
        plane = _resize_mask(keeps[0], (h * patch, w * patch))  # [hP, wP]
        blocks = plane.view(h // merge, merge, patch, w // merge, merge, patch)  # [bh, mh, P, bw, mw, P]
        per_patch = blocks.permute(0, 3, 1, 4, 2, 5).reshape(h * w, 1, 1, patch, patch)  # [hw, 1, 1, P, P]
        keep = per_patch.repeat(t, 1, 1, 1, 1)  # [thw, 1, 1, P, P] (frames share the mask)
        rows = slice(start, start + t * h * w)
        units = old[rows].view(t * h * w, ch, temporal, patch, patch)  # [thw, C, T, P, P]
        fv = fill.to(old.device, old.dtype)[None, :, None, None, None]  # [1, C, 1, 1, 1]
        new[rows] = torch.where(keep, units, fv).reshape(t * h * w, -1)

    return paint
