"""Rule oracle for answers written in ``\\boxed{}``: MATH problems and the built-in toy task.

``compute_score(solution_str, ground_truth)`` is 1.0 when the last boxed answer of the response equals the
ground truth, else 0.0, and never raises. Equality is decided in three steps, cheapest first:

1. the two answers are equal after the MATH normalisations (``strip_string`` below, after Hendrycks et al.
   2021's scorer: ``\\dfrac``, units, ``\\%``, degrees, ``\\text{}``, ``x=`` prefixes, thousands separators);
2. both are plain numbers and equal as numbers;
3. math-verify (sympy) finds them mathematically equal (fractions vs decimals, intervals, radicals, ...).

``strict=True`` stops after step 1. It is *not* verl's scorer (it disagrees with it both ways: ``10,000``,
``50%``, ``\\fbox``, ``5 \\text{ apples}``); ``compute_score_verl`` below is, exactly, for comparisons with numbers
measured by verl (the SPPO recipe's 46.6 % -> 65.6 %).

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
    """``compute_score(..., strict=True)`` under a name a config can give (``model.accuracy_fn``); not verl's scorer."""
    return compute_score(solution_str, ground_truth, strict=True)


# ------------------------------------------------------------------------------------------------ verl's scorer
# verl scores MATH (training reward and reported accuracy) with the Hendrycks et al. string normalisation as
# lm-evaluation-harness wrote it (verl/utils/reward_score/math_reward.py). Its verdicts, quirks included, are what
# the published 46.6 % -> 65.6 % measured, so they are reproduced exactly here (tests/rewards/test_math_verl.py
# compares against verl's released file):
# - "\boxed " (with a space) anywhere wins over every braced box: the answer is the text after its last occurrence,
#   up to the next "$";
# - otherwise the last "\boxed" must be followed by "{" (its closing "}" found by depth); "\fbox{...}" is located
#   but then refused (0.0), as is "\boxed" followed by anything else;
# - the normalisation drops units only after "\text{ " (one occurrence), never a bare "$" or "%"; a normalisation
#   that fails on a malformed answer ("\frac" or "\sqrt" at the end, two "\text{ ") falls back to raw equality.


class _Unnormalisable(Exception):
    """An answer verl's normalisation fails on: verl then compares the raw strings."""


def _verl_last_box(text: str) -> str | None:
    """The answer verl reads from a response (None: no usable box, which verl scores 0)."""
    if "\\boxed " in text:
        return text.rpartition("\\boxed ")[2].partition("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth, end = 0, None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end is None:
        return None
    box = text[start : end + 1]
    # verl strips the box by asserting it reads "\boxed{...}"; "\fbox{...}" or "\boxed x}" fail the assertion (0.0)
    return box[len("\\boxed{") : -1] if box.startswith("\\boxed{") else None


def _verl_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalisable
    return parts[0]


def _verl_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    for piece in rest:
        if not piece:
            raise _Unnormalisable
        head += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return head


def _verl_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    for piece in rest:
        if not piece:
            raise _Unnormalisable
        if piece[0] == "{":
            head += "\\frac" + piece
        elif len(piece) < 2:
            return s  # verl gives up on the whole string, keeping earlier pieces unfixed too
        elif piece[1] == "{":  # \frac1{72} -> \frac{1}{72}
            head += "\\frac{" + piece[0] + "}" + piece[1:]
        else:  # \frac12 -> \frac{1}{2}
            head += "\\frac{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return head


def _verl_slash(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:  # only integers written as Python writes them: "3/4", "-3/4", "3/-4"; not "03/4", "+3/4", "3.0/4"
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _verl_normalise(s: str) -> str:
    """verl's ``strip_string``, step for step (raises ``_Unnormalisable`` where it raises)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        s = s.replace(old, new)
    for old in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"):
        s = s.replace(old, "")
    s = _verl_units(s)
    s = s.replace("\\\\%", "").replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s.startswith("."):
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:  # "k = 5" -> " 5"
        s = rhs
    s = _verl_sqrt(s).replace(" ", "")
    s = _verl_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _verl_slash(s)


def _verl_equiv(answer: str, ground_truth) -> bool:
    if ground_truth is None:
        return False
    if not isinstance(ground_truth, str):  # verl's normalisation fails on it and compares raw values
        return answer == ground_truth
    try:
        return _verl_normalise(answer) == _verl_normalise(ground_truth)
    except _Unnormalisable:
        return answer == ground_truth


def compute_score_verl(solution_str: str, ground_truth: str) -> float:
    """verl's MATH verdict (``verl.utils.reward_score.math_reward.compute_score``), exactly: 1.0 or 0.0, never raises.

    The scorer behind verl's published SPPO numbers, for like-for-like comparisons; ``compute_score`` is the better
    checker (it accepts ``\\fbox``, ``10,000`` for ``10000``, ``50\\%`` for ``50``, equal numbers and expressions).

    >>> compute_score_verl("\\\\boxed{5 \\\\text{ apples}}", "5")
    1.0
    >>> compute_score_verl("\\\\boxed{10,000}", "10000"), compute_score_verl("\\\\fbox{4}", "4")
    (0.0, 0.0)
    """
    try:
        answer = _verl_last_box(solution_str)
        return 1.0 if answer is not None and _verl_equiv(answer, ground_truth) else 0.0
    except Exception:  # noqa: BLE001 - a non-string response, as verl: scored 0
        return 0.0
