"""Gaussian priors on the finest lattice and their exact marginals on every coarser level.

A prior of the finest level L is N(mu, Q^{-1}); the prior of level l-1 is the law of the block
averages of level l, so that sampling level by level through the prior conditioning layers
(:mod:`geoinvert.priors.conditioning`) gives consistent fields on every level.
"""

import logging
import math
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

from geoinvert.hierarchy import BOUNDARIES, Hierarchy, laplacian_1d, pool, pool_matrix
from geoinvert.priors.conditioning import (DenseConditional, LinearOperator, PriorConditioning,
                                           SparseConditional, haar_blocks, haar_operators,
                                           normal_log_prob)

__all__ = ["GaussianPrior", "MaternPrior", "IIDPrior", "stationary_variance"]

logger = logging.getLogger(__name__)

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)
_UNIT_SQUARE = (0.0, 1.0, 0.0, 1.0)


# -- priors -----------------------------------------------------------------------------------------


class GaussianPrior:
    r"""Gaussian prior N(mu, Q^{-1}) on the finest lattice and its exact marginals on every level.

    The prior of level l-1 is the law of A_l x_l: mean A_l mu_l and
    Sigma_{l-1} = A_l Sigma_l A_l^T. Sampling composes :meth:`coarsest` with the prior
    conditioning layers, so samples of every level are consistent (x_{l-1} = A_l x_l).

    Args:
        levels: Finest level L (fields of 2**L x 2**L cells).
        bounds: ``(x0, x1, y0, y1)`` covered by the lattices.
        mean: A number or an array ``(2**L, 2**L)``.
        precision: Symmetric positive definite scipy.sparse ``(4**L, 4**L)``, row-major cells.
    """

    def __init__(self, levels, bounds=_UNIT_SQUARE, *, mean=0.0, precision):
        self.hierarchy = Hierarchy(levels, bounds)
        self.levels, self.bounds = self.hierarchy.levels, self.hierarchy.bounds
        n = 2 ** self.levels
        self._mean = _check_mean(mean, n)
        self._precision = sp.csr_matrix(precision, dtype=np.float64)
        if self._precision.shape != (n * n, n * n):
            raise ValueError(f"precision must have shape {(n * n, n * n)}, "
                             f"got {self._precision.shape}")
        self._layers, self._cache = {}, {}

    # -- level data

    def mean(self, level):
        """Prior mean of a level, ndarray ``(2**level, 2**level)`` (pooled finest mean)."""
        mean = self._mean
        for _ in range(self.levels - self._check(level)):
            mean = pool(mean)
        return mean

    def precision(self, level=None):
        """Sparse precision of a level where it is sparse (the finest level; every level if iid)."""
        level = self.levels if level is None else self._check(level)
        q = self._sparse_precision(level)
        if q is None:
            raise ValueError(f"the precision of level {level} is dense; use covariance({level})")
        return q

    def covariance(self, level):
        """Dense covariance Sigma_level ``(4**level, 4**level)`` (meant for small levels)."""
        level = self._check(level)
        lu = self._finest_lu()
        p = sp.identity(4 ** self.levels, format="csr")
        for k in range(self.levels, level, -1):
            p = pool_matrix(k) @ p
        cols = lu.solve(np.asfortranarray(p.T.toarray()))
        return np.asarray(p @ cols)

    def variance(self, level):
        """Marginal variances of a level, ndarray ``(2**level, 2**level)`` (the diagonal of
        :meth:`covariance`)."""
        n = 2 ** self._check(level)
        return np.diag(self.covariance(level)).reshape(n, n).copy()

    def _sparse_precision(self, level):
        return self._precision if level == self.levels else None

    def _logdet_precision(self, level):
        if level != self.levels:
            raise ValueError(f"level {level} has no sparse precision")
        return float(np.log(np.abs(self._finest_lu().U.diagonal())).sum())

    def _finest_lu(self):
        if "lu" not in self._cache:
            self._cache["lu"] = splu(self._precision.tocsc(), permc_spec="MMD_AT_PLUS_A")
        return self._cache["lu"]

    def _check(self, level):
        if int(level) != level or not 1 <= level <= self.levels:
            raise ValueError(f"level must be an integer in 1..{self.levels}, got {level!r}")
        return int(level)

    # -- coarsest level and conditioning layers

    def _coarsest_factor(self):
        if "c1" not in self._cache:
            chol = np.linalg.cholesky(self.covariance(1))
            self._cache["c1"] = (torch.from_numpy(chol), float(np.log(np.diag(chol)).sum()))
        return self._cache["c1"]

    def coarsest(self, z):
        """x_1 = mu_1 + C_1 z with C_1 C_1^T = Sigma_1: ``z (num, 2, 2) -> (x_1 (num, 2, 2), log|det C_1|)``."""
        chol, logdet = self._coarsest_factor()
        mean = torch.from_numpy(self.mean(1).ravel())
        x = z.to(_F64).reshape(z.shape[0], 4) @ chol.T + mean
        return x.reshape(z.shape).to(z.dtype), logdet

    def coarsest_inverse(self, x):
        """z = C_1^{-1}(x_1 - mu_1): ``x_1 (num, 2, 2) -> (z (num, 2, 2), -log|det C_1|)``."""
        chol, logdet = self._coarsest_factor()
        r = x.to(_F64).reshape(x.shape[0], 4) - torch.from_numpy(self.mean(1).ravel())
        z = torch.linalg.solve_triangular(chol.T, r, upper=True, left=False)
        return z.reshape(x.shape).to(x.dtype), -logdet

    def conditioning(self, level):
        """The :class:`PriorConditioning` layer from level-1 to ``level`` (2..L), built once and cached."""
        level = self._check(level)
        if level < 2:
            raise ValueError(f"conditioning needs level >= 2, got {level}")
        if level not in self._layers:
            start = time.perf_counter()
            self._layers[level] = PriorConditioning(level, self.mean(level),
                                                    self._conditional(level))
            logger.debug("prior conditioning layer %d built in %.2f s", level,
                         time.perf_counter() - start)
        return self._layers[level]

    def _conditional(self, level):
        q = self._sparse_precision(level)
        if q is not None:
            h_a, h_d = haar_operators(2 ** level)
            q_d = h_d @ q
            return SparseConditional((q_d @ h_d.T).tocsc(), (q_d @ h_a.T).tocsr())
        return DenseConditional(*self._haar_covariance(level))

    def _haar_covariance(self, level):
        """Blocks ``(S_aa, S_ad, S_dd)`` of H Sigma_level H^T (orthonormal 2x2 Haar, details channel-major)."""
        return haar_blocks(self.covariance(level))

    # -- sampling and densities

    def sample(self, num, level, *, generator=None, dtype=torch.float64):
        """Draw ``num`` fields of a level level by level from x_1: Tensor ``(num, 2**l, 2**l)``."""
        level = self._check(level)
        x = self.coarsest(torch.randn((num, 2, 2), generator=generator, dtype=_F64))[0]
        for k in range(2, level + 1):
            layer = self.conditioning(k)
            z = torch.randn((num, *layer.noise_shape), generator=generator, dtype=_F64)
            x = layer.forward(x, z)[0]
        return x.to(dtype)

    def log_prob(self, x, level):
        """Normalised log density of fields ``x (num, 2**l, 2**l)`` on a level, ``(num,)``, differentiable."""
        level = self._check(level)
        if tuple(x.shape[-2:]) != (2 ** level,) * 2 or x.dim() != 3:
            raise ValueError(f"x must have shape (num, {2 ** level}, {2 ** level}) for level "
                             f"{level}, got {tuple(x.shape)}")
        q = self._sparse_precision(level)
        out = self._sparse_log_prob(x, level, q) if q is not None else self._chain_log_prob(x, level)
        return out.to(x.dtype)

    def _sparse_log_prob(self, x, level, q):
        r = x.to(_F64).reshape(x.shape[0], -1) - torch.from_numpy(self.mean(level).ravel())
        op = self._cache.setdefault(("q_op", level), LinearOperator(q.__matmul__, q.T.tocsr().__matmul__))
        quad = (r * op(r)).sum(1)
        return -0.5 * quad + 0.5 * (self._logdet_precision(level) - r.shape[1] * _LOG_2PI)

    def _chain_log_prob(self, x, level):
        total = 0.0
        for k in range(level, 1, -1):
            x, z, logdet = self.conditioning(k).inverse(x)
            total = total + normal_log_prob(z) + logdet
        z, logdet = self.coarsest_inverse(x)
        return total + normal_log_prob(z) + logdet


class MaternPrior(GaussianPrior):
    r"""Matern-type Gaussian prior: precision Q = (tau^2 I - Delta_h)^alpha / kappa on the finest lattice.

    Delta_h is the five-point cell-centred Laplacian with the chosen boundary treatment
    (:meth:`geoinvert.hierarchy.Lattice.laplacian`). In the continuum this is a Matern field with
    smoothness nu = alpha - 1 (in 2-D) and inverse length tau. Parameters:

    - ``correlation_length`` rho sets tau = sqrt(8 nu) / rho, the distance at which the Matern
      correlation drops to about 0.13 (Lindgren et al. 2011); for alpha = 1 (nu = 0, where the
      continuum field has infinite variance) the convention tau = 2 / rho (the nu = 1/2 value)
      is used. Alternatively give ``tau`` directly.
    - ``std`` sigma is the marginal standard deviation of the stationary field on the infinite
      lattice of the same spacing: kappa = sigma^2 / v with v = (2 pi)^-2 int (tau^2 +
      4 sin^2(t1/2)/hx^2 + 4 sin^2(t2/2)/hy^2)^-alpha dt. Away from the boundary (a few rho) the
      marginal variance is sigma^2; it drops to ~0 at Dirichlet-type and rises (up to ~2x) at
      Neumann-type boundaries.

    Covariances of every level are computed exactly from the separable eigen-decomposition of
    Delta_h; the finest conditioning layer uses the sparse precision.

    References:
        Lindgren, Rue, Lindstrom. An explicit link between Gaussian fields and Gaussian Markov
        random fields: the SPDE approach. JRSS-B 2011.

    Args:
        levels: Finest level L.
        bounds: ``(x0, x1, y0, y1)``.
        alpha: Integer exponent >= 1.
        correlation_length: rho > 0 (exclusive with ``tau``).
        tau: Inverse length > 0 (exclusive with ``correlation_length``).
        std: Marginal standard deviation sigma > 0.
        mean: Constant mean or array ``(2**L, 2**L)``.
        boundary: ``"dirichlet"`` (ghost value -u), ``"neumann"`` (ghost value u) or ``"periodic"``.
    """

    def __init__(self, levels, bounds=_UNIT_SQUARE, *, alpha=2, correlation_length=None,
                 tau=None, std=1.0, mean=0.0, boundary="dirichlet"):
        if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 1:
            raise ValueError(f"alpha must be an integer >= 1, got {alpha!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.alpha, self.boundary = int(alpha), boundary
        self.tau = _tau(self.alpha, correlation_length, tau)
        self.std = _positive("std", std)
        lattice = Hierarchy(levels, bounds).lattice(levels)
        self.kappa = self.std ** 2 / stationary_variance(self.tau, lattice.cell_size, self.alpha)
        op = self.tau ** 2 * sp.identity(lattice.size) - lattice.laplacian(boundary)
        q = sp.identity(lattice.size, format="csr")
        for _ in range(self.alpha):
            q = q @ op
        super().__init__(levels, bounds, mean=mean, precision=q / self.kappa)
        self._spectrum = _spectrum(lattice, boundary)

    @property
    def correlation_length(self):
        """rho = sqrt(8 nu) / tau (nu = alpha - 1, or 1/2 for alpha = 1)."""
        return math.sqrt(8 * max(self.alpha - 1, 0.5)) / self.tau

    def covariance(self, level):
        """Exact dense Sigma_level ``(4**level, 4**level)`` from the eigen-decomposition of Delta_h."""
        py, px, weights = self._pooled_spectrum(self._check(level))
        return _spectral_block((py, px), (py, px), weights)

    def variance(self, level):
        """Marginal variances of a level ``(2**level, 2**level)``, from the spectrum without
        the dense covariance."""
        py, px, weights = self._pooled_spectrum(self._check(level))
        return py ** 2 @ weights @ (px ** 2).T

    def _haar_covariance(self, level):
        """Haar blocks of Sigma_level computed block by block from the spectrum (no full d x d copy)."""
        py, px, weights = self._pooled_spectrum(level)
        (ya, yd), (xa, xd) = _haar_rows(py), _haar_rows(px)
        channels = [(ya, xa), (ya, xd), (yd, xa), (yd, xd)]  # a, d_0, d_1, d_2
        k = ya.shape[0] ** 2
        s_aa, s_ad, s_dd = np.empty((k, k)), np.empty((k, 3 * k)), np.empty((3 * k, 3 * k))
        s_aa[:] = _spectral_block(channels[0], channels[0], weights)
        for c in range(1, 4):
            s_ad[:, (c - 1) * k:c * k] = _spectral_block(channels[0], channels[c], weights)
            for e in range(c, 4):
                block = _spectral_block(channels[c], channels[e], weights)
                s_dd[(c - 1) * k:c * k, (e - 1) * k:e * k] = block
                s_dd[(e - 1) * k:e * k, (c - 1) * k:c * k] = block.T
        return s_aa, s_ad, s_dd

    def _pooled_spectrum(self, level):
        """Eigenvectors pooled to ``level`` in each direction, ``(n_l, N)``, and kappa lambda^-alpha ``(N, N)``."""
        (wy, vy), (wx, vx) = self._spectrum
        weights = self.kappa * (self.tau ** 2 + wy[:, None] + wx[None, :]) ** -self.alpha
        for _ in range(self.levels - level):
            vy, vx = 0.5 * (vy[0::2] + vy[1::2]), 0.5 * (vx[0::2] + vx[1::2])
        return vy, vx, weights

    def _logdet_precision(self, level):
        if level != self.levels:
            raise ValueError(f"level {level} has no sparse precision")
        (wy, _), (wx, _) = self._spectrum
        lam = self.tau ** 2 + wy[:, None] + wx[None, :]
        return float(self.alpha * np.log(lam).sum() - lam.size * math.log(self.kappa))


class IIDPrior(GaussianPrior):
    r"""Independent cells: x_L ~ N(mean, diag(std^2)); coarse levels stay diagonal.

    Sigma_{l-1} = A Sigma_l A^T = diag(pool(var_l) / 4), so every level has a sparse (diagonal)
    precision and the conditioning layers are sparse at every level.

    Args:
        levels: Finest level L.
        bounds: ``(x0, x1, y0, y1)``.
        mean: Number or array ``(2**L, 2**L)``.
        std: Number > 0 or positive array ``(2**L, 2**L)``.
    """

    def __init__(self, levels, bounds=_UNIT_SQUARE, *, mean=0.0, std=1.0):
        n = 2 ** Hierarchy(levels, bounds).levels
        std = np.broadcast_to(np.asarray(std, np.float64), (n, n)) if np.ndim(std) == 0 else \
            np.asarray(std, np.float64)
        if std.shape != (n, n) or not np.all(std > 0):
            raise ValueError(f"std must be a positive number or a positive array of shape {(n, n)}")
        self._var = std ** 2
        super().__init__(levels, bounds, mean=mean, precision=sp.diags(1 / self._var.ravel()))

    def variance(self, level):
        """Marginal variances of a level, ndarray ``(2**level, 2**level)``."""
        var = self._var
        for _ in range(self.levels - self._check(level)):
            var = pool(var) / 4
        return var

    def covariance(self, level):
        """Diagonal Sigma_level as a dense ndarray ``(4**level, 4**level)``."""
        return np.diag(self.variance(level).ravel())

    def _sparse_precision(self, level):
        return sp.diags(1 / self.variance(level).ravel(), format="csr")

    def _logdet_precision(self, level):
        return float(-np.log(self.variance(level)).sum())


# -- helpers ----------------------------------------------------------------------------------------


def stationary_variance(tau, cell_size, alpha):
    r"""Marginal variance of N(0, (tau^2 I - Delta_h)^-alpha) on the infinite lattice of spacing (hx, hy).

    v = (2 pi)^-2 int_{[-pi, pi]^2} (tau^2 + 4 sin^2(t1/2)/hx^2 + 4 sin^2(t2/2)/hy^2)^-alpha dt,
    evaluated as the variance on an M x M periodic lattice with M tau h >= 40, whose error
    against the infinite lattice is of order exp(-M tau h).
    """
    hx, hy = cell_size
    size = 64
    while size * tau * min(hx, hy) < 40 and size < 8192:
        size *= 2
    theta = 2 * np.pi * np.arange(size) / size
    sx, sy = 4 * np.sin(theta / 2) ** 2 / hx ** 2, 4 * np.sin(theta / 2) ** 2 / hy ** 2
    total = sum(float(((tau ** 2 + sy[i:i + 512, None] + sx[None, :]) ** -float(alpha)).sum())
                for i in range(0, size, 512))
    return total / size ** 2


def _spectral_block(first, second, weights):
    r"""B[(i, j), (i', j')] = sum_pq Y1[i, p] X1[j, q] W[p, q] Y2[i', p] X2[j', q] for separable rows."""
    (y1, x1), (y2, x2) = first, second
    n1, n2 = y1.shape[0], y2.shape[0]
    gy = (y1[:, None, :] * y2[None, :, :]).reshape(n1 * n2, -1)
    gx = (x1[:, None, :] * x2[None, :, :]).reshape(n1 * n2, -1)
    block = (gy @ weights @ gx.T).reshape(n1, n2, n1, n2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(block).reshape(n1 * n1, n2 * n2)


def _haar_rows(rows):
    """One-dimensional orthonormal Haar of pairs of rows: ``(n, N) -> (avg (n/2, N), diff (n/2, N))``."""
    return (rows[0::2] + rows[1::2]) / math.sqrt(2), (rows[0::2] - rows[1::2]) / math.sqrt(2)


def _spectrum(lattice, boundary):
    """Eigenpairs ``((w_y, V_y), (w_x, V_x))`` of -D/h^2 in each direction (Delta_h is separable)."""
    hx, hy = lattice.cell_size
    return tuple(np.linalg.eigh(-laplacian_1d(lattice.n, h, boundary).toarray()) for h in (hy, hx))


def _tau(alpha, correlation_length, tau):
    if (correlation_length is None) == (tau is None):
        raise ValueError("give exactly one of correlation_length and tau")
    if tau is not None:
        return _positive("tau", tau)
    rho = _positive("correlation_length", correlation_length)
    return math.sqrt(8 * max(alpha - 1, 0.5)) / rho


def _positive(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _check_mean(mean, n):
    mean = np.asarray(mean, np.float64)
    if mean.ndim == 0:
        mean = np.full((n, n), float(mean))
    if mean.shape != (n, n) or not np.all(np.isfinite(mean)):
        raise ValueError(f"mean must be a finite number or an array of shape {(n, n)}, "
                         f"got shape {mean.shape}")
    return mean
