"""Tempered sequential Monte Carlo: weighted samples of a sharp, multimodal low-dimensional
posterior (the "standard method" for the coarsest MsIGN stage)."""

import math
from dataclasses import dataclass

import torch

from geoinvert.samplers.chains import metropolis, require

__all__ = ["SMCResult", "tempered_smc"]

_F64 = torch.float64


@dataclass
class SMCResult:
    """Particles ``x (num, n, n)``, normalised weights ``w (num,)``, log-likelihoods
    ``log_lik (num,)``, the temperatures, target evaluations, the final steps and whether the
    schedule reached beta = 1 by tempering (False: the evaluation cap forced a last jump)."""

    x: torch.Tensor
    w: torch.Tensor
    log_lik: torch.Tensor
    temperatures: list
    evaluations: int
    step: object
    tempered: bool

    @property
    def ess(self) -> float:
        """Kish ESS fraction of the final weights."""
        return float(1.0 / self.w.square().sum() / self.w.numel())


def _ess(log_w):
    w = torch.softmax(log_w, 0)
    return float(1.0 / w.square().sum())


def _next_temperature(beta, log_w, log_lik, target):
    """Largest beta' in (beta, 1] whose incremental weights keep ESS >= ``target`` (bisection)."""
    finite = torch.where(torch.isfinite(log_lik), log_lik, torch.full_like(log_lik, -math.inf))
    if _ess(log_w + (1.0 - beta) * finite) >= target:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _ess(log_w + (mid - beta) * finite) >= target:
            lo = mid
        else:
            hi = mid
    return max(lo, beta + 1e-12)


def _local_cholesky(cloud, points, neighbours):
    """Cholesky factors ``(num, d, d)`` and log-determinants of the covariance of each point's
    ``neighbours`` nearest particles of ``cloud`` (plus a small ridge): the random walk then
    follows the local shape of each mode, which one global covariance over several modes
    cannot."""
    k = min(neighbours, cloud.shape[0])
    idx = torch.cdist(points, cloud).topk(k, largest=False).indices
    near = cloud[idx]                                          # (num, k, d)
    centred = near - near.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (k - 1)
    eye = torch.eye(cloud.shape[1], dtype=_F64)
    scale = torch.diagonal(torch.cov(cloud.T).reshape(eye.shape)).mean().clamp(min=1e-300)
    chol = torch.linalg.cholesky(cov + 1e-10 * scale * eye)
    return chol, 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)


def _global_cholesky(cloud, num):
    """The Cholesky factor of all particles' covariance (plus the same ridge), repeated for the
    ``num`` points (the symmetric global move needs no Hastings correction)."""
    eye = torch.eye(cloud.shape[1], dtype=_F64)
    cov = torch.cov(cloud.T).reshape(eye.shape)
    scale = torch.diagonal(cov).mean().clamp(min=1e-300)
    chol = torch.linalg.cholesky(cov + 1e-10 * scale * eye)
    return chol.expand(num, *chol.shape), None


def _rw_log_density(delta, factor, step):
    """log N(delta; 0, step^2 L L^T) up to a constant shared by both directions of a move."""
    chol, logdet = factor
    u = torch.linalg.solve_triangular(chol, delta.flatten(1)[..., None], upper=False)[..., 0]
    return -0.5 * u.square().sum(1) / step**2 - 0.5 * logdet


def _systematic(w, generator):
    """Systematic resampling indices of normalised weights ``w``."""
    num = w.numel()
    u = (torch.rand((), generator=generator, dtype=_F64) + torch.arange(num, dtype=_F64)) / num
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u).clamp(max=num - 1)


def tempered_smc(log_likelihood, prior, level, num, *, generator=None, moves=8,
                 ess_target=0.5, step=None, target_accept=0.3, kernel="rw",
                 neighbours=None, max_evaluations=math.inf):
    r"""Samples of q(x) propto rho(x) L(x) by likelihood tempering from the prior.

    The particles move through pi_beta propto rho L^beta, beta = 0 -> 1. Each next beta is the
    largest keeping the ESS of the incremental weights L^(beta' - beta) at ``ess_target`` of
    the particles; the particles are then resampled (systematic) and moved by ``moves``
    Metropolis-Hastings steps whose step is adapted towards ``target_accept``: ``"rw"``, a
    Gaussian random walk alternating the covariance of all particles (moves along wide
    directions) and, at each point, that of its ``neighbours`` nearest particles (follows each
    mode's own sharp, anisotropic shape, which one covariance over several modes cannot); the
    particles defining them are frozen at the resampling. This is the default, for a few
    dimensions. Or ``"pcn"`` (prior-reversible, accepted with min(1, (L'/L)^beta)), for many
    dimensions. Tempering spreads the particles over every mode in proportion to its mass
    before the likelihood sharpens, which importance sampling from the prior cannot do for a
    sharp posterior and a single MCMC chain cannot do for a multimodal one. It needs moves
    that equilibrate within each mode at every temperature: with too few, the mode weights
    drift (seen on the 2x2 level of ``cases/elliptic_bimodal.yaml``, noise 1e-4).

    If the next temperature would take the target evaluations past ``max_evaluations`` the
    particles jump to beta = 1 with importance weights instead (a valid, possibly degenerate,
    weighted sample), and ``tempered`` is False.

    Args:
        log_likelihood: ``f(x) -> (num,)`` float64 log-likelihoods of fields ``(num, n, n)``
            (non-finite for failed solves: such particles get weight 0).
        prior: a Gaussian prior with ``sample(num, level, generator=, dtype=)`` and
            ``mean(level)``.
        level: Level of the fields.
        num: Particles.
        generator: ``torch.Generator`` (the result is a function of its state).
        moves: Metropolis steps per temperature.
        ess_target: ESS fraction kept at each temperature, in (0, 1).
        step: Initial step: the random walk's scale of the particle covariance (default
            2.38 / sqrt(dimension)) or the pCN step in (0, 1] (default 0.5).
        target_accept: Acceptance rate the step is adapted to.
        kernel: ``"rw"`` or ``"pcn"``.
        neighbours: Particles in the local covariance of ``"rw"`` (default
            max(4 d, num / 8)).
        max_evaluations: Cap on the calls of ``log_likelihood`` counted per particle.

    Returns:
        :class:`SMCResult`.

    References:
        Del Moral, Doucet, Jasra. Sequential Monte Carlo samplers. JRSS B 68 (2006).
        Kantas, Beskos, Jasra. Sequential Monte Carlo methods for high-dimensional inverse
        problems: a case study for the Navier-Stokes equations. SIAM/ASA JUQ 2 (2014).
    """
    require(int(num) == num and num >= 2, f"num must be an integer >= 2, got {num!r}")
    require(0 < ess_target < 1, f"ess_target must be in (0, 1), got {ess_target!r}")
    require(kernel in ("rw", "pcn"), f"kernel must be 'rw' or 'pcn', got {kernel!r}")
    dim = 4 ** level
    neighbours = neighbours or max(4 * dim, num // 8)
    if step is None:
        step = 0.5 if kernel == "pcn" else 2.38 / math.sqrt(dim)
    steps = [step, step]                          # random walk: global and local covariance
    require(step > 0 and (kernel == "rw" or step <= 1),
            f"step must be > 0 (and <= 1 for pcn), got {step!r}")
    require(int(moves) == moves and moves >= 1, f"moves must be an integer >= 1, got {moves!r}")
    mean = torch.as_tensor(prior.mean(level), dtype=_F64)

    def evaluate(x):
        with torch.no_grad():
            value = log_likelihood(x).to(_F64)
        return torch.where(torch.isfinite(value), value, torch.full_like(value, -math.inf))

    x = prior.sample(num, level, generator=generator, dtype=_F64)
    log_lik = evaluate(x)
    evaluations = num
    require(bool(torch.isfinite(log_lik).any()), "every likelihood evaluation of the initial "
            "SMC particles failed")
    log_w = torch.zeros(num, dtype=_F64)
    beta, temperatures, tempered = 0.0, [0.0], True
    while beta < 1.0:
        if evaluations + moves * num > max_evaluations:
            log_w = log_w + (1.0 - beta) * log_lik
            beta, tempered = 1.0, False
            temperatures.append(beta)
            break
        new = _next_temperature(beta, log_w, log_lik, ess_target * num)
        log_w = log_w + (new - beta) * log_lik
        beta = new
        temperatures.append(beta)
        idx = _systematic(torch.softmax(log_w, 0), generator)
        x, log_lik, log_w = x[idx], log_lik[idx], torch.zeros(num, dtype=_F64)
        cloud = x.flatten(1).clone() if kernel == "rw" else None
        overall = _global_cholesky(cloud, num) if kernel == "rw" else None
        for move in range(moves):
            local = move % 2 == 1
            if kernel == "rw":
                k = neighbours
                h = steps[local]
                chol, logdet = _local_cholesky(cloud, x.flatten(1), k) if local else overall
                xi = torch.randn((num, cloud.shape[1]), generator=generator, dtype=_F64)
                prop = x + h * torch.einsum("nij,nj->ni", chol, xi).reshape(x.shape)
                log_prior_ratio = (prior.log_prob(prop, level) - prior.log_prob(x, level)).to(_F64)
                if local:
                    back = _local_cholesky(cloud, prop.flatten(1), k)
                    log_prior_ratio = log_prior_ratio + (
                        _rw_log_density(x - prop, back, h)
                        - _rw_log_density(prop - x, (chol, logdet), h)).to(_F64)
            else:
                xi = prior.sample(num, level, generator=generator, dtype=_F64) - mean
                prop = mean + math.sqrt(1.0 - step**2) * (x - mean) + step * xi
                log_prior_ratio = 0.0
            prop_lik = evaluate(prop)
            evaluations += num
            accept, prob = metropolis(log_prior_ratio + beta * (prop_lik - log_lik), generator)
            x = torch.where(accept[:, None, None], prop, x)
            log_lik = torch.where(accept, prop_lik, log_lik)
            factor = math.exp(2.0 * (float(prob.mean()) - target_accept))
            if kernel == "rw":
                steps[local] = max(1e-8, steps[local] * factor)
            else:
                step = min(1.0, max(1e-8, step * factor))
    return SMCResult(x, torch.softmax(log_w, 0), log_lik, temperatures, evaluations,
                     tuple(steps) if kernel == "rw" else step, tempered)
