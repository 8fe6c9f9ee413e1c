"""AGLA: "Mitigating Object Hallucinations in Large Vision-Language Models with Assembly of Global and Local Attention".

An, Tian, Leng, Nie, Lin, Wang, Chen, Zhang, Lu, CVPR 2025, https://arxiv.org/abs/2406.12718 (official code
``Lackel/AGLA``, commit ``efa1263``). The method, as released:

1. **Image-prompt matching.** A relevance map over the image is computed for the prompt (the paper: GradCAM of a
   BLIP image-text-matching model's cross-attention, averaged over the prompt tokens) and with it an augmented,
   *local* view: the map is resized to the image, blurred (Gaussian, ``sigma = 0.02 x side``), and the pixels below
   the value ranked ``floor(N * keep)`` are set to black, ``keep = 1 - sim(v, t) / 2`` with ``sim`` the matching
   model's image-text similarity (``halludec.decoding.agla_masks``).
2. **Assembly.** Every step, the logits of the prompt with the original image (global) and with the local view are
   added: ``z = l_global + alpha * l_local``; tokens with ``l_global < log(beta) + max(l_global)`` are dropped
   (VCD's adaptive plausibility constraint on the global logits). The local prompt rides as one extra batch row per
   main row (a side branch, like VCD's noised image).

Relevance sources:

- **External (the paper).** ``relevance_fn(inputs, questions)`` returns per row a relevance map ``[h, w]`` over
  the image as the model sees it (after the processor's resize / crop) as a ``[B, h, w]`` tensor or a list, or a
  pair ``(maps, sims)`` with the matching similarity ``[B]`` that sets the adaptive ratio. No BLIP model ships with
  halludec: plug in your own (e.g. LAVIS ``compute_gradcam`` + the ITC score, as the released code).
- **VLM attention (variant, the default when no ``relevance_fn`` is given).** The VLM's own attention from the
  question tokens (``relevance_queries="question"``) or the last prompt token (``"last"``) to the image tokens,
  averaged over heads, query rows and a band of middle layers (``relevance_layers``; default ``L//4 .. L//2 - 1``),
  read from the main prefill itself: no extra pass. The map is built while the main prefill runs (in the last band
  layer) and written into the local branch's pixels before that branch's prefill, which ``side.py`` runs right
  after. Differences from GradCAM: plain attention probabilities, not gradient-weighted (no ``max(0, dsim/dC)``
  factor), so heads and tokens are weighted by how much they attend to the image rather than by their effect on
  a matching score, and attention sinks among the image tokens can count as relevant; the grid is the VLM's own
  token grid (LLaVA-1.5: 24 x 24 like BLIP's; anyres families: the base tile; Qwen: the merged patch grid); and
  there is no similarity score, so the mask ratio is fixed (``mask_ratio``).

Open questions and their resolutions (``docs/methods/agla.md``):

- *Masked pixel value.* The code multiplies the [0, 1] RGB image by the mask (black), then runs the processor;
  here the processed pixels are set to ``-mean / std`` (black after normalisation; needs ``processor=``);
  ``fill="mean"`` uses 0 (the mean colour) where no processor is at hand.
- *Geometry.* The code resizes the raw image to 384 x 384 for the mask, then re-processes it (LLaVA: resize +
  centre crop of a squashed image, so the local view is not pixel-aligned with the global one for non-square
  images). Here the mask lives on the processed image itself (aligned), at a work resolution whose long side is
  at most ``work_side`` = 384 px, resized to the pixels by nearest neighbour.
- *Resizing.* skimage's bicubic resize with ``mode="constant"`` (zeros beyond the border) vs torch's bicubic
  (replicated border): the code's border pixels rank slightly lower.
- *Ratio without a similarity.* ``mask_ratio`` (0.2: ``sim / 2`` for a typical matching pair's BLIP ITC ~0.4).
- *Greedy and beam search.* The released code patches ``sample()`` only (it samples with T = 1, top-p 1, seeds
  1-3); here the assembly runs inside the forward, before every processor and warper, so every decoding mode works.

Cost: one extra batched branch (one row per main row, about 2x KV memory) per step, like VCD. The attention variant
also computes explicit float32 attention in its band layers (every query row at the prefill, the new row per step);
the external variant costs whatever ``relevance_fn`` costs, once per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from halludec.decoding.agla_masks import ImagePlan, fill_values, keep_masks, plan_images
from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.contrast import check_int, plausibility_cutoff
from halludec.decoding.side import LogitsContext

logger = logging.getLogger("halludec")
QUERIES = ("question", "last")
FILLS = ("black", "mean")


@dataclass
class AGLAConfig(StrategyConfig):
    """AGLA hyperparameters (released scripts: alpha 2, beta 0.5; see the module docstring).

    Attributes:
        alpha: Weight of the local view's logits; 0 turns the local branch off.
        plausibility_beta: Adaptive plausibility cutoff on the global logits in ``[0, 1]``; 0 = none.
        mask_ratio: Fraction of pixels masked when no similarity is given (attention variant, or ``relevance_fn``
            without sims, or ``adaptive_ratio=False``).
        adaptive_ratio: With sims from ``relevance_fn``, mask ``sim / 2`` of the pixels (the paper).
        relevance_fn: ``fn(inputs, questions) -> maps | (maps, sims)``; None = the VLM-attention variant.
        relevance_queries: Attention variant: ``"question"`` (the question's tokens; needs ``processor=``) or
            ``"last"`` (the last prompt token).
        relevance_layers: Attention variant: decoder layers averaged; None = ``L//4 .. max(L//4 + 1, L//2) - 1``.
        blur: Gaussian sigma as a fraction of the map's long side (0.02); 0 = no blur.
        work_side: Long side (px) of the resolution the mask is built at (384, the paper's).
        fill: ``"black"`` (the paper; needs the processor's normalisation) or ``"mean"`` (normalised 0).
    """

    alpha: float = 2.0
    plausibility_beta: float = 0.5
    mask_ratio: float = 0.2
    adaptive_ratio: bool = True
    relevance_fn: Callable[..., Any] | None = field(default=None, compare=False)
    relevance_queries: str = "question"
    relevance_layers: tuple[int, ...] | None = None
    blur: float = 0.02
    work_side: int = 384
    fill: str = "black"

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        check_range("mask_ratio", self.mask_ratio, 0.0, 1.0)
        check_range("blur", self.blur, 0.0, 1.0)
        check_int("work_side", self.work_side, 8, None)
        if not isinstance(self.adaptive_ratio, bool):
            raise ValueError(f"adaptive_ratio={self.adaptive_ratio!r} is invalid; allowed: True or False.")
        if self.relevance_fn is not None and not callable(self.relevance_fn):
            raise ValueError(
                f"relevance_fn={self.relevance_fn!r} is invalid; allowed: None or a callable "
                "fn(inputs, questions) -> maps [B, h, w] (or (maps, sims [B]))."
            )
        if self.relevance_queries not in QUERIES:
            raise ValueError(f"relevance_queries={self.relevance_queries!r} is invalid; allowed: 'question', 'last'.")
        if self.fill not in FILLS:
            raise ValueError(f"fill={self.fill!r} is invalid; allowed: 'black', 'mean'.")
        if self.relevance_layers is not None:
            if not self.relevance_layers:
                raise ValueError("relevance_layers=() is invalid; give decoder layer indices, or None for the band.")
            for layer in self.relevance_layers:
                check_int("relevance_layers[]", layer, 0, None)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values (``relevance_fn`` as its qualified name)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "relevance_fn"}
        fn = self.relevance_fn
        out["relevance_fn"] = None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)
        return out


def agla_combine(logits: torch.Tensor, local: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """AGLA's assembly with the plausibility cutoff on the global logits.

    Args:
        logits: Global-view (original image) next-token logits ``[B, V]`` (float32).
        local: Local-view (masked image) logits ``[B, V]``.
        alpha: Weight of the local view.
        beta: Plausibility cutoff (0 = none).

    Returns:
        ``logits + alpha * local`` with implausible tokens dropped, ``[B, V]``.
    """
    return plausibility_cutoff(logits + alpha * local, logits, beta)


def attention_relevance(probs: torch.Tensor, weights: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Attention each key receives from the weighted query rows, averaged over heads.

    Args:
        probs: Attention ``[R, H, q, K]`` of a prefill (``R`` = inputs' rows x beams, copies adjacent).
        weights: ``[batch, q]`` query-row weights (rows sum to 1), or None: the last query row.
        batch: Rows of the inputs.

    Returns:
        ``[batch, K]`` float32.
    """
    main = probs[:: probs.shape[0] // batch].float().mean(1)  # [B, q, K]
    if weights is None:
        return main[:, -1]  # [B, K]
    return torch.einsum("bqk,bq->bk", main, weights.to(main.device))  # [B, K]


@dataclass
class _AGLAState:
    """Per-call state: image plans, masked-pixel fill, the local branch's pixels and the attention readout."""

    plans: list[ImagePlan]
    fill: torch.Tensor
    original: torch.Tensor  # the inputs' pixel_values (never written)
    pixels: torch.Tensor  # the local branch's pixel_values (written before its prefill)
    layers: tuple[int, ...] = ()
    weights: torch.Tensor | None = None  # [B, L] question-row weights (None: last row)
    first_row: int = 0  # the earliest question token over rows (explicit attention from there on)
    keep: list[float | torch.Tensor] = field(default_factory=list)  # per image
    acc: torch.Tensor | None = None  # [B, K] summed over the band's layers


@register_strategy("agla")
class AGLA(Strategy):
    """Assembly of global and local attention: add the logits of a prompt-relevant masked view (An et al. 2025)."""

    config_class = AGLAConfig
    needs_image = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.12718"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The last prompt token's attention instead of the question's (no question span, no processor tokenizer).
        "last_row": {"relevance_queries": "last"},
    }

    def prepare(self, call: CallContext) -> None:
        """Plan the masks per image; external relevance: mask now; attention variant: pick the band and weights."""
        cfg = self.config
        if cfg.alpha == 0.0:
            return
        plans = plan_images(call.adapter, call.inputs, call.image_spans, cfg.work_side)
        pixels = call.inputs["pixel_values"]
        channels = _channels(call, pixels)
        fill = fill_values(cfg.fill, call.processor, channels)
        keep = [1.0 - cfg.mask_ratio] * len(plans)
        state = _AGLAState(plans=plans, fill=fill, original=pixels, pixels=pixels.clone(), keep=keep)
        call.state[self.state_key] = state
        if cfg.relevance_fn is not None:
            maps, sims = _external_maps(cfg.relevance_fn, call)
            for plan in plans:
                if len(plan.sources) != 1:
                    raise ValueError(
                        f"relevance_fn gives one map per row, but row {plan.row}'s image is split into "
                        f"{len(plan.sources)} separately tokenised tiles; use the attention variant (no relevance_fn)."
                    )
            if len({p.row for p in plans}) != len(plans) or len(maps) != call.batch_size:
                raise ValueError(
                    f"relevance_fn must return one map per row ({call.batch_size} rows with one image each); got "
                    f"{len(maps)} maps for {len(plans)} images."
                )
            if sims is not None and cfg.adaptive_ratio:  # the paper: keep = min(1 - sim / 2, 1 - 1e-5)
                state.keep = [float(min(max(1.0 - float(sims[p.row]) / 2.0, 0.0), 1.0 - 1e-5)) for p in plans]
            self._paint(state, [[maps[p.row]] for p in plans])
            return
        n = call.adapter.dims.num_layers
        layers = cfg.relevance_layers or tuple(range(n // 4, max(n // 4 + 1, n // 2)))
        for layer in layers:
            call.adapter.check_layer(layer)
        state.layers = tuple(sorted(set(layers)))
        if cfg.relevance_queries == "question":
            weights = torch.zeros(call.input_ids.shape, dtype=torch.float32)  # [B, L]
            for row, (start, end) in enumerate(call.query_spans):
                weights[row, start:end] = 1.0 / max(end - start, 1)
            state.weights = weights.to(call.input_ids.device)
            state.first_row = min(start for start, _ in call.query_spans)

    def attention_layers(self, call: CallContext) -> set[int]:
        """The relevance band (attention variant with the local branch on); none otherwise."""
        state = call.state.get(self.state_key)
        return set(state.layers) if state is not None else set()

    def attention_rows_for(self, layer: int, call: CallContext) -> str | int:
        """The prompt rows from the earliest question token on for the question's attention, else the last one."""
        state = call.state.get(self.state_key)
        return state.first_row if state is not None and state.weights is not None else "last"

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """At the main prefill only: accumulate the relevance; after the band's last layer, write the local view."""
        if not ctx.is_prefill:
            return probs
        state: _AGLAState = ctx.call.state[self.state_key]
        length = ctx.call.prompt_len
        # the question's rows: prompt rows q_start.. are here (the plan's row range); None: the last row
        weights = state.weights[:, ctx.q_start :] if state.weights is not None else None  # [B, q]
        relevance = attention_relevance(probs, weights, ctx.call.batch_size)[:, :length]  # [B, L]
        relevance = relevance.to(state.original.device)  # layers may sit on several devices (device_map)
        state.acc = relevance if ctx.layer_idx == state.layers[0] else state.acc + relevance
        if ctx.layer_idx == state.layers[-1]:
            rows = state.acc  # [B, L]
            maps = [[rows[p.row, s.positions.to(rows.device)].view(s.grid) for s in p.sources] for p in state.plans]
            self._paint(state, maps)  # per image, per source: [gh, gw]
        return probs

    def _paint(self, state: _AGLAState, maps: list[list[torch.Tensor]]) -> None:
        """Mask every image with its relevance maps into the local branch's pixels (my own tensor, in place)."""
        original = state.original
        for plan, image_maps, keep in zip(state.plans, maps, state.keep, strict=True):
            sizes = [s.work for s in plan.sources]
            keeps = keep_masks([m.to(original.device) for m in image_maps], sizes, keep, self.config.blur)
            for paint in plan.painters:
                paint(state.pixels, original, keeps, state.fill)

    def side_inputs(self, call: CallContext) -> list[dict[str, Any]]:
        """The prompt with the local view (none when ``alpha`` is 0)."""
        state = call.state.get(self.state_key)
        if state is None:
            return []
        return [{**call.inputs, "pixel_values": state.pixels}]

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """``l + alpha * l_local``, then the plausibility cutoff on ``l``."""
        if not ctx.side:  # alpha == 0: only the cutoff (none when beta == 0)
            return plausibility_cutoff(logits, logits, self.config.plausibility_beta)
        (local,) = ctx.side
        return agla_combine(logits, local, self.config.alpha, self.config.plausibility_beta)


def _channels(call: CallContext, pixels: torch.Tensor) -> int:
    vision = call.adapter.config.vision_config
    if call.adapter.config.model_type.startswith("qwen"):
        per = getattr(vision, "temporal_patch_size", 1) * vision.patch_size**2
        return pixels.shape[-1] // per
    return pixels.shape[-3]


def _external_maps(fn: Callable[..., Any], call: CallContext) -> tuple[list[torch.Tensor], list[float] | None]:
    """Call ``relevance_fn`` once and normalise its answer to per-row maps and optional similarities."""
    questions = call.questions
    if questions is None and call.processor is not None:
        tok = getattr(call.processor, "tokenizer", call.processor)
        ids = call.input_ids.tolist()
        try:
            spans = call.query_spans
        except ValueError as err:  # the question cannot be located: the callable gets None
            logger.info("halludec: AGLA passes questions=None to relevance_fn (%s)", err)
        else:
            questions = [tok.decode(ids[r][s:e], skip_special_tokens=True) for r, (s, e) in enumerate(spans)]
    answer = fn(call.inputs, questions)
    maps, sims = answer if isinstance(answer, tuple) else (answer, None)
    if isinstance(maps, torch.Tensor):
        maps = list(maps.unbind(0)) if maps.dim() == 3 else None
    if not isinstance(maps, list) or not all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in maps):
        raise ValueError(
            "relevance_fn must return maps as a [B, h, w] tensor or a list of [h, w] tensors (optionally with "
            f"similarities: (maps, sims [B])); got {type(answer).__name__}."
        )
    if sims is not None:
        sims = torch.as_tensor(sims, dtype=torch.float32).flatten().tolist()
        if len(sims) != len(maps):
            raise ValueError(f"relevance_fn returned {len(sims)} similarities for {len(maps)} maps; give one per row.")
    return [m.detach().float() for m in maps], sims
