"""VISTA: Visual Information Steering with Token-logit Augmentation.

Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via Visual
Information Steering", ICML 2025, https://arxiv.org/abs/2502.03628 (official code ``LzVv123456/VISTA``).
Both components are implemented (the math is in ``vista_math``):

1. **Visual steering vector (VSV).** Before decoding, the prompt with the image (``X_p``) and without it (``X_n``:
   image tokens and their wrappers removed, template kept, ``adapter.text_only_inputs``) are each prefilled once
   with the plain model. Per row and per decoder layer ``l``, ``v_l = normalize(h_l(X_p)[-1] - h_l(X_n)[-1])``,
   ``h_l`` being layer ``l``'s output (the residual stream) at the last prompt token (paper Eq. 4). During the whole
   ``generate`` call (prompt prefill and every step, all positions) the MLP output ``m`` of every layer becomes
   ``||m|| * normalize(normalize(m) + lambda * g * v_l)``, ``g = 1 + max(0, cos(m, -v_l))`` (the released
   ``VSVLayer``). It enters the residual stream through the layer's residual add.
2. **Self-logits augmentation (SLA).** At every step the last position's outputs of the ``w`` layers before the
   last (``L-1-w .. L-2``, 0-based) go through the final norm and the LM head (logit lens); their mean ``o_aug`` is
   mixed into the final logits: ``(1 - gamma) * o_L + gamma * o_aug`` (Eq. 7-8). The head is linear, so this is
   done before it: a hook on the final norm replaces its last-position output ``n_L`` with
   ``(1 - gamma) * n_L + gamma * mean_l norm(h_l)``, whose head output is exactly the mixed logits — no extra head
   matmul, and the mix precedes every processor and warper of ``generate`` and every other strategy's logits edit.

Open questions and their resolutions (details in ``docs/methods/vista.md``):

- *Where the VSV goes.* The paper adds ``lambda * v_l`` to the residual stream ``h_l`` and rescales to ``||h_l||``
  (Eq. 5-6, raw ``v``); the code rotates each layer's MLP output with unit vectors and the similarity gain. Default:
  the code (the paper's lambda values were tuned with it and mean nothing on another scale); ``vsv_site="residual"``
  applies the same rule to the layer output (the paper's reading; re-tune ``vsv_lambda``), ``similarity_gain=False``
  is the code's ``simple_mode``.
- *SLA layers.* Paper: ``w = 5`` layers before the last (26..30 on 32 layers); code default ``--logits-layers 25,30``
  (inclusive: 6 layers). Default: the paper; ``vista:repro`` uses ``sla_window=6``.
- *SLA head.* Paper: the logit lens ``H``; code: ``lm_head`` on the raw hidden states, no final norm. Default: final
  norm + head (the logit lens, as ``H(h_L)`` is computed); ``vista:repro`` drops the norm.
- *The code's rank-1 PCA* of one sample returns the difference itself plus an SVD artefact (``e_0`` added to layer 0's
  first coordinate). Default: the difference; ``vista:repro`` keeps the artefact (``pca_offset``).
- *Noise.* A difference below ``1e-3 * ||h_l(X_p)||`` is rounding noise (e.g. a sliding-window layer whose window
  holds no image token), not a direction: that row's vector is zero and the layer is left alone (the code would
  normalise the noise).
- *Positions.* Steering applies at every position of every forward of the call (the code wraps the MLPs for the whole
  ``generate``); SLA changes the last position only (the only one decoded; the code mixes all positions).
- *Defaults (LLaVA-1.5).* ``lambda = 0.17``, ``gamma = 0.3``, ``w = 5`` (paper §3.1, ``run_chair.sh``); POPE uses
  ``lambda = 0.01`` (``vista:pope``), the released MMHal script 0.1 (``vista:mmhal``). Other models: the paper tunes
  lambda per model (MiniGPT-4 0.1, Shikra 0.12, InstructBLIP 0.17); calibrate it on yours.
- *Batches and composition.* Per-row vectors (the code is batch size 1); beams repeat rows. Side rows of other
  strategies are neither steered nor read, and SLA is part of the main rows' own logits (as in the code, whose
  forward returns them mixed), so other strategies' logits edits see them mixed whatever the list order. On heads
  with a final-logit softcap the mix comes before the softcap. Decoding the paper used: greedy, beam 5, nucleus
  ``top_p=0.9``, T = 1.

Cost: one extra prefill of the prompt plus one of the (short) image-free prompt, before decoding (single-pass);
per step, a few vector ops per steered layer and on the final norm's last position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext
from halludec.decoding.vista_math import (
    last_token_states,
    layer_output,
    sla_hidden,
    sla_window,
    steer,
    steering_directions,
)

SITES = ("mlp", "residual")


@dataclass
class VISTAConfig(StrategyConfig):
    """VISTA hyperparameters (paper §3.1 for LLaVA-1.5; see the module docstring for each resolution).

    Attributes:
        vsv_lambda: Steering strength ``lambda`` (0.17; 0 turns the VSV and its extra prefills off).
        vsv_layers: Decoder layers steered, each with its own vector; None = every layer (the code's default).
        vsv_site: ``"mlp"``: rotate each layer's MLP output (the released code); ``"residual"``: the layer's output.
        similarity_gain: Push harder where the state points away from the vector (``1 + max(0, cos(x, -v))``, the
            code's default); False = constant gain (the code's ``simple_mode``).
        pca_offset: Reproduce the released code's PCA artefact (+1 on layer 0's first coordinate before normalising).
        sla_gamma: SLA mixing weight ``gamma`` in [0, 1] (0.3; 0 turns SLA off).
        sla_window: ``w``: SLA averages the ``w`` layers before the last (5).
        sla_layers: Explicit SLA layers (0-based), replacing ``sla_window``; None = the window.
        sla_final_norm: Apply the final norm before the LM head (logit lens); False = raw states (the released code).
    """

    vsv_lambda: float = 0.17
    vsv_layers: tuple[int, ...] | None = None
    vsv_site: str = "mlp"
    similarity_gain: bool = True
    pca_offset: bool = False
    sla_gamma: float = 0.3
    sla_window: int = 5
    sla_layers: tuple[int, ...] | None = None
    sla_final_norm: bool = True

    def validate(self) -> None:
        check_range("vsv_lambda", self.vsv_lambda, 0.0, None)
        check_range("sla_gamma", self.sla_gamma, 0.0, 1.0)
        if isinstance(self.sla_window, bool) or not isinstance(self.sla_window, int):
            raise ValueError(f"sla_window={self.sla_window!r} is invalid; allowed: an integer >= 1.")
        check_range("sla_window", self.sla_window, 1, None)
        if self.vsv_site not in SITES:
            raise ValueError(f"vsv_site={self.vsv_site!r} is invalid; allowed: {', '.join(map(repr, SITES))}.")
        for name in ("vsv_layers", "sla_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if not layers:
                raise ValueError(f"{name}=() is invalid; give at least one decoder layer index, or None.")
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise ValueError(f"{name} contains {layer!r}; allowed: integer layer indices >= 0.")
                check_range(f"{name}[]", layer, 0, None)


@dataclass
class _VISTAState:
    """Per-call state: steering directions, SLA layers and the hidden states read at the current step."""

    directions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, D] unit vectors
    sla_layers: tuple[int, ...] = ()
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [main rows, D], this step


@register_strategy("vista")
class VISTA(Strategy):
    """Steer every layer towards the image's visual steering vector; mix late-layer logits into the output."""

    config_class = VISTAConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "repro": {"sla_window": 6, "sla_final_norm": False, "pca_offset": True},
        "pope": {"vsv_lambda": 0.01},
        "mmhal": {"vsv_lambda": 0.1},
        "vsv_only": {"sla_gamma": 0.0},
        "sla_only": {"vsv_lambda": 0.0},
    }
    needs_image = True
    paper = "https://arxiv.org/abs/2502.03628"

    def prepare(self, call: CallContext) -> None:
        """Compute each row's steering vectors (two unsteered prefills), install the steering and SLA hooks."""
        cfg = self.config
        state = _VISTAState()
        call.state[self.state_key] = state
        n = call.adapter.dims.num_layers
        if cfg.vsv_lambda != 0.0:
            layers = tuple(range(n)) if cfg.vsv_layers is None else tuple(sorted(set(cfg.vsv_layers)))
            for layer in layers:
                call.adapter.check_layer(layer)
            modules = [self._site(call, layer) for layer in layers]
            positive = last_token_states(call.model, call.adapter, call.inputs, layers)
            negative = last_token_states(call.model, call.adapter, call.adapter.text_only_inputs(call.inputs), layers)
            state.directions = steering_directions(positive, negative, cfg.pca_offset)
            for layer, module in zip(layers, modules, strict=True):
                call.register_hook(module, self._steer_hook(call, state.directions[layer]), pre=False)
        if cfg.sla_gamma != 0.0:
            sla = sla_window(n, cfg.sla_window) if cfg.sla_layers is None else tuple(sorted(set(cfg.sla_layers)))
            for layer in sla:
                call.adapter.check_layer(layer)
            if not sla:
                self.warn(
                    f"VISTA: this model has {n} decoder layer(s), so no layer precedes the last one and SLA has "
                    "nothing to average; SLA is off. Set sla_layers=(...) to choose layers.",
                )
                return
            state.sla_layers = sla
            for layer in sla:
                call.register_hook(call.adapter.layers[layer], self._read_hook(call, state, layer), pre=False)
            final_norm = call.adapter.decoder.norm
            call.register_hook(final_norm, self._mix_hook(call, state, final_norm), pre=False)

    # ------------------------------------------------------------------ helpers
    def _site(self, call: CallContext, layer: int) -> nn.Module:
        """The module whose output is steered in ``layer``: its MLP, or the decoder layer itself."""
        block = call.adapter.layers[layer]
        if self.config.vsv_site == "residual":
            return block
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(
                f"VISTA steers each decoder layer's MLP output, but layer {layer} ({type(block).__name__}) has no "
                "`mlp` submodule; use vsv_site='residual' to steer the layer's output instead."
            )
        return mlp

    def _steer_hook(self, call: CallContext, direction: torch.Tensor):
        """Forward hook rotating the main rows' output towards ``direction`` ``[B, D]`` (side rows untouched)."""
        lam, gain = self.config.vsv_lambda, self.config.similarity_gain

        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if call.suspended:  # side branches prefill with the plain model
                return None
            x = layer_output(output)  # [B_all, q, D]
            main = call.main_rows(x.shape[0])
            v = direction if main == direction.shape[0] else direction.repeat_interleave(main // direction.shape[0], 0)
            v = call.to_device(v, x.device)  # the layer's device (device_map); copied once per call
            steered = steer(x[:main], v, lam, gain).to(x.dtype)  # [main, q, D]
            if main < x.shape[0]:
                steered = torch.cat([steered, x[main:]])  # [B_all, q, D]
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _mix_hook(self, call: CallContext, state: _VISTAState, final_norm: nn.Module):
        """Forward hook on the final norm: SLA on the main rows' last position, before the LM head."""
        gamma = self.config.sla_gamma
        lens = final_norm.forward if self.config.sla_final_norm else None  # .forward: no re-entry into this hook

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if call.suspended:
                return None
            main = call.main_rows(output.shape[0])
            early = torch.stack([state.hidden[layer].to(output.device) for layer in state.sla_layers])  # [w, main, D]
            mixed = output.clone()  # [B_all, q, D]
            mixed[:main, -1] = sla_hidden(output[:main, -1], early, gamma, lens).to(output.dtype)
            return mixed

        return hook

    @staticmethod
    def _read_hook(call: CallContext, state: _VISTAState, layer: int):
        """Forward hook keeping the main rows' last-position output of ``layer`` for this step's SLA."""

        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            if call.suspended:
                return
            x = layer_output(output)  # [B_all, q, D]
            state.hidden[layer] = x[: call.main_rows(x.shape[0]), -1]  # [main, D]

        return hook
