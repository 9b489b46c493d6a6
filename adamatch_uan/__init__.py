"""adamatch-uan: AdaMatch with pluggable normalization (BN, MN, UAN) for unsupervised domain adaptation.

``adamatch_uan.load(run_dir)`` returns a finished run's classifier (``classifier.py``); it is
imported on first use, so ``import adamatch_uan.norm`` stays free of Lightning.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "Classifier", "Predictions"):
        from adamatch_uan import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'adamatch_uan' has no attribute {name!r}")
