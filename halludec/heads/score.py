"""Score every attention head of a model: ``[num_layers, num_heads]`` tables, for one batch or a whole dataset.

The criteria and when to use which are described in :mod:`halludec.heads.criteria` (and in
:func:`score_heads`'s docstring). Scores are means over the rows of a batch (:func:`score_heads`) or over every row
of a dataset (:func:`score_dataset`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from halludec.heads.criteria import CRITERIA
from halludec.vlm_adapters import VLMAdapter, get_adapter
from halludec.vlm_adapters.inputs import chat_inputs

DEFAULT_QUESTION = "Describe the image."


def score_heads(
    model: nn.Module,
    inputs: Mapping[str, Any],
    criterion: str = "vhd",
    adapter: VLMAdapter | None = None,
    **options: Any,
) -> torch.Tensor:
    """Score every attention head of ``model`` on one batch, averaged over its rows.

    Which criterion to use when (details in :mod:`halludec.heads.criteria`):

    - ``"vhd"``: heads whose output changes when the image is removed (VHR's vision-aware head divergence, raw, at
      step 0). Pick heads to reinforce (``vhr`` with ``profile=``) or find vision-aware heads in general.
    - ``"image_attention"``: heads whose last query row attends to image tokens. Pick heads for attention boosts
      (``paint`` with ``profile=``).
    - ``"image_centric"``: as ``image_attention`` but without attention-sink tokens (VAR); prefer it on real
      checkpoints with massive activations. Equals ``image_attention`` where no sinks exist.
    - ``"visual_sensitivity"``: heads whose output changes when the image is noised; sensitive to image content
      rather than image presence.

    Args:
        model: A loaded vision-language model (any supported family), in eval mode.
        inputs: Model inputs with an image in every row (``input_ids`` ``[B, L]``, ``attention_mask``, image
            tensors), on the model's device; left padding is supported.
        criterion: A name in :data:`halludec.heads.CRITERIA`.
        adapter: Override the model's adapter.
        **options: Criterion options (``image_centric``: ``sink_dims``, ``sink_tau``; ``visual_sensitivity``:
            ``noise_step``, ``seed``).

    Returns:
        Float32 tensor ``[num_layers, num_heads]`` on the CPU: the mean over the batch rows.
    """
    return score_rows(model, inputs, criterion, adapter, **options).mean(dim=0)  # [L, H]


def score_rows(
    model: nn.Module,
    inputs: Mapping[str, Any],
    criterion: str = "vhd",
    adapter: VLMAdapter | None = None,
    **options: Any,
) -> torch.Tensor:
    """Per-row head scores ``[B, num_layers, num_heads]`` (float32, CPU); see :func:`score_heads`."""
    fn = CRITERIA.get(criterion)
    adapter = adapter or get_adapter(model)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            "score_heads needs model inputs with `input_ids` as a [batch, length] tensor (what the processor "
            f"returns); got {type(ids).__name__}."
        )
    adapter.require_images(ids, f"Head criterion {criterion!r}")
    with torch.no_grad():
        rows = fn(model, inputs, adapter, **options)  # [B, L, H]
    return rows.detach().float().cpu()


def score_dataset(
    model: nn.Module,
    processor: Any,
    batches_iterable: Iterable[Any],
    criterion: str = "vhd",
    progress: bool = True,
    adapter: VLMAdapter | None = None,
    **options: Any,
) -> torch.Tensor:
    """Score every head over many batches: the mean over all rows of all batches.

    Args:
        model: The model.
        processor: Its processor; used for batches given as samples.
        batches_iterable: Batches, each either model inputs (a mapping with ``input_ids``) or a list of
            ``(image, question)`` pairs that :func:`chat_inputs` turns into inputs. Inputs are moved to the model's
            device.
        criterion: A name in :data:`halludec.heads.CRITERIA`.
        progress: Show a tqdm progress bar when tqdm is installed (a plain loop otherwise).
        adapter: Override the model's adapter.
        **options: Criterion options (see :func:`score_heads`).

    Returns:
        Float32 tensor ``[num_layers, num_heads]`` (CPU).
    """
    CRITERIA.get(criterion)  # fail on a bad name before the first batch
    adapter = adapter or get_adapter(model)
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    rows = 0
    for batch in _progress(batches_iterable, progress, f"heads ({criterion})"):
        inputs = _as_inputs(processor, batch, device)
        per_row = score_rows(model, inputs, criterion, adapter, **options)  # [B, L, H]
        total = per_row.sum(dim=0) if total is None else total + per_row.sum(dim=0)  # [L, H]
        rows += per_row.shape[0]
    if total is None:
        raise ValueError("score_dataset got no batches; pass at least one batch of inputs or (image, question) pairs.")
    return total / rows


def _as_inputs(processor: Any, batch: Any, device: torch.device) -> Mapping[str, Any]:
    """Model inputs on ``device`` from inputs or from ``(image, question)`` pairs."""
    if isinstance(batch, Mapping):
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return moved
    pairs = list(batch)
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ValueError(
            "Each batch must be model inputs (a mapping with input_ids) or a non-empty list of (image, question) "
            f"pairs; got {type(batch).__name__}."
        )
    return chat_inputs(processor, [p[0] for p in pairs], [p[1] for p in pairs], device)


def _progress(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    """``items`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=desc, total=total, unit="batch")
