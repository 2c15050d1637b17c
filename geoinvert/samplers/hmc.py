"""Hamiltonian Monte Carlo with a fixed number of leapfrog steps, in whitened coordinates."""

import torch

from geoinvert.samplers.chains import (BatchedTarget, DualAveraging, WhitenedState,
                                       initial_states, metropolis, require, run_chains)

__all__ = ["run_hmc"]


class HMCKernel(WhitenedState):
    r"""One HMC transition on pi(z) = L(y | T(z)) N(z; 0, I) for a batch of chains (unit mass).

    H(z, p) = -log pi(z) + |p|^2 / 2, p ~ N(0, I); ``n_leapfrog`` leapfrog steps of size
    eps (1 + jitter u), u ~ U(-1, 1) per chain and transition, then accept with probability
    min(1, exp(H_0 - H_1)). A chain whose trajectory meets a non-finite target (failed solve) is
    rejected; the rule is symmetric under reversal of the trajectory, so detailed balance holds.
    """

    def __init__(self, target, x, *, n_leapfrog, jitter):
        super().__init__(target, x)
        self.n_leapfrog, self.jitter = n_leapfrog, jitter

    def step(self, eps, generator):
        num, dtype = self.z.shape[0], self.z.dtype
        u = 2 * torch.rand(num, 1, generator=generator, dtype=dtype) - 1
        eps = eps * (1 + self.jitter * u)
        p0 = torch.randn(self.z.shape, generator=generator, dtype=dtype)
        z, grad, p = self.z, self.grad, p0 + 0.5 * eps * self.grad
        finite = torch.ones(num, dtype=torch.bool)
        for k in range(self.n_leapfrog):
            z = z + eps * p
            x, value, grad, log_prob = self.target.whitened(z)
            finite &= torch.isfinite(value)
            p = p + (eps if k < self.n_leapfrog - 1 else 0.5 * eps) * grad
        log_ratio = value - self.value - 0.5 * (p.square().sum(1) - p0.square().sum(1))
        flags, prob = metropolis(torch.where(finite, log_ratio, -torch.inf), generator)
        self.accept(flags, z, x, value, grad, log_prob)
        return prob


def run_hmc(posterior, *, chains=4, draws=1000, warmup=500, step_size=0.2, n_leapfrog=10,
        jitter=0.2, target_accept=0.8, thin=1, init=None, generator=None, callback=None,
        monitor=None):
    r"""Run ``chains`` prior-preconditioned HMC chains as one batch.

    The chains move in the prior's white coordinates z (x = mu + C z, C C^T = Sigma, so the unit
    mass matrix in z is the prior precision as mass matrix in x). Each transition integrates
    ``n_leapfrog`` leapfrog steps (one forward and one adjoint solve per chain each); the step is
    jittered by a factor in [1 - jitter, 1 + jitter] to avoid periodic trajectories. During
    ``warmup`` the step is adapted by dual averaging towards ``target_accept``, then frozen.

    References:
        Neal. MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo 2011.
        Hoffman, Gelman. The No-U-Turn sampler: adaptively setting path lengths in Hamiltonian
        Monte Carlo. JMLR 2014 (dual averaging).

    Args:
        posterior: a :class:`~geoinvert.problem.posterior.Posterior` with a differentiable ``log_prob``.
        chains, draws, warmup, thin: as for :func:`~geoinvert.samplers.pcn.run_pcn`.
        step_size: initial (or, with ``warmup=0``, fixed) leapfrog step eps.
        n_leapfrog: leapfrog steps per transition.
        jitter: relative step jitter in [0, 1).
        target_accept: target mean acceptance probability.
        init: starting fields ``(chains, ny, nx)``; default prior draws.
        generator: ``torch.Generator``.
        callback: ``callback(iteration, total, acceptance)`` after every iteration.
        monitor: ``monitor(samples, log_prob)`` with the draws so far, ten times while
            drawing (see :func:`~geoinvert.samplers.chains.run_chains`).

    Returns:
        :class:`~geoinvert.samplers.chains.ChainResult`.
    """
    require(step_size > 0, f"step_size must be positive, got {step_size!r}")
    require(int(n_leapfrog) == n_leapfrog >= 1,
            f"n_leapfrog must be an integer >= 1, got {n_leapfrog!r}")
    require(0 <= jitter < 1, f"jitter must be in [0, 1), got {jitter!r}")
    target = BatchedTarget(posterior)
    x = initial_states(target, init, chains, generator)
    kernel = HMCKernel(target, x, n_leapfrog=n_leapfrog, jitter=jitter)
    adapter = DualAveraging(step_size, target_accept)
    return run_chains(kernel, adapter, method="hmc", draws=draws, warmup=warmup, thin=thin,
                      generator=generator, callback=callback, monitor=monitor)
