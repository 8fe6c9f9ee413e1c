"""Building model inputs the way users do: one chat turn (image + question) per row, left-padded."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any


def chat_inputs(processor: Any, images: Sequence[Any], questions: Sequence[str], device: Any | None = None) -> Any:
    """A left-padded batch: one image and one question per row, rendered with the processor's chat template.

    Args:
        processor: The model's processor (with a chat template).
        images: PIL images, one per row.
        questions: Question text, one per row (rendered verbatim, so the question span can be located).
        device: Move the tensors there (None: keep on CPU).

    Returns:
        The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, image tensors), ready for ``generate``.

    Raises:
        ValueError: when the counts differ or are zero.
    """
    if len(images) != len(questions) or not images:
        raise ValueError(f"Got {len(images)} images and {len(questions)} questions; pass one question per image.")
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for image, question in zip(images, questions, strict=True)
    ]
    with warnings.catch_warnings():
        # PaliGemma's processor builds its (unused) labels with np.array(tensor), which numpy 2 flags.
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        batch = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
    batch.pop("labels", None)  # PaliGemma's processor adds training labels; generate does not want them
    return batch.to(device) if device is not None else batch
