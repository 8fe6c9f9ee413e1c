"""ONLY: One-Layer Intervention Sufficiently Mitigates Hallucinations in Large Vision-Language Models.

Wan, Zhang, Yong, Ma, Stepputtis, Morency, Ramanan, Sycara, Xie, ICCV 2025, https://arxiv.org/abs/2507.00898
(official code ``zifuwan/ONLY``, read at commit ``109bffe``). Details, equations and sources:
``docs/methods/only.md``.

A *textually enhanced* next-token distribution is built inside the main forward, at the cost of one extra attention
row, one MLP and one LM-head row per step (no second pass), then combined with the model's own logits:

1. **Textually enhanced attention** (layer ``layer``, default 0; the last query row only). From the layer's own
   attention probabilities ``A`` ``[H, K]``: in each key group (text keys = non-image keys but the row's first token;
   image keys) the entries above the group's ``mean + std`` are zeroed; each head's text-to-visual entropy ratio
   ``r_h = H(text) / H(image)`` (entropies of the renormalised groups) is computed, heads with ``r_h`` below the mean
   over heads are dropped (zero), and ``a~ = o_proj(A~ V)`` is the enhanced attention output.
2. **One-layer propagation** (the released code): ``a~`` skips the layers between and enters the last decoder layer
   with its input norm and a fraction of the main residual stream ``h`` entering that layer:
   ``x = norm_in(a~) + residual_weight * h``, ``y = x + mlp(norm_mlp(x))``, and
   ``l~ = lm_head(norm_final(y) + main_weight * norm_final(h_L))``.
3. **Distance-gated combination**: ``d = sum_v |softmax(l) - softmax(l~)|`` per row; ``d < gamma`` gives the
   collaborative ``l + alpha_collab * l~``, otherwise the contrastive
   ``(1 + alpha_contrast) * l - alpha_contrast * l~``; then VCD's plausibility cutoff on ``l``
   (``plausibility_beta``). It runs inside the forward, before ``generate``'s processors and warpers, so greedy,
   sampling and beam search work (the released code patches ``sample()`` only).

Batches: every quantity is per row (key groups from each row's padding, image mask and first token); beams repeat
rows. Side rows of composed strategies are never read, and the one-layer path calls the modules' ``forward``
directly, so no other strategy's hook acts on it. The values come from ``LayerContext.value``.

Cost: single pass. Per step, one explicit float32 attention row in one layer, one extra MLP and LM-head row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.contrast import check_int, plausibility_cutoff
from halludec.decoding.side import LogitsContext

LOG_EPS = 1e-6
"""Inside the entropy's log, as in the released code: ``-sum p log(p + 1e-6)``."""
MIN_IMAGE_ENTROPY = 1e-6
"""Floor of the image entropy in the ratio (one surviving image key would give ``-1e-6``: a sign flip)."""


@dataclass
class ONLYConfig(StrategyConfig):
    """ONLY hyperparameters (the released LLaVA-1.5 POPE script; see ``docs/methods/only.md``).

    Attributes:
        alpha_collab: Weight of the enhanced logits in the collaborative mode (``ritual_alpha_pos``, 3).
        alpha_contrast: Contrast strength in the contrastive mode (``ritual_alpha_neg``, 1).
        plausibility_beta: Adaptive plausibility cutoff on the main logits in ``[0, 1]`` (``ritual_beta``, 0.1).
        gamma: Threshold on the L1 distance ``sum |p - p~|`` in ``[0, 2]`` (``js_gamma``, 0.2): below it the two
            distributions collaborate, at or above it they contrast.
        layer: The decoder layer whose attention is textually enhanced (``enhance_layer_index``, 0).
        residual_weight: Weight of the main residual stream added in the last layer (0.2 in the code).
        main_weight: Weight of the main final hidden state added before the LM head (0.5 in the code).
        skip_first_key: Leave the row's first token (BOS / attention sink) out of the text keys (the code's
            ``1:35`` slice on LLaVA-1.5).
    """

    alpha_collab: float = 3.0
    alpha_contrast: float = 1.0
    plausibility_beta: float = 0.1
    gamma: float = 0.2
    layer: int = 0
    residual_weight: float = 0.2
    main_weight: float = 0.5
    skip_first_key: bool = True

    def validate(self) -> None:
        check_range("alpha_collab", self.alpha_collab, 0.0, None)
        check_range("alpha_contrast", self.alpha_contrast, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        check_range("gamma", self.gamma, 0.0, 2.0)
        check_int("layer", self.layer, 0, None)
        check_range("residual_weight", self.residual_weight, 0.0, None)
        check_range("main_weight", self.main_weight, 0.0, None)
        if not isinstance(self.skip_first_key, bool):
            raise ValueError(f"skip_first_key={self.skip_first_key!r} is invalid; allowed: True or False.")


# ------------------------------------------------------------------------------------------------ math
def drop_outliers(probs: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Zero the entries of a key group above the group's ``mean + std`` (unbiased), per row and head.

    Args:
        probs: Attention probabilities ``[B, H, K]`` (float32).
        group: ``[B, K]`` bool, the keys of the group.

    Returns:
        ``[B, H, K]``: ``probs`` with the group's outliers set to 0 (other keys unchanged); input not modified.
    """
    g = group[:, None, :]  # [B, 1, K]
    n = g.sum(-1, keepdim=True).to(probs.dtype)  # [B, 1, 1]
    mean = (probs * g).sum(-1, keepdim=True) / n.clamp_min(1.0)  # [B, H, 1]
    var = ((probs - mean).square() * g).sum(-1, keepdim=True) / (n - 1.0).clamp_min(1.0)  # [B, H, 1]
    return torch.where(g & (probs > mean + var.sqrt()), torch.zeros_like(probs), probs)


def group_entropy(probs: torch.Tensor, group: torch.Tensor, empty: float) -> torch.Tensor:
    """Entropy ``-sum p log(p + 1e-6)`` of the probabilities of a key group, renormalised to sum to 1.

    Args:
        probs: ``[B, H, K]`` (float32).
        group: ``[B, K]`` bool.
        empty: The value where the group holds no mass (the code's NaN replacement: 0 text, inf image).

    Returns:
        ``[B, H]`` entropies.
    """
    w = probs * group[:, None, :]  # [B, H, K]
    total = w.sum(-1, keepdim=True)  # [B, H, 1]
    p = w / torch.where(total > 0, total, torch.ones_like(total))  # [B, H, K]
    h = -(p * torch.log(p + LOG_EPS)).sum(-1)  # [B, H]
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, empty))


def enhanced_probs(probs: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONLY's textually enhanced attention: outliers dropped per group, heads kept by their TVER.

    Args:
        probs: The last query row's attention probabilities ``[B, H, K]`` (float32).
        text: ``[B, K]`` bool, the text keys.
        image: ``[B, K]`` bool, the image keys (disjoint from ``text``).

    Returns:
        ``(probs~ [B, H, K], keep [B, H] bool)``: heads with ``H_text / H_image`` at or above the mean over heads
        keep their outlier-free probabilities (not renormalised); the others are zero.
    """
    cleaned = drop_outliers(drop_outliers(probs, text), image)  # [B, H, K]
    h_text = group_entropy(cleaned, text, 0.0)  # [B, H]
    h_image = group_entropy(cleaned, image, math.inf).clamp_min(MIN_IMAGE_ENTROPY)  # [B, H]
    ratio = h_text / h_image  # [B, H]
    keep = ratio >= ratio.mean(-1, keepdim=True)  # [B, H]
    return cleaned * keep[..., None], keep


def gated_combine(
    logits: torch.Tensor, enhanced: torch.Tensor, alpha_collab: float, alpha_contrast: float, gamma: float, beta: float
) -> torch.Tensor:
    """ONLY's distance-gated combination and the plausibility cutoff.

    Args:
        logits: Main next-token logits ``[B, V]`` (float32).
        enhanced: Textually enhanced logits ``[B, V]`` (float32).
        alpha_collab: Collaborative weight.
        alpha_contrast: Contrastive strength.
        gamma: Threshold on ``sum |softmax(logits) - softmax(enhanced)|`` (per row).
        beta: Plausibility cutoff on ``logits`` (0 = none).

    Returns:
        ``[B, V]``: ``l + a1 l~`` where the distance is below ``gamma``, else ``(1 + a2) l - a2 l~``, cut.
    """
    distance = (logits.softmax(-1) - enhanced.softmax(-1)).abs().sum(-1, keepdim=True)  # [B, 1]
    collab = logits + alpha_collab * enhanced  # [B, V]
    contrast = (1.0 + alpha_contrast) * logits - alpha_contrast * enhanced  # [B, V]
    return plausibility_cutoff(torch.where(distance < gamma, collab, contrast), logits, beta)


# ------------------------------------------------------------------------------------------- strategy
@dataclass
class _ONLYState:
    """Per-call state: the main rows' last-position tensors read during the current forward."""

    attn: torch.Tensor | None = None  # [Bm, 1, D] enhanced attention output of `layer`
    residual: torch.Tensor | None = None  # [Bm, 1, D] residual stream entering the last layer
    final: torch.Tensor | None = None  # [Bm, 1, D] main final hidden state after the final norm
    modules: dict[str, Any] = field(default_factory=dict)


def _first_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool, True at each row's first real (non-padding) token."""
    real = attention_mask.bool()  # [B, L]
    return real & (real.long().cumsum(-1) == 1)


def _block_parts(block: nn.Module, layer: int) -> dict[str, nn.Module | None]:
    """The last decoder layer's input norm, pre-MLP norm, MLP and (Gemma-style) post-MLP norm."""
    parts = {
        "norm_in": getattr(block, "input_layernorm", None),
        # Gemma-style blocks norm the MLP input with pre_feedforward_layernorm (post_attention_layernorm norms the
        # attention output there); Llama-style blocks with post_attention_layernorm.
        "norm_pre": getattr(block, "pre_feedforward_layernorm", None)
        or getattr(block, "post_attention_layernorm", None),
        "mlp": getattr(block, "mlp", None),
    }
    missing = [k for k, v in parts.items() if not isinstance(v, nn.Module)]
    if missing:
        raise ValueError(
            f"ONLY runs its enhanced attention output through the last decoder layer's norms and MLP, but layer "
            f"{layer} ({type(block).__name__}) lacks input_layernorm / post_attention_layernorm / mlp; this "
            "decoder block layout is not supported."
        )
    parts["norm_post"] = getattr(block, "post_feedforward_layernorm", None)
    return parts


@register_strategy("only")
class ONLY(Strategy):
    """One-layer textually enhanced attention, contrasted or combined with the logits by their distance."""

    config_class = ONLYConfig
    needs_image = True
    attention_rows = "last"
    paper: ClassVar[str] = "https://arxiv.org/abs/2507.00898"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The released LLaVA-1.5 POPE script (= the defaults); sample with temperature=1, top_p=1 (generate kwargs).
        "repro": {"alpha_collab": 3.0, "alpha_contrast": 1.0, "plausibility_beta": 0.1, "gamma": 0.2, "layer": 0},
        "chair": {"gamma": 0.25},  # chair_eval.sh
        "mme": {"plausibility_beta": 0.4, "gamma": 0.25},  # mme_eval.sh
    }

    @property
    def _branch(self) -> bool:
        """Whether the enhanced logits are needed (some alpha is non-zero)."""
        return self.config.alpha_collab != 0.0 or self.config.alpha_contrast != 0.0

    def logits_enabled(self, call: CallContext) -> bool:
        """Off when both alphas and the cutoff are 0 (plain decoding)."""
        return self._branch or self.config.plausibility_beta != 0.0

    def attention_layers(self, call: CallContext) -> set[int]:
        """The enhanced layer, when the enhanced logits are needed."""
        return {self.config.layer} if self._branch else set()

    def prepare(self, call: CallContext) -> None:
        """Find the modules of the one-layer path and install the hooks reading the residual stream."""
        state = _ONLYState()
        call.state[self.state_key] = state
        if not self._branch:
            return
        adapter = call.adapter
        adapter.check_layer(self.config.layer)
        last = adapter.dims.num_layers - 1
        block = adapter.layers[last]
        state.modules = {
            **_block_parts(block, last),
            "o_proj": adapter.o_proj(self.config.layer),
            "norm_final": adapter.decoder.norm,
            "lm_head": call.model.get_output_embeddings(),
            "softcap": getattr(adapter.text_config, "final_logit_softcapping", None),
            "first": _first_tokens(call.attention_mask) if self.config.skip_first_key else None,  # [B, L]
        }
        call.register_hook(block, self._residual_hook(call, state), pre=True, with_kwargs=True)
        call.register_hook(adapter.decoder.norm, self._final_hook(call, state), pre=False)

    @staticmethod
    def _residual_hook(call: CallContext, state: _ONLYState):
        """Pre-hook on the last decoder layer: keep the main rows' last-position input (the residual stream)."""

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if call.suspended:
                return
            x = args[0] if args else kwargs["hidden_states"]  # [B_all, q, D]
            state.residual = x[: call.main_rows(x.shape[0]), -1:]  # [Bm, 1, D]

        return hook

    @staticmethod
    def _final_hook(call: CallContext, state: _ONLYState):
        """Forward hook on the final norm: keep the main rows' last-position output."""

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if call.suspended:
                return
            state.final = output[: call.main_rows(output.shape[0]), -1:]  # [Bm, 1, D]

        return hook

    def edit_scores(self, scores: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Build the enhanced attention output of the last query row from this layer's scores; scores unchanged."""
        state: _ONLYState = ctx.call.state[self.state_key]
        mods = state.modules
        last = scores[:, :, -1]  # [B, H, K]
        valid = last[:, 0] > torch.finfo(last.dtype).min / 2  # [B, K]: masked keys hold finfo.min
        image = ctx.image_keys() & valid  # [B, K]
        text = valid & ~image  # [B, K]
        if mods["first"] is not None:
            text = text & ~ctx.keys(mods["first"])
        probs, _ = enhanced_probs(last.softmax(-1), text, image)  # [B, H, K]
        value = ctx.value  # [B, Hkv, K, d]
        b, h, k = probs.shape
        kv_heads, d = value.shape[1], value.shape[3]
        grouped = probs.reshape(b, kv_heads, h // kv_heads, k)  # [B, Hkv, G, K]
        out = torch.matmul(grouped, value.float())  # [B, Hkv, G, d]
        out = out.reshape(b, 1, h * d)  # [B, 1, H*d]
        o_proj = mods["o_proj"]
        state.attn = o_proj.forward(out.to(o_proj.weight.dtype))  # [B, 1, D] (.forward: no hooks)
        return scores

    def _enhanced_logits(self, state: _ONLYState) -> torch.Tensor:
        """``lm_head(norm_final(y) + main_weight * norm_final(h_L))`` for the main rows' last position."""
        cfg, mods = self.config, state.modules
        # .forward throughout: neither our final-norm hook nor other strategies' hooks see this path
        # (.to: the layers may sit on different devices under device_map; a no-op otherwise)
        attn = state.attn.to(state.residual.device)
        x = mods["norm_in"].forward(attn) + cfg.residual_weight * state.residual  # [Bm, 1, D]
        ffn = mods["mlp"].forward(mods["norm_pre"].forward(x))  # [Bm, 1, D]
        if mods["norm_post"] is not None:
            ffn = mods["norm_post"].forward(ffn)
        y = (x + ffn).to(state.final.device)  # [Bm, 1, D]
        z = mods["norm_final"].forward(y) + cfg.main_weight * state.final  # [Bm, 1, D]
        head = mods["lm_head"]
        logits = head.forward(z.to(head.weight.device))[:, -1].float()  # [Bm, V]
        if mods["softcap"] is not None:
            logits = torch.tanh(logits / mods["softcap"]) * mods["softcap"]
        return logits

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """The gated combination with the enhanced logits, then the plausibility cutoff."""
        cfg = self.config
        if not self._branch:
            return plausibility_cutoff(logits, logits, cfg.plausibility_beta)
        enhanced = self._enhanced_logits(ctx.call.state[self.state_key])  # [Bm, V]
        return gated_combine(logits, enhanced, cfg.alpha_collab, cfg.alpha_contrast, cfg.gamma, cfg.plausibility_beta)
