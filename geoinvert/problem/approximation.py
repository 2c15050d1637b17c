r"""Coarse levels' likelihoods that allow for their forward models' discretisation error.

The coarse-to-fine training of MsIGN fits level l's posterior with level l's forward model
F_l, on a coarser lattice and mesh than the finest F_L. When F_L(x) - F_l(A x) (A the pooling
to level l) is large against the noise, the coarse posterior is much sharper than what the
coarse model can know and sits elsewhere than the fine one, so the flow that the next stage
starts from covers the wrong region (on the demo case the level-2 error is about 7 noise
standard deviations). The *Bayesian approximation error* approach (Kaipio and Somersalo)
treats the error e_l = F_L(x) - F_l(A x) as a further Gaussian noise, whose mean and
variance are estimated from prior draws:

.. math:: y \approx F_l(A x) + \mu_l + \eta, \qquad \eta \sim N(0, \Gamma + \mathrm{diag}\,
          \sigma_l^2),

so level l's posterior uses the data ``y - mu_l`` and the noise ``sqrt(noise^2 + sigma_l^2)``
(a diagonal error covariance: every consumer of the noise keeps its form). Where the coarse
model is accurate the change vanishes; the finest level, the target of the correction, is
never changed, so the answer stays exact and only the training's warm starts improve.

Reference:
    Kaipio, Somersalo. Statistical inverse problems: discretization, model reduction and
    inverse crimes. J. Comput. Appl. Math. 198 (2007) 493-504.
"""

import dataclasses
import logging

import numpy as np

__all__ = ["ERROR_DRAWS", "ApproximationError", "approximation_errors",
           "with_approximation_errors"]

logger = logging.getLogger(__name__)

ERROR_DRAWS = 256
"""Prior draws for the error statistics: the relative error of a variance estimate is then
sqrt(2 / 256) = 9 %, and the cost a few hundred solves per level."""


@dataclasses.dataclass(frozen=True)
class ApproximationError:
    """Mean and standard deviation ``(n_obs,)`` of F_L(x) - F_l(A x) over prior draws on a
    level, and the number of draws whose solves all succeeded."""

    level: int
    mean: np.ndarray
    std: np.ndarray
    draws: int

    def ratio(self, noise):
        """Root mean square of ``std / noise``: the error in noise units."""
        return float(np.sqrt(np.mean((self.std / noise) ** 2)))


def approximation_errors(posteriors, *, draws=ERROR_DRAWS, generator=None, ensemble=None):
    """The error statistics of every coarse level's forward model against the finest.

    ``draws`` fields are drawn from the finest level's prior (the same on every rank), pooled
    to each coarser level, and each solve group evaluates its block of them.

    Args:
        posteriors: ``{level: Posterior}`` with the finest level the largest key.
        draws: prior draws.
        generator: ``torch.Generator`` of the draws.
        ensemble: the ensemble communicator (None: one solve group).

    Returns:
        ``({level: ApproximationError}, solves)``: no entry for a level whose error could not
        be estimated (fewer than half of the draws solved), and the solves this rank's group
        made.
    """
    import torch
    from geoinvert.hierarchy import pool
    from geoinvert.parallel import Ensemble, in_chunks
    ens = Ensemble(ensemble)
    finest = max(posteriors)
    coarse = sorted((l for l in posteriors if l < finest), reverse=True)
    if not coarse:
        return {}, 0
    fine = posteriors[finest]
    with torch.no_grad():
        x = fine.prior.sample(draws, finest, generator=generator).to(torch.float64)
        mine = x[ens.part(draws)]
        solves = mine.shape[0] * (1 + len(coarse))
        predictions = [in_chunks(fine.forward, mine).to(torch.float64)]
        for level in coarse:
            mine = pool(mine)
            predictions.append(in_chunks(posteriors[level].forward, mine).to(torch.float64))
        predictions = [ens.gather(p).numpy() for p in predictions]
    errors = {}
    for level, pred in zip(coarse, predictions[1:]):
        e = predictions[0] - pred
        ok = np.isfinite(e).all(axis=1)
        if ok.sum() < draws / 2:
            logger.warning("the discretisation error of level %d could not be estimated (%d "
                           "of %d prior draws failed to solve); its posterior uses the noise "
                           "as given", level, int((~ok).sum()), draws)
            continue
        e = e[ok]
        errors[level] = ApproximationError(level, e.mean(0), e.std(0, ddof=1), int(ok.sum()))
    return errors, solves


def with_approximation_errors(posteriors, errors):
    """``posteriors`` with each coarse level's data shifted by its error mean and its noise
    widened by its error std (levels without an entry in ``errors`` unchanged)."""
    from geoinvert.problem.posterior import Posterior
    out = dict(posteriors)
    for level, err in errors.items():
        p = posteriors[level]
        out[level] = Posterior(p.prior, p.forward, p.data - err.mean,
                               np.sqrt(p.noise ** 2 + err.std ** 2), level)
    return out
