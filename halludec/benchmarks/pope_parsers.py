"""POPE answer parsers, selectable by name (benchmarks.md §1.4), plus halludec's "unparseable" rule.

Each parser reproduces one tool's rule exactly, quirks included, so ``--parser X`` reproduces tool X's numbers:

- ``pope`` (default; alias ``pope_canonical``): RUCAIBox/POPE:evaluate.py and haotian-liu/LLaVA:llava/eval/eval_pope.py.
  Keep the text before the first ".", delete ",", split on single spaces; *no* iff a token is exactly ``No``, ``not``
  or ``no`` (case-sensitive), else *yes*. So "Nope", "NO", "I don't see one" and "" are *yes*.
- ``opera``: shikiw/OPERA:pope_eval.py ``recorder`` (also HALC, PAI). Delete every "." and ",", split on single
  spaces; *no* iff a token is in {No, not, no, NO} or ends with "n't", else *yes* (no first-sentence cut).
- ``vlmevalkit`` (alias ``yorn``): open-compass/VLMEvalKit ``YOrN_Extraction`` with ``process_punctuation``
  (vlmeval/dataset/utils/yorn.py, vlmeval/smp/misc.py). Lowercase; each punctuation mark of its list is deleted
  everywhere when it touches a space anywhere in the text (or the text has digit,digit), else replaced by a space;
  periods not next to a digit are removed, at most 32 of them (upstream passes ``re.UNICODE`` as the count); split on
  whitespace; *yes* iff "yes" is a token and "no" is not, *no* for the reverse, else *other* (upstream "Unknown";
  its optional LLM judge is not used). Accuracy counts *other* as wrong; for P/R/F1 it is not-*yes*.
- ``strict`` (alias ``lmms_exact``): EvolvingLMMs-Lab/lmms-eval:lmms_eval/tasks/pope/utils.py.
  ``answer.lower().strip()`` must equal "yes" or "no", else *other* ("Yes." is wrong). Recall's false negatives count
  only predictions exactly "no" (anything else drops out of recall).

Every parser returns ``"yes"``, ``"no"`` or ``"other"``. Independently of the parser, :func:`is_unparseable` applies
design.md's rule, reported beside every parser's metrics without changing its verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from halludec.benchmarks.errors import BenchmarkDataError
from halludec.registry import Registry

YES, NO, OTHER = "yes", "no", "other"


@dataclass(frozen=True)
class PopeParser:
    """A yes/no answer rule.

    Attributes:
        name: Registry name.
        parse: ``answer text -> "yes" | "no" | "other"``.
        fn_counts_other: Whether a *yes*-labelled row predicted *other* counts as a false negative in recall
            (``False`` only for ``strict``, as in lmms-eval).
        source: Where the rule comes from.
        summary: One line describing it.
    """

    name: str
    parse: Callable[[str], str]
    fn_counts_other: bool
    source: str
    summary: str

    def __call__(self, answer: str) -> str:
        return self.parse(answer)


PARSERS: Registry[PopeParser] = Registry(
    "POPE parser",
    hint="Register a new rule with halludec.benchmarks.pope_parsers.PARSERS.register(name, PopeParser(...)).",
)
ALIASES = {"pope_canonical": "pope", "yorn": "vlmevalkit", "lmms_exact": "strict"}


def parse_pope(answer: str) -> str:
    """POPE / LLaVA rule (see the module docstring)."""
    text = answer
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return NO if ("No" in words or "not" in words or "no" in words) else YES


_OPERA_NEG = frozenset({"No", "not", "no", "NO"})


def parse_opera(answer: str) -> str:
    """OPERA / HALC / PAI rule (see the module docstring)."""
    words = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(w in _OPERA_NEG for w in words) or any(w.endswith("n't") for w in words)
    return NO if negative else YES


_VLM_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")


def vlmevalkit_punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation``, behaviour for behaviour (including the 32-period cap)."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _VLM_PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))  # upstream passes re.UNICODE (== 32) as count


def parse_vlmevalkit(answer: str) -> str:
    """VLMEvalKit ``YOrN_Extraction`` (see the module docstring)."""
    words = vlmevalkit_punctuation(answer.lower()).split()
    if "yes" in words and "no" not in words:
        return YES
    if "yes" not in words and "no" in words:
        return NO
    return OTHER


def parse_strict(answer: str) -> str:
    """lmms-eval exact match (see the module docstring)."""
    pred = answer.lower().strip()
    return pred if pred in (YES, NO) else OTHER


PARSERS.register(
    "pope",
    PopeParser(
        "pope",
        parse_pope,
        True,
        "RUCAIBox/POPE:evaluate.py; haotian-liu/LLaVA:llava/eval/eval_pope.py",
        "first sentence; no iff a token is exactly No/not/no (case-sensitive); else yes",
    ),
)
PARSERS.register(
    "opera",
    PopeParser(
        "opera",
        parse_opera,
        True,
        "shikiw/OPERA:pope_eval.py (recorder); HALC; PAI",
        "drop . and ,; no iff a token is No/not/no/NO or ends with n't; else yes",
    ),
)
PARSERS.register(
    "vlmevalkit",
    PopeParser(
        "vlmevalkit",
        parse_vlmevalkit,
        True,
        "open-compass/VLMEvalKit:vlmeval/dataset/utils/yorn.py",
        "lowercase + VLMEvalKit punctuation; yes/no token (exactly one of them), else other",
    ),
)
PARSERS.register(
    "strict",
    PopeParser(
        "strict",
        parse_strict,
        False,
        "EvolvingLMMs-Lab/lmms-eval:lmms_eval/tasks/pope/utils.py",
        "lower().strip() must equal yes or no, else other",
    ),
)


def get_parser(name: str | PopeParser) -> PopeParser:
    """A parser by name or alias (a :class:`PopeParser` passes through).

    Args:
        name: ``pope`` (default rule), ``opera``, ``vlmevalkit``, ``strict`` or an alias.

    Returns:
        The parser.

    Raises:
        KeyError: for an unknown name, with close matches and the available names.
    """
    if isinstance(name, PopeParser):
        return name
    key = str(name).strip().lower()
    return PARSERS.get(ALIASES.get(key, key))


def list_parsers() -> list[str]:
    """Registered parser names (aliases excluded)."""
    return PARSERS.names()


_YES_WORDS = frozenset({"yes", "yeah", "yep", "correct", "true"})
_NO_WORDS = frozenset({"no", "not", "none", "nope", "false"})
_NON_WORD = re.compile(r"[^\w\s']")


def is_unparseable(answer: str) -> bool:
    """design.md's rule: after lowercasing and stripping punctuation, no yes-word and no no-word.

    Yes-words: yes, yeah, yep, correct, true. No-words: no, not, none, nope, false, or any word ending in "n't".

    Args:
        answer: The model's text.

    Returns:
        ``True`` when the answer holds neither (e.g. "", "There is a dog.", "maybe").
    """
    text = _NON_WORD.sub(" ", answer.lower().replace("\u2019", "'"))
    for raw in text.split():
        word = raw.strip("'")
        if word in _YES_WORDS or word in _NO_WORDS or raw.endswith("n't"):
            return False
    return True


def normalize_label(value: object, where: str) -> str:
    """A gold label as ``"yes"``/``"no"`` (case and surrounding spaces ignored).

    Args:
        value: The label from the file.
        where: Where it was read (file and line), for errors.

    Returns:
        ``"yes"`` or ``"no"``.

    Raises:
        BenchmarkDataError: naming the place, the value and what is allowed.
    """
    if isinstance(value, str) and value.strip().lower() in (YES, NO):
        return value.strip().lower()
    raise BenchmarkDataError(f"{where}: label {value!r} is not 'yes' or 'no'; labels must be the strings yes/no.")
