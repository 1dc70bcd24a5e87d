"""A scalar reward model as the oracle: any ``AutoModelForSequenceClassification`` Bradley-Terry model.

Each response is scored in its conversation (the prompt's chat messages plus the response as the assistant turn,
rendered with the reward model's own chat template); y_k beats y_j with probability σ(s_k − s_j).
"""

from __future__ import annotations

import torch

from sppo_lightning.preference import pairwise_from_scores, win_rates_from_scores
from sppo_lightning.records import Rollout, Scores
from sppo_lightning.rewards.base import Oracle
from sppo_lightning.rewards.classifier import SequenceClassifier


class RewardModelOracle(Oracle):
    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 16,
        max_length: int = 2048,
        dtype: str = "bfloat16",
        offload: bool = True,
        trust_remote_code: bool = False,
        include_self: bool = True,
    ):
        """
        Args:
            model_name_or_path: A reward model (hub id or folder) with a single-logit classification head.
            batch_size: Conversations per forward pass.
            max_length: Tokens per conversation; longer ones lose the start of the prompt.
            dtype: Dtype of the reward model's weights.
            offload: Keep the reward model in CPU memory between scorings, on the accelerator only while scoring.
            trust_remote_code: Run the model repository's own code. Off unless you trust its author.
            include_self: Count each response against itself (½) in its win-rate.
        """
        self.classifier = SequenceClassifier(
            model_name_or_path, batch_size, max_length, dtype, offload, trust_remote_code
        )
        self.include_self = include_self

    def conversation_texts(self, rollout: Rollout) -> list[str]:
        """Every response in its conversation, prompt by prompt, in the reward model's chat template."""
        self.classifier.load()
        tok = self.classifier.tokenizer
        return [
            tok.apply_chat_template(rec.messages + [{"role": "assistant", "content": text}], tokenize=False)
            for rec, texts in zip(rollout.prompts, rollout.response_text, strict=True)
            for text in texts
        ]

    def score(self, rollout: Rollout, device: torch.device | None = None) -> Scores:
        rewards = self.classifier.logits(self.conversation_texts(rollout), device)
        rewards = rewards.view(rollout.num_prompts, rollout.group_size)  # [P, K] the reward model's logits
        win_rates = win_rates_from_scores(rewards, include_self=self.include_self)
        return Scores(rewards=rewards, win_rates=win_rates, preferences=pairwise_from_scores(rewards.float()))
