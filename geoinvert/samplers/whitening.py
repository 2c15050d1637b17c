"""The prior's whitening map x = T(z), z ~ N(0, I), for prior-preconditioned samplers."""

import math
from typing import Callable, NamedTuple

import torch

__all__ = ["Whitening", "prior_whitening", "standard_normal_log_prob"]

_F64 = torch.float64


class Whitening(NamedTuple):
    r"""Linear bijection between white noise ``z (num, d)`` and fields ``x (num, n, n)``, d = n^2.

    ``x = T(z) = mu + C z`` with ``C C^T = Sigma`` (the prior covariance of the level), so that
    ``z ~ N(0, I)`` gives ``x ~ N(mu, Sigma)``; ``log|det C|`` is the constant ``logdet``.

    Attributes:
        to_x: ``z (num, d) -> x (num, n, n)``, float64, differentiable.
        to_z: ``x (num, n, n) -> z (num, d)``, float64, differentiable; the inverse of ``to_x``.
        logdet: ``log|det C|`` (python float).
    """

    to_x: Callable
    to_z: Callable
    logdet: float


def prior_whitening(prior, level):
    r"""The whitening map of a ``GaussianPrior`` on ``level``, composed from its own layers.

    ``z`` is the concatenation (in this order) of the coarsest noise z_1 (4 entries) and of the
    conditioning noises z_k (``3 * 4**(k-1)`` entries, k = 2..level), so d = 4**level and

        x_1 = mu_1 + C_1 z_1,    x_k = PC_k(x_{k-1}, z_k),    x = x_level.

    Every step is affine with a constant Jacobian, hence ``C C^T = Sigma_level`` and
    ``log|det C| = log|det C_1| + sum_k logdet(PC_k)``.

    Args:
        prior: object with ``coarsest``, ``coarsest_inverse`` and ``conditioning(k)``.
        level: level of the fields (1..prior.levels).

    Returns:
        :class:`Whitening`.
    """
    layers = [prior.conditioning(k) for k in range(2, level + 1)]
    sizes = [4] + [3 * 4 ** (k - 1) for k in range(2, level + 1)]
    logdet = prior.coarsest(torch.zeros(1, 2, 2, dtype=_F64))[1] + sum(pc.logdet for pc in layers)

    def to_x(z):
        parts = torch.split(z.to(_F64), sizes, dim=1)
        x = prior.coarsest(parts[0].reshape(-1, 2, 2))[0]
        for pc, part in zip(layers, parts[1:]):
            x = pc.forward(x, part.reshape(-1, *pc.noise_shape))[0]
        return x

    def to_z(x):
        x, parts = x.to(_F64), []
        for pc in reversed(layers):
            x, z, _ = pc.inverse(x)
            parts.append(z.reshape(x.shape[0], -1))
        parts.append(prior.coarsest_inverse(x)[0].reshape(x.shape[0], -1))
        return torch.cat(parts[::-1], dim=1)

    return Whitening(to_x, to_z, float(logdet))


def standard_normal_log_prob(z):
    """``log N(z; 0, I)`` of ``z (num, d)``, ``(num,)``."""
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
