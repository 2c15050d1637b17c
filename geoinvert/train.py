"""Multi-stage MsIGN training: Jeffreys and reverse-KL objectives, nFS budgets, robust steps."""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from geoinvert.flows.msign import standard_normal_log_prob

__all__ = [
    "OBJECTIVES",
    "TrainingError",
    "TrainOptions",
    "Ensemble",
    "reverse_kl_loss",
    "jeffreys_loss",
    "ImportancePool",
    "importance_pool",
    "pool_jeffreys_loss",
    "training_step",
    "train_stage",
    "train_msign",
    "solve_cost",
    "level_costs",
    "lr_factor",
]

logger = logging.getLogger(__name__)

OBJECTIVES = ("jeffreys", "reverse_kl")
SCHEDULES = ("cosine", "step", "constant")
PROPOSALS = ("auto", "surrogate", "defensive", "mixture")
_F64 = torch.float64


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. many consecutive steps with a non-finite loss or gradient)."""


@dataclass
class TrainOptions:
    """Settings shared by every stage (see :func:`train_msign` for their meaning)."""

    objective: str = "jeffreys"
    batch: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"
    lr_min: float = 0.05
    grad_clip: float = 10.0
    max_failures: int = 20
    proposal: str = "auto"
    single_stage: bool = False
    pool: int = 4096
    pool_warmup: float = 0.5

    def __post_init__(self):
        for name, value, valid in (("objective", self.objective, OBJECTIVES),
                                   ("schedule", self.schedule, SCHEDULES),
                                   ("proposal", self.proposal, PROPOSALS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if int(self.batch) != self.batch or self.batch < 2:
            raise ValueError(f"batch must be an integer >= 2, got {self.batch!r}")
        if not self.lr > 0 or not self.grad_clip > 0 or not 0 <= self.lr_min <= 1:
            raise ValueError("lr and grad_clip must be > 0 and lr_min in [0, 1]")

    @property
    def evaluations(self) -> int:
        """Target evaluations per sample of a step: 2 for Jeffreys (flow + importance samples)."""
        return 2 if self.objective == "jeffreys" else 1


# -- ensemble parallelism -------------------------------------------------------------------------


class Ensemble:
    """Sums over the ranks of an ensemble communicator; the identity without one.

    Each rank draws its share of the batch and evaluates its own forward models; losses are
    normalised by *global* counts, so summing the ranks' gradients (:meth:`allreduce_grads`)
    gives the gradient of the global loss.

    Args:
        comm: An mpi4py communicator (ranks holding independent forward models) or None.
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()

    def share(self, num: int) -> int:
        """This rank's part of ``num`` samples (the first ``num % size`` ranks take one more)."""
        return num // self.size + (self.rank < num % self.size)

    def sum(self, *values: float) -> np.ndarray:
        """Elementwise sum over the ranks of a few floats, ndarray float64."""
        local = np.asarray(values, dtype=np.float64)
        if self.comm is None:
            return local
        out = np.empty_like(local)
        self.comm.Allreduce(local, out)
        return out

    def max(self, value: float) -> float:
        """Maximum over the ranks."""
        if self.comm is None:
            return float(value)
        from mpi4py import MPI
        return float(self.comm.allreduce(float(value), op=MPI.MAX))

    def allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in place (one Allreduce)."""
        if self.comm is None:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(_F64).numpy()
        total = np.empty_like(flat)
        self.comm.Allreduce(flat, total)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = torch.from_numpy(total[offset:offset + n]).reshape(p.shape).to(p.dtype)
            offset += n


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


def _reverse_terms(model, posterior, num, generator):
    r"""Reparameterised samples x = G(z) and per-sample terms of D_KL(p || q).

    The target is evaluated (float64) outside the flow's graph; its gradient g = d log q / dx is
    pulled back through x = G(z): d/dtheta [log p(x) - log q(x)] = d/dtheta [log p(x) - g . x].

    Returns:
        ``(term, value, ok)``: differentiable ``log p - g . x`` ``(num,)``, the detached
        ``log p - log q`` (float64) and the mask of finite target values and gradients.
    """
    x, log_p = model.sample(num, generator=generator, level=posterior.level)
    log_q, grad = posterior.grad_log_prob(x.detach().to(_F64))
    ok = torch.isfinite(log_q) & torch.isfinite(grad).flatten(1).all(1)
    grad = torch.where(ok[:, None, None], grad, torch.zeros_like(grad)).to(x.dtype)
    term = log_p - (grad * x).flatten(1).sum(1)
    return term, log_p.detach().to(_F64) - log_q, ok


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
    term, value, ok = _reverse_terms(model, posterior, ens.share(batch), generator)
    n_ok, total = ens.sum(float(ok.sum()), float(value[ok].sum()))
    loss = term[ok].sum() / n_ok if n_ok else term.sum() * math.nan
    stats = {"loss": total / n_ok if n_ok else math.nan, "ess": math.nan, "nfs": batch,
             "failed": int(batch - n_ok)}
    return loss, stats


def _propose(model, level, num, generator, kind):
    """Importance proposal ``(x, log s(x))`` without grad: the surrogate or a defensive mixture.

    ``surrogate``: PC_l(p_{l-1}) (MsIGN). ``defensive``: half from the surrogate, half from the
    prior (every F = identity), s = (surrogate + prior) / 2, which keeps modes the surrogate
    lost in the forward KL (defensive importance sampling, Hesterberg 1995). ``mixture``: half
    from the prior and half from the model, for stages without a trained coarser model
    (stage 1 without a pool, single-stage training).
    """
    if kind == "surrogate":
        return model.sample_surrogate(num, level, generator=generator)
    defensive = kind == "defensive"
    with torch.no_grad():
        half = num // 2
        x_prior = model.decode(model.sample_noise(num - half, level, generator=generator),
                               upto=0)[0]
        sampler = model.sample_surrogate if defensive else model.sample
        x = torch.cat((x_prior, sampler(half, level=level, generator=generator)[0]))
        log_other = (model.surrogate_log_prob if defensive else model.log_prob)(x, level)
        return x, torch.logaddexp(_prior_log_prob(model, x), log_other) - math.log(2.0)


def _prior_log_prob(model, x):
    """log rho_l(x) through the model with every F = identity, ``(num,)``."""
    zs, logdet = model.encode(x, upto=0)
    return standard_normal_log_prob(zs) + logdet


def _forward_terms(model, posterior, num, generator, proposal):
    """Proposal samples, their log weights log q~ - log s (float64), finite mask, and log p."""
    x, log_s = _propose(model, posterior.level, num, generator, proposal)
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


def jeffreys_loss(model, posterior, batch, generator=None, *, ensemble=None, proposal="surrogate"):
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

    Returns:
        ``(loss, stats)`` as in :func:`reverse_kl_loss`; ``stats["ess"]`` is the importance
        ESS fraction of the proposal samples, and ``nfs`` is ``2 * batch``.

    References:
        Zhang, Zhang, Hou. Multiscale invertible generative networks for high-dimensional
        Bayesian inference. ICML 2021, https://arxiv.org/abs/2105.05489
    """
    ens = ensemble or Ensemble()
    rev, rev_stats = reverse_kl_loss(model, posterior, batch, generator, ensemble=ens)
    log_p, log_q, log_w, ok = _forward_terms(model, posterior, ens.share(batch), generator,
                                             proposal)
    w, ess = _snis_weights(log_w, ok, ens)
    w_t = w.to(log_p.dtype)
    forward = -(w_t * torch.where(ok, log_p, torch.zeros_like(log_p))).sum()
    (value,) = ens.sum(float((w * torch.where(ok, log_q - log_p.detach().to(_F64), 0.0)).sum()))
    n_ok = int(ens.sum(float(ok.sum()))[0])
    if n_ok == 0:
        forward, value = forward * math.nan, math.nan
    stats = {"loss": rev_stats["loss"] + value, "ess": ess / batch, "nfs": 2 * batch,
             "failed": rev_stats["failed"] + batch - n_ok}
    return rev + forward, stats


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


def importance_pool(model, posterior, size, generator=None):
    r"""Samples of q_l by importance sampling from the prior of level l (every F = identity).

    The "standard method" for the coarsest stage (4 dimensions): ``size`` prior draws, weights
    w_i propto q~(x_i) / rho(x_i), self-normalised; failed solves get weight 0. Costs ``size``
    target evaluations once.
    """
    with torch.no_grad():
        zs = model.sample_noise(size, posterior.level, generator=generator)
        x, logdet = model.decode(zs, upto=0)
        log_prior = standard_normal_log_prob(zs).to(_F64) - logdet.to(_F64)
        log_q = posterior.log_prob(x.to(_F64)).to(_F64)
    log_w = torch.where(torch.isfinite(log_q), log_q - log_prior, -math.inf)
    if not torch.isfinite(log_w).any():
        raise TrainingError(f"every target evaluation of the level-{posterior.level} "
                            "importance pool failed")
    return ImportancePool(x, torch.softmax(log_w, 0), log_q)


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
    idx = torch.multinomial(pool.w, ens.share(batch), replacement=True, generator=generator)
    log_p = model.log_prob(pool.x[idx], posterior.level)
    (value,) = ens.sum(float((pool.log_q[idx] - log_p.detach().to(_F64)).sum()))
    stats = {**rev_stats, "loss": rev_stats["loss"] + value / batch, "ess": pool.ess}
    return rev - log_p.sum() / batch, stats


# -- one step, one stage, all stages --------------------------------------------------------------


def lr_factor(step: int, steps: int, schedule: str, floor: float) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: cosine from 1 to ``floor``, step decay
    (x0.3 at 1/2 and 3/4 of the stage, not below ``floor``) or constant."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    t = step / (steps - 1)
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return max(floor, 0.3 ** ((t >= 0.5) + (t >= 0.75)))


def _loss(model, posterior, batch, generator, options, ensemble, pool=None, reverse=True):
    if pool is not None:
        return pool_jeffreys_loss(model, posterior, batch, generator, pool=pool,
                                  ensemble=ensemble, reverse=reverse)
    if options.objective == "reverse_kl":
        return reverse_kl_loss(model, posterior, batch, generator, ensemble=ensemble)
    proposal = options.proposal
    if proposal == "auto":
        coarse_trained = posterior.level >= 2 and not options.single_stage
        proposal = "defensive" if coarse_trained else "mixture"
    return jeffreys_loss(model, posterior, batch, generator, ensemble=ensemble, proposal=proposal)


def training_step(model, posterior, optimizer, *, batch, generator, options, ensemble=None,
                  pool=None, reverse=True):
    """One optimisation step on this rank's share of ``batch``; skipped if not finite.

    Computes the local loss and gradients of the active parameters, sums the gradients over the
    ensemble, clips their global norm to ``options.grad_clip`` and steps the optimiser, unless
    the loss or the gradient norm is not finite (then the parameters are left untouched).

    With a ``pool`` (:class:`ImportancePool`) the loss is :func:`pool_jeffreys_loss` (its
    reverse term only if ``reverse``).

    Returns:
        The stats of the loss plus ``grad_norm`` and ``skipped`` (bool).
    """
    ens = ensemble or Ensemble()
    params = model.active_parameters()
    optimizer.zero_grad(set_to_none=False)
    loss, stats = _loss(model, posterior, batch, generator, options, ens, pool, reverse)
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


@dataclass
class _StageRun:
    """Mutable state of training: budget, step records, skipped-step counters."""

    budget: _Budget
    costs: dict
    history: list
    callback: object
    skipped: int = 0
    consecutive: int = 0


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


def train_stage(model, posterior, *, stage, steps, options, run, generator=None, ensemble=None,
                stages_left=1):
    """Train F_1..F_stage on the posterior of level ``stage`` (or the finest, single-stage).

    Adam on :meth:`~geoinvert.flows.msign.MsIGN.active_parameters` with the per-stage learning
    rate schedule; the stage takes ``steps`` steps or fewer when its share of the remaining
    nFS budget (equal split over ``stages_left`` stages) runs out, never exceeding it.

    Returns:
        Number of steps taken.
    """
    model.set_stage(stage)
    allowance = run.budget.allowance(stages_left)
    started = time.perf_counter()
    pool, evaluations = _stage_pool(model, posterior, stage, options, run, allowance, generator)
    if pool is not None:
        allowance -= pool.w.numel()
    planned = _planned_steps(steps, options.batch, evaluations, allowance)
    optimizer = torch.optim.Adam(model.active_parameters(), lr=options.lr)
    spent = 0
    for step in range(planned):
        batch = options.batch if math.isinf(allowance) else \
            min(options.batch, int(allowance - spent) // evaluations)
        lr = options.lr * lr_factor(step, planned, options.schedule, options.lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = training_step(model, posterior, optimizer, batch=batch, generator=generator,
                              options=options, ensemble=ensemble, pool=pool,
                              reverse=pool is None or step >= options.pool_warmup * planned)
        spent += stats["nfs"]
        info = _record(run, stage, step, stats, lr, started)
        _check_failures(run, stage, options, info)
    _log_stage(stage, planned, run)
    return planned


def _stage_pool(model, posterior, stage, options, run, allowance, generator):
    """The importance pool of stage 1 (Jeffreys, multi-stage) and the solves per sample of a step.

    The pool takes at most half of the stage's allowance; its solves are spent at once.
    """
    use = (stage == 1 and options.objective == "jeffreys" and not options.single_stage
           and options.pool > 0)
    size = (options.pool if math.isinf(allowance) else min(options.pool, int(allowance) // 2)) \
        if use else 0
    if size < 2:
        return None, options.evaluations
    pool = importance_pool(model, posterior, size, generator)
    run.budget.spend(size, run.costs[stage])
    logger.info("stage %d: importance pool of %d prior samples, ESS fraction %.3f", stage,
                size, pool.ess)
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


def _rank_generator(generator, ensemble):
    """Independent noise per rank: a rank-offset seed drawn from ``generator`` (same on all)."""
    if ensemble.size == 1:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed + 7919 * ensemble.rank)


def train_msign(model, posteriors, *, start=1, steps=200, batch=64, lr=1e-3, objective="jeffreys",
                budget=None, generator=None, callback=None, checkpoint=None, single_stage=False,
                schedule="cosine", lr_min=0.05, grad_clip=10.0, max_failures=20, proposal="auto",
                pool=4096, pool_warmup=0.5, comm=None):
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
        lr: Peak Adam learning rate of each stage.
        objective: ``"jeffreys"`` or ``"reverse_kl"``.
        budget: Total forward solves (nFS) over all stages, or None. Each stage gets an equal
            share of what is left; the total is never exceeded.
        generator: ``torch.Generator`` of the noise.
        callback: ``callback(info)`` after every step, ``info`` the history record.
        checkpoint: ``checkpoint(stage)`` after every completed stage.
        single_stage: Train only the finest level from the prior-conditioned model.
        schedule: Learning rate per stage, ``"cosine"`` (to ``lr_min * lr``), ``"step"`` or
            ``"constant"``.
        lr_min: Final fraction of ``lr`` of the cosine schedule (floor of the step schedule).
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
        comm: Ensemble communicator: ranks split the batch, each with its own forward models,
            and sum gradients (None: one process).

    Returns:
        History: one dict per step with ``stage``, ``step``, ``nfs`` (cumulative solves),
        ``nfs_finest`` (cumulative finest-level equivalents), ``loss`` (the objective's
        estimate: D_J, or D_KL(p||q) - log Z), ``ess`` (importance ESS fraction, NaN for
        reverse KL), ``lr``, ``grad_norm``, ``failed`` (target evaluations that failed),
        ``skipped`` (cumulative skipped steps) and ``time`` (s since the stage began).

    Raises:
        TrainingError: ``max_failures`` consecutive steps were skipped.
    """
    options = TrainOptions(objective=objective, batch=batch, lr=lr, schedule=schedule,
                           lr_min=lr_min, grad_clip=grad_clip, max_failures=max_failures,
                           proposal=proposal, single_stage=single_stage, pool=pool,
                           pool_warmup=pool_warmup)
    finest = max(posteriors)
    if finest > model.levels:
        raise ValueError(f"posteriors go up to level {finest}, the model to {model.levels}")
    stages = [finest] if single_stage else list(range(max(start, 1), finest + 1))
    if single_stage and start > finest:
        stages = []
    missing = sorted(set(stages) - set(posteriors))
    if missing:
        raise ValueError(f"posteriors missing for levels {missing}")
    ensemble = Ensemble(comm)
    run = _StageRun(_Budget(budget), level_costs(posteriors), [], callback)
    generator = _rank_generator(generator, ensemble)
    for k, stage in enumerate(stages):
        train_stage(model, posteriors[stage], stage=stage, steps=_steps_of(steps, stage),
                    options=options, run=run, generator=generator, ensemble=ensemble,
                    stages_left=len(stages) - k)
        if checkpoint is not None:
            checkpoint(stage)
    return run.history
