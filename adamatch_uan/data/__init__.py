"""Data: domains as in-memory uint8 tensors, the (source, target) DataModule and the single-domain one."""

from adamatch_uan.data.datamodule import DomainPairDataModule, PairedBatches
from adamatch_uan.data.domains import load_domain, to_rgb32
from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.single_domain import SingleDomainDataModule

__all__ = ["DomainError", "DomainPairDataModule", "PairedBatches", "SingleDomainDataModule", "load_domain", "to_rgb32"]
