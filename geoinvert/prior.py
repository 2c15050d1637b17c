"""Gaussian priors on the finest lattice, their exact coarse marginals and prior conditioning layers."""

import logging
import math
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

from geoinvert.hierarchy import (BOUNDARIES, Hierarchy, laplacian_1d, haar, inverse_haar, pool,
                                 pool_matrix)

__all__ = ["GaussianPrior", "MaternPrior", "IIDPrior", "PriorConditioning", "stationary_variance"]

logger = logging.getLogger(__name__)

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)
_UNIT_SQUARE = (0.0, 1.0, 0.0, 1.0)


# -- numpy linear maps inside torch autograd -------------------------------------------------------


class _NumpyLinear(torch.autograd.Function):
    """y = M x for a batch of rows, with M applied by numpy callables (float64)."""

    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return torch.from_numpy(np.ascontiguousarray(op.matvec(x.detach().numpy().T).T))

    @staticmethod
    def backward(ctx, grad):
        out = ctx.op.rmatvec(grad.detach().numpy().T).T
        return torch.from_numpy(np.ascontiguousarray(out)), None


class _Op:
    """A linear map given by ``matvec`` and ``rmatvec`` on column blocks ``(n, batch)``."""

    def __init__(self, matvec, rmatvec):
        self.matvec, self.rmatvec = matvec, rmatvec

    def __call__(self, x):
        """Apply to a float64 tensor of rows ``(num, n_in) -> (num, n_out)``, differentiably."""
        return _NumpyLinear.apply(x, self)


def _sparse_nbytes(mat):
    """Bytes held by a scipy CSR/CSC matrix."""
    return mat.data.nbytes + mat.indices.nbytes + mat.indptr.nbytes


def _normal_log_prob(z):
    """Standard normal log density summed over all but the first axis, ``(num,)``."""
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * _LOG_2PI


# -- haar coordinates of matrices -----------------------------------------------------------------


def _haar_operators(n):
    """Sparse rows of the 2x2 Haar transform on an n x n lattice: H_a ``(m^2, n^2)``, H_d ``(3m^2, n^2)``."""
    rows = np.repeat(np.arange(n // 2), 2)
    s = sp.csr_matrix((np.full(n, 2 ** -0.5), (rows, np.arange(n))), shape=(n // 2, n))
    d = sp.csr_matrix((np.tile([2 ** -0.5, -(2 ** -0.5)], n // 2), (rows, np.arange(n))),
                      shape=(n // 2, n))
    h_d = sp.vstack([sp.kron(s, d), sp.kron(d, s), sp.kron(d, d)])
    return sp.kron(s, s, format="csr"), h_d.tocsr()


def _haar_blocks(cov):
    """Blocks ``(S_aa, S_ad, S_dd)`` of H cov H^T for a dense covariance ``(n^2, n^2)``."""
    size = cov.shape[0]
    n = math.isqrt(size)
    a, d = haar(cov.reshape(size, n, n))
    rows_a, rows_d = a.reshape(size, -1).T, d.reshape(size, -1).T
    del a, d
    aa, ad = haar(np.ascontiguousarray(rows_a).reshape(-1, n, n))
    dd = haar(np.ascontiguousarray(rows_d).reshape(-1, n, n))[1]
    k = size // 4
    return aa.reshape(k, k), ad.reshape(k, 3 * k), dd.reshape(3 * k, 3 * k)


# -- conditionals of the details given the block averages ------------------------------------------


class _DenseConditional:
    r"""d | a ~ N(m_d + K (a - m_a), C C^T) from dense Haar-coordinate covariance blocks.

    K = S_da S_aa^{-1}, C C^T = S_dd - S_da S_aa^{-1} S_ad (Cholesky, lower).
    """

    def __init__(self, s_aa, s_ad, s_dd):
        s_ad, s_dd = torch.from_numpy(s_ad), torch.from_numpy(s_dd)
        k_t = torch.cholesky_solve(s_ad, torch.linalg.cholesky(torch.from_numpy(s_aa)))
        s_dd -= s_ad.T @ k_t  # in place: the conditional covariance
        del s_ad
        self._k_t, self._chol = k_t, torch.linalg.cholesky(s_dd)
        self.logdet = float(torch.log(torch.diagonal(self._chol)).sum())
        self.nbytes = (k_t.numel() + self._chol.numel()) * 8

    def details(self, a_c, z):
        """Centred details ``(num, n_d)`` from centred averages and noise."""
        return a_c @ self._k_t + z @ self._chol.T

    def whiten(self, a_c, d_c):
        """Noise ``(num, n_d)`` from centred averages and details."""
        r = d_c - a_c @ self._k_t
        return torch.linalg.solve_triangular(self._chol.T, r, upper=True, left=False)


class _SparseConditional:
    r"""d | a ~ N(m_d - Q_dd^{-1} Q_da (a - m_a), Q_dd^{-1}) from a sparse Haar-coordinate precision.

    Q_dd = G G^T with G = P^T L D^{1/2} from a symmetric-permutation sparse LU (= LDL^T) of Q_dd.
    Details d_c = Q_dd^{-1}(G z - Q_da a_c) = G^{-T} z - Q_dd^{-1} Q_da a_c; the inverse is
    z = G^T (d_c + Q_dd^{-1} Q_da a_c). Each direction costs one sparse solve.
    """

    def __init__(self, q_dd, q_da):
        lu = splu(q_dd.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                  options={"SymmetricMode": True})
        if not np.array_equal(lu.perm_r, lu.perm_c):
            raise np.linalg.LinAlgError("sparse LU did not keep a symmetric permutation")
        diag = lu.U.diagonal()
        if np.any(diag <= 0):
            raise np.linalg.LinAlgError("detail precision is not positive definite")
        n = q_dd.shape[0]
        perm = sp.csc_matrix((np.ones(n), (lu.perm_r, np.arange(n))), shape=(n, n))
        self._g = (perm.T @ lu.L @ sp.diags(np.sqrt(diag))).tocsr()
        self._g_t = self._g.T.tocsr()
        self._lu, self._q_da, self._q_ad = lu, q_da.tocsr(), q_da.T.tocsr()
        self.logdet = float(-0.5 * np.log(diag).sum())
        n_a = q_da.shape[1]
        self._details = _Op(self._details_mv, self._details_rmv)
        self._whiten = _Op(self._whiten_mv, self._whiten_rmv)
        self._split = n_a
        factors = (self._g, self._g_t, lu.L, lu.U, self._q_da, self._q_ad)
        self.nbytes = sum(_sparse_nbytes(a) for a in factors)

    def details(self, a_c, z):
        """Centred details ``(num, n_d)`` from centred averages and noise."""
        return self._details(torch.cat((a_c, z), 1))

    def whiten(self, a_c, d_c):
        """Noise ``(num, n_d)`` from centred averages and details."""
        return self._whiten(torch.cat((a_c, d_c), 1))

    def _details_mv(self, x):
        a, z = x[:self._split], x[self._split:]
        return self._lu.solve(self._g @ z - self._q_da @ a)

    def _details_rmv(self, v):
        w = self._lu.solve(np.asfortranarray(v))
        return np.concatenate((-(self._q_ad @ w), self._g_t @ w))

    def _whiten_mv(self, x):
        a, d = x[:self._split], x[self._split:]
        return self._g_t @ (d + self._lu.solve(np.asfortranarray(self._q_da @ a)))

    def _whiten_rmv(self, v):
        u = self._g @ v
        return np.concatenate((self._q_ad @ self._lu.solve(np.asfortranarray(u)), u))


# -- the prior conditioning layer -------------------------------------------------------------------


class PriorConditioning:
    r"""Prior conditioning layer PC_l: x_l = U x_{l-1} + B z_l (plus mean terms), exact and invertible.

    In the orthonormal 2x2 Haar coordinates of level l, x_l = H^T [a; d] with averages
    a = 2 x_{l-1} and the 3 details per coarse cell d = mu_d(a) + G^{-T} z, where
    d | a ~ N(mu_d(a), Sigma_{d|a}) is the prior conditional and G^{-T} G^{-1} = Sigma_{d|a}.
    Hence A x_l = x_{l-1} exactly, U = Sigma_l A^T (A Sigma_l A^T)^{-1} and
    B B^T = Sigma_l - Sigma_l A^T (A Sigma_l A^T)^{-1} A Sigma_l (MsIGN Lemma 2.1).
    log|det d x_l / d(x_{l-1}, z_l)| = m^2 log 2 + log|det G^{-T}| is a constant.

    References:
        Zhang, Zhang, Hou. Multiscale invertible generative networks for high-dimensional Bayesian
        inference. ICML 2021, https://arxiv.org/abs/2105.05489

    Args:
        level: Fine level l >= 2 (fields of n = 2**l cells per side, m = n / 2).
        mean: Prior mean of level l, ndarray ``(n, n)``.
        conditional: Law of the details given the averages (internal).
    """

    def __init__(self, level, mean, conditional):
        self.level, self._cond = level, conditional
        self.m = 2 ** (level - 1)
        mean_a, mean_d = haar(np.asarray(mean, np.float64))
        self._mean_a = torch.from_numpy(mean_a.ravel())
        self._mean_d = torch.from_numpy(mean_d.ravel())
        self.logdet = float(self.m ** 2 * math.log(2.0) + conditional.logdet)

    @property
    def nbytes(self):
        """Bytes held by the layer's factors."""
        return self._cond.nbytes

    @property
    def noise_shape(self):
        """Shape ``(3, m, m)`` of z_l."""
        return (3, self.m, self.m)

    def forward(self, x_coarse, z):
        """``(x_{l-1} (num, m, m), z (num, 3, m, m)) -> (x_l (num, 2m, 2m), log|det|)``."""
        num, dtype = x_coarse.shape[0], x_coarse.dtype
        a = 2 * x_coarse.to(_F64).reshape(num, -1)
        d = self._cond.details(a - self._mean_a, z.to(_F64).reshape(num, -1)) + self._mean_d
        x = inverse_haar(a.reshape(num, self.m, self.m), d.reshape(num, *self.noise_shape))
        return x.to(dtype), self.logdet

    def inverse(self, x_fine):
        """``x_l (num, 2m, 2m) -> (x_{l-1} (num, m, m), z (num, 3, m, m), log|det|)`` of the inverse."""
        num, dtype = x_fine.shape[0], x_fine.dtype
        a, d = haar(x_fine.to(_F64))
        z = self._cond.whiten(a.reshape(num, -1) - self._mean_a,
                              d.reshape(num, -1) - self._mean_d)
        return (a / 2).to(dtype), z.reshape(num, *self.noise_shape).to(dtype), -self.logdet

    __call__ = forward


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
            h_a, h_d = _haar_operators(2 ** level)
            q_d = h_d @ q
            return _SparseConditional((q_d @ h_d.T).tocsc(), (q_d @ h_a.T).tocsr())
        return _DenseConditional(*self._haar_covariance(level))

    def _haar_covariance(self, level):
        """Blocks ``(S_aa, S_ad, S_dd)`` of H Sigma_level H^T (orthonormal 2x2 Haar, details channel-major)."""
        return _haar_blocks(self.covariance(level))

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
        op = self._cache.setdefault(("q_op", level), _Op(q.__matmul__, q.T.tocsr().__matmul__))
        quad = (r * op(r)).sum(1)
        return -0.5 * quad + 0.5 * (self._logdet_precision(level) - r.shape[1] * _LOG_2PI)

    def _chain_log_prob(self, x, level):
        total = 0.0
        for k in range(level, 1, -1):
            x, z, logdet = self.conditioning(k).inverse(x)
            total = total + _normal_log_prob(z) + logdet
        z, logdet = self.coarsest_inverse(x)
        return total + _normal_log_prob(z) + logdet


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
