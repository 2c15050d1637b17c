"""Multi-stage MsIGN training: Jeffreys and reverse-KL objectives, nFS budgets, robust steps."""

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from geoinvert.flows.msign import standard_normal_log_prob
from geoinvert.inference.config import (COARSE_SAMPLERS, OBJECTIVES, PROPOSALS, RECIPE_KEYS,
                                        RECIPES, SCHEDULES, STEPS, TrainOptions,
                                        recipe_options)
from geoinvert.parallel import Ensemble, draw_noise, in_chunks
from geoinvert.samplers.laplace import laplace_mixture
from geoinvert.samplers.smc import tempered_smc
from geoinvert.svgd import asvgd_loss

__all__ = [
    "OBJECTIVES",
    "RECIPES",
    "RECIPE_KEYS",
    "recipe_options",
    "TrainingError",
    "TrainOptions",
    "reverse_kl_loss",
    "jeffreys_loss",
    "ImportancePool",
    "importance_pool",
    "smc_pool",
    "laplace_pool",
    "pool_jeffreys_loss",
    "training_step",
    "TrainingInterrupted",
    "decode",
    "CHECKPOINT_VERSION",
    "train_stage",
    "train_msign",
    "Trainer",
    "train_asvgd",
    "solve_cost",
    "level_costs",
    "lr_factor",
]

logger = logging.getLogger(__name__)

_F64 = torch.float64


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. many consecutive steps with a non-finite loss or gradient)."""


# -- costs ----------------------------------------------------------------------------------------


def solve_cost(forward) -> float:
    """Size of one forward solve: FE cells if the model exposes its mesh, else lattice cells."""
    cells = getattr(forward, "fe_cells", None)
    if cells is None and hasattr(forward, "disc"):
        topology = forward.disc.msh.topology
        cells = topology.index_map(topology.dim).size_global
    return float(cells if cells is not None else np.prod(forward.shape))


def level_costs(posteriors: dict) -> dict:
    """Cost of a level-l solve in finest-level solves, ``{level: cells_l / cells_L}``."""
    sizes = {level: solve_cost(p.forward) for level, p in posteriors.items()}
    finest = sizes[max(sizes)]
    return {level: size / finest for level, size in sizes.items()}


class _Budget:
    """Forward solves used so far, in nFS and finest-level equivalents, against a total."""

    def __init__(self, total):
        if total is not None and (int(total) != total or total < 0):
            raise ValueError(f"budget must be a non-negative integer or None, got {total!r}")
        self.total = None if total is None else int(total)
        self.used, self.finest = 0, 0.0

    def remaining(self) -> float:
        return math.inf if self.total is None else self.total - self.used

    def allowance(self, stages_left: int) -> float:
        """Equal share of the remaining budget for the current stage."""
        return self.remaining() / max(stages_left, 1)

    def spend(self, nfs: int, cost: float) -> None:
        self.used += int(nfs)
        self.finest += nfs * cost


# -- objectives -----------------------------------------------------------------------------------


def decode(model, zs, upto=None):
    """``(x, log q(x))`` of noise ``zs`` through F_k, k <= ``upto`` (default: the model's
    stage): the fields and their log density under the flow."""
    x, logdet = model.decode(zs, upto=upto)
    return x, standard_normal_log_prob(zs) - logdet


def _reverse_terms(model, posterior, batch, generator, ens):
    r"""Reparameterised samples x = G(z) (this rank's block of ``batch``) and the per-sample
    terms of D_KL(p || q).

    The target is evaluated (float64) outside the flow's graph; its gradient g = d log q / dx is
    pulled back through x = G(z): d/dtheta [log p(x) - log q(x)] = d/dtheta [log p(x) - g . x].

    Returns:
        ``(term, value, ok)``: differentiable ``log p - g . x`` ``(num,)``, the detached
        ``log p - log q`` (float64) and the mask of finite target values and gradients.
    """
    x, log_p = decode(model, draw_noise(model, posterior.level, batch, generator, ens))
    log_q, grad = posterior.grad_log_prob(x.detach().to(_F64))
    ok = torch.isfinite(log_q) & torch.isfinite(grad).flatten(1).all(1)
    grad = torch.where(ok[:, None, None], grad, torch.zeros_like(grad)).to(x.dtype)
    term = log_p - (grad * x).flatten(1).sum(1)
    return term, log_p.detach().to(_F64) - log_q, ok, x.detach()


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
        ``{"loss", "ess", "nfs", "failed"}`` (global; ``ess`` is NaN here).
    """
    ens = ensemble or Ensemble()
    term, value, ok, x = _reverse_terms(model, posterior, batch, generator, ens)
    n_ok, total = ens.sum(float(ok.sum()), float(value[ok].sum()))
    loss = term[ok].sum() / n_ok if n_ok else term.sum() * math.nan
    stats = {"loss": total / n_ok if n_ok else math.nan, "ess": math.nan, "nfs": batch,
             "failed": int(batch - n_ok)}
    return loss, stats


def _propose(model, level, batch, generator, kind, ens, surrogate=None):
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
    x, log_s = _propose(model, posterior.level, batch, generator, proposal, ens, surrogate)
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
    MsIGN) or a mixture with the prior (see :func:`_propose`). log Z cancels between the two terms, so L
    estimates D_J itself. Failed target evaluations are excluded from both terms.

    Args:
        model, posterior, batch, generator, ensemble: as in :func:`reverse_kl_loss`.
        proposal: ``"surrogate"``, ``"defensive"`` (surrogate + prior) or ``"mixture"``
            (model + prior).
        surrogate: Frozen model whose coarse flows give the proposal (see :func:`_propose`).
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
        rev, rev_stats, draws = 0.0, {"loss": 0.0, "failed": 0}, 2 * batch
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
    stats = {"loss": rev_stats["loss"] + value, "ess": ess / draws, "nfs": 2 * batch,
             "failed": rev_stats["failed"] + draws - n_ok}
    return reverse_weight * rev + forward, stats


@dataclass
class ImportancePool:
    """Weighted samples of a target from the prior, drawn once: ``x (m, n, n)``, normalised
    importance weights ``w (m,)`` and target log densities ``log_q (m,)`` (float64)."""

    x: torch.Tensor
    w: torch.Tensor
    log_q: torch.Tensor

    @property
    def ess(self) -> float:
        """Kish ESS fraction of the weights."""
        return float(1.0 / self.w.square().sum() / self.w.numel())


def importance_pool(model, posterior, size, generator=None, ensemble=None):
    r"""Samples of q_l by importance sampling from the prior of level l (every F = identity).

    The "standard method" for the coarsest stage (4 dimensions): ``size`` prior draws, weights
    w_i propto q~(x_i) / rho(x_i), self-normalised; failed solves get weight 0. Costs ``size``
    target evaluations once, shared out over the ranks of ``ensemble``; every rank gets the
    whole pool.
    """
    ens = ensemble or Ensemble()
    with torch.no_grad():
        zs = model.sample_noise(size, posterior.level, generator=generator)
        x, logdet = model.decode(zs, upto=0)
        log_prior = standard_normal_log_prob(zs).to(_F64) - logdet.to(_F64)
        log_q = ens.map(lambda mine: in_chunks(lambda b: posterior.log_prob(b.to(_F64)).to(_F64),
                                               mine), x)
    log_w = torch.where(torch.isfinite(log_q), log_q - log_prior, -math.inf)
    if not torch.isfinite(log_w).any():
        raise TrainingError(f"every target evaluation of the level-{posterior.level} "
                            "importance pool failed")
    return ImportancePool(x, torch.softmax(log_w, 0), log_q)


def smc_pool(model, posterior, size, generator=None, ensemble=None, *,
             max_evaluations=math.inf):
    r"""Samples of q_l by tempered SMC (:func:`~geoinvert.samplers.smc.tempered_smc`) with
    ``size`` particles, as a pool: a standard method for a sharp q_1 (4 dimensions), where
    importance sampling from the prior keeps a handful of effective samples.

    Target evaluations are shared out over the ranks of ``ensemble``; every rank gets the whole
    pool (one seed gives the same pool on any number of ranks).

    Returns:
        ``(pool, result)``: the :class:`ImportancePool` (fields in the model's dtype) and the
        :class:`~geoinvert.samplers.smc.SMCResult` (``evaluations``: target calls made).
    """
    ens = ensemble or Ensemble()

    def log_likelihood(x):
        return ens.map(lambda mine: posterior.log_likelihood(mine).to(_F64), x)

    try:
        result = tempered_smc(log_likelihood, posterior.prior, posterior.level, size,
                              generator=generator, max_evaluations=max_evaluations)
    except ValueError as err:
        raise TrainingError(f"level-{posterior.level} SMC pool: {err}") from err
    log_q = posterior.prior.log_prob(result.x, posterior.level).detach().to(_F64) + result.log_lik
    return ImportancePool(result.x.to(model.dtype), result.w, log_q), result


def laplace_pool(model, posterior, size, generator=None, ensemble=None, *, starts=16,
                 max_evaluations=math.inf):
    r"""Samples of q_l from a mixture of Laplace approximations at its modes, as a pool
    (:func:`~geoinvert.samplers.laplace.laplace_mixture`): ``starts`` prior draws are maximised
    by L-BFGS, and ``size`` draws of the mixture get importance weights. A standard method for
    a sharp, multimodal q_1 (4 dimensions): the modes are found by optimisation rather than by
    chance, and the weights fix their masses.

    The mode search runs on every rank in step (each target call evaluated by the rank that
    owns it); the importance samples are shared out over the ranks of ``ensemble``. Every rank
    gets the whole pool. ``max_evaluations`` caps the target calls of search and draws.

    Returns:
        ``(pool, result)``: the :class:`ImportancePool` (fields in the model's dtype) and the
        :class:`~geoinvert.samplers.laplace.LaplaceResult` (``evaluations``: target calls).
    """
    ens = ensemble or Ensemble()

    def grad_log_prob(x):
        return ens.map(lambda mine: tuple(v.to(_F64) for v in
                                          posterior.grad_log_prob(mine.to(_F64))), x)

    def log_prob(x):
        return ens.map(lambda mine: posterior.log_prob(mine.to(_F64)).to(_F64), x)

    level = posterior.level
    x0 = posterior.prior.sample(starts, level, generator=generator, dtype=_F64)
    try:
        result = laplace_mixture(grad_log_prob, log_prob, x0, size, generator=generator,
                                 max_evaluations=max_evaluations)
    except ValueError as err:
        raise TrainingError(f"level-{level} Laplace pool: {err}") from err
    return ImportancePool(result.x.to(model.dtype), result.w, result.log_q), result


def pool_jeffreys_loss(model, posterior, batch, generator=None, *, pool, ensemble=None,
                       reverse=True):
    r"""Jeffreys divergence with the forward KL from an :class:`ImportancePool` (no new solves).

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
        rev, rev_stats = 0.0, {"loss": 0.0, "nfs": 0, "failed": 0}
    idx = torch.multinomial(pool.w, batch, replacement=True, generator=generator)[ens.part(batch)]
    log_p = model.log_prob(pool.x[idx], posterior.level)
    (value,) = ens.sum(float((pool.log_q[idx] - log_p.detach().to(_F64)).sum()))
    stats = {**rev_stats, "loss": rev_stats["loss"] + value / batch, "ess": pool.ess}
    return rev - log_p.sum() / batch, stats


def _frozen_surrogate(model):
    """A float64 copy of ``model`` with no trainable parameters (the stage's starting point).

    Rebuilt from its config on the same prior (which holds factorisations a deepcopy cannot
    copy) and loaded with its state."""
    frozen = type(model)(model.prior, **model.config, stage=model.stage)
    frozen.load_state_dict(model.state_dict())
    frozen = frozen.to(_F64)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


# -- one step, one stage, all stages --------------------------------------------------------------


def lr_factor(step: int, steps: int, schedule: str, floor: float, warmup: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: cosine from 1 to ``floor``, step decay
    (x0.3 at 1/2 and 3/4 of the stage, not below ``floor``) or constant, times a linear ramp
    from 1 / (ramp steps) to 1 over the first ``warmup`` fraction of the steps."""
    ramp = 1.0
    if warmup > 0 and step < warmup * steps:
        ramp = (step + 1) / math.ceil(warmup * steps)
    if schedule == "constant" or steps <= 1:
        return ramp
    t = step / (steps - 1)
    if schedule == "cosine":
        return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    return ramp * max(floor, 0.3 ** ((t >= 0.5) + (t >= 0.75)))


def _loss(model, posterior, batch, generator, options, ensemble, pool=None, reverse=True,
          surrogate=None):
    if pool is not None:
        return pool_jeffreys_loss(model, posterior, batch, generator, pool=pool,
                                  ensemble=ensemble, reverse=reverse)
    if options.objective == "reverse_kl":
        return reverse_kl_loss(model, posterior, batch, generator, ensemble=ensemble)
    if options.objective == "asvgd":
        return asvgd_loss(model, posterior, batch, generator, ensemble=ensemble)
    proposal = options.proposal
    if proposal == "auto":
        coarse_trained = posterior.level >= 2 and not options.single_stage
        proposal = "defensive" if coarse_trained else "mixture"
    return jeffreys_loss(model, posterior, batch, generator, ensemble=ensemble, proposal=proposal,
                         surrogate=surrogate, reverse_weight=options.reverse_weight)


def training_step(model, posterior, optimizer, *, batch, generator, options, ensemble=None,
                  pool=None, reverse=True, surrogate=None):
    """One optimisation step on this rank's share of ``batch``; skipped if not finite.

    Computes the local loss and gradients of the active parameters, sums the gradients over the
    ensemble, clips their global norm to ``options.grad_clip`` and steps the optimiser, unless
    the loss or the gradient norm is not finite (then the parameters are left untouched).

    With a ``pool`` (:class:`ImportancePool`) the loss is :func:`pool_jeffreys_loss` (its
    reverse term only if ``reverse``). ``surrogate``: the frozen model whose coarse flows
    give the forward-KL proposal (None: the model's own).

    Returns:
        The stats of the loss plus ``grad_norm`` and ``skipped`` (bool).
    """
    ens = ensemble or Ensemble()
    params = model.active_parameters()
    optimizer.zero_grad(set_to_none=False)
    loss, stats = _loss(model, posterior, batch, generator, options, ens, pool, reverse,
                        surrogate)
    if torch.isfinite(loss):
        loss.backward()
    ens.allreduce_grads(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
    skipped = not (math.isfinite(stats["loss"]) and math.isfinite(norm))
    if skipped:
        optimizer.zero_grad(set_to_none=False)
    else:
        optimizer.step()
    return {**stats, "grad_norm": norm, "skipped": skipped}


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (a signal); a checkpoint was handed to ``checkpoint``.

    Attributes:
        state: The checkpoint state (see :func:`train_msign`).
    """

    def __init__(self, message, state):
        super().__init__(message)
        self.state = state


@dataclass
class _StageRun:
    """Mutable state of training: budget, step records, skipped-step counters, checkpointing."""

    budget: _Budget
    costs: dict
    history: list
    callback: object
    skipped: int = 0
    consecutive: int = 0
    checkpoint: object = None
    every: int = 0
    stop: object = None


@dataclass
class _StageState:
    """Where a stage is: its plan (fixed at its start) and progress; resumable."""

    stage: int
    planned: int
    allowance: float
    step: int = 0
    spent: int = 0
    elapsed: float = 0.0
    pool: ImportancePool | None = None
    evaluations: int = 1
    surrogate: object = None


def _planned_steps(steps, batch, evaluations, allowance):
    """Steps of a stage within an nFS allowance (the last one may use a smaller batch)."""
    if math.isinf(allowance):
        return steps
    full, rest = divmod(int(allowance), batch * evaluations)
    return min(steps, full + (rest // evaluations >= 2))


def _record(run, stage, step, stats, lr, started):
    """Account the solves of a step, append its record and report it."""
    run.budget.spend(stats["nfs"], run.costs[stage])
    run.skipped += stats["skipped"]
    run.consecutive = run.consecutive + 1 if stats["skipped"] else 0
    info = {"stage": stage, "step": step, "nfs": run.budget.used,
            "nfs_finest": run.budget.finest, "loss": float(stats["loss"]),
            "ess": float(stats["ess"]), "lr": lr, "grad_norm": stats["grad_norm"],
            "failed": stats["failed"], "skipped": run.skipped,
            "time": time.perf_counter() - started}
    run.history.append(info)
    if run.callback is not None:
        run.callback(info)
    return info


def _check_failures(run, stage, options, info):
    if run.consecutive >= options.max_failures:
        raise TrainingError(
            f"stage {stage}: {run.consecutive} consecutive steps had a non-finite loss or "
            f"gradient (last loss {info['loss']}, {info['failed']} failed target evaluations); "
            f"try a smaller lr (now {options.lr}) or check the forward model")


CHECKPOINT_VERSION = 1


def _state(model, optimizer, generator, run, st):
    """Everything needed to continue training exactly where it is (see :func:`train_msign`)."""
    pool = None if st.pool is None else {"x": st.pool.x, "w": st.pool.w, "log_q": st.pool.log_q}
    return {"version": CHECKPOINT_VERSION, "stage": st.stage, "step": st.step,
            "planned": st.planned, "allowance": st.allowance, "spent": st.spent,
            "elapsed": st.elapsed, "evaluations": st.evaluations, "pool": pool,
            "surrogate": None if st.surrogate is None else
            {k: v.clone() for k, v in st.surrogate.state_dict().items()},
            "complete": st.step >= st.planned,
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),   # Adam updates in place
            "generator": None if generator is None else generator.get_state(),
            "budget": {"total": run.budget.total, "used": run.budget.used,
                       "finest": run.budget.finest},
            "history": list(run.history), "skipped": run.skipped,
            "consecutive": run.consecutive}


def _stop_requested(run, ensemble):
    """Whether any rank was asked to stop (an agreed answer: one tiny allreduce per step)."""
    if run.stop is None:
        return False
    return ensemble.max(float(bool(run.stop()))) > 0


def train_stage(model, posterior, *, stage, steps, options, run, generator=None, ensemble=None,
                stages_left=1, resume=None):
    """Train F_1..F_stage on the posterior of level ``stage`` (or the finest, single-stage).

    Adam on :meth:`~geoinvert.flows.msign.MsIGN.active_parameters` with the per-stage learning
    rate schedule; the stage takes ``steps`` steps or fewer when its share of the remaining
    nFS budget (equal split over ``stages_left`` stages) runs out, never exceeding it.

    With ``resume`` (a checkpoint state of this stage, see :func:`train_msign`) the stage goes
    on from the step after it with the saved plan, pool and optimiser state.

    Returns:
        Number of steps taken.
    """
    ens = ensemble or Ensemble()
    model.set_stage(stage)
    optimizer = torch.optim.Adam(model.active_parameters(), lr=options.lr)
    if resume is None:
        st = _new_stage(model, posterior, stage, steps, options, run, generator, ens, stages_left)
    else:
        st = _StageState(stage, resume["planned"], resume["allowance"], resume["step"],
                         resume["spent"], resume["elapsed"], _pool_of(resume["pool"]),
                         resume["evaluations"])
        if resume.get("surrogate") is not None:
            st.surrogate = _frozen_surrogate(model)
            st.surrogate.load_state_dict(resume["surrogate"])
        optimizer.load_state_dict(resume["optimizer"])
    started = time.perf_counter() - st.elapsed
    while st.step < st.planned:
        batch = options.batch if math.isinf(st.allowance) else \
            min(options.batch, int(st.allowance - st.spent) // st.evaluations)
        lr = options.lr * lr_factor(st.step, st.planned, options.schedule, options.lr_min,
                                    options.lr_warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = training_step(model, posterior, optimizer, batch=batch, generator=generator,
                              options=options, ensemble=ens, pool=st.pool,
                              reverse=st.pool is None or st.step >= options.pool_warmup * st.planned,
                              surrogate=st.surrogate if options.frozen_proposal else None)
        st.spent += stats["nfs"]
        info = _record(run, stage, st.step, stats, lr, started)
        st.step += 1
        st.elapsed = time.perf_counter() - started
        _check_failures(run, stage, options, info)
        stop = _stop_requested(run, ens)
        if stop or (run.every and st.step % run.every == 0 and st.step < st.planned):
            state = _state(model, optimizer, generator, run, st)
            if run.checkpoint is not None:
                run.checkpoint(state)
            if stop:
                raise TrainingInterrupted(f"stopped on request at stage {stage}, step "
                                          f"{st.step} of {st.planned}", state)
    if run.checkpoint is not None:
        run.checkpoint(_state(model, optimizer, generator, run, st))
    _log_stage(stage, st.planned, run)
    return st.planned


def _new_stage(model, posterior, stage, steps, options, run, generator, ens, stages_left):
    """The plan of a stage starting now: its nFS allowance, pool and number of steps."""
    allowance = run.budget.allowance(stages_left)
    used_before = run.budget.used
    pool, evaluations = _stage_pool(model, posterior, stage, options, run, allowance, generator,
                                    ens)
    if pool is not None:
        allowance -= run.budget.used - used_before
    planned = _planned_steps(steps, options.batch, evaluations, allowance)
    frozen = options.frozen_proposal and pool is None and stage >= 2 \
        and not options.single_stage
    return _StageState(stage, planned, allowance, pool=pool, evaluations=evaluations,
                       surrogate=_frozen_surrogate(model) if frozen else None)


def _pool_of(saved):
    return None if saved is None else ImportancePool(saved["x"], saved["w"], saved["log_q"])


def _stage_pool(model, posterior, stage, options, run, allowance, generator, ens):
    """The pool of stages 1..``pool_levels`` (Jeffreys, multi-stage) and the solves per sample
    of a step.

    The pool takes at most half of the stage's allowance; its solves are spent at once.
    """
    use = (stage <= options.pool_levels and options.objective == "jeffreys"
           and not options.single_stage and options.pool > 0)
    smc = options.coarse_sampler == "smc"
    size = options.pool // 4 if smc else options.pool          # SMC: several solves a particle
    if not math.isinf(allowance):
        size = min(size, int(allowance) // (16 if smc else 2))
    if not use or size < 2:
        return None, options.evaluations
    if smc:
        pool, result = smc_pool(model, posterior, size, generator, ens,
                                max_evaluations=allowance / 2)
        solves, what = result.evaluations, (f"tempered SMC pool of {size} particles, "
                                            f"{len(result.temperatures) - 1} temperatures")
    elif options.coarse_sampler == "laplace":
        pool, result = laplace_pool(model, posterior, size, generator, ens,
                                    max_evaluations=allowance / 2)
        solves = result.evaluations
        what = (f"Laplace pool, {len(result.modes)} modes (masses "
                f"{[round(float(m), 3) for m in result.mode_mass]}), "
                f"{result.x.shape[0]} importance samples")
    else:
        pool = importance_pool(model, posterior, size, generator, ens)
        solves, what = size, f"importance pool of {size} prior samples"
    run.budget.spend(solves, run.costs[stage])
    logger.info("stage %d: %s, %d solves, ESS fraction %.3f", stage, what, solves, pool.ess)
    return pool, 1


def _log_stage(stage, steps, run):
    last = run.history[-1] if run.history else {}
    logger.info("stage %d: %d steps, nFS %d (%.1f finest equivalents), loss %.4g, ESS %.2f, "
                "%d skipped", stage, steps, run.budget.used, run.budget.finest,
                last.get("loss", math.nan), last.get("ess", math.nan), run.skipped)


def _steps_of(steps, level):
    """Steps of a level from an int, a per-level sequence (index level - 1) or a dict."""
    if isinstance(steps, dict):
        return int(steps[level])
    if isinstance(steps, (list, tuple)):
        return int(steps[level - 1])
    return int(steps)


def train_msign(model, posteriors, *, start=1, steps=STEPS, batch=TrainOptions.batch,
                lr=TrainOptions.lr, objective=TrainOptions.objective,
                budget=None, generator=None, callback=None, checkpoint=None, single_stage=False,
                schedule=TrainOptions.schedule, lr_min=TrainOptions.lr_min, lr_warmup=None,
                grad_clip=TrainOptions.grad_clip, max_failures=TrainOptions.max_failures,
                proposal=TrainOptions.proposal, pool=TrainOptions.pool, pool_warmup=None,
                coarse_sampler=None,
                pool_levels=None, frozen_proposal=None, reverse_weight=None, recipe="paper",
                comm=None,
                checkpoint_every=0, resume=None, stop=None):
    r"""Train an MsIGN stage by stage on the posteriors of its levels.

    Stage l trains F_1..F_l on q_l, starting from stage l-1 with F_l = identity (MsIGN
    Section 3). With ``single_stage`` only the finest level L is trained, all flows starting
    from the identity (the prior-conditioned model) - the ablation of multi-stage training.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` (its flows F_1..F_{start-1} trained).
        posteriors: ``{level: Posterior}`` for levels 1..L (only L is used single-stage);
            training ends at the highest level given (normally the model's finest).
        start: First stage to train (later stages follow up to L).
        steps: Steps per stage: int, per-level sequence (index level - 1) or ``{level: steps}``.
        batch: Samples per step (flow samples; Jeffreys draws as many importance samples).
        recipe: A name of :data:`RECIPES` (``paper`` or ``forward_kl``); the options of
            :data:`RECIPE_KEYS` below that are None take the recipe's values (or their
            :class:`TrainOptions` defaults).
        lr: Peak Adam learning rate of each stage.
        objective: ``"jeffreys"``, ``"reverse_kl"`` or ``"asvgd"`` (amortized SVGD, the MsIGN
            paper's baseline: :func:`geoinvert.svgd.asvgd_loss`).
        budget: Total forward solves (nFS) over all stages, or None. Each stage gets an equal
            share of what is left; the total is never exceeded.
        generator: ``torch.Generator`` of the noise. Every rank must pass one in the same state:
            each draws whole batches and keeps its block (:func:`draw_noise`), so one seed
            gives the same training on any number of ranks, up to the order of the gradient sum.
        callback: ``callback(info)`` after every step, ``info`` the history record.
        checkpoint: ``checkpoint(state)`` at the end of every stage, every ``checkpoint_every``
            steps and when stopped on request. ``state`` is a dict of tensors, numbers and lists
            (loadable with ``torch.load(..., weights_only=True)``; the same on every rank):
            ``stage``, ``step`` (steps done in it), ``complete``, ``model`` (state dict),
            ``optimizer``, ``generator`` (RNG state), ``budget``, ``history``, the stage plan
            and pool. Pass it back as ``resume`` to continue.
        single_stage: Train only the finest level from the prior-conditioned model.
        schedule: Learning rate per stage, ``"cosine"`` (to ``lr_min * lr``), ``"step"`` or
            ``"constant"``.
        lr_min: Final fraction of ``lr`` of the cosine schedule (floor of the step schedule).
        lr_warmup: Fraction of each stage's steps over which the learning rate ramps up
            linearly to its schedule. A fresh Adam moves every parameter by about ``lr`` per
            step whatever the gradient's size, which can throw the trained coarse flows off
            a very sharp posterior at the start of a stage.
        grad_clip: Maximum global gradient norm.
        max_failures: Consecutive skipped steps (non-finite loss or gradient) that stop training
            with :class:`TrainingError`.
        proposal: Forward-KL proposal: ``"surrogate"`` PC_l(p_{l-1}) alone (the MsIGN
            paper), ``"defensive"`` (half surrogate, half prior), ``"mixture"`` (half model,
            half prior); ``"auto"``: defensive for l >= 2, mixture at stage 1 without a pool
            and single-stage. The prior half keeps a mode the surrogate has lost in the
            forward KL (on the bimodal test bed the surrogate alone drifted to one mode).
        pool: Prior draws of the stage-1 importance pool (Jeffreys, multi-stage): the
            forward KL of stage 1 (4 dimensions) then resamples these weighted samples of q_1
            (a standard method, drawn once, at most half of the stage's budget share), and each
            step costs ``batch`` solves. 0 uses the mixture proposal instead.
        pool_warmup: Fraction of the stage-1 steps that fit the pool alone (maximum
            likelihood on samples of q_1, no solves) before the Jeffreys steps; the reverse
            KL alone would pull a fresh flow into one mode of a multimodal q_1.
        coarse_sampler: How the stage-1 pool samples q_1: ``"importance"`` (``pool`` prior
            draws, :func:`importance_pool`) or ``"smc"`` (tempered SMC with ``pool // 4``
            particles, :func:`smc_pool`, at most half of the stage's nFS share; for a q_1 so
            sharp that the importance ESS is a few samples, at several times the solves) or
            ``"laplace"`` (L-BFGS from 16 prior draws to the modes of q_1, then ``pool`` draws
            of a mixture of their Laplace approximations with importance weights,
            :func:`laplace_pool`; a few hundred solves more than ``"importance"``, for
            posteriors too sharp for importance sampling from the prior).
        pool_levels: Stages 1..``pool_levels`` start from a pool of their own posterior drawn
            by ``coarse_sampler`` (and fit it alone for ``pool_warmup`` of their steps), the
            later ones from the surrogate of the stage before. More than 1 where q_1 is not
            a good start for q_2: with data more precise than a 2 x 2 field can fit, the modes
            of q_1 lie elsewhere than those of the finer levels (``cases/elliptic_bimodal.yaml``:
            t = +/-6.8 at level 1, +/-38 to 40 at levels 2 to 4).
        frozen_proposal: Draw the forward-KL proposal of stages l >= 2 from PC_l(p_{l-1})
            with p_{l-1} frozen at the end of stage l - 1 (as the MsIGN paper defines the
            surrogate) instead of the current coarse flows, which stage l keeps training: a
            drift of the model's mode weights then no longer drifts its own proposal.
        reverse_weight: Weight lambda of the reverse KL in the Jeffreys gradient of the stages
            without a pool, lambda D_KL(p || q) + D_KL(q || p); 0 trains by the forward KL
            alone (mass-covering: keeps every mode the proposal has, with wider modes).
        comm: Ensemble communicator: ranks split the batch, each with its own forward models,
            and sum gradients (None: one process).
        checkpoint_every: Steps between checkpoints within a stage (0: stage ends only).
        resume: A checkpoint state: the model, optimiser, generator, budget and history are
            restored and training goes on from the step after it (``start`` is ignored). The
            other arguments must be those of the interrupted run; the continued run then
            takes the same steps as an uninterrupted one (bitwise on the same ranks).
        stop: ``stop()`` -> bool, polled after every step (e.g. set by a signal handler); when
            any rank says True, all ranks write a checkpoint and raise
            :class:`TrainingInterrupted` at the same step.

    Returns:
        History: one dict per step with ``stage``, ``step``, ``nfs`` (cumulative solves),
        ``nfs_finest`` (cumulative finest-level equivalents), ``loss`` (the objective's
        estimate: D_J, or D_KL(p||q) - log Z), ``ess`` (importance ESS fraction, NaN for
        reverse KL), ``lr``, ``grad_norm``, ``failed`` (target evaluations that failed),
        ``skipped`` (cumulative skipped steps) and ``time`` (s since the stage began).

    Raises:
        TrainingError: ``max_failures`` consecutive steps were skipped.
        TrainingInterrupted: ``stop()`` asked to stop (after the checkpoint was written).
    """
    options = TrainOptions(objective=objective, batch=batch, lr=lr, schedule=schedule,
                           lr_min=lr_min, grad_clip=grad_clip, max_failures=max_failures,
                           proposal=proposal, single_stage=single_stage, pool=pool,
                           **recipe_options(recipe, lr_warmup=lr_warmup,
                                            pool_warmup=pool_warmup,
                                            coarse_sampler=coarse_sampler,
                                            pool_levels=pool_levels,
                                            frozen_proposal=frozen_proposal,
                                            reverse_weight=reverse_weight))
    trainer = Trainer(model, posteriors, options, steps=steps, budget=budget, comm=comm,
                      callback=callback, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, stop=stop)
    return trainer.run(start=start, generator=generator, resume=resume)


class Trainer:
    """Multi-stage training of an MsIGN: the optimiser of each stage and its learning-rate
    schedule, skipped steps, the nFS budget, callbacks, checkpoints and resume.

    :func:`train_msign` is this object with the options spelled out as keywords.

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN`.
        posteriors: ``{level: Posterior}`` (see :func:`train_msign`).
        options: :class:`~geoinvert.inference.config.TrainOptions` (objective, batch, learning
            rate and schedule, pools; :func:`~geoinvert.inference.config.recipe_options` gives
            a recipe's).
        steps: Steps per stage: int, per-level sequence or ``{level: steps}``.
        budget: Total forward solves over all stages, or None.
        comm: Ensemble communicator (None: one process).
        callback: ``callback(info)`` after every step.
        checkpoint: ``checkpoint(state)`` at stage ends, every ``checkpoint_every`` steps and
            on a stop request.
        checkpoint_every: Steps between checkpoints within a stage (0: stage ends only).
        stop: ``stop() -> bool`` polled after every step.
    """

    def __init__(self, model, posteriors, options, *, steps=STEPS, budget=None, comm=None,
                 callback=None, checkpoint=None, checkpoint_every=0, stop=None):
        if int(checkpoint_every) != checkpoint_every or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every!r}")
        self.finest = max(posteriors)
        if self.finest > model.levels:
            raise ValueError(f"posteriors go up to level {self.finest}, the model to "
                             f"{model.levels}")
        self.model, self.posteriors, self.options, self.steps = model, posteriors, options, steps
        self.ensemble = Ensemble(comm)
        self.state = _StageRun(_Budget(budget), level_costs(posteriors), [], callback,
                               checkpoint=checkpoint, every=int(checkpoint_every), stop=stop)

    @property
    def history(self):
        """One record per step so far (see :func:`train_msign`)."""
        return self.state.history

    def stages(self, start=1):
        """The stages to train from ``start``: ``start..L``, or ``[L]`` single-stage."""
        if self.options.single_stage:
            return [self.finest] if start <= self.finest else []
        return list(range(max(start, 1), self.finest + 1))

    def run(self, *, start=1, generator=None, resume=None):
        """Train the stages from ``start`` (or from a checkpoint ``resume``); the history."""
        stages, stage_resume = self.stages(start), None
        if resume is not None:
            stages, stage_resume = _restore(self.model, resume, self.state, generator, stages,
                                            self.options.single_stage, self.finest)
        missing = sorted(set(stages) - set(self.posteriors))
        if missing:
            raise ValueError(f"posteriors missing for levels {missing}")
        for k, stage in enumerate(stages):
            train_stage(self.model, self.posteriors[stage], stage=stage,
                        steps=_steps_of(self.steps, stage), options=self.options,
                        run=self.state, generator=generator, ensemble=self.ensemble,
                        stages_left=len(stages) - k, resume=stage_resume if k == 0 else None)
        return self.state.history


def _restore(model, state, run, generator, stages, single_stage, finest):
    """Load a checkpoint ``state``; returns the stages left and the state of the first one."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not "
                         f"{CHECKPOINT_VERSION}")
    stage = int(state["stage"])
    if single_stage and stage != finest or not single_stage and not 1 <= stage <= finest:
        raise ValueError(f"checkpoint of stage {stage} does not fit this training "
                         f"({'single-stage' if single_stage else 'stages 1..'}{finest})")
    model.set_stage(stage)
    model.load_state_dict(state["model"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    budget = state["budget"]
    if budget["total"] != run.budget.total:
        raise ValueError(f"checkpoint budget {budget['total']} differs from {run.budget.total}")
    run.budget.used, run.budget.finest = int(budget["used"]), float(budget["finest"])
    run.history[:] = state["history"]
    run.skipped, run.consecutive = int(state["skipped"]), int(state["consecutive"])
    if state["complete"]:
        return list(range(stage + 1, finest + 1)) if not single_stage else [], None
    return list(range(stage, finest + 1)) if not single_stage else [stage], state


def train_asvgd(model, posteriors, **options):
    r"""Amortized SVGD (A-SVGD) training of an MsIGN network, stage by stage like MsIGN.

    Each step draws ``batch`` samples x_i = G(z_i) of the model, computes the Stein variational
    direction phi of the sample (:func:`~geoinvert.svgd.stein_direction`, RBF kernel, median-heuristic
    bandwidth) from the target scores grad log q_l (adjoint gradients) and updates the
    parameters along sum_i (dG(z_i)/dtheta)^T phi(x_i) (:func:`~geoinvert.svgd.asvgd_loss`, Adam). This is the
    A-SVGD baseline of the MsIGN paper, which trains the *same* network as MsIGN with the SVGD
    direction instead of the Jeffreys divergence. Here it is trained multi-stage by default, as
    MsIGN: stage l trains F_1..F_l on q_l, starting from stage l-1 with F_l = identity, so the two
    differ only in the objective; ``single_stage`` trains the finest level alone from the
    prior-conditioned model (plain A-SVGD with the MsIGN network). The model stays a
    normalizing flow, so its densities ``log_prob`` remain available for diagnostics.

    Like SVGD with ``batch`` particles, A-SVGD underestimates variances, the more so the
    larger the dimension is against the batch, and it can keep one mode of a bimodal
    posterior (measured in ``tests/test_svgd.py`` and ``docs/benchmarks.md``).

    nFS are counted as in :func:`train_msign`: one solve per sample per step
    (the adjoint solve of the gradient is not counted), per level and in finest-level
    equivalents; each stage gets an equal share of the remaining ``budget``, never exceeded.

    This is :func:`train_msign` with ``objective="asvgd"`` (one step:
    :func:`~geoinvert.svgd.asvgd_loss`, gradients summed over the ranks, clipped, skipped if not finite), so
    checkpoints, ``resume`` and stop requests work as there; the keyword options are
    train_msign's (those below, plus ``checkpoint_every``, ``resume``, ``stop``).

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` (its flows F_1..F_{start-1} trained).
        posteriors: ``{level: Posterior}`` with ``grad_log_prob``; training ends at the highest
            level given.
        start: First stage to train.
        steps: Steps per stage: int, per-level sequence (index level - 1) or ``{level: steps}``.
        batch: Samples (particles) per step, over all ranks.
        lr: Peak Adam learning rate of each stage.
        budget: Total forward solves (nFS) over all stages, or None.
        generator: ``torch.Generator`` of the noise (the same seed on every rank).
        callback: ``callback(info)`` after every step, ``info`` the history record.
        checkpoint: ``checkpoint(state)`` at stage ends (see train_msign).
        single_stage: Train only the finest level.
        schedule: ``"cosine"`` (to ``lr_min * lr``), ``"step"`` or ``"constant"`` per stage.
        lr_min: Final fraction of ``lr`` (floor of the step schedule).
        grad_clip: Maximum global gradient norm.
        max_failures: Consecutive skipped steps (non-finite loss or gradient) that stop training
            with :class:`TrainingError`.
        comm: Ensemble communicator: ranks split the batch and their forward solves, gather
            the particles and scores for the kernel sums and sum gradients (None: one process).

    Returns:
        History: one dict per step with the keys of :func:`train_msign`:
        ``stage``, ``step``, ``nfs``, ``nfs_finest``, ``loss`` (here the mean squared norm of
        the Stein direction, zero at an SVGD fixed point), ``ess`` (NaN), ``lr``,
        ``grad_norm``, ``failed``, ``skipped`` (cumulative) and ``time``.

    Raises:
        TrainingError: ``max_failures`` consecutive steps were skipped.

    References:
        | Learning to Draw Samples: With Application to Amortized MLE for Generative
        | Adversarial Learning (Wang & Liu, 2016), https://arxiv.org/abs/1611.01722
        | Learning to Draw Samples with Amortized Stein Variational Gradient Descent
        | (Feng, Wang & Liu, 2017), https://arxiv.org/abs/1707.06626
        | Multiscale Invertible Generative Networks for High-Dimensional Bayesian Inference
        | (Zhang, Zhang & Hou, 2021), https://arxiv.org/abs/2105.05489
    """
    return train_msign(model, posteriors, objective="asvgd", **options)
