"""Multi-stage MsIGN training: stage by stage coarse to fine, nFS budgets, robust steps,
checkpoints and resume (:class:`Trainer`, :func:`train_msign`).
"""

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from geoinvert.errors import TrainingError
from geoinvert.inference.config import TrainOptions, recipe_options, stage_steps
from geoinvert.inference.objectives import frozen_surrogate, objective
from geoinvert.inference.starts import (ImportancePool, importance_pool, laplace_pool,
                                        smc_pool)
from geoinvert.parallel import Ensemble

__all__ = ["TrainingError", "TrainingInterrupted", "CHECKPOINT_VERSION", "Trainer",
           "train_msign", "train_asvgd", "train_stage", "training_step", "likelihood_step",
           "solve_cost",
           "level_costs", "lr_factor"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


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


def likelihood_step(optimizer, loss, *, lr, grad_clip=10.0):
    """One optimiser step on a maximum-likelihood ``loss`` (no solves: amortized posteriors,
    learned priors) at learning rate ``lr``, gradient norm clipped to ``grad_clip``; a loss
    that is not finite leaves the parameters untouched. Returns the loss value."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    if torch.isfinite(loss):
        loss.backward()
        params = [q for group in optimizer.param_groups for q in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return float(loss.detach())


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
    loss, stats = objective(options, posterior.level, pool=pool, reverse=reverse,
                            surrogate=surrogate)(model, posterior, batch, generator, ens)
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
            "ess": float(stats["ess"]), "flow_ess": float(stats.get("flow_ess", math.nan)),
            "lr": lr, "grad_norm": stats["grad_norm"],
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
            st.surrogate = frozen_surrogate(model)
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
                       surrogate=frozen_surrogate(model) if frozen else None)


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
    logger.info("stage %d: %d steps, nFS %d (%.1f finest equivalents), loss %.4g, ESS %.2f "
                "(the flow's own draws: %.2f), %d skipped", stage, steps, run.budget.used,
                run.budget.finest, last.get("loss", math.nan), last.get("ess", math.nan),
                last.get("flow_ess", math.nan), run.skipped)


def _steps_of(steps, level, finest):
    """Steps of a level from an int, a per-level sequence (index level - 1), a dict or None
    (:func:`~geoinvert.inference.config.stage_steps`)."""
    if steps is None:
        return stage_steps(level, finest)
    if isinstance(steps, dict):
        return int(steps[level])
    if isinstance(steps, (list, tuple)):
        return int(steps[level - 1])
    return int(steps)


def train_msign(model, posteriors, *, start=1, steps=None, batch=TrainOptions.batch,
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
        steps: Steps per stage: int, per-level sequence (index level - 1), ``{level: steps}``
            or None (:func:`~geoinvert.inference.config.stage_steps`: 200 on the finest level
            of a 16x16 or larger problem, in proportion to the parameters on the other
            stages, at least 25).
        batch: Samples per step (flow samples; Jeffreys draws as many importance samples).
        recipe: A name of :data:`RECIPES` (``paper`` or ``forward_kl``); the options of
            :data:`RECIPE_KEYS` below that are None take the recipe's values (or their
            :class:`TrainOptions` defaults).
        lr: Peak Adam learning rate of each stage.
        objective: ``"jeffreys"``, ``"reverse_kl"`` or ``"asvgd"`` (amortized SVGD, the MsIGN
            paper's baseline: :func:`geoinvert.inference.objectives.asvgd_loss`).
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
        estimate: D_J, or D_KL(p||q) - log Z), ``ess`` (importance ESS fraction of the
        forward KL's proposal draws, NaN for reverse KL), ``flow_ess`` (that of the flow's own
        draws in the reverse term: how usable the flow is as a proposal; NaN without that
        term), ``lr``, ``grad_norm``, ``failed`` (target evaluations that failed),
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
        steps: Steps per stage: int, per-level sequence, ``{level: steps}`` or None (sized to
            each stage: :func:`~geoinvert.inference.config.stage_steps`).
        budget: Total forward solves over all stages, or None.
        comm: Ensemble communicator (None: one process).
        callback: ``callback(info)`` after every step.
        checkpoint: ``checkpoint(state)`` at stage ends, every ``checkpoint_every`` steps and
            on a stop request.
        checkpoint_every: Steps between checkpoints within a stage (0: stage ends only).
        stop: ``stop() -> bool`` polled after every step.
    """

    def __init__(self, model, posteriors, options, *, steps=None, budget=None, comm=None,
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
                        steps=_steps_of(self.steps, stage, self.finest), options=self.options,
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
    direction phi of the sample (:func:`~geoinvert.inference.objectives.stein_direction`, RBF kernel, median-heuristic
    bandwidth) from the target scores grad log q_l (adjoint gradients) and updates the
    parameters along sum_i (dG(z_i)/dtheta)^T phi(x_i) (:func:`~geoinvert.inference.objectives.asvgd_loss`, Adam). This is the
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
    :func:`~geoinvert.inference.objectives.asvgd_loss`, gradients summed over the ranks, clipped, skipped if not finite), so
    checkpoints, ``resume`` and stop requests work as there; the keyword options are
    train_msign's (those below, plus ``checkpoint_every``, ``resume``, ``stop``).

    Args:
        model: :class:`~geoinvert.flows.msign.MsIGN` (its flows F_1..F_{start-1} trained).
        posteriors: ``{level: Posterior}`` with ``grad_log_prob``; training ends at the highest
            level given.
        start: First stage to train.
        steps: Steps per stage: int, per-level sequence (index level - 1), ``{level: steps}``
            or None (:func:`~geoinvert.inference.config.stage_steps`: 200 on the finest level
            of a 16x16 or larger problem, in proportion to the parameters on the other
            stages, at least 25).
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
