r"""Low-rank Laplace approximation of a posterior with a Gaussian prior, matrix-free.

In the prior's whitened coordinates z (x = mu + C z, C C^T = Sigma_prior, z ~ N(0, I)) the
negative log posterior is 1/2 |z|^2 + Phi(x(z)), Phi the data misfit. The Laplace
approximation is the Gaussian

.. math:: \mathcal N\bigl(z_{\rm MAP},\ (I + \tilde H)^{-1}\bigr),\qquad
    \tilde H = C^T J^T \Gamma^{-1} J C,

with J = dF/dx at the MAP point, Gamma the noise covariance and H~ the prior-preconditioned
Gauss-Newton Hessian of the misfit. H~ is applied matrix-free (one tangent-linear and one
adjoint solve per vector, :func:`linearise`), and its dominant eigenpairs H~ = V Lambda V^T
are found by a randomized double-pass method (Halko, Martinsson and Tropp 2011, Alg. 5.3; as
hIPPYlib does). Its rank is at most the number of observations; the method doubles the
number of probe vectors until the smallest eigenvalue found is below
:data:`EIGENVALUE_CUTOFF` (or the rank bound is reached), so the cost grows with the rank,
not with the lattice. Then

.. math:: (I + \tilde H)^{-1/2} = I - V \bigl(I - (I + \Lambda)^{-1/2}\bigr) V^T,

and x = mu + C (z_MAP + (I + H~)^{-1/2} u), u ~ N(0, I), is the Laplace posterior in the
same transport-map form as a trained flow (:class:`LaplaceTransport`): generalized pCN is pCN
in its coordinates u, accepted on the weight pi / q_Laplace (:mod:`.correction`).

The MAP point is found by L-BFGS with a strong-Wolfe line search in z from eight prior draws,
each run until the whitened gradient's norm is below :data:`MAP_GRADIENT` (a bound on the
Newton decrement, so the point is within that many posterior standard deviations of the
mode whatever the noise level); the highest end point is the MAP point, and end points that
are other local maxima are reported (:attr:`LaplaceFit.other_modes`): one Gaussian cannot
represent a multimodal posterior, and importance weights cannot reveal a mode it does not
reach.

References:
    Bui-Thanh, Ghattas, Martin, Stadler. A computational framework for infinite-dimensional
    Bayesian inverse problems, Part I. SIAM J. Sci. Comput. 35 (2013).
    Villa, Petra, Ghattas. hIPPYlib: an extensible software framework for large-scale inverse
    problems governed by PDEs. ACM TOMS 47 (2021).
    Pinski, Simpson, Stuart, Weber. Algorithms for Kullback-Leibler approximation of
    probability measures in infinite dimensions. SIAM J. Sci. Comput. 37 (2015) (gpCN);
    Rudolf, Sprungk. On a generalization of the preconditioned Crank-Nicolson Metropolis
    algorithm. Found. Comput. Math. 18 (2018).
"""

import dataclasses
import logging
import math

import numpy as np
import torch

from geoinvert.samplers.whitening import prior_whitening, standard_normal_log_prob

__all__ = ["EIGENVALUE_CUTOFF", "MAP_GRADIENT", "LaplaceFit", "LaplaceTransport", "fit_laplace",
           "linearise"]

logger = logging.getLogger(__name__)

_F64 = torch.float64

EIGENVALUE_CUTOFF = 1e-2
"""Eigenvalues of H~ below it are left out: along such a direction the posterior variance is
within 1 % of the prior's."""

MAP_GRADIENT = 1e-3
"""The MAP searches stop when |grad log pi|_2 in the prior's whitened coordinates z is below
it. Near a mode, |z - z*|_H = |g|_{H^-1} <= |g|_2 max_i sigma_i, with sigma_i the Laplace
posterior's standard deviations, which are at most 1 (the prior's) along every direction; so
the end point is within 1e-3 posterior std of the mode in the metric of the mode's own
Hessian, for sharp and broad data alike. (A tolerance relative to the gradient at the start
is not: with precise data the start's gradient is ~1e8, and the searches stopped a hundred
nats below the modes.)"""

_OVERSAMPLING = 10
_FIRST_PROBES = 40
_MAP_ITERATIONS = 500
_MAP_STARTS = 8        # prior draws
_MAX_STARTS = 128      # ... at most, while a mode is reached from one draw only (all_modes)
_NEWTON_STEPS = 4      # Gauss-Newton refinements of the MAP point at most
_NEWTON_STEP_TOL = 1e-7   # ... a step below it (in prior std) needs no new Hessian
_SEPARATION = 3.0      # end points further apart (in Laplace standard deviations) are modes
_MASS_GAP = 10.0       # ... and count when their log posterior is within this of the MAP's


# -- the linearised forward model ---------------------------------------------------------------


@dataclasses.dataclass
class Linearisation:
    """F linearised at one field x: ``jvp(v)`` = J v for directions ``v (r, ny, nx)`` and
    ``vjp(w)`` = J^T w for cotangents ``w (r, n_obs)``, float64 tensors; ``solves`` counts the
    PDE solves made so far (a forward solve at x per direction, one tangent-linear and one
    adjoint solve per product)."""

    jvp: callable
    vjp: callable
    solves: list


def linearise(forward, x):
    """The :class:`Linearisation` of ``forward`` at ``x (ny, nx)``.

    Models solved outside torch (``solve_batch``, ``jvp_batch``, ``vjp_batch``, e.g.
    :class:`~geoinvert.problem.forward.elliptic.EllipticForward`) use their tangent-linear and adjoint
    solves; other (torch) forward models use automatic differentiation.
    """
    x = torch.as_tensor(x, dtype=_F64).detach()
    solves = [0]
    if hasattr(forward, "jvp_batch") and hasattr(forward, "solve_batch"):
        cache = {}

        def state(r):
            if r not in cache:                       # the factorisations of r copies of x
                cache.clear()
                cache[r] = forward.solve_batch(np.repeat(x.numpy()[None], r, axis=0))[1]
                solves[0] += r
            return cache[r]

        def jvp(v):
            solves[0] += v.shape[0]
            return torch.from_numpy(forward.jvp_batch(state(v.shape[0]), v.numpy()))

        def vjp(w):
            solves[0] += w.shape[0]
            return torch.from_numpy(forward.vjp_batch(state(w.shape[0]), w.numpy()))
    else:
        def jvp(v):
            solves[0] += 2 * v.shape[0]
            xs = x.expand(v.shape[0], *x.shape).contiguous()
            return torch.autograd.functional.jvp(lambda t: forward(t).to(_F64), xs, v)[1]

        def vjp(w):
            solves[0] += w.shape[0]
            xs = x.expand(w.shape[0], *x.shape).clone().requires_grad_(True)
            (g,) = torch.autograd.grad(forward(xs).to(_F64), xs, grad_outputs=w)
            return g
    return Linearisation(jvp, vjp, solves)


# -- the Laplace Gaussian as a transport map ----------------------------------------------------


class LaplaceTransport:
    r"""x = T(u) = mu + C (z_MAP + (I + H~)^{-1/2} u): the Laplace posterior as the push-forward
    of u ~ N(0, I), with the interface of :class:`~.correction.FlowTransport`.

    Args:
        whitening: the prior's :class:`~geoinvert.samplers.whitening.Whitening` (x = mu + C z).
        z_map: ``(d,)`` the MAP point in whitened coordinates.
        eigenvalues: ``(r,)`` of H~, positive; eigenvectors: ``(d, r)`` orthonormal.
        log_target: log pi at the MAP point (for :attr:`log_mass`).
    """

    method = "laplace"

    def __init__(self, whitening, z_map, eigenvalues, eigenvectors, *, log_target=math.nan):
        self.whitening, self.log_target = whitening, log_target
        self.z_map = torch.as_tensor(z_map, dtype=_F64)
        self.eigenvalues = torch.as_tensor(eigenvalues, dtype=_F64)
        self.eigenvectors = torch.as_tensor(eigenvectors, dtype=_F64)
        self.dim = self.z_map.numel()
        self._shrink = 1 - torch.rsqrt(1 + self.eigenvalues)      # I - (I + Lambda)^-1/2
        self._grow = torch.sqrt(1 + self.eigenvalues) - 1         # (I + Lambda)^1/2 - I
        self.logdet = whitening.logdet - 0.5 * float(torch.log1p(self.eigenvalues).sum())

    @property
    def log_mass(self):
        """Laplace estimate of log int pi over the mode, up to a constant common to all modes
        of one posterior: log pi(x_MAP) - 1/2 log det(I + H~)."""
        return self.log_target - 0.5 * float(torch.log1p(self.eigenvalues).sum())

    def to_x(self, u):
        """``(x (num, ny, nx), log|det dT/du| (num,))`` of ``u (num, d)``."""
        u = u.to(_F64)
        z = self.z_map + u - (u @ self.eigenvectors * self._shrink) @ self.eigenvectors.T
        return self.whitening.to_x(z), torch.full((u.shape[0],), self.logdet, dtype=_F64)

    def to_z(self, x):
        """``u (num, d)`` of fields ``x``, the inverse of :meth:`to_x`."""
        dz = self.whitening.to_z(torch.as_tensor(x, dtype=_F64)) - self.z_map
        return dz + (dz @ self.eigenvectors * self._grow) @ self.eigenvectors.T

    def log_prob(self, x):
        """Laplace log density of fields ``x (num, ny, nx)``."""
        return standard_normal_log_prob(self.to_z(x)) - self.logdet

    def moments(self, prior_variance):
        r"""The Laplace posterior's exact mean and marginal standard deviations,
        ``(mean (ny, nx), std (ny, nx))``: the mean is T(0), and with x = mu + C z,

            Var x = diag(C C^T) - sum_k lambda_k / (1 + lambda_k) (C v_k)^2,

        the prior's variances less the low-rank update, r + 1 applications of C. With no
        eigenpair kept (the data leave the MAP point's Hessian below the cut-off, as at a
        point where the forward map's Jacobian vanishes) the variances are the prior's.

        Args:
            prior_variance: ``(ny, nx)`` the prior's marginal variances, diag(C C^T).
        """
        mean = self.to_x(torch.zeros(1, self.dim, dtype=_F64))[0][0]
        variance = torch.as_tensor(prior_variance, dtype=_F64)
        if self.eigenvalues.numel():
            origin = self.whitening.to_x(torch.zeros(1, self.dim, dtype=_F64))[0]
            directions = self.whitening.to_x(self.eigenvectors.T.contiguous()) - origin  # C v_k
            weights = self.eigenvalues / (1 + self.eigenvalues)
            variance = variance - torch.einsum("k,kij->ij", weights, directions ** 2)
        return mean.numpy(), variance.clamp(min=0).sqrt().numpy()

    def sample(self, num, generator=None):
        """``(x (num, ny, nx), log_prob (num,))``."""
        u = torch.randn((num, self.dim), generator=generator, dtype=_F64)
        x, _ = self.to_x(u)
        return x, standard_normal_log_prob(u) - self.logdet


# -- MAP point and Hessian ----------------------------------------------------------------------


@dataclasses.dataclass
class LaplaceFit:
    """A fitted Laplace approximation.

    Attributes:
        transport: :class:`LaplaceTransport` (sample, log_prob, to_x, to_z).
        x_map: ``(ny, nx)`` the MAP field; log_target_map: the log posterior there.
        gradient: |grad log pi|_2 at the MAP point, in the prior's whitened coordinates.
        converged: whether it is within 10 times :data:`MAP_GRADIENT`.
        iterations: target evaluations of the MAP search.
        eigenvalues: ``(r,)`` the kept eigenvalues of H~, decreasing.
        probes: probe vectors of the last randomized pass.
        nfs: PDE solves in all (search evaluations, each with its adjoint, count once).
        other_modes: log posterior gaps to the other local maxima the searches found (empty
            when all ended at the MAP point): a Gaussian at one mode misses their mass.
        modes: the :class:`LaplaceTransport` of each distinct mode, the MAP point's first
            (the others only with ``all_modes``).
        search_unfinished: with ``all_modes``, the repeated searches stopped at
            :data:`_MAX_STARTS` prior draws with a mode still reached from one draw only:
            modes may be missing.
        failed: search evaluations whose forward solve failed (the line search backed off).
    """

    transport: LaplaceTransport
    x_map: torch.Tensor
    log_target_map: float
    gradient: float
    converged: bool
    iterations: int
    eigenvalues: torch.Tensor
    probes: int
    nfs: int
    other_modes: list
    modes: list
    search_unfinished: bool = False
    failed: int = 0


class _Evaluator:
    """log pi and its gradient in whitened coordinates, counting evaluations and those whose
    solve failed."""

    def __init__(self, posterior, whitening):
        self.posterior, self.whitening, self.calls, self.failed = posterior, whitening, 0, 0

    def __call__(self, z):
        z = z.detach().requires_grad_(True)
        value = self.posterior.log_prob(self.whitening.to_x(z[None])).to(_F64)[0]
        self.calls += 1
        if not torch.isfinite(value):
            self.failed += 1
            return value.detach(), torch.zeros_like(z)
        (g,) = torch.autograd.grad(value, z)
        return value.detach(), g


def _ascend(evaluate, start, max_iterations):
    """L-BFGS (strong Wolfe) ascent from ``start (d,)`` until |grad|_2 <= :data:`MAP_GRADIENT`
    (L-BFGS tests |grad|_inf, against MAP_GRADIENT / sqrt(d), which implies it):
    ``(z, log pi, grad)``."""
    z = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=max_iterations,
                                  max_eval=int(1.25 * max_iterations),
                                  tolerance_grad=MAP_GRADIENT / math.sqrt(z.numel()),
                                  tolerance_change=1e-15,
                                  history_size=20, line_search_fn="strong_wolfe")

    worst = 0.0         # the largest finite objective so far (the start's is finite)

    def closure():
        nonlocal worst
        value, g = evaluate(z)
        if not torch.isfinite(value):
            # failed solve: repel the line search with a value above every finite one seen.
            # Finite, so that the Wolfe search's cubic interpolation stays finite: +inf made
            # it NaN, and the rest of the ascent evaluated NaN fields.
            z.grad = torch.zeros_like(z)
            return torch.tensor(worst + 1.0 + abs(worst), dtype=_F64)
        z.grad = -g
        worst = max(worst, -float(value.detach()))
        return -value

    optimizer.step(closure)
    value, g = evaluate(z)
    return z.detach(), value, g


def _find_maps(evaluate, dim, starts, generator, max_iterations):
    """Ascents from ``starts`` prior draws (not from the prior mean: in a symmetric problem it
    is often a saddle point with zero gradient): the end points by decreasing log pi."""
    points = list(torch.randn((starts, dim), generator=generator, dtype=_F64))
    first = [evaluate(p) for p in points]
    if not any(torch.isfinite(v) for v, _ in first):
        raise ValueError(f"the posterior is not finite at any of {starts} prior draws (their "
                         "forward solves failed): no start for the MAP search")
    ends = [_ascend(evaluate, p, max_iterations)
            for p, (v, _) in zip(points, first) if torch.isfinite(v)]
    ends = [e for e in ends if torch.isfinite(e[1])]
    return sorted(ends, key=lambda e: -float(e[1]))


def _hessian_operator(posterior, whitening, lin):
    """``apply(V (d, r)) -> H~ V (d, r)`` at the linearisation point."""
    noise2 = torch.as_tensor(posterior.noise, dtype=_F64) ** 2
    dim = 4 ** posterior.level
    origin = whitening.to_x(torch.zeros(1, dim, dtype=_F64))

    def apply(v):
        vz = v.T.contiguous()                                    # (r, d)
        dx = whitening.to_x(vz) - origin                         # C v: the map is affine
        w = lin.jvp(dx.detach()) / noise2
        g = lin.vjp(w)                                           # J^T Gamma^-1 J C v
        zs = torch.zeros_like(vz, requires_grad=True)
        (ctg,) = torch.autograd.grad(whitening.to_x(zs), zs, grad_outputs=g)
        return ctg.T
    return apply


def _double_pass(apply, dim, probes, generator):
    """Eigenpairs (decreasing) of a symmetric operator from ``probes`` random vectors."""
    omega = torch.randn((dim, probes), generator=generator, dtype=_F64)
    q, _ = torch.linalg.qr(apply(omega))
    t = q.T @ apply(q)
    values, vectors = torch.linalg.eigh(0.5 * (t + t.T))
    order = torch.argsort(values, descending=True)
    return values[order], q @ vectors[:, order]


def _eigenpairs(posterior, whitening, z, generator):
    """Eigenpairs of H~ at ``z`` above the cut-off: ``(values, vectors, probes, solves)``."""
    dim = z.numel()
    lin = linearise(posterior.forward, whitening.to_x(z[None])[0].detach())
    apply = _hessian_operator(posterior, whitening, lin)
    bound = min(dim, posterior.n_obs)
    probes = min(bound, _FIRST_PROBES + _OVERSAMPLING)
    while True:
        values, vectors = _double_pass(apply, dim, probes, generator)
        if probes >= bound or values[-min(_OVERSAMPLING, probes - 1)] < EIGENVALUE_CUTOFF:
            break
        probes = min(bound, 2 * probes)
    keep = values > EIGENVALUE_CUTOFF
    return values[keep], vectors[:, keep], probes, lin.solves[0]


def _refine(posterior, whitening, evaluate, z, value, grad, generator):
    """Gauss-Newton steps with the low-rank Hessian from where L-BFGS stopped (exact for a
    linear model; the Hessian is recomputed at the new point unless the step was tiny):
    ``(z, log pi, grad, transport, probes, solves)``."""
    solves = 0
    for _ in range(_NEWTON_STEPS):
        values, vectors, probes, used = _eigenpairs(posterior, whitening, z, generator)
        solves += used
        step = grad - (vectors @ ((grad @ vectors) * values / (1 + values)))
        new_value, new_grad = evaluate(z + step)
        if not (torch.isfinite(new_value) and new_value >= value):
            break
        z, value, grad = z + step, new_value, new_grad
        if float(step.abs().max()) < _NEWTON_STEP_TOL:
            break
    transport = LaplaceTransport(whitening, z, values, vectors, log_target=float(value))
    return z, value, grad, transport, probes, solves


def _nearest(transports, z):
    """The index of the first mode in ``transports`` whose centre lies within
    :data:`_SEPARATION` of its Laplace standard deviations from ``z``, or None."""
    for k, t in enumerate(transports):
        if float(t.to_z(t.whitening.to_x(z[None]))[0].norm()) <= _SEPARATION:
            return k
    return None


def fit_laplace(posterior, *, generator=None, max_iterations=_MAP_ITERATIONS,
                all_modes=False):
    """The low-rank Laplace approximation of ``posterior`` (module docstring).

    Args:
        posterior: :class:`~geoinvert.problem.posterior.Posterior` with a Gaussian multiscale prior
            (``prior``, ``level``, ``forward``, ``noise``).
        generator: ``torch.Generator`` of the probe vectors.
        max_iterations: L-BFGS iterations of each MAP search.
        all_modes: also fit a Laplace approximation at every other mode found
            (:attr:`LaplaceFit.modes`), not only at the MAP point. When the first
            :data:`_MAP_STARTS` searches find several modes, the search is repeated from as
            many fresh prior draws as were used so far (8, 8, 16, 32, ... at most
            :data:`_MAX_STARTS` in all), at least once, until every mode has been reached
            from at least two draws (a mode reached from a fraction p of the prior draws is
            missed by n of them with probability (1 - p)^n).

    Returns:
        :class:`LaplaceFit`.

    Raises:
        ValueError: the posterior is not finite at any start of the searches.
    """
    whitening = prior_whitening(posterior.prior, posterior.level)
    evaluate = _Evaluator(posterior, whitening)
    dim = 4 ** posterior.level
    ends = _find_maps(evaluate, dim, _MAP_STARTS, generator, max_iterations)
    z_map, value, grad, transport, probes, solves = _refine(
        posterior, whitening, evaluate, *ends[0], generator)
    x_map = whitening.to_x(z_map[None])[0].detach()
    value = float(value)
    gradient = float(grad.norm())
    converged = gradient <= 10 * MAP_GRADIENT
    if not converged:
        logger.warning("MAP search stopped after %d evaluations with the gradient norm at "
                       "%.1e (not converged, wanted %.0e): the Laplace approximation is "
                       "centred off the mode", evaluate.calls, gradient, MAP_GRADIENT)
    modes, gaps, found, hits = [transport], [], [(z_map, value, grad)], [1]
    others = []          # without all_modes: the other maxima, in the MAP point's coordinates

    def survey(ends):
        """Add the distinct modes among ``ends`` within the mass gap and count the draws that
        reach each mode."""
        nonlocal solves
        for z, other, g in ends:
            gap = value - float(other)
            if gap >= _MASS_GAP:
                continue
            near = _nearest(modes, z)
            if near is not None:
                hits[near] += 1
                continue
            if not all_modes:        # two ends at one maximum count once
                u = transport.to_z(whitening.to_x(z[None]))[0]
                if not any(float((u - v).norm()) <= _SEPARATION for v in others):
                    others.append(u)
                    gaps.append(gap)
                continue
            z, other, g, mode, _, used = _refine(posterior, whitening, evaluate, z, other, g,
                                                 generator)
            solves += used
            near = _nearest(modes, mode.z_map)
            if near is not None:     # refined onto a mode already found
                hits[near] += 1
                continue
            gaps.append(gap)
            found.append((z, float(other), g))
            modes.append(mode)
            hits.append(1)

    survey(ends[1:])
    starts = _MAP_STARTS
    while all_modes and len(modes) > 1 and (starts == _MAP_STARTS or 1 in hits) \
            and starts < _MAX_STARTS:
        # several modes: search again from as many fresh prior draws as so far, at least
        # once, until every mode has been reached from two draws or more (Good's estimate of
        # the chance that a further draw leads to a mode not yet seen, the number of modes
        # reached from one draw over the number of draws, is then zero)
        try:
            more = _find_maps(evaluate, dim, starts, generator, max_iterations)
        except ValueError:
            break
        survey(more)
        starts *= 2
    unfinished = all_modes and len(modes) > 1 and 1 in hits
    if unfinished:
        logger.warning("the MAP searches still reached a mode from one draw only after %d "
                       "prior draws (%d modes): there may be more", starts, len(modes))
    if all_modes and starts > _MAP_STARTS:
        best = max(range(len(modes)), key=lambda k: found[k][1])
        if found[best][1] > value + 1e-6:    # a later search found a higher mode: the MAP
            modes.insert(0, modes.pop(best))
            z_map, value, grad = found[best]
            transport, x_map = modes[0], whitening.to_x(z_map[None])[0].detach()
            gradient = float(grad.norm())
            converged = gradient <= 10 * MAP_GRADIENT
        gaps = [value - float(m.log_target) for m in modes[1:]]
        logger.info("the MAP searches found %d modes from %d prior draws", len(modes), starts)
    values = transport.eigenvalues
    logger.info("Laplace: MAP log posterior %.6g after %d evaluations (gradient norm %.1e); "
                "Hessian rank %d of %d (largest eigenvalue %.3g) from %d probes; %d "
                "other modes", value, evaluate.calls, gradient, values.numel(), dim,
                float(values[0]) if values.numel() else math.nan, probes, len(gaps))
    return LaplaceFit(transport, x_map, value, gradient, converged, evaluate.calls, values,
                      probes, evaluate.calls + solves, gaps, modes, bool(unfinished),
                      evaluate.failed)


