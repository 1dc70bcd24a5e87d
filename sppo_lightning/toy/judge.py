"""A pure-Python pairwise judge for the toy addition task: graded, and optionally intransitive.

SPPO is made for a preference oracle that gives probabilities rather than a 0/1 verdict and need not be
transitive. This judge is both, at no cost, so that ``benchmarks/preference.py`` can compare methods on it here:

    P(a ≻ b | x) = σ( (d(b) − d(a)) / scale  +  cycle · C(a, b)  +  length_bias · (len(a) − len(b)) )

- d(y) = min(|answer(y) − truth|, miss), the distance of the last ``\\boxed{}`` number (or the last number) to the
  sum; a response without a number is ``miss`` away. The truth is read from the question ("What is 93+78?"), as a
  real judge reads the prompt, so ``prefer`` needs nothing but text.
- C(a, b) ∈ {−1, 0, +1} is a rock-paper-scissors cycle on the answer's *style*, here its residue mod 3: residue 0
  beats 1, 1 beats 2, 2 beats 0 (C = +1 when a's style beats b's, −1 when it loses, 0 when equal or either has no
  answer). With ``cycle = 0`` (the default) the judge is graded and transitive: closer is better, by a margin that
  grows with the gap. With ``cycle`` above 1/scale, an answer one off the truth beats the truth when its style wins:
  for 93+78, 170 (residue 2) ≻ 171 (residue 0) ≻ 172 (residue 1) ≻ 170 is a cycle with no best response, the
  general preferences SPPO's Nash equilibrium is defined for, while far-off answers still lose to close ones.
- ``length_bias`` (0 by default) is a logit per character of length difference: a judge that, like PairRM and GPT-4
  judges, prefers the longer answer whatever it says, by a tunable margin. A policy can then win by growing longer;
  ``benchmarks/preference.py --setting length-biased`` trains on such a judge and evaluates with an unbiased one.

Example: ``ClosenessJudge(cycle=1).probability("What is 93+78?", r"\\boxed{170}", r"\\boxed{171}")`` is
σ(−1/2 + 1) = 0.622 (one off, but its style wins); with ``cycle=0`` it is σ(−1/2) = 0.378.
"""

from __future__ import annotations

import math
import re

import torch

from sppo_lightning.rewards.pairwise import PairwiseOracle

_QUESTION = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_NUMBER = re.compile(r"-?\d+")


def parse_truth(prompt: str) -> int | None:
    """The sum the question asks for ("What is 93+78?" -> 171), None if it asks none."""
    m = _QUESTION.search(prompt)
    return int(m.group(1)) + int(m.group(2)) if m else None


def parse_answer(response: str) -> int | None:
    """The last ``\\boxed{}`` integer of a response, else its last integer, else None."""
    found = _BOXED.findall(response) or _NUMBER.findall(response)
    return int(found[-1]) if found else None


def cycle_sign(a: int | None, b: int | None) -> int:
    """+1 when style(a) beats style(b) in the cycle 0 ≻ 1 ≻ 2 ≻ 0 of residues mod 3, −1 when it loses, else 0."""
    if a is None or b is None or a % 3 == b % 3:
        return 0
    return 1 if (b % 3 - a % 3) % 3 == 1 else -1


class ClosenessJudge(PairwiseOracle):
    """The toy task's graded (``cycle = 0``) or partly intransitive (``cycle > 0``) pairwise judge (module doc)."""

    def __init__(
        self,
        scale: float = 2.0,
        cycle: float = 0.0,
        miss: float = 100.0,
        length_bias: float = 0.0,
        batch_size: int = 4096,
        include_self: bool = True,
    ):
        """
        Args:
            scale: Distance (in units of the sum) worth one logit: a response 2 closer wins σ(1) = 73 % at 2.0.
            cycle: Logit added for a style that wins the rock-paper-scissors cycle (subtracted when it loses);
                0 = transitive.
            miss: Distance of a response without a number, and the cap on any distance.
            length_bias: Logit added per character the first response is longer than the second (a length-biased
                judge); 0 = length does not matter.
            batch_size: Ordered pairs per ``prefer`` call.
            include_self: Count each response against itself (½) in its win-rate.
        """
        super().__init__(batch_size=batch_size, include_self=include_self)
        if scale <= 0 or miss <= 0 or cycle < 0:
            from sppo_lightning.errors import ConfigError

            raise ConfigError(f"ClosenessJudge needs scale > 0, miss > 0, cycle >= 0; got {scale}, {miss}, {cycle}")
        self.scale, self.cycle, self.miss, self.length_bias = scale, cycle, miss, length_bias

    def distance(self, truth: int | None, answer: int | None) -> float:
        if truth is None or answer is None:
            return self.miss
        return min(abs(answer - truth), self.miss)

    def probability(self, prompt: str, first: str, second: str) -> float:
        """P(first ≻ second | prompt)."""
        truth, a, b = parse_truth(prompt), parse_answer(first), parse_answer(second)
        logit = (self.distance(truth, b) - self.distance(truth, a)) / self.scale + self.cycle * cycle_sign(a, b)
        logit += self.length_bias * (len(first) - len(second))
        return 1 / (1 + math.exp(-logit))

    def prefer(self, prompts, first, second, device=None) -> torch.Tensor:
        return torch.tensor([self.probability(*row) for row in zip(prompts, first, second, strict=True)])
