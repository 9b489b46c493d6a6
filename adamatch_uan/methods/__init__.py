"""Training methods as LightningModules: AdaMatch and the source-only baseline."""

from adamatch_uan.methods.adamatch import AdaMatch
from adamatch_uan.methods.base import DomainAdaptationMethod
from adamatch_uan.methods.source_only import SourceOnly

__all__ = ["AdaMatch", "DomainAdaptationMethod", "SourceOnly"]
