"""CHAIR's caption -> objects step, with two interchangeable text backends.

The pipeline (shikiw/OPERA:chair.py ``caption_to_words``, the version OPERA, HALC, PAI, DeCo and lmms-eval use):
lowercase, tokenise, lemmatise; merge two-word phrases pairwise from left to right (a merged pair that is not itself
a vocabulary entry swallows both words); drop "seat" when "toilet" is also present; keep the tokens that are synonym
entries and map each to its COCO category (node word).

Backends (selected by name, see :data:`TEXT_BACKENDS`):

- ``builtin`` (default, needs no downloaded data): a tokeniser close to NLTK's Treebank tokeniser and a noun
  lemmatiser that reproduces WordNet's noun lemmas for every word of the synonym table (plural rules plus WordNet's
  irregular forms; "men" stays "men" as in WordNet, "women" -> "woman", "glasses" -> "glass", "sports" -> "sport").
  It treats every token as a noun, so on ordinary captions it finds the reference's objects; it differs only where
  the reference's POS tagger mislabels a plural noun as a verb ("people holding umbrellas": the reference loses the
  umbrella, the builtin backend counts it) and, by a token or so, in ``len`` on unusual punctuation.
- ``nltk``: ``nltk.word_tokenize`` + ``nltk.pos_tag`` + ``WordNetLemmatizer`` exactly as the reference, for
  bit-for-bit compatibility. Needs the ``nltk`` package and its data (punkt/punkt_tab, the averaged perceptron
  tagger, wordnet); halludec never downloads them and names the missing one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from halludec.benchmarks.chair_synonyms import ChairVocabulary
from halludec.benchmarks.errors import BenchmarkDataError
from halludec.registry import Registry


class TextBackend(Protocol):
    """Turns a caption into lowercased, lemmatised tokens (punctuation tokens included)."""

    name: str

    def lemmas(self, caption: str) -> list[str]:
        """Tokens of ``caption`` after lowercasing, tokenisation and lemmatisation."""
        ...


TEXT_BACKENDS: Registry[Callable[[ChairVocabulary], TextBackend]] = Registry(
    "CHAIR text backend", hint="Use 'builtin' (no downloaded data) or 'nltk' (needs nltk and its data)."
)

_TOKEN_RE = re.compile(
    r"""
      \d+(?:[.,:]\d+)+             # numbers with separators: 3.5, 1,000, 10:30
    | [a-z0-9]+(?=n't\b)           # do|n't, ca|n't
    | n't\b
    | '(?:s|m|d|ll|re|ve)\b        # clitics: man|'s
    | \w+(?:-\w+)*                 # words and hyphenated words
    | \.\.\.
    | --
    | [^\w\s]                      # any other single punctuation mark
    """,
    re.VERBOSE,
)

# WordNet's noun lemma where plural rules alone would be wrong or where WordNet keeps/changes a table word.
_IRREGULAR = {
    "men": "men",  # a WordNet lemma itself; WordNet keeps it (the reference never counts "men" as person)
    "women": "woman",
    "children": "child",
    "oxen": "ox",
    "people": "people",
    "sports": "sport",
    "skis": "ski",
    "glasses": "glass",
    "knives": "knife",
    "pocketknives": "pocketknife",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "buses": "bus",
    "minibuses": "minibus",
    "airbuses": "airbus",
    "scissors": "scissors",
    "tennis": "tennis",
    "cattle": "cattle",
    "sheep": "sheep",
    "bison": "bison",
    "calves": "calf",
    "wolves": "wolf",
    "leaves": "leaf",
    "loaves": "loaf",
}
_SUFFIX_RULES = (
    ("men", "man"),
    ("ies", "y"),
    ("ves", "f"),
    ("ves", "fe"),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("s", ""),
)


def tokenize(text: str) -> list[str]:
    """Tokenise like NLTK's ``word_tokenize`` on ordinary captions (punctuation split off, clitics separated).

    Args:
        text: Lowercased text.

    Returns:
        The tokens.
    """
    return _TOKEN_RE.findall(text)


class BuiltinBackend:
    """Data-free tokeniser + noun lemmatiser, exact for the synonym table's words (see the module docstring).

    Args:
        vocabulary: The CHAIR vocabulary whose words the lemmatiser must map like WordNet.
    """

    name = "builtin"

    def __init__(self, vocabulary: ChairVocabulary) -> None:
        self._targets = frozenset(w.lower() for w in vocabulary.words)

    def lemmatize(self, token: str) -> str:
        """The WordNet-style noun lemma of ``token`` for table words; other tokens are returned unchanged.

        Args:
            token: A lowercased token.

        Returns:
            The lemma.
        """
        if token in _IRREGULAR:
            return _IRREGULAR[token]
        if token in self._targets or len(token) < 3:
            return token
        for suffix, replacement in _SUFFIX_RULES:
            if token.endswith(suffix) and not token.endswith("ss"):
                candidate = token[: len(token) - len(suffix)] + replacement
                if candidate in self._targets:
                    return candidate
        return token

    def lemmas(self, caption: str) -> list[str]:
        """Lowercase, tokenise and lemmatise ``caption``."""
        return [self.lemmatize(tok) for tok in tokenize(caption.lower())]


class NltkBackend:
    """NLTK tokeniser, POS tagger and WordNet lemmatiser, as the reference ``chair.py`` uses them.

    Args:
        vocabulary: Unused (kept for a uniform backend signature).

    Raises:
        BenchmarkDataError: if nltk is not installed or a data resource is missing (named, with the fix).
    """

    name = "nltk"

    def __init__(self, vocabulary: ChairVocabulary | None = None) -> None:
        try:
            import nltk
            from nltk.corpus import wordnet
            from nltk.stem import WordNetLemmatizer
        except ImportError:
            raise BenchmarkDataError(
                "The 'nltk' CHAIR backend needs the nltk package: pip install nltk (and its data, see below), "
                "or use backend='builtin', which needs no downloaded data."
            ) from None
        check_nltk_resources()
        self._nltk = nltk
        self._wordnet = wordnet
        self._lemmatizer = WordNetLemmatizer()

    def _pos(self, tag: str) -> str:
        wn = self._wordnet
        for prefix, pos in (("J", wn.ADJ), ("V", wn.VERB), ("N", wn.NOUN), ("R", wn.ADV)):
            if tag.startswith(prefix):
                return pos
        return wn.NOUN

    def lemmas(self, caption: str) -> list[str]:
        """``word_tokenize`` + ``pos_tag`` + ``lemmatize(word, pos)`` on the lowercased caption."""
        words = self._nltk.word_tokenize(caption.lower())
        return [self._lemmatizer.lemmatize(word, pos=self._pos(tag)) for word, tag in self._nltk.pos_tag(words)]


def check_nltk_resources() -> None:
    """Raise a clear error naming every NLTK data resource the ``nltk`` backend needs but cannot find.

    Raises:
        BenchmarkDataError: listing the missing resources and how to install them offline.
    """
    import nltk

    new = tuple(int(p) for p in re.findall(r"\d+", nltk.__version__)[:2]) >= (3, 9)
    needed = {
        ("punkt_tab" if new else "punkt"): ["tokenizers/punkt_tab/english/" if new else "tokenizers/punkt"],
        ("averaged_perceptron_tagger_eng" if new else "averaged_perceptron_tagger"): [
            "taggers/averaged_perceptron_tagger_eng/" if new else "taggers/averaged_perceptron_tagger"
        ],
        "wordnet": ["corpora/wordnet", "corpora/wordnet.zip"],
    }
    missing = []
    for name, locations in needed.items():
        for location in locations:
            try:
                nltk.data.find(location)
                break
            except LookupError:
                continue
        else:
            missing.append(name)
    if missing:
        raise BenchmarkDataError(
            f"The 'nltk' CHAIR backend is missing NLTK data: {', '.join(missing)} (nltk {nltk.__version__}; "
            f"searched {nltk.data.path}). halludec never downloads data: on a machine with internet run "
            f"`python -m nltk.downloader {' '.join(missing)}` and copy the nltk_data folder here (or set NLTK_DATA), "
            "or use backend='builtin', which needs no data."
        )


TEXT_BACKENDS.register("builtin", BuiltinBackend)
TEXT_BACKENDS.register("nltk", NltkBackend)


@dataclass(frozen=True)
class CaptionObjects:
    """What CHAIR extracts from one caption.

    Attributes:
        words: The matched synonym entries, in caption order, with repetition.
        node_words: Their COCO categories, aligned with ``words`` (the mentions CHAIR_i counts).
        tokens: All tokens after pair merging and before the vocabulary filter (``len`` counts these).
    """

    words: tuple[str, ...]
    node_words: tuple[str, ...]
    tokens: tuple[str, ...]


def caption_to_objects(caption: str, vocabulary: ChairVocabulary, backend: TextBackend) -> CaptionObjects:
    """Extract the COCO objects a caption mentions (the reference's ``caption_to_words``).

    Args:
        caption: The caption.
        vocabulary: From :func:`~halludec.benchmarks.chair_synonyms.build_vocabulary`.
        backend: A text backend instance.

    Returns:
        The mentions, their node words and the merged tokens.
    """
    words = backend.lemmas(caption)
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in vocabulary.double_words:
            merged.append(vocabulary.double_words[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    kept = merged
    if "toilet" in kept and "seat" in kept:  # "the seat of the toilet" must not fire "chair"
        kept = [w for w in kept if w != "seat"]
    found = [w for w in kept if w in vocabulary.objects]
    return CaptionObjects(
        words=tuple(found), node_words=tuple(vocabulary.node_word[w] for w in found), tokens=tuple(merged)
    )


def make_backend(name: str, vocabulary: ChairVocabulary) -> TextBackend:
    """Instantiate a text backend by name.

    Args:
        name: ``"builtin"`` or ``"nltk"``.
        vocabulary: The CHAIR vocabulary.

    Returns:
        The backend.

    Raises:
        KeyError: for an unknown name (with close matches and the list).
    """
    return TEXT_BACKENDS.get(name)(vocabulary)
