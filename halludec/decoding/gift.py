"""``gift``: Gaze Shift-Guided Cross-modal Fusion Enhancement (GIFT, arXiv 2510.22067).

Stage A (saliency, once per call). In the saliency layer(s), as the model reads each informative word of the
question, the attention a query row pays to each visual token rises or falls relative to the previous row. GIFT
keeps the positive rises ("gaze shifts"), which attention sinks barely show: ``dA = clamp(A[i] - A[i-1], 0)`` for
informative query rows ``i``; per layer the top ``head_frac`` heads by total shift; the mean over layers, heads
and rows; a ``clip_sigma`` clamp (unbiased std), min-max normalisation and ``G = exp(alpha * s)``, per image.

Stage B (enhancement, every band layer, last query row only, at the prefill and every decode step): the top
``head_frac`` heads by visual attention get their visual attention multiplied by ``G``; ``r`` is the ratio of the
boosted to the original visual mass of those heads (one scalar per row); the top ``head_frac`` heads by attention
to the question get their question attention multiplied by ``beta * r``; the row is renormalised.

Saliency pass. Stage A reads rows before the last prompt position, which Stage B never edits, so when every
saliency layer comes before the band it is computed inside the main prefill (no extra pass): the saliency layers
compute every query row explicitly at the prefill and store ``G`` for the band layers of the same forward.
Otherwise (Qwen2-VL-7B's defaults: saliency layer 14 inside the band 5-18, or ``saliency_layers="auto"``) ``G``
comes from one extra, unsteered prefill in ``prepare`` (the released code runs one too), stopped after the last
saliency layer and reduced on the fly. Both give the same ``G`` (tested). GIFT-6's split prefill (prefill
``tokens[:-1]``, then the last token as the first enhanced step) would avoid that pass but needs core support.

Paper: https://arxiv.org/abs/2510.22067 (official code ``amazon-science/GIFT``, CC BY-NC 4.0; restated, not copied).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding import attention
from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.gift_math import enhance_last_row, gaze_shifts, saliency_log_gains
from halludec.decoding.informative import WORD_FILTERS, informative_positions

log = logging.getLogger("halludec")

SALIENCY_PASSES = ("auto", "inline", "extra")

# (model_type, layers, heads, kv heads, hidden) -> (name, saliency layers, enhancement band, alpha) [released configs]
KNOWN_MODELS: dict[tuple[str, int, int, int, int], tuple[str, tuple[int, ...], tuple[int, ...], float]] = {
    ("llava", 32, 32, 32, 4096): ("llava-1.5-7b", (11,), tuple(range(12, 23)), 5.0),
    ("llava", 40, 40, 40, 5120): ("llava-1.5-13b", (10,), tuple(range(14, 21)), 5.0),
    ("qwen2_vl", 28, 28, 4, 3584): ("qwen2-vl-7b", (14,), tuple(range(5, 19)), 4.0),
}
GENERIC_ALPHA = 5.0


@dataclass
class GIFTConfig(StrategyConfig):
    """GIFT's hyperparameters; ``None`` picks the per-model value (released configs), else a generic default.

    Attributes:
        saliency_layers: Layers whose gaze shifts form the saliency map; ``"auto"`` picks, per row, the layer with
            the largest total positive shift on informative rows (needs the extra pass). Default per model:
            LLaVA-1.5-7B (11,), 13B (10,), Qwen2-VL-7B (14,); other models ``floor(11/32 * layers)``.
        enhance_layers: The band of layers whose last query row is enhanced. Default: 7B 12-22, 13B 14-20,
            Qwen2-VL-7B 5-18; other models from the saliency layer + 1 to ``round(22/32 * layers)``.
        alpha: Saliency gain exponent (``G = exp(alpha * s)``, s in [0, 1]); 0 disables the visual boost.
            Default 5.0 (Qwen2-VL-7B 4.0).
        beta: Multiplier of ``r`` for the question attention (paper's beta; 1.0 as released).
        head_frac: Fraction of heads selected in each of the three head selections (1/2 as released).
        clip_sigma: The saliency map is clamped to mean +- clip_sigma * std before min-max normalisation.
        word_filter: Informative query words: ``"auto"`` (spaCy with en_core_web_sm when installed, else
            ``"builtin"``), ``"builtin"`` (data-free stop-word lists), ``"spacy"`` (the paper's POS filter) or
            ``"all"`` (every question token).
        saliency_pass: ``"auto"`` (inside the main prefill when every saliency layer precedes the band, else one
            extra prefill), ``"inline"`` (require the former) or ``"extra"`` (always the extra prefill).
    """

    saliency_layers: tuple[int, ...] | str | None = None
    enhance_layers: tuple[int, ...] | None = None
    alpha: float | None = None
    beta: float = 1.0
    head_frac: float = 0.5
    clip_sigma: float = 3.0
    word_filter: str = "auto"
    saliency_pass: str = "auto"

    def __post_init__(self) -> None:
        for name in ("saliency_layers", "enhance_layers"):
            value = getattr(self, name)
            if isinstance(value, (list, range)):
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, value and allowed range."""
        if not (self.saliency_layers is None or self.saliency_layers == "auto" or _layers_ok(self.saliency_layers)):
            raise ValueError(
                f"saliency_layers={self.saliency_layers!r} is invalid; allowed: None (per-model default), 'auto', "
                "or a non-empty tuple of layer indices >= 0."
            )
        if not (self.enhance_layers is None or _layers_ok(self.enhance_layers)):
            raise ValueError(
                f"enhance_layers={self.enhance_layers!r} is invalid; allowed: None (per-model default) or a "
                "non-empty tuple of layer indices >= 0."
            )
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, None)
        check_range("beta", self.beta, 0.0, None)
        check_range("head_frac", self.head_frac, 0.0, 1.0)
        if self.head_frac <= 0:
            raise ValueError(f"head_frac={self.head_frac!r} is invalid; allowed: a number in (0, 1].")
        check_range("clip_sigma", self.clip_sigma, 0.0, None)
        if self.clip_sigma <= 0:
            raise ValueError(f"clip_sigma={self.clip_sigma!r} is invalid; allowed: a number > 0.")
        if self.word_filter not in WORD_FILTERS:
            raise ValueError(f"word_filter={self.word_filter!r} is invalid; allowed: {', '.join(WORD_FILTERS)}.")
        if self.saliency_pass not in SALIENCY_PASSES:
            raise ValueError(f"saliency_pass={self.saliency_pass!r} is invalid; allowed: {', '.join(SALIENCY_PASSES)}.")


def _layers_ok(value: Any) -> bool:
    """A non-empty tuple of non-negative ints."""
    ok = isinstance(value, tuple) and len(value) > 0
    return ok and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def default_settings(adapter: Any) -> tuple[str, tuple[int, ...], tuple[int, ...], float]:
    """Per-model ``(name, saliency_layers, enhance_layers, alpha)``, matched on structural config fields.

    Known shapes (model_type, layers, heads, KV heads, hidden size: the config fingerprint without the vocabulary)
    get the released configs; any other model gets the generic default, proportional to depth as for
    LLaVA-1.5-7B (saliency ``floor(11/32 L)``, moved to the nearest full-attention layer below the band's end when
    it is a sliding-window layer; band ``saliency + 1 .. round(22/32 L)``; alpha 5.0), with a warning.

    Args:
        adapter: The model's ``VLMAdapter``.

    Returns:
        ``(name, saliency_layers, enhance_layers, alpha)``; ``name`` is ``"generic"`` for unknown models.
    """
    d = adapter.dims
    key = (adapter.config.model_type, d.num_layers, d.num_heads, d.num_kv_heads, d.hidden_size)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    n = d.num_layers
    sal = max(0, min(n - 2, math.floor(n * 11 / 32)))
    end = max(sal + 1, min(n - 1, round(n * 22 / 32)))
    sliding = set(adapter.sliding_layers())
    if sal in sliding:  # prefer the nearest full-attention layer below the band's end
        full = [i for i in range(end) if i not in sliding]
        sal = min(full, key=lambda i: (abs(i - sal), i)) if full else sal
    return "generic", (sal,), tuple(range(sal + 1, end + 1)), GENERIC_ALPHA


# ------------------------------------------------------------------------------------------- the strategy
@dataclass
class _Plan:
    """Per-call GIFT state (``call.state[("gift", id(strategy))]``); tensors are per input row ``[B, L]``."""

    saliency: tuple[int, ...]
    band: frozenset[int]
    alpha: float
    auto: bool
    inline: bool
    rows: torch.Tensor  # [B, L] float: informative query rows
    query: torch.Tensor  # [B, L] float: the question's tokens
    image_id: torch.Tensor  # [B, L] long: j + 1 on image j, else 0
    n_images: int
    n_rows: torch.Tensor  # [B] float: informative rows per row (>= 1)
    lo: int
    hi: int
    shift: torch.Tensor | None = None  # [rows, K] running sum over saliency layers (inline)
    log_gain: torch.Tensor | None = None  # [B | rows, L]: alpha * s
    chosen: list[int] | None = None  # per row, the layer "auto" picked
    word_filter: str = ""  # the filter that ran ("auto" resolved)


class _StopPassError(Exception):
    """Raised after the last saliency layer: the extra pass needs nothing from the layers above it."""


class _ShiftRecorder(list):
    """Stands in for the attention recorder list of one layer: reduces its probabilities on arrival."""

    def __init__(self, reduce: Any, last: bool) -> None:
        super().__init__()
        self.reduce = reduce
        self.last = last
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, probs: torch.Tensor) -> None:  # type: ignore[override]
        self.result = self.reduce(probs)
        if self.last:
            raise _StopPassError


@register_strategy("gift")
class GIFT(Strategy):
    """GIFT: boost the last row's attention to salient image tokens, rebalanced against the question.

    Saliency from the positive attention shifts caused by the question's informative words (Stage A), then in a
    band of layers the top half of vision heads' image attention times ``exp(alpha * saliency)`` and the top half
    of question heads' question attention times ``beta * r`` (Stage B), at the prefill and at every step.
    Needs the question span: pass ``processor=`` (and optionally ``questions=``).
    """

    config_class = GIFTConfig
    needs_image = True
    attention_rows = "last"
    paper = "https://arxiv.org/abs/2510.22067"
    # "repro": the released code tags the question's words with spaCy (needs the `gift` extra).
    presets: ClassVar[dict[str, dict[str, Any]]] = {"repro": {"word_filter": "spacy"}}

    @classmethod
    def model_defaults(cls, adapter: Any) -> dict[str, Any]:
        """The released settings for this model (LLaVA-1.5-7B/13B, Qwen2-VL-7B), else the generic ones + a warning."""
        name, saliency, band, alpha = default_settings(adapter)
        if name == "generic":
            warnings.warn(
                f"GIFT has no released settings for this model ({adapter.config.model_type}, "
                f"{adapter.dims.num_layers} layers); using the generic defaults saliency_layers={saliency}, "
                f"enhance_layers={band[0]}..{band[-1]}, alpha={alpha}.",
                stacklevel=3,
            )
        return {"saliency_layers": saliency, "enhance_layers": band, "alpha": alpha}

    def _plan(self, call: CallContext) -> _Plan:
        plan = call.state.get(self.state_key)
        if plan is None:
            raise RuntimeError("GIFT was not prepared for this call; use it through halludec.apply / generate.")
        return plan

    def prepare(self, call: CallContext) -> None:
        """Resolve the per-model settings, locate the informative query rows, and (extra pass) compute ``G``."""
        cfg = self.config
        name, sal_default, band_default, alpha_default = default_settings(call.adapter)
        if name == "generic" and None in (cfg.saliency_layers, cfg.enhance_layers, cfg.alpha):
            self.warn(
                f"GIFT has no released settings for this model ({call.adapter.config.model_type}, "
                f"{call.adapter.dims.num_layers} layers); using the generic defaults saliency_layers={sal_default}, "
                f"enhance_layers={band_default[0]}..{band_default[-1]}, alpha={alpha_default}. Set them explicitly "
                "(or saliency_layers='auto') to silence this.",
            )
        sal = sal_default if cfg.saliency_layers is None else cfg.saliency_layers
        band = tuple(sorted(set(band_default if cfg.enhance_layers is None else cfg.enhance_layers)))
        auto = sal == "auto"
        layers = tuple(range(call.adapter.dims.num_layers)) if auto else tuple(sorted(set(sal)))
        for layer in (*layers, *band):
            call.adapter.check_layer(layer)
        inline_ok = not auto and layers[-1] < band[0]
        if cfg.saliency_pass == "inline" and not inline_ok:
            raise ValueError(
                f"saliency_pass='inline' needs every saliency layer before the enhancement band, but saliency_layers="
                f"{sal!r} and the band starts at layer {band[0]}; use saliency_pass='auto' (one extra prefill)."
            )
        plan = self._locate(call, layers, band, cfg.alpha if cfg.alpha is not None else alpha_default, auto)
        plan.inline = inline_ok and cfg.saliency_pass != "extra"
        call.state[self.state_key] = plan
        if not plan.inline:
            self._extra_pass(call, plan)

    def _locate(
        self, call: CallContext, layers: tuple[int, ...], band: tuple[int, ...], alpha: float, auto: bool
    ) -> _Plan:
        """Per-row tensors: question tokens, informative rows (with GIFT-3's fallbacks) and image ids."""
        spans = call.query_spans
        tok = getattr(call.processor, "tokenizer", call.processor)
        positions, used = informative_positions(call.input_ids, spans, tok, self.config.word_filter)
        log.info("GIFT: informative query words selected with the %r filter.", used)
        batch, length = call.input_ids.shape
        rows = torch.zeros(batch, length)
        query = torch.zeros(batch, length)
        empty, plain = [], []
        for row, ((start, end), pos) in enumerate(zip(spans, positions, strict=True)):
            if end <= start:
                empty.append(row)
                continue
            query[row, start:end] = 1.0
            if not pos:
                plain.append(tok.decode(call.input_ids[row, start:end]).strip())
                pos = list(range(start, end))
            rows[row, [p for p in pos if p >= 1]] = 1.0
        if empty:
            self.warn(f"GIFT: rows {empty} have an empty question span; GIFT leaves them unchanged.")
        for question in dict.fromkeys(plain):  # once per question text and instance, not per row and batch
            self.warn(
                f"GIFT: no informative word in the question {question!r} ({used!r} filter); its saliency uses all "
                "question tokens.",
            )
        image_id = torch.zeros(batch, length, dtype=torch.long)
        for row, img_spans in enumerate(call.image_spans):
            for j, (start, end) in enumerate(img_spans):
                image_id[row, start:end] = j + 1
        active = rows.nonzero()[:, 1].tolist()
        device = call.input_ids.device
        return _Plan(
            saliency=layers,
            band=frozenset(band),
            alpha=float(alpha),
            auto=auto,
            inline=False,
            rows=rows.to(device),
            query=query.to(device),
            image_id=image_id.to(device),
            n_images=max(1, max(len(s) for s in call.image_spans)),
            n_rows=rows.sum(dim=1).clamp_min(1.0).to(device),
            lo=min(active, default=1),
            hi=max(active, default=0) + 1,
            word_filter=used,
        )

    def _extra_pass(self, call: CallContext, plan: _Plan) -> None:
        """One unsteered prefill, stopped after the last saliency layer, keeping only the reduced shifts.

        Sets ``plan.log_gain`` (and ``plan.chosen`` for ``saliency_layers="auto"``).
        """
        visual = (plan.image_id > 0).float()  # [B, L]
        frac = self.config.head_frac
        recorders = {
            layer: _ShiftRecorder(
                # probabilities arrive on the layer's device (device_map); the reduced shifts go back to the inputs'
                lambda p: tuple(
                    t.to(visual.device)
                    for t in gaze_shifts(p, plan.rows.to(p.device), visual.to(p.device), plan.lo, plan.hi, frac)
                ),
                last=layer == plan.saliency[-1],
            )
            for layer in plan.saliency
        }
        kwargs = dict(call.inputs)
        kwargs["use_cache"] = False
        if "logits_to_keep" in inspect.signature(call.model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        modules = {layer: call.adapter.attention(layer) for layer in plan.saliency}
        suspended, call.suspended = call.suspended, True
        try:
            for layer, module in modules.items():
                setattr(module, attention.RECORD_ATTR, recorders[layer])
            with torch.no_grad():
                call.model(**kwargs)
        except _StopPassError:
            pass
        finally:
            for module in modules.values():
                if hasattr(module, attention.RECORD_ATTR):
                    delattr(module, attention.RECORD_ATTR)
            call.suspended = suspended
        missing = [layer for layer, rec in recorders.items() if rec.result is None]
        if missing:
            raise RuntimeError(
                f"GIFT's saliency pass saw no attention in layers {missing}; this model's text attention does not "
                "run through halludec's attention function."
            )
        if plan.hi <= plan.lo:  # no question tokens in any row: G = 1
            plan.log_gain = torch.zeros_like(plan.rows)
            return
        shifts = torch.stack([recorders[layer].result[0] for layer in plan.saliency])  # [n, B, L]
        if plan.auto:
            totals = torch.stack([recorders[layer].result[1] for layer in plan.saliency])  # [n, B]
            best = totals.argmax(dim=0)  # [B]
            plan.chosen = [plan.saliency[i] for i in best.tolist()]
            log.info("GIFT: saliency_layers='auto' picked layers %s (per row).", plan.chosen)
            shift, n_layers = shifts.gather(0, best[None, :, None].expand(1, *shifts.shape[1:]))[0], 1  # [B, L]
        else:
            shift, n_layers = shifts.sum(dim=0), len(plan.saliency)  # [B, L]
        plan.log_gain = self._finish(shift, plan, plan.image_id, plan.n_rows, n_layers, call.adapter.dims.num_heads)

    def _finish(
        self, shift: torch.Tensor, plan: _Plan, image_id: torch.Tensor, n_rows: torch.Tensor, n_layers: int, heads: int
    ) -> torch.Tensor:
        """Mean over layers, kept heads and informative rows, then the per-image gains (``log G``)."""
        kept = max(1, math.floor(self.config.head_frac * heads))
        mean = shift / (n_layers * kept * n_rows[:, None])  # [B, K]
        return saliency_log_gains(mean, image_id, plan.n_images, plan.alpha, self.config.clip_sigma)

    def attention_layers(self, call: CallContext) -> set[int]:
        """The band, plus the saliency layers when ``G`` is computed inside the main prefill."""
        plan = self._plan(call)
        return set(plan.band) | (set(plan.saliency) if plan.inline else set())

    def attention_rows_for(self, layer: int, call: CallContext) -> str | int:
        """From the row before the first question token in an inline saliency layer (Stage A), the last in the band."""
        plan = self._plan(call)
        return max(plan.lo - 1, 0) if plan.inline and layer in plan.saliency else "last"

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Stage A (inline saliency layers, at the prefill) and Stage B (band layers, last query row)."""
        plan = self._plan(ctx.call)
        layer = ctx.layer_idx
        if plan.inline and layer in plan.saliency and ctx.q_len == ctx.call.prompt_len:
            self._inline_saliency(probs, ctx, plan)
        if layer not in plan.band:
            return probs
        if plan.log_gain is None:
            raise RuntimeError(
                f"GIFT reached enhancement layer {layer} before its saliency map was computed; the inputs passed to "
                "generate must be the ones given to halludec.apply."
            )
        gain = torch.exp(ctx.keys(plan.log_gain))  # [batch, K]
        visual = ctx.image_keys().float()  # [batch, K]
        query = ctx.keys(plan.query)  # [batch, K]
        last = enhance_last_row(probs[:, :, -1], gain, visual, query, self.config.head_frac, self.config.beta)
        if probs.shape[2] == 1:
            return last[:, :, None].to(probs.dtype)  # [batch, H, 1, K]
        return torch.cat([probs[:, :, :-1], last[:, :, None].to(probs.dtype)], dim=2)  # [batch, H, q, K]

    def _inline_saliency(self, probs: torch.Tensor, ctx: LayerContext, plan: _Plan) -> None:
        """Accumulate this layer's shifts; after the last saliency layer, store ``log G`` for the band layers."""
        if plan.hi <= plan.lo:
            plan.log_gain = torch.zeros_like(ctx.rows(plan.rows))
            return
        visual = ctx.image_keys().float()  # [batch, K]
        start = ctx.q_start  # probs hold prompt rows start.. (the plan's row range)
        rows = ctx.rows(plan.rows)[:, start:]  # [batch, q]
        shift, _ = gaze_shifts(probs, rows, visual, plan.lo - start, plan.hi - start, self.config.head_frac)
        first, last = plan.saliency[0], plan.saliency[-1]
        plan.shift = shift if ctx.layer_idx == first else plan.shift.to(shift.device) + shift
        if ctx.layer_idx == last:
            heads = probs.shape[1]
            image_id = ctx.keys(plan.image_id)  # [batch, K]
            log_gain = self._finish(plan.shift, plan, image_id, ctx.rows(plan.n_rows), len(plan.saliency), heads)
            plan.log_gain = log_gain[:, : ctx.call.prompt_len]  # [batch, L]
            plan.shift = None
