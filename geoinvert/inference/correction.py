r"""Correction of a trained flow to exactness: MCMC in its latent space (NeuTra).

A trained flow T: z -> x (z ~ N(0, I), exact log-density log q_T) is used as a *transport-map
preconditioner* of the posterior pi(x). In the flow's latent space the pulled-back target

.. math:: \log \pi_T(z) = \log \pi(T(z)) + \log |\det \partial T / \partial z|

is close to N(0, I) where the flow fits, so the local kernels of
:mod:`geoinvert.samplers` (HMC, MALA, pCN) mix fast on it, and their Metropolis-Hastings
acceptance makes the draws exact whatever the flow's error. An *independence* move, a fresh
flow draw T(xi), xi ~ N(0, I), accepted with probability min(1, w(x') / w(x)), w = pi / q_T,
moves chains between the modes the flow covers, which local moves alone cannot.

During warm-up a further linear map z = S u is learnt (Stan's windowed adaptation: diagonal,
or dense when the window holds at least ``4 d`` draws), so that the chains stay efficient
where the flow is poor (an undertrained flow leaves pi_T far from N(0, I)). The step size is
adapted by dual averaging (pCN: Robbins-Monro on beta) and both are frozen after warm-up.
When, after the first block of draws, R-hat and ESS extrapolate to more draws than four times
the warm-up's iterations (at least ``draws``; at most ``max_draws``), the warm-up had
too few draws for the metric (Stan doubles its windows for the same reason): the block becomes
one more metric window, followed by a step phase, and its draws are dropped (at most twice;
not under a solve budget).
An HMC transition integrates for a quarter period, pi / 2, of the metric-whitened posterior
(for a unit Gaussian the end point is then independent of the start): pi / (2 eps) leapfrog
steps, capped by ``leapfrog``, frozen with eps after warm-up. During warm-up the length
follows the larger of the dual-averaging iterate and its running average (the step the
adaptation freezes): the iterate probes steps below the one it settles at, and a trajectory
sized to such a transient dip would cost many solves and integrate for no longer.

With several modes (:class:`ModeCoordinates`) each chain moves in the Laplace coordinates of
the mode whose region it is in, and its local moves are restricted to that region (a move
leaving it is rejected): each restricted kernel is reversible for the posterior restricted to
its region, so their combination is reversible for the posterior. One affine map cannot whiten
two modes at once: in the coordinates of one, a chain in the other moves with the wrong metric,
and a metric learnt from chains in both spans the distance between the modes. A chain's state
is then its coordinates u and its mode k, x = T_k(S u). Two moves carry chains between the
regions:

- a *mode jump* after each local move proposes the same u in another mode j, drawn uniformly:
  x' = T_j(S u), the field at the same place relative to mode j as x is to mode k (for Laplace
  maps, x' = m_j + L_j L_k^-1 (x - m_k)). The proposal is symmetric and (u, k) -> x is
  one-to-one onto the regions, so the jump is accepted with min(1, pi_u(u, j) / pi_u(u, k)),
  the pulled-back targets of the two modes (each with its map's log-determinant, -inf outside
  its region). Where the modes are alike up to their Laplace maps it is nearly always
  accepted, whatever the dimension, for one solve;
- the independence moves, which also sample within the modes where the flow and the Laplace
  fits are good proposals: they get the solves of the local move, as many independence moves
  following an HMC transition as it has leapfrog steps.

The lifted kernel (:class:`~geoinvert.samplers.lifted.LiftedKernel`) moves in the prior's
coordinates and is reversible for the whole posterior by itself, so its moves are not held to
a region: a chain it carries into another mode's region is placed there (its mode becomes
that region's, u its coordinates in that mode), which keeps k the region of x, all the jump
needs.

References:
    Pompe, Holmes, Latuszynski. A framework for adaptive MCMC targeting multimodal
    distributions. Annals of Statistics 48 (2020): jumps between modes through their local
    Gaussian approximations, on the state space augmented by the mode.
    Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan. NeuTra-lizing bad geometry in
    Hamiltonian Monte Carlo using neural transport. arXiv:1903.03704 (2019).
    Stan Reference Manual, "HMC algorithm parameters": windowed adaptation of the metric.
"""

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from geoinvert.inference.config import (LIFTED_BREAKEVEN, LIFTED_MAX_PARAMETERS,
                                        LIFTED_SOLVES_PER_ESS, metric_windows)
from geoinvert.samplers.chains import (ChainResult, DualAveraging, RobbinsMonro, WhitenedState,
                                       metropolis)
from geoinvert.samplers.hmc import HMCKernel
from geoinvert.samplers.lifted import LiftedKernel, check_forward
from geoinvert.samplers.mala import MALAKernel
from geoinvert.samplers.whitening import standard_normal_log_prob

__all__ = ["CorrectionResult", "FlowTransport", "LatentTarget", "ModeCoordinates", "ModeMixture",
           "correct"]

logger = logging.getLogger(__name__)

_F64 = torch.float64

_TARGET_ACCEPT = {"hmc": 0.8, "mala": 0.574, "pcn": 0.25, "lifted": 0.8}
_INITIAL_STEP = {"hmc": 0.3, "mala": 0.5, "pcn": 0.5, "lifted": 0.1}
_SHRINK = 5.0          # Stan's regularisation of the estimated metric: n / (n + 5) S + ...
_DENSE_DRAWS = 4       # dense metric when the window holds at least 4 d draws
_READAPTATIONS = 2     # most first blocks turned into further warm-up windows
_READAPT_WARMUPS = 4   # ... when the chains extrapolate to more draws than 4 warm-ups
_STEP_PHASE = 0.15     # step-only adaptation after a metric update, as a fraction of the warm-up
_TRAJECTORY = math.pi / 2   # HMC integration time: a quarter period of a unit Gaussian, after
#                           which its position is independent of where it started


# -- the transport and the latent target ------------------------------------------------------


class FlowTransport:
    """x = T(z) of a trained MsIGN, with ``z (num, d)`` the concatenated level noises.

    The model is copied to float64 (the chains' energies need it) with its parameters frozen.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN`, trained to its finest stage.
    """

    def __init__(self, model):
        from geoinvert.flows.msign import MsIGN, noise_shape
        copy = MsIGN(model.prior, **model.config, stage=model.stage).to(_F64)
        copy.load_state_dict(model.state_dict())
        self.model = copy.requires_grad_(False)
        self.shapes = [noise_shape(k) for k in range(1, model.levels + 1)]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.sizes)

    def to_x(self, z):
        """``(x (num, n, n), log|det dT/dz| (num,))`` of latents ``z (num, d)``, float64."""
        parts = torch.split(z.to(_F64), self.sizes, dim=1)
        zs = [p.reshape(-1, *s) for p, s in zip(parts, self.shapes)]
        return self.model.decode(zs)

    def _encode(self, x):
        """``(z (num, d), log|det dz/dx|)`` of fields ``x``."""
        zs, logdet = self.model.encode(torch.as_tensor(x, dtype=_F64))
        return torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1), logdet

    def to_z(self, x):
        """Latents ``z (num, d)`` of fields ``x``, the inverse of :meth:`to_x`."""
        return self._encode(x)[0]

    def log_prob(self, x):
        """Flow log density log q_T of fields ``x (num, n, n)``, float64."""
        with torch.no_grad():
            z, logdet = self._encode(x)
            return standard_normal_log_prob(z) + logdet

    def sample(self, num, generator=None):
        """``(x (num, n, n), log q_T (num,))`` of ``num`` flow draws."""
        with torch.no_grad():
            z = torch.randn((num, self.dim), generator=generator, dtype=_F64)
            x, logdet = self.to_x(z)
            return x, standard_normal_log_prob(z) - logdet


class ModeCoordinates:
    r"""Per-chain coordinates of a multimodal posterior: the Laplace approximations
    :math:`T_k` at its modes, each chain in those of the mode whose region holds its field.

    The region of a field x is the mode k with the largest :math:`\log m_k + \log N_k(x)`
    (Laplace mass and density: the mixture component most responsible for x). ``to_x`` and
    ``to_z`` take the mode of each row; :class:`LatentTarget` keeps the chains' modes and
    restricts each chain's local moves to its region.

    Args:
        modes: :class:`~geoinvert.inference.laplace.LaplaceTransport` of each mode (two or more).
    """

    method = "laplace"

    def __init__(self, modes):
        self.modes = list(modes)
        if len(self.modes) < 2:
            raise ValueError("ModeCoordinates needs two or more modes")
        self.dim = self.modes[0].dim
        self.log_masses = torch.tensor([m.log_mass for m in self.modes], dtype=_F64)

    def region(self, x):
        """The mode index ``(num,)`` of the region of each field ``x (num, ny, nx)``."""
        with torch.no_grad():
            scores = torch.stack([m.log_prob(x) for m in self.modes], 1)
            return torch.argmax(scores + self.log_masses, 1)

    def to_x(self, u, modes):
        """``(x, log|det dT/du|)`` of ``u (num, d)``, row i by the map of mode ``modes[i]``."""
        x, logdet = self.modes[0].to_x(u)
        for k, m in enumerate(self.modes[1:], 1):
            pick = modes == k
            if pick.any():
                xk, lk = m.to_x(u)
                x = torch.where(pick[:, None, None], xk, x)
                logdet = torch.where(pick, lk, logdet)
        return x, logdet

    def to_z(self, x, modes):
        """``u (num, d)`` of fields ``x``, row i in the coordinates of mode ``modes[i]``."""
        x = torch.as_tensor(x, dtype=_F64)
        u = torch.empty((x.shape[0], self.dim), dtype=_F64)
        for k, m in enumerate(self.modes):
            pick = modes == k
            if pick.any():
                u[pick] = m.to_z(x[pick])
        return u


class LatentTarget:
    r"""The posterior pulled back to the kernels' coordinates u, z = S u, x = T(z).

    log pi_u(u) = log pi(T(S u)) + log|det dT/dz| + log|det S|, with S the metric factor
    (identity until :meth:`set_metric`). The importance weight of the flow at the state is
    log w = log pi(x) - log q_T(x) = log pi_u(u) - log|det S| - log N(z; 0, I).

    Args:
        posterior: object with a differentiable ``log_prob(x)`` (the unnormalised posterior).
        transport: :class:`FlowTransport` (or any object with ``to_x``, ``to_z`` and ``dim``).

    With a :class:`ModeCoordinates` transport, ``modes`` holds each chain's mode (set by
    :meth:`to_z` from the chains' fields, moved by the mode jumps and independence moves),
    and the target of chain i is the posterior restricted to the region of mode
    ``modes[i]``: -inf outside it.

    Attributes:
        nfs: forward solves so far (one per evaluated point).
        failed: evaluations whose target was not finite (failed solves).
        exits: evaluations outside their chain's region (rejected moves; with several modes).
    """

    def __init__(self, posterior, transport):
        self.posterior, self.transport = posterior, transport
        self.nfs, self.failed, self.exits = 0, 0, 0
        self.factor, self.logdet = None, 0.0
        self.multimodal = isinstance(transport, ModeCoordinates)
        self.modes = None

    def set_metric(self, factor):
        """Use ``z = S u`` with ``S = factor``: ``(d,)`` diagonal or ``(d, d)`` lower triangular."""
        self.factor = None if factor is None else torch.as_tensor(factor, dtype=_F64)
        if self.factor is None:
            self.logdet = 0.0
        elif self.factor.ndim == 1:
            self.logdet = float(torch.log(self.factor).sum())
        else:
            self.logdet = float(torch.log(torch.diagonal(self.factor)).sum())

    def latent(self, u):
        """z = S u."""
        if self.factor is None:
            return u
        return u * self.factor if self.factor.ndim == 1 else u @ self.factor.T

    def coordinates(self, z):
        """u = S^-1 z."""
        if self.factor is None:
            return z
        if self.factor.ndim == 1:
            return z / self.factor
        return torch.linalg.solve_triangular(self.factor, z.T, upper=False).T

    def placed(self, x):
        """``(u, modes)``: kernel coordinates of fields ``x`` and, with several modes, the mode
        of each (whose coordinates u is in; None otherwise)."""
        if not self.multimodal:
            return self.coordinates(self.transport.to_z(x)), None
        modes = self.transport.region(torch.as_tensor(x, dtype=_F64))
        return self.coordinates(self.transport.to_z(x, modes)), modes

    def to_z(self, x):
        """Kernel coordinates u of the chains' fields ``x`` (with several modes, each chain
        is placed in its region's mode)."""
        u, modes = self.placed(x)
        if modes is not None:
            self.modes = modes
        return u

    def whitened(self, u, *, grad=True, modes=None):
        """``(x, log pi_u(u), grad log pi_u(u), log pi(x))`` at ``u (num, d)``.

        Non-finite targets (failed solves) get a zero gradient; with ``grad=False`` no
        adjoint is solved and the gradient is zero. With several modes, row i is in the
        coordinates of mode ``modes[i]`` (default: the chains' :attr:`modes`) and its target
        is -inf outside that mode's region.
        """
        u = u.detach().to(_F64).requires_grad_(grad)
        if self.multimodal:
            modes = self.modes if modes is None else modes
        with torch.set_grad_enabled(grad):
            if self.multimodal:
                x, logdet = self.transport.to_x(self.latent(u), modes)
            else:
                x, logdet = self.transport.to_x(self.latent(u))
            log_post = self.posterior.log_prob(x).to(_F64)
            value = log_post + logdet + self.logdet
        finite = torch.isfinite(value)
        self.nfs += u.shape[0]
        self.failed += int((~finite).sum())
        if self.multimodal:
            outside = self.transport.region(x.detach()) != modes
            self.exits += int((outside & finite).sum())
            value = torch.where(outside, -math.inf, value)
            finite = finite & ~outside
        if grad:
            (g,) = torch.autograd.grad(torch.where(finite, value, 0.0).sum(), u)
            g = torch.where(finite[:, None], g, 0.0)
        else:
            g = torch.zeros_like(u)
        return x.detach(), value.detach(), g.detach(), log_post.detach()

    def log_weight(self, u, value):
        """log w = log pi(x) - log q_T(x) of states ``u`` with targets ``value``."""
        return value - self.logdet - standard_normal_log_prob(self.latent(u))

    def flow_log_prob(self, u, value, log_post):
        """log q_T(x) of states ``u`` (the flow's density at the chains' fields)."""
        return log_post - self.log_weight(u, value)


# -- kernels ---------------------------------------------------------------------------------


class _PCNState(WhitenedState):
    """pCN in the flow's latent z: z' = sqrt(1 - beta^2) z + beta xi, reversible for N(0, I),
    accepted with min(1, w(x') / w(x)); beta = 1 is the independence sampler. No metric."""

    def step(self, beta, generator):
        xi = torch.randn(self.z.shape, generator=generator, dtype=_F64)
        z = math.sqrt(max(1 - beta ** 2, 0.0)) * self.z + beta * xi
        x, value, grad, log_prob = self.target.whitened(z, grad=False)
        t = self.target
        flags, prob = metropolis(t.log_weight(z, value) - t.log_weight(self.z, self.value),
                                 generator)
        self.accept(flags, z, x, value, grad, log_prob)
        return prob


def _independence_proposals(state, num, generator, *, gradient):
    """``num`` fresh flow draws for every chain, evaluated in one batch: the :class:`_Proposals`
    of ``num`` plain independence moves (the flow is the transport; the weight is w)."""
    t = state.target
    chains, dim = state.z.shape
    u = t.coordinates(torch.randn((num * chains, dim), generator=generator, dtype=_F64))
    x, value, grad, log_prob = t.whitened(u, grad=gradient)
    return _Proposals(u, None, x, value, grad, log_prob, t.log_weight(u, value), chains)


@dataclasses.dataclass
class _Proposals:
    """Independence proposals for ``num`` moves of every chain, row ``k * chains + i`` the
    proposal of move k to chain i: their kernel coordinates, modes (or None), fields, targets,
    gradients, posteriors and log weights (log pi - log of the proposal's density). An
    independence proposal does not depend on the state it is proposed from, so the proposals
    of several moves are drawn and evaluated together (one batch of solves and flow passes, not
    one per move) and then accepted or rejected move after move: the same Markov chain."""

    u: torch.Tensor
    modes: torch.Tensor | None
    x: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    log_prob: torch.Tensor
    log_weight: torch.Tensor
    chains: int

    def move(self, k):
        """The proposals of move ``k``, one per chain (``modes`` None without modes)."""
        rows = slice(k * self.chains, (k + 1) * self.chains)
        return (self.u[rows], None if self.modes is None else self.modes[rows], self.x[rows],
                self.value[rows], self.grad[rows], self.log_prob[rows], self.log_weight[rows])


def _independence_accept(state, proposals, k, generator, current):
    """Accept move ``k`` of ``proposals`` with min(1, w(x') / w(x)); ``current``: the log
    weight of the chains' states. Returns the acceptance probabilities and the log weights of
    the new states."""
    u, modes, x, value, grad, log_prob, log_weight = proposals.move(k)
    flags, prob = metropolis(torch.where(torch.isfinite(value), log_weight - current, -math.inf),
                             generator)
    state.accept(flags, u, x, value, grad, log_prob)
    if modes is not None:            # an accepted proposal moves its chain to its region
        state.target.modes = torch.where(flags, modes, state.target.modes)
    return prob, torch.where(flags, log_weight, current)


def _mode_jump(state, generator, *, gradient):
    """A mode jump of every chain (see the module's docstring): the same kernel coordinates in
    another mode, drawn uniformly, accepted with the ratio of the two pulled-back targets.
    Returns the acceptance probabilities."""
    t = state.target
    here = t.modes
    there = (here + torch.randint(1, len(t.transport.modes), here.shape,
                                  generator=generator)) % len(t.transport.modes)
    x, value, grad, log_prob = t.whitened(state.z, grad=gradient, modes=there)
    flags, prob = metropolis(torch.where(torch.isfinite(value), value - state.value, -math.inf),
                             generator)
    state.accept(flags, state.z, x, value, grad, log_prob)
    t.modes = torch.where(flags, there, here)
    return prob


class ModeMixture:
    r"""Independence proposal q_mix = (1 - eps) q + eps sum_k pi_k N_k: the approximation q
    (the trained flow) and the Laplace approximations N_k at the posterior modes found by
    optimisation, with eps = 1/2 (0 without modes) and pi_k proportional to the Laplace mode
    masses.

    A flow trained by the reverse KL can drop a mode; a chain started from its draws then never
    reaches it. Proposals from the Laplace components do, and the Metropolis-Hastings ratio on
    w = pi / q_mix keeps the chains exact and moves each mode's share to its true mass.

    Args:
        target: the :class:`LatentTarget` of the local moves.
        modes: :class:`~geoinvert.inference.laplace.LaplaceTransport` list (may be empty).
        approximation: the distribution q (``sample``, ``log_prob``); default the target's
            transport, whose draws are then made in the latent space directly.
    """

    FLOW_SHARE = 0.5

    def __init__(self, target, modes, approximation=None):
        self.target, self.modes = target, list(modes)
        self.approximation = approximation if approximation is not None else target.transport
        share = self.FLOW_SHARE if self.modes else 1.0
        masses = torch.tensor([m.log_mass for m in self.modes], dtype=_F64)
        self.log_weights = torch.cat((torch.tensor([math.log(share)], dtype=_F64),
                                      math.log(max(1 - share, 1e-300))
                                      + torch.log_softmax(masses, 0)))

    @property
    def latent(self):
        """True when q is the pushforward of N(0, I) by the target's transport."""
        return self.approximation is self.target.transport

    def approximation_log_prob(self, u, value, log_post, x):
        """log q at states ``u`` (the flow density at the chains' fields)."""
        if self.latent:
            return self.target.flow_log_prob(u, value, log_post)
        return self.approximation.log_prob(x).to(_F64)

    def log_prob(self, u, value, log_post, x):
        """log q_mix at states with kernel coordinates ``u``, targets ``value``, posterior
        ``log_post`` and fields ``x``."""
        parts = [self.approximation_log_prob(u, value, log_post, x)]
        parts += [m.log_prob(x) for m in self.modes]
        return torch.logsumexp(torch.stack(parts, 1) + self.log_weights[:len(parts)], 1)

    def sample(self, num, generator):
        """``(u (num, d), modes)``: kernel coordinates of ``num`` proposals and, with several
        modes in the target's coordinates, the mode each is placed in (else None)."""
        t = self.target
        which = torch.multinomial(self.log_weights.exp(), num, replacement=True,
                                  generator=generator)
        if self.latent:
            u = t.coordinates(torch.randn((num, t.transport.dim), generator=generator,
                                          dtype=_F64))
        else:
            u = torch.empty((num, t.transport.dim), dtype=_F64)
        modes = torch.zeros(num, dtype=torch.long) if t.multimodal else None
        components = [None if self.latent else self.approximation, *self.modes]
        for k, component in enumerate(components):
            pick = which == k
            if component is not None and pick.any():
                x, _ = component.sample(int(pick.sum()), generator)
                u[pick], placed = t.placed(x)
                if placed is not None:
                    modes[pick] = placed
        return u, modes


def _mixture_proposals(state, mixture, num, generator, *, gradient):
    """The :class:`_Proposals` of ``num`` moves from ``mixture`` for every chain, weighted by
    w = pi / q_mix."""
    t = state.target
    chains = state.z.shape[0]
    u, modes = mixture.sample(num * chains, generator)
    x, value, grad, log_prob = t.whitened(u, grad=gradient, modes=modes)
    q = mixture.log_prob(u, value, log_prob, x)
    return _Proposals(u, modes, x, value, grad, log_prob, log_prob - q, chains)


def _leapfrog(step, config, cap=None):
    """Leapfrog steps integrating for :data:`_TRAJECTORY` at ``step``, at most
    ``config.leapfrog`` (and ``cap``)."""
    most = config.leapfrog if cap is None else min(config.leapfrog, cap)
    return int(min(most, _quarter_period(step)))


def _warmup_leapfrog(adapter, config, cap=None):
    """Leapfrog steps of a warm-up transition made with the step iterate ``adapter.value``:
    those of a quarter period at the larger of the iterate and its running average
    (``adapter.final()``), so that a transient dip of the iterate does not lengthen the
    trajectory (the transition then integrates for less than a quarter period)."""
    return _leapfrog(max(adapter.value, adapter.final()), config, cap)


def _quarter_period(step):
    """Leapfrog steps of size ``step`` that integrate for :data:`_TRAJECTORY`."""
    return max(1, math.ceil(_TRAJECTORY / step))


def _new_state(kind, target, x, config):
    if kind == "hmc":
        return HMCKernel(target, x, n_leapfrog=_leapfrog(_INITIAL_STEP[kind], config),
                         jitter=0.2)
    if kind == "mala":
        return MALAKernel(target, x)
    if kind == "lifted":
        return LiftedKernel(target, x, most=config.leapfrog)
    return _PCNState(target, x)


# -- adaptation ------------------------------------------------------------------------------


def _metric(z, dense):
    """Regularised factor S of the covariance of latent draws ``z (n, d)``: diagonal std or
    the Cholesky factor, shrunk towards 1e-3 I as Stan does. A dense estimate too ill-
    conditioned to factorise (chains stuck far apart, so that some directions have a variance
    beyond 1e13 times the shrinkage) falls back to the diagonal one, with a log line."""
    n = z.shape[0]
    keep = n / (n + _SHRINK)
    if dense:
        cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
        cov = keep * cov + (1 - keep) * 1e-3 * torch.eye(z.shape[1], dtype=_F64)
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor
        logger.info("the correction's dense metric estimate cannot be factorised (largest "
                    "variance %.3g); a diagonal metric is used", float(cov.diagonal().max()))
    return torch.sqrt(keep * z.var(0) + (1 - keep) * 1e-3)


def _adapter(kind, step):
    if kind == "pcn":
        return RobbinsMonro(step, _TARGET_ACCEPT[kind], upper=1.0)
    return DualAveraging(step, _TARGET_ACCEPT[kind])


# -- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class CorrectionResult:
    """Corrected draws of a flow's posterior.

    Attributes:
        chains: :class:`~geoinvert.samplers.chains.ChainResult` of the kept draws
            (``log_prob`` is the unnormalised posterior; ``nfs`` all solves of the correction).
        flow_log_prob: ``(chains, draws)`` flow log density log q_T of each kept draw.
        independence_acceptance: ``(chains,)`` mean acceptance of the independence moves after
            warm-up (NaN without them).
        failed: evaluations whose target was not finite (failed solves of proposals).
        metric: ``"unit"``, ``"diagonal"`` or ``"dense"``.
        leapfrog: HMC leapfrog steps per transition after warm-up (None for other kernels).
        exits: local proposals rejected for leaving their chain's mode region (with
            :class:`ModeCoordinates`; else 0).
        independence_moves: independence moves per local move after warm-up.
        jump_acceptance: ``(chains,)`` mean acceptance of the mode jumps after warm-up (NaN
            with one mode).
        leapfrog_wanted: HMC leapfrog steps a quarter period takes at the final step, pi / (2
            step), when ``config.leapfrog`` cut the transitions shorter (else None).
        pilot_leapfrog: with kernel ``auto``, HMC's quarter period in leapfrog steps at the
            end of its first step-only phase, by which the kernel was chosen (None: no choice
            was made, the lifted kernel could not run).
        hmc_solves_per_ess: with kernel ``auto``, when HMC's first block of draws cost so
            many solves per effective draw that the lifted kernel took over after it (the
            second choice, :func:`_lifted_pays`); else None.
    """

    chains: ChainResult
    flow_log_prob: np.ndarray
    independence_acceptance: np.ndarray
    failed: int
    metric: str
    leapfrog: int = None
    exits: int = 0
    independence_moves: int = 1
    leapfrog_wanted: int = None
    jump_acceptance: np.ndarray = None
    pilot_leapfrog: int = None
    hmc_solves_per_ess: float = None


def correct(posterior, transport, starts, config, *, generator=None, callback=None, thin=1,
            initial_step=None, modes=(), extend=None, max_solves=None, approximation=None,
            pool=None):
    """Run ``starts.shape[0]`` chains of the corrected sampler from the fields ``starts``.

    Args:
        posterior: the finest level's posterior (``log_prob`` differentiable).
        transport: :class:`FlowTransport` of the trained flow, or any map with its interface
            (e.g. :class:`~geoinvert.inference.laplace.LaplaceTransport`: pCN on it is
            generalized pCN).
        starts: ``(chains, ny, nx)`` starting fields (flow draws with finite target).
        config: :class:`CorrectionConfig` (``chains`` is not used: ``starts`` sets the number).
        generator: ``torch.Generator``.
        callback: ``callback(iteration, total, acceptance)`` after every iteration.
        thin: iterations per kept draw after warm-up.
        initial_step: first step size (pCN: beta) of the adaptation; default per kernel.
        modes: Laplace approximations at the posterior's modes
            (:class:`~geoinvert.inference.laplace.LaplaceTransport`); with independence moves
            they join the flow in the proposal (:class:`ModeMixture`).
        approximation: the flow (``sample``, ``log_prob``, e.g. a :class:`FlowTransport`)
            when ``transport`` is another map (the Laplace approximation): it proposes the
            independence moves and its density is stored; default ``transport`` itself.
        extend: ``extend(samples (chains, n, ny, nx), log_prob (chains, n), nfs) -> int``,
            asked after the first ``config.draws`` draws and after every further block: the
            draws per chain to add before it is asked again (0: stop; blocks are at most
            ``config.draws`` long). Without it, or when it answers 0, or at
            ``config.max_draws`` draws per chain, the chains stop. When its answer after the
            first block asks for more draws in all than four times ``config.warmup`` (at
            least ``config.draws``, at most ``config.max_draws``), that block is taken as a
            further warm-up window instead (see the module's docstring).
        max_solves: solves the correction may use (a budget's share): HMC trajectories are
            shortened (down to one leapfrog step) so that the warm-up and the first block of
            draws fit in it.
        pool: ``pool(z) -> z``, the latent draws ``(n, d)`` of a metric window joined with
            those of the chains other processes run (an MPI ensemble's ``gather``, called at
            the same iterations on every process), so that every solve group learns the
            metric of all the chains' draws, as one process does; default these chains'.

    Returns:
        :class:`CorrectionResult`.

    Raises:
        ValueError: some start has a non-finite target.
    """
    if not config.enabled:
        raise ValueError("the correction is switched off (kernel 'none')")
    run = _Run(posterior, transport, starts, config, generator=generator, callback=callback,
               thin=thin, initial_step=initial_step, modes=modes, max_solves=max_solves,
               approximation=approximation, pool=pool)
    run.warm_up()
    return run.sample(extend)


class _Run:
    """The state of one :func:`correct` call: the chains, their kernel and its adaptation.

    Its phases are :meth:`warm_up` (step and metric adaptation; with kernel ``auto``, the
    first choice between HMC and the lifted kernel) and :meth:`sample` (blocks of draws until
    ``extend`` stops them; after the first block, the second choice and the re-adaptation).
    The order of every random draw and solve is part of the result: a run is reproducible
    bit for bit, so phases must not be reordered.
    """

    def __init__(self, posterior, transport, starts, config, *, generator, callback, thin,
                 initial_step, modes, max_solves, approximation, pool):
        self.begin = time.perf_counter()
        self.generator, self.callback, self.thin = generator, callback, thin
        self.max_solves, self.pool = max_solves, pool or (lambda z: z)
        self.target = target = LatentTarget(posterior, transport)
        self.transport = transport
        kind = config.kernel
        # auto: HMC, and at the end of its first step-only phase the lifted kernel if it can
        # run and HMC's trajectories cost more than its transitions (LIFTED_BREAKEVEN)
        self.pilot, self.pilot_leapfrog = 0, None     # the iteration auto chooses at, its measure
        if kind == "auto":
            if max_solves is None and _lifted_possible(target):
                self.pilot = int(_STEP_PHASE * config.warmup)
            kind, config = "hmc", dataclasses.replace(config, kernel="hmc")
        self.kind, self.config = kind, config
        self.state = _new_state(kind, target, torch.as_tensor(starts, dtype=_F64), config)
        self.step = _INITIAL_STEP[kind] if initial_step is None else initial_step
        self.adapter, self.metric = _adapter(kind, self.step), "unit"
        self.gradient = kind in ("hmc", "mala")
        proposal = ModeMixture(target, modes, approximation)
        # the plain independence move draws from the transport itself; any other proposal mixes
        self.mixture = proposal if config.independence and (modes or not proposal.latent) \
            else None
        self.density = proposal.approximation_log_prob   # the flow's density at stored draws
        self.chains = self.state.z.shape[0]
        self.maps = len(transport.modes) if target.multimodal else 1
        # an HMC iteration's solves are linear in its leapfrog steps
        # (config.solves_per_iteration)
        one = config.solves_per_iteration(1, self.maps)
        self.per_step = max(1, config.solves_per_iteration(2, self.maps) - one)
        self.fixed = one - self.per_step
        self.warmup = 0                     # iterations before the kept draws
        self.solves_per_ess = None          # the second choice's measure, when it switched
        # acceptance summed over the kept draws: local moves, independence moves, mode jumps
        self.accepted = [torch.zeros(self.chains, dtype=_F64) for _ in range(3)]

    # -- one iteration -------------------------------------------------------------------------
    def affordable(self, iterations):
        """Leapfrog steps that keep the rest of ``iterations`` within ``max_solves``."""
        if self.max_solves is None:
            return None
        left = (self.max_solves - self.target.nfs) / (self.chains * max(iterations, 1))
        return max(1, int((left - self.fixed) / self.per_step))

    def moves(self):
        """Independence moves per local move (:meth:`CorrectionConfig.independence_moves`)."""
        return self.config.independence_moves(getattr(self.state, "n_leapfrog", 1), self.maps)

    def iterate(self, step):
        """One iteration of every chain (:func:`_iterate`) at ``step``."""
        return _iterate(self.state, step, self.generator, self.config, self.gradient,
                        self.mixture, self.moves())

    def step_phase(self, adapter, n):
        """``n`` step-only adaptation iterations after the draws began (a re-adaptation's, or
        the lifted kernel's warm-up when it takes over); HMC's trajectories follow the step
        as in warm-up. Returns the step to freeze."""
        for _ in range(n):
            if self.kind == "hmc":
                self.state.n_leapfrog = _warmup_leapfrog(adapter, self.config)
            adapter.update(float(self.iterate(adapter.value)[0].mean()))
        return adapter.final()

    def take_over(self):
        """The lifted kernel continues the chains from their fields, with a fresh step
        adaptation (its warm-up is the caller's)."""
        self.kind, self.config, self.state, self.adapter = _lifted_takes_over(
            self.target, self.state, self.config)
        self.gradient = False

    # -- warm-up -------------------------------------------------------------------------------
    def warm_up(self):
        """Step and metric adaptation (Stan's windows for HMC and MALA); with kernel ``auto``,
        the first choice at the end of the first step-only phase."""
        config, target = self.config, self.target
        windows = metric_windows(config.warmup) if self.kind in ("hmc", "mala") else ()
        iterations, window = config.warmup_iterations(), []
        total = iterations + config.draws * self.thin
        i = 0
        while i < iterations:
            if self.kind == "hmc":
                self.state.n_leapfrog = _warmup_leapfrog(
                    self.adapter, config,
                    self.affordable(iterations - i + config.draws * self.thin))
            accept = float(self.iterate(self.adapter.value)[0].mean())
            self.adapter.update(accept)
            for lo, hi in windows:
                if lo <= i < hi:
                    window.append(target.latent(self.state.z).clone())
                if i == hi - 1:
                    self.metric = _rescale(self.state, self.pool(torch.cat(window)), self.kind)
                    self.adapter, window = _adapter(self.kind, self.adapter.value), []
            i += 1
            if i == self.pilot and self._first_choice():
                windows, window = (), []
                # the HMC phase stands for the lifted warm-up's first step-only phase
                config = self.config
                iterations = max(config.warmup_iterations(), i + 1)
                total = iterations + config.draws * self.thin
            if self.callback:
                self.callback(i, total, accept)
        self.warmup = iterations
        self.step = self.adapter.final()
        if self.kind == "hmc":
            self.state.n_leapfrog = _leapfrog(self.step, self.config,
                                              self.affordable(self.config.draws * self.thin))

    def _first_choice(self):
        """Whether the lifted kernel takes over after HMC's first step-only phase: HMC's
        quarter period (every process decides alike, from the mean of theirs) takes more
        than :data:`LIFTED_BREAKEVEN` leapfrog steps."""
        self.pilot_leapfrog = int(round(float(self.pool(torch.tensor(
            [[float(_quarter_period(self.adapter.final()))]], dtype=_F64)).mean())))
        if self.pilot_leapfrog <= LIFTED_BREAKEVEN:
            return False
        logger.info("HMC's quarter period takes %d leapfrog steps after its first step-only "
                    "phase, more than the %d at which the lifted kernel costs as much per "
                    "effective draw: the correction goes on with the lifted kernel",
                    self.pilot_leapfrog, LIFTED_BREAKEVEN)
        self.take_over()
        return True

    # -- draws ---------------------------------------------------------------------------------
    def sample(self, extend):
        """Blocks of draws until ``extend`` answers 0 (see :func:`correct`); the result."""
        config, thin = self.config, self.thin
        most = max(config.max_draws, config.draws)
        phase = max(1, int(_STEP_PHASE * config.warmup))    # a re-adaptation's step phase
        # re-adaptation at all (the lifted kernel has no metric), at most _READAPTATIONS times,
        # when after the first block the chains need more than this: the warm-up saw too few
        # draws for the metric
        readapt, readapted = self.gradient and self.max_solves is None, 0
        slow = min(most, max(config.draws, _READAPT_WARMUPS * config.warmup))
        choosing = self.pilot > 0 and self.kind == "hmc"     # auto kept HMC: it may still
        first = self.target.nfs                                # choose the lifted kernel
        blocks, done, size, window = [], 0, config.draws, []
        while True:
            size = max(1, min(size, config.draws, most - done))
            collect = window if done == 0 and readapt and readapted < _READAPTATIONS else None
            blocks.append(self._block(size, done, collect))
            done += size
            if done >= most or extend is None:
                break
            samples = np.concatenate([b[0] for b in blocks], axis=1)
            size = int(extend(samples, np.concatenate([b[1] for b in blocks], axis=1),
                              self.target.nfs))
            if size <= 0:
                break
            redo = len(blocks) == 1 and done + size > slow and bool(window)
            if len(blocks) == 1 and choosing:
                choosing = False
                if self._second_choice(blocks[0], self.target.nfs - first, size, redo):
                    config, readapt, window = self.config, False, []
                    steps = config.warmup_iterations()     # its own: step-only phases
                    self.step = self.step_phase(self.adapter, steps)
                    self.warmup += done * thin + steps
                    blocks, done, size = [], 0, config.draws
                    self.accepted = [torch.zeros_like(a) for a in self.accepted]
                    continue
            if redo:
                self._readapt(window, phase)
                self.warmup += done * thin + phase
                logger.info("the correction's chains would need more than %d draws after %d "
                            "warm-up iterations (R-hat and ESS extrapolated): their draws so "
                            "far became a further warm-up window", slow, self.warmup)
                blocks, done, size, window = [], 0, config.draws, []
                readapted += 1
                self.accepted = [torch.zeros_like(a) for a in self.accepted]
        return self._result(blocks, done)

    def _block(self, size, done, window=None):
        """``size`` kept draws per chain: ``(x, log_prob, flow_log_prob)``; the latent states
        are appended to ``window`` (a possible further metric window) if given."""
        state, thin = self.state, self.thin
        x = np.empty((self.chains, size, *state.x.shape[1:]))
        log_prob, flow_log_prob = np.empty((self.chains, size)), np.empty((self.chains, size))
        for i in range(size * thin):
            moved = self.iterate(self.step)
            self.accepted = [a + b for a, b in zip(self.accepted, moved)]
            state = self.state
            if (i + 1) % thin == 0:
                j = i // thin
                x[:, j], log_prob[:, j] = state.x.numpy(), state.log_prob.numpy()
                flow_log_prob[:, j] = self.density(state.z, state.value, state.log_prob,
                                                   state.x).numpy()
            if window is not None:
                window.append(self.target.latent(state.z).clone())
            if self.callback:
                self.callback(self.warmup + done * thin + i + 1,
                              self.warmup + (done + size) * thin, float(moved[0].mean()))
        return x, log_prob, flow_log_prob

    def _second_choice(self, block, solves, more, redo):
        """Whether the lifted kernel takes over after HMC's first block (:func:`_lifted_pays`);
        the block is then dropped and the lifted kernel warms up."""
        self.solves_per_ess = _lifted_pays(block, solves, more, redo, self.config, self.pool)
        if self.solves_per_ess is None:
            return False
        logger.info("HMC's first block of draws cost %.0f solves per effective draw, so many "
                    "that the lifted kernel (about %d) would finish sooner: the correction "
                    "goes on with the lifted kernel", self.solves_per_ess,
                    LIFTED_SOLVES_PER_ESS)
        self.take_over()
        return True

    def _readapt(self, window, phase):
        """The first block becomes a further warm-up window: at its rate the chains would need
        many times the warm-up's iterations, so the adaptation had too few draws (Stan's
        windows double for the same reason). A new metric, then a step-only phase."""
        self.metric = _rescale(self.state, self.pool(torch.cat(window)), self.kind)
        self.step = self.step_phase(_adapter(self.kind, self.step), phase)
        if self.kind == "hmc":
            self.state.n_leapfrog = _leapfrog(self.step, self.config)

    def _result(self, blocks, done):
        x, log_prob, flow_log_prob = (np.concatenate(parts, axis=1) for parts in zip(*blocks))
        iterations = done * self.thin
        local, independent, jumped = (a / iterations for a in self.accepted)
        kind, config, state = self.kind, self.config, self.state
        method = f"{getattr(self.transport, 'method', 'neutra')}-{kind}"
        chains = ChainResult(x, log_prob, local.numpy(), self.target.nfs, self.step,
                             time.perf_counter() - self.begin, method, self.warmup)
        wanted = _quarter_period(self.step) if kind == "hmc" else 0
        return CorrectionResult(
            chains, flow_log_prob, independent.numpy(), self.target.failed, self.metric,
            leapfrog=state.n_leapfrog if kind in ("hmc", "lifted") else None,
            exits=self.target.exits, independence_moves=self.moves(),
            leapfrog_wanted=wanted if wanted > config.leapfrog else None,
            jump_acceptance=jumped.numpy(), pilot_leapfrog=self.pilot_leapfrog,
            hmc_solves_per_ess=self.solves_per_ess)


def _lifted_takes_over(target, state, config):
    """``(kind, config, state, adapter)`` of the lifted kernel continuing the chains of
    ``state`` from their fields, with a fresh step adaptation (its warm-up is the caller's)."""
    config = dataclasses.replace(config, kernel="lifted")
    return ("lifted", config, _new_state("lifted", target, state.x, config),
            _adapter("lifted", _INITIAL_STEP["lifted"]))


def _lifted_pays(block, solves, more, redo, config, pool):
    """The ``auto`` kernel's second choice, after HMC's first block of draws: HMC's solves
    per effective draw in that block when the lifted kernel, from a warm-up of its own, would
    reach the stopping rule's effective draws in fewer solves than HMC needs for the ``more``
    draws per chain the rule asks for (with ``redo``, the block is dropped for a further
    warm-up window and all of them); else None.

    The block's draws ``block = (x, log_prob, ...)`` and ``solves`` (this process's) are
    joined with those of the other processes through ``pool``, so every process decides
    alike. The effective draws the rule will want are the block's bulk ESS scaled by the
    draws it asks for in all; the lifted kernel's cost is its warm-up at
    ``2 * LIFTED_BREAKEVEN`` solves a transition and :data:`LIFTED_SOLVES_PER_ESS` solves per
    effective draw. A choice from measured costs: HMC's quarter period at the first choice
    cannot see that its transitions mix poorly for their length, where the metric adapted to
    one place does not fit the posterior's curvature elsewhere.
    """
    x, log_prob = block[0], block[1]
    chains, done = x.shape[:2]
    xs = pool(torch.from_numpy(x.reshape(chains * done, -1))).numpy()
    lps = pool(torch.from_numpy(log_prob.reshape(chains * done, 1))).numpy()
    every = xs.shape[0] // done
    per_draw = float(pool(torch.tensor([[solves / (chains * done)]], dtype=_F64)).mean())
    ess = ChainResult.of_draws(xs.reshape(every, done, *x.shape[2:]),
                               lps.reshape(every, done)).ess()
    if not ess > 0:
        return None
    wanted = ess * (done + more) / done
    hmc = (done + more if redo else more) * every * per_draw
    warm = dataclasses.replace(config, kernel="lifted").warmup_iterations()
    lifted = (warm * every * 2 * LIFTED_BREAKEVEN
              + wanted * LIFTED_SOLVES_PER_ESS)
    return per_draw * every * done / ess if lifted < hmc else None


def _lifted_possible(target):
    """Whether the lifted kernel can run the chains of ``target``: at most as many
    observations as parameters (beyond, its Gram matrix and second-order adjoints, one per
    observation and step, cost more than HMC's solves, and the data constrain every direction
    anyway), at most :data:`LIFTED_MAX_PARAMETERS` parameters (its dense whitening), and a
    forward model with the Jacobian and second-order adjoints."""
    dim = target.transport.dim
    if target.posterior.n_obs > dim or dim > LIFTED_MAX_PARAMETERS:
        return False
    try:
        check_forward(target.posterior.forward)
    except NotImplementedError:
        return False
    return True


#: Independence proposals evaluated together (:class:`_Proposals`): enough for the solver's
#: and the flow's batches to pay, few enough for the flow's activations on a large lattice.
_PROPOSAL_BATCH = 64


def _iterate(state, step, generator, config, gradient, mixture=None, moves=1):
    """One local move, a mode jump with several modes and, if configured, ``moves``
    independence moves; the local move's acceptance (probability), the jump's and the
    independence moves' mean acceptance (NaN for moves not made)."""
    local = state.step(step, generator)
    none = torch.full_like(local, math.nan)
    jump = _mode_jump(state, generator, gradient=gradient) if state.target.multimodal \
        else none
    if not config.independence:
        return local, none, jump
    t, chains = state.target, state.z.shape[0]
    if mixture is not None:          # log w at the states; the moves carry it along
        current = state.log_prob - mixture.log_prob(state.z, state.value, state.log_prob,
                                                    state.x)
    else:
        current = t.log_weight(state.z, state.value)
    total, per = torch.zeros_like(local), max(1, _PROPOSAL_BATCH // chains)
    for first in range(0, moves, per):
        num = min(per, moves - first)
        if mixture is not None:
            proposals = _mixture_proposals(state, mixture, num, generator, gradient=gradient)
        else:
            proposals = _independence_proposals(state, num, generator, gradient=gradient)
        for k in range(num):
            prob, current = _independence_accept(state, proposals, k, generator, current)
            total += prob
    return local, total / moves, jump


def _rescale(state, z, kind):
    """Adopt the metric estimated from the window's latent draws ``z (n, d)`` and re-evaluate
    the chains in the new coordinates (one solve per chain)."""
    target = state.target
    latent = target.latent(state.z)
    factor = _metric(z, z.shape[0] >= _DENSE_DRAWS * z.shape[1])
    dense = factor.ndim == 2
    target.set_metric(factor)
    u = target.coordinates(latent)
    state.z = u
    state.x, state.value, state.grad, state.log_prob = target.whitened(u, grad=kind != "pcn")
    return "dense" if dense else "diagonal"
