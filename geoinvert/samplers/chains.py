"""Shared MCMC machinery: batched targets, step-size adaptation, the chain loop and its result."""

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from geoinvert.diagnostics import mcmc_ess, split_rhat
from geoinvert.samplers.whitening import prior_whitening, standard_normal_log_prob

__all__ = ["BatchedTarget", "ChainResult", "DualAveraging", "NonFiniteStart", "RobbinsMonro",
           "WhitenedState", "initial_states", "metropolis", "require", "run_chains"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


# -- result ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChainResult:
    """Draws of ``chains`` MCMC chains after warm-up, with their diagnostics.

    Attributes:
        samples: ndarray ``(chains, draws, ny, nx)`` float64.
        log_prob: ndarray ``(chains, draws)``, the posterior's ``log_prob`` of each draw.
        acceptance: ndarray ``(chains,)``, mean acceptance probability after warm-up.
        nfs: forward solves used in total (warm-up included; one per chain per evaluation).
        step_size: the frozen step size after warm-up (``beta`` for pCN).
        wall_time: seconds.
        method: ``"pcn"``, ``"mala"`` or ``"hmc"``.
        warmup: warm-up iterations (not stored).
        failed: target evaluations that were not finite (failed solves, mostly of rejected
            proposals).
    """

    samples: np.ndarray
    log_prob: np.ndarray
    acceptance: np.ndarray
    nfs: int
    step_size: float
    wall_time: float
    method: str
    warmup: int
    failed: int = 0

    @classmethod
    def of_draws(cls, samples, log_prob):
        """Draws ``(chains, draws, ...)`` and their log targets alone, for their diagnostics
        (:meth:`summaries`, :meth:`rhat`, :meth:`ess`)."""
        return cls(samples, log_prob, np.ones(samples.shape[0]), 0, 0.0, 0.0, "", 0)

    @property
    def beta(self):
        """pCN name of :attr:`step_size`."""
        return self.step_size

    def flat(self, *, burn=0):
        """Draws of all chains pooled, ``(chains * (draws - burn), ny, nx)``."""
        return self.samples[:, burn:].reshape(-1, *self.samples.shape[2:])

    def summaries(self, *, burn=0, max_cells=256, components=8):
        """Scalar summaries ``(chains, n, k)`` used by :meth:`rhat` and :meth:`ess`.

        All cells and ``log_prob`` when there are at most ``max_cells`` cells; otherwise
        ``log_prob`` and the projections on the ``components`` leading principal directions of
        the pooled draws.
        """
        x = self.samples[:, burn:]
        chains, draws = x.shape[:2]
        cells = x.reshape(chains, draws, -1)
        if cells.shape[2] > max_cells:
            pooled = cells.reshape(chains * draws, -1)
            centred = pooled - pooled.mean(0)
            rows = centred[:: max(1, centred.shape[0] // 4096)]
            _, _, vt = np.linalg.svd(rows, full_matrices=False)
            cells = (centred @ vt[:components].T).reshape(chains, draws, -1)
        return np.concatenate([cells, self.log_prob[:, burn:, None]], axis=2)

    def rhat(self, *, burn=0, **kwargs):
        """Largest rank-normalised split R-hat over :meth:`summaries` (want below 1.01-1.05)."""
        s = self.summaries(burn=burn, **kwargs)
        return float(np.nanmax([split_rhat(s[:, :, k]) for k in range(s.shape[2])]))

    def ess(self, *, burn=0, **kwargs):
        """Smallest bulk ESS over :meth:`summaries`."""
        s = self.summaries(burn=burn, **kwargs)
        return float(np.nanmin([mcmc_ess(s[:, :, k]) for k in range(s.shape[2])]))

    def cell_ess(self, *, burn=0, rank_normalize=True):
        """ESS of every cell, ndarray ``(ny, nx)``."""
        x = self.samples[:, burn:]
        cells = x.reshape(*x.shape[:2], -1)
        out = [mcmc_ess(cells[:, :, k], rank_normalize=rank_normalize)
               for k in range(cells.shape[2])]
        return np.asarray(out).reshape(x.shape[2:])


# -- step-size adaptation -------------------------------------------------------------------------


class RobbinsMonro:
    r"""Robbins-Monro adaptation of a positive step on the log scale.

    log s_{t+1} = log s_t + t^{-kappa} (a_t - delta), clipped to ``s <= upper``, where a_t is the
    mean acceptance probability of iteration t and delta the target.

    Args:
        initial: starting step ``s_1 > 0``.
        target: target acceptance delta.
        upper: largest allowed step.
        kappa: decay exponent in (1/2, 1].
    """

    def __init__(self, initial, target, *, upper=math.inf, kappa=0.6):
        self.log_step, self.target, self.upper, self.kappa = math.log(initial), target, upper, kappa
        self.t = 0

    @property
    def value(self):
        return math.exp(self.log_step)

    def update(self, accept):
        self.t += 1
        step = self.log_step + self.t ** -self.kappa * (accept - self.target)
        self.log_step = min(step, math.log(self.upper))

    def final(self):
        return self.value


class DualAveraging:
    r"""Dual-averaging step-size adaptation (Hoffman & Gelman 2014, Algorithm 5).

    H_t = (1 - 1/(t + t0)) H_{t-1} + (delta - a_t) / (t + t0),
    log s_t = mu - sqrt(t) H_t / gamma,
    log s~_t = t^{-kappa} log s_t + (1 - t^{-kappa}) log s~_{t-1},

    with mu = log(10 s_0); the iterates s_t are used during warm-up and the average s~ is frozen
    afterwards.

    References:
        Hoffman, Gelman. The No-U-Turn sampler: adaptively setting path lengths in Hamiltonian
        Monte Carlo. JMLR 2014.

    Args:
        initial: starting step ``s_0 > 0``.
        target: target acceptance delta.
        upper: largest allowed step.
    """

    def __init__(self, initial, target, *, upper=math.inf, gamma=0.05, t0=10.0, kappa=0.75):
        self.mu, self.target, self.upper = math.log(10 * initial), target, upper
        self.gamma, self.t0, self.kappa = gamma, t0, kappa
        self.t, self.h_bar, self.log_step, self.log_avg = 0, 0.0, math.log(initial), 0.0

    @property
    def value(self):
        return min(math.exp(self.log_step), self.upper)

    def update(self, accept):
        self.t += 1
        w = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target - accept)
        log_step = self.mu - math.sqrt(self.t) * self.h_bar / self.gamma
        self.log_step = min(log_step, math.log(self.upper))
        eta = self.t ** -self.kappa
        self.log_avg = eta * self.log_step + (1 - eta) * self.log_avg

    def final(self):
        return min(math.exp(self.log_avg), self.upper) if self.t else self.value


# -- targets --------------------------------------------------------------------------------------


class BatchedTarget:
    """Batched log likelihood and log posterior of a posterior on its level, counting solves.

    Args:
        posterior: object with ``log_prob(x)`` on ``(num, ny, nx)``, ``prior`` and ``level``;
            ``log_likelihood(x)`` is used when present, else ``log_prob(x) - prior.log_prob(x)``.
    """

    def __init__(self, posterior):
        self.posterior, self.prior, self.level = posterior, posterior.prior, posterior.level
        self.nfs, self.failed = 0, 0
        self._whitening = None

    def log_likelihood(self, x):
        """``(num,)`` float64 log likelihood, differentiable; counts ``num`` solves and the
        failed ones (non-finite values)."""
        self.nfs += x.shape[0]
        if hasattr(self.posterior, "log_likelihood"):
            value = self.posterior.log_likelihood(x).to(_F64)
        else:
            value = (self.posterior.log_prob(x) - self.prior.log_prob(x, self.level)).to(_F64)
        self.failed += int((~torch.isfinite(value)).sum())
        return value

    def to_z(self, x):
        """White coordinates ``z (num, d)`` of fields ``x``: the kernels' state variable."""
        return self.whitening.to_z(x)

    @property
    def whitening(self):
        if self._whitening is None:
            self._whitening = prior_whitening(self.prior, self.level)
        return self._whitening

    def whitened(self, z):
        """Whitened target at ``z (num, d)``: ``(x, log pi(z), grad log pi(z), log_prob(x))``.

        log pi(z) = log L(y | T(z)) + log N(z; 0, I) and log_prob(x) = log pi(z) - log|det C|.
        Non-finite targets (failed solves) get a zero gradient.
        """
        z = z.detach().requires_grad_(True)
        x = self.whitening.to_x(z)
        value = self.log_likelihood(x) + standard_normal_log_prob(z)
        (grad,) = torch.autograd.grad(torch.where(torch.isfinite(value), value, 0.0).sum(), z)
        grad = torch.where(torch.isfinite(value)[:, None], grad, 0.0)
        return x.detach(), value.detach(), grad, value.detach() - self.whitening.logdet


def metropolis(log_ratio, generator):
    """Accept flags and acceptance probabilities min(1, exp(log_ratio)); NaN ratios are rejected."""
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
    u = torch.rand(log_ratio.shape, generator=generator, dtype=_F64)
    return torch.log(u) < log_ratio, torch.exp(torch.clamp(log_ratio, max=0.0))


def require(condition, message):
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def initial_states(target, init, chains, generator):
    """Starting fields ``(chains, ny, nx)`` float64: ``init`` or prior draws."""
    if init is None:
        return target.prior.sample(chains, target.level, generator=generator, dtype=_F64)
    x = torch.as_tensor(init, dtype=_F64).detach().clone()
    if x.shape[0] != chains:
        raise ValueError(f"init has {x.shape[0]} states for {chains} chains")
    return x


class NonFiniteStart(ValueError):
    """Some chains (``chains``, their indices) start where the target or its gradient is not
    finite: they could never move."""

    def __init__(self, chains, reason=None):
        self.chains = list(chains)
        self.reason = reason
        super().__init__(reason or f"chains {self.chains} start where the log target is not "
                         "finite")


def check_finite_start(log_prob):
    """Raise :class:`NonFiniteStart` if some chain starts where the target is not finite."""
    bad = torch.nonzero(~torch.isfinite(log_prob)).flatten()
    if bad.numel():
        raise NonFiniteStart(bad.tolist())


class WhitenedState:
    """Chain states in a target's coordinates z, with x = T(z) and the target's gradient.

    ``target`` provides ``to_z(x)`` and ``whitened(z) -> (x, log pi(z), grad, log_prob(x))``:
    :class:`BatchedTarget` (the prior's white coordinates) or
    :class:`geoinvert.inference.LatentTarget` (a flow's latent space).
    """

    def __init__(self, target, x):
        self.target = target
        self.z = target.to_z(x).detach()
        self.x, self.value, self.grad, self.log_prob = target.whitened(self.z)
        moving = torch.isfinite(self.grad.reshape(self.grad.shape[0], -1)).all(1)
        check_finite_start(torch.where(moving, self.value, torch.nan))

    def accept(self, flags, z, x, value, grad, log_prob):
        """Move the chains with ``flags`` to the proposed state."""
        rows = flags[:, None]
        self.z, self.grad = torch.where(rows, z, self.z), torch.where(rows, grad, self.grad)
        self.x = torch.where(flags[:, None, None], x, self.x)
        self.value = torch.where(flags, value, self.value)
        self.log_prob = torch.where(flags, log_prob, self.log_prob)


# -- the loop -------------------------------------------------------------------------------------


def run_chains(kernel, adapter, *, method, draws, warmup, thin=1, generator=None, callback=None,
               monitor=None):
    """Warm up (adapting the step), freeze the step, then store every ``thin``-th state.

    Args:
        kernel: object with ``step(size, generator) -> acceptance probabilities (chains,)``,
            the current ``x (chains, ny, nx)``, ``log_prob (chains,)`` and ``target.nfs`` (all
            solves of the run, the initial evaluation included).
        adapter: :class:`RobbinsMonro` or :class:`DualAveraging` (``update``, ``value``,
            ``final``); the mean acceptance probability over chains drives it.
        method: name stored in the result.
        draws, warmup, thin: stored draws, warm-up iterations, iterations per stored draw.
        callback: ``callback(iteration, total, acceptance)`` after every iteration.
        monitor: ``monitor(samples (chains, i, ...), log_prob (chains, i))`` with the draws so
            far, after every tenth of them (e.g. to show the current R-hat).

    Returns:
        :class:`ChainResult`.
    """
    for name, value, low in (("draws", draws, 1), ("warmup", warmup, 0), ("thin", thin, 1)):
        require(int(value) == value and value >= low,
                f"{name} must be an integer >= {low}, got {value!r}")
    start, total = time.perf_counter(), warmup + draws * thin
    for i in range(warmup):
        accept = float(kernel.step(adapter.value, generator).mean())
        adapter.update(accept)
        if callback:
            callback(i + 1, total, accept)
    step = adapter.final()
    logger.info("%s: warm-up done, step %.4g", method, step)
    chains = kernel.x.shape[0]
    samples = np.empty((chains, draws, *kernel.x.shape[1:]))
    log_prob, accept = np.empty((chains, draws)), torch.zeros(chains, dtype=_F64)
    for i in range(draws):
        for j in range(thin):
            prob = kernel.step(step, generator)
            accept += prob
            if callback:
                callback(warmup + i * thin + j + 1, total, float(prob.mean()))
        samples[:, i], log_prob[:, i] = kernel.x.numpy(), kernel.log_prob.numpy()
        if monitor and (i + 1) % max(draws // 10, 1) == 0 and i + 1 >= 4:
            monitor(samples[:, : i + 1], log_prob[:, : i + 1])
    return ChainResult(samples, log_prob, (accept / max(draws * thin, 1)).numpy(),
                       kernel.target.nfs, step,
                       time.perf_counter() - start, method, warmup, kernel.target.failed)
