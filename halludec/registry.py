"""One generic registry, used for strategies, adapters, benchmarks and head criteria.

Modelled on lm-eval's ``lm_eval/api/registry.py``: entries are registered once by name, and a lookup of an
unknown name fails with the closest matches and the full list, so a typo never silently picks a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with helpful lookup errors.

    Args:
        kind: What the registry holds, used in error messages (e.g. ``"strategy"``).
        hint: A sentence appended to lookup errors, telling the user how to add an entry.
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Args:
            name: Lower-case registry key.
            obj: The object to register. When omitted, returns a decorator.

        Returns:
            The registered object (or a decorator that registers and returns it).

        Raises:
            ValueError: if ``name`` is already taken by a different object.
        """

        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered ({self._entries[name]!r}); "
                    f"pick another name or unregister the old one first."
                )
            self._entries[name] = value
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when absent)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """Look ``name`` up.

        Raises:
            KeyError: naming the unknown key, close matches and every available key.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """The error text for an unknown ``name``: close matches, the available keys and the hint."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        msg = f"Unknown {self.kind} {name!r}."
        if close:
            msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        msg += f" Available: {', '.join(sorted(self._entries)) or '(none)'}."
        if self.hint:
            msg += f" {self.hint}"
        return msg

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """Sorted ``(name, object)`` pairs."""
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
