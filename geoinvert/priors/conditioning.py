"""Prior conditioning layers: the exact Gaussian law of a level given the level below.

The layers work in the orthonormal 2x2 Haar coordinates of a level (block averages a and
details d); :mod:`geoinvert.priors.gaussian` builds them from a prior's covariance (dense) or
precision (sparse).
"""

import math

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

from geoinvert.hierarchy import haar, inverse_haar

__all__ = ["PriorConditioning", "DenseConditional", "SparseConditional", "LinearOperator",
           "haar_blocks", "haar_operators", "normal_log_prob"]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


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


class LinearOperator:
    """A linear map given by ``matvec`` and ``rmatvec`` on column blocks ``(n, batch)``."""

    def __init__(self, matvec, rmatvec):
        self.matvec, self.rmatvec = matvec, rmatvec

    def __call__(self, x):
        """Apply to a float64 tensor of rows ``(num, n_in) -> (num, n_out)``, differentiably."""
        return _NumpyLinear.apply(x, self)


def _sparse_nbytes(mat):
    """Bytes held by a scipy CSR/CSC matrix."""
    return mat.data.nbytes + mat.indices.nbytes + mat.indptr.nbytes


def normal_log_prob(z):
    """Standard normal log density summed over all but the first axis, ``(num,)``."""
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * _LOG_2PI


# -- haar coordinates of matrices -----------------------------------------------------------------


def haar_operators(n):
    """Sparse rows of the 2x2 Haar transform on an n x n lattice: H_a ``(m^2, n^2)``, H_d ``(3m^2, n^2)``."""
    rows = np.repeat(np.arange(n // 2), 2)
    s = sp.csr_matrix((np.full(n, 2 ** -0.5), (rows, np.arange(n))), shape=(n // 2, n))
    d = sp.csr_matrix((np.tile([2 ** -0.5, -(2 ** -0.5)], n // 2), (rows, np.arange(n))),
                      shape=(n // 2, n))
    h_d = sp.vstack([sp.kron(s, d), sp.kron(d, s), sp.kron(d, d)])
    return sp.kron(s, s, format="csr"), h_d.tocsr()


def haar_blocks(cov):
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


class DenseConditional:
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


class SparseConditional:
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
        self._details = LinearOperator(self._details_mv, self._details_rmv)
        self._whiten = LinearOperator(self._whiten_mv, self._whiten_rmv)
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
        conditional: Law of the details given the averages: a :class:`DenseConditional` or
            :class:`SparseConditional` (``details``, ``whiten``, ``logdet``, ``nbytes``).
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
