"""The boxed-answer checker on a table of equal / not-equal cases, and its guarantees: never raises, bounded time."""

import time

import pytest

from sppo_lightning.rewards.math import compute_score, extract_answer, last_boxed_only_string, strip_string

EQUAL = [
    ("\\boxed{4}", "4"),
    ("The answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\tfrac12}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\fbox{7}", "7"),
    ("\\boxed 7", "7"),
    ("first \\boxed{3}, finally \\boxed{4}", "4"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{10\\%}", "10"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
    ("\\boxed{[1, 2)}", "[1,2)"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}"),
    ("\\boxed{\\$18.90}", "18.90"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{3/4}", "\\frac{3}{4}"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}"),
]

NOT_EQUAL = [
    ("\\boxed{5}", "4"),
    ("\\boxed{4} then \\boxed{5}", "4"),  # the last box wins
    ("\\boxed{4", "4"),  # truncated, never closed
    ("4", "4"),  # no box at all
    ("", "4"),
    ("\\boxed{}", "4"),
    ("\\boxed{(1,2]}", "[1,2)"),
    ("\\boxed{(1,2)}", "(2,1)"),
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}"),
    ("\\boxed{x}", "y"),
]


@pytest.mark.parametrize("response, truth", EQUAL)
def test_equal(response, truth):
    assert compute_score(response, truth) == 1.0


@pytest.mark.parametrize("response, truth", NOT_EQUAL)
def test_not_equal(response, truth):
    assert compute_score(response, truth) == 0.0


def test_strict_mode_is_string_normalisation_only():
    assert compute_score("\\boxed{\\dfrac{1}{2}}", "\\frac12", strict=True) == 1.0
    assert compute_score("\\boxed{0.25}", "\\frac{1}{4}", strict=True) == 0.0  # equal as numbers, not as strings
    assert compute_score("\\boxed{0.25}", "\\frac{1}{4}") == 1.0


def test_extraction():
    assert last_boxed_only_string("a \\boxed{\\frac{1}{2}} b") == "\\boxed{\\frac{1}{2}}"
    assert extract_answer("\\boxed{{a}{b}}") == "{a}{b}"
    assert extract_answer("no box") is None
    assert strip_string("\\dfrac{1}{2}") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{" + "{" * 100_000,  # deeply nested, unclosed
        "\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}",  # deep but closed: too long for sympy
        "x" * 2_000_000 + "\\boxed{4}",  # huge
        "\\boxed{\\frac{\\frac{\\frac{1}{2}}{3}}{" + "9" * 250 + "}}",
        None,
        123,
    ],
)
def test_never_raises_and_is_fast_on_pathological_input(response):
    start = time.perf_counter()
    assert compute_score(response, "4") in (0.0, 1.0)
    assert time.perf_counter() - start < 10
