"""Model arguments -> halludec strategies, shared by the lm-eval and lmms-eval integrations (no harness import)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import halludec
from halludec.decoding import STRATEGIES, Strategy


def split_model_args(
    strategy: str | Strategy | Sequence[str | Strategy], kwargs: dict[str, Any]
) -> tuple[list[Strategy], dict[str, Any]]:
    """Build the strategies named in ``strategy`` from the model arguments that are their fields.

    Args:
        strategy: ``"vcd"``, ``"pai:repro"``, ``"vhr+vcd"``, a ``Strategy`` or a list of names / instances.
        kwargs: The other model arguments. A key naming a field of exactly one named strategy (or written
            ``<strategy>.<field>``) sets that field; lists become tuples.

    Returns:
        ``(strategies, remaining arguments for hf-multimodal)``.

    Raises:
        ValueError: for an empty strategy, an ambiguous or unknown qualified field, or an invalid value.
        KeyError: for an unknown strategy name.
    """
    if isinstance(strategy, str):
        items: list[str | Strategy] = [s.strip() for s in strategy.split("+") if s.strip()]
    elif isinstance(strategy, Strategy):
        items = [strategy]
    else:
        items = list(strategy)
    if not items:
        raise ValueError(f"strategy={strategy!r} names no strategy; use e.g. strategy=vcd or strategy=none.")
    names = [s.name if isinstance(s, Strategy) else s.partition(":")[0] for s in items]
    fields = {n: {f.name for f in dataclasses.fields(STRATEGIES.get(n).config_class)} for n in names}
    overrides: dict[str, dict[str, Any]] = {n: {} for n in names}
    rest: dict[str, Any] = {}
    for key, value in kwargs.items():
        value = tuple(value) if isinstance(value, list) else value
        name, dot, field = key.rpartition(".")
        if dot:
            if name not in fields:
                raise ValueError(f"Model argument {key!r} names strategy {name!r}, which is not among {names}.")
            if field not in fields[name]:
                raise ValueError(
                    f"Model argument {key!r}: strategy {name!r} has no field {field!r}; its fields are: "
                    f"{', '.join(sorted(fields[name])) or '(none)'}."
                )
            overrides[name][field] = value
            continue
        owners = [n for n in names if key in fields[n]]
        if len(owners) > 1:
            raise ValueError(
                f"Model argument {key!r} is a field of several strategies {owners}; write {owners[0]}.{key}=..."
            )
        if owners:
            overrides[owners[0]][key] = value
        else:
            rest[key] = value
    strategies = []
    for item, name in zip(items, names, strict=True):
        if isinstance(item, Strategy):
            if overrides[name]:
                raise ValueError(
                    f"Strategy {name!r} was given as an instance; set its fields when building it "
                    f"(halludec.get_strategy({name!r}, ...)), not as model arguments {sorted(overrides[name])}."
                )
            strategies.append(item)
        else:
            strategies.append(halludec.get_strategy(item, **overrides[name]))
    return strategies, rest
