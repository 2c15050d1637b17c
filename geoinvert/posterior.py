"""Unnormalised posterior log densities and their gradients on one level."""

import logging
import math

import numpy as np
import torch

__all__ = ["Posterior"]

logger = logging.getLogger(__name__)


class Posterior:
    """Posterior ``q_l(x) propto rho_l(x) N(y; F_l(x), diag(noise^2))`` on level ``l``.

    ``log_prob(x) = prior.log_prob(x, level) + log_likelihood(x)`` with the normalised Gaussian
    likelihood

        log L(y | x) = -1/2 sum_k ((y_k - F_k(x)) / noise_k)^2 - sum_k log noise_k - n_obs/2 log(2 pi),

    so ``log_prob - log(exact posterior) = log p(y)``, the log evidence. A sample whose prediction
    is not finite (failed solve) gets ``-inf`` and a zero likelihood gradient; the other samples'
    values and gradients are unaffected.

    Args:
        prior: a ``GaussianPrior``-like object with ``log_prob(x, level)``.
        forward: forward model on ``level``: Tensor ``(num, ny, nx) -> (num, n_obs)``,
            differentiable, with attribute ``n_obs``.
        data: observations ``y``, ``(n_obs,)``.
        noise: observation std, scalar or ``(n_obs,)``, all ``> 0``.
        level: the prior level matching the forward model's lattice.

    Raises:
        ValueError: data length differs from ``forward.n_obs``, data not finite, or noise not
            positive and finite (or of the wrong length).
    """

    def __init__(self, prior, forward, data, noise, level):
        self.prior, self.forward, self.level = prior, forward, level
        self.data = _checked_data(data, forward.n_obs)
        self.noise = _checked_noise(noise, self.data.size)
        self._log_norm = -float(np.log(self.noise).sum()) - 0.5 * self.data.size * math.log(2 * math.pi)

    @property
    def n_obs(self):
        return self.data.size

    def log_likelihood(self, x):
        """Gaussian log likelihood ``(num,)`` of fields ``x (num, ny, nx)``; ``-inf`` where F fails."""
        return self._log_likelihood(self.forward(x).to(torch.float64)).to(_float_dtype(x))

    def _log_likelihood(self, pred):
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
    def evaluate(self, x):
        """``(log_prob(x), F(x))`` from one forward solve per sample, without gradients.

        Returns:
            Tensors ``(num,)`` and ``(num, n_obs)``, float64 (NaN rows of F where a solve failed).
        """
        pred = self.forward(x).to(torch.float64)
        prior = self.prior.log_prob(x, self.level).to(torch.float64)
        return prior + self._log_likelihood(pred), pred

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
