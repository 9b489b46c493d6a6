"""Lightning callbacks that look inside training (gradient variance, activation distributions, mixture
traces), one that stops a diverging run (``NonFiniteGuard``) and one that says where the mixture
layers run (``BackendReport``); and ``MixtureSync``, the plugin that syncs norm statistics across
processes (``--trainer.sync_batchnorm true``).

On from the command line with ``--trainer.callbacks+=GradientVariance`` /
``--trainer.callbacks+=ActivationPlot`` (options as ``--trainer.callbacks.every_n_steps 25``
right after), or from YAML under ``trainer.callbacks`` as the headline configs do.
"""

from adamatch_uan.callbacks.activation_plot import ActivationPlot
from adamatch_uan.callbacks.backend_report import BackendReport
from adamatch_uan.callbacks.elapsed import ElapsedTime
from adamatch_uan.callbacks.gradient_variance import GradientVariance
from adamatch_uan.callbacks.mixture_sync import MixtureSync
from adamatch_uan.callbacks.mixture_trace import MixtureTrace
from adamatch_uan.callbacks.non_finite import FiniteExceptionCheckpoint, NonFiniteError, NonFiniteGuard

__all__ = ["ActivationPlot", "BackendReport", "ElapsedTime", "FiniteExceptionCheckpoint", "GradientVariance", "MixtureSync", "MixtureTrace", "NonFiniteError",
           "NonFiniteGuard"]
