"""Tests for the tempered SMC sampler (the standard method of the coarsest MsIGN stage)."""

import math

import numpy as np
import pytest
import torch

from geoinvert.problem.forward.testbeds import ExactLinearPosterior, LinearForward, QuadraticForward
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import MaternPrior
from geoinvert.samplers import tempered_smc
from geoinvert.inference.starts import smc_pool


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior():
    return MaternPrior(2, alpha=2, correlation_length=0.3, std=1.0, boundary="dirichlet")


def linear_level1(prior, noise):
    """A sharp linear-Gaussian posterior on the 2x2 level: 3 bump integrals, exact answer."""
    bumps = [(0.3, 0.3), (0.7, 0.6), (0.4, 0.8)]
    forward = LinearForward([lambda x, y, c=c: np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2)
                                                       / 0.05) for c in bumps], (2, 2))
    data = forward.matrix @ np.array([0.8, -0.5, 0.3, 1.1]) + noise * np.array([0.3, -1, 0.5])
    posterior = Posterior(prior, forward, data, noise, 1)
    exact = ExactLinearPosterior(prior.mean(1).ravel(), prior.covariance(1), forward.matrix,
                                 data, noise, shape=(2, 2))
    return posterior, exact


def test_linear_gaussian_moments(prior):
    # Prior std ~0.5, posterior std along the data ~2e-3: importance sampling from the prior
    # would keep a handful of samples. 512 particles: the weighted mean's Monte-Carlo error is
    # ~0.1 posterior std (particles are correlated), so 0.4 std is a 4-sigma bound.
    posterior, exact = linear_level1(prior, 1e-3)
    result = tempered_smc(posterior.log_likelihood, prior, 1, 512, generator=gen())
    assert result.tempered and len(result.temperatures) > 3 and result.temperatures[-1] == 1.0
    w = result.w.numpy()
    x = result.x.flatten(1).numpy()
    mean = w @ x
    cov = (x - mean).T @ ((x - mean) * w[:, None])
    std = np.sqrt(np.diag(exact.cov))
    np.testing.assert_array_less(np.abs(mean - exact.mean) / std, 0.4)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), std, rtol=0.35)
    assert result.evaluations == 512 * (1 + 8 * (len(result.temperatures) - 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_bimodal_mass_is_split_evenly(prior, seed):
    # y = <phi, x>^2 with a precise y: two narrow modes t = +-sqrt(y) of equal mass. The
    # fraction of weight in t > 0 has a Monte-Carlo std of ~0.04 with 512 correlated
    # particles; 0.15 is a 3.5-sigma bound.
    forward = QuadraticForward((2, 2))
    w = torch.as_tensor(forward.functional).flatten()
    t_std = float(torch.sqrt(w @ torch.as_tensor(prior.covariance(1)) @ w))
    posterior = Posterior(prior, forward, [(2 * t_std) ** 2], 0.02 * (2 * t_std) ** 2, 1)
    result = tempered_smc(posterior.log_likelihood, prior, 1, 512, generator=gen(seed))
    t = result.x.flatten(1) @ w.to(torch.float64)
    positive = float(result.w[t > 0].sum())
    assert abs(positive - 0.5) < 0.15
    np.testing.assert_allclose(float(result.w @ t.abs()), 2 * t_std, rtol=0.05)


def test_evaluation_cap_ends_with_importance_weights(prior):
    posterior, _ = linear_level1(prior, 1e-3)
    result = tempered_smc(posterior.log_likelihood, prior, 1, 64, generator=gen(),
                          max_evaluations=64 * 17)
    assert not result.tempered and result.temperatures[-1] == 1.0
    assert result.evaluations <= 64 * 17
    torch.testing.assert_close(result.w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert result.ess < 1.0


def test_failed_likelihoods_get_no_weight(prior):
    posterior, _ = linear_level1(prior, 1e-2)

    def flaky(x):
        value = posterior.log_likelihood(x).clone()
        value[x[:, 0, 0] > 0.5] = math.nan
        return value

    result = tempered_smc(flaky, prior, 1, 128, generator=gen())
    assert torch.isfinite(result.log_lik[result.w > 0]).all()
    assert (result.x[result.w > 0][:, 0, 0] <= 0.5).all()


def test_pool_from_smc(prior):
    from geoinvert.flows.msign import MsIGN
    posterior, _ = linear_level1(prior, 1e-3)
    model = MsIGN(prior, blocks_per_level=1, hidden=8)
    pool, result = smc_pool(model, posterior, 64, gen())
    assert pool.x.dtype == model.dtype and pool.x.shape == (64, 2, 2)
    torch.testing.assert_close(pool.log_q, posterior.log_prob(result.x).to(torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num=1), "num"), (dict(ess_target=1.0), "ess_target"), (dict(kernel="hmc"), "kernel"),
    (dict(kernel="pcn", step=2.0), "step"), (dict(moves=0), "moves")])
def test_bad_arguments(prior, kwargs, match):
    posterior, _ = linear_level1(prior, 1e-2)
    args = dict(num=16) | kwargs
    with pytest.raises(ValueError, match=match):
        tempered_smc(posterior.log_likelihood, prior, 1, args.pop("num"), **args)


@pytest.mark.slow
def test_training_with_an_smc_stage_one():
    # The linear test bed of test_train (8x8, 3 levels); stage 1 samples q_1 by SMC with
    # pool // 4 particles, then trains on the pool as with importance sampling.
    from geoinvert.testing import linear_gaussian, small_flow
    from geoinvert.inference.trainer import train_msign
    prior, posteriors, _ = linear_gaussian()
    model = small_flow(prior)
    before = sum(p.forward.n_solves for p in posteriors.values())
    history = train_msign(model, posteriors, steps=[10, 4, 4], batch=8, lr=3e-3, pool=256,
                          coarse_sampler="smc", generator=gen(), callback=None, checkpoint=None)
    solves = sum(p.forward.n_solves for p in posteriors.values()) - before
    smc = history[0]["nfs"]
    assert smc % 64 == 0 and smc > 64                 # 64 particles, whole moves
    assert history[0]["ess"] == pytest.approx(1.0)    # tempered to beta = 1: equal weights
    assert history[-1]["nfs"] == solves == smc + 5 * 8 + 8 * 2 * 8
    budget = 2000
    history = train_msign(small_flow(prior), posteriors, steps=50, batch=8, pool=4096,
                          coarse_sampler="smc", budget=budget, generator=gen(), callback=None,
                          checkpoint=None)
    assert history[-1]["nfs"] <= budget and {h["stage"] for h in history} == {1, 2, 3}


def test_unknown_coarse_sampler():
    from geoinvert.testing import linear_gaussian, small_flow
    from geoinvert.inference.trainer import train_msign
    prior, posteriors, _ = linear_gaussian()
    with pytest.raises(ValueError, match="coarse_sampler"):
        train_msign(small_flow(prior), posteriors, coarse_sampler="mcmc", callback=None,
                    checkpoint=None)
