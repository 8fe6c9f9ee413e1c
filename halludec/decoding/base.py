"""The strategy base class, typed configs and the strategy registry.

A strategy is one file in ``halludec/decoding/``: a config dataclass (typed fields, paper defaults,
``validate()``) and a ``Strategy`` subclass registered with ``@register_strategy("name")``. The core
(``halludec.decoding.apply``) calls the hooks a strategy overrides, and only those:

- ``prepare(call)``: once per ``generate`` call, before decoding; build per-row state as tensors here.
- ``attention_layers(call)``: the decoder layers whose attention the strategy reads or edits, and
  ``attention_rows_for(layer, call)`` (``"all"`` or ``"last"``, default the ``attention_rows`` class attribute):
  which query rows it needs as explicit probabilities in that layer.
- ``edit_scores`` / ``edit_probs``: pre- / post-softmax attention ``[B, H, q, K]`` (float32) in those layers.
- ``edit_head_outputs``: per-head attention output ``[B, q, H, d]`` in those layers, before ``o_proj``.
- ``side_inputs(call)``: extra inputs (image removed, noised, ...) run as extra rows of every forward.
- ``edit_logits(logits, ctx)``: the main rows' next-token logits ``[rows, V]`` (float32) with this strategy's side
  logits in ``ctx.side``; runs inside the forward, before every processor and warper of ``generate``.
- ``logits_processors(call)``: ``LogitsProcessor`` objects appended after ``generate``'s own (rarely needed).

The per-step hooks must stay compile-friendly: no ``.item()``, no host syncs, no Python branching on tensor
values; only on shapes and on Python state fixed in ``prepare``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from halludec.registry import Registry

if TYPE_CHECKING:
    import torch
    from transformers import LogitsProcessor

    from halludec.decoding.context import CallContext, LayerContext
    from halludec.decoding.side import LogitsContext


@dataclass
class StrategyConfig:
    """Base of every strategy's typed hyperparameters (defaults follow the paper)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the allowed range when a value is invalid."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-serialisable values."""
        return dataclasses.asdict(self)


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (either bound may be None).

    Args:
        name: Field name, for the message.
        value: The received value.
        low: Inclusive lower bound.
        high: Inclusive upper bound.
    """
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad_type or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number in [{lo}, {hi}].")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../halludec
_PASS_THROUGH = (_PACKAGE_DIR, contextlib.__file__)  # halludec itself, and `with` statements' plumbing


def _caller_outside_halludec() -> int:
    """``stacklevel`` for a ``warnings.warn`` issued by this module's caller: the first frame not in halludec."""
    frame, level = sys._getframe(2), 2  # level 1 is the function calling warnings.warn; frame is its caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PASS_THROUGH):
        frame, level = frame.f_back, level + 1
    return level


class Strategy:
    """Base class of decoding strategies. Subclasses set ``name``, ``config_class`` and override hooks.

    Args:
        config: A config instance; defaults to ``config_class()``.
        **overrides: Field values replacing those of ``config``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named configs of this strategy (``"name:preset"``), e.g. ``{"repro": {...}}``."""
    needs_image: ClassVar[bool] = False
    """Whether every prompt must contain image tokens."""
    attention_rows: ClassVar[Literal["all", "last"]] = "all"
    """Query rows whose probabilities the attention hooks need: every row, or only the last one."""
    paper: ClassVar[str] = ""
    owns_search: ClassVar[bool] = False
    """Whether the strategy replaces generate's search loop (e.g. OPERA); at most one per composition."""

    def __init__(self, config: StrategyConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"Strategy {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}."
            )
        if overrides:
            known = {f.name for f in fields(config)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(
                    f"Unknown field(s) {unknown} for strategy {self.name!r}; its fields are: "
                    f"{', '.join(sorted(known)) or '(none)'}."
                )
            config = dataclasses.replace(config, **overrides)
        config.validate()
        self.config = config
        self.preset: str | None = None
        self._warned: set[str] = set()  # messages self.warn has shown

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def state_key(self) -> str:
        """This instance's slot in ``call.state`` for its per-call state (two instances never share one)."""
        return f"{self.name}:{id(self)}"

    @classmethod
    def model_defaults(cls, adapter: Any) -> dict[str, Any]:
        """Per-model field values (published settings matched by config structure). Default: none.

        Args:
            adapter: The model's ``VLMAdapter``.

        Returns:
            Field values for this model; ``get_strategy(name, model=model)`` applies them under any preset and
            explicit override.
        """
        return {}

    # --------------------------------------------------------------- lifecycle
    def prepare(self, call: CallContext) -> None:
        """Per-call setup before decoding (spans, head sets, masks as tensors). Default: nothing."""

    def attention_layers(self, call: CallContext) -> set[int]:
        """Decoder layers whose attention this strategy reads or edits. Default: none."""
        return set()

    def attention_rows_for(self, layer: int, call: CallContext) -> Literal["all", "last"] | int:
        """Query rows needed as explicit probabilities in ``layer``. Default: ``attention_rows``.

        An int is the first prompt row the strategy reads or edits at the prefill: rows before it stay on sdpa and
        the hooks receive rows ``start..`` (``ctx.q_start`` says which); at decode the single row, as always.
        """
        return self.attention_rows

    def logits_processors(self, call: CallContext) -> list[LogitsProcessor]:
        """Logits processors to add to ``generate``. Default: none."""
        return []

    def side_inputs(self, call: CallContext) -> list[Mapping[str, Any]]:
        """Side-branch inputs (same rows as the main inputs), batched with the main forward. Default: none.

        The core prefills the side inputs after the main rows' prefill and uses their tensors as given (no copy): a
        strategy may fill a tensor of its own side input from what it reads during the main prefill (AGLA builds its
        masked local view that way); ``tests/test_agla.py`` guards this ordering.
        """
        return []

    def search(self, call: CallContext, generate_kwargs: dict[str, Any]) -> Any:
        """Generate in place of ``model.generate`` (strategies with ``owns_search``, e.g. OPERA).

        ``halludec.generate`` calls it inside the ``apply`` context, so the other strategies of the composition
        still steer every forward it runs.

        Args:
            call: The call context (``call.model``, ``call.inputs``).
            generate_kwargs: The caller's ``generate`` keyword arguments (logits processors already merged).

        Returns:
            What ``model.generate`` returns for these kwargs.
        """
        raise NotImplementedError(f"Strategy {self.name!r} sets owns_search but does not implement search().")

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """Edit the next-token logits ``[rows, V]`` (float32) using ``ctx.side``. Must not modify in place."""
        return logits

    # ---------------------------------------------------------- per-step hooks
    def edit_scores(self, scores: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Edit pre-softmax scores ``[B, H, q, K]`` (float32, mask applied). Must not modify in place."""
        return scores

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Edit post-softmax probabilities ``[B, H, q, K]`` (float32). Must not modify in place."""
        return probs

    def edit_head_outputs(self, out: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Edit per-head outputs ``[B, q, H, d]`` before ``o_proj``. Must not modify in place."""
        return out

    # -------------------------------------------------------------- introspection
    @classmethod
    def uses_probs(cls) -> bool:
        """Whether the strategy overrides a hook that needs explicit attention probabilities."""
        return cls.edit_scores is not Strategy.edit_scores or cls.edit_probs is not Strategy.edit_probs

    @classmethod
    def uses_logits(cls) -> bool:
        """Whether the strategy overrides ``edit_logits``."""
        return cls.edit_logits is not Strategy.edit_logits

    def logits_enabled(self, call: CallContext) -> bool:
        """Whether ``edit_logits`` runs for this call (default: when overridden); lets a config turn it off."""
        return self.uses_logits()

    @classmethod
    def uses_head_outputs(cls) -> bool:
        """Whether the strategy overrides ``edit_head_outputs``."""
        return cls.edit_head_outputs is not Strategy.edit_head_outputs

    def warn(self, message: str) -> None:
        """Warn with ``message`` the first time this instance meets it; repeats are dropped.

        Settings warnings (no released settings, no head profile, no sink dimensions) describe the strategy on the
        model, not one batch, and a benchmark run reuses one instance over many batches. Python's own once-per-place
        filter does not hold them back: any ``warnings.catch_warnings()`` (libraries use it per call) resets it.
        The warning points at the first caller outside halludec (the user's ``generate`` / ``apply`` line).

        Args:
            message: The warning's text (a ``UserWarning``).
        """
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=_caller_outside_halludec())

    def describe(self) -> dict[str, Any]:
        """``{name, preset, config}`` for results files."""
        return {"name": self.name, "preset": self.preset, "config": self.config.to_dict()}


STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy",
    hint="List them with halludec.list_strategies() or `halludec ls`; add one with @register_strategy('name').",
)


def register_strategy(name: str):
    """Class decorator registering a ``Strategy`` subclass under ``name`` (and setting ``cls.name``)."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        STRATEGIES.register(name, cls)
        return cls

    return add


def get_strategy(name: str, model: Any | None = None, **overrides: Any) -> Strategy:
    """Build a registered strategy, optionally from a preset (``"name:preset"``), with field overrides.

    Args:
        name: Registry name, e.g. ``"vhr"``, or ``"pai:repro"`` for a preset.
        model: Optional model (or its ``VLMAdapter``): fill the fields with this model's published settings
            (e.g. GIFT's layers for LLaVA-1.5-7B); models without a table entry get the documented generic
            defaults and a warning. Precedence: model defaults < preset < ``overrides``.
        **overrides: Config field values.

    Returns:
        The strategy instance (its config validated).

    Raises:
        KeyError: unknown name ("did you mean"). ValueError: unknown preset, unknown field or invalid value.
    """
    base, _, preset = name.partition(":")
    cls = STRATEGIES.get(base)
    values: dict[str, Any] = {}
    if model is not None:
        from halludec.vlm_adapters import VLMAdapter, get_adapter

        adapter = model if isinstance(model, VLMAdapter) else get_adapter(model)
        values.update(cls.model_defaults(adapter))
    if preset:
        if preset not in cls.presets:
            raise ValueError(
                f"Strategy {base!r} has no preset {preset!r}; available: {', '.join(sorted(cls.presets)) or '(none)'}."
            )
        values.update(cls.presets[preset])
    values.update(overrides)
    strategy = cls(**values)
    strategy.preset = preset or None
    return strategy


def list_strategies() -> list[str]:
    """Registered strategy names, with presets as ``name:preset``."""
    out = []
    for name, cls in STRATEGIES.items():
        out.append(name)
        out.extend(f"{name}:{p}" for p in sorted(cls.presets))
    return out


def resolve_strategies(spec: str | Strategy | list[str | Strategy] | tuple[str | Strategy, ...]) -> list[Strategy]:
    """Turn ``"vhr"``, a ``Strategy`` or a list of them (composition, applied in order) into instances."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError("An empty strategy list was given; pass 'none' for plain generation.")
    out: list[Strategy] = []
    for item in items:
        if isinstance(item, Strategy):
            out.append(item)
        elif isinstance(item, str):
            out.append(get_strategy(item))
        else:
            raise TypeError(f"A strategy must be a name or a Strategy instance, got {type(item).__name__}.")
    owners = [s.name for s in out if s.owns_search]
    if len(owners) > 1:
        raise ValueError(
            f"Strategies {owners} each replace generate's search loop and cannot be composed; keep one of them."
        )
    return out
