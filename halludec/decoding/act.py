"""ACT: "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training through
Attention Calibration".

Yu, Wang, Fu, Shi, Shaikh, Lin, ICML 2024, https://arxiv.org/abs/2406.15765 (official code: GATECH-EIC/ACT).
A method for text-only LLMs, carried over here to the language decoder of a vision-language model.

Attention sinks appear not only at the first token but also at later ones, and some of them hurt accuracy. In a
set of heads, ACT finds those later sinks from the attention they receive and hands most of their attention back to
the other tokens. Per steered head ``h`` of row ``b`` (post-softmax attention ``A = A[b, h]``):

1. **Sinks** (prefill, from the prompt's full attention map): ``recv[j] = sum_i A[i, j] / n_j``, the mean attention
   key ``j`` receives from the ``n_j`` prompt rows that can see it (``n_j = T - j``; capped by the window in
   sliding-window layers; padded rows excluded). Key ``j`` is a sink when ``recv[j] > threshold`` (strict), except
   the initial token (the row's first non-pad key), which ACT keeps.
2. **Calibration** of every query row ``i``: sinks keep ``keep_frac`` of their attention; the freed mass
   ``(1 - keep_frac) * sum_{j in S} A[i, j]`` goes to the non-sink keys in proportion to their attention
   (``A[i, j] / sum_{k not in S} A[i, k]``, the initial token included). Row sums are preserved.

At decode the sink set found at prefill is kept (generated tokens are never sinks) and the single query row is
calibrated with the same formula. Resolutions of the open questions (details in ``docs/methods/act.md``): the
released code drops the *first sink found* (BOS when BOS is a sink); halludec always exempts the initial token and
nothing else. Its ``A[0, 0] = 1`` line is a no-op on the prompt's first row and is not reproduced. Its chat script
re-detects sinks on each single decode row (degenerate there); halludec freezes the prefill's sinks.

Heads: ACT's per-task offline calibration (each head tried alone on ~900 samples, kept if accuracy improves) is
replaced by halludec's head tools: an explicit ``heads`` list (e.g. from :func:`calibrate_act_heads`, which runs
that search with your metric on a held-out sample), or the top ``profile_k`` share of a head profile (``profile=``,
restricted to the layer band). With neither, every head of layers ``first_layer .. L-2`` is calibrated (``L-1``
with ``skip_last_layer=False``), with a warning. The ``chat`` preset is the released MT-bench script's setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from halludec.decoding.base import Strategy, StrategyConfig, check_range, get_strategy, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.profile import (
    check_profile_k,
    check_profile_path,
    head_mask,
    profile_head_mask,
    profile_path,
)
from halludec.vlm_adapters import VLMAdapter, get_adapter

Head = tuple[int, int]


def check_heads(value: Any) -> tuple[Head, ...] | None:
    """Validate a ``heads`` field (None or ``(layer, head)`` pairs of ints >= 0); returns it as a tuple of tuples."""
    if value is None:
        return None
    pairs = list(value) if isinstance(value, (list, tuple)) else None
    ok = pairs is not None and len(pairs) > 0
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for p in pairs for v in p)
    if not ok:
        raise ValueError(
            f"heads={value!r} is invalid; allowed: None or a non-empty list of (layer, head) pairs of integers >= 0, "
            "e.g. ((2, 0), (5, 3))."
        )
    return tuple((int(a), int(b)) for a, b in pairs)


@dataclass
class ACTConfig(StrategyConfig):
    """ACT hyperparameters (defaults: the released scripts).

    Attributes:
        keep_frac: Fraction of a sink's attention it keeps (the code's ``beta`` = 0.4); 1.0 = off.
        threshold: A key is a sink when the mean attention it receives exceeds this (code ``thres`` = 0.1; the
            released chat script uses 0.15).
        first_layer: First calibrated layer of the band (code: 2).
        skip_last_layer: Leave the last decoder layer out of the band (the classification code: layers 2..30 of 32).
        heads: Explicit ``(layer, head)`` pairs to calibrate (e.g. from :func:`calibrate_act_heads`), used as given.
        profile: Path of a head profile JSON: calibrate its top ``profile_k`` heads inside the band.
        profile_k: Share of all heads taken from the profile, in (0, 1].
    """

    keep_frac: float = 0.4
    threshold: float = 0.1
    first_layer: int = 2
    skip_last_layer: bool = True
    heads: tuple[Head, ...] | None = None
    profile: str | None = None
    profile_k: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.heads, list):
            self.heads = tuple(tuple(p) if isinstance(p, list) else p for p in self.heads)
        self.profile = profile_path(self.profile)

    def validate(self) -> None:
        check_range("keep_frac", self.keep_frac, 0.0, 1.0)
        check_range("threshold", self.threshold, 0.0, 1.0)
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, int) or self.first_layer < 0:
            raise ValueError(f"first_layer={self.first_layer!r} is invalid; allowed: an integer >= 0 (ACT: 2).")
        if not isinstance(self.skip_last_layer, bool):
            raise ValueError(f"skip_last_layer={self.skip_last_layer!r} is invalid; allowed: True or False.")
        check_heads(self.heads)
        check_profile_path(self.profile)
        check_profile_k(self.profile_k)
        if self.heads is not None and self.profile is not None:
            raise ValueError(
                f"heads={self.heads!r} and profile={self.profile!r} were both given; pass one of them (an explicit "
                "head list, or a profile whose top heads are used)."
            )


def received_attention(probs: torch.Tensor, valid_rows: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Mean attention each key receives from the prompt rows that can see it (ACT's sink statistic).

    Args:
        probs: Prefill attention ``[B, H, q, K]`` (float32), query row ``i`` at position ``i``.
        valid_rows: ``[B, q]`` bool, non-padding query rows.
        window: Sliding-window size of the layer (a key is seen by at most this many rows), or None.

    Returns:
        ``[B, H, K]``: column sums over valid rows divided by ``n_j = q - j`` (capped by ``window``); 0 for ``j >= q``.
    """
    q_len, kv_len = probs.shape[-2:]
    col = torch.matmul(valid_rows[:, None, None, :].to(probs.dtype), probs)[:, :, 0]  # [B, H, K] sum over rows
    seen = (q_len - torch.arange(kv_len, device=probs.device)).clamp_min(0)  # [K] rows i >= j
    if window is not None:
        seen = seen.clamp_max(window)
    return col / seen.clamp_min(1).to(probs.dtype)  # [B, H, K]


def find_sinks(
    probs: torch.Tensor,
    valid_rows: torch.Tensor,
    valid_keys: torch.Tensor,
    initial: torch.Tensor,
    threshold: float,
    window: int | None = None,
) -> torch.Tensor:
    """ACT's sinks per head: keys whose mean received attention exceeds ``threshold``, the initial token excepted.

    Args:
        probs: Prefill attention ``[B, H, q, K]`` (float32).
        valid_rows: ``[B, q]`` bool, non-padding query rows.
        valid_keys: ``[B, K]`` bool, non-padding keys of the prompt.
        initial: ``[B, K]`` bool, the initial token (first non-pad key) of each row.
        threshold: Strict lower bound on the mean received attention.
        window: Sliding-window size of the layer, or None.

    Returns:
        ``[B, H, K]`` bool.
    """
    recv = received_attention(probs, valid_rows, window)  # [B, H, K]
    return (recv > threshold) & (valid_keys & ~initial)[:, None, :]


def calibrate(probs: torch.Tensor, sinks: torch.Tensor, keep: float, heads: torch.Tensor) -> torch.Tensor:
    """ACT's calibration: sinks keep ``keep`` of their attention, the rest goes to the other keys proportionally.

    Args:
        probs: Attention ``[B, H, q, K]`` (float32); not modified.
        sinks: ``[B, H, K]`` bool, the sink keys of each head.
        keep: Fraction of sink attention kept.
        heads: ``[H]`` bool, the calibrated heads (others are returned unchanged, bit for bit).

    Returns:
        New probabilities; row sums preserved. A row whose non-sink attention is 0 is left unchanged.
    """
    s = (sinks & heads[None, :, None]).to(probs.dtype)[..., None]  # [B, H, K, 1] unselected heads: no sinks
    sink_mass = torch.matmul(probs, s)  # [B, H, q, 1]
    rest_total = torch.matmul(probs, 1.0 - s)  # [B, H, q, 1] attention on non-sink keys
    ok = rest_total > 0
    # Non-sink keys get their share of the freed mass: a_ij * (1 + freed_i / rest_i); sinks keep ``keep``.
    gain = 1.0 + (1.0 - keep) * sink_mass / rest_total.clamp_min(torch.finfo(probs.dtype).tiny)  # [B, H, q, 1]
    gain = torch.where(ok, gain, 1.0)
    kept = torch.where(ok, keep, 1.0)  # [B, H, q, 1]
    return probs * torch.where(s.transpose(-1, -2) > 0, kept, gain)  # [B, H, q, K]; exactly 1x off the sinks' heads


@dataclass
class _ACTState:
    """Per-call state: the calibrated heads per layer, per-row key masks, and the sinks found at prefill."""

    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] bool
    initial: torch.Tensor | None = None  # [B, L] bool
    valid: torch.Tensor | None = None  # [B, L] bool
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [rows, H, L] bool


@register_strategy("act")
class ACT(Strategy):
    """Scale down hidden attention sinks (beyond the first token) in a head set; hand their mass to the others."""

    config_class = ACTConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "chat": {"threshold": 0.15, "skip_last_layer": False},
    }
    attention_rows = "all"
    paper = "https://arxiv.org/abs/2406.15765"

    def prepare(self, call: CallContext) -> None:
        state = _ACTState()
        call.state[self.state_key] = state
        if self.config.keep_frac == 1.0:
            return
        mask = self._head_mask(call.adapter)  # [L, H] bool
        device = call.input_ids.device
        state.heads = {i: mask[i].to(call.layer_device(i)) for i in range(mask.shape[0]) if mask[i].any()}
        state.valid = call.attention_mask.bool()  # [B, L]
        first = state.valid.long().argmax(dim=-1)  # [B] first non-pad position (left padding)
        pos = torch.arange(call.prompt_len, device=device)  # [L]
        state.initial = pos[None, :] == first[:, None]  # [B, L]

    def _head_mask(self, adapter: VLMAdapter) -> torch.Tensor:
        """``[L, H]`` bool: explicit heads, else the profile's top heads in the band, else the whole band."""
        cfg = self.config
        n, n_heads = adapter.dims.num_layers, adapter.dims.num_heads
        last = n - 2 if cfg.skip_last_layer else n - 1
        band = torch.zeros(n, n_heads, dtype=torch.bool)
        band[cfg.first_layer : last + 1] = True
        if cfg.heads is not None:
            return head_mask(cfg.heads, n, n_heads)
        if cfg.profile is not None:
            mask = profile_head_mask(cfg.profile, adapter, cfg.profile_k) & band
            if not mask.any():
                self.warn(
                    f"ACT: the profile {cfg.profile!r} has no head among its top profile_k={cfg.profile_k} in layers "
                    f"{cfg.first_layer}..{last}; attention is left unchanged. Raise profile_k or widen the band.",
                )
            return mask
        if not band.any():
            self.warn(
                f"ACT: the layer band {cfg.first_layer}..{last} of this {n}-layer model is empty; attention is left "
                "unchanged. Lower first_layer or set skip_last_layer=False.",
            )
        else:
            self.warn(
                f"ACT: no head list (heads=) or head profile (profile=) given, so every head of layers "
                f"{cfg.first_layer}..{last} is calibrated. ACT calibrates a per-task head set chosen offline; find "
                "one with halludec.decoding.act.calibrate_act_heads or pass a profile.",
            )
        return band

    def attention_layers(self, call: CallContext) -> set[int]:
        return set(call.state[self.state_key].heads)

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        state: _ACTState = ctx.call.state[self.state_key]
        layer = ctx.layer_idx
        length = ctx.call.prompt_len
        if ctx.q_len == length and probs.shape[2] == length:  # the prefill: find this layer's sinks
            valid_rows = ctx.rows(state.valid)  # [rows, L] query row i is position i
            window = getattr(ctx.module, "sliding_window", None) if layer in ctx.call.sliding_layers else None
            sinks = find_sinks(
                probs, valid_rows, ctx.keys(state.valid), ctx.keys(state.initial), self.config.threshold, window
            )
            state.sinks[layer] = sinks[..., :length]  # [rows, H, L]
        elif layer in state.sinks:
            sinks = self._fit(state.sinks[layer], ctx)
        else:  # no prefill seen (a cache passed in from outside): leave attention alone
            return probs
        return calibrate(probs, sinks, self.config.keep_frac, state.heads[layer])

    @staticmethod
    def _fit(sinks: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Per-head prompt positions ``[rows, H, L]`` fitted to this call's keys ``[batch, H, K]``."""
        if ctx.layer_idx in ctx.call.sliding_layers and ctx.call.cache is not None:
            return torch.stack([ctx.keys(sinks[:, h]) for h in range(sinks.shape[1])], dim=1)  # [batch, H, K]
        length = sinks.shape[-1]
        if ctx.kv_len > length:
            sinks = F.pad(sinks, (0, ctx.kv_len - length))  # [rows, H, K] generated keys are never sinks
        elif ctx.kv_len < length:
            sinks = sinks[..., : ctx.kv_len]  # [rows, H, K]
        return ctx.rows(sinks)


# --------------------------------------------------------------------------------------------- calibration
def head_gains(
    evaluate: Callable[[Strategy], float],
    make: Callable[[Head], Strategy],
    candidates: Iterable[Head],
    num_layers: int,
    num_heads: int,
) -> tuple[float, torch.Tensor]:
    """Try an edit on one head at a time and record how much it moves a metric (ACT's offline head search).

    Args:
        evaluate: Runs the model with a strategy on a held-out sample and returns a metric, higher = better (e.g.
            POPE F1 of ``halludec.benchmarks.runner.run_benchmark`` on 100 questions, or a target token's
            log-probability). Called ``1 + len(candidates)`` times.
        make: Builds the strategy that edits only the given ``(layer, head)``.
        candidates: The heads to try.
        num_layers: Decoder layers of the model.
        num_heads: Query heads per layer.

    Returns:
        ``(baseline, gains)``: the metric with ``strategy="none"``, and ``[num_layers, num_heads]`` float32 gains
        (metric with the head's edit minus the baseline; 0 for heads not tried).
    """
    baseline = float(evaluate(get_strategy("none")))
    gains = torch.zeros(num_layers, num_heads)
    for layer, head in candidates:
        gains[layer, head] = float(evaluate(make((layer, head)))) - baseline
    return baseline, gains


def calibrate_act_heads(
    evaluate: Callable[[Strategy], float],
    model: Any,
    config: ACTConfig | None = None,
    layers: Iterable[int] | None = None,
    min_gain: float = 0.0,
) -> tuple[list[Head], torch.Tensor]:
    """ACT's head search with your metric: keep the heads whose calibration alone improves it.

    Args:
        evaluate: See :func:`head_gains` (a held-out sample, not the evaluation set).
        model: The model (or its ``VLMAdapter``).
        config: ACT settings to calibrate with (``keep_frac``, ``threshold``); defaults to ``ACTConfig()``.
        layers: Layers whose heads are tried; None = the config's band (``first_layer .. L-2`` by default).
        min_gain: A head is kept when its gain exceeds this.

    Returns:
        ``(heads, gains)``: kept ``(layer, head)`` pairs, best first (pass them as ``heads=``), and the
        ``[num_layers, num_heads]`` gain table (save it with ``HeadProfile.for_model(model, gains, "act_gain", ...)``).
    """
    adapter = model if isinstance(model, VLMAdapter) else get_adapter(model)
    config = config or ACTConfig()
    n, n_heads = adapter.dims.num_layers, adapter.dims.num_heads
    if layers is None:
        last = n - 2 if config.skip_last_layer else n - 1
        layers = range(config.first_layer, last + 1)
    layers = list(layers)
    for layer in layers:
        adapter.check_layer(layer)
    candidates = [(layer, head) for layer in layers for head in range(n_heads)]

    def make(head: Head) -> Strategy:
        return ACT(dataclasses.replace(config, heads=(head,), profile=None))

    _, gains = head_gains(evaluate, make, candidates, n, n_heads)
    kept = [(lh[0], lh[1]) for lh in candidates if gains[lh].item() > min_gain]
    kept.sort(key=lambda lh: -gains[lh].item())
    return kept, gains
