"""VCD: "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive Decoding".

Leng, Zhang, Chen, Li, Lu, Miao, Bing, CVPR 2024, https://arxiv.org/abs/2311.16922 (official code: DAMO-NLP-SG/VCD).

At every step the logits for the clean image are contrasted with those for a diffusion-noised copy of it, which
expose the language prior and statistical bias:

1. ``v' = sqrt(abar_T) * v + sqrt(1 - abar_T) * eps`` on the processed ``pixel_values`` (VCD's 1000-step schedule,
   ``T = noise_step``; ``VLMAdapter.noised_image_inputs``). The noised prompt rides as one extra batch row per main
   row of every forward (its own KV cache, the same generated tokens).
2. ``z = (1 + alpha) * l - alpha * l'`` with ``l``, ``l'`` the raw last-position logits of the clean and noised rows.
3. Adaptive plausibility on the raw clean logits: tokens with ``l < log(beta) + max(l)`` are dropped (pushed
   ``CUTOFF_MARGIN`` below every kept token instead of ``-inf``, see ``halludec.decoding.contrast``).

The combination runs inside the forward, before every processor and warper of ``generate``, so greedy, sampling and
beam search all work (the released code patches ``sample()`` only, so it is active only with ``do_sample=True``).

Deviation, documented: the released code draws ``eps`` from the global RNG seeded once per run; here each row
draws from a generator seeded from ``seed`` and the row's own pixels, so a sample gets the same noise whatever
its batch or position in the run (runs are reproducible, resumable and order-independent).

Defaults follow the paper and the released argparse (alpha 1, beta 0.1, noise step 500). The ``pope_repro`` preset
uses beta 0.2, as the released LLaVA-1.5 POPE script does; the paper sampled with ``do_sample=True,
temperature=1, top_p=1`` (``top_k=0``), and its POPE prompt adds " Please answer this question with one word." —
decoding settings are ``generate`` keyword arguments, not strategy fields, so pass them yourself.

Cost: one extra batched branch (one extra row per main row) in every forward: about 2x KV memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext
from halludec.decoding.contrast import check_int, diffusion_fill, plausibility_cutoff, replace_pixels
from halludec.decoding.side import LogitsContext


@dataclass
class VCDConfig(StrategyConfig):
    """VCD hyperparameters.

    Attributes:
        alpha: Contrast strength (``cd_alpha``); 0 turns the contrast (and the noised branch) off.
        plausibility_beta: Adaptive plausibility cutoff (``cd_beta``) in ``[0, 1]``; 0 = no cutoff.
        noise_step: Diffusion step ``T`` of the noised image, in ``[0, 999]``.
        seed: Run seed of the noise (each row's generator is seeded from it and the row's pixels).
    """

    alpha: float = 1.0
    plausibility_beta: float = 0.1
    noise_step: int = 500
    seed: int = 0

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        check_int("noise_step", self.noise_step, 0, 999)
        check_int("seed", self.seed, 0, None)


def vcd_combine(logits: torch.Tensor, noised: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD's contrast with the plausibility cutoff on the raw clean logits.

    Args:
        logits: Clean-image next-token logits ``[B, V]`` (float32).
        noised: Noised-image next-token logits ``[B, V]``.
        alpha: Contrast strength.
        beta: Plausibility cutoff (0 = none).

    Returns:
        ``(1 + alpha) * logits - alpha * noised`` with implausible tokens dropped, ``[B, V]``.
    """
    return plausibility_cutoff((1.0 + alpha) * logits - alpha * noised, logits, beta)


@register_strategy("vcd")
class VCD(Strategy):
    """Visual Contrastive Decoding: contrast the logits with those for a diffusion-noised image (Leng et al. 2024)."""

    config_class = VCDConfig
    needs_image = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2311.16922"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The released LLaVA-1.5 POPE script (cd_beta 0.2). Also sample with temperature=1, top_p=1 (generate kwargs).
        "pope_repro": {"alpha": 1.0, "plausibility_beta": 0.2, "noise_step": 500},
    }

    def side_inputs(self, call: CallContext) -> list[dict[str, Any]]:
        """The noised-image prompt (none when ``alpha`` is 0: the contrast is off)."""
        if self.config.alpha == 0.0:
            return []
        fill = diffusion_fill(call.adapter, self.config.noise_step)
        return [replace_pixels(call.inputs, call.image_spans, fill, self.config.seed, "vcd")]

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """``(1 + alpha) * l - alpha * l_noised``, then the plausibility cutoff on ``l``."""
        if not ctx.side:  # alpha == 0: only the cutoff (none when beta == 0)
            return plausibility_cutoff(logits, logits, self.config.plausibility_beta)
        (noised,) = ctx.side
        return vcd_combine(logits, noised, self.config.alpha, self.config.plausibility_beta)
