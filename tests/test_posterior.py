"""Tests of the unnormalised posterior: values, exact-posterior offsets, gradients, failures."""

import math

import numpy as np
import pytest
import torch

from geoinvert.problem.forward.testbeds import (
    ExactLinearPosterior,
    ExactQuadraticPosterior,
    LinearForward,
    QuadraticForward,
    paper_phi,
)
from geoinvert.problem.posterior import GaussianLikelihood, Posterior, Prior


def pool_matrix(level):
    """Dense 2x2 average pooling ``(4**(level-1), 4**level)``, row-major cells."""
    n, m = 2**level, 2 ** (level - 1)
    A = np.zeros((m * m, n * n))
    for i in range(n):
        for j in range(n):
            A[(i // 2) * m + j // 2, i * n + j] = 0.25
    return A


class DenseGaussianPrior:
    """Small real Gaussian prior: ``N(mean, cov)`` on the finest level, pooled coarse levels.

    ``Sigma_{l-1} = A_l Sigma_l A_l^T`` and ``mu_{l-1} = A_l mu_l``, as the design prescribes; a
    stand-in with the ``GaussianPrior`` interface until tests with the real prior are added.
    """

    def __init__(self, level, *, length=0.3, var=1.0, mean=0.1):
        self.levels = list(range(1, level + 1))
        n = 2**level
        c = (np.arange(n) + 0.5) / n
        pts = np.stack([a.ravel() for a in np.meshgrid(c, c)], axis=1)
        cov = var * np.exp(-np.linalg.norm(pts[:, None] - pts[None], axis=-1) / length)
        self._mean, self._cov = {level: np.full(n * n, mean)}, {level: cov + 1e-6 * np.eye(n * n)}
        for lev in range(level, 1, -1):
            A = pool_matrix(lev)
            self._mean[lev - 1] = A @ self._mean[lev]
            self._cov[lev - 1] = A @ self._cov[lev] @ A.T

    def mean(self, level):
        return self._mean[level].reshape(2**level, 2**level)

    def covariance(self, level):
        return self._cov[level]

    def sample(self, num, level, *, generator=None, dtype=torch.float64):
        L = torch.linalg.cholesky(torch.as_tensor(self._cov[level]))
        z = torch.randn(num, L.shape[0], generator=generator, dtype=torch.float64)
        x = torch.as_tensor(self._mean[level]) + z @ L.T
        return x.reshape(num, 2**level, 2**level).to(dtype)

    def log_prob(self, x, level):
        cov = torch.as_tensor(self._cov[level])
        r = x.reshape(x.shape[0], -1).to(torch.float64) - torch.as_tensor(self._mean[level])
        quad = (r * torch.linalg.solve(cov, r.T).T).sum(dim=1)
        logdet = torch.linalg.slogdet(cov)[1]
        return (-0.5 * (quad + logdet + r.shape[1] * math.log(2 * math.pi))).to(x.dtype)


LEVEL = 3


@pytest.fixture
def prior():
    return DenseGaussianPrior(LEVEL)


def _linear(prior, level=LEVEL):
    funcs = [paper_phi, lambda x, y: np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.05),
             lambda x, y: x + y**2]
    forward = LinearForward(funcs, (2**level, 2**level))
    noise = np.array([0.05, 0.02, 0.1])
    truth = prior.sample(1, level, generator=torch.Generator().manual_seed(0))
    data = forward(truth)[0].numpy() + 0.01
    return Posterior(prior, forward, data, noise, level)


def _quadratic(prior, level=LEVEL):
    return Posterior(prior, QuadraticForward((2**level, 2**level)), [0.04], 0.005, level)


def _samples(prior, num=5, level=LEVEL, seed=1):
    return prior.sample(num, level, generator=torch.Generator().manual_seed(seed))


def test_log_prob_is_prior_plus_gaussian_likelihood(prior):
    post = _linear(prior)
    x = _samples(prior)
    pred = post.forward(x).numpy()
    r = (pred - post.data) / post.noise
    expected = (-0.5 * (r**2).sum(1) - np.log(post.noise).sum() - 1.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(post.log_likelihood(x).numpy(), expected, rtol=1e-13)
    np.testing.assert_allclose(post.log_prob(x).numpy(),
                               expected + prior.log_prob(x, LEVEL).numpy(), rtol=1e-13)


def test_linear_posterior_differs_from_exact_by_the_log_evidence(prior):
    post = _linear(prior)
    exact = ExactLinearPosterior(prior.mean(LEVEL).ravel(), prior.covariance(LEVEL),
                                 post.forward.matrix, post.data, post.noise)
    x = torch.cat([_samples(prior, 4), exact.sample(4, torch.Generator().manual_seed(2))
                   .reshape(4, 2**LEVEL, 2**LEVEL)])
    diff = (post.log_prob(x) - exact.log_prob(x)).numpy()
    # log densities of size ~1e3 in float64, cond(cov) ~ 1e5: differences agree to ~1e-8
    np.testing.assert_allclose(diff, exact.log_evidence, atol=1e-7)


def test_quadratic_posterior_differs_from_exact_by_the_log_evidence(prior):
    post = _quadratic(prior)
    exact = ExactQuadraticPosterior(prior.mean(LEVEL).ravel(), prior.covariance(LEVEL),
                                    post.forward.functional, post.data, post.noise)
    x = torch.cat([_samples(prior, 4), exact.sample(4, torch.Generator().manual_seed(3))
                   .reshape(4, 2**LEVEL, 2**LEVEL)])
    diff = (post.log_prob(x) - exact.log_prob(x)).numpy()
    np.testing.assert_allclose(diff, exact.log_evidence, atol=1e-7)


@pytest.mark.parametrize("build", [_linear, _quadratic])
def test_log_prob_gradcheck_float64(prior, build):
    post = build(prior, level=2)
    x = _samples(prior, 3, level=2).requires_grad_(True)
    # central differences with eps=1e-6 in float64: truncation + rounding error ~1e-6 relative
    assert torch.autograd.gradcheck(post.log_prob, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_grad_log_prob_returns_detached_value_and_gradient(prior):
    post = _quadratic(prior)
    x = _samples(prior, 4)
    value, grad = post.grad_log_prob(x)
    assert not value.requires_grad and grad.shape == x.shape
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(post.log_prob(xr).sum(), xr)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(value, post.log_prob(x))


def test_float32_in_float32_out(prior):
    post = _linear(prior)
    x = _samples(prior, 3)
    out = post.log_prob(x.float())
    assert out.dtype == torch.float32
    # float32 storage of x and of the result: relative error ~1e-6 of |log p| ~ 1e3
    torch.testing.assert_close(out.double(), post.log_prob(x), rtol=1e-4, atol=1e-2)


class FailingForward:
    """A linear test bed whose 'solve' fails (NaN or inf row) where ``x[:, 0, 0] > threshold``."""

    def __init__(self, inner, threshold, bad_value):
        self.inner, self.threshold, self.bad_value = inner, threshold, bad_value
        self.n_obs, self.shape, self.n_solves, self.last_failures = inner.n_obs, inner.shape, 0, []

    def __call__(self, x):
        y = self.inner(x)
        failed = x[:, 0, 0].detach() > self.threshold
        self.last_failures = torch.nonzero(failed).ravel().tolist()
        return torch.where(failed[:, None], torch.full_like(y, self.bad_value), y)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_failed_solves_give_minus_inf_and_leave_other_gradients_intact(prior, bad_value):
    good = _linear(prior)
    x = _samples(prior, 4)
    x[1, 0, 0] = 100.0
    failing = Posterior(prior, FailingForward(good.forward, 50.0, bad_value), good.data,
                        good.noise, LEVEL)
    value, grad = failing.grad_log_prob(x)
    ref_value, ref_grad = good.grad_log_prob(x)
    assert value[1] == -math.inf
    keep = [0, 2, 3]
    torch.testing.assert_close(value[keep], ref_value[keep])
    torch.testing.assert_close(grad[keep], ref_grad[keep])
    assert torch.isfinite(grad).all()
    # the failed sample keeps its prior gradient only
    xr = x[1:2].clone().requires_grad_(True)
    (prior_grad,) = torch.autograd.grad(prior.log_prob(xr, LEVEL).sum(), xr)
    torch.testing.assert_close(grad[1:2], prior_grad)


@pytest.mark.parametrize("data, noise, match", [
    ([1.0, 2.0], 0.1, "n_obs=3"),
    ([1.0, math.nan, 2.0], 0.1, "finite"),
    ([1.0, 2.0, 3.0], 0.0, "positive"),
    ([1.0, 2.0, 3.0], [0.1, -0.1, 0.1], "positive"),
    ([1.0, 2.0, 3.0], [0.1, 0.1], "length"),
    ([1.0, 2.0, 3.0], math.inf, "positive"),
])
def test_constructor_validates_inputs(prior, data, noise, match):
    forward = _linear(prior).forward
    with pytest.raises(ValueError, match=match):
        Posterior(prior, forward, data, noise, LEVEL)


def test_scalar_and_array_noise_agree(prior):
    post = _linear(prior)
    x = _samples(prior, 2)
    a = Posterior(prior, post.forward, post.data, 0.05, LEVEL).log_prob(x)
    b = Posterior(prior, post.forward, post.data, [0.05] * 3, LEVEL).log_prob(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- with the real priors

def _matern(level=LEVEL):
    from geoinvert.priors import MaternPrior
    return MaternPrior(level, alpha=2, correlation_length=0.3, std=1.0, mean=0.2,
                       boundary="neumann")


@pytest.mark.parametrize("level", [2, 3])
def test_matern_linear_posterior_differs_from_exact_by_the_log_evidence(level):
    prior = _matern()
    post = _linear(prior, level=level)
    exact = ExactLinearPosterior(prior.mean(level).ravel(), prior.covariance(level),
                                 post.forward.matrix, post.data, post.noise,
                                 shape=(2**level, 2**level))
    x = torch.cat([_samples(prior, 3, level=level), exact.sample(3, torch.Generator().manual_seed(4))])
    diff = (post.log_prob(x) - exact.log_prob(x)).numpy()
    # float64 log densities ~1e2 through a sparse (finest) or Haar-chain (coarse) prior density
    np.testing.assert_allclose(diff, exact.log_evidence, atol=1e-7)


def test_matern_quadratic_posterior_on_a_coarse_level():
    prior = _matern()
    level = 2
    forward = QuadraticForward((8, 8)).at_level(level)
    post = Posterior(prior, forward, [0.02], 0.005, level)
    exact = ExactQuadraticPosterior(prior.mean(level).ravel(), prior.covariance(level),
                                    forward.functional, post.data, post.noise, shape=(4, 4))
    x = torch.cat([_samples(prior, 3, level=level), exact.sample(3, torch.Generator().manual_seed(5))])
    np.testing.assert_allclose((post.log_prob(x) - exact.log_prob(x)).numpy(), exact.log_evidence,
                               atol=1e-7)


@pytest.mark.parametrize("kind", ["matern", "iid"])
def test_real_prior_log_prob_gradcheck(kind):
    from geoinvert.priors import IIDPrior
    prior = _matern(2) if kind == "matern" else IIDPrior(2, mean=0.1, std=0.5)
    post = _quadratic(prior, level=2)
    x = _samples(prior, 2, level=2).requires_grad_(True)
    # float64 central differences, as above
    assert torch.autograd.gradcheck(post.log_prob, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_a_posterior_from_a_likelihood_is_the_same_posterior(prior):
    post = _linear(prior)
    likelihood = GaussianLikelihood(post.forward, post.data, post.noise)
    again = Posterior(prior, likelihood, level=LEVEL)
    x = _samples(prior)
    torch.testing.assert_close(again.log_prob(x), post.log_prob(x), rtol=0, atol=0)
    assert again.likelihood is likelihood and again.n_obs == post.n_obs == 3
    with pytest.raises(ValueError, match="not both"):
        Posterior(prior, likelihood, post.data, post.noise, LEVEL)
    with pytest.raises(ValueError, match="data and noise"):
        Posterior(prior, post.forward, level=LEVEL)


def test_simulated_data_have_the_noise_of_the_likelihood(prior):
    """y = F(x) + e: the residuals of 20000 simulations at one field have mean 0 and the noise
    std per observation (4.5 standard errors: the mean's is std / sqrt(n), the std's about
    std / sqrt(2 n))."""
    post = _linear(prior)
    n = 20000
    x = _samples(prior, 1).expand(n, -1, -1)
    y = post.likelihood.simulate(x, torch.Generator().manual_seed(4))
    residual = (y - post.forward(x[:1]).to(torch.float64)).numpy()
    se = post.noise / math.sqrt(n)
    assert np.all(np.abs(residual.mean(0)) < 4.5 * se)
    assert np.all(np.abs(residual.std(0) - post.noise) < 4.5 * post.noise / math.sqrt(2 * n))


def test_the_priors_satisfy_the_prior_protocol(prior):
    from geoinvert.priors import IIDPrior, MaternPrior
    assert isinstance(prior, Prior)
    assert isinstance(MaternPrior(2, correlation_length=0.3), Prior)
    assert isinstance(IIDPrior(2), Prior)
    assert not isinstance(object(), Prior)
