"""Rule oracle for answers written in ``\\boxed{}``: MATH problems and the built-in toy task.

``compute_score(solution_str, ground_truth)`` is 1.0 when the last boxed answer of the response equals the
ground truth, else 0.0, and never raises. Equality is decided in three steps, cheapest first:

1. the two answers are equal after the MATH normalisations (``strip_string`` below, after Hendrycks et al.
   2021's scorer: ``\\dfrac``, units, ``\\%``, degrees, ``\\text{}``, ``x=`` prefixes, thousands separators);
2. both are plain numbers and equal as numbers;
3. math-verify (sympy) finds them mathematically equal (fractions vs decimals, intervals, radicals, ...).

``strict=True`` stops after step 1, which is the string-normalisation scorer the reference MATH numbers were
measured with, for like-for-like comparisons.

>>> compute_score("so the answer is \\\\boxed{\\\\dfrac{1}{2}}", "\\\\frac12")
1.0
>>> compute_score("\\\\boxed{0.5}", "\\\\frac{1}{2}")
1.0
>>> compute_score("\\\\boxed{0.25}", "\\\\frac{1}{4}", strict=True)
0.0
>>> compute_score("\\\\boxed{3} then \\\\boxed{4}", "4")
1.0
>>> compute_score("\\\\boxed{4", "4")
0.0
"""

from __future__ import annotations

import functools
import re

# Pathological inputs are cut short instead of handed to sympy: only the tail of a response can hold its last
# box, and an answer longer than this is compared as a string only.
MAX_RESPONSE_CHARS = 20_000
MAX_VERIFY_CHARS = 300
VERIFY_TIMEOUT_S = 2

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) of ``text``, or None if absent or unclosed."""
    idx = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if idx < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, idx))
    rest = text[idx + len(cmd) :]
    if rest.startswith(" "):  # "\boxed 5" form: the answer runs to the next "$" or the end
        return cmd + " " + rest[1:].split("$")[0]
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return cmd + rest[: i + 1]
    return None  # truncated: the box was never closed


def remove_boxed(boxed: str) -> str:
    """``\\boxed{x}`` -> ``x``."""
    for cmd in _BOX_COMMANDS:
        if boxed.startswith(cmd + " "):
            return boxed[len(cmd) + 1 :]
        if boxed.startswith(cmd + "{") and boxed.endswith("}"):
            return boxed[len(cmd) + 1 : -1]
    return boxed


def extract_answer(solution_str: str) -> str | None:
    """The content of the last box of a response, or None."""
    boxed = last_boxed_only_string(solution_str[-MAX_RESPONSE_CHARS:])
    return None if boxed is None else remove_boxed(boxed)


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" + tail if b != "{" else b + tail)
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    # \sqrt2 -> \sqrt{2}
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def strip_string(s: str) -> str:
    """MATH's answer normalisation (Hendrycks et al. 2021, ``math_equivalence.py``), slightly extended."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)  # \text{cm} -> cm, then dropped as a unit below
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    # Trailing units: "5 cm", "10 inches", "3 square units".
    s = re.sub(
        r"(?<=\d)\s*(square\s+)?(units?|cm|m|km|inches|inch|feet|ft|meters?|degrees?|dollars?|cents?)\s*$", "", s
    )
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5" when the left-hand side is a short name.
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    # Thousands separators: 1,000,000 -> 1000000 (only when every group has three digits).
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _math_verify_equal(answer: str, ground_truth: str) -> bool:
    from math_verify import parse, verify

    gold = parse("\\boxed{" + ground_truth + "}", parsing_timeout=VERIFY_TIMEOUT_S)
    pred = parse("\\boxed{" + answer + "}", parsing_timeout=VERIFY_TIMEOUT_S)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=VERIFY_TIMEOUT_S))


def is_equiv(answer: str, ground_truth: str, strict: bool = False) -> bool:
    """Whether two extracted answers are equal (see the module docstring for the three steps)."""
    a, g = strip_string(answer), strip_string(ground_truth)
    if a == g:
        return True
    if strict:
        return False
    na, ng = _as_number(a), _as_number(g)
    if na is not None and ng is not None:
        return abs(na - ng) <= 1e-6 * max(1.0, abs(ng))
    if len(answer) > MAX_VERIFY_CHARS or len(ground_truth) > MAX_VERIFY_CHARS:
        return False
    return _math_verify_equal(answer, ground_truth)


CACHED_CHARS = 512


@functools.lru_cache(maxsize=65536)
def _cached_equiv(answer: str, ground_truth: str, strict: bool) -> bool:
    return is_equiv(answer, ground_truth, strict=strict)


def compute_score(solution_str: str, ground_truth: str, strict: bool = False) -> float:
    """1.0 if the last boxed answer of ``solution_str`` equals ``ground_truth``, else 0.0. Never raises."""
    try:
        answer = extract_answer(solution_str)
        if answer is None or not answer.strip():
            return 0.0
        ground_truth = str(ground_truth)
        if len(answer) + len(ground_truth) <= CACHED_CHARS:  # K samples often repeat an answer: check it once
            return 1.0 if _cached_equiv(answer, ground_truth, strict) else 0.0
        return 1.0 if is_equiv(answer, ground_truth, strict=strict) else 0.0
    except Exception:  # noqa: BLE001 - an oracle must score every response; a crash is a wrong answer
        return 0.0


def compute_score_strict(solution_str: str, ground_truth: str) -> float:
    """``compute_score(..., strict=True)`` under a name a config can give (``model.accuracy_fn``)."""
    return compute_score(solution_str, ground_truth, strict=True)
