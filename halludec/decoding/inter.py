"""INTER: "Mitigating Hallucination in Large Vision-Language Models by Interaction Guidance Sampling".

Dong et al., ICCV 2025, https://arxiv.org/abs/2507.05056 (official code: xxxxx313/INTER, InstructBLIP only).

Image ``v`` and prompt ``p`` are two players of a cooperative game; the Harsanyi interaction (dividend) on the
next-token logits is the part of the prediction that exists only when both are present. Four branches, each with
its own KV cache and the same generated tokens (the three extra ones ride as extra batch rows of every forward):

=============  ============================  ===========================================================
branch         image                         text
=============  ============================  ===========================================================
full ``l_f``   ``v``                         the prompt
image ``l_i``  null image ``v'``             the prompt
text ``l_t``   ``v``                         the same chat template with the user question removed
all ``l_a``    ``v'`` (the same draw)        the question removed
=============  ============================  ===========================================================

Per step: ``I = l_f - l_i - l_t + l_a``; the Interactive Guided Locator keeps ``I`` only in rows whose unbiased
variance of ``I`` over the vocabulary is ``>= var_k`` (``I = 0`` elsewhere); the Interaction Probability Modifier
gives ``z = l_f + interaction_weight * I``; then VCD's adaptive plausibility cutoff on the raw ``l_f`` (``beta`` 0.1;
implausible tokens pushed far below the rest rather than to ``-inf``, see ``halludec.decoding.contrast``). It runs
inside the forward, before every processor and warper, so greedy, sampling and beam search all work.

Null inputs for LLaVA/Qwen-style models (the release covers InstructBLIP, whose text-masked input is the image with
an empty instruction): ``image_null="uniform_noise"`` is ``rand_like(pixel_values)`` on the processed pixels, as
released (element-wise, so also on Qwen's flattened patches); ``"zeros"`` and ``"noise_diffusion"`` (VCD's noise at
``noise_step``) are variants. The null image is drawn per row from a generator seeded from ``seed`` and the row's
pixels (the release uses the global RNG). The text-masked input needs the question span: pass ``processor=`` (and
optionally ``questions=``) to ``halludec.generate``.

The ``repro`` preset is the released configuration (var_k 1, beta 0.1, weight 1, uniform noise); the released POPE
script sampled with ``do_sample=True, temperature=1, top_p=1, repetition_penalty=1.5`` (``max_length`` 260) —
``generate`` keyword arguments, not strategy fields, so pass them yourself.

Cost: three extra batched branches (three extra rows per main row) in every forward: about 4x KV memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext
from halludec.decoding.contrast import (
    check_int,
    diffusion_fill,
    plausibility_cutoff,
    replace_pixels,
    uniform_fill,
    zeros_fill,
)
from halludec.decoding.side import LogitsContext

IMAGE_NULLS = ("uniform_noise", "zeros", "noise_diffusion")
ZERO_IMAGE_IS_PADDING = ("idefics3", "smolvlm")
"""Model types whose forward drops all-zero images as padding (``image_null="zeros"`` cannot work there)."""


@dataclass
class INTERConfig(StrategyConfig):
    """INTER hyperparameters.

    Attributes:
        var_k: IGL threshold on the unbiased variance over the vocabulary of the interaction (rows below get none).
        plausibility_beta: Adaptive plausibility cutoff on the full branch's raw logits, in ``[0, 1]``; 0 = none.
        interaction_weight: Weight of the interaction added to the logits; 0 turns INTER (and its branches) off.
        image_null: The image-masked input: ``"uniform_noise"`` (released), ``"zeros"`` or ``"noise_diffusion"``.
        noise_step: Diffusion step for ``image_null="noise_diffusion"``, in ``[0, 999]``.
        seed: Run seed of the null image (each row's generator is seeded from it and the row's pixels).
    """

    var_k: float = 1.0
    plausibility_beta: float = 0.1
    interaction_weight: float = 1.0
    image_null: str = "uniform_noise"
    noise_step: int = 500
    seed: int = 0

    def validate(self) -> None:
        check_range("var_k", self.var_k, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        check_range("interaction_weight", self.interaction_weight, 0.0, None)
        if self.image_null not in IMAGE_NULLS:
            raise ValueError(f"image_null={self.image_null!r} is invalid; allowed: {', '.join(IMAGE_NULLS)}.")
        check_int("noise_step", self.noise_step, 0, 999)
        check_int("seed", self.seed, 0, None)


def inter_combine(
    full: torch.Tensor,
    no_image: torch.Tensor,
    no_text: torch.Tensor,
    neither: torch.Tensor,
    var_k: float,
    weight: float,
    beta: float,
) -> torch.Tensor:
    """INTER's gated interaction guidance with the plausibility cutoff on the full branch.

    Args:
        full: Logits with image and prompt ``[B, V]`` (float32).
        no_image: Logits with the null image ``[B, V]``.
        no_text: Logits with the question removed ``[B, V]``.
        neither: Logits with both removed ``[B, V]``.
        var_k: Rows whose interaction has unbiased variance over the vocabulary ``< var_k`` get no guidance.
        weight: Interaction weight.
        beta: Plausibility cutoff (0 = none).

    Returns:
        ``full + weight * gate * I`` with implausible tokens dropped, ``[B, V]``.
    """
    interaction = full - no_image - no_text + neither  # [B, V]
    gate = interaction.var(dim=-1, keepdim=True) >= var_k  # [B, 1], unbiased
    interaction = torch.where(gate, interaction, torch.zeros_like(interaction))
    return plausibility_cutoff(full + weight * interaction, full, beta)


@register_strategy("inter")
class INTER(Strategy):
    """Interaction Guidance Sampling: add the image-text Harsanyi interaction to the logits (Dong et al. 2025)."""

    config_class = INTERConfig
    needs_image = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2507.05056"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The released code; it sampled with temperature=1, top_p=1, repetition_penalty=1.5 (generate kwargs).
        "repro": {"var_k": 1.0, "plausibility_beta": 0.1, "interaction_weight": 1.0, "image_null": "uniform_noise"},
    }

    def side_inputs(self, call: CallContext) -> list[dict[str, Any]]:
        """The image-masked, text-masked and both-masked prompts (none when ``interaction_weight`` is 0)."""
        if self.config.interaction_weight == 0.0:
            return []
        model_type = call.model.config.model_type
        if self.config.image_null == "zeros" and model_type in ZERO_IMAGE_IS_PADDING:
            raise ValueError(
                f"image_null='zeros' cannot be used with {model_type!r}: the model treats an all-zero image as "
                "padding and drops it. Use image_null='uniform_noise' (the default) or 'noise_diffusion'."
            )
        fill = {
            "uniform_noise": uniform_fill,
            "zeros": zeros_fill,
            "noise_diffusion": diffusion_fill(call.adapter, self.config.noise_step),
        }[self.config.image_null]
        no_image = replace_pixels(
            call.inputs, call.image_spans, fill, self.config.seed, f"inter:{self.config.image_null}"
        )
        no_text = call.adapter.without_spans_inputs(call.inputs, call.query_spans)
        neither = {**no_text, "pixel_values": no_image["pixel_values"]}
        return [no_image, no_text, neither]

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """``l_f + w * gate * (l_f - l_i - l_t + l_a)``, then the plausibility cutoff on ``l_f``."""
        if not ctx.side:  # interaction_weight == 0: only the cutoff (none when beta == 0)
            return plausibility_cutoff(logits, logits, self.config.plausibility_beta)
        no_image, no_text, neither = ctx.side
        c = self.config
        return inter_combine(logits, no_image, no_text, neither, c.var_k, c.interaction_weight, c.plausibility_beta)
