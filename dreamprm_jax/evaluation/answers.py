"""Final-answer extraction and answer matching.

Extraction: the text after the *last* "Final answer" (case-insensitive) in a chain, up
to the end of that line (or the next non-empty line when the marker ends its line),
with decoration removed (``:``, ``is``, ``**``, ``$``, ``\\boxed{}``, a final period).

Matching (:func:`match_answer`), in order:

1. A matcher registered for the benchmark (:func:`register_matcher`) decides alone.
2. Multiple choice (``choices`` given, or a gold answer that is a bare letter): both
   answers are mapped to a letter — "(B)", "B.", "b)", "Answer: b", "the answer is (C)",
   "(B) 5 cm", or option *text* equal (after normalisation) to one of the choices — and
   the letters are compared. If only the gold maps to a letter, the prediction is
   compared with that choice's text by the rules below.
3. Numbers: ``$``, thousands commas, ``%``, LaTeX wrappers, a leading ``x =`` and
   trailing unit words ("cm", "m^2", "degrees", "°") are stripped; fractions ("3/4",
   ``\\frac{3}{4}``) and small number words ("two") are read. Tolerance policy:

   * gold written as an integer ("100", "-3", "1,200"): exact (|p - g| <= 1e-9), so
     "101" never matches "100" (a 1 % relative tolerance would accept it);
   * any other gold (decimal or fraction): relative, symmetric like ``math.isclose``:
     |p - g| <= rel_tol * max(|p|, |g|) with ``rel_tol = 1e-2`` — so "1/3" ~ "0.33",
     "3.14" ~ "3.1416", but "0.5" !~ "0.46";
   * a percentage also matches its fraction: "25%" ~ "0.25" ~ "25".
4. Free text: NFKC, lower case, punctuation removed, articles (a/an/the) dropped,
   whitespace collapsed; then equality.

:func:`answer_key` gives the canonical form used for majority voting (letter, number
rounded to 6 significant digits, or normalised text).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable, Sequence

__all__ = [
    "MatchConfig",
    "Matcher",
    "answer_key",
    "default_match",
    "extract_final_answer",
    "get_matcher",
    "match_answer",
    "normalize_text",
    "parse_choice_letter",
    "parse_number",
    "register_matcher",
    "registered_matchers",
    "unregister_matcher",
]

#: (predicted answer or None, gold answer, choices or None) -> correct?
Matcher = Callable[[str | None, str, Sequence[str] | None], bool]


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """Numeric tolerances (see the module docstring for the policy)."""

    rel_tol: float = 1e-2
    abs_tol: float = 1e-9
    percent_equivalence: bool = True


DEFAULT_CONFIG = MatchConfig()

# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------

_FINAL_RE = re.compile(r"final\s*answer", re.IGNORECASE)
_LEAD_RE = re.compile(r"^[\s*:：\-=>_]*(?:is\b)?[\s*:：\-=>_]*", re.IGNORECASE)


def _unwrap_braced(text: str, command: str) -> str:
    """Replace ``\\command{X}`` by X (balanced braces)."""
    out, i = [], 0
    token = "\\" + command + "{"
    while True:
        j = text.find(token, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k, depth = j + len(token), 1
        start = k
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        out.append(text[start:k - 1] if depth == 0 else text[start:])
        i = k


def _clean(answer: str) -> str:
    answer = answer.strip()
    for cmd in ("boxed", "text", "mathrm", "textbf", "mathbf", "fbox"):
        answer = _unwrap_braced(answer, cmd)
    answer = answer.strip()
    answer = re.sub(r"^\*+|\*+$", "", answer).strip()
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2]
    if answer.startswith("\\[") and answer.endswith("\\]"):
        answer = answer[2:-2]
    while len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$" and answer.count("$") % 2 == 0:
        answer = answer[1:-1].strip()
    answer = answer.rstrip()
    while len(answer) > 1 and answer.endswith((".", "。")):
        answer = answer[:-1].rstrip()
    return answer.strip()


def extract_final_answer(text: str | None) -> str | None:
    """The answer after the last "Final answer" marker, cleaned; None if absent or empty.

    >>> extract_final_answer("Step 1: x. Final answer: (B).")
    '(B)'
    """
    if not text:
        return None
    matches = list(_FINAL_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    rest = _LEAD_RE.sub("", rest, count=1)
    lines = rest.split("\n")
    answer = lines[0]
    if not answer.strip():
        answer = next((ln for ln in lines[1:] if ln.strip()), "")
    answer = _clean(answer)
    return answer or None


# ---------------------------------------------------------------------------------------
# Normalisation helpers
# ---------------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}


def normalize_text(text: str) -> str:
    """NFKC, lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", _clean(text)).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    words = [w for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


_LETTER_PATTERNS = [
    re.compile(r"^\(?([A-Za-z])\)?[.:)]?$"),                                   # B  (B)  b.  B)
    re.compile(r"^(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:：\-]?\s*"
               r"(?:(?:option|choice)\s+)?)"
               r"(?:\(([A-Za-z])\)|([A-Z])(?=[.:)]?(?:\s|$))|([a-z])(?=[.:)]?$))"),
    re.compile(r"^\(([A-Za-z])\)\s*\S"),                                        # (B) 5 cm
    re.compile(r"^([A-Z])[.:)]\s+\S"),                                          # B. 5 cm
]


def parse_choice_letter(text: str | None, choices: Sequence[str] | None = None) -> str | None:
    """Upper-case letter named by ``text``, or None.

    A letter is read from "(B)", "B", "b.", "B)", "Answer: b", "The answer is (C)",
    "(B) 5 cm", "B. 5 cm"; else, when ``choices`` are given, the letter of the choice
    whose normalised text (or number) equals the text's. Letters beyond the number of
    choices are rejected.
    """
    if text is None:
        return None
    text = _clean(text)
    n = len(choices) if choices else 26
    for pattern in _LETTER_PATTERNS:
        m = pattern.match(text)
        if m:
            letter = next(g for g in m.groups() if g is not None).upper()
            if ord(letter) - ord("A") < n:
                return letter
    if choices:
        norm = normalize_text(text)
        for i, c in enumerate(choices):
            if norm and normalize_text(c) == norm:
                return chr(ord("A") + i)
        value = parse_number(text)
        if value is not None:
            hits = [i for i, c in enumerate(choices)
                    if (cv := parse_number(c)) is not None and _numbers_close(value, cv, DEFAULT_CONFIG)]
            if len(hits) == 1:
                return chr(ord("A") + hits[0])
    return None


_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_UNIT = r"(?:\s*(?:[a-zA-Zµ°²³]+(?:\^?\{?\d\}?)?(?:\s*/\s*[a-zA-Z]+(?:\^?\d)?)?))"
_NUMBER_RE = re.compile(
    rf"^(?P<sign>[-+−])?\s*(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?\s*(?P<pct>%|percent)?"
    rf"(?:{_UNIT}{{0,3}})\.?$",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class _Number:
    value: float
    integer: bool   # written as an integer literal (no decimal point, no fraction)
    percent: bool


def _read_number(text: str) -> _Number | None:
    t = _clean(text)
    t = t.replace("\\%", "%").replace("\\$", "$").replace("^\\circ", "°").replace("^{\\circ}", "°")
    t = t.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    t = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", t)
    t = re.sub(r"^[a-zA-Z]\w*\s*=\s*", "", t)                  # x = 5
    t = re.sub(r"^(?:about|approximately|approx\.?|~|≈)\s*", "", t, flags=re.IGNORECASE)
    t = re.sub(r"^([-+−]?)\s*(?:\$|€|£|usd\s*)", r"\1", t, flags=re.IGNORECASE)
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)                  # 1,234,567
    t = t.strip()
    if t.lower() in _WORD_NUMBERS:
        return _Number(float(_WORD_NUMBERS[t.lower()]), True, False)
    m = _NUMBER_RE.match(t)
    if not m:
        return None
    try:
        value = float(m.group("a"))
        if m.group("b") is not None:
            denominator = float(m.group("b"))
            if denominator == 0:
                return None
            value /= denominator
    except ValueError:
        return None
    if m.group("sign") in ("-", "−"):
        value = -value
    integer = m.group("b") is None and not re.search(r"[.eE]", m.group("a"))
    return _Number(value, integer, m.group("pct") is not None)


def parse_number(text: str | None) -> float | None:
    """The number a short answer states ("$1,234.5", "3/4", "25%", "12 cm^2"), or None.

    A percentage is returned as written ("25%" -> 25.0).
    """
    if text is None:
        return None
    n = _read_number(text)
    return None if n is None else n.value


def _numbers_close(p: float, g: float, config: MatchConfig, gold_integer: bool = False) -> bool:
    if gold_integer:
        return abs(p - g) <= config.abs_tol
    return abs(p - g) <= max(config.rel_tol * max(abs(p), abs(g)) * (1 + 1e-9), config.abs_tol)


def _numbers_match(p: _Number, g: _Number, config: MatchConfig) -> bool:
    preds = [p.value] + ([p.value / 100] if p.percent and config.percent_equivalence else [])
    golds = [(g.value, g.integer)] + ([(g.value / 100, False)]
                                      if g.percent and config.percent_equivalence else [])
    for pv in preds:
        for gv, gint in golds:
            if _numbers_close(pv, gv, config, gint):
                return True
    return False


# ---------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------


def _generic_match(pred: str, gold: str, config: MatchConfig) -> bool:
    g = _read_number(gold)
    if g is not None:
        p = _read_number(pred)
        if p is not None:
            return _numbers_match(p, g, config)
    return bool(normalize_text(gold)) and normalize_text(pred) == normalize_text(gold)


def default_match(pred: str | None, gold: str, choices: Sequence[str] | None = None,
                  config: MatchConfig = DEFAULT_CONFIG) -> bool:
    """The built-in matching rules (module docstring, steps 2-4)."""
    if pred is None or not pred.strip():
        return False
    if choices:
        gold_letter = parse_choice_letter(gold, choices)
        pred_letter = parse_choice_letter(pred, choices)
        if gold_letter is not None and pred_letter is not None:
            return gold_letter == pred_letter
        if gold_letter is not None:
            return _generic_match(pred, choices[ord(gold_letter) - ord("A")], config)
        if pred_letter is not None and _generic_match(choices[ord(pred_letter) - ord("A")], gold, config):
            return True
        return _generic_match(pred, gold, config)
    if _LETTER_PATTERNS[0].match(_clean(gold)):
        gold_letter = parse_choice_letter(gold)
        pred_letter = parse_choice_letter(pred)
        if pred_letter is not None:
            return gold_letter == pred_letter
    return _generic_match(pred, gold, config)


_MATCHERS: dict[str, Matcher] = {}


def register_matcher(benchmark: str, fn: Matcher | None = None, *, overwrite: bool = False):
    """Register ``fn(pred, gold, choices) -> bool`` for a benchmark (case-insensitive name).

    Usable as a decorator: ``@register_matcher("MathVista")``. Raises ValueError if the
    benchmark already has a matcher and ``overwrite`` is False.
    """
    key = benchmark.lower()

    def add(f: Matcher) -> Matcher:
        if key in _MATCHERS and not overwrite:
            raise ValueError(f"register_matcher: benchmark {benchmark!r} already has a matcher "
                             f"({_MATCHERS[key]!r}); pass overwrite=True to replace it")
        _MATCHERS[key] = f
        return f

    return add if fn is None else add(fn)


def unregister_matcher(benchmark: str) -> None:
    """Remove a benchmark's matcher (no error if none)."""
    _MATCHERS.pop(benchmark.lower(), None)


def registered_matchers() -> tuple[str, ...]:
    return tuple(sorted(_MATCHERS))


def get_matcher(benchmark: str | None) -> Matcher | None:
    return _MATCHERS.get(benchmark.lower()) if benchmark else None


def match_answer(pred: str | None, gold: str, *, choices: Sequence[str] | None = None,
                 benchmark: str | None = None, config: MatchConfig = DEFAULT_CONFIG) -> bool:
    """Whether a predicted answer matches the gold one (module docstring for the rules)."""
    custom = get_matcher(benchmark)
    if custom is not None:
        return bool(custom(pred, gold, choices))
    return default_match(pred, gold, choices, config)


def answer_key(pred: str | None, choices: Sequence[str] | None = None) -> str | None:
    """Canonical form of an answer for majority voting; None when there is no answer.

    "choice:B" for a recognised option, "num:<6 significant digits>" for a number,
    else "text:<normalised text>".
    """
    if pred is None or not pred.strip():
        return None
    if choices:
        letter = parse_choice_letter(pred, choices)
        if letter is not None:
            return f"choice:{letter}"
    n = _read_number(pred)
    if n is not None:
        return f"num:{n.value:.6g}"
    norm = normalize_text(pred)
    return f"text:{norm}" if norm else None
