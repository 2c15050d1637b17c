"""Tests of the reference MCMC samplers on the exact linear-Gaussian posterior."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from geoinvert.diagnostics import mcmc_ess
from geoinvert.problem.forward.testbeds import ExactLinearPosterior, LinearForward, paper_phi
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import IIDPrior, MaternPrior
from geoinvert.samplers import (ChainResult, DualAveraging, RobbinsMonro, prior_whitening,
                                run_hmc, run_mala, run_pcn)
from geoinvert.testing import z_scores

LEVEL = 2
NOISE = np.array([0.1, 0.05, 0.2])
DATA = np.array([0.1, 0.05, 0.8])

# short runs: (sampler, keyword options) sized for ~2-5 s each on one thread
RUNS = {
    "pcn": (run_pcn, dict(draws=2000, warmup=500)),
    "mala": (run_mala, dict(draws=1000, warmup=300)),
    "hmc": (run_hmc, dict(draws=300, warmup=200, n_leapfrog=8)),
}
# fixed (non-adapted) steps of the invariance check, deliberately large so a wrong kernel shows
FIXED = {
    "pcn": (run_pcn, dict(beta=0.9), 20),
    "mala": (run_mala, dict(step_size=1.0), 20),
    "hmc": (run_hmc, dict(step_size=0.8, n_leapfrog=5), 4),
}


def _functions():
    return [paper_phi, lambda x, y: np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.05),
            lambda x, y: x + y ** 2]


@pytest.fixture(scope="module")
def problem():
    """Posterior of a 4x4 Matern prior and three linear observations, and its exact law."""
    prior = MaternPrior(LEVEL, correlation_length=0.4, std=1.0, mean=0.1)
    forward = LinearForward(_functions(), (2 ** LEVEL,) * 2)
    posterior = Posterior(prior, forward, DATA, NOISE, LEVEL)
    exact = ExactLinearPosterior(prior.mean(LEVEL).ravel(), prior.covariance(LEVEL),
                                 forward.matrix, DATA, NOISE, shape=(2 ** LEVEL,) * 2)
    return posterior, exact


# -- whitening map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [MaternPrior(2, correlation_length=0.3, mean=0.2),
                                   MaternPrior(3, correlation_length=0.3, std=2.0),
                                   IIDPrior(2, std=0.5, mean=-1.0)],
                         ids=["matern2", "matern3", "iid2"])
def test_whitening_round_trip_and_jacobian(prior):
    level = prior.levels
    white = prior_whitening(prior, level)
    z = torch.randn(5, 4 ** level, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(white.to_z(white.to_x(z)), z, rtol=0, atol=1e-12)
    zero = torch.zeros(4 ** level, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: white.to_x(v[None]).reshape(-1), zero)
    jac = jac.numpy()
    np.testing.assert_allclose(jac @ jac.T, prior.covariance(level), atol=1e-12)
    np.testing.assert_allclose(white.to_x(zero[None])[0].numpy(), prior.mean(level), atol=1e-12)
    assert white.logdet == pytest.approx(np.linalg.slogdet(jac)[1], abs=1e-10)


# -- recovery of the exact posterior ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", RUNS)
def test_sampler_recovers_exact_linear_posterior(problem, method):
    """Per-cell mean and variance within 4.5 MC standard errors (ESS-based), R-hat < 1.05.

    4.5 sigma per statistic keeps the family-wise false alarm rate of 32 statistics small even
    with a 10-20 % error in the estimated ESS; the RMS of the z-scores (1 when the errors are
    right) is checked in aggregate.
    """
    posterior, exact = problem
    sampler, options = RUNS[method]
    solves = posterior.forward.n_solves
    result = sampler(posterior, chains=4, generator=torch.Generator().manual_seed(1), **options)
    assert result.nfs == posterior.forward.n_solves - solves
    cells = result.samples.reshape(*result.samples.shape[:2], -1)
    z_mean = z_scores(cells, exact.mean)
    z_var = z_scores((cells - exact.mean) ** 2, np.diag(exact.cov))
    for z in (z_mean, z_var):
        assert np.abs(z).max() < 4.5 and np.sqrt(np.mean(z ** 2)) < 2.0, z
    assert result.rhat() < 1.05
    assert result.ess() > 50
    assert np.isfinite(result.log_prob).all()


def test_log_prob_of_draws_is_the_posterior_log_prob_and_solves_are_counted(problem):
    posterior, _ = problem
    for sampler in (run_pcn, run_mala):
        result = sampler(posterior, chains=2, draws=5, warmup=3, thin=2,
                         generator=torch.Generator().manual_seed(2))
        assert result.samples.shape == (2, 5, 4, 4)
        assert result.nfs == 2 * (1 + 3 + 5 * 2)  # initial states, then one batch per iteration
        x = torch.from_numpy(result.flat())
        np.testing.assert_allclose(result.log_prob.ravel(), posterior.log_prob(x).numpy(),
                                   atol=1e-10)


def test_adaptation_reaches_target_acceptance(problem):
    posterior, _ = problem
    for sampler, target in ((run_pcn, 0.25), (run_mala, 0.574)):
        result = sampler(posterior, chains=4, draws=200, warmup=400,
                         generator=torch.Generator().manual_seed(3))
        assert abs(result.acceptance.mean() - target) < 0.1


# -- invariance: chains started in the posterior stay there ----------------------------------


@pytest.mark.parametrize("method", FIXED)
def test_chains_started_at_the_posterior_stay_there(problem, method):
    """256 independent chains from exact draws, K fixed-step transitions: the states are still
    posterior draws. Checked with N |C^{-1/2}(mean - m)|^2 ~ chi2_d (0.999 quantile) and the mean
    of the squared Mahalanobis radius, d +- 4 sqrt(2 d / N)."""
    posterior, exact = problem
    sampler, options, steps = FIXED[method]
    num, gen = 256, torch.Generator().manual_seed(4)
    init = exact.sample(num, gen)
    result = sampler(posterior, chains=num, draws=steps, warmup=0, init=init, generator=gen,
                     **options)
    assert 0.05 < result.acceptance.mean() < 0.99  # the steps are not trivial
    r = result.samples[:, -1].reshape(num, -1) - exact.mean
    chol = np.linalg.cholesky(exact.cov)
    white = np.linalg.solve(chol, r.T).T
    d = white.shape[1]
    assert num * np.sum(white.mean(0) ** 2) < stats.chi2.ppf(0.999, d)
    assert abs(np.mean(np.sum(white ** 2, 1)) - d) < 4 * math.sqrt(2 * d / num)


# -- failures, reproducibility, adapters, packaging ------------------------------------------


class _FailingForward:
    """Linear forward model whose solve 'fails' (NaN row) where the corner cell exceeds 0.5."""

    def __init__(self, forward):
        self.inner, self.n_obs, self.n_solves = forward, forward.n_obs, 0

    def __call__(self, x):
        self.n_solves += x.shape[0]
        y = self.inner(x)
        return torch.where((x[:, 0, 0] > 0.5)[:, None], torch.nan, y)


@pytest.mark.parametrize("method", RUNS)
def test_failed_solves_are_rejected(problem, method):
    posterior, _ = problem
    failing = Posterior(posterior.prior, _FailingForward(posterior.forward), DATA, NOISE, LEVEL)
    sampler, _ = RUNS[method]
    init = torch.full((3, 4, 4), 0.1, dtype=torch.float64)
    result = sampler(failing, chains=3, draws=30, warmup=30, init=init,
                     generator=torch.Generator().manual_seed(5))
    assert (result.samples[:, :, 0, 0] <= 0.5).all()
    assert np.isfinite(result.samples).all() and np.isfinite(result.log_prob).all()
    assert result.acceptance.min() > 0


def test_start_where_the_target_fails_raises(problem):
    posterior, _ = problem
    failing = Posterior(posterior.prior, _FailingForward(posterior.forward), DATA, NOISE, LEVEL)
    with pytest.raises(ValueError, match="chains \\[0\\]"):
        run_pcn(failing, chains=2, draws=1, init=torch.tensor([[[1.0] * 4] * 4, [[0.0] * 4] * 4]))


def test_invalid_options_raise(problem):
    posterior, _ = problem
    for sampler, options in ((run_pcn, dict(beta=1.5)), (run_mala, dict(draws=0)),
                             (run_hmc, dict(n_leapfrog=0)), (run_hmc, dict(jitter=1.0))):
        with pytest.raises(ValueError):
            sampler(posterior, chains=2, **options)


def test_same_seed_same_chains(problem):
    posterior, _ = problem
    runs = [run_hmc(posterior, chains=2, draws=5, warmup=5, n_leapfrog=2,
                    generator=torch.Generator().manual_seed(6)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].samples, runs[1].samples)
    assert runs[0].nfs == 2 * (1 + 10 * 2)  # one solve per chain per leapfrog step


@pytest.mark.parametrize("adapter", [DualAveraging, RobbinsMonro])
def test_adapter_finds_the_step_of_the_target_acceptance(adapter):
    """With acceptance exp(-s), the target 0.5 is reached at s = log 2."""
    adapt = adapter(0.1, 0.5)
    for _ in range(2000):
        adapt.update(math.exp(-adapt.value))
    assert adapt.final() == pytest.approx(math.log(2), rel=0.05)


def test_chain_result_summaries_of_large_fields():
    """Above ``max_cells`` the summaries are principal components; i.i.d. chains give R-hat ~ 1."""
    rng = np.random.default_rng(7)
    samples = rng.standard_normal((4, 500, 8, 8))
    result = ChainResult(samples, rng.standard_normal((4, 500)), np.ones(4), 0, 1.0, 0.0, "test", 0)
    assert result.summaries(max_cells=32, components=5).shape == (4, 500, 6)
    assert result.summaries().shape == (4, 500, 65)
    assert result.rhat(max_cells=32) < 1.02 and result.ess(max_cells=32) > 1000
    assert result.flat(burn=100).shape == (1600, 8, 8)


def test_importing_samplers_does_not_import_dolfinx():
    code = "import sys, geoinvert.samplers; print('dolfinx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
