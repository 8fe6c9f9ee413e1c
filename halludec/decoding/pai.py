"""PAI: "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs".

Liu, Zheng, Chen, ECCV 2024, https://arxiv.org/abs/2407.21771 (official code: LALBJ/PAI).

Two parts, each optional:

1. **Attention boost.** In layers ``first_layer .. last_layer - 1``, on the last query row (the token being
   predicted), the pre-softmax logits of image keys grow by their magnitude: ``z += alpha * |z|``. Only the
   image-token span counts (for Qwen, not ``<|vision_start|>`` / ``<|vision_end|>``).
2. **CFG against the image-free prompt** (``cfg_gamma != 1``): with ``s = log_softmax(l)`` and
   ``u = log_softmax(l_no_image)``, ``out = gamma * (s - u) + u``; tokens with
   ``s < log(plausibility_beta) + max(s)`` are cut (pushed below every kept token; the released code uses
   -inf). The image-free branch rides as extra rows of the same forward.

Defaults follow the paper (alpha 0.5 for LLaVA-1.5, layers 2..L-1, CFG off: a single-pass method). The ``repro``
preset reproduces the released scripts: CFG on with gamma 1.1, and no boost on the first generated token (the
released attention modules stay in CFG mode until the CFG processor's first call ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.contrast import plausibility_cutoff
from halludec.decoding.side import LogitsContext


@dataclass
class PAIConfig(StrategyConfig):
    """PAI hyperparameters.

    Attributes:
        alpha: Attention boost on image keys (paper: LLaVA-1.5 0.5, Shikra 0.6, MiniGPT-4 0.2; README 0.2).
        first_layer: First boosted decoder layer.
        last_layer: One past the last boosted layer; None = all layers to the end (the paper's 2..31 on 32 layers).
        cfg_gamma: CFG weight against the image-free branch; 1.0 turns the branch off.
        plausibility_beta: Adaptive plausibility cutoff of the CFG step (0 = no cutoff).
        skip_first_token: Do not boost while predicting the first token (what the released code does with CFG).
    """

    alpha: float = 0.5
    first_layer: int = 2
    last_layer: int | None = None
    cfg_gamma: float = 1.0
    plausibility_beta: float = 0.1
    skip_first_token: bool = False

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None)
        check_range("first_layer", self.first_layer, 0, None)
        if self.last_layer is not None:
            check_range("last_layer", self.last_layer, self.first_layer + 1, None)
        check_range("cfg_gamma", self.cfg_gamma, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)


def boost_image_scores(scores: torch.Tensor, image_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """``z + alpha * |z|`` on image keys of every row of ``scores``.

    Args:
        scores: Pre-softmax scores ``[B, H, q, K]`` (float32).
        image_keys: ``[B, K]`` bool, True on image keys.
        alpha: Boost factor.

    Returns:
        New scores; other keys unchanged.
    """
    image = image_keys[:, None, None, :]  # [B, 1, 1, K]
    # where(), not a multiply by the mask: alpha * |finfo.min| on masked keys would overflow to inf (inf * 0 = NaN).
    return torch.where(image, scores + alpha * scores.abs(), scores)


def cfg_combine(logits: torch.Tensor, no_image: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """PAI's CFG step on log-probabilities, with the adaptive plausibility cutoff.

    Args:
        logits: Main next-token logits ``[B, V]``.
        no_image: Image-free branch logits ``[B, V]``.
        gamma: Guidance weight (1 = main distribution).
        beta: Plausibility cutoff: tokens with ``s < log(beta) + max(s)`` are pushed below every kept token
            (``contrast.plausibility_cutoff``: finite, so later processors never produce NaN); 0 disables it.

    Returns:
        Combined log-scores ``[B, V]``.
    """
    s = torch.log_softmax(logits, dim=-1)  # [B, V]
    u = torch.log_softmax(no_image, dim=-1)  # [B, V]
    return plausibility_cutoff(gamma * (s - u) + u, s, beta)


@register_strategy("pai")
class PAI(Strategy):
    """Boost the last token's attention to the image (+ optional CFG against the image-free prompt)."""

    config_class = PAIConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "repro": {"cfg_gamma": 1.1, "skip_first_token": True},
    }
    needs_image = True
    attention_rows = "last"
    paper = "https://arxiv.org/abs/2407.21771"

    def attention_layers(self, call: CallContext) -> set[int]:
        if self.config.alpha == 0.0:
            return set()
        n = call.adapter.dims.num_layers
        end = n if self.config.last_layer is None else self.config.last_layer
        if end > n:
            raise ValueError(
                f"last_layer={end} is beyond this model's {n} decoder layers; use at most {n} (or None for all)."
            )
        return set(range(self.config.first_layer, end))

    def edit_scores(self, scores: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if self.config.skip_first_token and ctx.is_prefill:
            return scores
        return boost_image_scores(scores, ctx.image_keys(), self.config.alpha)

    def side_inputs(self, call: CallContext) -> list[Any]:
        if self.config.cfg_gamma == 1.0:
            return []
        return [call.adapter.text_only_inputs(call.inputs)]

    def logits_enabled(self, call: CallContext) -> bool:
        return self.config.cfg_gamma != 1.0

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        (no_image,) = ctx.side
        return cfg_combine(logits, no_image, self.config.cfg_gamma, self.config.plausibility_beta)
