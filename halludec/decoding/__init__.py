"""The attention-steering core and the strategies (one module per strategy)."""

from __future__ import annotations

from halludec.decoding import (  # noqa: F401
    act,
    agla,
    gift,
    icd,
    inter,
    m3id,
    none,
    only,
    opera,
    pai,
    paint,
    var,
    vcd,
    vhr,
    vista,
    zerotuning,
)
from halludec.decoding.apply import apply, generate
from halludec.decoding.base import (
    STRATEGIES,
    Strategy,
    StrategyConfig,
    check_range,
    get_strategy,
    list_strategies,
    register_strategy,
    resolve_strategies,
)
from halludec.decoding.context import CallContext, LayerContext, LayerPlan

__all__ = [
    "STRATEGIES",
    "CallContext",
    "LayerContext",
    "LayerPlan",
    "Strategy",
    "StrategyConfig",
    "apply",
    "check_range",
    "generate",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "resolve_strategies",
]
