"""halludec: training-free hallucination mitigation for vision-language models in HF transformers.

Quick use::

    import halludec
    out = halludec.generate(model, inputs, strategy="none", max_new_tokens=32)
    with halludec.apply(model, "none", inputs) as call:
        out = model.generate(**inputs, logits_processor=call.logits_processors)
"""

from __future__ import annotations

from halludec.api import apply, generate, get_adapter, get_strategy, list_adapters, list_strategies

__version__ = "0.1.0"

__all__ = ["__version__", "apply", "generate", "get_adapter", "get_strategy", "list_adapters", "list_strategies"]
