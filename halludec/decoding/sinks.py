"""Attention-sink tokens and the hidden dimensions that make them ("massive activations").

A few tokens of a decoder's residual stream (BOS, and in vision-language models a few fixed image tokens) carry
huge values in a handful of fixed hidden dimensions inherited from the base LLM; these tokens soak up attention
("attention sinks"). Following VAR (Kang et al., ICLR 2025, arXiv 2503.03321; code ``seilk/VisAttnSink``), a token
``j`` entering layer ``l`` is a sink when ``max_{d in D_sink} |x_j[d] / RMS(x_j)| > tau`` (``tau`` = 20), with the
RMS taken without the learned norm weight.

This module holds what VAR and the head tools share:

- :func:`rms_normalized` and :func:`sink_mask`: the per-token test, as tensors;
- :func:`find_sink_dimensions`: one no-grad prefill that lists sink tokens per layer and the sink dimensions;
- :data:`KNOWN_SINK_DIMS` and :func:`known_sink_dims`: published ``D_sink`` constants, matched by backbone
  structure (never by checkpoint name), each with how far it can be trusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from halludec.vlm_adapters import VLMAdapter, get_adapter

RMS_EPS = 1e-6
DEFAULT_TAU = 20.0

SinkStatus = Literal["confirmed", "unexercised", "unconfirmed", "suspect"]


def rms_normalized(x: torch.Tensor) -> torch.Tensor:
    """``x / RMS(x)`` over the last dimension, in float32, eps 1e-6, without a learned weight.

    Args:
        x: Residual-stream states ``[..., D]`` (any float dtype).

    Returns:
        Float32 tensor of the same shape.
    """
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)  # [..., D]


def sink_mask(
    hidden: torch.Tensor, dims: torch.Tensor | list[int] | tuple[int, ...], tau: float, valid: torch.Tensor | None
) -> torch.Tensor:
    """Which tokens are sinks: ``max_{d in dims} |x/RMS(x)|[d] > tau`` (strict, as the released code).

    Args:
        hidden: Residual stream entering a layer ``[B, T, D]`` (before its input norm).
        dims: The sink dimensions (indices into ``D``), non-empty.
        tau: Threshold.
        valid: ``[B, T]`` bool/0-1 mask of real (non-padding) tokens, or None; padding is never a sink.

    Returns:
        ``[B, T]`` bool.
    """
    idx = torch.as_tensor(dims, dtype=torch.long, device=hidden.device)
    phi = rms_normalized(hidden).index_select(-1, idx).abs().amax(dim=-1)  # [B, T]
    out = phi > tau
    if valid is not None:
        out = out & valid.to(device=hidden.device, dtype=torch.bool)
    return out


@dataclass
class SinkReport:
    """What :func:`find_sink_dimensions` found.

    Attributes:
        dims: Sink dimensions: those where the first (non-pad) token exceeds ``tau`` in at least half of the
            (layer >= ``first_layer``, row) pairs; sorted; empty when none.
        sink_tokens: ``{layer: [[positions of row 0], [positions of row 1], ...]}``: tokens whose ``|x/RMS(x)|``
            exceeds ``tau`` in some dimension, in the residual stream entering the layer (padded positions index
            the left-padded row; padding is never listed).
    """

    dims: list[int] = field(default_factory=list)
    sink_tokens: dict[int, list[list[int]]] = field(default_factory=dict)


def find_sink_dimensions(
    model: nn.Module,
    inputs: Mapping[str, Any],
    tau: float = DEFAULT_TAU,
    adapter: VLMAdapter | None = None,
    first_layer: int = 2,
) -> SinkReport:
    """Find sink tokens and the massive-activation dimensions of ``model`` with one no-grad prefill of ``inputs``.

    Forward pre-hooks on every decoder layer read the residual stream entering it (before ``input_layernorm``);
    they are removed when the pass ends, also on error. Nothing else about the model changes.

    Args:
        model: A loaded vision-language model.
        inputs: Model inputs (``input_ids`` ``[B, L]``, ``attention_mask``, image tensors); left padding allowed.
        tau: Threshold on ``|x/RMS(x)|`` (VAR uses 20).
        adapter: Override the model's adapter.
        first_layer: Layers from which the dimension vote counts (VAR: 2).

    Returns:
        A :class:`SinkReport`. When no dimension qualifies, ``dims`` is empty and a warning says so.
    """
    if not tau > 0:
        raise ValueError(f"tau={tau!r} is invalid; allowed: a number > 0 (VAR uses 20).")
    adapter = adapter or get_adapter(model)
    ids = inputs["input_ids"]  # [B, L]
    am = inputs.get("attention_mask")
    valid = (torch.ones_like(ids) if am is None else am).bool()  # [B, L]
    first = valid.long().argmax(dim=-1)  # [B] first real token of each row (left padding)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reader(layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
                return
            big = rms_normalized(hidden).abs() > tau  # [B, L, D]
            tokens = big.any(dim=-1) & valid.to(hidden.device)  # [B, L]
            rows = torch.arange(ids.shape[0], device=hidden.device)
            at_first = big[rows, first.to(hidden.device)]  # [B, D]
            seen[layer] = (tokens.cpu(), at_first.cpu())

        return hook

    handles = [layer.register_forward_pre_hook(reader(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "use_cache"}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    sink_tokens = {
        layer: [torch.nonzero(row).flatten().tolist() for row in tokens] for layer, (tokens, _) in sorted(seen.items())
    }
    votes = [at_first for layer, (_, at_first) in seen.items() if layer >= first_layer]
    dims: list[int] = []
    if votes:
        hits = torch.cat([v.cpu() for v in votes]).float().mean(dim=0)  # [D] fraction of (layer, row) pairs over tau
        dims = torch.nonzero(hits >= 0.5).flatten().tolist()
    if not dims:
        warnings.warn(
            f"find_sink_dimensions found no hidden dimension where the first token's |x/RMS(x)| exceeds tau={tau} "
            f"in at least half the layers >= {first_layer} ({adapter.dims.num_layers} layers); this model shows no "
            "massive activations at this threshold (random or very small models do not).",
            stacklevel=2,
        )
    return SinkReport(dims=dims, sink_tokens=sink_tokens)


# --------------------------------------------------------------------------- known constants
@dataclass(frozen=True)
class BackboneShape:
    """A structural description of a base LLM, matched against a model's text config.

    Attributes:
        text_model_types: Accepted ``text_config.model_type`` values.
        hidden_size: Residual-stream width.
        num_layers: Decoder layers.
        intermediate_size: MLP width (separates e.g. LLaMA-2-7B from Llama-3-8B and Mistral-7B).
    """

    text_model_types: tuple[str, ...]
    hidden_size: int
    num_layers: int
    intermediate_size: int

    def matches(self, text_config: Any) -> bool:
        """Whether ``text_config`` has this structure."""
        return (
            getattr(text_config, "model_type", None) in self.text_model_types
            and getattr(text_config, "hidden_size", None) == self.hidden_size
            and getattr(text_config, "num_hidden_layers", None) == self.num_layers
            and getattr(text_config, "intermediate_size", None) == self.intermediate_size
        )


@dataclass(frozen=True)
class KnownSinkDims:
    """Published sink dimensions of one backbone.

    Attributes:
        backbone: Human-readable name of the base LLM.
        dims: The dimensions.
        status: ``"confirmed"`` (used by the released code), ``"unexercised"`` (in the released code but never
            used by its pipeline), ``"unconfirmed"`` (from paper notes only), ``"suspect"`` (unconfirmed and
            implausible). Anything but ``"confirmed"`` is a hint: VAR prefers the finder there.
        source: Where the value comes from.
    """

    backbone: str
    dims: tuple[int, ...]
    status: SinkStatus
    source: str


KNOWN_SINK_DIMS: dict[BackboneShape, KnownSinkDims] = {
    BackboneShape(("llama",), 4096, 32, 11008): KnownSinkDims(
        "LLaMA-2-7B (LLaVA-1.5-7B, LLaVA-1.6-Vicuna-7B)",
        (1415, 2533),
        "confirmed",
        "seilk/VisAttnSink:src/logic/constants.py (used by the released pipeline)",
    ),
    BackboneShape(("llama",), 5120, 40, 13824): KnownSinkDims(
        "LLaMA-2-13B (LLaVA-1.5-13B, LLaVA-1.6-Vicuna-13B)",
        (2100, 4743),
        "unexercised",
        "seilk/VisAttnSink:src/logic/constants.py (never used: the pipeline hard-codes llama-v2-7b)",
    ),
    BackboneShape(("qwen2_vl_text", "qwen2_vl"), 3584, 28, 18944): KnownSinkDims(
        "Qwen2-7B (Qwen2-VL-7B)",
        (458, 2570),
        "unconfirmed",
        "third-party notes on arXiv 2503.03321; not in the released code",
    ),
    BackboneShape(("internlm2",), 4096, 32, 14336): KnownSinkDims(
        "InternLM2.5-7B (InternVL2-8B)",
        (3584,),
        "suspect",
        "third-party notes on arXiv 2503.03321; not in the released code (3584 is Qwen2-7B's hidden size)",
    ),
}
"""Sink dimensions per backbone structure (methods.md §1.3 and §11)."""


def known_sink_dims(model_or_config: Any) -> KnownSinkDims | None:
    """The published sink dimensions matching a model's text backbone, or None.

    Args:
        model_or_config: A model, its config, or its text config.

    Returns:
        The matching :class:`KnownSinkDims` entry (check ``status``), or None.
    """
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for shape, known in KNOWN_SINK_DIMS.items():
        if shape.matches(text):
            return known
    return None
