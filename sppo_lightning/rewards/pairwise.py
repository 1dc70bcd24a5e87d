"""Pairwise preference oracles: P(y_i ≻ y_j | x) for every pair of a prompt's K responses.

SPPO's setting: general preferences, possibly intransitive, with no scalar reward behind them. ``PairwiseOracle``
asks for both orders of every pair, batched (``prefer``), and the win-rates come from the symmetrised matrix
(``preference.win_rates_from_pairwise``), so a judge's position bias cancels. A pairwise oracle's reward is the
response's win-rate: it has no other scale.

Any judge plugs in by implementing ``prefer``; ``PairClassifierOracle`` does so for any Hugging Face sequence
classifier that reads (prompt, response A, response B) as one text and gives one logit for "A is better";
``PairRMOracle`` (``rewards/pairrm.py``) for PairRM, the paper's judge, written here (llm-blender 0.0.2 itself does
not import with transformers 5).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from sppo_lightning.preference import symmetrized, win_rates_from_pairwise
from sppo_lightning.records import Rollout, Scores
from sppo_lightning.rewards.base import Oracle
from sppo_lightning.rewards.classifier import SequenceClassifier

DEFAULT_TEMPLATE = "Prompt:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\nIs response A better?"


def prompt_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


class PairwiseOracle(Oracle):
    """Subclass and implement ``prefer``."""

    min_samples = 2

    def __init__(self, batch_size: int = 64, include_self: bool = True):
        """
        Args:
            batch_size: Ordered pairs per ``prefer`` call.
            include_self: Count each response against itself (½) in its win-rate.
        """
        self.batch_size, self.include_self = batch_size, include_self

    @abstractmethod
    def prefer(
        self, prompts: list[str], first: list[str], second: list[str], device: torch.device | None
    ) -> torch.Tensor:
        """``[N]`` probabilities that ``first[n]`` is a better answer to ``prompts[n]`` than ``second[n]``."""

    def preference_matrix(self, rollout: Rollout, device: torch.device | None = None) -> torch.Tensor:
        """``[P, K, K]`` with P(y_i ≻ y_j) off the diagonal, both orders of every pair asked; ½ on the diagonal."""
        k = rollout.group_size
        pairs = [(p, i, j) for p in range(rollout.num_prompts) for i in range(k) for j in range(k) if i != j]
        probs = torch.full((rollout.num_prompts, k, k), 0.5)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            got = self.prefer(
                [prompt_text(rollout.prompts[p].messages) for p, _, _ in chunk],
                [rollout.response_text[p][i] for p, i, _ in chunk],
                [rollout.response_text[p][j] for p, _, j in chunk],
                device,
            )
            for (p, i, j), value in zip(chunk, got.tolist(), strict=True):
                probs[p, i, j] = value
        return probs

    def score(self, rollout: Rollout, device: torch.device | None = None) -> Scores:
        probs = self.preference_matrix(rollout, device)
        win_rates = win_rates_from_pairwise(probs, self.include_self)
        return Scores(rewards=win_rates.clone(), win_rates=win_rates, preferences=symmetrized(probs))


class PairClassifierOracle(PairwiseOracle):
    """A Hugging Face sequence classifier as the judge: P(A ≻ B) = σ(logit of the filled ``template``)."""

    def __init__(
        self,
        model_name_or_path: str,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 16,
        max_length: int = 2048,
        dtype: str = "bfloat16",
        offload: bool = True,
        trust_remote_code: bool = False,
        include_self: bool = True,
    ):
        """
        Args:
            model_name_or_path: A classifier with a single-logit head trained on "A better than B".
            template: How one pair is written, with ``{prompt}``, ``{first}`` and ``{second}``.
            batch_size: Pairs per forward pass.
            max_length: Tokens per pair; longer ones lose the start.
            dtype: Dtype of the judge's weights.
            offload: Keep the judge in CPU memory between scorings.
            trust_remote_code: Run the model repository's own code. Off unless you trust its author.
            include_self: Count each response against itself (½) in its win-rate.
        """
        super().__init__(batch_size=batch_size, include_self=include_self)
        missing = [f for f in ("{prompt}", "{first}", "{second}") if f not in template]
        if missing:
            from sppo_lightning.errors import ConfigError

            raise ConfigError(f"data.oracle.init_args.template lacks {', '.join(missing)}")
        self.template = template
        self.classifier = SequenceClassifier(
            model_name_or_path, batch_size, max_length, dtype, offload, trust_remote_code
        )

    def prefer(self, prompts, first, second, device):
        rows = zip(prompts, first, second, strict=True)
        texts = [self.template.format(prompt=p, first=a, second=b) for p, a, b in rows]
        return torch.sigmoid(self.classifier.logits(texts, device))
