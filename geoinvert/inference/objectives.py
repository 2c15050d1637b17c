"""Training objectives of a flow q_theta for a target p ~ exp(log q~): reverse KL, Jeffreys
(reverse + forward KL by importance sampling, the MsIGN paper's), forward KL, the Jeffreys
divergence against a stage's pool, and amortized SVGD; as functions returning ``(loss,
stats)`` and as small objects (:func:`objective` picks one for a step).

Every loss is this rank's differentiable part (the sum over ranks is the loss); ``stats`` holds
``loss`` (the divergence estimate), ``ess``, ``nfs`` and ``failed`` (global).
"""

import logging
import math
from dataclasses import dataclass

import torch

from geoinvert.flows.msign import standard_normal_log_prob
from geoinvert.parallel import Ensemble, draw_noise

__all__ = ["decode", "pulled_back_terms", "reverse_kl_loss", "jeffreys_loss",
           "pool_jeffreys_loss", "asvgd_loss",
           "propose", "frozen_surrogate", "median_bandwidth", "rbf_kernel", "stein_direction",
           "ReverseKL", "Jeffreys", "ForwardKL", "PoolJeffreys", "ASVGD", "objective"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


def decode(model, zs, upto=None):
    """``(x, log q(x))`` of noise ``zs`` through F_k, k <= ``upto`` (default: the model's
    stage): the fields and their log density under the flow."""
    x, logdet = model.decode(zs, upto=upto)
    return x, standard_normal_log_prob(zs) - logdet


def pulled_back_terms(x, log_flow, posterior):
    r"""Per-sample terms of the reverse KL for reparameterised draws ``x`` of a flow with log
    density ``log_flow`` (both differentiable in the flow's parameters).

    The target is evaluated (float64) outside the flow's graph; its gradient g = d log p / dx
    is pulled back through the draws: d/dtheta [log q(x) - log p(x)] = d/dtheta [log q(x) -
    g . x]. Draws whose target or gradient is not finite (failed solves) are masked.

    Returns:
        ``(term, value, ok)``: differentiable ``log q - g . x`` ``(num,)``, the detached
        ``log q - log p`` (float64) and the mask of finite target values and gradients.
    """
    log_target, grad = posterior.grad_log_prob(x.detach().to(_F64))
    ok = torch.isfinite(log_target) & torch.isfinite(grad).flatten(1).all(1)
    grad = torch.where(ok[:, None, None], grad, torch.zeros_like(grad)).to(x.dtype)
    term = log_flow - (grad * x).flatten(1).sum(1)
    return term, log_flow.detach().to(_F64) - log_target, ok


def _reverse_terms(model, posterior, batch, generator, ens):
    """Reparameterised samples x = G(z) (this rank's block of ``batch``) and their
    :func:`pulled_back_terms`; returns ``(term, value, ok, x)``."""
    x, log_p = decode(model, draw_noise(model, posterior.level, batch, generator, ens))
    term, value, ok = pulled_back_terms(x, log_p, posterior)
    return term, value, ok, x.detach()


def reverse_kl_loss(model, posterior, batch, generator=None, *, ensemble=None):
    r"""Reverse KL D_KL(p || q) - log Z from ``batch`` reparameterised samples of the model.

    .. math:: L = \frac{1}{n_{ok}} \sum_{i\,ok} \log p(x_i) - \log \tilde q(x_i), \quad x_i \sim p,

    with the unnormalised target q~ = Z q (so L is the KL minus the log evidence). Samples whose
    target or its gradient is not finite (failed solves) are left out.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` at the stage of ``posterior.level``.
        posterior: Target with ``level`` and ``grad_log_prob(x)``.
        batch: Samples over all ranks.
        generator: Noise source.
        ensemble: :class:`Ensemble` (default: one process).

    Returns:
        ``(loss, stats)``: this rank's differentiable part of L (sum over ranks = L) and
        ``{"loss", "ess", "flow_ess", "nfs", "failed"}`` (global; ``ess`` is NaN here;
        ``flow_ess`` is the importance ESS fraction of the model's own draws, weighed by
        q~ / p: how usable the model is as a proposal, at no extra solve).
    """
    ens = ensemble or Ensemble()
    term, value, ok, x = _reverse_terms(model, posterior, batch, generator, ens)
    n_ok, total = ens.sum(float(ok.sum()), float(value[ok].sum()))
    loss = term[ok].sum() / n_ok if n_ok else term.sum() * math.nan
    _, own = _snis_weights(-value, ok, ens)
    stats = {"loss": total / n_ok if n_ok else math.nan, "ess": math.nan,
             "flow_ess": own / batch, "nfs": batch, "failed": int(batch - n_ok)}
    return loss, stats


def propose(model, level, batch, generator, kind, ens, surrogate=None):
    """Importance proposal ``(x, log s(x))`` without grad (this rank's block of ``batch``): the
    surrogate or a defensive mixture.

    ``surrogate``: PC_l(p_{l-1}) (MsIGN). ``defensive``: half from the surrogate, half from the
    prior (every F = identity), s = (surrogate + prior) / 2, which keeps modes the surrogate
    lost in the forward KL (defensive importance sampling, Hesterberg 1995). ``mixture``: half
    from the prior and half from the model, for stages without a trained coarser model
    (stage 1 without a pool, single-stage training).

    The surrogate's p_{l-1} is that of ``surrogate`` (a frozen copy of the model at the stage's
    start, as in the paper) if given, else the model's current F_1..F_{l-1}.
    """
    source = model if surrogate is None else surrogate
    surrogate_upto = min(level - 1, model.stage)     # the surrogate: F_level = identity
    with torch.no_grad():
        if kind == "surrogate":
            x, log_s = decode(source, draw_noise(model, level, batch, generator, ens),
                               surrogate_upto)
            return x.to(model.dtype), log_s
        defensive = kind == "defensive"
        half = batch // 2
        x_prior = model.decode(draw_noise(model, level, batch - half, generator, ens), upto=0)[0]
        x_other = (source if defensive else model).decode(
            draw_noise(model, level, half, generator, ens),
            upto=surrogate_upto if defensive else None)[0]
        x = torch.cat((x_prior, x_other.to(model.dtype)))
        if defensive:
            log_other = source.surrogate_log_prob(x.to(source.dtype), level).to(_F64)
        else:
            log_other = model.log_prob(x, level).to(_F64)
        return x, torch.logaddexp(_prior_log_prob(model, x).to(_F64), log_other) - math.log(2.0)


def _prior_log_prob(model, x):
    """log rho_l(x) through the model with every F = identity, ``(num,)``."""
    zs, logdet = model.encode(x, upto=0)
    return standard_normal_log_prob(zs) + logdet


def _forward_terms(model, posterior, batch, generator, proposal, ens, surrogate=None):
    """Proposal samples (this rank's block), their log weights log q~ - log s (float64), finite
    mask, and log p."""
    x, log_s = propose(model, posterior.level, batch, generator, proposal, ens, surrogate)
    with torch.no_grad():
        log_q = posterior.log_prob(x.to(_F64)).to(_F64)
    log_w = log_q - log_s.to(_F64)
    ok = torch.isfinite(log_w)
    return model.log_prob(x, posterior.level), log_q, log_w, ok


def _snis_weights(log_w, ok, ens):
    """Self-normalised weights over the finite entries of all ranks (zero elsewhere), and ESS."""
    finite = log_w[ok]
    top = ens.max(float(finite.max()) if finite.numel() else -math.inf)
    if not math.isfinite(top):
        return torch.zeros_like(log_w), 0.0
    w = torch.where(ok, torch.exp(log_w - top), torch.zeros_like(log_w))
    (total,) = ens.sum(float(w.sum()))
    w = w / total
    (square,) = ens.sum(float(w.square().sum()))
    return w, 1.0 / square


def jeffreys_loss(model, posterior, batch, generator=None, *, ensemble=None, proposal="surrogate",
                  surrogate=None, reverse_weight=1.0):
    r"""Jeffreys divergence D_KL(p || q) + D_KL(q || p) estimated from 2 x ``batch`` target calls.

    .. math:: L = \frac{1}{n}\sum_i [\log p(x_i) - \log \tilde q(x_i)]
        + \sum_j w_j [\log \tilde q(x'_j) - \log p(x'_j)],
        \quad x_i \sim p,\; x'_j \sim s,\; w_j \propto \tilde q(x'_j) / s(x'_j),

    with self-normalised importance weights and the proposal s = PC_l(p_{l-1}) (the surrogate,
    MsIGN) or a mixture with the prior (see :func:`propose`). log Z cancels between the two terms, so L
    estimates D_J itself. Failed target evaluations are excluded from both terms.

    Args:
        model, posterior, batch, generator, ensemble: as in :func:`reverse_kl_loss`.
        proposal: ``"surrogate"``, ``"defensive"`` (surrogate + prior) or ``"mixture"``
            (model + prior).
        surrogate: Frozen model whose coarse flows give the proposal (see :func:`propose`).
        reverse_weight: Weight lambda of the reverse term in the returned loss,
            lambda D_KL(p || q) + D_KL(q || p). At 0 no model samples are drawn: the forward
            KL takes all ``2 * batch`` target calls as proposal samples, and ``stats["loss"]``
            estimates D_KL(q || p) + log Z (the reverse term is not measured).

    Returns:
        ``(loss, stats)`` as in :func:`reverse_kl_loss`; ``stats["ess"]`` is the importance
        ESS fraction of the proposal samples, and ``nfs`` is ``2 * batch``.

    References:
        Zhang, Zhang, Hou. Multiscale invertible generative networks for high-dimensional
        Bayesian inference. ICML 2021, https://arxiv.org/abs/2105.05489
    """
    ens = ensemble or Ensemble()
    if reverse_weight == 0:
        rev, draws = 0.0, 2 * batch
        rev_stats = {"loss": 0.0, "failed": 0, "flow_ess": math.nan}
    else:
        rev, rev_stats = reverse_kl_loss(model, posterior, batch, generator, ensemble=ens)
        draws = batch
    log_p, log_q, log_w, ok = _forward_terms(model, posterior, draws, generator, proposal, ens,
                                             surrogate)
    w, ess = _snis_weights(log_w, ok, ens)
    w_t = w.to(log_p.dtype)
    forward = -(w_t * torch.where(ok, log_p, torch.zeros_like(log_p))).sum()
    (value,) = ens.sum(float((w * torch.where(ok, log_q - log_p.detach().to(_F64), 0.0)).sum()))
    n_ok = int(ens.sum(float(ok.sum()))[0])
    if n_ok == 0:
        forward, value = forward * math.nan, math.nan
    stats = {"loss": rev_stats["loss"] + value, "ess": ess / draws,
             "flow_ess": rev_stats["flow_ess"], "nfs": 2 * batch,
             "failed": rev_stats["failed"] + draws - n_ok}
    return reverse_weight * rev + forward, stats


def pool_jeffreys_loss(model, posterior, batch, generator=None, *, pool, ensemble=None,
                       reverse=True):
    r"""Jeffreys divergence with the forward KL from an :class:`~geoinvert.inference.starts.ImportancePool` (no new solves).

    .. math:: L = \frac{1}{n}\sum_i [\log p(x_i) - \log \tilde q(x_i)]
        + \frac{1}{n}\sum_j [\log \tilde q(x'_j) - \log p(x'_j)],

    x_i ~ p (reparameterised) and x'_j resampled from the pool with probabilities w_j, so the
    second term is an unbiased estimate of the weighted forward KL; ``batch`` solves per step.

    With ``reverse=False`` only the second term (maximum likelihood on the pool, no solves).

    Returns:
        ``(loss, stats)`` as in :func:`jeffreys_loss`; ``ess`` is the pool's ESS fraction.
    """
    ens = ensemble or Ensemble()
    if reverse:
        rev, rev_stats = reverse_kl_loss(model, posterior, batch, generator, ensemble=ens)
    else:
        rev, rev_stats = 0.0, {"loss": 0.0, "nfs": 0, "failed": 0, "flow_ess": math.nan}
    idx = torch.multinomial(pool.w, batch, replacement=True, generator=generator)[ens.part(batch)]
    log_p = model.log_prob(pool.x[idx], posterior.level)
    (value,) = ens.sum(float((pool.log_q[idx] - log_p.detach().to(_F64)).sum()))
    stats = {**rev_stats, "loss": rev_stats["loss"] + value / batch, "ess": pool.ess}
    return rev - log_p.sum() / batch, stats


def frozen_surrogate(model):
    """A float64 copy of ``model`` with no trainable parameters (the stage's starting point).

    Rebuilt from its config on the same prior (which holds factorisations a deepcopy cannot
    copy) and loaded with its state."""
    frozen = type(model)(model.prior, **model.config, stage=model.stage)
    frozen.load_state_dict(model.state_dict())
    frozen = frozen.to(_F64)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


# -- the Stein variational direction --------------------------------------------------------------


def median_bandwidth(particles: torch.Tensor) -> float:
    r"""Median-heuristic bandwidth h = med^2 / log(n + 1) of the RBF kernel exp(-|x - y|^2 / h).

    med is the median of the pairwise distances |x_i - x_j|, i < j, of the ``n`` particles
    ``(n, ...)``, so that the other particles' kernel sum is about n exp(-med^2 / h) =
    n / (n + 1) (Liu & Wang 2016, with log(n + 1) instead of log n to stay defined for two
    particles). h = 1 when n < 2 or all particles coincide (the kernel then does not matter).
    """
    flat = particles.detach().reshape(particles.shape[0], -1).to(_F64)
    n = flat.shape[0]
    if n < 2:
        return 1.0
    dist = torch.pdist(flat)
    med = float(dist.median()) if dist.numel() else 0.0
    return med**2 / math.log(n + 1) if med > 0 else 1.0


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(x_i, y_j) = exp(-|x_i - y_j|^2 / h) of points ``(n, d)`` and ``(m, d)``, ``(n, m)``."""
    return torch.exp(-torch.cdist(x, y).square() / bandwidth)


def stein_direction(x: torch.Tensor, score: torch.Tensor, *, particles: torch.Tensor | None = None,
                    scores: torch.Tensor | None = None,
                    bandwidth: float | None = None) -> torch.Tensor:
    r"""Stein variational direction at points x for a particle set and its scores.

    .. math:: \phi(x_i) = \frac1n \sum_{j=1}^n \big[k(x_j, x_i) \nabla \log q(x_j)
        + \nabla_{x_j} k(x_j, x_i)\big],
        \qquad \nabla_{x_j} k(x_j, x_i) = \tfrac{2}{h} (x_i - x_j) k(x_j, x_i),

    the steepest descent direction of D_KL(p || q) in the unit ball of the RBF kernel's RKHS
    (Liu & Wang 2016), with k(x, y) = exp(-|x - y|^2 / h). The particles x_j, j = 1..n, are the
    whole sample (all ranks' under MPI) and the points x_i may be any subset of them (this
    rank's), so the direction of a distributed sample is its rows computed rank by rank.

    Args:
        x: Points ``(num, ...)`` (e.g. fields ``(num, ny, nx)``).
        score: Their gradients grad log q, same shape (used when ``particles`` is None).
        particles: All particles ``(n, ...)``; default ``x``.
        scores: grad log q at the particles, ``(n, ...)``; default ``score``.
        bandwidth: h; default :func:`median_bandwidth` of the particles.

    Returns:
        phi(x_i), shape and dtype of ``x``, not differentiable (computed in float64 from
        detached inputs).

    References:
        | Stein Variational Gradient Descent (Liu & Wang, 2016), https://arxiv.org/abs/1608.04471
    """
    if particles is None:
        particles, scores = x, score
    n = particles.shape[0]
    h = median_bandwidth(particles) if bandwidth is None else float(bandwidth)
    pts = x.detach().reshape(x.shape[0], -1).to(_F64)
    parts = particles.detach().reshape(n, -1).to(_F64)
    grads = scores.detach().reshape(n, -1).to(_F64)
    k = rbf_kernel(pts, parts, h)                                      # k[i, j] = k(x_j, x_i)
    repulsion = (2 / h) * (pts * k.sum(1, keepdim=True) - k @ parts)
    return ((k @ grads + repulsion) / n).reshape(x.shape).to(x.dtype)


# -- the amortized objective ----------------------------------------------------------------------


def asvgd_loss(model, posterior, batch, generator=None, *, ensemble=None):
    r"""Amortized SVGD surrogate loss of ``batch`` model samples x_i = G(z_i) (Feng et al. 2017).

    .. math:: L(\theta) = -\frac1n \sum_i \langle \phi(x_i), G_\theta(z_i) \rangle,
        \qquad \nabla_\theta L = -\frac1n \sum_i (\partial_\theta G_\theta(z_i))^T \phi(x_i),

    with phi the :func:`stein_direction` of the sample, held fixed: a gradient step moves each
    x_i along phi(x_i), as one SVGD step would move the particle. The scores grad log q come from
    ``posterior.grad_log_prob`` (adjoint gradients, one forward solve per sample). Samples whose
    target value or gradient is not finite (failed solves) are left out of the particle set.

    Every rank draws the noise of the whole batch from ``generator`` and keeps its block, so a
    seed gives the same samples on any number of ranks; the particles and scores (small) are
    gathered on every rank for the kernel sums.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` at the stage of ``posterior.level``.
        posterior: Target with ``level`` and ``grad_log_prob(x)``.
        batch: Samples over all ranks.
        generator: Noise source (in step on every rank).
        ensemble: :class:`~geoinvert.parallel.Ensemble` (default: one process).

    Returns:
        ``(loss, stats)``: this rank's differentiable part of L (sum over ranks = L) and
        ``{"loss", "ess", "nfs", "failed"}``: ``loss`` is the mean squared norm of the Stein
        direction (1/n) sum_i |phi(x_i)|^2, zero at an SVGD fixed point; ``ess`` is NaN.
    """
    ens = ensemble or Ensemble()
    x, _ = model.decode(draw_noise(model, posterior.level, batch, generator, ens))
    log_q, score = posterior.grad_log_prob(x.detach().to(_F64))
    ok = torch.isfinite(log_q) & torch.isfinite(score).flatten(1).all(1)
    particles = ens.gather(x.detach()[ok].to(_F64))
    scores = ens.gather(score[ok].to(_F64))
    n = particles.shape[0]
    stats = {"loss": math.nan, "ess": math.nan, "nfs": batch, "failed": batch - n}
    if n == 0:
        return x.sum() * math.nan, stats
    phi = stein_direction(x.detach()[ok].to(_F64), score[ok], particles=particles, scores=scores)
    (square,) = ens.sum(float(phi.square().sum()))
    stats["loss"] = square / n
    return -(phi.to(x.dtype) * x[ok]).sum() / n, stats


# -- the objectives as objects --------------------------------------------------------------------


class ReverseKL:
    """D_KL(p || q) - log Z from reparameterised model samples (:func:`reverse_kl_loss`); one
    solve per sample."""

    solves_per_sample = 1

    def __call__(self, model, posterior, batch, generator=None, ensemble=None):
        return reverse_kl_loss(model, posterior, batch, generator, ensemble=ensemble)


@dataclass(frozen=True)
class Jeffreys:
    """lambda D_KL(p || q) + D_KL(q || p) with the forward KL by self-normalised importance
    sampling from ``proposal`` (:func:`jeffreys_loss`); two solves per sample.

    Attributes:
        proposal: ``"surrogate"``, ``"defensive"`` or ``"mixture"`` (see :func:`propose`).
        reverse_weight: lambda (0: the forward KL alone, :class:`ForwardKL`).
        surrogate: frozen model whose coarse flows give the proposal (None: the model's own).
    """

    proposal: str = "surrogate"
    reverse_weight: float = 1.0
    surrogate: object = None
    solves_per_sample = 2

    def __call__(self, model, posterior, batch, generator=None, ensemble=None):
        return jeffreys_loss(model, posterior, batch, generator, ensemble=ensemble,
                             proposal=self.proposal, surrogate=self.surrogate,
                             reverse_weight=self.reverse_weight)


def ForwardKL(proposal="defensive", surrogate=None):     # noqa: N802 - an objective's name
    """D_KL(q || p) + log Z alone: :class:`Jeffreys` with ``reverse_weight`` 0 (all ``2 x
    batch`` target calls go to proposal samples)."""
    return Jeffreys(proposal, 0.0, surrogate)


@dataclass(frozen=True)
class PoolJeffreys:
    """The Jeffreys divergence with the forward KL resampled from a stage's
    :class:`~geoinvert.inference.starts.ImportancePool` (:func:`pool_jeffreys_loss`): one solve
    per sample for the reverse term, none without it (``reverse`` False)."""

    pool: object
    reverse: bool = True

    @property
    def solves_per_sample(self):
        return int(self.reverse)

    def __call__(self, model, posterior, batch, generator=None, ensemble=None):
        return pool_jeffreys_loss(model, posterior, batch, generator, pool=self.pool,
                                  ensemble=ensemble, reverse=self.reverse)


class ASVGD:
    """Amortized SVGD (:func:`asvgd_loss`): the samples move along the Stein direction; one
    solve per sample."""

    solves_per_sample = 1

    def __call__(self, model, posterior, batch, generator=None, ensemble=None):
        return asvgd_loss(model, posterior, batch, generator, ensemble=ensemble)


def objective(options, level, *, pool=None, reverse=True, surrogate=None):
    """The objective of a training step on ``level`` under ``options``
    (:class:`~geoinvert.inference.config.TrainOptions`): :class:`PoolJeffreys` when the stage
    has a ``pool``, else by ``options.objective``; Jeffreys' proposal ``auto`` is
    ``defensive`` once a coarser stage is trained (level >= 2, multi-stage), else
    ``mixture``."""
    if pool is not None:
        return PoolJeffreys(pool, reverse)
    if options.objective == "reverse_kl":
        return ReverseKL()
    if options.objective == "asvgd":
        return ASVGD()
    proposal = options.proposal
    if proposal == "auto":
        proposal = "defensive" if level >= 2 and not options.single_stage else "mixture"
    return Jeffreys(proposal, options.reverse_weight, surrogate)
