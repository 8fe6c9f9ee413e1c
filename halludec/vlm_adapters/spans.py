"""Pure helpers for locating spans: contiguous runs, char -> token mapping, chat-template parts."""

from __future__ import annotations

from typing import Any

import torch

SENTINEL = "HALLUDECQUESTIONSENTINEL"


def contiguous_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` runs of True in a 1-D bool tensor.

    Args:
        mask: ``[L]`` bool tensor.

    Returns:
        The runs in order, e.g. ``[F, T, T, F, T]`` -> ``[(1, 3), (4, 5)]``.
    """
    m = mask.to(torch.int8)
    edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))  # [L + 1]
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def char_span_to_tokens(cum_lengths: list[int], c0: int, c1: int) -> tuple[int, int]:
    """Map a char span of a decoded token sequence to the tokens that cover it.

    Args:
        cum_lengths: ``cum_lengths[k]`` = length of the text decoded from the first ``k + 1`` tokens.
        c0: First char of the span.
        c1: One past the last char of the span.

    Returns:
        Half-open token range ``(t0, t1)``: the first token that reaches past ``c0`` up to the first token whose
        text reaches ``c1``.
    """
    t0 = next(k for k, n in enumerate(cum_lengths) if n > c0)
    t1 = next(k for k, n in enumerate(cum_lengths) if n >= c1) + 1
    return t0, t1


def template_parts(owner: Any, image_token: str | None) -> tuple[str, str]:
    """The chat-template text between the image and the question, and after the question.

    Renders a one-turn user message ``[image, SENTINEL]`` with the generation prompt.

    Args:
        owner: A processor or tokenizer with a chat template.
        image_token: The string of the image placeholder token, if known.

    Returns:
        ``(before, after)``: the text from the end of the last image placeholder to the question, and from the
        question to the end of the generation prompt.

    Raises:
        ValueError: when ``owner`` has no usable chat template.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SENTINEL}]}]
    try:
        rendered = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:
        raise ValueError(
            f"Cannot render the chat template of {type(owner).__name__} ({err}); pass `questions=[...]` (the "
            "question text of each row) to locate the query span instead."
        ) from err
    if isinstance(rendered, list):
        rendered = rendered[0]
    at = rendered.find(SENTINEL)
    if at < 0:
        raise ValueError(
            f"The chat template of {type(owner).__name__} did not render the question text; pass "
            "`questions=[...]` to locate the query span."
        )
    head = rendered[:at]
    if image_token and image_token in head:
        head = head[head.rfind(image_token) + len(image_token) :]
    return head, rendered[at + len(SENTINEL) :]
