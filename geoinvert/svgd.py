"""Amortized SVGD: an MsIGN network trained to move its samples along the Stein direction."""

import logging
import math

import torch

from geoinvert.parallel import Ensemble, draw_noise

__all__ = ["median_bandwidth", "rbf_kernel", "stein_direction", "asvgd_loss"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


# -- the Stein variational direction --------------------------------------------------------------


def median_bandwidth(particles: torch.Tensor) -> float:
    r"""Median-heuristic bandwidth h = med^2 / log(n + 1) of the RBF kernel exp(-|x - y|^2 / h).

    med is the median of the pairwise distances |x_i - x_j|, i < j, of the ``n`` particles
    ``(n, ...)``, so that the other particles' kernel sum is about n exp(-med^2 / h) =
    n / (n + 1) (Liu & Wang 2016, with log(n + 1) instead of log n to stay defined for two
    particles). h = 1 when n < 2 or all particles coincide (the kernel then does not matter).
    """
    flat = particles.detach().reshape(particles.shape[0], -1).to(_F64)
    n = flat.shape[0]
    if n < 2:
        return 1.0
    dist = torch.pdist(flat)
    med = float(dist.median()) if dist.numel() else 0.0
    return med**2 / math.log(n + 1) if med > 0 else 1.0


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(x_i, y_j) = exp(-|x_i - y_j|^2 / h) of points ``(n, d)`` and ``(m, d)``, ``(n, m)``."""
    return torch.exp(-torch.cdist(x, y).square() / bandwidth)


def stein_direction(x: torch.Tensor, score: torch.Tensor, *, particles: torch.Tensor | None = None,
                    scores: torch.Tensor | None = None,
                    bandwidth: float | None = None) -> torch.Tensor:
    r"""Stein variational direction at points x for a particle set and its scores.

    .. math:: \phi(x_i) = \frac1n \sum_{j=1}^n \big[k(x_j, x_i) \nabla \log q(x_j)
        + \nabla_{x_j} k(x_j, x_i)\big],
        \qquad \nabla_{x_j} k(x_j, x_i) = \tfrac{2}{h} (x_i - x_j) k(x_j, x_i),

    the steepest descent direction of D_KL(p || q) in the unit ball of the RBF kernel's RKHS
    (Liu & Wang 2016), with k(x, y) = exp(-|x - y|^2 / h). The particles x_j, j = 1..n, are the
    whole sample (all ranks' under MPI) and the points x_i may be any subset of them (this
    rank's), so the direction of a distributed sample is its rows computed rank by rank.

    Args:
        x: Points ``(num, ...)`` (e.g. fields ``(num, ny, nx)``).
        score: Their gradients grad log q, same shape (used when ``particles`` is None).
        particles: All particles ``(n, ...)``; default ``x``.
        scores: grad log q at the particles, ``(n, ...)``; default ``score``.
        bandwidth: h; default :func:`median_bandwidth` of the particles.

    Returns:
        phi(x_i), shape and dtype of ``x``, not differentiable (computed in float64 from
        detached inputs).

    References:
        | Stein Variational Gradient Descent (Liu & Wang, 2016), https://arxiv.org/abs/1608.04471
    """
    if particles is None:
        particles, scores = x, score
    n = particles.shape[0]
    h = median_bandwidth(particles) if bandwidth is None else float(bandwidth)
    pts = x.detach().reshape(x.shape[0], -1).to(_F64)
    parts = particles.detach().reshape(n, -1).to(_F64)
    grads = scores.detach().reshape(n, -1).to(_F64)
    k = rbf_kernel(pts, parts, h)                                      # k[i, j] = k(x_j, x_i)
    repulsion = (2 / h) * (pts * k.sum(1, keepdim=True) - k @ parts)
    return ((k @ grads + repulsion) / n).reshape(x.shape).to(x.dtype)


# -- the amortized objective ----------------------------------------------------------------------


def asvgd_loss(model, posterior, batch, generator=None, *, ensemble=None):
    r"""Amortized SVGD surrogate loss of ``batch`` model samples x_i = G(z_i) (Feng et al. 2017).

    .. math:: L(\theta) = -\frac1n \sum_i \langle \phi(x_i), G_\theta(z_i) \rangle,
        \qquad \nabla_\theta L = -\frac1n \sum_i (\partial_\theta G_\theta(z_i))^T \phi(x_i),

    with phi the :func:`stein_direction` of the sample, held fixed: a gradient step moves each
    x_i along phi(x_i), as one SVGD step would move the particle. The scores grad log q come from
    ``posterior.grad_log_prob`` (adjoint gradients, one forward solve per sample). Samples whose
    target value or gradient is not finite (failed solves) are left out of the particle set.

    Every rank draws the noise of the whole batch from ``generator`` and keeps its block, so a
    seed gives the same samples on any number of ranks; the particles and scores (small) are
    gathered on every rank for the kernel sums.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` at the stage of ``posterior.level``.
        posterior: Target with ``level`` and ``grad_log_prob(x)``.
        batch: Samples over all ranks.
        generator: Noise source (in step on every rank).
        ensemble: :class:`~geoinvert.parallel.Ensemble` (default: one process).

    Returns:
        ``(loss, stats)``: this rank's differentiable part of L (sum over ranks = L) and
        ``{"loss", "ess", "nfs", "failed"}``: ``loss`` is the mean squared norm of the Stein
        direction (1/n) sum_i |phi(x_i)|^2, zero at an SVGD fixed point; ``ess`` is NaN.
    """
    ens = ensemble or Ensemble()
    x, _ = model.decode(draw_noise(model, posterior.level, batch, generator, ens))
    log_q, score = posterior.grad_log_prob(x.detach().to(_F64))
    ok = torch.isfinite(log_q) & torch.isfinite(score).flatten(1).all(1)
    particles = ens.gather(x.detach()[ok].to(_F64))
    scores = ens.gather(score[ok].to(_F64))
    n = particles.shape[0]
    stats = {"loss": math.nan, "ess": math.nan, "nfs": batch, "failed": batch - n}
    if n == 0:
        return x.sum() * math.nan, stats
    phi = stein_direction(x.detach()[ok].to(_F64), score[ok], particles=particles, scores=scores)
    (square,) = ens.sum(float(phi.square().sum()))
    stats["loss"] = square / n
    return -(phi.to(x.dtype) * x[ok]).sum() / n, stats
