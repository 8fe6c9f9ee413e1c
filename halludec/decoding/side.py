"""The logits stage: side branches batched into the main forward, and the strategies' logits edits.

Logits-level strategies (VCD, INTER, PAI's CFG, ...) contrast the main logits with those of the same prompt under
other inputs. Running each branch as a second sequential forward doubles the cost of every step; here the side
rows ride as extra batch rows of the main forward instead. The combination (``Strategy.edit_logits``) runs inside
the same wrapped forward, on the last position's logits, so it comes before every processor and warper
``generate`` builds (min-length, repetition penalty, temperature, top-k/p), as the papers apply it:

- **Prefill.** ``generate``'s first forward runs unchanged on the main rows. Each side input is then prefilled
  once, on its own rows, with the plain model (no steering) and explicit position ids (mrope for Qwen). Its cache
  is expanded like the main rows (beams, ``num_return_sequences``) and merged into the main cache, every part
  left-padded to the longest prompt.
- **Every later step.** The wrapper feeds each side row the token its main row just got, with the side's own
  attention mask and positions, splits the logits, hands the side half to the strategies' ``edit_logits`` and
  returns the edited main half to ``generate``.
- **Beam search.** Reordering the cache reorders each side block with its main rows.

Works with the default (dynamic) cache; the static-cache path is not supported yet and raises a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import StaticCache

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext


class LogitsContext:
    """What ``Strategy.edit_logits`` sees at one step.

    Args:
        call: The call context.
        side: This strategy's side-branch logits ``[rows, V]`` (float32), in the order it listed its inputs.
        step: Tokens generated before this step (0 at the prefill).
    """

    def __init__(self, call: CallContext, side: list[torch.Tensor], step: int) -> None:
        self.call = call
        self.side = side
        self.step = step


class SideBranches:
    """The wrapped forward of one call: side rows in lockstep with the main rows, then the logits edits.

    Args:
        call: The call context (its adapter builds positions; its ``suspended`` flag turns steering off).
        branches: One input mapping per side branch, each with the same rows as the main inputs (may be empty).
        editors: Strategies whose ``edit_logits`` run, in composition order.
    """

    def __init__(self, call: CallContext, branches: list[Mapping[str, Any]], editors: list[Any]) -> None:
        self.call = call
        self.editors = editors
        self.branches = [dict(b) for b in branches]
        for i, b in enumerate(self.branches):
            ids = b.get("input_ids")
            if not isinstance(ids, torch.Tensor) or ids.shape[0] != call.batch_size:
                raise ValueError(
                    f"Side branch {i} must have input_ids with {call.batch_size} rows (one per main row); got "
                    f"{None if ids is None else tuple(ids.shape)}."
                )
        self.main_rows: int | None = None
        """Rows of the main half in the batched forward (inputs' rows x beams), set at prefill."""
        self.logits: list[torch.Tensor] = []
        """Per branch, the side logits of the current step's last position ``[main_rows, V]``."""
        self._main_len = 0
        self._extra_left = 0
        self._side_masks: torch.Tensor | None = None  # [n * main_rows, L_max]
        self._side_deltas: torch.Tensor | None = None  # [n * main_rows, 1] mrope offset, or None

    @property
    def n(self) -> int:
        """Number of side branches."""
        return len(self.branches)

    def wrap(self, forward: Any) -> Any:
        """A ``functools.wraps`` wrapper of the model's ``forward`` that adds the side rows."""

        @functools.wraps(forward)
        def batched_forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                raise TypeError("halludec's side-branch forward expects keyword arguments, as generate passes them.")
            cache = kwargs.get("past_key_values")
            if cache is None or kwargs.get("use_cache") is False:
                raise ValueError("Side branches need the KV cache; call generate with use_cache=True (the default).")
            if isinstance(cache, StaticCache):
                raise NotImplementedError(
                    "Side branches do not support the static cache yet; use the default dynamic cache "
                    "(drop cache_implementation='static')."
                )
            if cache.get_seq_length() == 0:
                return self._prefill(forward, kwargs)
            return self._step(forward, kwargs)

        return batched_forward

    # ------------------------------------------------------------------ prefill
    def _prefill(self, forward: Any, kwargs: dict[str, Any]) -> Any:
        out = forward(**kwargs)
        cache = kwargs["past_key_values"]
        main_ids = kwargs["input_ids"]  # [Bm, L]
        self.main_rows = main_ids.shape[0]
        expand = self.main_rows // self.call.batch_size
        self._main_len = main_ids.shape[1]
        if not self.branches:
            return self._edit(out, [], 0)
        side_caches, masks, deltas, logits = [], [], [], []
        self.call.suspended = True  # side branches run the plain model
        try:
            for branch in self.branches:
                side_cache = DynamicCache(config=self.call.model.config)
                positions = self.call.adapter.position_ids_for(branch)  # [B, Ls] or [4, B, Ls]
                side_out = forward(
                    **branch, position_ids=positions, past_key_values=side_cache, use_cache=True, logits_to_keep=1
                )
                if expand > 1:
                    side_cache.batch_repeat_interleave(expand)
                side_caches.append(side_cache)
                am = branch.get("attention_mask")
                am = torch.ones_like(branch["input_ids"]) if am is None else am
                masks.append(am.repeat_interleave(expand, dim=0))  # [Bm, Ls]
                if positions.dim() == 3:
                    delta = positions[1:, :, -1].amax(0) - positions[0, :, -1]  # [B]
                    deltas.append(delta.repeat_interleave(expand)[:, None])  # [Bm, 1]
                logits.append(side_out.logits[:, -1].repeat_interleave(expand, dim=0))  # [Bm, V]
        finally:
            self.call.suspended = False
        length = max([self._main_len] + [m.shape[1] for m in masks])
        self._extra_left = length - self._main_len
        self._side_masks = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])  # [n * Bm, L_max]
        self._side_deltas = torch.cat(deltas) if deltas else None
        _merge_caches(cache, side_caches, length)
        _extend_reorder(cache, self.main_rows, self.n)
        return self._edit(out, logits, 0)

    # --------------------------------------------------------------------- step
    def _step(self, forward: Any, kwargs: dict[str, Any]) -> Any:
        bm = self.main_rows
        ids = kwargs["input_ids"]  # [Bm, q]
        q = ids.shape[1]
        past = kwargs["past_key_values"].get_seq_length()  # merged prompt length + tokens fed so far
        new_cols = past - self._main_len - self._extra_left + q  # generated tokens incl. this step's
        step = new_cols - q + 1  # tokens generated before this step
        am = kwargs.get("attention_mask")  # [Bm, L_main + new_cols]; generate omits it when it is all ones
        if am is None:
            am = ids.new_ones(bm, self._main_len + new_cols)
        if not self.branches:
            return self._edit(forward(**kwargs), [], step)
        side_am = torch.cat([self._side_masks, self._side_masks.new_ones(self._side_masks.shape[0], new_cols)], 1)
        batched = dict(kwargs)
        batched["attention_mask"] = torch.cat([F.pad(am, (self._extra_left, 0)), side_am.to(am.dtype)])
        side_text = side_am.long().cumsum(-1)[:, -q:] - 1  # [n * Bm, q]
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() == 3:  # [4 | 3, Bm, q]: text row then (t, h, w), or (t, h, w) only
            shifted = side_text + (self._side_deltas if self._side_deltas is not None else 0)
            rows = [side_text] + [shifted] * (pos.shape[0] - 1) if pos.shape[0] == 4 else [shifted] * pos.shape[0]
            batched["position_ids"] = torch.cat([pos, torch.stack(rows).to(pos.dtype)], dim=1)
        elif pos is not None:
            batched["position_ids"] = torch.cat([pos, side_text.to(pos.dtype)])
        for key, value in kwargs.items():
            if key in ("attention_mask", "position_ids", "past_key_values") or not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 1 and value.shape[0] == bm:
                batched[key] = torch.cat([value] * (self.n + 1))
        out = forward(**batched)
        logits = out.logits  # [Bm * (n + 1), q', V]
        out.logits = logits[:bm]
        return self._edit(out, [logits[bm * (k + 1) : bm * (k + 2), -1] for k in range(self.n)], step)

    def _edit(self, out: Any, side_logits: list[torch.Tensor], step: int) -> Any:
        """Run the strategies' ``edit_logits`` on the main rows' last position, in composition order."""
        self.logits = side_logits
        if not self.editors:
            return out
        last = out.logits[:, -1].float()  # [Bm, V]
        for strategy in self.editors:
            side = [side_logits[i].float() for i in self.call.side_slots[id(strategy)]]
            last = strategy.edit_logits(last, LogitsContext(self.call, side, step))
        logits = out.logits.clone()
        logits[:, -1] = last.to(logits.dtype)
        out.logits = logits
        return out


def _merge_caches(cache: Any, side_caches: list[Any], length: int) -> None:
    """Append the side caches' rows to ``cache`` in place, all left-padded to ``length`` positions."""
    for i, layer in enumerate(cache.layers):
        parts = [layer] + [c.layers[i] for c in side_caches]
        kept = max(p.keys.shape[-2] for p in parts)  # < length only on sliding-window layers
        keys = torch.cat([F.pad(p.keys, (0, 0, kept - p.keys.shape[-2], 0)) for p in parts])  # [B_all, H, kept, d]
        values = torch.cat([F.pad(p.values, (0, 0, kept - p.values.shape[-2], 0)) for p in parts])
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length


def _extend_reorder(cache: Any, main_rows: int, n_side: int) -> None:
    """Make ``cache.reorder_cache(beam_idx)`` (main rows only) move every side block with its main rows."""
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        full = torch.cat([beam_idx + k * main_rows for k in range(n_side + 1)])  # [main_rows * (n + 1)]
        original(full)

    cache.reorder_cache = reorder_cache
