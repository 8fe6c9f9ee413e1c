"""The one attention function halludec registers with transformers, and its mask function.

Registered once, process-wide, as ``"halludec"`` in ``AttentionInterface`` and ``AttentionMaskInterface``
(without a registered mask function transformers silently passes ``attention_mask=None`` and padded rows attend
to padding). The mask function is transformers' own ``sdpa_mask``, so layers a strategy does not touch receive
exactly the masks sdpa receives and fall through to ``sdpa_attention_forward`` unchanged.

In a steered layer the function computes attention explicitly in float32 for the rows the strategies need
(``"all"`` query rows, or only the ``"last"`` one with sdpa for the rest), runs the strategies' score and
probability edits in composition order, then their per-head output edits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from halludec.decoding.base import Strategy
from halludec.decoding.context import CallContext, LayerContext, LayerPlan

ATTN_NAME = "halludec"
CONTROLLER_ATTR = "_halludec_call"
"""Attribute set on each steered text attention module for the duration of one call."""
RECORD_ATTR = "_halludec_record"
"""Attribute holding a list: when set on an attention module, its probabilities ``[B, H, q, K]`` are appended."""


def halludec_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention with per-layer strategy edits; sdpa wherever nothing is steered.

    Args:
        module: The attention module (``layer_idx``, ``num_key_value_groups``, ``scaling``).
        query: ``[B, H, q, d]`` (RoPE applied).
        key: ``[B, Hkv, K, d]`` (cache already updated).
        value: ``[B, Hkv, K, d]``.
        attention_mask: ``[B, 1, q, K]`` bool (True = attend), float additive, or None (plain causal).
        **kwargs: ``scaling``, ``dropout``, ``softcap``, ``sliding_window`` and model-specific extras.

    Returns:
        ``(out [B, q, H, d], None)``.
    """
    record: list | None = getattr(module, RECORD_ATTR, None)
    if record is not None:  # reading attention maps (e.g. of the vision tower): eager, probabilities kept
        out, probs = eager_attention(module, query, key, value, attention_mask, None, keep_probs=True, **kwargs)
        record.append(probs)
        return out, None
    call: CallContext | None = getattr(module, CONTROLLER_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    plan = None if call is None or layer is None or call.suspended else call.plans.get(layer)
    if plan is None:
        return _plain(module, query, key, value, attention_mask, **kwargs)
    n_main = call.main_rows(query.shape[0])
    if n_main == query.shape[0]:
        return eager_attention(module, query, key, value, attention_mask, (call, plan), **kwargs)
    # Side-branch rows ride in the same forward: steer the main rows only.
    main, _ = eager_attention(module, *_rows(n_main, None, query, key, value, attention_mask), (call, plan), **kwargs)
    side, _ = _plain(module, *_rows(n_main, 1, query, key, value, attention_mask), **kwargs)
    return torch.cat([main, side]), None  # [B_all, q, H, d]


def _plain(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Unsteered attention: sdpa, or explicit eager where sdpa cannot serve (softcap)."""
    if kwargs.get("softcap") is not None:
        return eager_attention(module, query, key, value, attention_mask, None, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _rows(n_main: int, part: int | None, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Main rows (``part=None``) or side rows of each tensor; a mask broadcast over rows is kept whole."""
    out = []
    for t in tensors:
        if t is None or t.shape[0] == 1:
            out.append(t)
        else:
            out.append(t[:n_main] if part is None else t[n_main:])
    return out


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    steering: tuple[CallContext, LayerPlan] | None,
    scaling: float | None = None,
    softcap: float | None = None,
    keep_probs: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit float32 attention, with the strategy edits of ``steering`` (None: plain eager).

    Returns ``(out [B, q, H, d], probs [B, H, q, K] when keep_probs else None)``.
    """
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    bsz, _, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    call, plan = steering if steering is not None else (None, None)
    ctx = LayerContext(call, module, q_len, kv_len, bsz, value) if call is not None else None
    probs = None
    if plan is not None and plan.prob_strategies:
        start = _start_row(plan.rows, q_len)
        if start > 0 and softcap is None:
            # sdpa for every row, then rows start.. (the last one, or a strategy's range) recomputed and replaced.
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, is_causal=causal, **kwargs
            )
            ctx.q_start = start
            mask = _from_row(attention_mask, start)
            tail, _ = _attend(module, query[:, :, start:], key, value, mask, ctx, plan, scaling)
            out = torch.cat([out[:, :start], tail], dim=1)  # [B, q, H, d]
        else:
            out, probs = _attend(module, query, key, value, attention_mask, ctx, plan, scaling, softcap, causal)
    elif plan is None or softcap is not None:
        out, probs = _attend(module, query, key, value, attention_mask, None, None, scaling, softcap, causal)
    else:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=causal, **kwargs
        )
    if plan is not None:
        for strategy in plan.head_strategies:
            out = strategy.edit_head_outputs(out, ctx)
    return out, (probs if keep_probs else None)


def _start_row(rows: str | int, q_len: int) -> int:
    """First query row computed explicitly: 0 for ``"all"`` (and single-row calls), ``q_len - 1`` for ``"last"``."""
    if q_len <= 1 or rows == "all":
        return 0
    if rows == "last":
        return q_len - 1
    return min(int(rows), q_len - 1)


def _from_row(mask: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """The mask rows of query rows ``start..``; a mask broadcast over query rows is kept whole."""
    if mask is None or mask.shape[2] == 1:
        return mask
    return mask[:, :, start:]  # [B, 1, q - start, K]


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    ctx: LayerContext | None,
    plan: LayerPlan | None,
    scaling: float,
    softcap: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 softmax attention of ``query`` rows against all keys; returns ``(out [B, q, H, d], probs)``."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    q = query.float()  # [B, H, q, d]
    k = repeat_kv(key, n_rep).float()  # [B, H, K, d]
    v = repeat_kv(value, n_rep).float()  # [B, H, K, d]
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B, H, q, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = apply_mask(scores, mask, causal)
    strategies = plan.prob_strategies if plan is not None else []
    if any(type(s).edit_scores is not Strategy.edit_scores for s in strategies):
        low = torch.finfo(scores.dtype).min
        blocked = scores == low  # [B, H, q, K]: masked keys (padding, causal, outside a sliding window)
        for strategy in strategies:
            scores = strategy.edit_scores(scores, ctx)
        scores = scores.masked_fill(blocked, low)  # an edit never un-masks a key
    probs = torch.softmax(scores, dim=-1)  # [B, H, q, K]
    for strategy in strategies:
        probs = strategy.edit_probs(probs, ctx)
    out = torch.matmul(probs, v)  # [B, H, q, d]
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs  # [B, q, H, d], [B, H, q, K]


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool = True) -> torch.Tensor:
    """Apply a transformers attention mask to float32 scores ``[B, H, q, K]``.

    Args:
        scores: Scaled ``QK^T``.
        mask: bool ``[B|1, 1, q, K]`` (True = attend), additive float of that shape, or None, meaning plain
            causal attention where the ``q`` rows are the last ``q`` positions of the ``K`` keys.
        causal: With ``mask=None``: False means no masking at all (bidirectional encoders).

    Returns:
        Masked scores; masked entries hold ``finfo(float32).min`` (never -inf, so fully masked pad rows give a
        uniform row instead of NaN).
    """
    low = torch.finfo(scores.dtype).min
    if mask is None and not causal:
        return scores
    if mask is None:
        q_len, kv_len = scores.shape[-2:]
        rows = torch.arange(q_len, device=scores.device)[:, None] + (kv_len - q_len)  # [q, 1]
        allowed = torch.arange(kv_len, device=scores.device)[None, :] <= rows  # [q, K]
        return scores.masked_fill(~allowed, low)
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, low)
    return (scores + mask.float()).clamp_min(low)


def register() -> None:
    """Register the attention and mask functions under ``"halludec"`` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, halludec_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


register()
