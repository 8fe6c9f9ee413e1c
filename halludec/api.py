"""The public API in one place (re-exported by ``halludec``)."""

from __future__ import annotations

from halludec.benchmarks.compare_run import Comparison, compare
from halludec.decoding import apply, generate, get_strategy, list_strategies
from halludec.vlm_adapters import get_adapter, list_adapters

__all__ = [
    "Comparison",
    "apply",
    "compare",
    "generate",
    "get_adapter",
    "get_strategy",
    "list_adapters",
    "list_strategies",
]
