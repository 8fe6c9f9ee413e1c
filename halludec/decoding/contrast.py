"""Shared pieces of the contrastive logits strategies (VCD, INTER): the plausibility cutoff and per-row image nulls.

- :func:`plausibility_cutoff`: VCD's adaptive plausibility constraint on the raw main logits. The released code sets
  implausible tokens to ``-inf``; here they are pushed :data:`CUTOFF_MARGIN` below every plausible token instead
  (their order kept), which is the same for softmax, argmax and beam scores, but leaves a finite fallback when a
  later processor bans every plausible token (``min_new_tokens`` banning EOS), so no row ever becomes all ``-inf``
  and sampling never sees NaN.
- :func:`replace_pixels`: a copy of the inputs whose ``pixel_values`` are replaced image by image (noised, uniform
  noise, zeros), each row drawing from its own generator seeded from the run seed and the row's own pixels. A row
  therefore gets the same null image whatever the batch it is in and whatever the order of the run (resumable runs),
  while different images get different noise. All-zero units (LLaVA-NeXT's padded patches, Idefics3's padded
  images) are left at zero, as the models treat them as padding.

Host-side only (called once per ``generate`` call) except :func:`plausibility_cutoff`, which is tensor-only.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger("halludec")

CUTOFF_MARGIN = 1e4
"""How far below every plausible token the cutoff pushes an implausible one (``exp(-1e4)`` is 0 in float32)."""

PixelFill = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``fill(units, generator) -> units'``: the null version of a row's real image units, same shape and dtype."""


def plausibility_cutoff(scores: torch.Tensor, raw: torch.Tensor, beta: float) -> torch.Tensor:
    """VCD's adaptive plausibility constraint: drop tokens whose raw logit is below ``log(beta) + max(raw)``.

    Dropped tokens get ``scores - (max(scores) - min(scores)) - CUTOFF_MARGIN`` (per row): at least
    ``CUTOFF_MARGIN`` below every kept token, so softmax gives them 0 and argmax / beam search never pick them
    while a kept token remains; their relative order is kept as a finite fallback. The cutoff on raw logits equals
    the cutoff on log-probabilities (they differ by a per-row constant).

    Args:
        scores: Combined logits ``[B, V]`` (float32).
        raw: The main branch's raw logits ``[B, V]`` that decide plausibility.
        beta: Cutoff in ``[0, 1]``; 0 keeps every token (returns ``scores`` unchanged).

    Returns:
        New scores ``[B, V]``; inputs are not modified.
    """
    if beta == 0.0:
        return scores
    keep = raw >= raw.amax(dim=-1, keepdim=True) + math.log(beta)  # [B, V]
    span = scores.amax(dim=-1, keepdim=True) - scores.amin(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(keep, scores, scores - span - CUTOFF_MARGIN)


def check_int(name: str, value: Any, low: int, high: int | None) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer in ``[low, high]`` (``high`` None = unbounded).

    Args:
        name: Field name, for the message.
        value: The received value.
        low: Inclusive lower bound.
        high: Inclusive upper bound or None.
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)
    if not ok:
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer in [{low}, {hi}].")


def uniform_fill(units: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``rand_like(units)`` (uniform in ``[0, 1)``) drawn from ``generator`` (INTER's image-masked input)."""
    noise = torch.rand(units.shape, generator=generator, dtype=torch.float32, device="cpu")
    return noise.to(device=units.device, dtype=units.dtype)


def zeros_fill(units: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """All-zero pixels (the processed-pixel mean image for mean/std-normalised processors)."""
    return torch.zeros_like(units)


def diffusion_fill(adapter: Any, noise_step: int) -> PixelFill:
    """VCD's forward-diffusion noise at ``noise_step`` (``adapter.noised_image_inputs``) as a :data:`PixelFill`."""

    def fill(units: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return adapter.noised_image_inputs({"pixel_values": units}, noise_step, generator)["pixel_values"]

    return fill


def replace_pixels(
    inputs: Mapping[str, Any],
    image_spans: Sequence[Sequence[tuple[int, int]]],
    fill: PixelFill,
    seed: int,
    salt: str,
) -> dict[str, Any]:
    """A shallow copy of ``inputs`` whose ``pixel_values`` are replaced row by row with ``fill``.

    The rows of ``pixel_values`` (dim 0) are mapped to prompt rows by layout: one per prompt row (LLaVA, LLaVA-NeXT,
    Idefics3, PaliGemma), one per image (several images in a row), or in proportion to the row's image tokens
    (Qwen's flattened patches, InternVL's tiles). Each row's real units (all-zero ones are padding and stay zero)
    are filled from ``torch.Generator().manual_seed(h)`` with ``h`` a hash of ``salt``, ``seed`` and the row's
    pixel bytes. When no mapping fits, the whole tensor is filled from one generator and a warning says so.

    Args:
        inputs: Model inputs with ``pixel_values``.
        image_spans: Per prompt row, its image spans (``call.image_spans``).
        fill: Builds the null units from the real ones and a generator.
        seed: The run seed.
        salt: Distinguishes kinds of null (e.g. ``"vcd"``), so they draw different noise.

    Returns:
        The new inputs (other tensors shared with ``inputs``; nothing is modified in place).

    Raises:
        ValueError: when ``inputs`` has no ``pixel_values``.
    """
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(
            "This strategy replaces the image with a null image and needs `pixel_values` in the inputs; got "
            f"{type(pixels).__name__}. Build the inputs with the model's processor and an image."
        )
    out = dict(inputs)
    slices = _row_slices(pixels.shape[0], image_spans)
    if slices is None:
        logger.warning(
            "halludec: could not map pixel_values %s to the %d prompt rows; the null image is drawn for the whole "
            "batch at once, so a row's noise depends on the batch it is in.",
            tuple(pixels.shape),
            len(image_spans),
        )
        slices = [slice(0, pixels.shape[0])]
    new = pixels.clone()
    unit_shape = pixels.shape[-3:] if pixels.dim() >= 4 else pixels.shape[1:]  # one image / patch / tile
    for rows in slices:
        units = pixels[rows].reshape(-1, *unit_shape)  # [n_units, *unit]
        real = units.flatten(1).ne(0).any(dim=1)  # [n_units]; all-zero units are padding
        filled = units.clone()
        if bool(real.any()):
            generator = torch.Generator(device="cpu").manual_seed(_row_seed(salt, seed, units[real]))
            filled[real] = fill(units[real], generator)
        new[rows] = filled.reshape(pixels[rows].shape)
    out["pixel_values"] = new
    return out


def _row_slices(n: int, image_spans: Sequence[Sequence[tuple[int, int]]]) -> list[slice] | None:
    """Per prompt row, the slice of ``pixel_values`` dim 0 (of size ``n``) holding its image(s), or None."""
    rows = len(image_spans)
    if n == rows:
        return [slice(r, r + 1) for r in range(rows)]
    images = [len(spans) for spans in image_spans]
    if n == sum(images):
        sizes = images
    else:
        tokens = [sum(e - s for s, e in spans) for spans in image_spans]
        total = sum(tokens)
        if total == 0 or any(n * t % total for t in tokens):
            return None
        sizes = [n * t // total for t in tokens]
    bounds = list(itertools.accumulate(sizes, initial=0))  # [rows + 1]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _row_seed(salt: str, seed: int, units: torch.Tensor) -> int:
    """A 63-bit generator seed from ``salt``, ``seed`` and the bytes of ``units``."""
    digest = hashlib.sha256(f"{salt}:{seed}:".encode())
    digest.update(units.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
