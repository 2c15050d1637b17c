"""Tests of the diagnostics against known answers."""

import math

import numpy as np
import pytest
from scipy import stats

from geoinvert import diagnostics as dg
from geoinvert.testing import gaussian_kl

# Monte-Carlo checks use 4 standard errors (false-alarm probability < 1e-4) with fixed seeds.
N_SE = 4.0


# ---------------------------------------------------------------- importance sampling

def test_ess_of_equal_weights_is_n():
    assert dg.importance_ess(np.full(1000, -3.7)) == pytest.approx(1000.0, rel=1e-12)
    assert dg.importance_ess_fraction(np.zeros(50)) == pytest.approx(1.0, rel=1e-12)


def test_ess_of_one_dominant_weight_is_one_and_ignores_zero_weights():
    lw = np.r_[0.0, np.full(99, -1e4)]
    assert dg.importance_ess(lw) == pytest.approx(1.0, rel=1e-12)
    # zero weights (-inf) do not count; two equal nonzero weights give ESS 2
    assert dg.importance_ess([0.0, 0.0, -np.inf, -np.inf]) == pytest.approx(2.0)
    assert dg.importance_ess([-np.inf, -np.inf]) == 0.0


def test_ess_matches_closed_form_for_two_weight_values():
    # n/2 weights a and n/2 weights b: ESS = n (a + b)^2 / (2 (a^2 + b^2))
    n, a, b = 100, 1.0, 3.0
    lw = np.log(np.r_[np.full(n // 2, a), np.full(n // 2, b)]) + 700.0  # exp(700+) overflows unless handled in log space
    assert dg.importance_ess(lw) == pytest.approx(n * (a + b) ** 2 / (2 * (a * a + b * b)))


def test_ess_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        dg.importance_ess([0.0, np.nan])


def test_gpd_fit_recovers_known_shape():
    n, k = 20000, 0.5
    x = stats.genpareto(c=k, scale=2.0).rvs(n, random_state=0)
    k_hat, sigma = dg.gpd_fit(x)
    # the estimator is asymptotically efficient: sd(k_hat) ~ (1 + k) / sqrt(n) = 0.011
    assert abs(k_hat - k) < N_SE * (1 + k) / math.sqrt(n)
    # sd(log sigma_hat) ~ sqrt(2 (1 + k) / n) ~ 0.012 (inverse Fisher information)
    assert abs(math.log(sigma / 2.0)) < N_SE * math.sqrt(2 * (1 + k) / n)


def test_psis_khat_recovers_shape_of_pareto_tailed_weights():
    # GPD weights keep the same shape above any threshold, so the tail fit sees k = 0.5
    n, k = 100_000, 0.5
    w = stats.genpareto(c=k).rvs(n, random_state=1)
    tail = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))  # 949 weights in the fit
    k_hat = dg.psis_khat(np.log(w) - 50.0)
    assert abs(k_hat - k) < N_SE * (1 + k) / math.sqrt(tail)


def test_psis_khat_is_small_for_good_proposals_and_large_for_bad_ones():
    rng = np.random.default_rng(2)
    # target N(0, 1), proposal N(0, s^2): w ~ exp(z^2 (1 - s^2) / 2) has Pareto tail index
    # 1 / (1 - s^2), i.e. k = 1 - s^2 (bounded weights, k < 0, when s > 1)
    x = 2.0 * rng.standard_normal(4000)
    good = stats.norm.logpdf(x) - stats.norm.logpdf(x, scale=2.0)
    y = 0.3 * rng.standard_normal(4000)  # k = 0.91: infinite-variance weights
    bad = stats.norm.logpdf(y) - stats.norm.logpdf(y, scale=0.3)
    # for such log-normal-like tails k-hat converges slowly from below: over 20 seeds it was
    # 0.80 +- 0.10 (min 0.64) for s = 0.3, n = 4000, so only k > 0.5 is asserted (3 sd)
    assert dg.psis_khat(good) < 0.5 < dg.psis_khat(bad)
    assert dg.psis_khat(np.zeros(100)) == -math.inf
    assert math.isnan(dg.psis_khat(np.zeros(10)))  # too few weights: NaN, not an exception


# ---------------------------------------------------------------- divergences

def test_jeffreys_between_gaussians_matches_closed_form():
    mq, Sq = np.array([0.0, 0.5, -0.2]), np.array([[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]])
    mp, Sp = np.array([0.3, 0.2, 0.0]), np.diag([1.5, 0.6, 0.4])
    q, p = stats.multivariate_normal(mq, Sq), stats.multivariate_normal(mp, Sp)
    xq, xp = q.rvs(20000, random_state=3), p.rvs(20000, random_state=4)
    est = dg.jeffreys_divergence(q.logpdf(xq), p.logpdf(xq), p.logpdf(xp), q.logpdf(xp))
    exact = gaussian_kl(mq, Sq, mp, Sp) + gaussian_kl(mp, Sp, mq, Sq)
    assert abs(est.value - exact) < N_SE * est.stderr
    assert est.stderr < 0.05 * exact  # informative


def test_kl_of_identical_densities_is_zero():
    x = np.random.default_rng(5).standard_normal(100)
    est = dg.kl_divergence(stats.norm.logpdf(x), stats.norm.logpdf(x))
    assert est == (0.0, 0.0)


# ---------------------------------------------------------------- modes and moments

def test_mode_fraction_along_a_direction():
    x = np.zeros((10, 2, 2))
    x[:7, 0, 1] = 1.0
    x[7:, 0, 1] = -1.0
    d = np.array([[0.0, 2.0], [0.0, 0.0]])
    assert dg.mode_fraction(x, d) == pytest.approx(0.7)
    assert dg.mode_fraction(x, d, offset=5.0) == 0.0


def test_two_means_recovers_two_separated_blobs():
    rng = np.random.default_rng(3)
    centre = np.zeros((4, 4))
    centre[0, 0] = 4.0
    x = np.concatenate([centre + rng.standard_normal((300, 4, 4)),
                        -centre + rng.standard_normal((100, 4, 4))])
    labels, centres = dg.two_means(x, seed=0)
    truth = np.r_[np.zeros(300, int), np.ones(100, int)]
    # blobs 8 apart with unit noise: a misassignment needs a 4-sigma excursion (p ~ 3e-5)
    agreement = max((labels == truth).mean(), (labels != truth).mean())
    assert agreement == 1.0
    assert centres.shape == (2, 4, 4)
    big = int(np.bincount(labels).argmax())
    # each centre cell is a mean of 300 unit normals: within 4 standard errors of +-centre
    assert np.abs(centres[big] - centre).max() < N_SE / math.sqrt(300)
    with pytest.raises(ValueError, match="at least 2"):
        dg.two_means(x[:1])


def test_moment_errors_are_zero_for_exact_moments_and_scale_correctly():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1000, 3, 3))
    mean, std = x.mean(0), x.std(0, ddof=1)
    assert dg.moment_errors(x, mean, std) == pytest.approx((0.0, 0.0), abs=1e-14)
    me, se = dg.moment_errors(x, mean + std, 2 * std)
    assert me == pytest.approx(0.5) and se == pytest.approx(0.5)
    assert dg.relative_error([1.0, 2.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))


# ---------------------------------------------------------------- MCMC

def _ar1(phi, chains, draws, seed):
    """Stationary AR(1) chains ``x_t = phi x_{t-1} + sqrt(1 - phi^2) e_t``."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((chains, draws))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + math.sqrt(1 - phi * phi) * e[:, t]
    return x


@pytest.mark.parametrize("rank_normalize", [True, False])
def test_rhat_near_one_for_iid_chains(rank_normalize):
    chains = np.random.default_rng(7).standard_normal((4, 2000))
    # for iid chains R-hat - 1 is O(1/n_draws); 1.01 is the recommended convergence threshold
    assert abs(dg.split_rhat(chains, rank_normalize=rank_normalize) - 1.0) < 0.01


@pytest.mark.parametrize("rank_normalize", [True, False])
def test_rhat_detects_chains_with_different_means(rank_normalize):
    chains = np.random.default_rng(8).standard_normal((4, 1000)) + np.array([0, 0, 0, 1.0])[:, None]
    assert dg.split_rhat(chains, rank_normalize=rank_normalize) > 1.1


def test_rhat_tail_part_detects_different_scales():
    # same location, one chain 3x wider: invisible to bulk R-hat, caught by folded R-hat
    chains = np.random.default_rng(9).standard_normal((4, 1000)) * np.array([1, 1, 1, 3.0])[:, None]
    assert dg.split_rhat(chains) > 1.05


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("rank_normalize", [True, False])
def test_ess_of_ar1_chains(phi, rank_normalize):
    chains, draws = 4, 5000
    x = _ar1(phi, chains, draws, seed=10)
    expected = chains * draws * (1 - phi) / (1 + phi)
    # sd of the estimated autocorrelation time is ~ tau sqrt(2 (2K + 1) / N) for a window of
    # K lags (Sokal 1997): ~3% for phi = 0.5 (K ~ 10), ~8% for phi = 0.9 (K ~ 60); allow ~4 sd
    tol = {0.0: 0.08, 0.5: 0.12, 0.9: 0.3}[phi]
    assert dg.mcmc_ess(x, rank_normalize=rank_normalize) == pytest.approx(expected, rel=tol)


def test_rhat_excess_falls_like_one_over_the_draws_for_stationary_chains():
    """The premise of further_draws: for stationary chains n (R-hat - 1) does not depend on
    the draws n. Checked on the largest R-hat of 16 AR(1) summaries (phi 0.5, 8 chains),
    as the correction takes it over its cells, at 100 and 800 draws: the means of 60
    replications agree (each replication's relative sd is about 0.22, so the ratio's is
    about 0.04; the bounds are almost 4 of those)."""
    def scaled(draws, seed):
        x = _ar1(0.5, 60 * 16 * 8, draws, seed=seed).reshape(60, 16, 8, draws)
        return draws * np.mean([max(dg.split_rhat(s) for s in rep) - 1 for rep in x])

    assert scaled(100, 21) / scaled(800, 22) == pytest.approx(1.0, abs=0.15)


def test_further_draws_extrapolates_rhat_and_ess_and_stops_when_both_hold():
    assert dg.further_draws(250, 1.009, 401.0, most=250) == 0
    # R-hat - 1 twice the target: twice the draws, a tenth more: 550 in all
    assert dg.further_draws(250, 1.02, 1000.0, most=1000) == 300
    assert dg.further_draws(250, 1.02, 1000.0, most=250) == 250
    assert dg.further_draws(250, 1.005, 200.0, most=1000) == 300        # half the ESS
    assert dg.further_draws(250, 1.0101, 1000.0, most=1000) == 28       # just short
    assert dg.further_draws(250, 1.005, 400.0 - 1e-9, most=1000) == 26  # a tenth more
    assert dg.further_draws(250, math.nan, 1000.0, most=200) == 200     # one chain
    assert dg.further_draws(250, 1.005, 0.0, most=200) == 200


def _switching(stay, chains, draws, seed):
    """Two-state Markov chains ``(chains, draws)`` of 0/1 that keep their state with
    probability ``stay`` at each draw, started from the stationary law (1/2, 1/2)."""
    rng = np.random.default_rng(seed)
    flips = rng.random((chains, draws)) > stay
    flips[:, 0] = rng.random(chains) < 0.5
    return np.cumsum(flips, axis=1) % 2


def test_mode_shares_weigh_rarely_crossing_chains_by_their_crossings():
    """A mode indicator that switches with probability q per draw has autocorrelation
    (1 - 2q)^t, hence an ESS of N q / (1 - q) for N draws: 4 x 2000 draws with q = 0.01
    have about 81 effective draws, not 8000. The ESS estimate is within 40 % of that (its
    relative sd at tau ~ 100 over 8000 draws is about 0.15, Sokal 1997), and the MCSE it
    gives matches the spread of the share over 200 such runs within 20 % (the sd of a sd
    from 200 runs is 5 %)."""
    draws, chains, q = 2000, 4, 0.01
    expected = chains * draws * q / (1 - q)
    runs = [dg.mode_shares(_switching(1 - q, chains, draws, seed), 2) for seed in range(200)]
    shares = np.array([r[0] for r in runs])
    np.testing.assert_allclose(shares.sum(1), 1.0)
    ess = np.array([r[2] for r in runs])
    assert np.median(ess) == pytest.approx(expected, rel=0.4)
    mcse = np.array([r[1][0] for r in runs])
    assert np.sqrt(np.mean(mcse ** 2)) == pytest.approx(shares[:, 0].std(), rel=0.2)
    # both modes' indicators are complements: one ESS, one MCSE
    assert runs[0][1][0] == pytest.approx(runs[0][1][1])


def test_mode_shares_of_chains_that_never_cross_or_sit_in_one_mode():
    """Chains that never cross count about once each; draws all in one mode give its share 1
    and no error (nothing to weigh)."""
    stuck = np.zeros((4, 500), dtype=int)
    stuck[:1] = 1
    shares, mcse, ess = dg.mode_shares(stuck, 3)
    np.testing.assert_allclose(shares, [0.75, 0.25, 0.0])
    assert ess < 8 and np.isnan(mcse[2]) and mcse[0] > 0.15
    shares, mcse, ess = dg.mode_shares(np.zeros((4, 500), dtype=int), 2)
    np.testing.assert_allclose(shares, [1.0, 0.0])
    assert np.isnan(ess) and np.isnan(mcse).all()
    assert dg.format_shares(shares, mcse) == "100 %, 0 %"


def test_mcmc_inputs_are_validated():
    with pytest.raises(ValueError, match="n_draws"):
        dg.mcmc_ess(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        dg.split_rhat(np.array([[0.0, 1.0, np.nan, 2.0, 3.0]]))
    assert math.isnan(dg.mcmc_ess(np.ones((2, 10)))) and math.isnan(dg.split_rhat(np.ones((2, 10))))


def test_tail_ess_of_independent_draws_is_near_their_number():
    from geoinvert.diagnostics import mcmc_tail_ess
    draws = np.random.default_rng(0).standard_normal((4, 1000))
    # the ESS of an indicator of iid draws has a relative sd of about 10 % here
    assert 3000 < mcmc_tail_ess(draws) < 5000
    sticky = np.repeat(draws[:, :100], 10, axis=1)          # each draw held 10 times
    assert mcmc_tail_ess(sticky) < 800


def test_psis_weights_sum_to_one_keep_the_order_and_cap_the_tail():
    from geoinvert.diagnostics import psis_khat, psis_log_weights
    lw = np.random.default_rng(1).standard_normal(2000) * 2.0
    smoothed, k = psis_log_weights(lw)
    assert np.exp(smoothed).sum() == pytest.approx(1.0)
    assert k == pytest.approx(psis_khat(lw))
    assert np.array_equal(np.argsort(smoothed[lw < np.quantile(lw, 0.9)]),
                          np.argsort(lw[lw < np.quantile(lw, 0.9)]))
    raw = np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum()
    assert np.exp(smoothed).max() <= raw.max() * 1.0001
    equal, k_equal = psis_log_weights(np.zeros(100))
    np.testing.assert_allclose(np.exp(equal), 0.01)
    assert k_equal == -math.inf


def _gaussian_weights(shift, scale, n=4000, dim=8, seed=0):
    """Draws of q = N(shift, scale^2 I) in ``dim`` dimensions and their log weights
    against p = N(0, I)."""
    x = shift + scale * np.random.default_rng(seed).standard_normal((n, dim))
    log_w = stats.norm.logpdf(x).sum(1) - stats.norm.logpdf(x, shift, scale).sum(1)
    return x, log_w


def test_importance_shift_is_zero_for_equal_weights_and_nan_for_too_few():
    x = np.random.default_rng(1).standard_normal((100, 3, 3))
    np.testing.assert_allclose(dg.importance_shift(x, np.zeros(100)), 0.0, atol=1e-7)
    log_w = np.full(100, -np.inf)
    log_w[:24] = 0.0
    assert all(math.isnan(v) for v in dg.importance_shift(x, log_w))


@pytest.mark.parametrize("shift, scale", [(0.3, 1.0), (0.0, 1.3), (0.0, 1.0)])
def test_importance_shift_measures_a_shifted_or_widened_approximation(shift, scale):
    # q = N(shift, scale^2) weighted to p = N(0, 1): the draws' mean is off by `shift` std and
    # their std by `scale - 1`; the weighted estimates' error is the returned noise, here
    # under 0.03 (the importance ESS is above half the 4000 draws), and the shifts measure
    # the truth within three of it. With q = p the weights are equal and both shifts are 0.
    x, log_w = _gaussian_weights(shift, scale)
    mean, std, noise = dg.importance_shift(x, log_w)
    assert noise < 0.03
    assert noise == pytest.approx(math.sqrt(max(1 / dg.importance_ess(
        dg.psis_log_weights(log_w)[0]) - 1 / 4000, 0.0)), abs=1e-6)
    assert abs(mean - shift) < 3 * noise + 0.02 and abs(std - (scale - 1)) < 3 * noise + 0.02


@pytest.mark.parametrize("d, expected", [
    ({"psis_khat": 0.6, "psis_mean_shift": 0.15, "psis_std_shift": 0.05,
      "psis_shift_noise": 0.08}, ["0.15 posterior std", "5 %", "about 0.08",
                                  "sampler.correction.kernel"]),
    ({"psis_khat": 0.6, "psis_mean_shift": 0.05, "psis_std_shift": 0.12,
      "psis_shift_noise": 0.03}, ["12 %"]),
    ({"psis_khat": 0.6, "psis_mean_shift": 0.05, "psis_std_shift": 0.05,
      "psis_shift_noise": 0.03}, []),
])
def test_verdict_flags_uncorrected_draws_off_their_weighted_estimates(d, expected):
    lines = dg.verdict(d)
    assert len(lines) == bool(expected)
    for part in expected:
        assert part in lines[0]
    laplace = dg.verdict(d, approximation="Laplace approximation")
    assert not expected or "sampler.kind gpcn" in laplace[0]


@pytest.mark.parametrize("d, expected", [
    ({"rhat": 1.005, "ess": 400.0, "ess_tail": 300.0}, []),
    ({"rhat": 1.2, "ess": 400.0, "ess_tail": 300.0}, ["R-hat 1.200"]),
    ({"rhat": 1.0, "ess": 40.0, "ess_tail": 300.0}, ["effective sample size 40"]),
    ({"rhat": 1.0, "ess": 400.0, "ess_tail": 30.0}, ["effective sample size 30"]),
    ({"psis_khat": 0.9}, ["PSIS k-hat 0.90", "sampler.correction.kernel"]),
    ({"psis_khat": 0.3}, []),
    ({"psis_khat": 4.0, "rhat": 1.0, "ess": 500.0, "ess_tail": 500.0}, []),
    ({"rhat": 1.05, "ess": 500.0, "ess_tail": 500.0, "leapfrog": 32, "leapfrog_wanted": 44},
     ["R-hat 1.050", "cut at 32 leapfrog steps of the 44", "sampler.correction.leapfrog"]),
    ({"rhat": 1.05, "ess": 500.0, "ess_tail": 500.0, "leapfrog": 12,
      "leapfrog_wanted": math.nan}, ["R-hat 1.050"]),
    ({"rhat": 1.005, "ess": 900.0, "ess_tail": 900.0, "mode_ess": 40.0,
      "mode_shares": [0.62, 0.38], "mode_shares_mcse": [0.077, 0.077]},
     ["crossed between the posterior's modes too rarely", "shares of the draws is 40 < 100",
      "(shares 62 +/- 8 %, 38 +/- 8 %)"]),
    ({"rhat": 1.005, "ess": 900.0, "ess_tail": 900.0, "mode_ess": 400.0,
      "mode_shares": [0.5, 0.5], "mode_shares_mcse": [0.025, 0.025]}, []),
    ({"rhat": 1.005, "ess": 900.0, "ess_tail": 900.0, "mode_ess": math.nan,
      "mode_shares": [1.0, 0.0], "mode_shares_mcse": [math.nan, math.nan]}, []),
])
def test_verdict_warns_and_names_the_key(d, expected):
    from geoinvert.diagnostics import verdict
    lines = verdict(d)
    assert bool(lines) == bool(expected)
    text = " ".join(lines)
    for part in expected:
        assert part in text
    if "rhat" in d and lines:
        assert "sampler.correction.draws" in text
    if "leapfrog" in d and not np.isfinite(d["leapfrog_wanted"]):
        assert "sampler.correction.leapfrog" not in text


def test_fit_words():
    from geoinvert.diagnostics import fit_word
    assert [fit_word(k) for k in (-math.inf, 0.2, 0.6, 0.7, 5.0)] == \
        ["good", "good", "poor", "unusable", "unusable"]


def _calibration_bed(sets=300, draws=99, shrink=1.0, seed=0):
    """Draws of the exact posterior (optionally shrunk about its mean) of a 2-D Gaussian
    model y = x1 + x2 + e for ``sets`` simulated (x, y)."""
    rng = np.random.default_rng(seed)
    prior_cov, noise = np.eye(2), 0.5
    g = np.ones(2)
    truths, draws_all = [], []
    for _ in range(sets):
        x = rng.standard_normal(2)
        y = g @ x + noise * rng.standard_normal()
        gain = prior_cov @ g / (g @ prior_cov @ g + noise ** 2)
        mean, cov = gain * y, prior_cov - np.outer(gain, g @ prior_cov)
        d = rng.multivariate_normal(mean, cov, size=draws)
        truths.append(x)
        draws_all.append(mean + shrink * (d - mean))
    return np.asarray(draws_all), np.asarray(truths), rng.standard_normal((sets, 2))


def test_sbc_and_tarp_accept_the_exact_posterior_and_reject_an_overconfident_one():
    """Exact posterior draws: SBC p-values above the Bonferroni level and TARP coverage within
    4 binomial standard errors of the diagonal; draws shrunk to 60 % of their spread fail
    both (fixed seeds)."""
    from geoinvert.diagnostics import rank_uniformity, sbc_ranks, tarp_coverage
    ident = lambda x: np.asarray(x).reshape(len(x), -1)   # noqa: E731
    for shrink, calibrated in ((1.0, True), (0.6, False)):
        draws, truths, refs = _calibration_bed(shrink=shrink)
        ranks = sbc_ranks(draws, truths, ident)
        assert ranks.shape == (300, 2) and ranks.min() >= 0 and ranks.max() <= 99
        _, p = rank_uniformity(ranks, 99)
        levels, coverage = tarp_coverage(draws, truths, refs)
        deviation, bound = np.abs(coverage - levels).max(), 4 * 0.5 / np.sqrt(300)
        assert (p.min() > 0.01 / 2) == calibrated, p
        assert (deviation <= bound) == calibrated, deviation
