"""Small problems with exact posteriors, faulty forward models and small cases, for tests and
examples.

The problems are built from the package's own priors and test-bed forward models (no mocks)
with their exact posteriors: what the statistical tests of the samplers, of training and of
the correction check against. The faulty models fail the way a real solve can (a NaN row,
counted in ``last_failures``) so that the failure paths are exercised for real.
"""

import copy
import math

import numpy as np
import torch

from geoinvert.diagnostics import mcmc_ess
from geoinvert.problem.forward.testbeds import (ExactLinearPosterior, ExactQuadraticPosterior,
                                                ExactQuadraticsPosterior, LinearForward,
                                                QuadraticForward, paper_phi)
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import MaternPrior

__all__ = ["bimodal_quadratic", "linear_gaussian", "small_flow", "flat_parameters",
           "FlakyForward", "BrokenPosterior", "small_case", "gaussian_kl", "z_scores"]

_CENTRES = [(0.3, 0.3), (0.7, 0.6), (0.5, 0.5)]
_NOISE = 0.01


def linear_gaussian(levels=3):
    """Linear-Gaussian test bed on a ``2**levels`` lattice: a Matern prior (Dirichlet
    boundary) and the integrals of three Gaussian bumps, noise 0.01, data from a prior draw.

    Returns:
        ``(prior, posteriors, exact)``: the prior, ``{level: Posterior}`` for levels
        1..``levels`` and the :class:`~geoinvert.problem.forward.testbeds.ExactLinearPosterior` of the
        finest level.
    """
    prior = MaternPrior(levels, alpha=2, correlation_length=0.3, std=1.0, boundary="dirichlet")
    n = 2 ** levels
    bumps = [lambda x, y, cx=cx, cy=cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
             for cx, cy in _CENTRES]
    forward = LinearForward(bumps, (n, n))
    truth = prior.sample(1, levels, generator=torch.Generator().manual_seed(3))[0].numpy()
    rng = np.random.default_rng(0)
    data = forward.matrix @ truth.ravel() + _NOISE * rng.standard_normal(len(_CENTRES))
    posteriors = {level: Posterior(prior, forward.at_level(level), data, _NOISE, level)
                  for level in range(1, levels + 1)}
    exact = ExactLinearPosterior(prior.mean(levels).ravel(), prior.covariance(levels),
                                 forward.matrix, data, _NOISE, shape=(n, n))
    return prior, posteriors, exact


def small_flow(prior, seed=0, *, blocks=2, hidden=16):
    """A small float32 :class:`~geoinvert.flows.msign.MsIGN` on ``prior`` whose initial
    weights come from ``seed``."""
    from geoinvert.flows.msign import MsIGN
    torch.manual_seed(seed)
    return MsIGN(prior, blocks_per_level=blocks, hidden=hidden).to(torch.float32)


def flat_parameters(model):
    """All parameters of ``model`` as one detached vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class FlakyForward:
    """Wraps a forward model so that its solve fails (a NaN row, listed in
    ``last_failures``) for about one field in five, deterministically in the field."""

    def __init__(self, inner):
        self.inner, self.shape, self.n_obs = inner, inner.shape, inner.n_obs
        self.n_solves, self.last_failures = 0, []
        self.twice_differentiable = getattr(inner, "twice_differentiable", False)

    def __call__(self, x):
        y = self.inner(x)
        self.n_solves = self.inner.n_solves
        bad = torch.floor(1e3 * x.detach().reshape(x.shape[0], -1).sum(1)) % 5 == 0
        self.last_failures = torch.nonzero(bad).ravel().tolist()
        return torch.where(bad[:, None], torch.full_like(y, math.nan), y)


class BrokenPosterior(Posterior):
    """A posterior whose every evaluation is NaN (a forward model that always fails)."""

    def log_prob(self, x):
        return super().log_prob(x) * math.nan


_SMALL_CASE = {
    "name": "small",
    "levels": {"finest": 3},
    "prior": {"correlation_length": 0.3},
    "forward": {"kind": "linear"},
    "observations": {"functions": [{"shape": "gaussian", "center": [0.3, 0.3], "width": 0.15},
                                   {"shape": "gaussian", "center": [0.7, 0.6], "width": 0.15}]},
    "data": {"synthetic": {"truth": "prior", "seed": 2}},
    "noise": {"std": 0.01},
    "sampler": {"blocks": 1, "hidden": 4, "steps": 2, "batch": 8,
                "correction": {"chains": 4, "warmup": 20, "draws": 10, "max_draws": 10,
                               "leapfrog": 3}},
    "output": {"samples": 40, "direction": "x - 0.5"},
}


def small_case():
    """A case dictionary that runs end to end in seconds: an 8x8 linear problem with two
    integral observations, a tiny flow, a short correction (a fresh copy each call)."""
    return copy.deepcopy(_SMALL_CASE)


def bimodal_quadratic(level=2, *, y=0.02, noise=0.005, correlation_length=0.3):
    """y = <w, x>^2 + e on a ``2**level`` lattice with a symmetric Matern prior: two modes at
    t = <w, x> = +-sqrt(y) of exactly equal mass (at the defaults t = +-0.14, width 0.018).

    Returns:
        ``(posterior, exact, w)``: the :class:`~geoinvert.problem.posterior.Posterior`, its
        :class:`~geoinvert.problem.forward.testbeds.ExactQuadraticPosterior` and the functional w
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


def second_phi(x, y):
    """``sin(2 pi x) sin(pi y)``: odd under x -> 1 - x where the paper's phi is even, so the
    two directions are independent under a prior invariant under that reflection."""
    return np.sin(2.0 * np.pi * x) * np.sin(np.pi * y)


def four_mode_quadratic(level=2, *, y=0.02, noise=0.005, correlation_length=0.3):
    """y_k = <w_k, x>^2 + e_k, k = 1, 2 (the paper's phi and :func:`second_phi`) on a
    ``2**level`` lattice with a symmetric Matern prior: four modes at t = (+-sqrt(y),
    +-sqrt(y)) of exactly equal mass.

    Returns:
        ``(posterior, exact, W)``: the :class:`~geoinvert.problem.posterior.Posterior`, its
        :class:`~geoinvert.problem.forward.testbeds.ExactQuadraticsPosterior` and the
        functionals ``(2, n * n)``.
    """
    prior = MaternPrior(level, correlation_length=correlation_length, std=1.0)
    n = 2 ** level
    forward = QuadraticForward((n, n), phi=[paper_phi, second_phi])
    data, noise = np.array([y, y]), np.array([noise, noise])
    posterior = Posterior(prior, forward, data, noise, level)
    exact = ExactQuadraticsPosterior(prior.mean(level).ravel(), prior.covariance(level),
                                     forward.matrix, data, noise, shape=(n, n))
    return posterior, exact, forward.matrix


def z_scores(chains, reference):
    """``(estimate - reference) / MCSE`` of the mean of each scalar chain of ``chains (m, n, k)``,
    the Monte-Carlo standard error being std / sqrt(ESS): about N(0, 1) for a correct sampler.
    """
    out = []
    for k in range(chains.shape[2]):
        c = chains[:, :, k]
        out.append((c.mean() - reference[k]) / (c.std() / math.sqrt(mcmc_ess(c, rank_normalize=False))))
    return np.asarray(out)


def assert_sides_match(t, t_exact, *, centre, width):
    """The 1-D marginal of draws ``t`` along a data direction against exact draws ``t_exact``:
    on each side of t = 0 the centre within ``centre`` (absolute) and the width within the
    fraction ``width`` of the exact ones (per-cell moments can hide a mode of the wrong
    shape)."""
    t, t_exact = np.asarray(t), np.asarray(t_exact)
    for sign in (1, -1):
        side, ref = t[sign * t > 0], t_exact[sign * t_exact > 0]
        assert abs(side.mean() - ref.mean()) <= centre, (sign, side.mean(), ref.mean())
        assert abs(side.std() - ref.std()) <= width * ref.std(), (sign, side.std(), ref.std())


def gaussian_kl(m0, S0, m1, S1):
    """Closed-form KL(N(m0, S0) || N(m1, S1))."""
    inv = np.linalg.inv(S1)
    diff = m1 - m0
    return 0.5 * (np.trace(inv @ S0) + diff @ inv @ diff - m0.size
                  + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])
