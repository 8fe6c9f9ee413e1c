"""GIFT's tensor math (Stage A: saliency from gaze shifts; Stage B: enhancement of one query row).

Pure, vectorised per batch row, float32, compile-friendly (no host syncs, no branching on values); used by
``halludec.decoding.gift`` and tested against hand-computed values. Restated from arXiv 2510.22067 and the
released code's algorithm (``amazon-science/GIFT``, CC BY-NC 4.0), not copied.
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-30


def head_mask(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """``[B, H]`` float mask of the top ``max(1, floor(frac * H))`` heads of ``scores`` ``[B, H]`` per row."""
    k = max(1, math.floor(frac * scores.shape[1]))
    top = torch.topk(scores, k, dim=1).indices  # [B, k]
    return torch.zeros_like(scores).scatter(1, top, 1.0)  # [B, H]


def gaze_shifts(
    probs: torch.Tensor, rows: torch.Tensor, visual: torch.Tensor, lo: int, hi: int, head_frac: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage A for one layer: summed positive attention shifts on visual keys over the top heads.

    Args:
        probs: ``[B, H, Q, K]`` attention probabilities of all prompt rows (float32).
        rows: ``[B, Q]`` float, 1 on the informative query rows ``i`` (shift ``A[i] - A[i-1]``), else 0.
        visual: ``[B, K]`` float, 1 on the visual keys.
        lo: First row that may be informative (``>= 1``); rows ``lo - 1 .. hi - 1`` are read.
        hi: One past the last row that may be informative.
        head_frac: Fraction of heads kept (largest total shift, per row).

    Returns:
        ``(shift [B, K], total [B])``: per key the shift summed over the kept heads and informative rows, and the
        total shift over all heads (used by ``saliency_layers="auto"``).
    """
    window = probs[:, :, lo - 1 : hi].float()  # [B, H, R + 1, K]
    shift = (window[:, :, 1:] - window[:, :, :-1]).clamp_min(0.0)  # [B, H, R, K]
    shift = shift * rows[:, None, lo:hi, None] * visual[:, None, None, :]  # [B, H, R, K]
    per_head = shift.sum(dim=(2, 3))  # [B, H]
    kept = head_mask(per_head, head_frac)  # [B, H]
    return (shift * kept[:, :, None, None]).sum(dim=(1, 2)), per_head.sum(dim=1)  # [B, K], [B]


def saliency_log_gains(
    shift: torch.Tensor, image_id: torch.Tensor, n_images: int, alpha: float, clip_sigma: float
) -> torch.Tensor:
    """``log G = alpha * s``: per image, the clamped and min-max normalised mean shift (0 off the images).

    Args:
        shift: ``[B, K]`` mean positive shift per key.
        image_id: ``[B, K]`` long, ``j + 1`` on the keys of image ``j`` of the row, 0 elsewhere.
        n_images: Most images in a row (a static bound).
        alpha: Gain exponent.
        clip_sigma: Clamp to mean +- clip_sigma * std (unbiased) of each image's values.

    Returns:
        ``[B, K]`` float32; 0 where a key is not visual or an image's map is flat (G = 1, never NaN).
    """
    shift = shift.float()
    slots = torch.arange(1, n_images + 1, device=shift.device)  # [n]
    member = (image_id[:, None, :] == slots[None, :, None]).float()  # [B, n, K]
    count = member.sum(dim=-1)  # [B, n]
    mean = (shift[:, None, :] * member).sum(dim=-1) / count.clamp_min(1.0)  # [B, n]
    dev = (shift[:, None, :] - mean[:, :, None]) ** 2 * member  # [B, n, K]
    std = (dev.sum(dim=-1) / (count - 1.0).clamp_min(1.0)).sqrt()  # [B, n]
    index = (image_id - 1).clamp_min(0)  # [B, K]
    low = torch.gather(mean - clip_sigma * std, 1, index)  # [B, K]
    high = torch.gather(mean + clip_sigma * std, 1, index)  # [B, K]
    clipped = torch.minimum(torch.maximum(shift, low), high)  # [B, K]
    big = torch.finfo(torch.float32).max
    inside = member > 0  # [B, n, K]
    smin = torch.gather(torch.where(inside, clipped[:, None, :], big).amin(dim=-1), 1, index)  # [B, K]
    smax = torch.gather(torch.where(inside, clipped[:, None, :], -big).amax(dim=-1), 1, index)  # [B, K]
    spread = smax - smin
    norm = torch.where(spread > 0, (clipped - smin) / spread.clamp_min(_TINY), torch.zeros_like(clipped))
    return alpha * norm * (image_id > 0).float()


def enhance_last_row(
    probs: torch.Tensor, gain: torch.Tensor, visual: torch.Tensor, query: torch.Tensor, head_frac: float, beta: float
) -> torch.Tensor:
    """Stage B on one query row per batch row.

    Args:
        probs: ``[B, H, K]`` attention probabilities of the last query row (float32).
        gain: ``[B, K]`` saliency gains ``G`` (1 off the images).
        visual: ``[B, K]`` float, 1 on the visual keys.
        query: ``[B, K]`` float, 1 on the question's keys.
        head_frac: Fraction of heads selected (top by visual, resp. question, attention; per row).
        beta: Multiplier of the visual gain ratio ``r`` applied to the question attention.

    Returns:
        ``[B, H, K]``: visual attention of the vision heads times ``G``, question attention of the question heads
        times ``beta * r`` (``r`` = boosted / original visual mass of the vision heads, one scalar per row), rows
        renormalised to sum 1. A new tensor; ``probs`` is not modified.
    """
    probs = probs.float()
    vis = visual[:, None, :]  # [B, 1, K]
    v_heads = head_mask((probs * vis).sum(dim=-1), head_frac)[:, :, None]  # [B, H, 1]
    boosted = probs * (1.0 + v_heads * vis * (gain[:, None, :] - 1.0))  # [B, H, K]
    before = (probs * vis * v_heads).sum(dim=(1, 2))  # [B]
    after = (boosted * vis * v_heads).sum(dim=(1, 2))  # [B]
    ratio = torch.where(before > 0, after / before.clamp_min(_TINY), torch.ones_like(before))  # [B]
    qry = query[:, None, :]  # [B, 1, K]
    q_heads = head_mask((probs * qry).sum(dim=-1), head_frac)[:, :, None]  # [B, H, 1]
    out = boosted * (1.0 + q_heads * qry * (beta * ratio[:, None, None] - 1.0))  # [B, H, K]
    return out / out.sum(dim=-1, keepdim=True).clamp_min(_TINY)
