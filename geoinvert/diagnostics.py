"""Sample-quality diagnostics: importance-sampling ESS, PSIS k-hat, Jeffreys, modes, MCMC R-hat/ESS."""

import logging
import math
from typing import NamedTuple

import numpy as np
from scipy import special, stats

__all__ = [
    "Estimate",
    "importance_ess",
    "importance_ess_fraction",
    "gpd_fit",
    "psis_khat",
    "importance_shift",
    "kl_divergence",
    "jeffreys_divergence",
    "mode_fraction",
    "two_means",
    "relative_error",
    "moment_errors",
    "split_rhat",
    "mcmc_ess",
    "mcmc_tail_ess",
    "further_draws",
    "psis_log_weights",
    "fit_word",
    "verdict",
    "sbc_ranks",
    "rank_uniformity",
    "tarp_coverage",
]

logger = logging.getLogger(__name__)


class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error (python floats)."""

    value: float
    stderr: float


# ---------------------------------------------------------------- importance sampling

def _log_weights(log_weights):
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    if np.isnan(lw).any() or (lw == np.inf).any():
        raise ValueError("log-weights must not be NaN or +inf")
    return lw


def importance_ess(log_weights):
    """Kish effective sample size ``(sum w)^2 / sum w^2`` of importance weights ``w = exp(lw)``.

    Args:
        log_weights: ``(n,)`` unnormalised log-weights; ``-inf`` is a zero weight.

    Returns:
        ESS in ``[1, n]`` (0.0 if every weight is zero).
    """
    lw = _log_weights(log_weights)
    if not np.isfinite(lw).any():
        return 0.0
    return float(np.exp(2.0 * special.logsumexp(lw) - special.logsumexp(2.0 * lw)))


def importance_ess_fraction(log_weights):
    """Normalised ESS ``importance_ess(lw) / n`` in ``[1/n, 1]``."""
    lw = _log_weights(log_weights)
    return importance_ess(lw) / lw.size


def importance_shift(x, log_weights):
    r"""How far draws ``x (n, ...)`` of an approximation q lie from the target p they are
    importance-weighted to: ``(mean_shift, std_shift, noise)``.

    With Pareto-smoothed weights w (:func:`psis_log_weights`), per component j the mean
    shift is d_j = (mean_q - mean_w) / std_w and the std shift r_j = std_q / std_w - 1;
    ``mean_shift`` and ``std_shift`` are their RMS over components, in posterior standard
    deviations. They hold the weighted estimates' own noise as well: even where q = p,
    mean_q - mean_w = sum (1/n - w_i) x_i has a standard deviation of about
    ``noise = sqrt(sum w^2 - 1/n)`` posterior std (weights taken as fixed). So a shift below a
    tolerance vouches for the draws within it; one above it says the draws are off, or that the
    weights are too few to tell (``noise`` near the tolerance). Meaningful only where the
    weights are usable (k-hat < 0.7).

    Args:
        x: ``(n, ...)`` draws of q.
        log_weights: ``(n,)`` log p - log q (unnormalised); draws with a non-finite weight are
            left out (at least 25 must remain).

    Returns:
        ``(mean_shift, std_shift, noise)``; NaNs for fewer than 25 finite weights.
    """
    lw = np.asarray(log_weights, float)
    keep = np.isfinite(lw)
    if keep.sum() < 25:
        return math.nan, math.nan, math.nan
    x = np.asarray(x, float)[keep].reshape(int(keep.sum()), -1)
    w = np.exp(psis_log_weights(lw[keep])[0])
    mean_w = w @ x
    std_w = np.sqrt(w @ (x - mean_w) ** 2)
    ok = std_w > 0
    d = (x.mean(0) - mean_w)[ok] / std_w[ok]
    r = x.std(0)[ok] / std_w[ok] - 1
    noise = math.sqrt(max(float(np.sum(w ** 2)) - 1.0 / len(w), 0.0))
    return (math.sqrt(float(np.mean(d ** 2))), math.sqrt(float(np.mean(r ** 2))), noise)


def gpd_fit(exceedances, *, prior_weight=10.0):
    """Generalized Pareto fit ``(k, sigma)`` of positive exceedances by Zhang & Stephens (2009).

    GPD density ``p(x) = sigma^-1 (1 + k x / sigma)^(-1/k - 1)``. The empirical-Bayes estimate
    averages the profile likelihood over ``m = 30 + floor(sqrt(n))`` values of
    ``theta = -k / sigma``; as in PSIS, ``k`` is then shrunk towards 0.5 by a weakly informative
    prior worth ``prior_weight`` observations: ``k <- (n k + prior_weight / 2) / (n + prior_weight)``.

    References:
        Zhang, Stephens. A new and efficient estimation method for the generalized Pareto
        distribution. Technometrics 2009.
        Vehtari, Simpson, Gelman, Yao, Gabry. Pareto smoothed importance sampling. JMLR 2024.

    Args:
        exceedances: ``(n,)`` values ``> 0`` (at least 5).

    Returns:
        ``(k, sigma)`` floats.
    """
    x = np.sort(np.asarray(exceedances, dtype=np.float64).ravel())
    n = x.size
    m = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3.0 * quartile)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1.0)
    weights = np.exp(profile - special.logsumexp(profile))
    theta_hat = float(np.sum(weights * theta))
    k_hat = float(np.log1p(-theta_hat * x).mean())
    sigma = -k_hat / theta_hat
    return (n * k_hat + 0.5 * prior_weight) / (n + prior_weight), float(sigma)


def psis_khat(log_weights):
    """Pareto-smoothed importance sampling diagnostic ``k-hat`` (Vehtari et al. 2024).

    Fits a generalized Pareto distribution (:func:`gpd_fit`) to the ``M = ceil(min(n / 5,
    3 sqrt(n)))`` largest weights in excess of the next largest one. ``k < 0.5``: the IS
    estimate has finite variance; ``k < 0.7``: reliable in practice; ``k > 0.7``: unreliable.

    Args:
        log_weights: ``(n,)`` unnormalised log-weights.

    Returns:
        ``k-hat``; ``-inf`` if the tail weights are all equal (e.g. equal weights); NaN (with a
        logged warning) for fewer than 25 weights, too few for a tail fit.
    """
    lw = np.sort(_log_weights(log_weights))
    n = lw.size
    if n < 25:
        logger.warning("psis_khat needs at least 25 log-weights, got %d; returning NaN", n)
        return math.nan
    tail = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    top, cutoff = lw[-tail:], lw[-tail - 1]
    if not np.isfinite(top[-1]) or top[-1] <= cutoff:
        return -math.inf
    scale = top[-1]
    exceed = np.exp(top - scale) - np.exp(cutoff - scale)
    return gpd_fit(exceed[exceed > 0])[0]


def psis_log_weights(log_weights):
    """Pareto-smoothed normalised log-weights (Vehtari et al. 2024), and k-hat.

    The ``M`` largest weights (as in :func:`psis_khat`) are replaced by the expected order
    statistics of the fitted generalized Pareto tail, truncated at the largest raw weight.

    Args:
        log_weights: ``(n,)`` unnormalised log-weights (at least 25).

    Returns:
        ``(log_w, k)``: ``(n,)`` log-weights normalised to sum one, in the input order, and
        k-hat.
    """
    lw = _log_weights(log_weights).copy()
    n = lw.size
    if n < 25:
        raise ValueError(f"Pareto smoothing needs at least 25 log-weights, got {n}")
    order = np.argsort(lw)
    tail = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    top, cutoff = order[-tail:], lw[order[-tail - 1]]
    k = -math.inf
    if np.isfinite(lw[top[-1]]) and lw[top[-1]] > cutoff:
        scale = lw[top[-1]]
        exceed = np.exp(lw[top] - scale) - np.exp(cutoff - scale)
        k, sigma = gpd_fit(exceed[exceed > 0])
        p = (np.arange(1, tail + 1) - 0.5) / tail
        q = sigma * np.expm1(-k * np.log1p(-p)) / k if abs(k) > 1e-12 else -sigma * np.log1p(-p)
        smoothed = np.log(np.minimum(q + np.exp(cutoff - scale), 1.0)) + scale
        lw[top] = smoothed
    return lw - special.logsumexp(lw), float(k)


# ---------------------------------------------------------------- divergences

def kl_divergence(log_a_at_a, log_b_at_a):
    """Monte-Carlo ``D_KL(a || b) = E_a[log a - log b]`` from samples of ``a``.

    Args:
        log_a_at_a: ``(n,)`` normalised ``log a`` at samples of ``a``.
        log_b_at_a: ``(n,)`` normalised ``log b`` at the same samples.

    Returns:
        :class:`Estimate` with standard error ``std(log a - log b) / sqrt(n)``.
    """
    diff = np.asarray(log_a_at_a, np.float64).ravel() - np.asarray(log_b_at_a, np.float64).ravel()
    return Estimate(float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size)))


def jeffreys_divergence(log_q_at_q, log_p_at_q, log_p_at_p, log_q_at_p):
    """Monte-Carlo Jeffreys divergence ``D_J = E_q[log q - log p] + E_p[log p - log q]``.

    Both densities must be normalised. The two expectations use independent samples of the model
    ``q`` and of the target ``p``.

    Args:
        log_q_at_q, log_p_at_q: ``(n_q,)`` log densities at samples of ``q``.
        log_p_at_p, log_q_at_p: ``(n_p,)`` log densities at samples of ``p``.

    Returns:
        :class:`Estimate`; the standard error adds the two terms' variances.
    """
    kl_qp = kl_divergence(log_q_at_q, log_p_at_q)
    kl_pq = kl_divergence(log_p_at_p, log_q_at_p)
    return Estimate(kl_qp.value + kl_pq.value, math.hypot(kl_qp.stderr, kl_pq.stderr))


# ---------------------------------------------------------------- modes and moments

def _flat_samples(samples):
    x = np.asarray(samples, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def mode_fraction(samples, direction, *, offset=0.0):
    """Fraction of samples on the positive side ``x . direction > offset`` of a hyperplane.

    Args:
        samples: ``(n, ...)``; trailing dimensions are flattened row-major.
        direction: ``(...)`` with as many entries as one sample.
        offset: threshold on the projection.
    """
    proj = _flat_samples(samples) @ np.asarray(direction, dtype=np.float64).ravel()
    return float(np.mean(proj > offset))


def two_means(samples, *, seed=0, restarts=4, iterations=100):
    """Unsupervised split of samples into two clusters by 2-means (Lloyd's algorithm).

    Minimises the within-cluster sum of squares sum_i |x_i - c_{label_i}|^2 over the labels and
    the centres c_0, c_1, from ``restarts`` k-means++ initialisations (the best is kept). Used
    to check that a mode split by a chosen direction is also the data's own split.

    References:
        Arthur, Vassilvitskii. k-means++: the advantages of careful seeding. SODA 2007.

    Args:
        samples: ``(n, ...)`` with n >= 2; trailing dimensions are flattened row-major.
        seed: seed of the initialisations (numpy ``default_rng``).
        restarts: number of initialisations.
        iterations: maximum Lloyd iterations per initialisation.

    Returns:
        ``(labels (n,) int in {0, 1}, centres (2, ...))``.
    """
    x = _flat_samples(samples)
    if x.shape[0] < 2:
        raise ValueError(f"two_means needs at least 2 samples, got {x.shape[0]}")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        labels, centres, inertia = _lloyd(x, _kmeanspp(x, rng), iterations)
        if best is None or inertia < best[2]:
            best = (labels, centres, inertia)
    return best[0], best[1].reshape(2, *np.shape(samples)[1:])


def _kmeanspp(x, rng):
    """Two k-means++ seeds: one sample at random, the second with probability propto d^2."""
    first = x[rng.integers(x.shape[0])]
    d2 = np.square(x - first).sum(1)
    second = x[rng.choice(x.shape[0], p=d2 / d2.sum())] if d2.sum() > 0 else first
    return np.stack([first, second])


def _lloyd(x, centres, iterations):
    """Lloyd iterations from ``centres (2, d)``; returns labels, centres and the inertia."""
    labels = None
    for _ in range(iterations):
        d2 = np.square(x[:, None, :] - centres[None]).sum(2)
        new = d2.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([x[labels == k].mean(0) if (labels == k).any() else centres[k]
                            for k in range(2)])
    d2 = np.square(x[:, None, :] - centres[None]).sum(2)
    return labels, centres, float(d2.min(1).sum())


def relative_error(estimate, reference):
    """``||estimate - reference|| / ||reference||`` (Euclidean norms over all entries)."""
    est, ref = np.asarray(estimate, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(est - ref) / np.linalg.norm(ref))


def moment_errors(samples, reference_mean, reference_std):
    """Errors of the sample mean and std against a reference, in units of the reference std.

    ``mean_error = ||mean - mean_ref|| / ||std_ref||`` (well defined when the reference mean is
    zero) and ``std_error = ||std - std_ref|| / ||std_ref||``.

    Args:
        samples: ``(n, ...)``.
        reference_mean, reference_std: shaped like one sample.

    Returns:
        ``(mean_error, std_error)`` floats.
    """
    x = _flat_samples(samples)
    mean_ref = np.asarray(reference_mean, np.float64).ravel()
    std_ref = np.asarray(reference_std, np.float64).ravel()
    scale = np.linalg.norm(std_ref)
    return (float(np.linalg.norm(x.mean(0) - mean_ref) / scale),
            float(np.linalg.norm(x.std(0, ddof=1) - std_ref) / scale))


# ---------------------------------------------------------------- MCMC

def _chains(chains):
    c = np.asarray(chains, dtype=np.float64)
    c = c[None] if c.ndim == 1 else c
    if c.ndim != 2 or c.shape[1] < 4:
        raise ValueError(f"chains must be (n_chains, n_draws) with n_draws >= 4, got {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("chains must be finite")
    return c


def _split(c):
    """Each chain cut in two halves (the middle draw dropped for odd lengths): ``(2m, n // 2)``."""
    half = c.shape[1] // 2
    return np.concatenate([c[:, :half], c[:, -half:]])


def _rank_normalize(c):
    """Normal scores ``Phi^-1((r - 3/8) / (S + 1/4))`` of the pooled ranks (Vehtari et al. 2021)."""
    ranks = stats.rankdata(c, method="average").reshape(c.shape)
    return stats.norm.ppf((ranks - 0.375) / (c.size + 0.25))


def _rhat(c):
    """Potential scale reduction ``sqrt(((n-1)/n W + B/n) / W)`` of chains ``(m, n)``."""
    n = c.shape[1]
    within = c.var(axis=1, ddof=1).mean()
    between_over_n = c.mean(axis=1).var(ddof=1)
    return float(math.sqrt(((n - 1) / n * within + between_over_n) / within))


def split_rhat(chains, *, rank_normalize=True):
    """Split R-hat of MCMC chains (Vehtari, Gelman, Simpson, Carpenter, Burkner 2021).

    With ``rank_normalize`` it is the maximum of the bulk (rank-normalised) and the tail
    (rank-normalised folded ``|x - median|``) split R-hat; otherwise the classic split R-hat.
    Values above 1.01 indicate chains that have not mixed.

    References:
        Vehtari et al. Rank-normalization, folding, and localization: an improved R-hat for
        assessing convergence of MCMC. Bayesian Analysis 2021.

    Args:
        chains: ``(n_chains, n_draws)`` draws of one scalar quantity.

    Returns:
        R-hat (float); NaN for constant chains.
    """
    c = _split(_chains(chains))
    if np.ptp(c) == 0.0:
        return math.nan
    if not rank_normalize:
        return _rhat(c)
    folded = np.abs(c - np.median(c))
    return max(_rhat(_rank_normalize(c)), _rhat(_rank_normalize(folded)))


def _autocovariance(c):
    """Biased autocovariance (divide by n) of each chain ``(m, n)`` by FFT."""
    n = c.shape[1]
    centred = c - c.mean(axis=1, keepdims=True)
    size = 2 ** int(math.ceil(math.log2(2 * n)))
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :n] / n


def _autocorrelation(c):
    """Multi-chain autocorrelation ``rho_t = 1 - (W - mean_chains acov_t) / var_plus``."""
    m, n = c.shape
    acov = _autocovariance(c)
    within = acov[:, 0].mean() * n / (n - 1)
    var_plus = within * (n - 1) / n + (c.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    rho = 1.0 - (within - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    return rho


def _geyer_tau(rho):
    """Integrated autocorrelation time ``-1 + 2 sum_k P_k`` with Geyer's initial monotone sequence.

    ``P_k = rho_{2k} + rho_{2k+1}`` is summed while positive and made non-increasing.
    """
    pairs = rho[: 2 * (rho.size // 2)].reshape(-1, 2).sum(axis=1)
    negative = np.flatnonzero(pairs <= 0.0)
    pairs = pairs[: negative[0]] if negative.size else pairs
    return -1.0 + 2.0 * np.minimum.accumulate(pairs).sum()


def mcmc_ess(chains, *, rank_normalize=True):
    """Effective sample size of MCMC chains from split-chain autocorrelations (Geyer 1992).

    ``ESS = m n / tau`` with ``tau = 1 + 2 sum_t rho_t`` truncated and made monotone by Geyer's
    initial monotone sequence estimator, as in Stan. With ``rank_normalize`` this is the bulk-ESS
    of Vehtari et al. (2021). Capped at ``m n log10(m n)`` for antithetic chains.

    Args:
        chains: ``(n_chains, n_draws)`` draws of one scalar quantity.

    Returns:
        ESS (float); NaN for constant chains.
    """
    c = _split(_chains(chains))
    if np.ptp(c) == 0.0:
        return math.nan
    if rank_normalize:
        c = _rank_normalize(c)
    total = c.size
    tau = _geyer_tau(_autocorrelation(c))
    return float(min(total / tau, total * math.log10(total)))


def mcmc_tail_ess(chains):
    """Tail effective sample size: the smaller ESS of the indicators of the 5 % and 95 %
    quantiles (Vehtari et al. 2021), a measure of how well the chains explore the tails.

    Args:
        chains: ``(n_chains, n_draws)`` draws of one scalar quantity.

    Returns:
        ESS (float); NaN for constant chains.
    """
    c = _chains(chains)
    if np.ptp(c) == 0.0:
        return math.nan
    out = []
    for q in (0.05, 0.95):
        indicator = (c <= np.quantile(c, q)).astype(np.float64)
        out.append(mcmc_ess(indicator, rank_normalize=False) if np.ptp(indicator) else math.nan)
    return float(np.nanmin(out)) if np.isfinite(out).any() else math.nan


# ---------------------------------------------------------------- verdicts

ESS_TARGET = 400
"""Bulk and tail ESS at which the correction's chains may stop (with R-hat <= RHAT_MAX):
Vehtari et al. (2021) recommend 400 for reliable R-hat and ESS estimates."""

KHAT_GOOD, KHAT_USABLE = 0.5, 0.7
"""PSIS k-hat below 0.5: good importance weights; below 0.7: usable; above: unusable."""
RHAT_MAX, ESS_MIN = 1.01, 100.0
"""Chains are trusted with R-hat at most 1.01 and bulk and tail ESS at least 100."""
SHIFT_MAX = 0.1
"""Uncorrected draws (no chains) are trusted when their mean and std are within a tenth of a
posterior std (RMS over cells) of the importance-weighted estimates (:func:`importance_shift`)."""


def further_draws(done, rhat, ess, *, most):
    r"""Draws per chain to add to ``done`` for R-hat <= :data:`RHAT_MAX` and ESS >=
    :data:`ESS_TARGET`, extrapolated from the current ``rhat`` and (bulk and tail) ``ess``;
    0 when both hold.

    For chains that sample their stationary law the ESS grows in proportion to the draws n,
    and R-hat - 1 falls like 1/n (R-hat^2 - 1 is about the variance of the chain means
    over the within-chain variance, ~ 1 / ESS per chain; Vehtari et al. 2021). The chains
    need ``done * max((R-hat - 1) / (RHAT_MAX - 1), ESS_TARGET / ESS)`` draws, with a
    tenth more for the noise of both estimates. Chains not yet mixed (modes unvisited)
    extrapolate too short and are asked again; an R-hat of NaN (one chain) asks for
    ``most``. The answer is at least a tenth of ``done`` (and 1), at most ``most``.
    """
    if rhat <= RHAT_MAX and ess >= ESS_TARGET:
        return 0
    factor = max(ESS_TARGET / ess if ess > 0 else math.inf,
                 (rhat - 1) / (RHAT_MAX - 1) if rhat == rhat else math.inf)
    want = math.ceil(1.1 * done * factor) - done if math.isfinite(factor) else most
    return int(min(max(want, math.ceil(done / 10), 1), most))


def format_shares(shares, mcse):
    """Mode shares and their MCSE as text: ``"51 +/- 3 %, 49 +/- 3 %"`` (no error for a mode
    no draw or every draw lies in)."""
    def one(p, e):
        return f"{100 * p:.0f} +/- {100 * e:.0f} %" if np.isfinite(e) else f"{100 * p:.0f} %"
    return ", ".join(one(p, e) for p, e in zip(np.ravel(shares), np.ravel(mcse)))


def mode_shares(regions, modes):
    """Each mode's share of MCMC draws, its Monte-Carlo standard error and the effective
    sample size of the shares.

    A share is the mean of an indicator (the draw lies in the mode's region), so its error
    comes from the indicator's autocorrelation: chains that cross between the modes rarely
    weigh them poorly however well they sample within each. The ESS is that of each
    indicator (:func:`mcmc_ess` without rank normalisation, which would tie every draw), the
    smallest over the modes some but not all draws visit; chains that never cross give about
    one effective draw per chain. The MCSE is sqrt(p (1 - p) / ESS).

    Args:
        regions: ``(chains, draws)`` mode index of every draw.
        modes: number of modes (indices ``0 .. modes - 1``).

    Returns:
        ``(shares, mcse, ess)``: ``(modes,)`` arrays (NaN MCSE for a mode no draw or every
        draw lies in) and the smallest ESS (NaN when every draw lies in one mode).
    """
    regions = np.asarray(regions)
    shares, mcse, smallest = np.zeros(modes), np.full(modes, math.nan), math.nan
    for k in range(modes):
        indicator = (regions == k).astype(float)
        p = float(indicator.mean())
        shares[k] = p
        if 0.0 < p < 1.0:
            ess = mcmc_ess(indicator, rank_normalize=False)
            mcse[k] = math.sqrt(p * (1 - p) / ess)
            smallest = float(np.fmin(smallest, ess))      # fmin skips the NaN start
    return shares, mcse, smallest


MIN_EFFECTIVE_DRAWS = 10
"""Fewer effective importance draws than this support no estimate, whatever k-hat says (k-hat
is then fitted to a tail of a handful of weights)."""


# ---------------------------------------------------------------- calibration over simulations


def sbc_ranks(draws, truths, summaries):
    """Simulation-based calibration ranks (Talts et al. 2018).

    For each simulated data set k, the rank of ``summaries(truths[k])`` among
    ``summaries(draws[k])``, per summary: uniform on 0..L for a calibrated posterior, with L
    the draws per set.

    Args:
        draws: ``(sets, L, ...)`` posterior draws of each data set.
        truths: ``(sets, ...)`` the true parameters behind each data set.
        summaries: ``f(x (n, ...)) -> (n, k)`` scalar summaries (e.g. cell values, projections).

    Returns:
        int array ``(sets, k)``.
    """
    out = []
    for x, truth in zip(draws, truths):
        s, t = np.asarray(summaries(x)), np.asarray(summaries(truth[None]))[0]
        out.append((s < t).sum(0))
    return np.asarray(out)


def rank_uniformity(ranks, draws, *, bins=10):
    """Chi-square statistics and p-values of the uniformity of SBC ``ranks (sets, k)`` (ranks
    of 0..``draws``) in ``bins`` equal bins, one per summary: ``(statistic (k,), p (k,))``.
    Under calibration each statistic follows chi-square with ``bins - 1`` degrees of freedom;
    with k summaries, compare the smallest p with 0.01 / k (Bonferroni)."""
    from scipy.stats import chi2
    ranks = np.atleast_2d(np.asarray(ranks))
    if ranks.ndim == 2 and ranks.shape[0] == 1 and ranks.shape[1] > 1:
        ranks = ranks.T
    counts = np.stack([np.bincount(np.asarray(r) * bins // (draws + 1), minlength=bins)
                       for r in ranks.T])
    expected = ranks.shape[0] / bins
    stat = ((counts - expected) ** 2 / expected).sum(1)
    return stat, chi2.sf(stat, bins - 1)


def tarp_coverage(draws, truths, references, *, levels=None):
    """Expected coverage probability of TARP (Lemos et al. 2023, "Sampling-based accuracy
    testing of posterior estimators").

    For data set k with reference point r_k (drawn independently of the data, e.g. from the
    prior), f_k is the fraction of draws closer to r_k than the truth is; the expected coverage
    at credibility a is the fraction of sets with f_k < a. A calibrated posterior gives
    coverage a at every a; an over-confident one lies below the diagonal at high a, an
    under-confident one above.

    Args:
        draws: ``(sets, L, ...)``; truths: ``(sets, ...)``; references: ``(sets, ...)``.
        levels: Credibilities (default 0.01..0.99).

    Returns:
        ``(levels (m,), coverage (m,))``.
    """
    levels = np.linspace(0.01, 0.99, 99) if levels is None else np.asarray(levels, float)
    f = []
    for x, truth, ref in zip(draws, truths, references):
        x = np.asarray(x).reshape(len(x), -1)
        d_draws = np.linalg.norm(x - np.ravel(ref), axis=1)
        d_truth = np.linalg.norm(np.ravel(truth) - np.ravel(ref))
        f.append(float((d_draws < d_truth).mean()))
    f = np.asarray(f)
    return levels, (f[:, None] < levels[None, :]).mean(0)


def fit_word(khat, effective_draws=math.inf):
    """``"good"``, ``"poor"`` or ``"unusable"`` for a flow whose importance weights have
    PSIS ``khat`` (below 0.5, below 0.7, otherwise) and ``effective_draws`` (importance ESS
    in draws; below :data:`MIN_EFFECTIVE_DRAWS` the fit is unusable)."""
    if effective_draws < MIN_EFFECTIVE_DRAWS:
        return "unusable"
    if not np.isfinite(khat) and khat < 0:
        return "good"
    if khat < KHAT_GOOD:
        return "good"
    return "poor" if khat < KHAT_USABLE else "unusable"


def verdict(d, *, raise_draws="sampler.correction.draws", approximation="flow"):
    """Warnings about a result's diagnostics ``d`` (the ``diagnostics`` of a result).

    A warning is due when chains ran (``rhat`` present) and R-hat exceeds :data:`RHAT_MAX` or
    the bulk or tail ESS is below :data:`ESS_MIN`, and when the flow's own draws are the
    answer (no chains) with k-hat at or above :data:`KHAT_USABLE`, when a Laplace fit found
    other local maxima (``other_modes``), when the correction could not start
    (``correction_unstarted``), when data lie outside the simulations of an amortized posterior
    (``outside_simulations``), when draws with a failed forward solve were left out
    (``failed_draws`` of ``drawn``), when the mode search stopped at its limit with a mode
    reached from one draw only (``mode_search_unfinished``) and when uncorrected draws with usable weights lie further
    than :data:`SHIFT_MAX` from their importance-weighted estimates (``psis_mean_shift``,
    ``psis_std_shift``, ``psis_shift_noise``: :func:`importance_shift`), and when chains
    crossed too rarely between the modes to weigh them (``mode_ess`` below :data:`ESS_MIN`,
    :func:`mode_shares`). Each warning names
    the key to raise or the sampler to use; a correction's R-hat warning also names
    ``sampler.correction.leapfrog`` when its cap cut the transitions (``leapfrog_wanted``).

    Args:
        d: dict with some of ``rhat``, ``ess``, ``ess_tail``, ``psis_khat``, ``other_modes``,
            ``correction_unstarted``, ``failed_draws``, ``psis_mean_shift``, ``mode_ess`` (with
            ``mode_shares`` and ``mode_shares_mcse``).
        raise_draws: key that sets the number of draws (named in the warnings).
        approximation: ``"flow"``, ``"amortized posterior"`` or ``"Laplace
            approximation"``: what the draws come from when no chains ran (the remedy named
            differs).

    Returns:
        List of warning lines (empty: the result passes every check).
    """
    out = []
    if d.get("correction_unstarted"):
        out.append("the correction could not start (its chains' starting points have a failed "
                   "forward solve or an overflowing gradient): the samples are the flow's own "
                   "draws, not corrected; the forward model fails for fields this posterior "
                   "allows (a narrower prior.std, or stronger data, keeps the coefficient "
                   "within what double precision solves)")
    if d.get("outside_simulations"):
        out.append(f"{d['outside_simulations']} observations lie outside the range of the "
                   "simulated data: the amortized posterior extrapolates (the model may be "
                   "misspecified, or the simulations too few); infer with --correct")
    if d.get("failed_draws"):
        out.append(f"the forward solve failed for {d['failed_draws']} of the {d['drawn']} "
                   "draws, which were left out: the estimates come from the rest and are "
                   "biased towards fields that solve")
    if d.get("mode_search_unfinished"):
        found = d.get("modes_found", 0)
        out.append(f"the mode search stopped at its limit with a mode reached from one "
                   f"draw only ({found:.0f} modes found): the posterior may have modes that no "
                   "chain visited; compare runs with other values of sampler.seed")
    if d.get("other_modes"):
        n = d["other_modes"]
        out.append(f"the MAP searches ended at {n} other local maxim{'um' if n == 1 else 'a'} (the "
                   f"highest {d['other_modes_gap']:.1f} below the MAP point in log posterior): the "
                   "posterior is multimodal and a Gaussian at one mode, or chains started "
                   "there, miss the others; use sampler.kind msign")
    rhat = d.get("rhat", math.nan)
    if rhat is not None and np.isfinite(rhat):
        if rhat > RHAT_MAX:
            cut = d.get("leapfrog_wanted", math.nan)
            cut = (f"; the HMC transitions were cut at {d['leapfrog']:.0f} leapfrog steps of "
                   f"the {cut:.0f} a quarter period takes: raise sampler.correction.leapfrog "
                   "too") if np.isfinite(cut) and "leapfrog" in d else ""
            out.append(f"R-hat {rhat:.3f} > {RHAT_MAX}: the chains disagree, so the result is "
                       f"not yet the posterior; raise {raise_draws} and the warm-up{cut}")
        ess = min(d.get("ess", math.inf), d.get("ess_tail", math.inf))
        if np.isfinite(ess) and ess < ESS_MIN:
            out.append(f"effective sample size {ess:.0f} < {ESS_MIN:.0f}: means and "
                       f"quantiles are noisy; raise {raise_draws}")
        mode_ess = d.get("mode_ess", math.nan)
        if mode_ess is not None and np.isfinite(mode_ess) and mode_ess < ESS_MIN:
            out.append(f"the chains crossed between the posterior's modes too rarely to weigh "
                       f"them: the effective sample size of the modes' shares of the draws is "
                       f"{mode_ess:.0f} < {ESS_MIN:.0f} (shares "
                       f"{format_shares(d['mode_shares'], d['mode_shares_mcse'])}); raise "
                       f"{raise_draws}")
    elif d.get("psis_khat") is not None and d["psis_khat"] >= KHAT_USABLE:
        remedy = {"flow": "set sampler.correction.kernel (e.g. hmc) or raise sampler.steps",
                  "amortized posterior": "infer with --correct, or amortize on more "
                  "simulations or epochs"}.get(
            approximation, "the posterior is not Gaussian: use sampler.kind gpcn (corrected) "
            "or msign")
        out.append(f"PSIS k-hat {d['psis_khat']:.2f} >= {KHAT_USABLE}: the {approximation}'s "
                   f"draws do not represent the posterior and no correction ran; {remedy}")
    elif max(d.get("psis_mean_shift", math.nan), d.get("psis_std_shift", math.nan)) > SHIFT_MAX:
        remedy = {"flow": "set sampler.correction.kernel (e.g. hmc)",
                  "amortized posterior": "infer with --correct"}.get(
            approximation, "use sampler.kind gpcn (corrected) or msign")
        out.append(f"the {approximation}'s draws differ from their importance-weighted "
                   f"estimates (psis_mean, psis_std) by {d['psis_mean_shift']:.2f} posterior "
                   f"std in the mean and {100 * d['psis_std_shift']:.0f} % in the std (RMS over "
                   f"cells; the weighted estimates' own error is about "
                   f"{d['psis_shift_noise']:.2f}): the draws are off by more than "
                   f"{SHIFT_MAX} std, or too few weights count to tell; {remedy}")
    return out
