"""Preconditioned Crank-Nicolson (pCN) MCMC, the prior-reversible reference sampler."""

import math

import torch

from geoinvert.samplers.chains import (BatchedTarget, RobbinsMonro, check_finite_start,
                                       initial_states, metropolis, require, run_chains)

__all__ = ["run_pcn"]

_F64 = torch.float64


class PCNKernel:
    r"""One pCN step for a batch of chains.

    x' = mu + sqrt(1 - beta^2) (x - mu) + beta xi,  xi ~ N(0, Sigma), accepted with probability
    min(1, L(y | x') / L(y | x)). The proposal is reversible with respect to the prior, so only
    the likelihood ratio enters and the acceptance does not degenerate under mesh refinement.
    """

    def __init__(self, target, x):
        self.target, self.x = target, x
        self.mean = torch.as_tensor(target.prior.mean(target.level), dtype=_F64)
        self.log_lik = target.log_likelihood(x).detach()
        check_finite_start(self.log_lik)
        self.log_prob = self._log_prob(x, self.log_lik)

    def _log_prob(self, x, log_lik):
        return log_lik + self.target.prior.log_prob(x, self.target.level).detach().to(_F64)

    def step(self, beta, generator):
        xi = self.target.prior.sample(self.x.shape[0], self.target.level, generator=generator,
                                      dtype=_F64) - self.mean
        prop = self.mean + math.sqrt(1 - beta ** 2) * (self.x - self.mean) + beta * xi
        with torch.no_grad():
            log_lik = self.target.log_likelihood(prop)
        accept, prob = metropolis(log_lik - self.log_lik, generator)
        self.x = torch.where(accept[:, None, None], prop, self.x)
        self.log_lik = torch.where(accept, log_lik, self.log_lik)
        self.log_prob = torch.where(accept, self._log_prob(prop, log_lik), self.log_prob)
        return prob


def run_pcn(posterior, *, chains=4, draws=1000, warmup=500, beta=0.2, target_accept=0.25, thin=1,
        init=None, generator=None, callback=None,
        monitor=None):
    r"""Run ``chains`` pCN chains as one batch (one forward evaluation of the batch per step).

    During ``warmup`` iterations beta is adapted by Robbins-Monro on log beta towards the mean
    acceptance ``target_accept`` (capped at beta = 1, an independence sampler from the prior);
    it is then frozen. With ``warmup=0`` beta stays as given.

    References:
        Cotter, Roberts, Stuart, White. MCMC methods for functions: modifying old algorithms to
        make them faster. Statistical Science 2013.

    Args:
        posterior: a :class:`~geoinvert.problem.posterior.Posterior` (or an object with ``log_prob``,
            ``prior``, ``level`` and optionally ``log_likelihood``).
        chains: number of chains.
        draws: stored draws per chain after warm-up.
        warmup: adaptation iterations (discarded).
        beta: initial (or fixed) step in (0, 1].
        target_accept: target mean acceptance probability.
        thin: iterations per stored draw.
        init: starting fields ``(chains, ny, nx)``; default prior draws.
        generator: ``torch.Generator`` for reproducibility.
        callback: ``callback(iteration, total, acceptance)`` after every iteration.
        monitor: ``monitor(samples, log_prob)`` with the draws so far, ten times while
            drawing (see :func:`~geoinvert.samplers.chains.run_chains`).

    Returns:
        :class:`~geoinvert.samplers.chains.ChainResult` with ``step_size`` = beta.
    """
    require(0 < beta <= 1, f"beta must be in (0, 1], got {beta!r}")
    target = BatchedTarget(posterior)
    kernel = PCNKernel(target, initial_states(target, init, chains, generator))
    adapter = RobbinsMonro(beta, target_accept, upper=1.0)
    return run_chains(kernel, adapter, method="pcn", draws=draws, warmup=warmup, thin=thin,
                      generator=generator, callback=callback, monitor=monitor)
