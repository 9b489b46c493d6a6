"""Lightning callbacks that look inside training: gradient variance and activation distributions.

On from the command line with ``--trainer.callbacks+=GradientVariance`` /
``--trainer.callbacks+=ActivationPlot`` (options as ``--trainer.callbacks.every_n_steps 25``
right after), or from YAML under ``trainer.callbacks`` as the headline configs do.
"""

from adamatch_uan.callbacks.activation_plot import ActivationPlot
from adamatch_uan.callbacks.gradient_variance import GradientVariance

__all__ = ["ActivationPlot", "GradientVariance"]
