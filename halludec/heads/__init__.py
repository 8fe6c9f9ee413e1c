"""Head scoring: which attention heads read the image, sink dimensions, and head profiles saved as JSON.

``score_heads(model, inputs, criterion)`` returns a ``[num_layers, num_heads]`` table (criteria and when to use
which: :mod:`halludec.heads.criteria`); ``score_dataset`` averages it over many batches with a progress bar.
``find_sink_dimensions`` finds the massive-activation dimensions and sink tokens of a model. A table becomes a
:class:`HeadProfile` (``HeadProfile.for_model``), saved with ``save_profile`` and loaded with ``load_profile``; the
``vhr``, ``paint`` and ``var`` strategies take a profile path (``profile=``) to act on its top heads. The command
``halludec heads`` does all of this from the shell and draws a heatmap.

Example:
    >>> from halludec.heads import score_heads, HeadProfile, save_profile
    >>> scores = score_heads(model, inputs, criterion="vhd")  # [num_layers, num_heads]
    >>> save_profile(HeadProfile.for_model(model, scores, "vhd", data="my images"), "profile.json")
    >>> out = halludec.generate(model, inputs, halludec.get_strategy("vhr", profile="profile.json"))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HeadProfile": "halludec.decoding.profile",
    "head_mask": "halludec.decoding.profile",
    "head_set": "halludec.decoding.profile",
    "load_profile": "halludec.decoding.profile",
    "save_profile": "halludec.decoding.profile",
    "SinkReport": "halludec.decoding.sinks",
    "find_sink_dimensions": "halludec.decoding.sinks",
    "CRITERIA": "halludec.heads.criteria",
    "chat_inputs": "halludec.heads.score",
    "score_dataset": "halludec.heads.score",
    "score_heads": "halludec.heads.score",
    "score_rows": "halludec.heads.score",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that the ``halludec`` command can register ``heads`` without importing torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'halludec.heads' has no attribute {name!r}")


__all__ = [
    "CRITERIA",
    "HeadProfile",
    "SinkReport",
    "chat_inputs",
    "find_sink_dimensions",
    "head_mask",
    "head_set",
    "load_profile",
    "save_profile",
    "score_dataset",
    "score_heads",
    "score_rows",
]
