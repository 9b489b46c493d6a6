"""Data: domains as in-memory uint8 tensors, and the (source, target) DataModule."""

from adamatch_uan.data.datamodule import DomainPairDataModule, PairedBatches
from adamatch_uan.data.domains import DomainError, load_domain, to_rgb32

__all__ = ["DomainError", "DomainPairDataModule", "PairedBatches", "load_domain", "to_rgb32"]
