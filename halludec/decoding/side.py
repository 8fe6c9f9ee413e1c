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
- **Static cache** (``cache_implementation="static"``, what ``generate`` compiles on a GPU). The prefill runs as
  above on a temporary dynamic cache; the merged prompt (main + side rows) is then written into the static cache,
  whose layers are allocated for all rows at that moment (they are allocated lazily, on the first write). Every
  later step has fixed shapes: one ``[rows, max_cache_len]`` padding mask built at the prefill (the model derives
  the causal masks from it and the cache's own length), side positions from per-row tensors plus the cache's
  length tensor, and ``ctx.step`` as a 0-dim tensor. Nothing on that path reads a tensor value on the host, so the
  compiled decoding step is traced once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import StaticCache, StaticLayer

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext


class LogitsContext:
    """What ``Strategy.edit_logits`` sees at one step.

    Args:
        call: The call context.
        side: This strategy's side-branch logits ``[rows, V]`` (float32), in the order it listed its inputs.
        step: Tokens generated before this step (0 at the prefill): an ``int`` on the default cache, a 0-dim
            integer tensor on the static cache (use it in tensor math, never in a Python ``if``).
    """

    def __init__(self, call: CallContext, side: list[torch.Tensor], step: int | torch.Tensor) -> None:
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
        self.slots = [call.side_slots[id(s)] for s in editors]
        """Per editor, the indices of its side branches (looked up once here: no ``id()`` on the per-step path)."""
        self.main_rows: int | None = None
        """Rows of the main half in the batched forward (inputs' rows x beams), set at prefill."""
        self.logits: list[torch.Tensor] = []
        """Per branch, the side logits of the current step's last position ``[main_rows, V]``."""
        self._main_len = 0
        self._extra_left = 0
        self._prompt_len = 0  # L_max: prompt positions in the cache, main rows included
        self._static = False
        self._past_layer = 0  # a full-attention cache layer: its length is the cache's length
        self._side_masks: torch.Tensor | None = None  # [n * main_rows, L_max]
        self._side_counts: torch.Tensor | None = None  # [n * main_rows, 1] real tokens per side prompt
        self._side_deltas: torch.Tensor | None = None  # [n * main_rows, 1] mrope offset, or None
        self._static_mask: torch.Tensor | None = None  # [(n + 1) * main_rows, max_cache_len] (static cache)

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
            if self._is_prefill(cache):
                return self._prefill(forward, kwargs)
            return self._step(forward, kwargs)

        return batched_forward

    def _is_prefill(self, cache: Any) -> bool:
        """First forward of a ``generate`` call; never reads a tensor value (the static step is compiled)."""
        if not is_static(cache):
            return cache.get_seq_length() == 0
        # generate makes a fresh static cache per call, allocated on the first write; a cache passed in already
        # allocated is new to this call until its prefill has run.
        return self.main_rows is None or not cache.layers[full_layer(cache)].is_initialized

    # ------------------------------------------------------------------ prefill
    def _prefill(self, forward: Any, kwargs: dict[str, Any]) -> Any:
        cache = kwargs["past_key_values"]
        main_ids = kwargs["input_ids"]  # [Bm, L]
        self.main_rows = main_ids.shape[0]
        expand = self.main_rows // self.call.batch_size
        self._main_len = self._prompt_len = main_ids.shape[1]
        self._extra_left = 0
        self.call.key_shift = 0
        self._static = is_static(cache)
        self._past_layer = full_layer(cache) if self._static else 0
        if not self.branches:
            return self._edit(forward(**kwargs), [], 0)
        main_mask = kwargs.get("attention_mask")
        if self._static:  # the main prompt on a dynamic cache first; merged, then written to the static cache
            if not isinstance(main_mask, torch.Tensor) or main_mask.dim() != 2:  # generate's prebuilt 4-D masks
                main_mask = self.call.attention_mask.repeat_interleave(expand, dim=0)  # [Bm, L]
            work = DynamicCache(config=self.call.model.config)
            out = forward(**{**kwargs, "past_key_values": work, "attention_mask": main_mask})
        else:
            out = forward(**kwargs)
            work = cache
        side_caches, masks, deltas, logits = [], [], [], []
        # Contract (Strategy.side_inputs): the side inputs are read only now, after the main rows' prefill, and as
        # given (not copied), so a strategy may fill a tensor of its side input during that prefill (AGLA's local view).
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
        self._prompt_len = length
        self._extra_left = self.call.key_shift = length - self._main_len
        self._side_masks = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])  # [n * Bm, L_max]
        self._side_counts = self._side_masks.long().sum(-1, keepdim=True)  # [n * Bm, 1]
        self._side_deltas = torch.cat(deltas) if deltas else None
        _merge_caches(work, side_caches, length)
        if self._static:
            capacity = _to_static(cache, work, length, length - self._main_len, self.call.model.config)
            self._past_layer = full_layer(cache)
            main = F.pad(main_mask, (self._extra_left, 0))  # [Bm, L_max]
            prompt = torch.cat([main, self._side_masks.to(main.dtype)])  # [(n + 1) * Bm, L_max]
            self._static_mask = F.pad(prompt, (0, capacity - length), value=1)  # [(n + 1) * Bm, K]
            out.past_key_values = cache
        _extend_reorder(cache, self.main_rows, self.n)
        return self._edit(out, logits, 0)

    # --------------------------------------------------------------------- step
    def _step(self, forward: Any, kwargs: dict[str, Any]) -> Any:
        bm = self.main_rows
        ids = kwargs["input_ids"]  # [Bm, q]
        q = ids.shape[1]
        cache = kwargs["past_key_values"]
        # merged prompt length + tokens fed so far: an int (dynamic), the cache's 0-dim length tensor (static)
        past = cache.layers[self._past_layer].get_seq_length() if self._static else cache.get_seq_length()
        if isinstance(past, torch.Tensor) and past.device != ids.device:  # that cache layer on another device
            past = past.to(ids.device)
        fed = past - self._prompt_len  # tokens fed after the prompt (before this step's)
        step = fed + 1  # tokens generated before this step (the prefill generated one)
        if not self.branches:
            return self._edit(forward(**kwargs), [], step)
        batched = dict(kwargs)
        if self._static:  # fixed shapes: the padding mask built at the prefill; causality comes from the cache
            batched["attention_mask"] = self._static_mask
        else:
            new_cols = fed + q  # generated tokens incl. this step's
            am = kwargs.get("attention_mask")  # [Bm, L_main + new_cols]; generate omits it when it is all ones
            if am is None:
                am = ids.new_ones(bm, self._main_len + new_cols)
            ones = self._side_masks.new_ones(self._side_masks.shape[0], new_cols)
            side_am = torch.cat([self._side_masks, ones], 1)  # [n * Bm, L_max + new_cols]
            batched["attention_mask"] = torch.cat([F.pad(am, (self._extra_left, 0)), side_am.to(am.dtype)])
        side_text = self._side_counts + fed + torch.arange(q, device=ids.device)  # [n * Bm, q]
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

    def _edit(self, out: Any, side_logits: list[torch.Tensor], step: int | torch.Tensor) -> Any:
        """Run the strategies' ``edit_logits`` on the main rows' last position, in composition order."""
        self.logits = side_logits
        if not self.editors:
            return out
        last = out.logits[:, -1].float()  # [Bm, V] on the LM head's device (device_map)
        if isinstance(step, torch.Tensor) and step.device != last.device:
            step = step.to(last.device)
        for strategy, slots in zip(self.editors, self.slots, strict=True):
            side = [side_logits[i].float() for i in slots]
            last = strategy.edit_logits(last, LogitsContext(self.call, side, step))
        logits = out.logits.clone()
        logits[:, -1] = last.to(logits.dtype)
        out.logits = logits
        return out


def is_static(cache: Any) -> bool:
    """Whether ``cache`` is a static (preallocated, compileable) cache."""
    return isinstance(cache, StaticCache) or any(isinstance(layer, StaticLayer) for layer in cache.layers)


def full_layer(cache: Any) -> int:
    """Index of the first full-attention (not sliding-window) layer of ``cache``, else 0."""
    return next((i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_sliding", False)), 0)


def _to_static(cache: Any, merged: Any, length: int, extra: int, config: Any) -> int:
    """Write the merged prompt (a dynamic cache, all rows, ``length`` positions) into the static ``cache``.

    The static layers are allocated here, for every row of ``merged``. Prompts longer than the main one (``extra``
    positions) would eat into the room ``generate`` sized for the new tokens, so the cache then gets that much
    more room (fresh layers, as also when it was already allocated for fewer rows).

    Returns:
        The full-attention layers' length ``K`` (the width of the padding mask).
    """
    rows = merged.layers[0].keys.shape[0]
    ref = cache.layers[full_layer(cache)]
    if not isinstance(ref, StaticLayer) or ref.is_sliding:
        raise NotImplementedError(
            "Side branches on a static cache need a model with at least one full-attention layer; use the default "
            "dynamic cache (drop cache_implementation='static')."
        )
    needed = ref.max_cache_len + extra
    if extra > 0 or (ref.is_initialized and ref.keys.shape[0] != rows):
        cache.layers[:] = StaticCache(config=config, max_cache_len=needed).layers
    for layer, part in zip(cache.layers, merged.layers, strict=True):
        keys, values = part.keys, part.values  # [rows, H, kept, d]; kept < length on sliding-window layers
        gap = length - keys.shape[-2]
        if gap > 0:  # positions a sliding window already dropped: never attended again, zeros stand in for them
            keys, values = F.pad(keys, (0, 0, gap, 0)), F.pad(values, (0, 0, gap, 0))  # [rows, H, length, d]
        layer.update(keys, values)
    return cache.layers[full_layer(cache)].max_cache_len


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
