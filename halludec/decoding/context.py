"""Per-call state: what one ``generate`` call knows about its inputs, and what each attention call sees.

``CallContext`` is built by ``apply`` before decoding and reachable from every steered attention module. Its
per-row tensors are indexed by the rows of the *inputs*; ``generate`` may expand rows (beams,
``num_return_sequences``) with ``repeat_interleave``, so hooks read them through ``LayerContext.rows``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from halludec.decoding.devices import DeviceCache, layer_device

if TYPE_CHECKING:
    from halludec.decoding.base import Strategy
    from halludec.decoding.side import SideBranches
    from halludec.vlm_adapters import Span, VLMAdapter


@dataclass
class LayerPlan:
    """What the attention function does in one decoder layer.

    Attributes:
        prob_strategies: Strategies that need explicit scores/probabilities here, in composition order.
        head_strategies: Strategies that edit per-head outputs here, in composition order.
        rows: ``"all"``; ``"last"`` when every prob strategy only needs the last query row; or an int, the first
            prompt row any of them needs at the prefill (earlier rows stay on sdpa; see :func:`merge_rows`).
    """

    prob_strategies: list[Strategy] = field(default_factory=list)
    head_strategies: list[Strategy] = field(default_factory=list)
    rows: str | int = "last"


def merge_rows(a: str | int, b: str | int) -> str | int:
    """The query rows two strategies need together: ``"all"`` wins, then the lower start row, then ``"last"``.

    Args:
        a: ``"all"``, ``"last"`` or a start row (int >= 0).
        b: The same.

    Returns:
        The merged row spec.

    Raises:
        ValueError: a spec that is neither ``"all"``, ``"last"`` nor an int >= 0.
    """
    for spec in (a, b):
        bad_int = isinstance(spec, int) and (isinstance(spec, bool) or spec < 0)
        if bad_int or (not isinstance(spec, int) and spec not in ("all", "last")):
            raise ValueError(
                f"attention_rows_for returned {spec!r}; allowed: 'all', 'last' or the first prompt row (int >= 0)."
            )
    if "all" in (a, b):
        return "all"
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    if isinstance(a, int):
        return a
    return b


class CallContext:
    """Everything a strategy may read about one ``generate`` call.

    Args:
        model: The model being steered.
        adapter: Its family adapter.
        strategies: The strategies in composition order.
        inputs: The model inputs passed to ``generate`` (``input_ids`` ``[B, L]``, ``attention_mask``, images).
        processor: Optional processor/tokenizer (needed by strategies that locate the question).
        questions: Optional question text per row.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: VLMAdapter,
        strategies: list[Strategy],
        inputs: Mapping[str, Any],
        processor: Any | None = None,
        questions: list[str] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.strategies = strategies
        self.inputs = inputs
        self.processor = processor
        self.questions = questions
        ids = inputs.get("input_ids") if inputs is not None else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                "halludec needs `input_ids` as a [batch, length] tensor in the inputs (what the processor returns); "
                f"got {type(ids).__name__}."
            )
        self.input_ids = ids  # [B, L]
        am = inputs.get("attention_mask")
        self.attention_mask = torch.ones_like(ids) if am is None else am  # [B, L]
        self.image_mask = adapter.image_mask(ids)  # [B, L] bool
        self.plans: dict[int, LayerPlan] = {}
        self.state: dict[str, Any] = {}
        self.logits_processors: list[Any] = []
        self.sliding_layers: frozenset[int] = frozenset(adapter.sliding_layers())
        self.suspended = False
        """True while side branches prefill: the attention function then steers nothing."""
        self.side: SideBranches | None = None
        self.side_slots: dict[int, list[int]] = {}
        self.exit_stack: ExitStack | None = None
        """Set by ``apply``: undo callbacks registered here run when the call ends (see ``register_hook``)."""
        self.cache: Any | None = None
        """The generation cache, tracked only when a sliding-window layer is steered (see ``LayerContext.keys``)."""
        self.key_shift = 0
        """Extra left padding of the main rows in the cache after the prefill (side prompts longer than the main)."""
        self._image_spans: list[list[Span]] | None = None
        self._query_spans: list[Span] | None = None
        self._moved = DeviceCache()  # per-call state copied to the devices of a sharded model's layers, once
        self._layer_devices: dict[int, torch.device] = {}

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` on ``device``: itself when already there, else a copy made once per call and device.

        Args:
            tensor: State built before decoding (per row or per prompt position).
            device: The device of the layer or logits that read it (a model split with ``device_map``).

        Returns:
            The tensor on ``device``.
        """
        return self._moved.to(tensor, device)

    def layer_device(self, layer: int) -> torch.device:
        """The device decoder layer ``layer``'s attention runs on (accelerate's execution device when the model
        is split or offloaded with ``device_map``; the inputs' device otherwise). Place per-layer state there in
        ``prepare``."""
        if layer not in self._layer_devices:
            self._layer_devices[layer] = layer_device(self.adapter, layer, default=self.input_ids.device)
        return self._layer_devices[layer]

    def register_hook(self, module: nn.Module, hook: Any, *, pre: bool = True, with_kwargs: bool = False) -> None:
        """Register a forward (pre-)hook on ``module`` for this call only; it is removed when the call ends.

        Args:
            module: Any submodule of the model (e.g. a decoder layer, to read the residual stream).
            hook: The hook function, with torch's signature for the chosen kind.
            pre: Forward pre-hook (True) or forward hook (False).
            with_kwargs: Pass keyword arguments to the hook (torch's ``with_kwargs``).
        """
        if self.exit_stack is None:
            raise RuntimeError("Hooks can only be registered inside halludec.apply (during Strategy.prepare).")
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.exit_stack.callback(register(hook, with_kwargs=with_kwargs).remove)

    def side_logits(self, strategy: Strategy) -> list[torch.Tensor]:
        """The current step's last-position logits ``[rows, V]`` of each side branch ``strategy`` asked for."""
        if self.side is None:
            raise RuntimeError("No side branches were set up for this call.")
        return [self.side.logits[i] for i in self.side_slots[id(strategy)]]

    def main_rows(self, batch: int) -> int:
        """How many of ``batch`` forward rows are main rows (the rest are side rows, never steered)."""
        if self.side is None or self.side.main_rows is None:
            return batch
        return min(batch, self.side.main_rows)

    def track_cache(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on steered sliding-window layers: remember the cache to map key positions."""
        self.cache = kwargs.get("past_key_values")

    @property
    def batch_size(self) -> int:
        """Rows in the inputs (before any beam expansion)."""
        return self.input_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        """Padded prompt length ``L``."""
        return self.input_ids.shape[1]

    @property
    def image_spans(self) -> list[list[Span]]:
        """Per row, the image spans (computed once, on the host, before decoding)."""
        if self._image_spans is None:
            self._image_spans = self.adapter.image_spans(self.input_ids)
        return self._image_spans

    @property
    def query_spans(self) -> list[Span]:
        """Per row, the question's token span (needs ``processor`` or ``questions``)."""
        if self._query_spans is None:
            if self.processor is None:
                raise ValueError(
                    "This strategy needs the question's token span: pass `processor=` (the processor or tokenizer "
                    "that built the inputs) and optionally `questions=[...]` to halludec.generate / apply."
                )
            tok = getattr(self.processor, "tokenizer", self.processor)
            self._query_spans = self.adapter.query_spans(
                self.input_ids, tok, self.questions, chat_template_owner=self.processor
            )
        return self._query_spans


class LayerContext:
    """What one attention call of a steered layer sees.

    Args:
        call: The call context.
        module: The attention module (``module.layer_idx`` is the layer).
        q_len: Query rows of this attention call (the prompt length at prefill, 1 when decoding). With
            ``attention_rows = "last"`` the score/probability hooks receive only the last of these rows.
        kv_len: Key length ``K`` (the cache length; the full static length on the static path).
        batch: Rows in this call (inputs' rows x beams / return sequences).
        value: The value states ``[batch, Hkv, K, d]`` of this call (cache included, before ``repeat_kv``), for
            strategies that build an extra attention output of their own from the probabilities they see.
    """

    def __init__(
        self,
        call: CallContext,
        module: nn.Module,
        q_len: int,
        kv_len: int,
        batch: int,
        value: torch.Tensor | None = None,
    ) -> None:
        self.call = call
        self.module = module
        self.layer_idx: int = module.layer_idx
        self.q_len = q_len
        self.kv_len = kv_len
        self.batch = batch
        self.value = value
        self.q_start = 0
        """Prompt row of the first query row the score/probability hooks receive (``q_len - 1`` with ``"last"``,
        the plan's start row with a row range at the prefill; 0 otherwise)."""

    @property
    def device(self) -> torch.device:
        """The device this layer runs on: ``rows`` and ``keys`` return tensors there."""
        return self.value.device if self.value is not None else self.call.layer_device(self.layer_idx)

    @property
    def is_prefill(self) -> bool:
        """True for the prompt pass (more than one query row)."""
        return self.q_len > 1

    def rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """Expand a per-input-row tensor ``[B, ...]`` to this call's rows ``[batch, ...]`` (beams etc.)."""
        per_row = self.call.to_device(per_row, self.device)
        n = per_row.shape[0]
        return per_row if n == self.batch else per_row.repeat_interleave(self.batch // n, dim=0)

    def keys(self, per_position: torch.Tensor) -> torch.Tensor:
        """Fit a per-prompt-position tensor ``[B, L]`` to this call's keys ``[batch, K]`` (False/0 beyond L).

        Works on the default and the static cache, sliding-window layers included; shapes depend only on Python
        state (prompt length, cache sizes), never on tensor values.
        """
        per_position = self.call.to_device(per_position, self.device)
        if self.call.key_shift and not self.call.suspended:  # main rows sit behind a longer side prompt
            per_position = F.pad(per_position, (self.call.key_shift, 0))  # [B, shift + L]
        length = per_position.shape[1]
        if self.layer_idx in self.call.sliding_layers and self.call.cache is not None:
            return self.rows(self._window(per_position))
        if self.kv_len > length:
            per_position = F.pad(per_position, (0, self.kv_len - length))  # [B, K]
        elif self.kv_len < length:
            per_position = per_position[:, : self.kv_len]  # [B, K]
        return self.rows(per_position)

    def _window(self, per_position: torch.Tensor) -> torch.Tensor:
        """Sliding-window layer: which ``K`` of the ``total`` positions seen so far the keys hold.

        A dynamic layer holds the last ``K``. A static one holds positions ``0..K-1`` (``K`` = the window) until it
        is full, then the last ``K``; at a prefill longer than the window it returns all ``total``. In every case the
        first key is position ``max(total - K, 0)``.
        """
        layer = self.call.cache.layers[self.layer_idx]
        total = layer.get_seq_length()  # positions seen, current tokens included (a Python int on these layers)
        start = max(total - self.kv_len, 0)
        end = start + self.kv_len
        length = per_position.shape[1]
        if end > length:
            per_position = F.pad(per_position, (0, end - length))  # [B, end]
        return per_position[:, start:end]  # [B, K]

    def image_keys(self) -> torch.Tensor:
        """``[batch, K]`` bool: which keys are image tokens of the prompt."""
        return self.keys(self.call.image_mask)
