"""PAINT: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model".

Arif, Dip, Hussain, Zhang, Thomas, https://arxiv.org/abs/2501.12206 (later "PAINT: Paying Attention to INformed
Tokens"; official code hasanar1f/PAINT).

Where PAI boosts every image token, PAINT boosts two sets chosen from the vision encoder's own attention, once per
image: **local** tokens, the top ``local_ratio`` of CLS attention in the first vision layer, and **summary**
tokens, the IQR outliers (``> Q3 + 1.5 IQR``) of CLS attention in the layer the LLM reads (``vision_feature_layer``;
the last layer where the model has none). In decoder layers ``first_layer .. L-1`` the last query row's
pre-softmax logits grow by their magnitude: ``z += alpha_local * |z|`` on local tokens and
``z += beta_summary * |z|`` on summary tokens. The ``|z|``-proportional boost is the paper's "head-specific
modulation" (each head's boost scales with its own logit); there is no other head component in the released code.

Variants, documented: vision towers without a CLS token (Qwen, SigLIP) use the attention each patch *receives*,
averaged over the patch rows, in place of the CLS row; Qwen2.5-VL reads its first full-attention vision block
instead of layer 0 (the others attend within windows); LLaVA-NeXT / OneVision select on each image's base tile.
The optional spatial stream (``spatial_ratio``, off by default as released) uses the intended selector — column
sums of the head-mean layer-0 attention over patch rows — instead of the released code's row sums (always 1).

Head sets: with ``profile=`` (a head profile JSON, e.g. ``halludec heads --criterion image_attention``) the boost is
restricted to the profile's top ``profile_k`` share of all heads (a per-layer head mask on the boost); layers of the
band without a profile head are left alone. Not in the paper; default off.

Optional CFG against the image-free prompt (``cfg_gamma``), as in PAI. The ``repro`` preset follows the authors'
CHAIR script: alpha 0.9, beta 0.3, CFG gamma 1.1, and no boost on the first generated token (released behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.pai import cfg_combine
from halludec.decoding.profile import check_profile_k, check_profile_path, profile_head_mask, profile_path
from halludec.decoding.side import LogitsContext
from halludec.decoding.vision import vision_attentions
from halludec.decoding.vision_tokens import (
    cls_scores,
    full_attention_layers,
    has_cls,
    received_scores,
    tiles_per_image,
    tokens_from_patches,
)


@dataclass
class PAINTConfig(StrategyConfig):
    """PAINT hyperparameters.

    Attributes:
        alpha_local: Boost of local (informative) tokens (sweep 0.1-0.9; >= 0.8 breaks in the paper).
        beta_summary: Boost of summary tokens (best 0.4 in the paper's sweep; code default 0.3).
        local_ratio: Share of image tokens chosen as local tokens.
        spatial_ratio: Share added from the spatial stream (0 = off, as released; the paper's variant uses 0.05).
        first_layer: First boosted decoder layer (boost runs to the last layer).
        summary_layer: Vision layer for summary tokens; None = the model's ``vision_feature_layer`` (or -1).
        cfg_gamma: CFG weight against the image-free branch; 1.0 = off.
        plausibility_beta: Plausibility cutoff of the CFG step (0 = none).
        skip_first_token: Do not boost while predicting the first token (the released code with CFG).
        profile: Path of a head profile JSON: boost only its top heads; None = every head (the paper).
        profile_k: Share of all heads taken from the profile, in (0, 1].
    """

    alpha_local: float = 0.7
    beta_summary: float = 0.4
    local_ratio: float = 0.25
    spatial_ratio: float = 0.0
    first_layer: int = 2
    summary_layer: int | None = None
    cfg_gamma: float = 1.0
    plausibility_beta: float = 0.1
    skip_first_token: bool = False
    profile: str | None = None
    profile_k: float = 0.1

    def __post_init__(self) -> None:
        self.profile = profile_path(self.profile)

    def validate(self) -> None:
        check_range("alpha_local", self.alpha_local, 0.0, None)
        check_range("beta_summary", self.beta_summary, 0.0, None)
        check_range("local_ratio", self.local_ratio, 0.0, 1.0)
        check_range("spatial_ratio", self.spatial_ratio, 0.0, 1.0)
        check_range("first_layer", self.first_layer, 0, None)
        check_range("cfg_gamma", self.cfg_gamma, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        check_profile_path(self.profile)
        check_profile_k(self.profile_k)


def select_tokens(
    local_scores: torch.Tensor,
    summary_scores: torch.Tensor,
    local_ratio: float,
    spatial: torch.Tensor | None = None,
    spatial_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAINT's two token sets for one image.

    Args:
        local_scores: ``[n]`` first-layer scores.
        summary_scores: ``[n]`` summary-layer scores.
        local_ratio: Top share of ``local_scores`` kept as local tokens.
        spatial: Optional ``[n]`` spatial-stream scores.
        spatial_ratio: Top share of ``spatial`` added to the local set.

    Returns:
        ``(local [n] bool, summary [n] bool)``; summary tokens are never local.
    """
    n = local_scores.shape[0]
    local = torch.zeros(n, dtype=torch.bool, device=local_scores.device)
    local[local_scores.topk(int(n * local_ratio)).indices] = True
    if spatial is not None and spatial_ratio > 0:
        local[spatial.topk(int(n * spatial_ratio)).indices] = True
    q1, q3 = torch.quantile(summary_scores.float(), torch.tensor([0.25, 0.75], device=summary_scores.device))
    n_summary = int((summary_scores > q3 + 1.5 * (q3 - q1)).sum())
    summary = torch.zeros(n, dtype=torch.bool, device=local_scores.device)
    summary[summary_scores.topk(n_summary).indices] = True
    return local & ~summary, summary


@register_strategy("paint")
class PAINT(Strategy):
    """Boost the last token's attention to vision-encoder-informed local and summary image tokens."""

    config_class = PAINTConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "repro": {"alpha_local": 0.9, "beta_summary": 0.3, "cfg_gamma": 1.1, "skip_first_token": True},
        "spatial": {"spatial_ratio": 0.05},
    }
    needs_image = True
    attention_rows = "last"
    paper = "https://arxiv.org/abs/2501.12206"

    def prepare(self, call: CallContext) -> None:
        """Select each image's local and summary tokens; store ``[B, L]`` masks in ``call.state``."""
        adapter = call.adapter
        heads = None  # [L, H] bool: the profile's head set (checked first: a wrong profile fails fast)
        if self.config.profile is not None:
            heads = profile_head_mask(self.config.profile, adapter, self.config.profile_k)
        n_vision = len(adapter.vision_attention_modules())
        full = full_attention_layers(adapter)
        first = full[0] if full else 0
        summary_layer = self._summary_layer(call, n_vision, full)
        maps = vision_attentions(adapter, call.inputs, layers=[first, summary_layer])
        tiles = tiles_per_image(adapter, call.inputs)
        bases = [sum(tiles[:i]) for i in range(len(tiles))]  # index of each image's base tile
        cls = has_cls(adapter)

        def scores(layer: int, received: bool = False) -> list[torch.Tensor]:
            probs = [maps[layer][b] for b in bases]
            if cls and not received:
                return [cls_scores(p) for p in probs]
            return [received_scores(p, skip_cls=cls) for p in probs]

        spans = [span for row in call.image_spans for span in row]
        lengths = [e - s for s, e in spans]
        local = tokens_from_patches(adapter, call.inputs, scores(first), lengths)
        summary = tokens_from_patches(adapter, call.inputs, scores(summary_layer), lengths)
        spatial = tokens_from_patches(adapter, call.inputs, scores(first, received=True), lengths)
        masks = torch.zeros(2, *call.input_ids.shape, dtype=torch.bool, device=call.input_ids.device)  # [2, B, L]
        i = 0
        for row, row_spans in enumerate(call.image_spans):
            for start, _ in row_spans:
                loc, summ = select_tokens(
                    local[i], summary[i], self.config.local_ratio, spatial[i], self.config.spatial_ratio
                )
                n = loc.shape[0]
                masks[0, row, start : start + n] = loc.to(masks.device)
                masks[1, row, start : start + n] = summ.to(masks.device)
                i += 1
        call.state["paint_local"], call.state["paint_summary"] = masks[0], masks[1]
        if heads is not None:
            call.state["paint_heads"] = {
                layer: heads[layer].to(device=call.layer_device(layer), dtype=torch.float32)  # [H]
                for layer in torch.nonzero(heads.any(dim=-1)).flatten().tolist()
            }
            if not any(layer >= self.config.first_layer for layer in call.state["paint_heads"]):
                self.warn(
                    f"PAINT: the profile {self.config.profile!r} has no head among its top profile_k="
                    f"{self.config.profile_k} in layers >= first_layer={self.config.first_layer} (its heads are in "
                    f"layers {sorted(call.state['paint_heads'])}); nothing is boosted. Raise profile_k or lower "
                    "first_layer.",
                )

    def _summary_layer(self, call: CallContext, n_vision: int, full: list[int] | None) -> int:
        """The configured layer, else the model's ``vision_feature_layer`` (-1 without one), as an index."""
        layer = self.config.summary_layer
        if layer is None:
            layer = getattr(call.adapter.config, "vision_feature_layer", None)
            layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
            layer = -1 if layer is None else int(layer)
        if not -n_vision <= layer < n_vision:
            raise ValueError(
                f"summary_layer={layer} is out of range for a vision tower of {n_vision} layers "
                f"(valid: {-n_vision}..{n_vision - 1})."
            )
        layer %= n_vision
        if full and layer not in full:  # windowed layer (Qwen2.5-VL): use the last full-attention block before it
            layer = max([f for f in full if f <= layer] or [full[0]])
        return layer

    def attention_layers(self, call: CallContext) -> set[int]:
        if self.config.alpha_local == 0.0 and self.config.beta_summary == 0.0:
            return set()
        band = set(range(self.config.first_layer, call.adapter.dims.num_layers))
        if self.config.profile is not None:
            return band & set(call.state["paint_heads"])
        return band

    def edit_scores(self, scores: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if self.config.skip_first_token and ctx.is_prefill:
            return scores
        state = ctx.call.state
        local = ctx.keys(state["paint_local"])[:, None, None, :]  # [B, 1, 1, K]
        summary = ctx.keys(state["paint_summary"])[:, None, None, :]  # [B, 1, 1, K]
        gain = torch.where(local, self.config.alpha_local, 0.0) + torch.where(summary, self.config.beta_summary, 0.0)
        if self.config.profile is not None:  # only the profile's heads are boosted
            heads = state["paint_heads"][ctx.layer_idx].to(gain.dtype)  # [H]
            gain = gain * heads[None, :, None, None]  # [B, H, 1, K]
        # where(), not a multiply: gain * |finfo.min| on masked keys could overflow to inf (inf * 0 = NaN).
        return torch.where(local | summary, scores + gain * scores.abs(), scores)

    def side_inputs(self, call: CallContext) -> list[Any]:
        return [] if self.config.cfg_gamma == 1.0 else [call.adapter.text_only_inputs(call.inputs)]

    def logits_enabled(self, call: CallContext) -> bool:
        return self.config.cfg_gamma != 1.0

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        (no_image,) = ctx.side
        return cfg_combine(logits, no_image, self.config.cfg_gamma, self.config.plausibility_beta)
