"""Head-scoring criteria: each maps a batch to per-row head scores ``[B, num_layers, num_heads]`` (float32).

Which criterion to use when:

- ``vhd`` (vision-aware head divergence, VHR): ``||o_h(image) - o_h(no image)||`` of each head's output at the last
  prompt position. Use it to find heads that *respond to the image's presence*, e.g. a fixed head set for VHR
  (``vhr`` with ``profile=``). Cost: one prefill of ``2B`` rows (prompt and image-free prompt in lockstep).
- ``image_attention``: the share of the last query row's attention that lands on image tokens. Use it to find heads
  that *look at the image* when predicting the next token, e.g. to restrict attention boosts (``paint`` with
  ``profile=``). Cost: one prefill with the last row's attention explicit in every layer.
- ``image_centric`` (VAR): the share of the last row's attention on *non-sink* image tokens. Use it instead of
  ``image_attention`` on real checkpoints, whose image attention is dominated by a few sink tokens (massive
  activations): it keeps the heads that read image content. Needs sink dimensions (given, the backbone's
  confirmed constants, or found by :func:`halludec.decoding.sinks.find_sink_dimensions`); where none are found
  there are no sinks and it equals ``image_attention`` (with a warning). Cost: as ``image_attention`` (+ one
  finder prefill when the dimensions must be found).
- ``visual_sensitivity``: ``||o_h(image) - o_h(noised image)||`` at the last position, with VCD's diffusion noise
  (``adapter.noised_image_inputs``). Use it to find heads that depend on the image's *content* rather than its
  presence (the image-free prompt of ``vhd`` also shifts every position). Cost: two prefills.

Every criterion runs no-grad prefills only, restores the model (hooks and attention implementation), and works on
left-padded batches row by row. Register another with ``@CRITERIA.register("name")``: a function
``(model, inputs, adapter, **options) -> Tensor[B, num_layers, num_heads]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from halludec.decoding.apply import apply
from halludec.decoding.base import Strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.sinks import DEFAULT_TAU, find_sink_dimensions, known_sink_dims, sink_mask
from halludec.decoding.vhd import head_divergence, lockstep_prefill
from halludec.registry import Registry
from halludec.vlm_adapters import VLMAdapter

Criterion = Callable[..., torch.Tensor]
"""``(model, inputs, adapter, **options) -> Tensor[B, num_layers, num_heads]`` (float32)."""

CRITERIA: Registry[Criterion] = Registry(
    "head criterion",
    hint="List them with halludec.heads.CRITERIA.names(); add one with @halludec.heads.CRITERIA.register('name').",
)


@CRITERIA.register("vhd")
def vhd(model: nn.Module, inputs: Mapping[str, Any], adapter: VLMAdapter) -> torch.Tensor:
    """Raw VHD at step 0 in every layer (no reinforcement): VHR's quantity, from the same lockstep pass.

    Args:
        model: The model.
        inputs: Model inputs with images, ``B`` rows (left padding allowed).
        adapter: Its adapter.

    Returns:
        ``[B, num_layers, num_heads]``: ``||o_full - o_text||_2`` per head at the last prompt position.
    """
    per_layer: dict[int, torch.Tensor] = {}

    def on_layer(layer: int, o_full: torch.Tensor, o_text: torch.Tensor) -> None:
        per_layer[layer] = head_divergence(o_full, o_text)[0]  # [B, H]

    n_layers = adapter.dims.num_layers
    lockstep_prefill(model, adapter, inputs, range(n_layers), on_layer)
    return torch.stack([per_layer[layer] for layer in range(n_layers)], dim=1)  # [B, L, H]


class _LastRowRecorder(Strategy):
    """Reads (never edits) the last query row's attention in every layer; optionally tracks sink tokens.

    A call-scoped strategy for ``halludec.decoding.apply``: the attention function computes the last row's
    probabilities explicitly in float32 and hands them to :meth:`edit_probs`, which stores per-head image shares.

    Args:
        layers: Decoder layers to read.
        sink_dims: Sink dimensions; when non-empty, decoder-layer pre-hooks mark sink tokens (VAR's test) and the
            non-sink image share is recorded too.
        tau: Sink threshold on ``|x/RMS(x)|``.
    """

    name = "heads_recorder"
    attention_rows = "last"

    def __init__(self, layers: range, sink_dims: tuple[int, ...] = (), tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        self.layers = layers
        self.sink_dims = sink_dims
        self.tau = tau
        self.visual: dict[int, torch.Tensor] = {}  # layer -> [B, H]
        self.nonsink: dict[int, torch.Tensor] = {}  # layer -> [B, H]
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> [B, L] bool

    def prepare(self, call: CallContext) -> None:
        if not self.sink_dims:
            return
        for layer in self.layers:
            call.register_hook(call.adapter.layers[layer], self._sink_hook(call, layer), with_kwargs=True)

    def _sink_hook(self, call: CallContext, layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None and hidden.dim() == 3 and hidden.shape[:2] == call.input_ids.shape:
                self.sinks[layer] = sink_mask(hidden, self.sink_dims, self.tau, call.attention_mask)  # [B, L]

        return hook

    def attention_layers(self, call: CallContext) -> set[int]:
        return set(self.layers)

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        last = probs[:, :, -1].float()  # [B, H, K]
        image = ctx.image_keys()  # [B, K] bool
        self.visual[ctx.layer_idx] = (last * image[:, None, :].to(last.dtype)).sum(-1)  # [B, H]
        sinks = self.sinks.get(ctx.layer_idx)
        if sinks is not None:
            nonsink = image & ~ctx.keys(sinks)  # [B, K]
            self.nonsink[ctx.layer_idx] = (last * nonsink[:, None, :].to(last.dtype)).sum(-1)  # [B, H]
        return probs


def _prefill(model: nn.Module, adapter: VLMAdapter, inputs: Mapping[str, Any]) -> None:
    """One no-grad prefill with the position ids ``generate`` would build (left padding, mrope)."""
    batch = {k: v for k, v in inputs.items() if k not in ("use_cache", "position_ids")}
    with torch.no_grad():
        model(**batch, position_ids=adapter.position_ids_for(inputs), use_cache=False, logits_to_keep=1)


def _record(model: nn.Module, inputs: Mapping[str, Any], adapter: VLMAdapter, recorder: _LastRowRecorder) -> None:
    with apply(model, recorder, inputs, adapter=adapter):
        _prefill(model, adapter, inputs)


@CRITERIA.register("image_attention")
def image_attention(model: nn.Module, inputs: Mapping[str, Any], adapter: VLMAdapter) -> torch.Tensor:
    """Share of the last query row's attention on image tokens, per head.

    Args:
        model: The model.
        inputs: Model inputs with images.
        adapter: Its adapter.

    Returns:
        ``[B, num_layers, num_heads]`` in ``[0, 1]``.
    """
    n_layers = adapter.dims.num_layers
    recorder = _LastRowRecorder(range(n_layers))
    _record(model, inputs, adapter, recorder)
    return torch.stack([recorder.visual[layer] for layer in range(n_layers)], dim=1)  # [B, L, H]


@CRITERIA.register("image_centric")
def image_centric(
    model: nn.Module,
    inputs: Mapping[str, Any],
    adapter: VLMAdapter,
    sink_dims: tuple[int, ...] | list[int] | None = None,
    sink_tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """VAR's non-sink visual share: the last row's attention on image tokens that are not sinks, per head.

    A token is a sink in a layer when ``max_{d in sink_dims} |x/RMS(x)|`` of the residual stream entering that layer
    exceeds ``sink_tau`` (VAR's test, :func:`halludec.decoding.sinks.sink_mask`).

    Args:
        model: The model.
        inputs: Model inputs with images.
        adapter: Its adapter.
        sink_dims: Sink dimensions; None = the backbone's confirmed constants, else the finder on ``inputs``.
        sink_tau: Sink threshold (VAR: 20).

    Returns:
        ``[B, num_layers, num_heads]`` in ``[0, 1]``; equal to ``image_attention`` where there are no sinks.
    """
    dims = _sink_dims(model, inputs, adapter, sink_dims, sink_tau)
    n_layers = adapter.dims.num_layers
    recorder = _LastRowRecorder(range(n_layers), dims, sink_tau)
    _record(model, inputs, adapter, recorder)
    table = recorder.nonsink if dims else recorder.visual
    return torch.stack([table[layer] for layer in range(n_layers)], dim=1)  # [B, L, H]


def _sink_dims(
    model: nn.Module,
    inputs: Mapping[str, Any],
    adapter: VLMAdapter,
    sink_dims: tuple[int, ...] | list[int] | None,
    tau: float,
) -> tuple[int, ...]:
    """Given dims (checked), else confirmed constants, else the finder; empty (with a warning) when none."""
    hidden = adapter.dims.hidden_size
    if sink_dims is not None:
        dims = tuple(sink_dims)
        bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < hidden]
        if not dims or bad:
            raise ValueError(
                f"sink_dims={sink_dims!r} is invalid; allowed: a non-empty list of hidden-dimension indices in "
                f"0..{hidden - 1}, or None to use the backbone's constants or the finder."
            )
        return dims
    known = known_sink_dims(model)
    if known is not None and known.status == "confirmed":
        return known.dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said below, in this criterion's terms
        found = tuple(find_sink_dimensions(model, inputs, tau, adapter).dims)
    if not found:
        warnings.warn(
            f"image_centric: no sink dimensions found for this model at sink_tau={tau} (no massive activations), "
            "so there are no sink tokens and the scores equal image_attention. Pass sink_dims=[...] to set them.",
            stacklevel=3,
        )
    return found


@CRITERIA.register("visual_sensitivity")
def visual_sensitivity(
    model: nn.Module,
    inputs: Mapping[str, Any],
    adapter: VLMAdapter,
    noise_step: int = 500,
    seed: int = 0,
) -> torch.Tensor:
    """Change of each head's output at the last position when the image is replaced by its noised copy.

    Args:
        model: The model.
        inputs: Model inputs with ``pixel_values``.
        adapter: Its adapter.
        noise_step: VCD diffusion step of the noise (0..999; 500 as VCD).
        seed: Seed of the noise (the same noise for the same inputs and seed).

    Returns:
        ``[B, num_layers, num_heads]``: ``||o_clean - o_noised||_2`` per head.
    """
    generator = torch.Generator().manual_seed(seed)
    noised = adapter.noised_image_inputs(inputs, noise_step=noise_step, generator=generator)
    clean = _head_outputs(model, adapter, inputs)  # [B, L, H, d]
    dirty = _head_outputs(model, adapter, noised)  # [B, L, H, d]
    return (clean - dirty).norm(dim=-1)  # [B, L, H]


def _head_outputs(model: nn.Module, adapter: VLMAdapter, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Per-head outputs (``o_proj`` inputs) at the last position of every layer, ``[B, L, H, d]`` float32."""
    n_layers, heads = adapter.dims.num_layers, adapter.dims.num_heads
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, q, H*d]
            seen[layer] = x[:, -1].float().view(x.shape[0], heads, -1)  # [B, H, d]

        return hook

    handles = [adapter.o_proj(layer).register_forward_pre_hook(grab(layer)) for layer in range(n_layers)]
    try:
        _prefill(model, adapter, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([seen[layer] for layer in range(n_layers)], dim=1)  # [B, L, H, d]
