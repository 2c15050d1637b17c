"""Prior-preconditioned Metropolis-adjusted Langevin algorithm (MALA) in whitened coordinates."""

import torch

from geoinvert.samplers.chains import (BatchedTarget, DualAveraging, WhitenedState,
                                       initial_states, metropolis, require, run_chains)

__all__ = ["run_mala"]


class MALAKernel(WhitenedState):
    r"""One MALA step on pi(z) = L(y | T(z)) N(z; 0, I) for a batch of chains.

    z' = z + (h^2 / 2) grad log pi(z) + h xi, xi ~ N(0, I), accepted with the Metropolis-Hastings
    ratio pi(z') q(z | z') / (pi(z) q(z' | z)), q(. | z) = N(z + h^2/2 grad log pi(z), h^2 I).
    In x this is MALA preconditioned by the prior covariance, C C^T = Sigma.
    """

    def step(self, h, generator):
        drift = self.z + 0.5 * h ** 2 * self.grad
        z = drift + h * torch.randn(self.z.shape, generator=generator, dtype=self.z.dtype)
        x, value, grad, log_prob = self.target.whitened(z)
        back = z + 0.5 * h ** 2 * grad
        log_q = ((z - drift).square().sum(1) - (self.z - back).square().sum(1)) / (2 * h ** 2)
        flags, prob = metropolis(value - self.value + log_q, generator)
        self.accept(flags, z, x, value, grad, log_prob)
        return prob


def run_mala(posterior, *, chains=4, draws=1000, warmup=500, step_size=0.5, target_accept=0.574,
         thin=1, init=None, generator=None, callback=None,
         monitor=None):
    r"""Run ``chains`` prior-preconditioned MALA chains as one batch.

    The chains move in the prior's white coordinates z (x = mu + C z, C C^T = Sigma, see
    :func:`~geoinvert.samplers.whitening.prior_whitening`), where the step size h is of order one
    for a prior-dominated posterior. During ``warmup`` iterations h is adapted by dual averaging
    towards the mean acceptance ``target_accept`` (0.574 is optimal for MALA), then frozen.
    Each step costs one forward and one adjoint solve per chain.

    References:
        Roberts, Tweedie. Exponential convergence of Langevin distributions and their discrete
        approximations. Bernoulli 1996.
        Hoffman, Gelman. The No-U-Turn sampler. JMLR 2014 (dual averaging).

    Args:
        posterior: a :class:`~geoinvert.problem.posterior.Posterior` with a differentiable ``log_prob``.
        chains, draws, warmup, thin: as for :func:`~geoinvert.samplers.pcn.run_pcn`.
        step_size: initial (or, with ``warmup=0``, fixed) h.
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
    target = BatchedTarget(posterior)
    kernel = MALAKernel(target, initial_states(target, init, chains, generator))
    adapter = DualAveraging(step_size, target_accept)
    return run_chains(kernel, adapter, method="mala", draws=draws, warmup=warmup, thin=thin,
                      generator=generator, callback=callback, monitor=monitor)
