"""Data: domains as in-memory uint8 tensors (labelled or not) on one class index, the (source, target)
DataModule and the single-domain one."""

from adamatch_uan.data.classes import onto, run_classes
from adamatch_uan.data.datamodule import DomainPairDataModule, PairedBatches
from adamatch_uan.data.domains import Domain, load_domain
from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.preprocess import describe, resizer, to_rgb32
from adamatch_uan.data.single_domain import SingleDomainDataModule

__all__ = ["Domain", "DomainError", "DomainPairDataModule", "PairedBatches", "SingleDomainDataModule", "describe",
           "load_domain", "onto", "resizer", "run_classes", "to_rgb32"]
