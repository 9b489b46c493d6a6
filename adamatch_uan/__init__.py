"""adamatch-uan: AdaMatch with pluggable normalization (BN, MN, UAN) for unsupervised domain adaptation."""

__version__ = "0.1.0"
