"""Tests of the Gaussian priors, their exact coarse levels and the prior conditioning layers."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from geoinvert.hierarchy import pool, pool_matrix
from geoinvert.priors import GaussianPrior, IIDPrior, MaternPrior, stationary_variance
from geoinvert.priors.conditioning import haar_blocks

EPS = np.finfo(np.float64).eps
L = 3


def _iid():
    std = 0.5 + np.random.default_rng(1).random((2 ** L, 2 ** L))
    return IIDPrior(L, mean=0.3, std=std)


PRIORS = {
    "matern-dirichlet": lambda: MaternPrior(L, alpha=2, correlation_length=0.3, std=1.2,
                                            mean=-1.0, boundary="dirichlet"),
    "matern-neumann": lambda: MaternPrior(L, (0.0, 2.0, 0.0, 1.0), alpha=1, tau=3.0, std=0.7,
                                          boundary="neumann"),
    "matern-periodic": lambda: MaternPrior(L, alpha=3, correlation_length=0.4,
                                           boundary="periodic",
                                           mean=np.linspace(0, 1, 64).reshape(8, 8)),
    "iid": _iid,
}


@pytest.fixture(params=sorted(PRIORS), scope="module")
def prior(request):
    return PRIORS[request.param]()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


# -- the priors themselves


def test_finest_covariance_is_inverse_precision(prior):
    cov, q = prior.covariance(L), prior.precision().toarray()
    np.testing.assert_allclose(cov @ q, np.identity(4 ** L), rtol=0, atol=1e-10)


def test_coarse_priors_are_exact_pooled_marginals(prior):
    for level in range(L, 1, -1):
        a = pool_matrix(level).toarray()
        fine, coarse = prior.covariance(level), prior.covariance(level - 1)
        np.testing.assert_allclose(coarse, a @ fine @ a.T, rtol=0,
                                   atol=100 * EPS * np.abs(fine).max())
        np.testing.assert_allclose(prior.mean(level - 1), pool(prior.mean(level)), atol=1e-15)


def test_variances_are_the_diagonal_of_the_generic_covariance(prior):
    """Each prior's own variance route (the spectrum for Matern) against the diagonal of the
    covariance from the sparse precision, on every level."""
    for level in range(1, L + 1):
        n = 2 ** level
        generic = np.diag(GaussianPrior.covariance(prior, level)).reshape(n, n)
        np.testing.assert_allclose(prior.variance(level), generic, rtol=1e-10, atol=0)
        np.testing.assert_allclose(GaussianPrior.variance(prior, level), generic, rtol=1e-10,
                                   atol=0)


def test_matern_spectral_covariance_matches_generic_sparse_route():
    prior = PRIORS["matern-dirichlet"]()
    for level in (1, 2):
        np.testing.assert_allclose(prior.covariance(level),
                                   GaussianPrior.covariance(prior, level), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["matern-neumann", "matern-periodic"])
def test_matern_haar_blocks_match_the_dense_transform(name):
    """The block-by-block spectral Haar covariance equals H Sigma H^T of the dense covariance."""
    prior = PRIORS[name]()
    for level in (2, L):
        blocks = zip(prior._haar_covariance(level), haar_blocks(prior.covariance(level)))
        for fast, dense in blocks:
            np.testing.assert_allclose(fast, dense, rtol=0, atol=1e-13)


@pytest.mark.parametrize("level", [1, 2, L])
def test_log_prob_is_normalised_gaussian(prior, level):
    x = prior.sample(5, level, generator=_gen(1))
    ref = multivariate_normal(prior.mean(level).ravel(), prior.covariance(level))
    expected = ref.logpdf(x.reshape(5, -1).numpy())
    np.testing.assert_allclose(prior.log_prob(x, level).numpy(), expected, rtol=1e-11)


@pytest.mark.parametrize("level", [2, L])
def test_log_prob_gradient(prior, level):
    """d log rho / dx = -Sigma^{-1} (x - mu), through the sparse and the chained routes."""
    x = prior.sample(3, level, generator=_gen(2)).requires_grad_(True)
    prior.log_prob(x, level).sum().backward()
    r = (x.detach() - torch.from_numpy(prior.mean(level))).reshape(3, -1).numpy()
    expected = -np.linalg.solve(prior.covariance(level), r.T).T
    np.testing.assert_allclose(x.grad.reshape(3, -1).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_float32_in_float32_out(prior):
    x = prior.sample(4, L, generator=_gen(3), dtype=torch.float32)
    assert x.dtype == torch.float32
    lp = prior.log_prob(x, L)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), prior.log_prob(x.double(), L), rtol=1e-6, atol=0)
    assert prior.log_prob(x[:, ::2, ::2].contiguous(), L - 1).dtype == torch.float32


def test_sample_is_reproducible_with_a_generator(prior):
    torch.testing.assert_close(prior.sample(3, L, generator=_gen(5)),
                               prior.sample(3, L, generator=_gen(5)), rtol=0, atol=0)


# -- the prior conditioning layers


@pytest.mark.parametrize("level", [2, L])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pooling_the_layer_output_returns_its_input(prior, level, dtype):
    """A_l PC_l(x_{l-1}, z) == x_{l-1} to float precision."""
    m = 2 ** (level - 1)
    coarse, z = 3 * _rand(7, m, m, seed=1, dtype=dtype), _rand(7, 3, m, m, seed=2, dtype=dtype)
    fine, _ = prior.conditioning(level).forward(coarse, z)
    assert fine.dtype == dtype and fine.shape == (7, 2 * m, 2 * m)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(pool(fine), coarse, rtol=0,
                               atol=20 * eps * float(fine.abs().max()))


@pytest.mark.parametrize("level", [2, L])
def test_inverse_round_trip(prior, level):
    m = 2 ** (level - 1)
    layer = prior.conditioning(level)
    coarse, z = _rand(6, m, m, seed=3), _rand(6, 3, m, m, seed=4)
    fine, logdet = layer.forward(coarse, z)
    coarse2, z2, inv_logdet = layer.inverse(fine)
    torch.testing.assert_close(coarse2, coarse, rtol=0, atol=1e-10)
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-10)
    assert isinstance(logdet, float) and inv_logdet == -logdet
    x = prior.sample(4, level, generator=_gen(6))
    torch.testing.assert_close(layer.forward(*layer.inverse(x)[:2])[0], x, rtol=0, atol=1e-10)


def _jacobian(layer, m):
    def flat(coarse, z):
        return layer.forward(coarse, z)[0].reshape(-1)

    coarse, z = _rand(1, m, m, seed=7), _rand(1, 3, m, m, seed=8)
    jc, jz = torch.autograd.functional.jacobian(flat, (coarse, z))
    return torch.cat((jc.reshape(4 * m * m, -1), jz.reshape(4 * m * m, -1)), 1).numpy()


@pytest.mark.parametrize("level", [2, L])
def test_logdet_equals_slogdet_of_the_jacobian(prior, level):
    layer, m = prior.conditioning(level), 2 ** (level - 1)
    sign, logabsdet = np.linalg.slogdet(_jacobian(layer, m))
    assert sign != 0
    assert layer.logdet == pytest.approx(logabsdet, abs=1e-9)

    def inv_flat(fine):
        coarse, z, _ = layer.inverse(fine)
        return torch.cat((coarse.reshape(-1), z.reshape(-1)))

    j_inv = torch.autograd.functional.jacobian(inv_flat, _rand(1, 2 * m, 2 * m, seed=9))
    assert layer.inverse(_rand(1, 2 * m, 2 * m))[2] == pytest.approx(
        np.linalg.slogdet(j_inv.reshape(4 * m * m, -1).numpy())[1], abs=1e-9)


@pytest.mark.parametrize("level", [2, L])
def test_layer_maps_coarse_prior_and_noise_to_fine_prior(prior, level):
    """Exact law: J diag(Sigma_{l-1}, I) J^T = Sigma_l and PC_l(mu_{l-1}, 0) = mu_l."""
    layer, m = prior.conditioning(level), 2 ** (level - 1)
    jac = _jacobian(layer, m)
    k = m * m
    jc, jz = jac[:, :k], jac[:, k:]
    cov = jc @ prior.covariance(level - 1) @ jc.T + jz @ jz.T
    fine = prior.covariance(level)
    np.testing.assert_allclose(cov, fine, rtol=0, atol=1e-11 * np.abs(fine).max())
    mean, _ = layer.forward(torch.from_numpy(prior.mean(level - 1))[None],
                            torch.zeros(1, 3, m, m, dtype=torch.float64))
    np.testing.assert_allclose(mean[0].numpy(), prior.mean(level), rtol=0, atol=1e-12)


def test_level_by_level_samples_have_the_fine_covariance(prior):
    r"""Monte-Carlo check of the sample covariance built from x_1 ~ rho_1 through PC_2..PC_L.

    With the true mean, each entry of C = (1/N) sum (x - mu)(x - mu)^T is unbiased with
    standard error s_ij = sqrt((S_ii S_jj + S_ij^2) / N) (Gaussian fourth moments). Over the
    2080 distinct entries a 5 s_ij threshold is exceeded by chance with probability
    < 2080 * 6e-7 ~ 1e-3 (the CLT is accurate at N = 20000); the seed is fixed.
    """
    num = 20000
    x1, _ = prior.coarsest(_rand(num, 2, 2, seed=10))
    x = x1
    for level in range(2, L + 1):
        x, _ = prior.conditioning(level).forward(x, _rand(num, 3, *x.shape[1:], seed=10 + level))
    r = (x - torch.from_numpy(prior.mean(L))).reshape(num, -1).numpy()
    emp, true = r.T @ r / num, prior.covariance(L)
    var = np.diag(true)
    stderr = np.sqrt((var[:, None] * var[None, :] + true ** 2) / num)
    assert np.max(np.abs(emp - true) / stderr) < 5.0


def test_composed_density_equals_fine_log_prob(prior):
    """log rho_1(x_1) + sum_l [log N(z_l) + inverse logdet] == prior.log_prob(x_L, L)."""
    x = prior.sample(6, L, generator=_gen(11))
    total, cur = torch.zeros(6, dtype=torch.float64), x
    for level in range(L, 1, -1):
        cur, z, logdet = prior.conditioning(level).inverse(cur)
        total += _std_normal(z) + logdet
    z1, logdet1 = prior.coarsest_inverse(cur)
    total += _std_normal(z1) + logdet1
    torch.testing.assert_close(total, prior.log_prob(x, L), rtol=1e-12, atol=1e-9)


def _std_normal(z):
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def test_coarsest_round_trip(prior):
    z = _rand(5, 2, 2, seed=12)
    x, logdet = prior.coarsest(z)
    z2, inv = prior.coarsest_inverse(x)
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-12)
    assert inv == -logdet
    assert 2 * logdet == pytest.approx(np.linalg.slogdet(prior.covariance(1))[1], abs=1e-12)


def test_finest_layer_gradients_flow_through_the_sparse_solves():
    prior = PRIORS["matern-dirichlet"]()
    layer = prior.conditioning(L)
    m = 2 ** (L - 1)
    coarse = _rand(2, m, m, seed=13).requires_grad_(True)
    z = _rand(2, 3, m, m, seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, w: layer.forward(c, w)[0], (coarse, z))
    fine = _rand(2, 2 * m, 2 * m, seed=15).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: layer.inverse(f)[1], (fine,))


# -- parameters of the Matern prior


def test_matern_marginal_std_and_correlation_length():
    """Away from the boundary the marginal std is `std` and the correlation at distance rho ~ 0.13."""
    rho, std = 0.15, 2.0
    for boundary in ("dirichlet", "neumann"):
        prior = MaternPrior(5, alpha=2, correlation_length=rho, std=std, boundary=boundary)
        cov = prior.covariance(5).reshape(32, 32, 32, 32)
        centre = cov[16, 16]
        assert centre[16, 16] == pytest.approx(std ** 2, rel=0.02)
        shift = round(rho * 32)
        corr = centre[16, 16 + shift] / centre[16, 16]
        assert 0.08 < corr < 0.2
    corner = MaternPrior(5, alpha=2, correlation_length=rho, boundary="dirichlet").covariance(5)
    assert corner[0, 0] < 0.5  # Dirichlet-type boundary pins the field towards the mean


def test_stationary_variance_matches_continuum_for_fine_lattices():
    """alpha = 2 in 2-D: v / (hx hy) -> 1 / (4 pi tau^2), the continuum Matern variance.

    (Precision hx hy K^alpha discretises the SPDE with white noise of cell-average variance
    1 / (hx hy), so N(0, K^-alpha) has hx hy times the continuum variance.)
    """
    tau, h = 10.0, 1e-3
    v = stationary_variance(tau, (h, h), 2)
    assert v / (h * h) == pytest.approx(1 / (4 * math.pi * tau ** 2), rel=1e-3)


def test_correlation_length_and_tau_are_consistent():
    a = MaternPrior(2, alpha=3, correlation_length=0.25)
    b = MaternPrior(2, alpha=3, tau=a.tau)
    assert a.tau == pytest.approx(4 / 0.25) and b.correlation_length == pytest.approx(0.25)
    np.testing.assert_allclose(a.covariance(2), b.covariance(2), rtol=1e-13)


def test_single_level_prior():
    prior = MaternPrior(1, alpha=2, correlation_length=0.5)
    x = prior.sample(3, 1, generator=_gen(0))
    ref = multivariate_normal(np.zeros(4), prior.covariance(1)).logpdf(x.reshape(3, 4).numpy())
    np.testing.assert_allclose(prior.log_prob(x, 1).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha=0, correlation_length=0.1), "alpha"),
    (dict(alpha=1.5, correlation_length=0.1), "alpha"),
    (dict(correlation_length=-1.0), "correlation_length"),
    (dict(tau=0.0), "tau"),
    (dict(correlation_length=0.1, tau=1.0), "correlation_length"),
    (dict(), "correlation_length"),
    (dict(correlation_length=0.1, std=0.0), "std"),
    (dict(correlation_length=0.1, boundary="robin"), "boundary"),
    (dict(correlation_length=0.1, mean=np.zeros((3, 3))), "mean"),
])
def test_matern_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaternPrior(2, **kwargs)


def test_other_arguments_are_validated():
    with pytest.raises(ValueError, match="std"):
        IIDPrior(2, std=-1.0)
    with pytest.raises(ValueError, match="levels"):
        IIDPrior(0)
    prior = IIDPrior(2)
    with pytest.raises(ValueError, match="level"):
        prior.sample(2, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        prior.log_prob(torch.zeros(2, 2, 2), 2)
    with pytest.raises(ValueError, match="level"):
        prior.conditioning(1)
