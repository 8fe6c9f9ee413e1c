"""``none``: the neutral strategy. Routes attention through halludec's function and changes nothing.

Used as the baseline of every comparison; ``halludec.generate(..., strategy="none")`` equals
``model.generate`` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

from halludec.decoding.base import Strategy, StrategyConfig, register_strategy


@dataclass
class NoneConfig(StrategyConfig):
    """No hyperparameters."""


@register_strategy("none")
class NoneStrategy(Strategy):
    """Plain decoding (the baseline)."""

    config_class = NoneConfig
