"""Multi-start Laplace mixture with importance weights: weighted samples of a sharp, multimodal,
low-dimensional posterior (the "standard method" for the coarsest MsIGN stage)."""

import logging
import math
from dataclasses import dataclass

import torch

from geoinvert.samplers.chains import require

__all__ = ["Mode", "LaplaceResult", "find_modes", "laplace_mixture"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


@dataclass
class Mode:
    """A local maximum ``x (n, n)`` of log q with its value ``log_q`` and the Hessian of
    -log q there, ``hessian (d, d)`` (positive definite), d = n * n."""

    x: torch.Tensor
    log_q: float
    hessian: torch.Tensor

    @property
    def log_mass(self) -> float:
        """Laplace estimate of log int q over the mode: log q(m) + d/2 log 2 pi - 1/2 log det H."""
        dim = self.hessian.shape[0]
        return (self.log_q + 0.5 * dim * math.log(2 * math.pi)
                - 0.5 * float(torch.linalg.slogdet(self.hessian)[1]))


@dataclass
class LaplaceResult:
    """Weighted samples ``x (num, n, n)`` (normalised weights ``w``, target values ``log_q``,
    float64), the modes of the mixture, each mode's importance-weighted mass ``mode_mass (k,)``
    (the weight of the samples it is the most responsible component for), the mixture's log
    evidence estimate ``log_evidence`` and the target evaluations spent."""

    x: torch.Tensor
    w: torch.Tensor
    log_q: torch.Tensor
    modes: list
    mode_mass: torch.Tensor
    log_evidence: float
    evaluations: int

    @property
    def ess(self) -> float:
        """Kish ESS fraction of the weights."""
        return float(1.0 / self.w.square().sum() / self.w.numel())


def _maximise(grad_log_prob, start, max_iter, gtol, max_eval):
    """L-BFGS (strong Wolfe) ascent on log q from ``start (n, n)`` with at most ``max_eval`` + 1
    target calls: ``(x, log q, |grad|_inf, evaluations)``."""
    x = start.detach().to(_F64).clone().requires_grad_(True)
    calls = [0]
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, max_eval=max_eval,
                                  tolerance_grad=gtol, tolerance_change=1e-14,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        value, grad = grad_log_prob(x.detach()[None])
        calls[0] += 1
        if not torch.isfinite(value).all():          # failed solve: repel the line search
            x.grad = torch.zeros_like(x)
            return torch.tensor(math.inf, dtype=_F64)
        x.grad = -grad[0].to(_F64)
        return -value[0].to(_F64)

    optimizer.step(closure)
    value, grad = grad_log_prob(x.detach()[None])
    return x.detach(), float(value[0]), float(grad.abs().max()), calls[0] + 1


def _hessian(grad_log_prob, x, step):
    """Hessian of -log q at ``x (n, n)`` by central differences of the gradient (2 d target
    calls in one batch), symmetrised: ``(d, d)`` float64."""
    dim = x.numel()
    basis = step * torch.eye(dim, dtype=_F64).reshape(dim, *x.shape)
    points = torch.cat((x[None] + basis, x[None] - basis))
    grad = grad_log_prob(points)[1].to(_F64).reshape(2 * dim, dim)
    hessian = -(grad[:dim] - grad[dim:]) / (2 * step)
    return 0.5 * (hessian + hessian.T)


def find_modes(grad_log_prob, starts, *, max_iter=200, gtol=1e-6, step=1e-4, separation=3.0,
               max_evaluations=math.inf):
    r"""Local maxima of log q from several starts, with their Hessians.

    Each start is maximised by L-BFGS; the end points are taken by decreasing log q, and one is
    a new mode unless it lies within ``separation`` standard deviations of a mode already kept
    (Mahalanobis distance sqrt((x - m)^T H (x - m)) with that mode's Hessian H) or its Hessian
    is not positive definite (a saddle or an unconverged point, left out with a log message).

    Args:
        grad_log_prob: ``f(x) -> (log q (num,), d log q / dx (num, n, n))`` for a batch.
        starts: ``(m, n, n)`` starting points (e.g. prior draws).
        max_iter: L-BFGS iterations per start.
        gtol: Stop when the largest gradient entry is below it.
        step: Finite-difference step of the Hessian (in the units of x).
        separation: Mahalanobis distance within which two end points are the same mode.
        max_evaluations: Cap on the target calls: later starts are skipped (and Hessians left
            out) rather than exceed it.

    Returns:
        ``(modes, evaluations)``: :class:`Mode` list by decreasing log q (possibly empty) and
        the target calls spent (one per sample).
    """
    require(starts.ndim == 3 and starts.shape[0] >= 1, "starts must have shape (m, n, n)")
    ends, evaluations = [], 0
    hessian_calls = 2 * starts[0].numel()
    for start in starts:
        budget = min(2 * max_iter, max_evaluations - evaluations - hessian_calls - 1)
        if budget < 10:
            break
        x, value, gmax, calls = _maximise(grad_log_prob, start, max_iter, gtol, int(budget))
        evaluations += calls
        if math.isfinite(value):
            ends.append((value, x, gmax))
    ends.sort(key=lambda e: -e[0])
    modes = []
    for value, x, gmax in ends:
        if any(_distance(x, mode) < separation for mode in modes):
            continue
        if evaluations + hessian_calls > max_evaluations:
            break
        hessian = _hessian(grad_log_prob, x, step)
        evaluations += 2 * x.numel()
        if not torch.isfinite(hessian).all() or torch.linalg.eigvalsh(hessian)[0] <= 0:
            logger.info("end point with log q %.4g (largest gradient %.2g) has a Hessian that is "
                        "not positive definite: not a mode, left out", value, gmax)
            continue
        modes.append(Mode(x, value, hessian))
    return modes, evaluations


def _distance(x, mode):
    delta = (x - mode.x).reshape(-1)
    return math.sqrt(abs(float(delta @ mode.hessian @ delta)))


class _Mixture:
    """The proposal sum_k pi_k N(m_k, s^2 H_k^{-1}), pi_k propto the Laplace masses."""

    def __init__(self, modes, inflation):
        self.means = torch.stack([m.x.reshape(-1) for m in modes])
        self.chol = torch.linalg.cholesky(torch.stack([m.hessian for m in modes]))  # H = L L^T
        self.log_pi = torch.log_softmax(torch.tensor([m.log_mass for m in modes], dtype=_F64), 0)
        self.inflation, self.shape = inflation, modes[0].x.shape

    def sample(self, num, generator):
        k = torch.multinomial(self.log_pi.exp(), num, replacement=True, generator=generator)
        z = torch.randn((num, self.means.shape[1], 1), generator=generator, dtype=_F64)
        u = torch.linalg.solve_triangular(self.chol[k].transpose(1, 2), z, upper=True)[..., 0]
        return (self.means[k] + self.inflation * u).reshape(num, *self.shape)

    def component_log_prob(self, x):
        """log pi_k + log N(x; m_k, s^2 H_k^{-1}), ``(num, k)``."""
        delta = x.reshape(x.shape[0], 1, -1) - self.means[None]              # (num, k, d)
        u = torch.einsum("kji,nkj->nki", self.chol, delta) / self.inflation  # L^T delta / s
        dim = delta.shape[2]
        log_det = torch.log(torch.diagonal(self.chol, dim1=1, dim2=2)).sum(1) \
            - dim * math.log(self.inflation)
        return (self.log_pi + log_det - 0.5 * u.square().sum(2)
                - 0.5 * dim * math.log(2 * math.pi))


def laplace_mixture(grad_log_prob, log_prob, starts, num, *, generator=None, inflation=1.5,
                    max_iter=200, gtol=1e-6, step=1e-4, separation=3.0,
                    max_evaluations=math.inf):
    r"""Weighted samples of q from a mixture of Laplace approximations at its modes.

    The modes m_k of log q are found from ``starts`` (:func:`find_modes`); the proposal is

    .. math:: s(x) = \sum_k \pi_k\, \mathcal N(x;\, m_k,\, s^2 H_k^{-1}),\quad
        \pi_k \propto q(m_k)\, |H_k / 2\pi|^{-1/2},

    H_k the Hessian of -log q at m_k and s = ``inflation`` (tails wider than the Gaussian
    approximation keep the weights bounded), and ``num`` draws from it get self-normalised
    importance weights q / s. The weights correct both each mode's shape and the Laplace mode
    masses pi_k, so the mode masses are estimated from the target, not the approximation.

    For a low-dimensional posterior sharp enough that importance sampling from the prior keeps
    a handful of effective samples and tempered SMC moves cannot equilibrate within its modes
    (the 2 x 2 level of ``cases/elliptic_bimodal.yaml``; numbers in ``docs/notes/mode-loss.md``).
    Only modes reached from some start are represented: use enough starts spread over the
    prior.

    Args:
        grad_log_prob: ``f(x) -> (log q, d log q / dx)`` for a batch ``(num, n, n)``.
        log_prob: ``f(x) -> log q (num,)`` (no gradient) for the importance weights.
        starts: ``(m, n, n)`` starting points of the mode search.
        num: Importance samples.
        generator: ``torch.Generator`` of the draws.
        inflation: Scale s > 0 of the components' covariances.
        max_iter, gtol, step, separation: of :func:`find_modes`.
        max_evaluations: Cap on all target calls: the search stops short of it and the
            importance draws are cut to what is left.

    Returns:
        :class:`LaplaceResult`.

    Raises:
        ValueError: no start reached a mode, or every importance sample failed.
    """
    require(int(num) == num and num >= 2, f"num must be an integer >= 2, got {num!r}")
    require(inflation > 0, f"inflation must be > 0, got {inflation!r}")
    modes, evaluations = find_modes(grad_log_prob, starts, max_iter=max_iter, gtol=gtol,
                                    step=step, separation=separation,
                                    max_evaluations=max_evaluations - 2)
    capped = "" if math.isinf(max_evaluations) else f" within {max_evaluations} evaluations"
    require(bool(modes), f"none of the {starts.shape[0]} starts reached a mode (a point with a "
            f"finite target and a positive definite Hessian){capped}")
    num = int(min(num, max_evaluations - evaluations))
    mixture = _Mixture(modes, inflation)
    x = mixture.sample(num, generator)
    with torch.no_grad():
        log_q = log_prob(x).to(_F64)
    evaluations += num
    components = mixture.component_log_prob(x)
    log_w = torch.where(torch.isfinite(log_q), log_q - torch.logsumexp(components, 1),
                        torch.full_like(log_q, -math.inf))
    require(bool(torch.isfinite(log_w).any()), "every importance sample's target evaluation "
            "failed")
    w = torch.softmax(log_w, 0)
    owner = components.argmax(1)
    mass = torch.zeros(len(modes), dtype=_F64).index_add_(0, owner, w)
    log_evidence = float(torch.logsumexp(log_w, 0)) - math.log(num)
    logger.info("Laplace mixture: %d modes from %d starts, masses %s, importance ESS %.3f",
                len(modes), starts.shape[0], [round(float(m), 3) for m in mass],
                float(1.0 / w.square().sum() / num))
    return LaplaceResult(x, w, torch.where(torch.isfinite(log_q), log_q, -math.inf), modes,
                         mass, log_evidence, evaluations)
