"""Test-bed forward models with exact posteriors: linear ``y = G x`` and quadratic ``y = <phi, x>^2``."""

import logging
import math

import numpy as np
import torch

__all__ = [
    "cell_integrals",
    "LinearForward",
    "QuadraticForward",
    "ExactLinearPosterior",
    "ExactQuadraticPosterior",
    "ExactQuadraticsPosterior",
]

logger = logging.getLogger(__name__)

UNIT_SQUARE = (0.0, 1.0, 0.0, 1.0)


def cell_integrals(phi, shape, bounds=UNIT_SQUARE, *, order=6):
    """Integrals of ``phi`` over the cells of a lattice, by tensor Gauss-Legendre per cell.

    ``out[i, j] = int_{cell (i, j)} phi(x, y) dx dy`` with row ``i`` along y (first row at the
    bottom) and column ``j`` along x. The rule is exact for polynomials of degree ``2 order - 1``
    in each variable on each cell.

    Args:
        phi: ``phi(x, y)`` evaluated elementwise on numpy arrays of equal shape.
        shape: ``(ny, nx)`` cells of the lattice.
        bounds: ``(x0, x1, y0, y1)`` of the lattice.
        order: Gauss-Legendre points per cell and direction.

    Returns:
        ndarray ``(ny, nx)`` float64.
    """
    ny, nx = shape
    x0, x1, y0, y1 = bounds
    xs, wx = _cell_nodes(x0, x1, nx, order)
    ys, wy = _cell_nodes(y0, y1, ny, order)
    X, Y = np.meshgrid(xs, ys)
    values = np.broadcast_to(np.asarray(phi(X, Y), dtype=np.float64), X.shape)
    weighted = values * wy[:, None] * wx[None, :]
    return weighted.reshape(ny, order, nx, order).sum(axis=(1, 3))


def _cell_nodes(a, b, n, order):
    """Gauss-Legendre nodes and weights of each of ``n`` equal cells of ``[a, b]``, flattened."""
    xi, w = np.polynomial.legendre.leggauss(order)
    h = (b - a) / n
    left = a + h * np.arange(n)[:, None]
    return (left + 0.5 * h * (xi + 1.0)).ravel(), np.tile(0.5 * h * w, n)


def _sum_children(G, shape, new_shape):
    """Coarsen cell integrals ``G (k, ny*nx)`` to ``new_shape`` by summing child cells."""
    (ny, nx), (my, mx) = shape, new_shape
    if ny % my or nx % mx:
        raise ValueError(f"shape {tuple(new_shape)} does not coarsen {tuple(shape)} by whole cells")
    blocks = G.reshape(-1, my, ny // my, mx, nx // mx)
    return blocks.sum(axis=(2, 4)).reshape(G.shape[0], my * mx)


class _LatticeFunctionals:
    """Cell integrals ``G[k, cell] = int_cell phi_k`` of measurement functions on a lattice."""

    twice_differentiable = True       # all in torch: second derivatives by autograd

    def __init__(self, G, shape, bounds, functions, order):
        self.shape = tuple(int(s) for s in shape)
        self.bounds = tuple(float(b) for b in bounds)
        self.matrix = np.asarray(G, dtype=np.float64).reshape(-1, self.shape[0] * self.shape[1])
        self.functions = functions
        self.order = order
        self.n_solves = 0
        self.last_failures = []

    @property
    def n_obs(self):
        return self.matrix.shape[0]

    def _apply(self, x):
        """``x (num, ny, nx) -> (num, n_obs)`` float64, differentiable; counts one solve per sample."""
        x = torch.as_tensor(x)
        if x.dim() != 3 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"expected fields of shape (num, {self.shape[0]}, {self.shape[1]}), "
                             f"got {tuple(x.shape)}")
        self.n_solves += x.shape[0]
        G = torch.as_tensor(self.matrix, dtype=torch.float64)
        return x.reshape(x.shape[0], -1).to(torch.float64) @ G.T

    def _shaped_matrix(self, shape):
        """The cell-integral matrix on another lattice of the same bounds."""
        if self.functions is not None:
            return np.stack([cell_integrals(f, shape, self.bounds, order=self.order).ravel()
                             for f in self.functions])
        return _sum_children(self.matrix, self.shape, shape)


class LinearForward(_LatticeFunctionals):
    """Linear forward model ``y = G x`` with ``G[k, cell] = int_cell phi_k(s) ds``.

    ``G x`` is the integral ``int phi_k x ds`` of the piecewise-constant field ``x``, so the model
    is consistent across levels: ``F_{l}(upsample(x)) == F_{l-1}(x)``.

    Args:
        functions: measurement functions ``phi_k(x, y)`` on numpy arrays.
        shape: ``(ny, nx)`` of the parameter lattice.
        bounds: ``(x0, x1, y0, y1)`` of the lattice.
        order: Gauss-Legendre points per cell and direction.

    Attributes:
        matrix: ``G``, ndarray ``(n_obs, ny * nx)`` (row-major cells).
        n_obs, shape, n_solves, last_failures: as for every forward model.
    """

    def __init__(self, functions, shape, *, bounds=UNIT_SQUARE, order=6):
        functions = list(functions)
        G = np.stack([cell_integrals(f, shape, bounds, order=order).ravel() for f in functions])
        super().__init__(G, shape, bounds, functions, order)

    @classmethod
    def from_matrix(cls, G, shape, *, bounds=UNIT_SQUARE):
        """Linear model from an explicit ``G (n_obs, ny * nx)``; coarse levels sum child cells."""
        self = cls.__new__(cls)
        _LatticeFunctionals.__init__(self, G, shape, bounds, None, None)
        return self

    def __call__(self, x):
        """``y = G x``: Tensor ``(num, ny, nx) -> (num, n_obs)`` in the dtype of ``x``."""
        return self._apply(x).to(torch.as_tensor(x).dtype)

    def with_shape(self, shape):
        """The same model on another lattice of the same bounds (e.g. a coarser level)."""
        model = LinearForward.from_matrix(self._shaped_matrix(shape), shape, bounds=self.bounds)
        model.functions, model.order = self.functions, self.order
        return model

    def at_level(self, level):
        """The same model on the ``2**level x 2**level`` lattice."""
        return self.with_shape((2**level, 2**level))


def paper_phi(x, y):
    """The MsIGN paper's measurement function ``phi(s) = sin(pi s1) sin(2 pi s2)``."""
    return np.sin(np.pi * x) * np.sin(2.0 * np.pi * y)


class QuadraticForward(_LatticeFunctionals):
    """Quadratic forward model ``y_k = <phi_k, x>^2`` (MsIGN paper, synthetic problem).

    ``<phi, x> = sum_cells w_cell x_cell`` with ``w_cell = int_cell phi``, so the model is consistent
    across levels. ``n_obs`` is the number of measurement functions (one in the paper). Each
    observation is blind to the sign of its ``<phi_k, x>``: with k functions the posterior can
    have up to 2^k modes.

    Args:
        shape: ``(ny, nx)`` of the parameter lattice.
        phi: ``phi(x, y)`` on numpy arrays, or a sequence of them; default
            ``sin(pi x) sin(2 pi y)``.
        bounds: ``(x0, x1, y0, y1)``; default the unit square.
        order: Gauss-Legendre points per cell and direction.

    Attributes:
        matrix: ``W``, ndarray ``(n_obs, ny * nx)`` with ``y = (W x)^2`` elementwise.
        functional: ``w = W[0]`` of a model with one function.
    """

    def __init__(self, shape, *, phi=paper_phi, bounds=UNIT_SQUARE, order=6):
        functions = list(phi) if isinstance(phi, (list, tuple)) else [phi]
        G = np.stack([cell_integrals(f, shape, bounds, order=order).ravel() for f in functions])
        super().__init__(G, shape, bounds, functions, order)

    @property
    def functional(self):
        if self.matrix.shape[0] != 1:
            raise ValueError(f"the model has {self.matrix.shape[0]} measurement functions; "
                             "their functionals are the rows of .matrix")
        return self.matrix[0]

    def __call__(self, x):
        """``y = (W x)^2``: Tensor ``(num, ny, nx) -> (num, n_obs)`` in the dtype of ``x``."""
        return self._apply(x).square().to(torch.as_tensor(x).dtype)

    def with_shape(self, shape):
        """The same model on another lattice of the same bounds (e.g. a coarser level)."""
        return QuadraticForward(shape, phi=list(self.functions), bounds=self.bounds,
                                order=self.order)

    def at_level(self, level):
        """The same model on the ``2**level x 2**level`` lattice."""
        return self.with_shape((2**level, 2**level))


class _Gaussian:
    """Dense Gaussian ``N(mean, cov)`` in float64 torch: sampling and normalised log density."""

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        cov = torch.as_tensor(np.asarray(cov, dtype=np.float64))
        self.cov = 0.5 * (cov + cov.T)
        self.chol = torch.linalg.cholesky(self.cov)
        self.dim = self.mean.numel()
        half_logdet = torch.log(torch.diagonal(self.chol)).sum()
        self.log_norm = float(-half_logdet - 0.5 * self.dim * math.log(2.0 * math.pi))

    def sample(self, num, generator=None):
        """Samples ``(num, d)`` float64."""
        z = torch.randn(num, self.dim, generator=generator, dtype=torch.float64)
        return self.mean + z @ self.chol.T

    def log_prob(self, x):
        """``log N(x; mean, cov)`` for ``x (num, d)`` float64, differentiable."""
        r = torch.linalg.solve_triangular(self.chol, (x - self.mean).T, upper=False)
        return self.log_norm - 0.5 * r.square().sum(dim=0)


def _flat(x, dim):
    """``x (num, ...) -> float64 tensor (num, dim)`` and the input dtype."""
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.float64
    return x.reshape(x.shape[0], dim).to(torch.float64), dtype


def _shaped(x, shape, dtype):
    return (x if shape is None else x.reshape(x.shape[0], *shape)).to(dtype)


class ExactLinearPosterior:
    """Exact Gaussian posterior of ``y = G x + e``, ``x ~ N(m, S)``, ``e ~ N(0, diag(noise^2))``.

    Kalman form: ``K = S G^T (G S G^T + N)^-1``, posterior mean ``m + K (y - G m)`` and covariance
    ``S - K G S``; evidence ``p(y) = N(y; G m, G S G^T + N)``.

    Args:
        prior_mean: ``(d,)``.
        prior_cov: ``(d, d)`` symmetric positive definite.
        G: ``(n_obs, d)``.
        data: ``(n_obs,)``.
        noise: observation std, scalar or ``(n_obs,)``.
        shape: optional lattice shape; samples are then ``(num, *shape)``.
    """

    def __init__(self, prior_mean, prior_cov, G, data, noise, *, shape=None):
        m, S = np.asarray(prior_mean, np.float64).ravel(), np.asarray(prior_cov, np.float64)
        G, y = np.atleast_2d(np.asarray(G, np.float64)), np.atleast_1d(np.asarray(data, np.float64))
        N = np.diag(np.broadcast_to(np.asarray(noise, np.float64), y.shape) ** 2)
        SGt = S @ G.T
        innovation = G @ SGt + N
        K = np.linalg.solve(innovation, SGt.T).T
        self.mean = m + K @ (y - G @ m)
        self.cov = S - K @ SGt.T
        self.shape = None if shape is None else tuple(shape)
        self._gauss = _Gaussian(self.mean, self.cov)
        self.log_evidence = float(_Gaussian(G @ m, innovation).log_prob(
            torch.as_tensor(y)[None])[0])

    def sample(self, num, generator=None, *, dtype=torch.float64):
        """Exact posterior samples ``(num, d)`` or ``(num, *shape)``."""
        return _shaped(self._gauss.sample(num, generator), self.shape, dtype)

    def log_prob(self, x):
        """Normalised posterior log density ``(num,)`` of ``x (num, ...)``, differentiable."""
        x, dtype = _flat(x, self._gauss.dim)
        return self._gauss.log_prob(x).to(dtype)


class ExactQuadraticPosterior:
    """Exact posterior of ``y = (w . x)^2 + e``, ``x ~ N(m, S)``, ``e ~ N(0, noise^2)``.

    The data see ``x`` only through ``t = w . x ~ N(m_t, s_t^2)`` with ``m_t = w . m`` and
    ``s_t^2 = w^T S w``, so ``p(x | y) = p(t | y) rho(x | t)`` with the prior conditional
    ``rho(x | t)`` and the 1-D posterior

        p(t | y) = N(t; m_t, s_t^2) N(y; t^2, noise^2) / Z,

    bimodal for ``y >> noise`` (modes near ``t = +-sqrt(y)``). ``Z = p(y)`` is computed by composite
    Gauss-Legendre quadrature on panels covering the support (``|t^2 - y| <= 40 noise`` and
    ``|t - m_t| <= 40 s_t``, outside which the integrand is below ``e^-800`` of its peak scale),
    with ``t = 0`` a panel edge. ``t`` is sampled by inverting the panel CDF (linear within a
    panel of width at most 1/32 of the narrowest feature), then ``x | t`` exactly by Matheron's
    rule ``x = x0 + S w (t - w . x0) / s_t^2`` with ``x0 ~ N(m, S)``.

    Args:
        prior_mean: ``(d,)``.
        prior_cov: ``(d, d)`` symmetric positive definite.
        w: ``(d,)`` functional, e.g. ``QuadraticForward.functional``.
        data: scalar ``y`` (or one observation).
        noise: observation std (scalar).
        shape: optional lattice shape; samples are then ``(num, *shape)``.
        order: Gauss-Legendre points per panel.

    Attributes:
        log_evidence: ``log Z = log p(y)`` (normalised likelihood).
        t_mean, t_std: ``m_t`` and ``s_t``.
    """

    def __init__(self, prior_mean, prior_cov, w, data, noise, *, shape=None, order=8):
        self._prior = _Gaussian(prior_mean, prior_cov)
        self.w = np.asarray(w, np.float64).ravel()
        self.y = float(np.asarray(data, np.float64).reshape(()))
        self.noise = float(np.asarray(noise, np.float64).reshape(()))
        cov = self._prior.cov.numpy()
        self._Sw = cov @ self.w
        self.t_mean = float(self.w @ self._prior.mean.numpy())
        self.t_std = math.sqrt(float(self.w @ self._Sw))
        self.shape = None if shape is None else tuple(shape)
        self._edges, self._log_mass = self._panels(order)
        self.log_evidence = float(np.logaddexp.reduce(self._log_mass))
        self._cdf = np.concatenate([[0.0], np.cumsum(np.exp(self._log_mass - self.log_evidence))])

    def t_log_density(self, t):
        """Normalised ``log p(t | y)`` of ``t`` (ndarray), numpy float64."""
        return self._log_joint(np.asarray(t, np.float64)) - self.log_evidence

    def _log_joint(self, t):
        """``log N(t; m_t, s_t^2) + log N(y; t^2, noise^2)`` (unnormalised in t)."""
        prior = -0.5 * ((t - self.t_mean) / self.t_std) ** 2 - math.log(self.t_std)
        lik = -0.5 * ((self.y - t**2) / self.noise) ** 2 - math.log(self.noise)
        return prior + lik - math.log(2.0 * math.pi)

    def _support(self):
        """Disjoint intervals covering the posterior of ``t``, split at 0."""
        r_lo = math.sqrt(max(self.y - 40.0 * self.noise, 0.0))
        r_hi = math.sqrt(max(self.y, 0.0) + 40.0 * self.noise)
        lo, hi = self.t_mean - 40.0 * self.t_std, self.t_mean + 40.0 * self.t_std
        pieces = [(max(-r_hi, lo), min(-r_lo, hi)), (max(r_lo, lo), min(r_hi, hi))]
        pieces = [(a, b) for a, b in pieces if b > a]
        if not pieces:
            raise ValueError(f"data y={self.y} has negligible probability under the prior "
                             f"(t ~ N({self.t_mean:.3g}, {self.t_std:.3g}^2), noise {self.noise:.3g})")
        return pieces

    def _panels(self, order):
        """Panel edges and the log of the unnormalised mass of each panel."""
        width = min(self.t_std, self.noise / (2.0 * math.sqrt(abs(self.y)) + math.sqrt(self.noise)))
        edges = [np.linspace(a, b, _n_panels(b - a, width / 32.0) + 1) for a, b in self._support()]
        xi, wq = np.polynomial.legendre.leggauss(order)
        left = np.concatenate([e[:-1] for e in edges])
        right = np.concatenate([e[1:] for e in edges])
        half = 0.5 * (right - left)
        nodes = left[:, None] + half[:, None] * (xi + 1.0)
        log_f = self._log_joint(nodes) + np.log(half[:, None] * wq)
        return (left, right), np.logaddexp.reduce(log_f, axis=1)

    def mode_mass(self):
        """Exact posterior probability ``P(t > 0 | y)`` by quadrature."""
        positive = self._edges[0] >= 0.0
        return float(np.exp(np.logaddexp.reduce(self._log_mass[positive]) - self.log_evidence)) \
            if positive.any() else 0.0

    def sample_t(self, num, generator=None):
        """Samples ``(num,)`` float64 of ``t | y`` by inverse CDF on the quadrature panels."""
        u = torch.rand(num, generator=generator, dtype=torch.float64).numpy()
        left, right = self._edges
        k = np.clip(np.searchsorted(self._cdf, u, side="right") - 1, 0, left.size - 1)
        frac = (u - self._cdf[k]) / np.maximum(self._cdf[k + 1] - self._cdf[k], 1e-300)
        return torch.as_tensor(left[k] + np.clip(frac, 0.0, 1.0) * (right[k] - left[k]))

    def sample(self, num, generator=None, *, dtype=torch.float64):
        """Exact posterior samples ``(num, d)`` or ``(num, *shape)``."""
        t = self.sample_t(num, generator)
        x0 = self._prior.sample(num, generator)
        shift = (t - x0 @ torch.as_tensor(self.w)) / self.t_std**2
        x = x0 + shift[:, None] * torch.as_tensor(self._Sw)
        return _shaped(x, self.shape, dtype)

    def log_prob(self, x):
        """Normalised ``log p(x | y) = log rho(x) + log N(y; t^2, noise^2) - log Z``, ``(num,)``."""
        x, dtype = _flat(x, self._prior.dim)
        t = x @ torch.as_tensor(self.w)
        lik = -0.5 * ((self.y - t.square()) / self.noise).square() \
            - math.log(self.noise) - 0.5 * math.log(2.0 * math.pi)
        return (self._prior.log_prob(x) + lik - self.log_evidence).to(dtype)

    def mode_fraction(self, x):
        """Fraction of samples ``x (num, ...)`` in the positive mode ``t = w . x > 0``."""
        x, _ = _flat(x, self._prior.dim)
        return float((x.detach() @ torch.as_tensor(self.w) > 0).double().mean())

    @property
    def critical_direction(self):
        """Unit vector ``S w / |S w|`` ``(d,)`` along which the two modes are displaced."""
        return self._Sw / np.linalg.norm(self._Sw)


class ExactQuadraticsPosterior:
    """Exact posterior of ``y_k = (w_k . x)^2 + e_k``, k = 1..K, ``x ~ N(m, S)``, when the
    ``t_k = w_k . x`` are independent under the prior (``w_j^T S w_k = 0``, j != k).

    The likelihood then factorises over the ``t_k``, so the ``t_k | y`` are independent with
    the 1-D posteriors of :class:`ExactQuadraticPosterior`, and ``x | t`` is the prior
    conditional: Matheron's rule ``x = x0 + sum_k S w_k (t_k - w_k . x0) / s_k^2`` with
    ``x0 ~ N(m, S)`` (the K rank-one updates do not interact because the ``S w_k`` are
    ``S^-1``-orthogonal). The posterior has up to 2^K modes, one per orthant of ``t``.

    Args:
        prior_mean: ``(d,)``.
        prior_cov: ``(d, d)`` symmetric positive definite.
        W: ``(K, d)`` functionals, e.g. ``QuadraticForward.matrix``.
        data: ``(K,)``.
        noise: observation std, scalar or ``(K,)``.
        shape: optional lattice shape; samples are then ``(num, *shape)``.

    Attributes:
        parts: the K :class:`ExactQuadraticPosterior` of the ``t_k``.
        log_evidence: ``log p(y)``, the sum of the parts'.

    Raises:
        ValueError: two directions correlated under the prior (relative covariance above
            1e-8): the posterior does not factorise.
    """

    def __init__(self, prior_mean, prior_cov, W, data, noise, *, shape=None):
        W = np.atleast_2d(np.asarray(W, np.float64))
        data = np.asarray(data, np.float64).ravel()
        noise = np.broadcast_to(np.asarray(noise, np.float64), data.shape)
        cov = np.asarray(prior_cov, np.float64)
        t_cov = W @ cov @ W.T
        scale = np.sqrt(np.outer(np.diag(t_cov), np.diag(t_cov)))
        off = np.abs(t_cov - np.diag(np.diag(t_cov))) / scale
        if off.max() > 1e-8:
            raise ValueError(f"the directions are correlated under the prior (largest "
                             f"correlation {off.max():.3g}): the posterior does not factorise")
        self.parts = [ExactQuadraticPosterior(prior_mean, cov, w, y, e)
                      for w, y, e in zip(W, data, noise)]
        self._prior = self.parts[0]._prior
        self.W, self.shape = W, None if shape is None else tuple(shape)
        self.log_evidence = float(sum(p.log_evidence for p in self.parts))

    def orthant_masses(self):
        """Exact posterior mass ``(2^K,)`` of each orthant of t; orthant ``j`` has ``t_k > 0``
        where bit k of ``j`` is set."""
        plus = np.array([p.mode_mass() for p in self.parts])
        K = len(plus)
        bits = (np.arange(2 ** K)[:, None] >> np.arange(K)) & 1
        return np.prod(np.where(bits == 1, plus, 1 - plus), axis=1)

    def sample(self, num, generator=None, *, dtype=torch.float64):
        """Exact posterior samples ``(num, d)`` or ``(num, *shape)``."""
        t = torch.stack([p.sample_t(num, generator) for p in self.parts], 1)
        x = self._prior.sample(num, generator)
        x0t = x @ torch.as_tensor(self.W).T
        for k, p in enumerate(self.parts):
            x = x + ((t[:, k] - x0t[:, k]) / p.t_std**2)[:, None] * torch.as_tensor(p._Sw)
        return _shaped(x, self.shape, dtype)

    def log_prob(self, x):
        """Normalised ``log p(x | y) = log rho(x) + sum_k log N(y_k; t_k^2, noise_k^2) -
        log p(y)``, ``(num,)``."""
        x, dtype = _flat(x, self._prior.dim)
        t = x @ torch.as_tensor(self.W).T
        lik = sum(-0.5 * ((p.y - t[:, k].square()) / p.noise).square() - math.log(p.noise)
                  - 0.5 * math.log(2.0 * math.pi) for k, p in enumerate(self.parts))
        return (self._prior.log_prob(x) + lik - self.log_evidence).to(dtype)

    def orthant(self, x):
        """Orthant index ``(num,)`` of samples ``x (num, ...)`` (bit k set where t_k > 0)."""
        x, _ = _flat(x, self._prior.dim)
        t = x.detach() @ torch.as_tensor(self.W).T
        return ((t > 0).long() << torch.arange(t.shape[1])).sum(1)


def _n_panels(length, width, *, cap=2_000_000):
    n = int(math.ceil(length / width))
    if n > cap:
        logger.warning("quadrature needs %d panels; capped at %d (accuracy reduced)", n, cap)
    return max(min(n, cap), 64)
