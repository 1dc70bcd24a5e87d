"""``compute_score_verl`` against verl's own scorer, run from the released verl wheel as the oracle.

verl's ``verl/utils/reward_score/math_reward.py`` has no imports: it is loaded straight from the unpacked wheel
(``tests/upstream.released_source``), without installing verl. Every case below must get the same verdict.
"""

import contextlib
import importlib.util
import io
import itertools
import random

import pytest

from sppo_lightning.rewards.math import compute_score, compute_score_verl
from tests.upstream import released_source

VERL_VERSION = "0.9.1"


@pytest.fixture(scope="module")
def verl_score():
    path = released_source("verl", VERL_VERSION) / "verl" / "utils" / "reward_score" / "math_reward.py"
    spec = importlib.util.spec_from_file_location("verl_math_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def score(solution, truth):
        with contextlib.redirect_stdout(io.StringIO()):  # verl prints the exceptions it swallows
            return module.compute_score(solution, truth)

    return score


# Answers as MATH writes them and as models write them: the same value in many spellings, and near misses.
ANSWERS = [
    "4", "-4", "4.0", "04", "+4", "  4 ", "4.", ".5", "0.5", "-.5", "\\frac12", "\\frac{1}{2}", "\\dfrac{1}{2}",
    "\\tfrac12", "1/2", "-1/2", "1/-2", "01/2", "\\frac1{2}", "\\frac{1}2", "\\frac1", "\\frac", "\\frac\\frac12",
    "\\frac{\\sqrt3}{2}", "\\sqrt3", "\\sqrt{3}", "\\sqrt 3", "\\sqrt", "2\\sqrt2", "\\sqrt{2}\\sqrt3",
    "10,000", "10000", "10{,}000", "1,000,000", "50\\%", "50%", "50\\\\%", "50", "90^\\circ", "90^{\\circ}",
    "90°", "90", "\\$18.90", "$18.90", "18.90", "18.9", "5 \\text{ apples}", "5\\text{ apples}", "5 \\text{apples}",
    "5 \\text{ cm} \\text{ cm}", "5 cm", "5", "\\text{(A)}", "(A)", "A", "x = 3", "x=3", "k = 3", "xy = 3",
    "x = y = 3", "3", "\\left( 1, 2 \\right)", "(1, 2)", "(1,2)", "[1,2)", "\\left[ 1,2 \\right)", "\\infty",
    "-\\infty", "(-\\infty, 3]", "\\pi", "2\\pi", "\\frac{\\pi}{2}", "a\\!b", "ab", "x^2+1", "x^{2} + 1",
    "\\{1,2\\}", "\\text{even}", "\\textbf{even}", "\\mbox{even}", "even", "", " ", ".", "=", "a=", "=5",
    "\\\\frac12", "line\nbreak", "linebreak", "\\$", "\\boxed{4}", "{4}", "4}", "{", "}", "3/4/5", "\\frac{3}{4}",
    "3/4", "0.75", "1e3", "1000", "\\!\\!4", "4\\!", "two", "2", "\\sqrt{8}", "\\text{ }", "x \\text{ and } y",
]  # fmt: skip

TRUTHS = [
    "4", "\\frac{1}{2}", "\\frac12", "0.5", "\\frac{\\sqrt{3}}{2}", "\\sqrt{3}", "10000", "10,000", "50", "50\\%",
    "90", "90^\\circ", "18.90", "\\$18.90", "5", "5 \\text{ apples}", "\\text{(A)}", "3", "(1,2)", "[1,2)",
    "(-\\infty,3]", "\\frac{\\pi}{2}", "x^2+1", "\\text{even}", "", "\\frac{3}{4}", "1000", "2\\sqrt{2}", "-\\frac12",
    "\\frac{-1}{2}", "\\frac{1}{-2}", "\\frac{01}{2}",
]  # fmt: skip

# How a response carries its answer: boxes with and without braces or a space, several boxes, no box, \fbox.
WRAPPERS = [
    "\\boxed{{{a}}}",
    "The answer is $\\boxed{{{a}}}$.",
    "\\boxed {a}",
    "so $\\boxed {a}$ and more $x$",
    "\\fbox{{{a}}}",
    "\\boxed{{3}} then \\boxed{{{a}}}",
    "\\boxed {a} then \\boxed{{3}}",
    "\\boxed{{{a}}} then \\boxed 3",
    "\\fbox{{3}} then \\boxed{{{a}}}",
    "\\boxed{{{a}}} and \\fbox{{3}}",
    "{a}",
    "answer: {a}",
    "\\boxed{{{a}",
    "\\boxed{a}",
    "\\boxed{{}}",
    "\\boxed{{ {a} }}",
]


def all_cases():
    for wrap, answer in itertools.product(WRAPPERS, ANSWERS):
        solution = wrap.format(a=answer)
        truths = TRUTHS if wrap == WRAPPERS[0] else TRUTHS[::7]  # every truth with the plain box
        for truth in truths:
            yield solution, truth
        yield solution, answer  # the answer itself as the truth
    for answer in ANSWERS:  # truths in every spelling too
        yield "\\boxed{4}", answer
        yield f"\\boxed{{{answer}}}", answer


def random_cases(n: int, seed: int = 0):
    """Token soup from the pieces the normalisation cares about: finds the edge cases nobody wrote down."""
    pieces = [
        "\\boxed", "\\boxed ", "\\fbox", "{", "}", "$", "\\$", "1", "2", "-", ".", " ", "/", "=", "\\frac", "\\dfrac",
        "\\sqrt", "\\text{ ", "\\text{", "\\%", "%", "^\\circ", "\\left(", "\\right)", ",", "x", "\\\\", "\\!", "\n",
    ]  # fmt: skip
    rng = random.Random(seed)
    for _ in range(n):
        solution = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        truth = "".join(rng.choice(pieces[7:]) for _ in range(rng.randrange(0, 5)))
        yield solution, truth
        yield "\\boxed{" + truth + "}", rng.choice([truth, truth.replace(" ", ""), "1", "\\frac12"])


def test_same_verdict_as_verl_on_every_case(verl_score):
    cases = list(all_cases()) + list(random_cases(3000))
    assert len(cases) > 2000
    differ = [(s, t, v) for s, t in cases if compute_score_verl(s, t) != (v := verl_score(s, t))]
    assert not differ, f"{len(differ)} of {len(cases)} differ, e.g. {differ[:5]}"
    # the set exercises both verdicts, not only zeros
    assert sum(verl_score(s, t) for s, t in cases) > 300


def test_same_verdict_on_bad_input(verl_score):
    for solution, truth in [(None, "4"), (123, "4"), ("\\boxed{4}", None), ("\\boxed{4}", 4), ("\\boxed{4}", ["4"])]:
        assert compute_score_verl(solution, truth) == verl_score(solution, truth) == 0.0


@pytest.mark.parametrize(
    "solution, truth, verl, ours",
    [
        ("\\boxed{10,000}", "10000", 0.0, 1.0),  # thousands separator
        ("\\boxed{50\\%}", "50", 1.0, 1.0),
        ("\\boxed{50%}", "50", 0.0, 1.0),  # a bare % stays for verl
        ("\\fbox{4}", "4", 0.0, 1.0),  # found, then refused by verl's remove_boxed
        ("\\boxed 3 so \\boxed{4}", "4", 0.0, 1.0),  # "\boxed " anywhere wins for verl
        ("\\boxed{5 \\text{ apples}}", "5", 1.0, 1.0),
        ("\\boxed{0.25}", "\\frac14", 0.0, 1.0),  # numbers equal, strings not
        ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0, 1.0),
    ],
)
def test_where_verl_and_our_checker_part(verl_score, solution, truth, verl, ours):
    """The documented differences: ``compute_score_verl`` follows verl, ``compute_score`` is the better checker."""
    assert compute_score_verl(solution, truth) == verl_score(solution, truth) == verl
    assert compute_score(solution, truth) == ours
