"""Training methods as LightningModules: AdaMatch, the source-only baseline, plain classification."""

from adamatch_uan.methods.adamatch import AdaMatch
from adamatch_uan.methods.base import DomainAdaptationMethod
from adamatch_uan.methods.source_only import SourceOnly
from adamatch_uan.methods.supervised import Supervised

__all__ = ["AdaMatch", "DomainAdaptationMethod", "SourceOnly", "Supervised"]
