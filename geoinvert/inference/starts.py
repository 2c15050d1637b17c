"""Starts of a training stage: weighted samples of the stage's own posterior drawn once (the
first stages of multi-stage training fit them by the forward KL before their flow can propose):
importance sampling from the prior, tempered SMC, or a Laplace mixture at the modes.
"""

import math
from dataclasses import dataclass

import torch

from geoinvert.errors import TrainingError
from geoinvert.flows.msign import standard_normal_log_prob
from geoinvert.parallel import Ensemble, in_chunks
from geoinvert.samplers.laplace import laplace_mixture
from geoinvert.samplers.smc import tempered_smc

__all__ = ["ImportancePool", "importance_pool", "smc_pool", "laplace_pool"]

_F64 = torch.float64


@dataclass
class ImportancePool:
    """Weighted samples of a target from the prior, drawn once: ``x (m, n, n)``, normalised
    importance weights ``w (m,)`` and target log densities ``log_q (m,)`` (float64)."""

    x: torch.Tensor
    w: torch.Tensor
    log_q: torch.Tensor

    @property
    def ess(self) -> float:
        """Kish ESS fraction of the weights."""
        return float(1.0 / self.w.square().sum() / self.w.numel())


def importance_pool(model, posterior, size, generator=None, ensemble=None):
    r"""Samples of q_l by importance sampling from the prior of level l (every F = identity).

    The "standard method" for the coarsest stage (4 dimensions): ``size`` prior draws, weights
    w_i propto q~(x_i) / rho(x_i), self-normalised; failed solves get weight 0. Costs ``size``
    target evaluations once, shared out over the ranks of ``ensemble``; every rank gets the
    whole pool.
    """
    ens = ensemble or Ensemble()
    with torch.no_grad():
        zs = model.sample_noise(size, posterior.level, generator=generator)
        x, logdet = model.decode(zs, upto=0)
        log_prior = standard_normal_log_prob(zs).to(_F64) - logdet.to(_F64)
        log_q = ens.map(lambda mine: in_chunks(lambda b: posterior.log_prob(b.to(_F64)).to(_F64),
                                               mine), x)
    log_w = torch.where(torch.isfinite(log_q), log_q - log_prior, -math.inf)
    if not torch.isfinite(log_w).any():
        raise TrainingError(f"every target evaluation of the level-{posterior.level} "
                            "importance pool failed")
    return ImportancePool(x, torch.softmax(log_w, 0), log_q)


def smc_pool(model, posterior, size, generator=None, ensemble=None, *,
             max_evaluations=math.inf):
    r"""Samples of q_l by tempered SMC (:func:`~geoinvert.samplers.smc.tempered_smc`) with
    ``size`` particles, as a pool: a standard method for a sharp q_1 (4 dimensions), where
    importance sampling from the prior keeps a handful of effective samples.

    Target evaluations are shared out over the ranks of ``ensemble``; every rank gets the whole
    pool (one seed gives the same pool on any number of ranks).

    Returns:
        ``(pool, result)``: the :class:`ImportancePool` (fields in the model's dtype) and the
        :class:`~geoinvert.samplers.smc.SMCResult` (``evaluations``: target calls made).
    """
    ens = ensemble or Ensemble()

    def log_likelihood(x):
        return ens.map(lambda mine: posterior.log_likelihood(mine).to(_F64), x)

    try:
        result = tempered_smc(log_likelihood, posterior.prior, posterior.level, size,
                              generator=generator, max_evaluations=max_evaluations)
    except ValueError as err:
        raise TrainingError(f"level-{posterior.level} SMC pool: {err}") from err
    log_q = posterior.prior.log_prob(result.x, posterior.level).detach().to(_F64) + result.log_lik
    return ImportancePool(result.x.to(model.dtype), result.w, log_q), result


def laplace_pool(model, posterior, size, generator=None, ensemble=None, *, starts=16,
                 max_evaluations=math.inf):
    r"""Samples of q_l from a mixture of Laplace approximations at its modes, as a pool
    (:func:`~geoinvert.samplers.laplace.laplace_mixture`): ``starts`` prior draws are maximised
    by L-BFGS, and ``size`` draws of the mixture get importance weights. A standard method for
    a sharp, multimodal q_1 (4 dimensions): the modes are found by optimisation rather than by
    chance, and the weights fix their masses.

    The mode search runs on every rank in step (each target call evaluated by the rank that
    owns it); the importance samples are shared out over the ranks of ``ensemble``. Every rank
    gets the whole pool. ``max_evaluations`` caps the target calls of search and draws.

    Returns:
        ``(pool, result)``: the :class:`ImportancePool` (fields in the model's dtype) and the
        :class:`~geoinvert.samplers.laplace.LaplaceResult` (``evaluations``: target calls).
    """
    ens = ensemble or Ensemble()

    def grad_log_prob(x):
        return ens.map(lambda mine: tuple(v.to(_F64) for v in
                                          posterior.grad_log_prob(mine.to(_F64))), x)

    def log_prob(x):
        return ens.map(lambda mine: posterior.log_prob(mine.to(_F64)).to(_F64), x)

    level = posterior.level
    x0 = posterior.prior.sample(starts, level, generator=generator, dtype=_F64)
    try:
        result = laplace_mixture(grad_log_prob, log_prob, x0, size, generator=generator,
                                 max_evaluations=max_evaluations)
    except ValueError as err:
        raise TrainingError(f"level-{level} Laplace pool: {err}") from err
    return ImportancePool(result.x.to(model.dtype), result.w, result.log_q), result
