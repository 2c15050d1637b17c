"""Tests of the linear and quadratic test beds and their exact posteriors."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from geoinvert.problem.forward.testbeds import (
    ExactLinearPosterior,
    ExactQuadraticPosterior,
    ExactQuadraticsPosterior,
    LinearForward,
    QuadraticForward,
    cell_integrals,
    paper_phi,
)
from geoinvert.testing import second_phi

# Monte-Carlo checks assert |estimate - truth| < 4 standard errors: a false alarm has
# probability < 1e-4 per check, and the seeds are fixed so the tests are deterministic.
N_SE = 4.0


def upsample(x):
    """Nearest-neighbour ``(..., m, m) -> (..., 2m, 2m)``."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def exponential_cov(n, *, length=0.3, var=1.0, nugget=1e-6):
    """Dense covariance ``var exp(-|s - s'| / length)`` between the cell centres of an n x n lattice."""
    c = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(c, c)
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    return var * np.exp(-dist / length) + nugget * np.eye(n * n)


def _sin_integral(a, b, k):
    return (np.cos(k * np.pi * a) - np.cos(k * np.pi * b)) / (k * np.pi)


# ---------------------------------------------------------------- quadrature and forward models

def test_cell_integrals_of_paper_phi_are_exact():
    n = 8
    e = np.linspace(0.0, 1.0, n + 1)
    exact = np.outer(_sin_integral(e[:-1], e[1:], 2), _sin_integral(e[:-1], e[1:], 1))
    # 6-point Gauss-Legendre on cells of width 1/8: error ~ (pi h / 2)^12 / 12! << 1e-13
    np.testing.assert_allclose(cell_integrals(paper_phi, (n, n)), exact, atol=1e-14)


def test_cell_integrals_exact_for_polynomials_on_general_bounds():
    bounds = (-1.0, 2.0, 0.5, 1.5)
    got = cell_integrals(lambda x, y: x**5 * y**3, (2, 3), bounds, order=3)
    xe, ye = np.linspace(-1.0, 2.0, 4), np.linspace(0.5, 1.5, 3)
    exact = np.outer(np.diff(ye**4) / 4, np.diff(xe**6) / 6)
    # degree 5 is integrated exactly by 3 points: only rounding error remains
    np.testing.assert_allclose(got, exact, rtol=1e-13, atol=1e-13)


def _linear_forward(n):
    funcs = [paper_phi, lambda x, y: np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.05),
             lambda x, y: x * y]
    return LinearForward(funcs, (n, n))


def test_linear_forward_matches_matrix_and_counts_solves():
    model = _linear_forward(8)
    x = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x.reshape(5, -1) @ torch.as_tensor(model.matrix).T
    torch.testing.assert_close(model(x), expected, rtol=1e-14, atol=1e-14)
    model(x[:2])
    assert model.n_solves == 7 and model.n_obs == 3 and model.shape == (8, 8)
    assert model.last_failures == []


def test_linear_forward_keeps_dtype_and_is_differentiable():
    model = _linear_forward(4)
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = model(x)
    assert y.dtype == torch.float32
    v = torch.tensor([1.0, -2.0, 0.5])
    (grad,) = torch.autograd.grad((y @ v).sum(), x)
    expected = (torch.as_tensor(model.matrix, dtype=torch.float32).T @ v).reshape(4, 4)
    torch.testing.assert_close(grad, expected.expand(3, 4, 4))


@pytest.mark.parametrize("from_matrix", [False, True])
def test_linear_forward_is_consistent_across_levels(from_matrix):
    fine = _linear_forward(8)
    if from_matrix:
        fine = LinearForward.from_matrix(fine.matrix, (8, 8))
    coarse = fine.at_level(2)
    assert coarse.shape == (4, 4)
    x = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # a coarse field is a fine field constant on 2x2 blocks: summed child integrals agree to
    # rounding; re-integrated functions differ by the Gauss-Legendre error of the narrow Gaussian
    # bump on 1/4-wide cells (~3e-11 measured)
    atol = 1e-14 if from_matrix else 1e-9
    torch.testing.assert_close(fine(upsample(x)), coarse(x), rtol=0.0, atol=atol)


def test_linear_forward_from_matrix_rejects_non_nested_shape():
    model = LinearForward.from_matrix(np.ones((1, 36)), (6, 6))
    with pytest.raises(ValueError, match="coarsen"):
        model.with_shape((4, 4))


def test_quadratic_forward_is_square_of_functional_and_level_consistent():
    fine = QuadraticForward((8, 8))
    x = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = upsample(x).reshape(6, -1) @ torch.as_tensor(fine.functional)
    torch.testing.assert_close(fine(upsample(x))[:, 0], t**2, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(fine(upsample(x)), fine.at_level(2)(x), rtol=1e-12, atol=1e-15)
    assert fine.n_obs == 1 and fine.n_solves == 12


def test_quadratic_forward_gradient_is_2_t_w():
    model = QuadraticForward((4, 4))
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                    requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    w = torch.as_tensor(model.functional)
    expected = 2 * (x.detach().reshape(2, -1) @ w)[:, None] * w
    torch.testing.assert_close(grad.reshape(2, -1), expected)


# ---------------------------------------------------------------- exact linear posterior

def _linear_problem():
    model = _linear_forward(4)
    d = 16
    rng = np.random.default_rng(5)
    mean, cov = rng.normal(size=d) * 0.3, exponential_cov(4)
    noise = np.array([0.05, 0.1, 0.02])
    data = model.matrix @ rng.normal(size=d) + noise * rng.normal(size=3)
    return model, mean, cov, data, noise


def test_exact_linear_posterior_matches_information_form_and_scipy():
    model, mean, cov, data, noise = _linear_problem()
    post = ExactLinearPosterior(mean, cov, model.matrix, data, noise, shape=(4, 4))
    G, Ninv = model.matrix, np.diag(noise**-2.0)
    precision = np.linalg.inv(cov) + G.T @ Ninv @ G
    cov_info = np.linalg.inv(precision)
    mean_info = cov_info @ (np.linalg.solve(cov, mean) + G.T @ Ninv @ data)
    # both forms are exact; the difference is rounding amplified by cond(cov) ~ 1e4
    np.testing.assert_allclose(post.cov, cov_info, atol=1e-9)
    np.testing.assert_allclose(post.mean, mean_info, atol=1e-8)
    x = post.sample(7, torch.Generator().manual_seed(6))
    assert x.shape == (7, 4, 4)
    ref = stats.multivariate_normal(mean_info, cov_info).logpdf(x.reshape(7, -1).numpy())
    np.testing.assert_allclose(post.log_prob(x).numpy(), ref, rtol=1e-8)
    evidence = stats.multivariate_normal(G @ mean, G @ cov @ G.T + np.diag(noise**2)).logpdf(data)
    assert post.log_evidence == pytest.approx(evidence, rel=1e-12)


def test_exact_linear_posterior_samples_have_the_posterior_moments():
    model, mean, cov, data, noise = _linear_problem()
    post = ExactLinearPosterior(mean, cov, model.matrix, data, noise)
    n = 20000
    x = post.sample(n, torch.Generator().manual_seed(7)).numpy()
    se = np.sqrt(np.diag(post.cov) / n)
    assert np.all(np.abs(x.mean(0) - post.mean) < N_SE * se)
    # the sample variance has relative standard error sqrt(2 / n) = 1% for Gaussian samples
    np.testing.assert_allclose(x.var(0), np.diag(post.cov), rtol=N_SE * math.sqrt(2.0 / n))


# ---------------------------------------------------------------- exact quadratic posterior

def _quadratic_posterior(*, y=1.0, noise=0.1, shift=0.0, level=2):
    model = QuadraticForward((2**level, 2**level))
    w = model.functional
    cov = exponential_cov(2**level)
    # prior mean with w . mean = shift * sqrt(w S w)
    direction = cov @ w / (w @ cov @ w)
    mean = shift * math.sqrt(w @ cov @ w) * direction
    return ExactQuadraticPosterior(mean, cov, w, y, noise, shape=model.shape), model, mean, cov


def _t_density(post):
    return lambda t: float(np.exp(post.t_log_density(t)))


@pytest.mark.parametrize("y, shift", [(0.04, 0.0), (0.04, 0.7), (-0.02, 0.3)])
def test_quadratic_evidence_matches_adaptive_quadrature(y, shift):
    post, *_ = _quadratic_posterior(y=y, noise=0.01, shift=shift)
    r = math.sqrt(abs(post.y))
    unnormalised = lambda t: float(np.exp(post._log_joint(np.asarray(t))))
    lo, hi = post.t_mean - 12 * post.t_std, post.t_mean + 12 * post.t_std
    Z, err = integrate.quad(unnormalised, lo, hi, points=[-r, 0.0, r], limit=1000, epsrel=1e-12,
                            epsabs=0.0)
    # both quadratures converge to ~1e-12 relative accuracy
    assert post.log_evidence == pytest.approx(math.log(Z), abs=1e-9)
    total, _ = integrate.quad(_t_density(post), lo, hi, points=[-r, 0.0, r], limit=1000)
    assert total == pytest.approx(1.0, abs=1e-9)


def test_quadratic_density_integrates_to_one_by_importance_sampling():
    # proposal = prior: p(x | y) / rho(x) = L(y | x) / Z, so the mean ratio is Z_IS / Z, the
    # importance-sampling estimate of the evidence over the quadrature one; it is 1 within MC
    # error exactly when log_prob (prior density, likelihood and log Z) is normalised
    post, _, mean, cov = _quadratic_posterior(y=0.05, noise=0.05, shift=0.3)
    x = torch.as_tensor(stats.multivariate_normal(mean, cov).rvs(20000, random_state=8))
    log_rho = stats.multivariate_normal(mean, cov).logpdf(x.numpy())
    ratio = np.exp(post.log_prob(x).numpy() - log_rho)
    se = ratio.std(ddof=1) / math.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < N_SE * se
    assert se < 0.05  # the check must be informative


def _ks_distance(post, t, n_points=400):
    """max |F_n - F| at ``n_points`` sample quantiles, with F by adaptive quadrature."""
    t = np.sort(t)
    pts = t[np.linspace(0, t.size - 1, n_points).astype(int)]
    density, r = _t_density(post), math.sqrt(max(post.y, 0.0))
    start = min(pts[0], post.t_mean) - 12 * post.t_std
    pieces = [integrate.quad(density, a, b, points=[p for p in (-r, 0.0, r) if a < p < b],
                             limit=200)[0] for a, b in zip(np.r_[start, pts[:-1]], pts)]
    cdf = np.cumsum(pieces)
    empirical = np.searchsorted(t, pts, side="right") / t.size
    return np.max(np.abs(empirical - cdf))


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_quadratic_t_samples_follow_the_1d_posterior(shift):
    post, *_ = _quadratic_posterior(y=0.04, noise=0.005, shift=shift)
    n = 20000
    x = post.sample(n, torch.Generator().manual_seed(9))
    t = x.reshape(n, -1).numpy() @ post.w
    # KS critical value at level 1e-3 is 1.949 / sqrt(n); the sup over a subset of points is
    # smaller than the full KS statistic, so the test stays conservative
    assert _ks_distance(post, t) < 1.949 / math.sqrt(n)


def test_quadratic_samples_given_t_follow_the_prior_conditional():
    post, _, mean, cov = _quadratic_posterior(y=0.04, noise=0.005, shift=0.5)
    n = 20000
    x = post.sample(n, torch.Generator().manual_seed(10)).reshape(n, -1).numpy()
    w, Sw = post.w, cov @ post.w
    # x - S w t / s_t^2 is independent of t, with mean m - S w m_t / s_t^2 and
    # covariance S - S w w^T S / s_t^2
    resid = x - np.outer(x @ w, Sw) / post.t_std**2
    rmean = mean - Sw * post.t_mean / post.t_std**2
    rcov = cov - np.outer(Sw, Sw) / post.t_std**2
    se = np.sqrt(np.diag(rcov) / n)
    assert np.all(np.abs(resid.mean(0) - rmean) < N_SE * se + 1e-12)
    np.testing.assert_allclose(resid.var(0), np.diag(rcov), rtol=N_SE * math.sqrt(2.0 / n))


def test_symmetric_prior_gives_equal_mode_masses():
    post, *_ = _quadratic_posterior(y=0.04, noise=0.005, shift=0.0)
    assert post.t_mean == pytest.approx(0.0, abs=1e-15)
    # the 1-D density is symmetric and t = 0 is a panel edge: equal masses up to rounding
    assert post.mode_mass() == pytest.approx(0.5, abs=1e-12)
    n = 20000
    frac = post.mode_fraction(post.sample(n, torch.Generator().manual_seed(11)))
    assert abs(frac - 0.5) < N_SE * math.sqrt(0.25 / n)


def test_shifted_prior_favours_the_positive_mode():
    post, *_ = _quadratic_posterior(y=0.04, noise=0.005, shift=0.5)
    density, r = _t_density(post), math.sqrt(post.y)
    positive, _ = integrate.quad(density, 0.0, 2 * r, points=[r], limit=200)
    assert post.mode_mass() == pytest.approx(positive, abs=1e-9)
    assert post.mode_mass() > 0.6
    n = 20000
    frac = post.mode_fraction(post.sample(n, torch.Generator().manual_seed(12)))
    p = post.mode_mass()
    assert abs(frac - p) < N_SE * math.sqrt(p * (1 - p) / n)


def test_critical_direction_is_unit_and_along_S_w():
    post, _, _, cov = _quadratic_posterior()
    d = post.critical_direction
    assert np.linalg.norm(d) == pytest.approx(1.0)
    assert abs(d @ (cov @ post.w)) == pytest.approx(np.linalg.norm(cov @ post.w))


def test_quadratic_rejects_impossible_data():
    with pytest.raises(ValueError, match="negligible"):
        # prior t ~ N(10, 0.01^2) but y = 0 +- 0.01 needs |t| < 0.7
        ExactQuadraticPosterior([10.0, 0.0], 1e-4 * np.eye(2), [1.0, 0.0], 0.0, 0.01)


def test_quadratic_case_file_posterior_is_the_exact_one_although_phi_is_no_eigenvector():
    """``cases/quadratic.yaml`` as written: its phi is not an eigenvector of the prior
    covariance (relative residual about 0.2), and the exact posterior (t = <w, x> the only data
    direction, x | t the Gaussian prior conditional) still is its posterior: log densities
    differ by the log evidence only, on prior draws and on exact draws."""
    from pathlib import Path
    from geoinvert.case import load_case
    case = load_case(Path(__file__).resolve().parents[1] / "cases" / "quadratic.yaml")
    level = case.finest
    posterior, prior = case.posterior(level), case.prior()
    w = posterior.forward.functional
    cov = prior.covariance(level)
    sw = cov @ w
    residual = np.linalg.norm(sw - (w @ sw) / (w @ w) * w) / np.linalg.norm(sw)
    assert residual > 0.1
    exact = ExactQuadraticPosterior(prior.mean(level).ravel(), cov, w, case.data, case.noise,
                                    shape=(2 ** level,) * 2)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([prior.sample(50, level, generator=g), exact.sample(50, g)])
    gap = (posterior.log_prob(x) - exact.log_prob(x)).numpy()
    np.testing.assert_allclose(gap, exact.log_evidence, rtol=0, atol=1e-8)


# ------------------------------------------------ several prior-independent quadratic observations

def _quadratics_posterior(*, ratio=0.3, shift=(0.0, 0.0), level=2):
    model = QuadraticForward((2**level, 2**level), phi=[paper_phi, second_phi])
    W, cov = model.matrix, exponential_cov(2**level)
    s = np.sqrt(np.einsum("kd,de,ke->k", W, cov, W))
    mean = sum(a * (cov @ w) / si for a, w, si in zip(shift, W, s))
    y = (2 * s) ** 2
    return ExactQuadraticsPosterior(mean, cov, W, y, ratio * y, shape=model.shape), model, mean, cov


def test_one_direction_is_the_single_quadratic_posterior():
    single, model, mean, cov = _quadratic_posterior(y=0.04, noise=0.01, shift=0.3)
    post = ExactQuadraticsPosterior(mean, cov, model.matrix, [0.04], 0.01, shape=model.shape)
    x = single.sample(50, torch.Generator().manual_seed(1))
    assert post.log_evidence == pytest.approx(single.log_evidence, abs=1e-12)
    np.testing.assert_allclose(post.log_prob(x).numpy(), single.log_prob(x).numpy(), rtol=1e-12)
    assert post.orthant_masses()[1] == pytest.approx(single.mode_mass(), abs=1e-15)


def test_two_directions_evidence_and_moments_match_importance_sampling_from_the_prior():
    """Z = E_prior[L(y | x)] and the posterior mean and orthant masses as likelihood-weighted
    prior averages: estimates that do not use the factorisation, against the class's
    quadrature evidence and its exact samples (4 standard errors of both)."""
    post, model, mean, cov = _quadratics_posterior(shift=(0.5, -0.3))
    g = torch.Generator().manual_seed(3)
    n = 400_000
    x0 = post._prior.sample(n, g)
    y, noise = np.array([p.y for p in post.parts]), np.array([p.noise for p in post.parts])
    pred = model(x0.reshape(n, *model.shape)).numpy()
    lik = np.exp(-0.5 * (((pred - y) / noise) ** 2).sum(1)) / np.prod(noise * np.sqrt(2 * np.pi))
    Z, se = lik.mean(), lik.std() / math.sqrt(n)
    assert abs(Z - math.exp(post.log_evidence)) < N_SE * se
    w = lik / lik.sum()
    ess = 1 / (w ** 2).sum()
    x = post.sample(20000, torch.Generator().manual_seed(4)).reshape(20000, -1).numpy()
    m_is = w @ x0.numpy()
    sd = x.std(0)
    bound = N_SE * sd * math.sqrt(1 / ess + 1 / len(x))
    assert np.all(np.abs(x.mean(0) - m_is) < bound)
    masses = post.orthant_masses()
    assert masses.sum() == pytest.approx(1.0, abs=1e-12)
    assert len(set(np.round(masses, 3))) == 4            # the shift makes them unequal
    drawn = np.bincount(post.orthant(x).numpy(), minlength=4) / len(x)
    weighted = np.bincount(post.orthant(x0).numpy(), weights=w, minlength=4)
    for k in range(4):
        sem = math.sqrt(masses[k] * (1 - masses[k]))
        assert abs(drawn[k] - masses[k]) < N_SE * sem / math.sqrt(len(x))
        assert abs(weighted[k] - masses[k]) < N_SE * sem / math.sqrt(ess)


def test_two_directions_marginal_along_each_data_direction_is_its_one_dimensional_posterior():
    """t_k = w_k . x of exact samples follows the quadrature density of part k (KS test); with
    a prior symmetric in both t_k the four modes hold a quarter each."""
    post, model, *_ = _quadratics_posterior(ratio=0.1)
    x = post.sample(4000, torch.Generator().manual_seed(5)).reshape(4000, -1)
    t = (x @ torch.as_tensor(model.matrix).T).numpy()
    for k, part in enumerate(post.parts):
        lo, hi = part.t_mean - 12 * part.t_std, part.t_mean + 12 * part.t_std
        grid = np.linspace(lo, hi, 200_001)
        cdf = np.cumsum(np.exp(part.t_log_density(grid))) * (grid[1] - grid[0])
        ks = stats.kstest(t[:, k], lambda v: np.interp(v, grid, cdf))
        assert ks.pvalue > 1e-3
    # four modes of equal mass by symmetry
    np.testing.assert_allclose(post.orthant_masses(), 0.25, atol=1e-12)


def test_correlated_directions_are_refused():
    model = QuadraticForward((4, 4), phi=[paper_phi, lambda x, y: paper_phi(x, y) + 0.3 * x])
    cov = exponential_cov(4)
    with pytest.raises(ValueError, match="correlated under the prior"):
        ExactQuadraticsPosterior(np.zeros(16), cov, model.matrix, [1.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="rows of .matrix"):
        model.functional
