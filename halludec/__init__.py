"""halludec: training-free hallucination mitigation for vision-language models in HF transformers.

Quick use::

    import halludec
    out = halludec.generate(model, inputs, strategy="vhr", processor=processor, max_new_tokens=32)
    with halludec.apply(model, "pai", inputs) as call:
        out = model.generate(**inputs, max_new_tokens=32)
    cmp = halludec.compare(model, processor, "pope", ["none", "vhr"], data="pope/", image_dir="coco/val2014")
    print(cmp.table)

The public API is imported lazily, so ``import halludec`` (and ``halludec score``, which scores other tools'
outputs) does not load torch or transformers until a model-facing function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("Comparison", "apply", "compare", "generate", "get_adapter", "get_strategy", "list_adapters", "list_strategies")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("halludec.api"), name)
    if name in ("decoding", "vlm_adapters", "benchmarks", "heads", "tiny", "registry", "api", "cli"):
        return importlib.import_module(f"halludec.{name}")
    raise AttributeError(f"module 'halludec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
