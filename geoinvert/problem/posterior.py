"""The inverse problem on one level: a prior, a Gaussian likelihood, and their posterior.

:class:`Posterior` = prior x :class:`GaussianLikelihood`; any prior with the :class:`Prior`
interface (the Gaussian multiscale priors of :mod:`geoinvert.priors`, or a learned one) can be
used.
"""

import logging
import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["Prior", "GaussianLikelihood", "Posterior"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Prior(Protocol):
    """What a posterior needs of a prior on the lattice hierarchy.

    ``sample(num, level, *, generator=None) -> Tensor (num, n, n)`` draws fields of a level,
    and ``log_prob(x, level) -> Tensor (num,)`` is their normalised log density,
    differentiable in ``x``. :class:`~geoinvert.priors.GaussianPrior` implements it (and more:
    exact covariances, whitening, the prior conditioning layers, which MsIGN and the Laplace
    approximation use).
    """

    def sample(self, num, level, *, generator=None):
        ...

    def log_prob(self, x, level):
        ...


class GaussianLikelihood:
    """y = F(x) + e, e ~ N(0, diag(noise^2)): the data, the noise and the forward model.

    ``log_likelihood(x) = -1/2 sum_k ((y_k - F_k(x)) / noise_k)^2 - sum_k log noise_k
    - n_obs/2 log(2 pi)``, normalised; a field whose prediction is not finite (a failed solve)
    gets ``-inf`` and a zero gradient, the others are unaffected.

    Args:
        forward: forward model: Tensor ``(num, ny, nx) -> (num, n_obs)``, differentiable, with
            attribute ``n_obs``.
        data: observations ``y``, ``(n_obs,)``.
        noise: observation std, scalar or ``(n_obs,)``, all ``> 0``.

    Raises:
        ValueError: data length differs from ``forward.n_obs``, data not finite, or noise not
            positive and finite (or of the wrong length).
    """

    def __init__(self, forward, data, noise):
        self.forward = forward
        self.data = _checked_data(data, forward.n_obs)
        self.noise = _checked_noise(noise, self.data.size)
        self._log_norm = -float(np.log(self.noise).sum()) - 0.5 * self.data.size * math.log(2 * math.pi)

    @property
    def n_obs(self):
        return self.data.size

    def __call__(self, x):
        """Log likelihood ``(num,)`` of fields ``x (num, ny, nx)``, float64."""
        return self.of_predictions(self.forward(x).to(torch.float64))

    def of_predictions(self, pred):
        """Log likelihood ``(num,)`` (float64) of predictions ``pred (num, n_obs)``."""
        y = torch.as_tensor(self.data)
        bad = ~torch.isfinite(pred).all(dim=1)
        # mask the *inputs* of the misfit so failed rows carry no NaN into the backward pass
        safe = torch.where(bad[:, None], y, pred)
        misfit = ((safe - y) / torch.as_tensor(self.noise)).square().sum(dim=1)
        value = torch.where(bad, torch.full_like(misfit, -math.inf), self._log_norm - 0.5 * misfit)
        if bad.any():
            logger.debug("%d of %d samples have non-finite predictions", int(bad.sum()), bad.numel())
        return value

    @torch.no_grad()
    def simulate(self, x, generator=None):
        """Synthetic data ``y = F(x) + e`` ``(num, n_obs)`` float64 of fields ``x``, with fresh
        noise from ``generator`` (NaN rows where a solve failed)."""
        pred = self.forward(torch.as_tensor(x)).to(torch.float64)
        e = torch.randn(pred.shape, generator=generator, dtype=torch.float64)
        return pred + e * torch.as_tensor(self.noise)


class Posterior:
    """Posterior ``q_l(x) propto rho_l(x) N(y; F_l(x), diag(noise^2))`` on level ``l``.

    ``log_prob(x) = prior.log_prob(x, level) + log_likelihood(x)`` with the normalised Gaussian
    likelihood

        log L(y | x) = -1/2 sum_k ((y_k - F_k(x)) / noise_k)^2 - sum_k log noise_k - n_obs/2 log(2 pi),

    so ``log_prob - log(exact posterior) = log p(y)``, the log evidence. A sample whose prediction
    is not finite (failed solve) gets ``-inf`` and a zero likelihood gradient; the other samples'
    values and gradients are unaffected.

    Args:
        prior: a :class:`Prior` (``sample``, ``log_prob(x, level)``).
        forward: forward model on ``level`` (see :class:`GaussianLikelihood`), or a
            :class:`GaussianLikelihood` (then ``data`` and ``noise`` are not given).
        data: observations ``y``, ``(n_obs,)``.
        noise: observation std, scalar or ``(n_obs,)``, all ``> 0``.
        level: the prior level matching the forward model's lattice.

    Attributes:
        likelihood: the :class:`GaussianLikelihood`; ``forward``, ``data``, ``noise`` and
            ``n_obs`` are its.

    Raises:
        ValueError: as :class:`GaussianLikelihood`; or data and noise given beside a
            likelihood, or missing without one.
    """

    def __init__(self, prior, forward, data=None, noise=None, level=None):
        if isinstance(forward, GaussianLikelihood):
            if data is not None or noise is not None:
                raise ValueError("give a GaussianLikelihood or (forward, data, noise), not both")
            likelihood = forward
        elif data is None or noise is None:
            raise ValueError("a posterior needs data and noise beside its forward model")
        else:
            likelihood = GaussianLikelihood(forward, data, noise)
        if level is None:
            raise ValueError("a posterior needs the level of its lattice")
        self.prior, self.likelihood, self.level = prior, likelihood, level

    forward = property(lambda self: self.likelihood.forward)
    data = property(lambda self: self.likelihood.data)
    noise = property(lambda self: self.likelihood.noise)
    n_obs = property(lambda self: self.likelihood.n_obs)

    def log_likelihood(self, x):
        """Gaussian log likelihood ``(num,)`` of fields ``x (num, ny, nx)``; ``-inf`` where F fails."""
        return self.likelihood(x).to(_float_dtype(x))

    @torch.no_grad()
    def evaluate(self, x):
        """``(log_prob(x), F(x))`` from one forward solve per sample, without gradients.

        Returns:
            Tensors ``(num,)`` and ``(num, n_obs)``, float64 (NaN rows of F where a solve failed).
        """
        pred = self.forward(x).to(torch.float64)
        prior = self.prior.log_prob(x, self.level).to(torch.float64)
        return prior + self.likelihood.of_predictions(pred), pred

    def log_prob(self, x):
        """Unnormalised log posterior ``(num,)`` = log prior + log likelihood, differentiable."""
        prior = self.prior.log_prob(x, self.level).to(torch.float64)
        return (prior + self.log_likelihood(x).to(torch.float64)).to(_float_dtype(x))

    def grad_log_prob(self, x):
        """``(log_prob(x), d log_prob / dx)``: Tensors ``(num,)`` and ``(num, ny, nx)``, detached."""
        x = torch.as_tensor(x).detach().requires_grad_(True)
        value = self.log_prob(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad


def _float_dtype(x):
    dtype = torch.as_tensor(x).dtype
    return dtype if dtype.is_floating_point else torch.float64


def _checked_data(data, n_obs):
    data = np.atleast_1d(np.asarray(data, dtype=np.float64))
    if data.ndim != 1 or data.size != n_obs:
        raise ValueError(f"data has shape {data.shape}, but the forward model has n_obs={n_obs}")
    if not np.isfinite(data).all():
        raise ValueError(f"data must be finite; entries {np.flatnonzero(~np.isfinite(data)).tolist()} are not")
    return data


def _checked_noise(noise, n_obs):
    noise = np.asarray(noise, dtype=np.float64)
    if noise.ndim > 1 or (noise.ndim == 1 and noise.size not in (1, n_obs)):
        raise ValueError(f"noise must be a scalar or have length n_obs={n_obs}, got shape {noise.shape}")
    noise = np.broadcast_to(noise.reshape(-1) if noise.ndim else noise, (n_obs,)).copy()
    if not (np.isfinite(noise).all() and (noise > 0).all()):
        raise ValueError(f"noise must be positive and finite, got {noise.tolist()}")
    return noise
