"""ZeroTuning: "Unlocking the Initial Token's Power to Enhance Large Language Models Without Training".

Han, Yu, Tang, Rao, Du, Ungar, 2025 (ICML 2025 MOSS workshop), https://arxiv.org/abs/2505.11739 (official code:
FeijiangHan/ZeroTuning). A method for text-only LLMs, carried over here to the language decoder of a
vision-language model.

The initial token is an attention sink; scaling the attention every query gives it reshapes the rest of the row.
In a tuned head, with ``a_0`` the initial token's attention and ``gamma > 0``::

    a_0' = gamma * a_0 / D,    a_i' = a_i / D,    D = 1 + (gamma - 1) * a_0

(multiply, then renormalise the row; the same as adding ``log gamma`` to the initial token's logit). ``gamma > 1``
amplifies the initial token and flattens the other tokens' attention; ``gamma < 1`` sharpens it. The relative
attention among the other tokens never changes. All query rows at the prefill, the new row at every step.

On a VLM prompt the initial token is each row's first non-pad key (left padding); it is BOS on LLaVA, and
``<|im_start|>`` on Qwen2-VL, which has no BOS.

Head rule (the paper): heads respond differently. A head profile (``profile=``, scores from
:func:`profile_heads`: the metric gain when that head alone is scaled up) labels each head *up-effective* (gain
> 0) or *down-effective* (gain < 0). ``head_rule="dominant"`` (the paper's selective rescaling) tunes only the
larger group: up-effective heads are flattened with ``max(gamma, 1/gamma)``, or down-effective heads are sharpened
with ``min(gamma, 1/gamma)``; ``"both"`` tunes both groups that way. Without a profile every head of ``layers`` is
scaled by ``gamma`` as given (what the released code does with ``heads=None``), with a warning; explicit ``heads``
are scaled by ``gamma`` as given. ``gamma`` itself is tuned on a validation set in the paper (supervised) or by
minimising output entropy (unsupervised); halludec's default 0.5 (sharpen) is the paper's direction for QA-like
tasks. Details and open questions: ``docs/methods/zerotuning.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from halludec.decoding.act import Head, check_heads, head_gains
from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.profile import check_profile_path, head_mask, load_profile, profile_path
from halludec.vlm_adapters import VLMAdapter, get_adapter

HEAD_RULES = ("dominant", "both")
PROFILE_CRITERION = "zerotuning"
"""The ``criterion`` of profiles made from :func:`profile_heads` gains."""


@dataclass
class ZeroTuningConfig(StrategyConfig):
    """ZeroTuning hyperparameters.

    Attributes:
        gamma: Scale of the initial token's attention (``< 1`` sharpens, ``> 1`` flattens, 1 = off). With a profile
            it is a strength: up-effective heads get ``max(gamma, 1/gamma)``, down-effective ``min(gamma, 1/gamma)``.
        layers: Tuned layers; None = all (the released code's default).
        heads: Explicit ``(layer, head)`` pairs, all scaled by ``gamma`` as given (overrides ``layers``).
        profile: Path of a ZeroTuning head profile (signed gains from :func:`profile_heads`).
        head_rule: With a profile: ``"dominant"`` (the paper: only the larger group is tuned) or ``"both"``.
    """

    gamma: float = 0.5
    layers: tuple[int, ...] | None = None
    heads: tuple[Head, ...] | None = None
    profile: str | None = None
    head_rule: str = "dominant"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if isinstance(self.heads, list):
            self.heads = tuple(tuple(p) if isinstance(p, list) else p for p in self.heads)
        self.profile = profile_path(self.profile)

    def validate(self) -> None:
        check_range("gamma", self.gamma, 1e-6, 1e6)
        if self.layers is not None:
            ok = isinstance(self.layers, tuple) and len(self.layers) > 0
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layers)
            if not ok:
                raise ValueError(
                    f"layers={self.layers!r} is invalid; allowed: None (all layers) or a non-empty tuple of layer "
                    "indices >= 0, e.g. (0, 1, 2, 3)."
                )
        check_heads(self.heads)
        check_profile_path(self.profile)
        if self.head_rule not in HEAD_RULES:
            raise ValueError(f"head_rule={self.head_rule!r} is invalid; allowed: {', '.join(map(repr, HEAD_RULES))}.")
        if self.heads is not None and self.profile is not None:
            raise ValueError(
                f"heads={self.heads!r} and profile={self.profile!r} were both given; pass one of them (explicit heads "
                "scaled by gamma, or a profile whose up-/down-effective heads the head rule picks)."
            )


def scale_initial(probs: torch.Tensor, initial: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """ZeroTuning's edit: each head's attention to the initial token times ``gamma``, row renormalised.

    Args:
        probs: Attention ``[B, H, q, K]`` (float32); not modified.
        initial: ``[B, K]`` bool, the initial token of each row (no True: the row is unchanged).
        gamma: ``[H]`` per-head scales (1 = head unchanged, bit for bit).

    Returns:
        New probabilities: ``a_0' = gamma a_0 / D``, ``a_i' = a_i / D``, ``D = 1 + (gamma - 1) a_0``.
    """
    g = gamma.to(probs.dtype)[None, :, None, None]  # [1, H, 1, 1]
    init = initial.to(probs.dtype)[:, None, :, None]  # [B, 1, K, 1]
    a0 = torch.matmul(probs, init)  # [B, H, q, 1] attention on the initial token
    column = 1.0 + (g - 1.0) * init.transpose(-1, -2)  # [B, H, 1, K]: gamma on the initial key, else 1
    out = probs * column  # [B, H, q, K]
    return out.div_(1.0 + (g - 1.0) * a0)  # in place on our own new tensor; gamma 1: exactly unchanged


def head_gammas(scores: torch.Tensor, gamma: float, rule: str = "dominant") -> torch.Tensor:
    """The paper's head rule: which heads are flattened or sharpened, from signed per-head gains.

    Args:
        scores: ``[L, H]`` gains of scaling each head's initial-token attention up (> 0: up-effective, < 0:
            down-effective, 0 or non-finite: neither).
        gamma: Strength; up-effective heads get ``max(gamma, 1/gamma)``, down-effective ``min(gamma, 1/gamma)``.
        rule: ``"dominant"``: only the larger group (ties: up-effective); ``"both"``: both groups.

    Returns:
        ``[L, H]`` float32 scales (1.0 on untouched heads).
    """
    clean = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)  # [L, H]
    up, down = clean > 0, clean < 0
    flatten, sharpen = max(gamma, 1.0 / gamma), min(gamma, 1.0 / gamma)
    if rule == "dominant":
        if int(up.sum()) >= int(down.sum()):
            down = torch.zeros_like(down)
        else:
            up = torch.zeros_like(up)
    elif rule != "both":
        raise ValueError(f"rule={rule!r} is invalid; allowed: {', '.join(map(repr, HEAD_RULES))}.")
    out = torch.ones_like(clean)
    return torch.where(up, flatten, torch.where(down, sharpen, out))


@dataclass
class _ZTState:
    """Per-call state: per-layer head scales and the initial token of each row."""

    gammas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] float32
    initial: torch.Tensor | None = None  # [B, L] bool


@register_strategy("zerotuning")
class ZeroTuning(Strategy):
    """Scale the attention every query gives the initial token, head by head, and renormalise."""

    config_class = ZeroTuningConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "sharpen": {"gamma": 0.5},
        "flatten": {"gamma": 2.0},
    }
    attention_rows = "all"
    paper = "https://arxiv.org/abs/2505.11739"

    def prepare(self, call: CallContext) -> None:
        state = _ZTState()
        call.state[self.state_key] = state
        if self.config.gamma == 1.0:
            return
        table = self._gammas(call.adapter)  # [L, H]
        device = call.input_ids.device
        state.gammas = {
            i: table[i].to(call.layer_device(i)) for i in range(table.shape[0]) if bool((table[i] != 1.0).any())
        }
        first = call.attention_mask.bool().long().argmax(dim=-1)  # [B] first non-pad position (left padding)
        pos = torch.arange(call.prompt_len, device=device)  # [L]
        state.initial = pos[None, :] == first[:, None]  # [B, L]

    def _gammas(self, adapter: VLMAdapter) -> torch.Tensor:
        """``[L, H]`` per-head scales from the explicit heads, the profile's head rule, or the layer set."""
        cfg = self.config
        n, n_heads = adapter.dims.num_layers, adapter.dims.num_heads
        layers = range(n) if cfg.layers is None else cfg.layers
        for layer in layers:
            adapter.check_layer(layer)
        in_layers = torch.zeros(n, n_heads, dtype=torch.bool)
        in_layers[list(layers)] = True
        if cfg.heads is not None:
            return torch.where(head_mask(cfg.heads, n, n_heads), cfg.gamma, 1.0)
        if cfg.profile is None:
            self.warn(
                f"ZeroTuning: no head profile (profile=) or head list (heads=) given, so every head of "
                f"{'all layers' if cfg.layers is None else f'layers {list(layers)}'} is scaled by gamma={cfg.gamma}. "
                "The paper tunes only its dominant head type; profile the heads with "
                "halludec.decoding.zerotuning.profile_heads and pass the saved profile.",
            )
            return torch.where(in_layers, cfg.gamma, 1.0)
        profile = load_profile(cfg.profile, adapter)
        if profile.criterion != PROFILE_CRITERION:
            self.warn(
                f"ZeroTuning: the profile {cfg.profile!r} has criterion {profile.criterion!r}; the head rule reads "
                f"signed gains (criterion {PROFILE_CRITERION!r}, from profile_heads), so non-negative scores make "
                "every scored head 'up-effective'.",
            )
        table = head_gammas(profile.tensor(), cfg.gamma, cfg.head_rule)  # [L, H]
        return torch.where(in_layers, table, 1.0)

    def attention_layers(self, call: CallContext) -> set[int]:
        return set(call.state[self.state_key].gammas)

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        state: _ZTState = ctx.call.state[self.state_key]
        return scale_initial(probs, ctx.keys(state.initial), state.gammas[ctx.layer_idx])


def profile_heads(
    evaluate: Callable[[Strategy], float],
    model: Any,
    probe_gamma: float = 1.5,
    layers: Iterable[int] | None = None,
) -> torch.Tensor:
    """ZeroTuning's head behaviour profiling: the metric gain of scaling each head's initial token up, alone.

    Args:
        evaluate: Runs the model with a strategy on a held-out sample and returns a metric, higher = better (see
            :func:`halludec.decoding.act.head_gains`); called ``1 + layers x heads`` times.
        model: The model (or its ``VLMAdapter``).
        probe_gamma: The up-scaling tried on each head (> 1).
        layers: Layers whose heads are profiled; None = all.

    Returns:
        ``[num_layers, num_heads]`` float32 gains (> 0 up-effective, < 0 down-effective). Save them with
        ``save_profile(HeadProfile.for_model(model, gains, "zerotuning", data=...), path)`` and pass ``profile=path``.
    """
    check_range("probe_gamma", probe_gamma, 1.0 + 1e-6, 1e6)
    adapter = model if isinstance(model, VLMAdapter) else get_adapter(model)
    n, n_heads = adapter.dims.num_layers, adapter.dims.num_heads
    layers = list(range(n) if layers is None else layers)
    for layer in layers:
        adapter.check_layer(layer)
    base = ZeroTuningConfig(gamma=probe_gamma)

    def make(head: Head) -> Strategy:
        return ZeroTuning(dataclasses.replace(base, heads=(head,)))

    _, gains = head_gains(evaluate, make, [(la, h) for la in layers for h in range(n_heads)], n, n_heads)
    return gains
