"""Priors of the log-coefficient field.

:mod:`geoinvert.priors.gaussian`: Gaussian priors (Matern / SPDE and iid) on the finest lattice
with their exact coarse marginals; :mod:`geoinvert.priors.conditioning`: the prior conditioning
layers that take a level to the next. Any object with ``sample(num, level)`` and
``log_prob(x, level)`` serves as a prior (:class:`geoinvert.problem.posterior.Prior`).
"""

from geoinvert.priors.conditioning import PriorConditioning
from geoinvert.priors.gaussian import GaussianPrior, IIDPrior, MaternPrior, stationary_variance

__all__ = ["GaussianPrior", "MaternPrior", "IIDPrior", "PriorConditioning", "stationary_variance"]
