"""VAR: Visual Attention Redistribution ("See What You Are Told: Visual Attention Sink in Large Multimodal Models").

Kang, Kim, Kim, Hwang, ICLR 2025, https://arxiv.org/abs/2503.03321 (official code: seilk/VisAttnSink).

Vision-language models pour attention onto a few "sink" tokens (BOS and a few fixed image tokens) that carry
massive activations in fixed hidden dimensions ``D_sink``. In image-centric attention rows VAR takes part of that
attention away from all sinks and gives it to the non-sink image tokens. Three stages, in layers
``first_layer .. L-2`` (``L-1`` with ``skip_last_layer=False``):

A. **Sinks** (prefill only, frozen afterwards): before each steered layer, token ``j`` of row ``b`` is a sink when
   ``max_{d in D_sink} |x_j[d] / RMS(x_j)| > sink_tau`` on the residual stream entering the layer (RMS without the
   learned weight, float32, eps 1e-6; strict ``>``). Text and image tokens both; padding never.
B. **Image-centric rows**, per (row, head, query), online at every step, on the post-softmax attention ``a``:
   visual mass ``m = sum_{image} a``, sink share ``s = sum_{image sinks} a / sum_{image} (a + 1e-6)``; selected iff
   ``s <= 1 - min_nonsink_ratio`` and ``m >= min_visual_mass`` and the row has image sinks in this layer. At prefill
   only query rows after the row's last image token are eligible; at decode the single row is.
C. **Redistribution** of a selected row: every sink (text and image) keeps ``sink_keep_frac`` of its attention; the
   freed mass ``(1 - sink_keep_frac) * sum_{sinks} a`` goes to the non-sink image tokens in proportion to their
   attention; image sinks get nothing back, other text tokens are untouched, the row sum is preserved.

Conventions (methods.md §1.7): ``sink_keep_frac`` is the released code's ``p`` (kept; the paper's ``p`` is
``1 - sink_keep_frac``); ``min_nonsink_ratio`` is the paper's ``rho`` (the code's max sink share is
``1 - min_nonsink_ratio``). ``D_sink``: ``sink_dims`` if given, else the confirmed constant of the backbone
(:data:`halludec.decoding.sinks.KNOWN_SINK_DIMS`), else :func:`~halludec.decoding.sinks.find_sink_dimensions` on
the call's own prompt (one extra no-grad prefill, once per model: cached by config fingerprint, with a warning).
If no dimension is found VAR warns and leaves attention unchanged.

Head sets (not in the paper, default off): with ``profile=`` (a head profile JSON, e.g. ``halludec heads --criterion
image_centric``) only the profile's top ``profile_k`` share of all heads is redistributed; layers without a profile
head are left alone.

Presets: ``repro`` steers the last layer too (what the released code does); ``general`` (``min_nonsink_ratio``
0.8) and ``vision_centric`` (0.9) are the paper's settings for those benchmark groups (from paper notes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.profile import check_profile_k, check_profile_path, profile_head_mask, profile_path
from halludec.decoding.sinks import find_sink_dimensions, known_sink_dims, sink_mask

_FOUND: dict[tuple[str, str, float], tuple[int, ...]] = {}
"""Finder results per (config fingerprint, name_or_path, tau)."""


def clear_sink_dimension_cache() -> None:
    """Forget the sink dimensions VAR found with the finder (they are cached per model for the process)."""
    _FOUND.clear()


@dataclass
class VARConfig(StrategyConfig):
    """VAR hyperparameters (defaults: the released code, with the last layer skipped as its config intends).

    Attributes:
        sink_tau: Threshold on ``|x/RMS(x)|`` in the sink dimensions (strict ``>``).
        sink_dims: Hidden dimensions ``D_sink``; None = the backbone's confirmed constants, else the finder.
        min_nonsink_ratio: Paper ``rho``: a row is image-centric when at least this share of its visual attention
            is on non-sink image tokens (0.5 hallucination, 0.8 general VL, 0.9 vision-centric).
        min_visual_mass: Minimum total image attention of a selected row (code ``summ``).
        sink_keep_frac: Fraction of sink attention kept (code ``p``; the paper's ``p`` is 1 minus this). 1.0 = off.
        skip_last_layer: Leave the last decoder layer alone (the released config's intent; its code does not).
        first_layer: First steered layer (sinks are detected from layer 2 in the paper).
        profile: Path of a head profile JSON: redistribute only in its top heads; None = every head (the paper).
        profile_k: Share of all heads taken from the profile, in (0, 1].
    """

    sink_tau: float = 20.0
    sink_dims: tuple[int, ...] | None = None
    min_nonsink_ratio: float = 0.5
    min_visual_mass: float = 0.2
    sink_keep_frac: float = 0.6
    skip_last_layer: bool = True
    first_layer: int = 2
    profile: str | None = None
    profile_k: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.sink_dims, list):
            self.sink_dims = tuple(self.sink_dims)
        self.profile = profile_path(self.profile)

    def validate(self) -> None:
        check_range("sink_tau", self.sink_tau, 0.0, None)
        if self.sink_dims is not None:
            dims = self.sink_dims
            ok = isinstance(dims, tuple) and len(dims) > 0
            ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
            if not ok:
                raise ValueError(
                    f"sink_dims={dims!r} is invalid; allowed: None (known constants or the finder) or a non-empty "
                    "tuple of hidden-dimension indices >= 0, e.g. (1415, 2533) for LLaMA-2-7B."
                )
        check_range("min_nonsink_ratio", self.min_nonsink_ratio, 0.0, 1.0)
        check_range("min_visual_mass", self.min_visual_mass, 0.0, 1.0)
        check_range("sink_keep_frac", self.sink_keep_frac, 0.0, 1.0)
        if not isinstance(self.skip_last_layer, bool):
            raise ValueError(f"skip_last_layer={self.skip_last_layer!r} is invalid; allowed: True or False.")
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, int) or self.first_layer < 0:
            raise ValueError(f"first_layer={self.first_layer!r} is invalid; allowed: an integer >= 0 (paper: 2).")
        check_profile_path(self.profile)
        check_profile_k(self.profile_k)


def select_rows(
    probs: torch.Tensor,
    sink_keys: torch.Tensor,
    image_keys: torch.Tensor,
    eligible: torch.Tensor,
    min_nonsink_ratio: float,
    min_visual_mass: float,
) -> torch.Tensor:
    """VAR's image-centric rows (Stage B).

    Args:
        probs: Post-softmax attention ``[B, H, q, K]`` (float32).
        sink_keys: ``[B, K]`` bool, True on sink keys (text and image).
        image_keys: ``[B, K]`` bool, True on image keys.
        eligible: ``[B, q]`` bool, query rows VAR may edit.
        min_nonsink_ratio: Paper ``rho``; rows need ``sink share <= 1 - rho``.
        min_visual_mass: Rows need at least this much attention on image keys.

    Returns:
        ``[B, H, q]`` bool. Rows of a batch row without image sinks, or without non-sink image attention, are never
        selected.
    """
    image = image_keys[:, None, None, :].to(probs.dtype)  # [B, 1, 1, K]
    vis_sink = (sink_keys & image_keys)[:, None, None, :].to(probs.dtype)  # [B, 1, 1, K]
    nonsink_vis = (image_keys & ~sink_keys)[:, None, None, :].to(probs.dtype)  # [B, 1, 1, K]
    mass = (probs * image).sum(-1)  # [B, H, q]
    n_image = image.sum(-1)  # [B, 1, 1]
    share = (probs * vis_sink).sum(-1) / (mass + 1e-6 * n_image).clamp_min(1e-30)  # [B, H, q]
    has_vis_sink = (sink_keys & image_keys).any(-1)[:, None, None]  # [B, 1, 1]
    has_target = (probs * nonsink_vis).sum(-1) > 0  # [B, H, q]
    return (
        (share <= 1.0 - min_nonsink_ratio)
        & (mass >= min_visual_mass)
        & has_vis_sink
        & has_target
        & eligible[:, None, :]
    )


def redistribute(
    probs: torch.Tensor, sink_keys: torch.Tensor, image_keys: torch.Tensor, selected: torch.Tensor, keep: float
) -> torch.Tensor:
    """VAR's redistribution (Stage C) on the selected rows; other rows are returned unchanged.

    Args:
        probs: Post-softmax attention ``[B, H, q, K]`` (float32); not modified.
        sink_keys: ``[B, K]`` bool, True on sink keys (text and image).
        image_keys: ``[B, K]`` bool, True on image keys.
        selected: ``[B, H, q]`` bool, rows to edit (see :func:`select_rows`).
        keep: Fraction of sink attention kept.

    Returns:
        New probabilities: in selected rows sinks scaled by ``keep`` and the freed mass added to non-sink image
        keys in proportion to their attention (row sums preserved).
    """
    sinks = sink_keys[:, None, None, :]  # [B, 1, 1, K]
    nonsink_vis = (image_keys & ~sink_keys)[:, None, None, :].to(probs.dtype)  # [B, 1, 1, K]
    freed = (1.0 - keep) * (probs * sinks.to(probs.dtype)).sum(-1, keepdim=True)  # [B, H, q, 1]
    target = probs * nonsink_vis  # [B, H, q, K]
    weights = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)  # [B, H, q, K]
    edited = torch.where(sinks, probs * keep, probs) + freed * weights  # [B, H, q, K]
    return torch.where(selected[..., None], edited, probs)


@dataclass
class _VARState:
    """Per-call state: where VAR acts and the sink sets found at prefill."""

    layers: set[int] = field(default_factory=set)
    dims: tuple[int, ...] = ()
    source: str = ""
    image_end: torch.Tensor | None = None  # [B] one past each row's last image token
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] bool
    heads: dict[int, torch.Tensor] | None = None  # layer -> [H] bool, with a profile only


@register_strategy("var")
class VAR(Strategy):
    """Move attention from sink tokens to non-sink image tokens in image-centric rows (no extra forward)."""

    config_class = VARConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "repro": {"skip_last_layer": False},
        "general": {"min_nonsink_ratio": 0.8},
        "vision_centric": {"min_nonsink_ratio": 0.9},
    }
    needs_image = True
    attention_rows = "all"
    paper = "https://arxiv.org/abs/2503.03321"

    @classmethod
    def model_defaults(cls, adapter: Any) -> dict[str, Any]:
        """Confirmed published sink dimensions of this backbone (LLaMA-2-7B: 1415, 2533); else the finder decides."""
        known = known_sink_dims(adapter.model)
        return {"sink_dims": tuple(known.dims)} if known is not None and known.status == "confirmed" else {}

    def prepare(self, call: CallContext) -> None:
        state = _VARState()
        call.state[self.state_key] = state
        cfg = self.config
        if cfg.sink_keep_frac == 1.0:  # nothing is ever moved
            return
        n = call.adapter.dims.num_layers
        last = n - 2 if cfg.skip_last_layer else n - 1
        layers = set(range(cfg.first_layer, last + 1))
        if cfg.profile is not None:
            mask = profile_head_mask(cfg.profile, call.adapter, cfg.profile_k)  # [L, H] bool
            state.heads = {i: mask[i].to(call.layer_device(i)) for i in range(mask.shape[0]) if mask[i].any()}
            if layers and not layers & set(state.heads):
                self.warn(
                    f"VAR: the profile {cfg.profile!r} has no head among its top profile_k={cfg.profile_k} in the "
                    f"steered layers {cfg.first_layer}..{last} (its heads are in layers {sorted(state.heads)}); "
                    "raise profile_k or change first_layer. Attention is left unchanged.",
                )
                return
            layers &= set(state.heads)
        if not layers:
            self.warn(
                f"VAR steers layers {cfg.first_layer}..{last} of this {n}-layer model, i.e. none; lower first_layer "
                "or set skip_last_layer=False. Attention is left unchanged.",
            )
            return
        state.dims, state.source = self._sink_dims(call)
        if not state.dims:
            return
        state.layers = layers
        mask = call.image_mask  # [B, L]
        pos = torch.arange(mask.shape[1], device=mask.device)  # [L]
        state.image_end = torch.where(mask, pos + 1, 0).amax(dim=-1)  # [B]
        for layer in sorted(layers):
            call.register_hook(call.adapter.layers[layer], self._sink_hook(call, state, layer), with_kwargs=True)

    def attention_layers(self, call: CallContext) -> set[int]:
        return set(call.state[self.state_key].layers)

    def attention_rows_for(self, layer: int, call: CallContext) -> int:
        """Rows after the earliest last image token of any row: earlier prefill rows are never eligible."""
        state: _VARState = call.state[self.state_key]
        return int(state.image_end.min()) if state.image_end is not None else 0

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        state: _VARState = ctx.call.state[self.state_key]
        sinks = state.sinks.get(ctx.layer_idx)
        if sinks is None:  # no prefill seen (cannot happen in generate); leave attention alone
            return probs
        if ctx.is_prefill:
            qpos = torch.arange(probs.shape[2], device=probs.device) + ctx.q_start  # [q] prompt rows q_start..
            eligible = qpos[None, :] >= ctx.rows(state.image_end)[:, None]  # [B, q]
        else:
            eligible = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)  # [B, q]
        sink_keys = ctx.keys(sinks)  # [B, K]
        image_keys = ctx.image_keys()  # [B, K]
        cfg = self.config
        selected = select_rows(probs, sink_keys, image_keys, eligible, cfg.min_nonsink_ratio, cfg.min_visual_mass)
        if state.heads is not None:
            selected = selected & state.heads[ctx.layer_idx][None, :, None]  # [B, H, q]
        return redistribute(probs, sink_keys, image_keys, selected, cfg.sink_keep_frac)

    # ------------------------------------------------------------------ helpers
    def _sink_hook(self, call: CallContext, state: _VARState, layer: int):
        """Forward pre-hook on decoder layer ``layer``: the sink set of each input row, at prefill only."""
        tau = self.config.sink_tau

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if call.suspended:
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or hidden.dim() != 3 or hidden.shape[1] <= 1 or hidden.shape[1] != call.prompt_len:
                return
            main, rows = call.main_rows(hidden.shape[0]), call.batch_size
            if main % rows:
                return
            x = hidden[: main : main // rows]  # [B, L, D] one copy of each input row (beams repeat rows)
            state.sinks[layer] = sink_mask(x, state.dims, tau, call.attention_mask)

        return hook

    def _sink_dims(self, call: CallContext) -> tuple[tuple[int, ...], str]:
        """``(D_sink, where it came from)``; empty when none could be found (with a warning)."""
        cfg = self.config
        hidden = call.adapter.dims.hidden_size
        if cfg.sink_dims is not None:
            bad = [d for d in cfg.sink_dims if d >= hidden]
            if bad:
                raise ValueError(
                    f"sink_dims={cfg.sink_dims!r} has indices {bad} beyond this model's hidden size {hidden} "
                    f"(allowed: 0..{hidden - 1}); pass this backbone's sink dimensions, or None to find them."
                )
            return tuple(cfg.sink_dims), "config"
        known = known_sink_dims(call.model)
        if known is not None and known.status == "confirmed":
            return known.dims, f"known constants ({known.backbone})"
        found = self._find(call, known)
        if found:
            return found, "finder"
        if known is not None:
            self.warn(
                f"VAR: the sink-dimension finder found nothing at sink_tau={cfg.sink_tau}; using the listed "
                f"{known.status} constants {list(known.dims)} for {known.backbone}.",
            )
            return known.dims, f"{known.status} constants ({known.backbone})"
        self.warn(
            f"VAR found no sink dimensions for this model (no hidden dimension where the first token's |x/RMS(x)| "
            f"exceeds sink_tau={cfg.sink_tau} in at least half the layers >= 2), so it leaves attention unchanged. "
            "Pass sink_dims=(...) for this backbone, or a lower sink_tau.",
        )
        return (), "none"

    def _find(self, call: CallContext, known: Any) -> tuple[int, ...]:
        """The finder's dimensions for this model, run once on the call's prompt and cached per model."""
        name = str(getattr(call.model.config, "name_or_path", "") or "")
        key = (call.adapter.config_fingerprint(), name, float(self.config.sink_tau))
        if key not in _FOUND:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # VAR says what it does with the result below
                report = find_sink_dimensions(call.model, call.inputs, self.config.sink_tau, call.adapter)
            _FOUND[key] = tuple(report.dims)
            if report.dims:
                listed = (
                    f"; the listed {known.status} constants for {known.backbone} are {list(known.dims)}"
                    if known is not None
                    else ""
                )
                self.warn(
                    f"VAR: no confirmed sink dimensions for this backbone; the sink-dimension finder found "
                    f"{report.dims} on this call's prompt (cached for this model){listed}. Pass sink_dims=(...) "
                    "to fix them.",
                )
        return _FOUND[key]
