"""Vision-aware head divergence (VHD): shared by VHR and the ``vhd`` head-scoring criterion.

VHD of a head is the distance between its output with and without the image, at the position predicting the next
token (He et al., ACL 2025, https://arxiv.org/abs/2412.13949, Eq. 4). Both branches run in **lockstep**: one
forward over ``[main rows; image-free rows]``, so that at layer ``l`` a callback sees both branches' per-head
outputs (``o_proj`` input) and may rescale heads before later layers run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from halludec.vlm_adapters import VLMAdapter

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]
"""``(layer, o_full [B, H, d], o_text [B, H, d]) -> head scale`` ``[B, H]`` (both branches), ``[2B, H]`` (main rows
then image-free rows) or None (no change)."""


def head_divergence(o_full: torch.Tensor, o_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VHD and text attention energy per head.

    Args:
        o_full: Per-head outputs with the image ``[B, H, d]``.
        o_text: The same without the image ``[B, H, d]``.

    Returns:
        ``(vhd [B, H], ta [B, H])``: ``||o_full - o_text||_2`` and ``||o_text||_2^2`` (float32).
    """
    diff = o_full.float() - o_text.float()  # [B, H, d]
    return diff.norm(dim=-1), o_text.float().pow(2).sum(dim=-1)


def vhr_head_mask(
    vhd: torch.Tensor, ta: torch.Tensor, outlier_filter: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """VHR's per-layer head rule: above-median VHD after zeroing negative-sensitivity outliers (Eq. 6-7).

    Args:
        vhd: ``[B, H]`` divergences of one layer.
        ta: ``[B, H]`` text-branch energies of that layer.
        outlier_filter: Zero VHD where both VHD and TA exceed their mean + std over the heads.
        unbiased: Unbiased (torch default) or population std.

    Returns:
        ``[B, H]`` bool: heads with VHD strictly above the row's median.
    """
    vhd = vhd.float()
    if outlier_filter:
        hi_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=unbiased, keepdim=True)
        hi_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=unbiased, keepdim=True)
        vhd = vhd.masked_fill(hi_vhd & hi_ta, 0.0)
    median = vhd.median(dim=-1, keepdim=True).values  # [B, 1]
    return vhd > median


@torch.no_grad()
def lockstep_prefill(
    model: nn.Module,
    adapter: VLMAdapter,
    inputs: Mapping[str, Any],
    layers: Iterable[int],
    on_layer: LayerCallback,
    text_inputs: Mapping[str, Any] | None = None,
) -> None:
    """One prefill over ``[inputs; image-free inputs]`` calling ``on_layer`` at each layer's ``o_proj`` input.

    The callback may return a per-row head scale (``[B, H]`` for both branches, or ``[2B, H]``); it is applied at all
    positions before
    the layer's output projection, so later layers see the reinforced stream (VHR's layer-by-layer pass).

    Args:
        model: The model.
        adapter: Its adapter.
        inputs: Main inputs (with images), ``B`` rows, left-padded.
        layers: Decoder layers where ``on_layer`` runs.
        on_layer: The callback (see ``LayerCallback``).
        text_inputs: The image-free branch; default ``adapter.text_only_inputs(inputs)``.
    """
    text = adapter.text_only_inputs(inputs) if text_inputs is None else dict(text_inputs)
    batch = _stack_rows(adapter, inputs, text)
    n = inputs["input_ids"].shape[0]
    heads = adapter.dims.num_heads
    handles = []

    def make_hook(layer: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]  # [2B, L, H*d]
            per_head = x.view(*x.shape[:2], heads, -1)  # [2B, L, H, d]
            scale = on_layer(layer, per_head[:n, -1], per_head[n:, -1])
            if scale is None:
                return None
            both = (scale if scale.shape[0] == 2 * n else torch.cat([scale, scale])).to(x.dtype)  # [2B, H]
            return ((per_head * both[:, None, :, None]).view_as(x),)

        return hook

    try:
        for layer in sorted(set(layers)):
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer)))
        model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()


def _stack_rows(adapter: VLMAdapter, main: Mapping[str, Any], text: Mapping[str, Any]) -> dict[str, Any]:
    """``[main; text]`` rows in one left-padded batch; image tensors belong to the main rows' image tokens."""
    length = max(main["input_ids"].shape[1], text["input_ids"].shape[1])
    main, text = left_pad(main, length, adapter.pad_token_id), left_pad(text, length, adapter.pad_token_id)
    out: dict[str, Any] = dict(main)
    for key, value in text.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and isinstance(main.get(key), torch.Tensor):
            out[key] = torch.cat([main[key], value])  # [2B, L_max]
    pos_main, pos_text = adapter.position_ids_for(main), adapter.position_ids_for(text)  # [B, L] or [4, B, L]
    out["position_ids"] = torch.cat([pos_main, pos_text], dim=1 if pos_main.dim() == 3 else 0)
    return out


def left_pad(inputs: Mapping[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """Left-pad every per-token ``[B, L]`` tensor of ``inputs`` to ``length`` (ids with ``pad_id``, others 0).

    Args:
        inputs: Model inputs with ``input_ids`` ``[B, L]``.
        length: Target length ``>= L``.
        pad_id: Padding token id.

    Returns:
        New inputs; an ``attention_mask`` is added when missing.
    """
    ids = inputs["input_ids"]
    out = dict(inputs)
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(ids)
    extra = length - ids.shape[1]
    for key, value in list(out.items()):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            out[key] = F.pad(value, (extra, 0), value=pad_id if key == "input_ids" else 0)  # [B, length]
    return out
