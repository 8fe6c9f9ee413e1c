"""Informative words of a question, mapped to its tokens (GIFT's query-word filter).

GIFT computes its visual saliency from the attention shifts caused by the *informative* words of the user's
question (nouns, verbs, adjectives, ...), not by function words or prompt boilerplate. The paper tags words with
spaCy (part of speech in NOUN, PROPN, VERB, ADJ, ADV, NUM, model ``en_core_web_sm``). spaCy is optional here
(extra ``halludec[gift]``): the default built-in filter is data-free and keeps every word that is not in a shipped
list of English function words, question-template words ("describe", "answer", "single", "word", ...) and image
words ("image", "picture", "photo", ...).

Words are mapped to tokens through character offsets of the tokenizer's own decoding of the span's tokens, so the
mapping works for byte-level BPE (partial UTF-8 bytes included) and sentencepiece tokenizers alike.

Everything here runs on the host, once per call, before decoding.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch

CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})
"""spaCy coarse parts of speech GIFT treats as informative."""


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTION_WORDS = _words(
    """
    a an the this that these those such some any each every either neither no none all both half several
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves one's someone somebody something anyone anybody
    anything everyone everybody everything nobody nothing
    who whom whose which what whatever whichever whoever where when why how whether
    be am is are was were been being do does did done doing have has had having
    can could may might must shall should will would ought
    not nor or and but if then else than so because as though although while whereas unless until since yet
    of in on at by for with without to from into onto upon about above below over under between among through
    across along around behind beyond near off out up down after before during within toward towards against
    via per like unlike except besides beside inside outside underneath throughout
    there here very too also just only even still already quite rather really much many more most less least
    few other another same own else ever never often again further once however perhaps maybe indeed
    s t d ll m re ve
    """
)
"""English function words (articles, pronouns, auxiliaries, prepositions, conjunctions, clitics, ...)."""

TEMPLATE_WORDS = _words(
    """
    please describe description answer answers question questions single word words phrase phrases sentence
    sentences briefly brief short detail details detailed tell explain provide give given using use based
    according following see seen visible shown show shows depicted depict depicts present contain contains
    yes no option options choose select correct letter respond response reply caption output
    """
)
"""Question-template words of VQA and captioning prompts."""

IMAGE_WORDS = _words("image images picture pictures photo photos photograph photographs pic pics img snapshot")
"""Words that name the image itself rather than its content."""

STOP_WORDS = FUNCTION_WORDS | TEMPLATE_WORDS | IMAGE_WORDS
"""Everything the built-in filter drops."""

WORD_FILTERS = ("auto", "builtin", "spacy", "all")
"""``auto``: spaCy when installed with ``en_core_web_sm``, else ``builtin``; ``all``: every query token."""

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_APOSTROPHE = re.compile(r"['’]")


@functools.cache
def _spacy_nlp() -> Any | None:
    """spaCy's ``en_core_web_sm`` pipeline (tagger only), or None when spaCy or the model is missing."""
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except (ImportError, OSError):
        return None


def spacy_available() -> bool:
    """Whether spaCy and its ``en_core_web_sm`` model can be loaded."""
    return _spacy_nlp() is not None


def resolve_word_filter(mode: str) -> str:
    """The filter that ``mode`` runs: ``auto`` becomes ``spacy`` or ``builtin``.

    Args:
        mode: One of :data:`WORD_FILTERS`.

    Returns:
        ``"builtin"``, ``"spacy"`` or ``"all"``.

    Raises:
        ValueError: unknown mode, or ``spacy`` requested but not installed.
    """
    if mode not in WORD_FILTERS:
        raise ValueError(f"word_filter={mode!r} is invalid; allowed: {', '.join(WORD_FILTERS)}.")
    if mode == "auto":
        return "spacy" if spacy_available() else "builtin"
    if mode == "spacy" and not spacy_available():
        raise ValueError(
            "word_filter='spacy' needs spaCy and its English model: pip install 'halludec[gift]' && "
            "python -m spacy download en_core_web_sm; or use word_filter='builtin' (no dependencies)."
        )
    return mode


def informative_word_spans(text: str, mode: str = "builtin") -> list[tuple[int, int]]:
    """Character spans of the informative words of ``text``.

    Args:
        text: The question text.
        mode: ``"builtin"`` (shipped stop-word lists), ``"spacy"`` (POS tags in :data:`CONTENT_POS`) or
            ``"all"`` (every word).

    Returns:
        Half-open ``(start, end)`` character spans, in order.
    """
    if mode == "spacy":
        nlp = _spacy_nlp()
        if nlp is None:
            resolve_word_filter("spacy")  # raises the install hint
        return [(t.idx, t.idx + len(t.text)) for t in nlp(text) if t.pos_ in CONTENT_POS]
    spans = []
    for match in _WORD.finditer(text):
        parts = [p.lower() for p in _APOSTROPHE.split(match.group()) if p]
        if mode == "all" or any(p not in STOP_WORDS for p in parts):
            spans.append(match.span())
    return spans


def token_char_ranges(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and the character range each token covers in it.

    Token ``k`` covers the characters that the decoding of ``ids[: k + 1]`` adds in agreement with the full
    decoding; a token ending inside a character (byte-level BPE splitting a UTF-8 sequence, decoded as a
    replacement character) also covers that character, as does every token holding part of it.

    Args:
        tokenizer: A tokenizer with ``decode`` (a processor's ``.tokenizer``).
        ids: Token ids of one span.

    Returns:
        ``(text, ranges)`` with ``ranges[k] = (start, end)``, ``start <= end``.
    """
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
    ranges = []
    start = reached = 0
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=False)
        common = 0
        limit = min(len(prefix), len(text))
        while common < limit and prefix[common] == text[common]:
            common += 1
        reached = max(reached, common)
        partial = len(prefix) > common  # ends inside a character the next tokens complete
        end = min(len(text), reached + 1) if partial else reached
        ranges.append((start, max(start, end)))
        start = reached
    return text, ranges


def informative_positions(
    input_ids: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    tokenizer: Any,
    mode: str = "auto",
) -> tuple[list[list[int]], str]:
    """Per row, the token positions inside the query span that belong to informative words.

    Args:
        input_ids: ``[B, L]`` token ids (left padding allowed).
        spans: Per row, the half-open query span (``CallContext.query_spans``).
        tokenizer: The tokenizer that built ``input_ids``.
        mode: One of :data:`WORD_FILTERS`.

    Returns:
        ``(positions, used)``: per row, sorted absolute positions in ``input_ids`` (empty when the span is empty
        or has no informative word), and the filter that ran (``auto`` resolved).
    """
    used = resolve_word_filter(mode)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    out: list[list[int]] = []
    for row, (start, end) in enumerate(spans):
        if end <= start:
            out.append([])
            continue
        if used == "all":
            out.append(list(range(start, end)))
            continue
        text, ranges = token_char_ranges(tok, input_ids[row, start:end].tolist())
        words = informative_word_spans(text, used)
        keep = [start + k for k, (c0, c1) in enumerate(ranges) if any(c0 < w1 and w0 < c1 for w0, w1 in words)]
        out.append(keep)
    return out, used
