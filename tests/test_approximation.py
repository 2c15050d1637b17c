"""The coarse levels' discretisation-error model (Bayesian approximation error)."""

import numpy as np
import torch

from geoinvert.hierarchy import pool_matrix
from geoinvert.problem.approximation import (ERROR_DRAWS, approximation_errors,
                                             with_approximation_errors)
from geoinvert.testing import linear_gaussian


def _exact_error(prior, posteriors, level, finest):
    """Mean and std of (G_L - G_l A) x, x ~ prior, for the linear test bed."""
    A = np.eye(4 ** finest)
    for k in range(finest, level, -1):
        A = pool_matrix(k) @ A
    B = posteriors[finest].forward.matrix - posteriors[level].forward.matrix @ A
    cov = B @ prior.covariance(finest) @ B.T
    return B @ prior.mean(finest).ravel(), np.sqrt(np.diag(cov))


def test_error_statistics_match_the_linear_model():
    prior, posteriors, _ = linear_gaussian(levels=3)
    errors, solves = approximation_errors(posteriors, generator=torch.Generator().manual_seed(0))
    assert sorted(errors) == [1, 2]
    assert solves == 3 * ERROR_DRAWS
    for level, err in errors.items():
        mean, std = _exact_error(prior, posteriors, level, 3)
        assert err.draws == ERROR_DRAWS
        # the sample mean is off by std / sqrt(n), the sample std by std / sqrt(2 n): 4 sigma
        n = ERROR_DRAWS
        np.testing.assert_array_less(np.abs(err.mean - mean), 4 * std / np.sqrt(n))
        np.testing.assert_array_less(np.abs(err.std / std - 1), 4 / np.sqrt(2 * n))
        assert (std > 0.1 * posteriors[3].noise).all()     # the test bed's error is not negligible


def test_coarse_posteriors_shift_the_data_and_widen_the_noise_only():
    prior, posteriors, _ = linear_gaussian(levels=3)
    errors, _ = approximation_errors(posteriors, generator=torch.Generator().manual_seed(1))
    out = with_approximation_errors(posteriors, errors)
    assert out[3] is posteriors[3]                        # the finest level, the target, is kept
    for level, err in errors.items():
        p, q = posteriors[level], out[level]
        np.testing.assert_allclose(q.data, p.data - err.mean)
        np.testing.assert_allclose(q.noise ** 2, p.noise ** 2 + err.std ** 2)
        assert q.forward is p.forward and q.prior is p.prior and q.level == level
        x = prior.sample(5, level, generator=torch.Generator().manual_seed(2)).double()
        # the likelihood of the widened model is that of N(F_l(x) + mu, noise^2 + sigma^2)
        r = (torch.as_tensor(p.data) - p.forward(x) - torch.as_tensor(err.mean)).numpy()
        var = p.noise ** 2 + err.std ** 2
        expected = -0.5 * (r ** 2 / var + np.log(2 * np.pi * var)).sum(1)
        np.testing.assert_allclose(q.log_likelihood(x).numpy(), expected, rtol=1e-10)


def test_a_single_level_has_no_coarse_error():
    _, posteriors, _ = linear_gaussian(levels=2)
    errors, solves = approximation_errors({2: posteriors[2]})
    assert errors == {} and solves == 0


def test_a_level_that_mostly_fails_keeps_its_noise(caplog):
    from geoinvert.problem.posterior import Posterior
    prior, posteriors, _ = linear_gaussian(levels=2)
    p = posteriors[1]

    class Failing:          # every solve of the coarse model fails (a NaN row)
        n_obs, shape = p.forward.n_obs, p.forward.shape

        def __call__(self, x):
            return torch.full((x.shape[0], self.n_obs), float("nan"), dtype=x.dtype)

    broken = {1: Posterior(prior, Failing(), p.data, p.noise, 1), 2: posteriors[2]}
    with caplog.at_level("WARNING", logger="geoinvert.problem.approximation"):
        errors, _ = approximation_errors(broken, draws=32,
                                         generator=torch.Generator().manual_seed(0))
    assert errors == {}
    assert "could not be estimated" in caplog.text
