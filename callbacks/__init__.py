"""Things around the training loop, wired in through the configs (nothing in sppo_lightning imports them)."""

from callbacks.export import HFExport
from callbacks.plot import LearningCurves
from callbacks.progress import RolloutProgress
from callbacks.samples import RolloutSamples
from callbacks.summary import FitSummary

__all__ = ["FitSummary", "HFExport", "LearningCurves", "RolloutProgress", "RolloutSamples"]
