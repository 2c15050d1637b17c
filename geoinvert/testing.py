"""Small problems with exact posteriors, for tests and examples.

Each returns a :class:`~geoinvert.posterior.Posterior` and its exact reference, built from the
package's own priors and test-bed forward models (no mocks): what the statistical tests of the
samplers and of the correction check against.
"""

import math

import numpy as np

from geoinvert.diagnostics import mcmc_ess
from geoinvert.forward.testbeds import ExactQuadraticPosterior, QuadraticForward
from geoinvert.posterior import Posterior
from geoinvert.prior import MaternPrior

__all__ = ["bimodal_quadratic", "gaussian_kl", "z_scores"]


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


def z_scores(chains, reference):
    """``(estimate - reference) / MCSE`` of the mean of each scalar chain of ``chains (m, n, k)``,
    the Monte-Carlo standard error being std / sqrt(ESS): about N(0, 1) for a correct sampler.
    """
    out = []
    for k in range(chains.shape[2]):
        c = chains[:, :, k]
        out.append((c.mean() - reference[k]) / (c.std() / math.sqrt(mcmc_ess(c, rank_normalize=False))))
    return np.asarray(out)


def gaussian_kl(m0, S0, m1, S1):
    """Closed-form KL(N(m0, S0) || N(m1, S1))."""
    inv = np.linalg.inv(S1)
    diff = m1 - m0
    return 0.5 * (np.trace(inv @ S0) + diff @ inv @ diff - m0.size
                  + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])
