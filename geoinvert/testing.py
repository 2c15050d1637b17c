"""Small problems with exact posteriors, for tests and examples.

Each returns a :class:`~geoinvert.posterior.Posterior` and its exact reference, built from the
package's own priors and test-bed forward models (no mocks): what the statistical tests of the
samplers and of the correction check against.
"""

import numpy as np

from geoinvert.forward.testbeds import ExactQuadraticPosterior, QuadraticForward
from geoinvert.posterior import Posterior
from geoinvert.prior import MaternPrior

__all__ = ["bimodal_quadratic"]


def bimodal_quadratic(level=2, *, y=0.02, noise=0.005, correlation_length=0.3):
    """y = <w, x>^2 + e on a ``2**level`` lattice with a symmetric Matern prior: two modes at
    t = <w, x> = +-sqrt(y) of exactly equal mass (at the defaults t = +-0.14, width 0.018).

    Returns:
        ``(posterior, exact, w)``: the :class:`~geoinvert.posterior.Posterior`, its
        :class:`~geoinvert.forward.testbeds.ExactQuadraticPosterior` and the functional w
        ``(n * n,)``.
    """
    prior = MaternPrior(level, correlation_length=correlation_length, std=1.0)
    n = 2 ** level
    forward = QuadraticForward((n, n))
    posterior = Posterior(prior, forward, np.array([y]), np.array([noise]), level)
    w = forward.functional
    exact = ExactQuadraticPosterior(prior.mean(level).ravel(), prior.covariance(level), w, y,
                                    noise, shape=(n, n))
    return posterior, exact, w
