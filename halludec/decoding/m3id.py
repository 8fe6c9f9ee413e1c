"""M3ID: "Multi-Modal Hallucination Control by Visual Information Grounding" (Multi-Modal Mutual-Information Decoding).

Favero, Zancato, Trager, Choudhary, Perera, Achille, Swaminathan, Soatto, CVPR 2024,
https://arxiv.org/abs/2403.14003 (no official code was released).

As a VLM generates, the weight of the image in its predictions fades ("conditioning dilution") and the language prior
takes over. M3ID favours tokens with high pointwise mutual information with the image, more strongly as more tokens
are generated. With ``l_c = log p(y | image, prompt, y<t)`` and ``l_u = log p(y | prompt, y<t)`` (the same chat
prompt with the image removed, its own KV cache and the same generated tokens; it rides as one extra batch row per
main row of every forward):

1. ``gamma_t = exp(-lam * t)``, with ``t = 1`` for the first generated token (the paper's Algorithm 1).
2. Uncertainty gate: only rows whose most likely token has ``p < alpha`` (``max l_c < log(alpha)``) are changed.
3. ``l* = l_c + (1 - gamma_t) / gamma_t * (l_c - l_u)``; the weight ``(1 - gamma_t) / gamma_t = exp(lam * t) - 1``
   grows with ``t``.

Implementation notes (see docs/methods/m3id.md):

- The contrast is taken between log-probabilities (``log_softmax``) and added to the raw logits:
  ``z = logits + gate * w_t * (log_softmax(logits) - log_softmax(l_u))``. This differs from ``l*`` by a per-row
  constant, so softmax, argmax and beam search see the same distribution, and rows where the gate is closed keep
  their logits bit for bit.
- ``w_t`` is capped at :data:`MAX_WEIGHT` so it stays finite in float32 for long generations (``lam * t > 13.8``);
  the distribution there is already a point mass on the highest-PMI token.
- The combination runs inside the forward, before every processor and warper of ``generate``, so greedy, sampling
  and beam search all work.

Defaults: ``lam = 0.02``, ``alpha = 0.3`` (the values a peer implementation uses as the paper's; the paper scans
``lam`` in {0.001, 0.02, 0.03} and ``alpha`` in {0.2, 0.3, 0.5}). ``lam = 0`` or ``alpha = 0`` turns M3ID (and its
branch) off.

Cost: one extra batched branch (the image-free prompt, much shorter than the main one) in every forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext
from halludec.decoding.side import LogitsContext

MAX_WEIGHT = 1e6
"""Upper bound of the step weight ``exp(lam * t) - 1`` (keeps it finite in float32)."""


@dataclass
class M3IDConfig(StrategyConfig):
    """M3ID hyperparameters.

    Attributes:
        lam: Forgetting rate ``lambda`` of ``gamma_t = exp(-lambda * t)``; the weight of the image's pointwise mutual
            information grows as ``exp(lambda * t) - 1``. 0 turns M3ID (and its image-free branch) off.
        alpha: Uncertainty gate in ``[0, 1]``: a row is changed only while its most likely token has probability
            below ``alpha``. 0 never changes anything (M3ID off); 1 changes every row that is not certain.
    """

    lam: float = 0.02
    alpha: float = 0.3

    def validate(self) -> None:
        check_range("lam", self.lam, 0.0, None)
        check_range("alpha", self.alpha, 0.0, 1.0)


def m3id_weight(lam: float, step: int | torch.Tensor) -> float | torch.Tensor:
    """The step weight ``(1 - gamma_t) / gamma_t = exp(lam * t) - 1`` with ``t = step + 1``, capped at MAX_WEIGHT.

    Args:
        lam: Forgetting rate.
        step: Tokens generated before this step (0 for the first generated token, which the paper calls ``t = 1``):
            a Python int, or a 0-dim tensor (the static-cache path), for which the weight stays a tensor (no host
            sync).

    Returns:
        The weight, a Python float for an int step, else a float32 tensor.
    """
    if isinstance(step, torch.Tensor):
        return torch.expm1(lam * (step.float() + 1.0)).clamp(max=MAX_WEIGHT)
    exponent = lam * (step + 1)
    if exponent >= math.log1p(MAX_WEIGHT):
        return MAX_WEIGHT
    return math.expm1(exponent)


def m3id_combine(
    logits: torch.Tensor, no_image: torch.Tensor, weight: float | torch.Tensor, alpha: float
) -> torch.Tensor:
    """M3ID's gated pointwise-mutual-information boost.

    Args:
        logits: Next-token logits with the image ``[B, V]`` (float32).
        no_image: Next-token logits of the image-free prompt ``[B, V]``.
        weight: Step weight ``exp(lam * t) - 1`` (a float or a 0-dim tensor).
        alpha: Uncertainty gate: rows whose top probability is ``>= alpha`` are returned unchanged.

    Returns:
        ``logits + gate * weight * (log_softmax(logits) - log_softmax(no_image))``, ``[B, V]``; inputs are not
        modified.
    """
    logp = logits.log_softmax(dim=-1)  # [B, V]
    pmi = logp - no_image.log_softmax(dim=-1)  # [B, V]
    threshold = math.log(alpha) if alpha > 0.0 else -math.inf
    gate = logp.amax(dim=-1, keepdim=True) < threshold  # [B, 1]: the model is uncertain
    return torch.where(gate, logits + weight * pmi, logits)  # [B, V]


@register_strategy("m3id")
class M3ID(Strategy):
    """Multi-Modal Mutual-Information Decoding: amplify the image's PMI, more as decoding goes (Favero et al. 2024)."""

    config_class = M3IDConfig
    needs_image = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.14003"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def _active(self) -> bool:
        return self.config.lam > 0.0 and self.config.alpha > 0.0

    def side_inputs(self, call: CallContext) -> list[dict[str, Any]]:
        """The image-free prompt (chat template kept, image tokens and their wrappers removed); none when off."""
        return [call.adapter.text_only_inputs(call.inputs)] if self._active() else []

    def logits_enabled(self, call: CallContext) -> bool:
        return self._active()

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """``l + gate * (exp(lam * t) - 1) * (log p(y | image) - log p(y | no image))``."""
        (no_image,) = ctx.side
        return m3id_combine(logits, no_image, m3id_weight(self.config.lam, ctx.step), self.config.alpha)
