"""Things around the training loop, wired in through the configs (nothing in sppo_lightning imports them)."""

from callbacks.summary import FitSummary

__all__ = ["FitSummary"]
