r"""Constrained HMC on the lifted data manifold: a kernel whose metric follows the posterior's ridge.

In the prior's whitened coordinates z (x = mu + C z, z ~ N(0, I)) with residuals
r(z) = (F(x) - y) / noise, the posterior is N(z; 0, I) exp(-|r(z)|^2 / 2). Lifted to
q = (z, eta) in R^(d + m), it is N(q; 0, I) restricted to the manifold

    M = {q : c(q) = r(z) + eta = 0},

the graph of -r. By the co-area formula the density of q on M with respect to its surface
measure, N(q; 0, I) det(G(q))^(-1/2) with G = Dc Dc^T = I + J J^T (J = dr/dz), has the posterior
as its z-marginal: the surface element det(I + J^T J)^(1/2) dz cancels the determinant. The
metric M induces on z is I + J^T J, the Gauss-Newton Hessian, so Hamiltonian dynamics on M
follow the ridge's curvature, as Riemannian-manifold HMC would, without the metric's
derivatives (Au, Graham and Thiery, "Manifold lifting: scaling Markov chain Monte Carlo to the
vanishing noise regime", JRSS B 2023; Brubaker, Salzmann and Urtasun 2012).

:func:`lifted_transition` integrates the potential |q|^2 / 2 + 1/2 log det G(q) with RATTLE: a
half kick and a projection of the momentum onto the tangent space, a position step
q' = q + h p - Dc(q)^T lambda solved for c(q') = 0 by Newton's method (one forward solve per
iteration), the momentum (q' - q) / h projected at q', a reversibility check (the position
step back from q' must return to q; Zappa, Holmes-Cerfon and Goodman 2018, Lelievre, Rousset
and Stoltz 2019), and a second half kick; then a Metropolis test on the energy. The gradient
of 1/2 log det G = tr(W^T J) with W = G^-1 J held fixed comes from second-order adjoints
(:meth:`~geoinvert.problem.forward.elliptic.EllipticForward.trace_gradient_batch`) or, for
torch forward models, from automatic differentiation. The Jacobian, the second-order adjoints
and the projections reuse each point's factorisation: a step costs the forward solves of its
two Newton solves (about four each on the suite's 8x8 ridges).

The correction runs it as ``sampler.correction.kernel: lifted`` (:class:`LiftedKernel`);
``benchmarks/suite/lifted.py`` measures it against the correction's HMC.
"""

import math

import numpy as np
import torch

from geoinvert.samplers.chains import WhitenedState
from geoinvert.samplers.whitening import prior_whitening

__all__ = ["LiftedKernel", "LiftedManifold", "check_forward", "lifted_transition",
           "quarter_period"]

_F64 = torch.float64
_NEWTON_TOL = 1e-9            # the constraint, in noise units
_NEWTON_ITERATIONS = 40
_REVERSIBLE = 1e-7            # how close the step back must come to its start (whitened units)


class LiftedManifold:
    """The posterior's lifted manifold: residuals, their Jacobian, the log-determinant's
    gradient and the projections, batched over chains (numpy arrays).

    Args:
        posterior: :class:`~geoinvert.problem.posterior.Posterior` with a Gaussian prior and
            likelihood; its forward model either solves outside torch (``solve_batch``,
            ``jacobian_batch``, ``trace_gradient_batch``: the serial elliptic model) or is a
            differentiable torch model.
        force: integrate the log-determinant's gradient (without it the Metropolis test still
            counts the term, so the chain stays exact, but where many data inform the field the
            term changes by nats along a trajectory and the acceptance collapses).

    Attributes:
        nfs: forward solves so far; failed: those that failed; back_substitutions: adjoint,
            tangent-linear and second-order solves with kept factorisations (not counted in
            ``nfs``).
    """

    def __init__(self, posterior, *, force=True):
        w = prior_whitening(posterior.prior, posterior.level)
        d = 4 ** posterior.level
        with torch.no_grad():                   # x = mu + C z is affine: C's columns at once
            self.mu = w.to_x(torch.zeros(1, d, dtype=_F64))[0].numpy()
            self.C = (w.to_x(torch.eye(d, dtype=_F64)).reshape(d, -1).numpy()
                      - self.mu.reshape(1, -1)).T
        self.shape, self.d = self.mu.shape, d
        self.y = np.asarray(posterior.data, float)
        self.noise = np.broadcast_to(np.asarray(posterior.noise, float), self.y.shape).copy()
        self.m = self.y.size
        self.forward, self.force = posterior.forward, force
        self.outside_torch = hasattr(self.forward, "solve_batch")
        check_forward(self.forward)
        self.nfs = self.back_substitutions = self.failed = 0

    # -- coordinates ---------------------------------------------------------------------------
    def to_x(self, z):
        """Fields ``(c, ny, nx)`` of whitened ``z (c, d)``."""
        return (self.mu.reshape(-1)[None] + z @ self.C.T).reshape(z.shape[0], *self.shape)

    def to_z(self, x):
        """Whitened coordinates of fields ``x (c, ny, nx)``."""
        flat = np.asarray(x, float).reshape(len(x), -1) - self.mu.reshape(-1)
        return np.linalg.solve(self.C, flat.T).T

    def lift(self, x):
        """The state ``(q, r, J, force)`` of fields ``x`` on M: eta = -r."""
        z = self.to_z(x)
        r, jac, force = self.evaluate(z)
        return np.concatenate([z, -r], axis=1), r, jac, force

    # -- the residual map ----------------------------------------------------------------------
    def evaluate(self, z, wanted=None):
        """``(r (c, m), J (c, m, d), force (c, d + m))`` at ``z (c, d)``: the residuals in noise
        units, their Jacobian and the gradient of 1/2 log det G (zero without ``force``, and in
        the rows outside ``wanted(r) -> (c,) bool``, default all: its second-order adjoints are
        the costliest part); NaN rows where the solve failed."""
        c = z.shape[0]
        x = self.to_x(z)
        self.nfs += c
        force = np.zeros((c, self.d + self.m))
        if self.outside_torch:
            pred, state = self.forward.solve_batch(x)
            with np.errstate(invalid="ignore", over="ignore"):  # failed rows: counted below
                jac = self.forward.jacobian_batch(state).reshape(c, self.m, -1) @ self.C
        else:
            pred, jac, grad = self._torch(z)
        self.back_substitutions += c * self.m
        r = (pred - self.y) / self.noise
        jac = jac / self.noise[None, :, None]
        bad = ~np.all(np.isfinite(r), axis=1) | ~np.all(np.isfinite(jac), axis=(1, 2))
        self.failed += int(bad.sum())
        rows = (np.ones(c, bool) if wanted is None else wanted(r)) & ~bad
        if self.force and rows.any():
            finite = np.where(bad[:, None, None], 0.0, jac)     # a failed row's force is NaN
            w = np.linalg.solve(self.gram(finite), finite)
            w[~rows] = 0.0                   # rows are independent: the others' are unchanged
            if self.outside_torch:
                force[:, : self.d] = self._trace_gradient(state, w / self.noise[None, :, None])
            else:
                force[:, : self.d] = grad(w)
        r[bad], jac[bad], force[bad] = np.nan, np.nan, np.nan
        return r, jac, force

    def _trace_gradient(self, state, w):
        """grad_z tr(W^T J(z)) by second-order adjoints, as sum_i a_i^T (dF/dx) b_i with the
        fewer of m or d terms (``w`` is W scaled to the forward model's units)."""
        c = w.shape[0]
        if self.m <= self.d:
            a, b = np.repeat(np.eye(self.m)[None], c, axis=0), w @ self.C.T
        else:
            a, b = w.transpose(0, 2, 1), np.repeat(self.C.T[None], c, axis=0)
        g = self.forward.trace_gradient_batch(state, a, b.reshape(c, -1, *self.shape))
        self.back_substitutions += c * (2 * a.shape[1] + 1)
        return g.reshape(c, -1) @ self.C

    def _torch(self, z):
        """Predictions, the Jacobian in z and ``grad(W) -> grad_z tr(W^T J)`` of a torch model."""
        C = torch.as_tensor(self.C)
        mu = torch.as_tensor(self.mu.reshape(-1))
        zt = torch.as_tensor(z).requires_grad_(True)

        def model(zi):
            return self.forward((mu + C @ zi).reshape(1, *self.shape))[0].to(_F64)
        jacs = [torch.autograd.functional.jacobian(model, zi, create_graph=True) for zi in zt]
        jac = torch.stack(jacs)
        with torch.no_grad():
            pred = self.forward(torch.as_tensor(self.to_x(z))).to(_F64).numpy()

        def grad(w):
            if not jac.requires_grad:                  # a linear model: J is constant
                return np.zeros_like(z)
            scaled = torch.as_tensor(w) / torch.as_tensor(self.noise)[None, :, None]
            (g,) = torch.autograd.grad((jac * scaled).sum(), zt, allow_unused=True)
            return np.zeros_like(z) if g is None else g.detach().numpy()
        return pred, jac.detach().numpy(), grad

    # -- geometry ------------------------------------------------------------------------------
    def gram(self, jac):
        """G = Dc Dc^T = I + J J^T, ``(c, m, m)``."""
        return np.eye(self.m)[None] + jac @ jac.transpose(0, 2, 1)

    def project(self, p, jac):
        """The momenta ``p (c, d + m)`` projected onto the tangent spaces (Dc = [J, I])."""
        d = self.d
        lam = np.linalg.solve(self.gram(jac), jac @ p[:, :d, None] + p[:, d:, None])[..., 0]
        out = p.copy()
        out[:, :d] -= (jac.transpose(0, 2, 1) @ lam[..., None])[..., 0]
        out[:, d:] -= lam
        return out

    def retract(self, q0, jac0, step, *, with_force=True):
        """Solve c(q0 + step - Dc(q0)^T lambda) = 0 for lambda by Newton's method, per chain.
        The force is evaluated at the converged points only, and not at all without ``with_force``
        (the reversibility check needs none).

        Returns:
            ``(q, r, J, force, ok)``; ``ok (c,)`` is False where it did not converge.
        """
        d, c = self.d, q0.shape[0]
        lam, q = np.zeros((c, self.m)), q0 + step
        r, jac = np.full((c, self.m), np.nan), np.full((c, self.m, d), np.nan)
        force = np.full((c, d + self.m), np.nan)
        ok, active = np.zeros(c, bool), np.ones(c, bool)
        for _ in range(_NEWTON_ITERATIONS):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            at = q[idx, d:]
            r[idx], jac[idx], force[idx] = self.evaluate(
                q[idx, :d], wanted=lambda r: with_force & (np.abs(r + at).max(1) < _NEWTON_TOL))
            con = r[idx] + at
            finite = np.all(np.isfinite(con), axis=1)
            done = finite & (np.abs(con).max(1) < _NEWTON_TOL)
            ok[idx[done]] = True
            active[idx[done | ~finite]] = False
            go = idx[finite & ~done]
            if go.size == 0:
                continue
            a = np.eye(self.m)[None] + jac[go] @ jac0[go].transpose(0, 2, 1)  # Dc(q_k) Dc(q0)^T
            try:
                delta = np.linalg.solve(a, con[finite & ~done][..., None])[..., 0]
            except np.linalg.LinAlgError:
                active[go] = False
                continue
            lam[go] += delta
            q[go, :d] -= (jac0[go].transpose(0, 2, 1) @ delta[..., None])[..., 0]
            q[go, d:] -= delta
            active[go[np.abs(lam[go]).max(1) > 1e8]] = False          # diverging
        return q, r, jac, force, ok

    def energy(self, q, p, jac):
        """H = |q|^2 / 2 + 1/2 log det G + |p|^2 / 2 per chain."""
        logdet = np.linalg.slogdet(self.gram(jac))[1]
        return 0.5 * (q * q).sum(1) + 0.5 * logdet + 0.5 * (p * p).sum(1)

    def log_posterior(self, q):
        """The posterior's log density at the states, up to its constant: -|q|^2 / 2."""
        return -0.5 * (q * q).sum(1)


def check_forward(forward):
    """Raise ``NotImplementedError`` unless ``forward`` solves outside torch with the Jacobian
    and second-order adjoints (the serial elliptic solver), or is a torch model that declares
    ``twice_differentiable`` (its graph has second derivatives: the test beds; a torch module
    around a solver whose adjoint has no derivative of its own would give the Gram
    determinant's force as zero)."""
    solver = getattr(forward, "solver", forward)          # EllipticForward's own
    if hasattr(forward, "solve_batch"):
        if not hasattr(solver, "trace_gradient_batch"):
            raise NotImplementedError("the lifted kernel needs the forward model's Jacobian "
                                      "and second-order adjoints")
    elif not getattr(forward, "twice_differentiable", False):
        raise NotImplementedError("the lifted kernel needs the forward model's second "
                                  "derivatives, which this torch model does not declare")


def lifted_transition(manifold, state, step, n_steps, rng):
    """One constrained HMC transition of every chain.

    Args:
        manifold: :class:`LiftedManifold`.
        state: ``(q (c, d + m), r, J, force)`` on M (:meth:`LiftedManifold.lift`).
        step: leapfrog step; n_steps: leapfrog steps.
        rng: ``numpy.random.Generator`` (fresh momenta, the Metropolis test).

    Returns:
        ``(state, acceptance probabilities (c,), failed trajectories)``: a trajectory fails
        where a Newton solve did not converge or the reversibility check did not hold; it is
        rejected.
    """
    q, _, jac, _ = state
    c = q.shape[0]
    p = manifold.project(rng.standard_normal(q.shape), jac)
    h0 = manifold.energy(q, p, jac)
    q1, r1, j1, f1 = (a.copy() for a in state)
    p1, alive = p.copy(), np.ones(c, bool)
    for _ in range(n_steps):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        qa, ja = q1[idx], j1[idx]
        pa = manifold.project(p1[idx] - 0.5 * step * (qa + f1[idx]), ja)
        qn, rn, jn, fn, ok = manifold.retract(qa, ja, step * pa)
        jn, fn = np.nan_to_num(jn), np.nan_to_num(fn)
        pn = manifold.project(np.where(ok[:, None], (qn - qa) / step, 0.0), jn)
        qb, _, _, _, okb = manifold.retract(qn, jn, -step * pn, with_force=False)
        back = ok & okb & (np.abs(qb - qa).max(1) < _REVERSIBLE)
        pn = manifold.project(pn - 0.5 * step * (qn + fn), jn)
        alive[idx[~back]] = False
        keep = idx[back]
        q1[keep], r1[keep], j1[keep], f1[keep], p1[keep] = (qn[back], rn[back], jn[back],
                                                           fn[back], pn[back])
    h1 = np.where(alive, manifold.energy(q1, p1, j1), np.inf)
    accept = np.nan_to_num(np.exp(np.minimum(h0 - h1, 0.0)), nan=0.0)
    flags = rng.random(c) < accept
    new = tuple(a.copy() for a in state)
    for a, b in zip(new, (q1, r1, j1, f1)):
        a[flags] = b[flags]
    return new, accept, int((~alive).sum())


def quarter_period(step, most):
    """Leapfrog steps of ``step`` integrating for pi / 2 (where M is flat the dynamics rotate
    with period 2 pi), at most ``most``."""
    return min(max(1, math.ceil(0.5 * math.pi / step)), most)


class LiftedKernel(WhitenedState):
    """The lifted kernel as a chain state of the correction: it moves on M in the prior's
    coordinates and keeps the correction's own view of the chains (its coordinates ``z``, the
    pulled-back target ``value`` and ``log_prob``) in step, for the independence moves and the
    flow's density at the draws.

    Args:
        target: :class:`~geoinvert.inference.correction.LatentTarget` (its transport maps the
            correction's coordinates to fields; no solve is needed to place a field there).
            With several modes (:class:`~geoinvert.inference.correction.ModeCoordinates`)
            the kernel's moves are not restricted to a chain's mode region: the lifted
            kernel is reversible for the whole posterior on its own, and a chain that
            crosses into another mode's region is placed in that mode's coordinates, where
            the mode jumps and independence moves take it from.
        x: starting fields ``(chains, ny, nx)``.
        most: most leapfrog steps a transition takes (it integrates for a quarter period).
        jitter: relative step jitter per transition, in [0, 1).

    A chain moved by another move (:meth:`accept`, e.g. an independence move) is lifted again,
    one forward solve, before its next transition. Every solve is counted in ``target.nfs``,
    and failed ones in ``target.failed``.
    """

    def __init__(self, target, x, *, most, jitter=0.2):
        super().__init__(target, x)
        self.manifold = LiftedManifold(target.posterior)
        self.most, self.jitter, self.n_leapfrog = most, jitter, 1
        self.lifted = self.manifold.lift(self.x.numpy())
        self.stale = np.zeros(self.z.shape[0], bool)
        self._counted = (0, 0)
        self._count()

    def _count(self):
        nfs, failed = self.manifold.nfs, self.manifold.failed
        self.target.nfs += nfs - self._counted[0]
        self.target.failed += failed - self._counted[1]
        self._counted = (nfs, failed)

    def accept(self, flags, z, x, value, grad, log_prob):
        super().accept(flags, z, x, value, grad, log_prob)
        self.stale |= flags.numpy()

    def step(self, eps, generator):
        if self.stale.any():
            rows = np.flatnonzero(self.stale)
            for a, b in zip(self.lifted, self.manifold.lift(self.x.numpy()[rows])):
                a[rows] = b
            self.stale[:] = False
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        h = eps * (1 + self.jitter * rng.uniform(-1.0, 1.0))
        self.n_leapfrog = quarter_period(h, self.most)
        before = self.lifted[0].copy()
        self.lifted, accept, _ = lifted_transition(self.manifold, self.lifted, h,
                                                   self.n_leapfrog, rng)
        self._count()
        moved = np.flatnonzero(np.any(self.lifted[0] != before, axis=1))
        if moved.size:
            self._place(moved)
        return torch.from_numpy(accept)

    def _place(self, rows):
        """The correction's view of chains ``rows`` at their new fields (coordinates, pulled-back
        target, log posterior), from the lifted state without a solve: y + noise r are the
        predictions."""
        t, post, m = self.target, self.target.posterior, self.manifold
        q, r = self.lifted[0][rows], self.lifted[1][rows]
        x = torch.from_numpy(m.to_x(q[:, : m.d]))
        pred = torch.from_numpy(m.y + m.noise * r)
        log_post = (post.prior.log_prob(x, post.level).to(_F64)
                    + post.likelihood.of_predictions(pred))
        index = torch.from_numpy(rows)
        u, modes = t.placed(x)
        u = u.detach().to(_F64)
        if modes is None:
            logdet = t.transport.to_x(t.latent(u))[1].detach().to(_F64)
        else:       # the chain may have crossed into another mode's region: it is placed there
            t.modes = t.modes.clone()
            t.modes[index] = modes
            logdet = t.transport.to_x(t.latent(u), modes)[1].detach().to(_F64)
        self.z[index], self.x[index] = u, x
        self.value[index] = log_post + logdet + t.logdet
        self.log_prob[index] = log_post
