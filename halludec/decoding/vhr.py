"""VHR: Vision-aware Head Reinforcement.

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", ACL 2025,
https://arxiv.org/abs/2412.13949 (official code jinghan1he/VHR was not available; this follows the paper, Alg. 1).

At the first step, the prompt with and without the image run in lockstep (one forward over both, before
generation). Layer by layer over the configured layer set, each head's VHD (distance between its output with and
without the image at the last prompt position) is computed; heads whose VHD and text-branch energy are both above
mean + std are zeroed as negative-sensitivity outliers; heads above the layer's median VHD are reinforced: their
outputs are multiplied by ``alpha`` before later layers run. The head sets are then fixed for the whole generation
and every forward scales those heads at all positions (per row: each sample gets its own heads).

Layer sets: ``{1} ∪ {L-14, ..., L-1}`` on 32-layer models (LLaVA-1.5-7B, LLaVA-NeXT-7B, as in the paper);
``{1} ∪`` the last ``round(14/32 * L)`` layers otherwise (e.g. {1, 16..27} for Qwen2-VL's 28 layers).
Cost: one extra prefill over the prompt and its image-free copy; decoding steps only scale head outputs (sdpa kept).

**Fixed VHR** (the paper's "fixed heads" ablation, Table 4: one head set for all samples): with ``profile=`` (a head
profile JSON, e.g. ``halludec heads --criterion vhd``), the profile's top ``profile_k`` share of all heads replaces
the per-sample selection and no lockstep pass runs. With ``layers=None`` every profile head is reinforced, in
whatever layer it is; with ``layers`` given, only the profile heads in those layers. The paper found this variant
much worse than per-sample selection (CHAIR_S 44.72 vs 33.32 on LLaVA-1.5-7B); it costs nothing at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext, LayerContext
from halludec.decoding.profile import check_profile_k, check_profile_path, profile_head_mask, profile_path
from halludec.decoding.vhd import head_divergence, lockstep_prefill, vhr_head_mask


@dataclass
class VHRConfig(StrategyConfig):
    """VHR hyperparameters (paper §4.4, App. C-D).

    Attributes:
        alpha: Scale of the reinforced heads' outputs (2.0; 3 also works, 4 breaks generation).
        layers: Decoder layers where heads are selected and reinforced; None = the paper's rule (see module doc).
        outlier_filter: Zero negative-sensitivity outliers before the median rule (the paper's default).
        std_unbiased: Unbiased std for the outlier rule (torch's default).
        reinforce_text_branch: Also scale the image-free branch during the lockstep pass (VHR-1).
        profile: Path of a head profile JSON: reinforce its top heads for every sample ("fixed VHR") instead of
            selecting heads per sample; None = per-sample selection (the paper's method).
        profile_k: Share of all heads taken from the profile, in (0, 1].
    """

    alpha: float = 2.0
    layers: tuple[int, ...] | None = None
    outlier_filter: bool = True
    std_unbiased: bool = True
    reinforce_text_branch: bool = True
    profile: str | None = None
    profile_k: float = 0.1

    def __post_init__(self) -> None:
        self.profile = profile_path(self.profile)

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None)
        check_profile_path(self.profile)
        check_profile_k(self.profile_k)
        if self.layers is not None:
            if not self.layers:
                raise ValueError(
                    "layers=() is invalid; give at least one decoder layer index, or None for the default."
                )
            for layer in self.layers:
                check_range("layers[]", layer, 0, None)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """``{1} ∪`` the last ``round(14/32 * L)`` layers (``{1, 18..31}`` for ``L = 32``).

    Args:
        num_layers: Decoder layers ``L``.

    Returns:
        Sorted layer indices.
    """
    last = max(1, round(14 / 32 * num_layers))
    return tuple(sorted({1 % num_layers, *range(num_layers - last, num_layers)}))


@register_strategy("vhr")
class VHR(Strategy):
    """Reinforce each sample's vision-aware heads (above-median VHD at step 0) by alpha."""

    config_class = VHRConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "no_outlier_filter": {"outlier_filter": False},
    }
    needs_image = True
    paper = "https://arxiv.org/abs/2412.13949"

    @classmethod
    def model_defaults(cls, adapter: Any) -> dict[str, Any]:
        """The paper's layer rule for this depth ({1, 18..31} on 32 layers)."""
        return {"layers": default_layers(adapter.dims.num_layers)}

    def _layers(self, call: CallContext) -> tuple[int, ...]:
        n = call.adapter.dims.num_layers
        layers = default_layers(n) if self.config.layers is None else tuple(self.config.layers)
        for layer in layers:
            call.adapter.check_layer(layer)
        return layers

    def prepare(self, call: CallContext) -> None:
        """Run the lockstep pass and fix each row's head set per layer (``call.state['vhr_scale']``)."""
        if self.config.profile is not None:
            self._prepare_fixed(call)
            return
        layers = self._layers(call)
        alpha = self.config.alpha
        scales: dict[int, torch.Tensor] = {}
        vhds: dict[int, torch.Tensor] = {}

        def on_layer(layer: int, o_full: torch.Tensor, o_text: torch.Tensor) -> torch.Tensor:
            vhd, ta = head_divergence(o_full, o_text)  # [B, H] each
            mask = vhr_head_mask(vhd, ta, self.config.outlier_filter, self.config.std_unbiased)  # [B, H]
            scale = 1.0 + (alpha - 1.0) * mask.float()  # [B, H]
            scales[layer], vhds[layer] = scale, vhd
            if self.config.reinforce_text_branch:
                return scale  # applied to both branches
            return torch.cat([scale, torch.ones_like(scale)])  # [2B, H]: image-free rows unscaled

        lockstep_prefill(call.model, call.adapter, call.inputs, layers, on_layer)
        call.state["vhr_scale"] = scales
        call.state["vhr_vhd"] = vhds

    def _prepare_fixed(self, call: CallContext) -> None:
        """Fixed VHR: the profile's head set for every row, no lockstep pass."""
        mask = profile_head_mask(self.config.profile, call.adapter, self.config.profile_k)  # [L, H] bool
        if self.config.layers is not None:
            keep = torch.zeros(mask.shape[0], 1, dtype=torch.bool)  # [L, 1]
            keep[list(self._layers(call))] = True
            mask = mask & keep  # [L, H]
            if not mask.any():
                self.warn(
                    f"VHR: the profile {self.config.profile!r} has no head among its top profile_k="
                    f"{self.config.profile_k} in layers={self.config.layers}; nothing is reinforced. Raise profile_k "
                    "or use layers=None (all the profile's heads).",
                )
        scales: dict[int, torch.Tensor] = {}
        for layer in torch.nonzero(mask.any(dim=-1)).flatten().tolist():
            row = 1.0 + (self.config.alpha - 1.0) * mask[layer].float()  # [H]
            scales[layer] = row.to(call.layer_device(layer)).expand(call.batch_size, -1)  # [B, H]
        call.state["vhr_scale"] = scales
        call.state["vhr_vhd"] = {}

    def attention_layers(self, call: CallContext) -> set[int]:
        return set(call.state.get("vhr_scale", {}))

    def edit_head_outputs(self, out: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        scale = ctx.rows(ctx.call.state["vhr_scale"][ctx.layer_idx]).to(out.dtype)  # [B', H]
        return out * scale[:, None, :, None]  # [B', q, H, d]
