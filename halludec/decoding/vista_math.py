"""VISTA's math: the visual steering vectors, the steering rule and self-logits augmentation (SLA).

Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via Visual
Information Steering", ICML 2025, https://arxiv.org/abs/2502.03628 (official code ``LzVv123456/VISTA``:
``steering_vector.py``, ``llm_layers.py::VSVLayer``, ``llava/model/language_model/llava_llama.py``).
Pure functions on tensors, used by ``halludec.decoding.vista`` and tested on synthetic numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from halludec.vlm_adapters import VLMAdapter

_EPS = 1e-12  # F.normalize's default
MIN_RELATIVE_DIFF = 1e-3
"""A steering difference below this share of the state's norm is treated as zero (rounding noise)."""


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer (or MLP) returned: the tensor itself or the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def last_token_states(
    model: nn.Module, adapter: VLMAdapter, inputs: Mapping[str, Any], layers: Iterable[int]
) -> dict[int, torch.Tensor]:
    """One unsteered prefill of ``inputs``; each layer's output (residual stream) at the last position.

    The last position is the last prompt token of every row, since rows are left-padded. Position ids are passed
    explicitly (left padding, Qwen's mrope), as ``generate`` builds them.

    Args:
        model: The model.
        adapter: Its adapter.
        inputs: Model inputs, ``B`` rows, left-padded.
        layers: Decoder layers whose output is read.

    Returns:
        ``{layer: [B, D] float32}``.
    """
    states: dict[int, torch.Tensor] = {}

    def reader(layer: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            states[layer] = layer_output(output)[:, -1].float()  # [B, D]

        return hook

    handles = [adapter.layers[layer].register_forward_hook(reader(layer)) for layer in sorted(set(layers))]
    try:
        kwargs = {k: v for k, v in inputs.items() if k not in ("position_ids", "cache_position")}
        model(**kwargs, position_ids=adapter.position_ids_for(inputs), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return states


def steering_directions(
    positive: Mapping[int, torch.Tensor],
    negative: Mapping[int, torch.Tensor],
    pca_offset: bool = False,
    min_relative_diff: float = MIN_RELATIVE_DIFF,
) -> dict[int, torch.Tensor]:
    """Per layer, the unit visual steering vector ``normalize(v_pos - v_neg)`` of every row (paper Eq. 4).

    A difference below ``min_relative_diff * ||v_pos||`` is rounding noise, not visual information (e.g. a
    sliding-window layer whose window at the last token holds no image token): that row's vector is zero, so the
    layer is left as it is instead of being pushed along the direction of the noise.

    Args:
        positive: ``{layer: [B, D]}`` last-token states of the prompt with the image.
        negative: ``{layer: [B, D]}`` the same without the image.
        pca_offset: Add 1 to the first coordinate of layer 0's difference before normalising, as the released
            code's rank-1 PCA of a single sample does (``components_`` of an all-zero centred matrix is ``e_0``).
        min_relative_diff: The noise floor, relative to the norm of the positive state.

    Returns:
        ``{layer: [B, D] float32}`` unit vectors, or zero rows.
    """
    out: dict[int, torch.Tensor] = {}
    for layer, pos in positive.items():
        diff = pos.float() - negative[layer].float()  # [B, D]
        noise = diff.norm(dim=-1, keepdim=True) <= min_relative_diff * pos.float().norm(dim=-1, keepdim=True)
        diff = diff.masked_fill(noise, 0.0)  # [B, D]
        if pca_offset and layer == 0:
            diff[:, 0] += 1.0
        out[layer] = F.normalize(diff, dim=-1)
    return out


def steer(x: torch.Tensor, direction: torch.Tensor, lam: float, similarity_gain: bool = True) -> torch.Tensor:
    """The released ``VSVLayer`` rule: rotate ``x`` towards the steering direction, keeping its norm.

    ``x' = ||x|| * normalize(normalize(x) + lam * g * v)`` with ``g = 1 + max(0, cos(x, -v))`` (more push where
    ``x`` points away from ``v``) or ``g = 1`` without the similarity gain (the code's ``simple_mode``).

    Args:
        x: ``[B, q, D]`` hidden states (any float dtype).
        direction: ``[B, D]`` unit (or zero) steering vectors, one per row of ``x``.
        lam: Steering strength ``lambda``.
        similarity_gain: Use the similarity gain ``g``.

    Returns:
        ``[B, q, D]`` float32; ``x`` is not modified.
    """
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # [B, q, 1]
    unit = xf / norm.clamp_min(_EPS)  # [B, q, D] (F.normalize)
    v = direction.float()[:, None, :]  # [B, 1, D] unit (or zero)
    if similarity_gain:
        cos = -(unit * v).sum(dim=-1, keepdim=True)  # [B, q, 1] cos(x, -v) for a unit v
        steered = unit + (lam * (1.0 + cos.clamp_min(0.0))) * v  # [B, q, D]
    else:
        steered = unit + lam * v  # [B, q, D]
    return steered / torch.linalg.vector_norm(steered, dim=-1, keepdim=True).clamp_min(_EPS) * norm


def sla_window(num_layers: int, window: int) -> tuple[int, ...]:
    """The ``window`` layers right before the last one: ``L-1-w .. L-2`` (0-based; paper Eq. 7), clipped at 0.

    Args:
        num_layers: Decoder layers ``L``.
        window: ``w``.

    Returns:
        Sorted layer indices (``(26, ..., 30)`` for ``L = 32, w = 5``).
    """
    return tuple(range(max(0, num_layers - 1 - window), num_layers - 1))


def sla_hidden(
    final: torch.Tensor, early: torch.Tensor, gamma: float, norm: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """SLA (paper Eq. 7-8) before the LM head: the hidden state whose head output is the mixed logits.

    The head ``W`` is linear (``W x + b``), so ``(1 - gamma) * W(n_L) + gamma * mean_l W(N(h_l))`` equals
    ``W((1 - gamma) * n_L + gamma * mean_l N(h_l))``: mixing the final norm's output with the mean of the early
    layers' normed states gives the paper's logits with no extra head matmul. (On heads followed by a final-logit
    softcap, the mix then comes before the softcap.)

    Args:
        final: ``[B, D]`` the final norm's output ``n_L`` at the position being decoded.
        early: ``[w, B, D]`` the outputs of the SLA layers at that position.
        gamma: Mixing weight.
        norm: The final norm ``N`` applied to the early states (the logit lens), or None for the raw states (the
            released code). Pass a function that does not re-enter hooks (``module.forward``).

    Returns:
        ``[B, D]`` float32; the inputs are not modified.
    """
    x = norm(early) if norm is not None else early  # [w, B, D]
    return (1.0 - gamma) * final.float() + gamma * x.float().mean(dim=0)
