"""Running a case: the one place that wires a case to its posterior, sampler and result.

:func:`run` builds the posteriors of the case, fits them with the case's sampler (a flow
trained stage by stage and corrected to exactness, the Laplace approximation or gpCN, or
MCMC chains), judges the outcome (:func:`geoinvert.diagnostics.verdict`) and writes the
result (:mod:`geoinvert.io`).
"""

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from geoinvert.io import (acquire_lock, build_dataset, checkpoint_meta, checkpoint_path, figures,
                          model_path, read_checkpoint, release_lock, save_model,
                          write_checkpoint, write_netcdf)
from geoinvert.problem.forward import failures

__all__ = ["Result", "run", "result_path", "summary_lines", "amortize", "infer", "load_amortized",
           "calibrate"]

logger = logging.getLogger(__name__)


@dataclass
class Result:
    """Outcome of :func:`run`.

    Attributes:
        dataset: The result Dataset (see :func:`build_dataset`).
        model: The trained :class:`~geoinvert.flows.msign.MsIGN`.
        path: The netCDF file written.
        model_path: The saved model (``.pt`` with its ``.json`` config) beside it.
    """

    dataset: xr.Dataset
    model: object
    path: Path
    model_path: Path


def result_path(case, out=None):
    """Where a run writes: ``out``, else ``output.path`` (relative to the case), else
    ``results/<name>.nc`` under the current directory."""
    if out is not None:
        out = Path(out)
        if out.is_dir():
            return out / f"{case.name}.nc"
        return out if out.suffix == ".nc" else out.with_name(out.name + ".nc")
    if case.config["output"]["path"]:
        path = Path(case.config["output"]["path"]).expanduser()
        return path if path.is_absolute() else case.folder / path
    return Path.cwd() / "results" / f"{case.name}.nc"


def _new_model(case, seed):
    """A new MsIGN whose random initial weights come from ``seed`` alone (not from the global
    torch RNG), so a seed fixes the whole run in any process and on every rank."""
    import torch
    from geoinvert.case import flow_config
    from geoinvert.flows.msign import MsIGN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MsIGN(case.prior(), case.finest, **flow_config(case.config).model_options())


class _Progress:
    """tqdm bar over forward solves showing stage, loss and importance-sampling ESS."""

    def __init__(self, total, enabled, initial=0):
        from geoinvert import progress
        self.bar = progress.bar(total=total or None, unit="nFS", disable=not enabled,
                                dynamic_ncols=True, desc="stage 1", initial=initial)
        self.nfs = initial

    def __call__(self, info):
        self.bar.set_description(f"stage {info['stage']}", refresh=False)
        nan = float("nan")
        shown = {"loss": f"{info['loss']:.4g}", "ess": f"{info.get('ess', nan):.2f}"}
        if math.isfinite(info.get("flow_ess", nan)):      # the flow's own draws, when drawn
            shown["flow_ess"] = f"{info['flow_ess']:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(int(info["nfs"]) - self.nfs)
        self.nfs = int(info["nfs"])

    def close(self):
        self.bar.close()


def _train(case, model, posteriors, *, generator, progress, checkpoint, resume, stop, comm,
           checkpoint_every, spent=0):
    """Train every stage (:class:`geoinvert.inference.trainer.Trainer`); returns the history.
    ``spent`` solves of the budget went before the training."""
    from geoinvert.case import reserved_solves, train_options, training_solves
    from geoinvert.inference.trainer import Trainer
    s = case.config["sampler"]
    done = resume["budget"]["used"] if resume else 0
    budget = max(s["budget"] - reserved_solves(case.config) - spent, 1) if s["budget"] else None
    bar = _Progress(budget or training_solves(case), progress, initial=done)
    try:
        trainer = Trainer(model, posteriors, train_options(case.config), steps=s["steps"],
                          budget=budget, comm=comm, callback=bar, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, stop=stop)
        return trainer.run(generator=generator, resume=resume)
    finally:
        bar.close()


def _importance_diagnostics(log_target, log_prob):
    """ESS fraction and PSIS k-hat of the weights ``w = target / flow`` of the flow samples."""
    from geoinvert import diagnostics
    log_w = np.asarray(log_target, float) - np.asarray(log_prob, float)
    return {"is_ess": float(diagnostics.importance_ess_fraction(log_w)),
            "psis_khat": float(diagnostics.psis_khat(log_w))}


def _draw(case, model, posterior, generator, ensemble):
    """Final samples with flow and target log densities, the predictive mean and level means.

    The noise is drawn whole on every rank; each solve group evaluates its block and the blocks
    are gathered, so the samples do not depend on the number of ranks.
    """
    import torch
    from geoinvert.parallel import Ensemble, draw_noise, in_chunks
    from geoinvert.inference.objectives import decode
    ens = Ensemble(ensemble)
    n = case.config["output"]["samples"]
    with torch.no_grad():
        x, log_prob = decode(model, draw_noise(model, case.finest, n, generator, ens))
        x = x.to(torch.float64)
        log_target, pred = in_chunks(posterior.evaluate, x)
        x, log_prob, log_target, pred = (ens.gather(t) for t in (x, log_prob.to(torch.float64),
                                                                 log_target, pred))
        levels, _ = model.sample_levels(n, generator=generator, level=case.finest)
    means = {l: xl.to(torch.float64).mean(0).numpy() for l, xl in enumerate(levels, start=1)}
    return (x.numpy(), log_prob.numpy(), log_target.numpy(), np.nanmean(pred.numpy(), 0), means,
            n)


def _observations(case, predicted):
    obs = case.config["observations"]
    # points, then functions (no location), then hard data
    pts = np.concatenate([np.asarray(obs["points"], float).reshape(-1, 2),
                          np.full((len(obs["functions"]), 2), np.nan), case.hard_points])
    out = {"name": case.observation_names(), "value": case.data, "noise": case.noise,
           "x": pts[:, 0], "y": pts[:, 1], "predicted": predicted}
    if case.truth is not None:
        import torch
        with torch.no_grad():
            out["truth"] = case.forward(case.finest)(torch.as_tensor(case.truth)[None]).numpy()[0]
    return out


def _attrs(case, seed, nfs, wall, diagnostics, ranks, resumed):
    from geoinvert import __version__
    return {"title": f"geoinvert posterior: {case.name}", "geoinvert_version": __version__,
            "case_name": case.name, "description": case.config["description"],
            "case": case.text, "seed": seed, "nfs": int(nfs), "wall_time": float(wall),
            "forward_kind": case.config["forward"]["kind"], "finest_level": case.finest,
            "synthetic": int(case.synthetic), "mpi_ranks": ranks, "resumed": int(resumed),
            "diagnostics": diagnostics}


def _without_failed_draws(fit):
    """``fit`` without the draws whose target is not finite (a failed forward solve), their
    number in ``diagnostics["failed_draws"]``.

    Raises:
        TrainingError: every draw failed (there is no result to write).
    """
    bad = ~np.isfinite(fit.log_target)
    if not bad.any():
        return fit
    from geoinvert.errors import TrainingError
    if bad.all():
        raise TrainingError(f"the forward solve failed for all {bad.size} draws of the "
                            "result: the fields this posterior allows are beyond what the "
                            "solver can do in double precision (see the warning of geoinvert "
                            "check about the prior)")
    keep = ~bad
    pick = lambda a: None if a is None else a[keep]     # noqa: E731
    return dataclasses.replace(
        fit, x=fit.x[keep], log_prob=fit.log_prob[keep], log_target=fit.log_target[keep],
        chain=pick(fit.chain), draw=pick(fit.draw),
        diagnostics={**fit.diagnostics, "failed_draws": int(bad.sum()),
                     "drawn": int(bad.size)})


def _history(history):
    """Training history as arrays: accepts a dict of lists or a list of per-step dicts."""
    if not history:
        return None
    if isinstance(history, dict):
        return {k: np.asarray(v) for k, v in history.items()}
    keys = ("stage", "nfs", "loss", "ess", "flow_ess", "failed", "skipped")
    return {k: np.asarray([h.get(k, np.nan) for h in history]) for k in keys}


def _check_writable(path, lay):
    """Fail early, on every rank alike, when the root cannot write beside ``path``."""
    from geoinvert.errors import CaseError
    problem = None
    if lay.root:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                problem = "folder is not writable"
        except OSError as err:
            problem = f"cannot create the folder ({err.strerror})"
    problem = lay.bcast(problem)
    if problem:
        raise CaseError(str(path), problem)


def _remove_stale_temporaries(path):
    """Delete temporary files a killed run left beside ``path`` (SIGKILL during a write)."""
    for target in (path, checkpoint_path(path), model_path(path)):
        for stale in target.parent.glob(target.name + ".tmp*"):
            logger.info("removing %s, left by an interrupted run", stale)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@dataclass
class _Fit:
    """What a sampler hands to the result: samples and their densities, the predictive mean,
    per-level means, training history, solves used, diagnostics and the model (flows)."""

    x: np.ndarray
    log_prob: np.ndarray
    log_target: np.ndarray
    predicted: np.ndarray
    level_means: dict
    history: list
    nfs: int
    diagnostics: dict
    model: object = None
    resumed: bool = False
    chain: np.ndarray = None
    draw: np.ndarray = None
    flow: dict = None
    map: np.ndarray = None
    psis: dict = None
    draws: np.ndarray = None        # every chain draw (m, ny, nx) that ``x`` was thinned from
    moments: tuple = None           # (mean, std) of a Gaussian answer, exact (Laplace kind)


_CHECKPOINT_KEYS = ("version", "stage", "step", "planned", "allowance", "spent", "elapsed",
                    "evaluations", "pool", "surrogate", "complete", "model", "optimizer",
                    "generator", "budget", "history", "skipped", "consecutive")


def _check_checkpoint(state, model, path):
    """A checkpoint that matches the case text and seed must also hold a whole training state
    of this model (its keys, tensor shapes, stage): else a user error, not a crash."""
    from geoinvert.errors import CaseError
    from geoinvert.inference.trainer import CHECKPOINT_VERSION
    fix = "; delete it to train from the start"
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        raise CaseError(str(path), f"is not a whole training state (missing "
                        f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}){fix}")
    if state["version"] != CHECKPOINT_VERSION:
        raise CaseError(str(path), f"has checkpoint version {state['version']}, this geoinvert "
                        f"writes {CHECKPOINT_VERSION}{fix}")
    expected = model.state_dict()
    saved = state["model"]
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise CaseError(str(path), f"holds another network than this case's{fix}")
    for name, tensor in expected.items():
        if getattr(saved[name], "shape", None) != tensor.shape:
            raise CaseError(str(path), f"holds {name} of shape "
                            f"{tuple(getattr(saved[name], 'shape', ()))}, this case's network "
                            f"has {tuple(tensor.shape)}{fix}")
    if not (isinstance(state["stage"], int) and 1 <= state["stage"] <= model.levels):
        raise CaseError(str(path), f"is at stage {state['stage']!r}, the network has levels "
                        f"1..{model.levels}{fix}")


def _fit_flow(case, seed, lay, posteriors, path, *, progress, resume, stop, checkpoint_every):
    """Train the case's flow (MsIGN or A-SVGD), checkpointing beside ``path``, sample it and,
    unless ``sampler.correction.kernel`` is ``none``, correct its draws to exactness."""
    import torch
    from geoinvert.case import correction_config
    ckpt, meta = checkpoint_path(path), checkpoint_meta(case, seed)
    every = case.config["sampler"]["checkpoint_every"] if checkpoint_every is None \
        else checkpoint_every
    state = read_checkpoint(case, ckpt, seed) if resume else None
    generator = torch.Generator().manual_seed(seed)
    model = _new_model(case, seed)
    if state is not None:
        _check_checkpoint(state, model, ckpt)

    def checkpoint(training_state):
        if lay.root:
            write_checkpoint(ckpt, training_state, meta)

    posteriors, errors, error_nfs = _coarse_posteriors(posteriors, seed, lay)
    deferring = getattr(stop, "deferring", contextlib.nullcontext)
    with deferring():          # a signal waits for the next step, which saves a checkpoint
        history = _train(case, model, posteriors, generator=generator,
                         progress=progress and lay.root, checkpoint=checkpoint, resume=state,
                         stop=stop, comm=lay.ensemble, checkpoint_every=every, spent=error_nfs)
    x, log_prob, log_target, predicted, means, drawn = _draw(
        case, model, posteriors[case.finest], generator, lay.ensemble)
    nfs = (history[-1]["nfs"] if history else 0) + drawn + error_nfs
    diagnostics = {**_importance_diagnostics(log_target, log_prob), **errors,
                   "failed_solves": int(sum(h["failed"] for h in history)),
                   "skipped_steps": int(history[-1]["skipped"]) if history else 0}
    fit = _Fit(x, log_prob, log_target, predicted, means, history, nfs, diagnostics, model,
               state is not None)
    return _correct_fit(fit, case, seed, lay, posteriors[case.finest], progress=progress)


def _coarse_posteriors(posteriors, seed, lay):
    """The coarse levels' posteriors with their discretisation error allowed for
    (:mod:`geoinvert.problem.approximation`), that error in noise units per level (for the
    diagnostics) and the solves this took on all ranks. The draws come from ``seed`` alone,
    so a resumed run trains on the same posteriors."""
    import torch
    from geoinvert.parallel import Ensemble
    from geoinvert.problem.approximation import approximation_errors, with_approximation_errors
    errors, solves = approximation_errors(
        posteriors, generator=torch.Generator().manual_seed(seed + 53), ensemble=lay.ensemble)
    noise = posteriors[max(posteriors)].noise
    solves = int(Ensemble(lay.ensemble).sum(solves)[0])
    report = {f"coarse_error_level{l}": e.ratio(noise) for l, e in sorted(errors.items())}
    if solves:
        report["coarse_error_nfs"] = solves
    return with_approximation_errors(posteriors, errors), report, solves


def _correct_fit(fit, case, seed, lay, posterior, *, progress, approximation=None):
    """Correct the draws of a trained network (``fit.model``, or ``approximation`` when it is
    not an MsIGN) unless ``sampler.correction.kernel`` is ``none``: the mode search and the
    Laplace fit first when the correction needs them, then :func:`_corrected`; a correction
    that cannot start leaves the network's own draws, flagged."""
    import torch
    from geoinvert.case import correction_config
    from geoinvert.inference.correction import FlowTransport
    from geoinvert.samplers.chains import NonFiniteStart
    config = correction_config(case.config)
    if not config.enabled:
        return dataclasses.replace(fit, psis=_psis_estimates(fit.x, fit.log_target,
                                                             fit.log_prob))
    own = approximation if approximation is not None else FlowTransport(fit.model)
    modes, transport = (), None if approximation is None else approximation
    use_modes = config.independence and config.modes
    if use_modes or config.coordinates == "laplace":
        from geoinvert.inference.laplace import fit_laplace
        laplace = fit_laplace(posterior, all_modes=True,
                              generator=torch.Generator().manual_seed(seed + 31))
        extra = {"mode_search_nfs": laplace.nfs, "mode_search_failed_solves": laplace.failed}
        if use_modes:
            modes, extra["modes_found"] = laplace.modes, len(laplace.modes)
            if laplace.search_unfinished:
                extra["mode_search_unfinished"] = 1
        if config.coordinates == "laplace":
            transport = laplace.transport
            if use_modes and len(laplace.modes) > 1:     # each chain in its mode's coordinates
                from geoinvert.inference.correction import ModeCoordinates
                transport = ModeCoordinates(laplace.modes)
        fit = dataclasses.replace(fit, nfs=fit.nfs + laplace.nfs,
                                  diagnostics={**fit.diagnostics, **extra})
    try:
        return _corrected(fit, case, seed, lay, posterior, config, progress=progress and lay.root,
                          modes=modes, transport=transport or own, approximation=own)
    except NonFiniteStart as err:     # raised on every rank alike (_chain_starts, _check_starts)
        reason = err.reason or (f"{len(err.chains)} of its {config.chains} chains would start "
                                "where the forward solve fails or the gradient overflows")
        logger.warning("the correction could not start: %s; the result holds the flow's own "
                       "draws", reason)
        return dataclasses.replace(fit, diagnostics={
            **fit.diagnostics, "correction_unstarted": len(err.chains)})


def _fit_vi(case, seed, lay, posterior, *, progress):
    """Train the case's variational family (``iaf`` or ``meanfield``) on the finest level by
    the reverse KL, draw from it and correct its draws like a flow's."""
    import torch
    from geoinvert.case import reserved_solves
    from geoinvert.flows.autoregressive import IAF, MeanField
    from geoinvert.inference.vi import train_vi
    from geoinvert.parallel import Ensemble, in_chunks
    from geoinvert.samplers.whitening import standard_normal_log_prob
    s, ens = case.config["sampler"], Ensemble(lay.ensemble)
    with torch.random.fork_rng():            # the MADE's initial weights, from the seed
        torch.manual_seed(seed)
        prior = posterior.prior            # the latent N(0, I) with a learned prior
        model = IAF(prior, case.finest, transforms=s["blocks"], hidden=s["hidden"]) \
            if s["kind"] in ("iaf", "composed") else MeanField(prior, case.finest)
    generator = torch.Generator().manual_seed(seed)
    total = s["steps"]
    bar = _Progress(total * s["batch"], progress and lay.root)
    budget = s["budget"] - reserved_solves(case.config) if s["budget"] else None
    try:
        history = train_vi(model, posterior, steps=total, batch=s["batch"], lr=s["lr"],
                           generator=generator, comm=lay.ensemble, budget=budget,
                           callback=lambda r: bar({"nfs": r["nfs"], "stage": r["stage"],
                                                   "loss": r["loss"], "ess": r["ess"]}))
    finally:
        bar.close()
    n = case.config["output"]["samples"]
    with torch.no_grad():
        z = torch.randn((n, model.dim), generator=generator, dtype=torch.float64)[ens.part(n)]
        x, logdet = model.to_x(z)
        log_prob = standard_normal_log_prob(z) - logdet
        log_target, pred = in_chunks(posterior.evaluate, x)
        x, log_prob, log_target, pred = (ens.gather(t) for t in (x, log_prob, log_target, pred))
    nfs = (history[-1]["nfs"] if history else 0) + n
    diagnostics = {**_importance_diagnostics(log_target.numpy(), log_prob.numpy()),
                   "failed_solves": int(sum(h["failed"] for h in history)),
                   "skipped_steps": int(history[-1]["skipped"]) if history else 0}
    fit = _Fit(x.numpy(), log_prob.numpy(), log_target.numpy(), np.nanmean(pred.numpy(), 0),
               {case.finest: x.mean(0).numpy()}, history, nfs, diagnostics, model, False)
    model.requires_grad_(False)          # trained: the correction only evaluates it
    return _correct_fit(fit, case, seed, lay, posterior, progress=progress, approximation=model)


def _convergence(samples, log_target):
    """Largest split R-hat (NaN for one chain) and smallest bulk and tail ESS over the
    summaries of chains ``samples (m, n, ...)`` with their log targets."""
    from geoinvert.diagnostics import mcmc_ess, mcmc_tail_ess, split_rhat
    from geoinvert.samplers import ChainResult
    chains = ChainResult.of_draws(samples, log_target)
    summaries = chains.summaries()      # once: it takes an SVD of the draws on large lattices
    columns = [summaries[:, :, k] for k in range(summaries.shape[2])]
    multi = samples.shape[0] > 1
    return {"rhat": float(np.nanmax([split_rhat(c) for c in columns])) if multi else math.nan,
            "ess": float(np.nanmin([mcmc_ess(c) for c in columns])),
            "ess_tail": float(np.nanmin([mcmc_tail_ess(c) for c in columns]))}


def _chain_diagnostics(pooled):
    """R-hat, bulk and tail ESS, MCSE of the mean and acceptance of pooled chains."""
    from geoinvert.diagnostics import mcmc_ess
    cells = pooled.samples.reshape(*pooled.samples.shape[:2], -1)
    cell_ess = np.asarray([mcmc_ess(cells[:, :, k], rank_normalize=False)
                           for k in range(cells.shape[2])])
    return {**_convergence(pooled.samples, pooled.log_prob),
            "mcse_mean": float(np.nanmax(1.0 / np.sqrt(np.maximum(cell_ess, 1e-300)))),
            "acceptance": float(pooled.acceptance.mean()), "step_size": float(pooled.step_size),
            "chains": int(pooled.samples.shape[0]), "draws": int(pooled.samples.shape[1]),
            "warmup": int(pooled.warmup)}


class _ChainProgress:
    """tqdm bar over chain iterations showing the phase and the acceptance rate."""

    def __init__(self, total, enabled, desc):
        from geoinvert import progress
        self.bar = progress.bar(total=total, unit="it", disable=not enabled, dynamic_ncols=True,
                                desc=desc)
        self.postfix = {}

    def __call__(self, done, total, accept):
        if total != self.bar.total:
            self.bar.total = total
        self.postfix["accept"] = f"{accept:.2f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def set(self, **values):
        """Show ``values`` (e.g. the current R-hat) beside the acceptance. R-hat has three
        decimals, so that a value just above the criterion of 1.01 does not read as 1.01."""
        self.postfix.update({k: f"{v:.3f}" if k == "rhat" else f"{v:.3g}"
                             for k, v in values.items()})
        # shown at the next update, or when the bar closes: the chains' last look (the one
        # that stopped them) is then what the finished bar says
        self.bar.set_postfix(self.postfix, refresh=False)

    def close(self):
        self.bar.close()


def _chain_starts(x, log_target, chains, *, flow=True):
    """The first ``chains`` draws with a finite target (the chains' starts).

    Raises:
        NonFiniteStart: fewer such draws of a ``flow`` than chains (the correction cannot
            start; the result keeps the flow's draws, flagged).
        TrainingError: fewer such draws of another approximation (gpCN's Laplace fit).
    """
    from geoinvert.errors import TrainingError
    from geoinvert.samplers.chains import NonFiniteStart
    finite = np.flatnonzero(np.isfinite(log_target))
    if finite.size < chains:
        reason = (f"only {finite.size} of {len(log_target)} {'flow' if flow else 'Laplace'} "
                  f"draws have a finite posterior density, and each of its {chains} chains "
                  "needs one to start from")
        if flow:
            raise NonFiniteStart(range(finite.size, chains), reason)
        raise TrainingError(reason)
    return x[finite[:chains]]


def _check_starts(target, starts, ens):
    """Raise :class:`~geoinvert.samplers.chains.NonFiniteStart` on every solve group alike
    when some group's chains would start where the target or its gradient is not finite."""
    import torch
    from geoinvert.samplers.chains import NonFiniteStart
    _, value, grad, _ = target.whitened(target.to_z(torch.as_tensor(starts)))
    bad = ~(torch.isfinite(value) & torch.isfinite(grad.reshape(len(grad), -1)).all(1))
    total = int(ens.sum(int(bad.sum()))[0])
    if total:
        raise NonFiniteStart(range(total))


def _correction_limit(config, res, budget):
    """The key whose limit stopped the correction's chains: ``sampler.budget``,
    ``sampler.correction.max_draws``, or ``sampler.correction.draws`` (they stopped by
    themselves, or ran one block)."""
    if budget:
        return "sampler.budget"
    if res.chains.samples.shape[1] >= max(config.max_draws, config.draws):
        return "sampler.correction.max_draws"
    return "sampler.correction.draws"


def _thinned(flat_size, samples):
    """Indices of ``samples`` draws spread evenly over ``flat_size`` pooled draws."""
    return np.unique(np.linspace(0, flat_size - 1, min(samples, flat_size)).astype(int))


def _psis_estimates(x, log_target, log_prob):
    """``{"psis_mean", "psis_std"}`` of draws ``x`` weighted by target / approximation with
    Pareto smoothing, when k-hat < 0.7 (else empty: the weights cannot be trusted)."""
    from geoinvert.diagnostics import KHAT_USABLE, psis_log_weights
    if np.isfinite(log_target).sum() < 25:
        return {}
    log_w, khat = psis_log_weights(log_target - log_prob)
    if not khat < KHAT_USABLE:
        return {}
    w = np.exp(log_w)[:, None, None]
    mean = (w * x).sum(0)
    return {"psis_mean": mean, "psis_std": np.sqrt((w * (x - mean) ** 2).sum(0))}


def _corrected(fit, case, seed, lay, posterior, config, *, progress, transport=None, thin=1,
               initial_step=None, modes=(), kind=None, approximation=None):
    """Correct the draws of ``fit`` to exactness: MCMC in the coordinates of ``transport``
    (default: the trained flow's latent space), started from those draws; ``approximation``
    (the flow, when ``transport`` is the Laplace map) proposes the independence moves.

    ``kind`` None is a flow's correction (its keys, budget share and convergence-driven
    length); an MCMC kind (``gpcn``) runs its fixed draws under ``sampler.*`` keys.

    The chains are shared out over the solve groups, each group with its own generator, so
    the corrected draws (unlike the flow's) depend on the number of groups; the metric
    windows pool the draws of all groups' chains, so that every group learns the metric
    one process would from all the chains.
    """
    import torch
    from geoinvert.errors import CaseError
    from geoinvert.inference.correction import (FlowTransport, LatentTarget, ModeCoordinates,
                                                correct)
    from geoinvert.samplers import ChainResult
    from geoinvert.parallel import Ensemble
    ens = Ensemble(lay.ensemble)
    chains = ens.share(config.chains)
    chains_key = "sampler.correction.chains" if kind is None else "sampler.chains"
    if chains == 0:
        raise CaseError(chains_key, f"{config.chains} is fewer than the {ens.size} solve "
                        "groups of this MPI run: every group needs a chain")
    starts = _chain_starts(fit.x, fit.log_target, config.chains,
                           flow=kind is None)[ens.part(config.chains)]
    _check_starts(LatentTarget(posterior, transport or FlowTransport(fit.model)), starts, ens)
    bar = _ChainProgress(config.warmup_iterations() + config.draws * thin, progress,
                         kind or "correction")
    budget = case.config["sampler"]["budget"] if kind is None else 0
    maps = len(transport.modes) if isinstance(transport, ModeCoordinates) else 1
    outputs = case.config["output"]["samples"]

    stopped = {}

    def extend(samples, log_target, nfs):
        """Draws per chain to add: those R-hat and ESS extrapolate to need, as many as the
        budget leaves; 0 when converged (the same answer on all ranks)."""
        from geoinvert.diagnostics import further_draws
        every = ens.gather(torch.from_numpy(samples)).numpy()
        d = _convergence(every, ens.gather(torch.from_numpy(log_target)).numpy())
        ess = min(d["ess"], d["ess_tail"])
        if len(modes) > 1:      # the modes' shares must converge too (NaN: all in one mode)
            ess = float(np.fmin(ess, _mode_diagnostics(modes, every)["mode_ess"]))
        bar.set(rhat=d["rhat"], ess=ess)
        more = further_draws(samples.shape[1], d["rhat"], ess,
                             most=max(config.max_draws, config.draws))
        if budget and more:
            per_draw = config.chains * thin * config.solves_per_iteration(modes=maps)
            left = budget - fit.nfs - ens.sum(nfs)[0] - outputs
            stopped["budget"] = more > max(int(left // per_draw), 0)
            more = min(more, max(int(left // per_draw), 0))
        return more

    try:
        if config.kernel == "lifted":
            from geoinvert.samplers.lifted import check_forward
            try:
                check_forward(posterior.forward)
            except NotImplementedError as err:
                hint = " (the serial solver: one MPI process per solve group)" \
                    if hasattr(posterior.forward, "solve_batch") else ""
                raise CaseError("sampler.correction.kernel", f"lifted: {err}{hint}") from None
        res = correct(posterior, transport or FlowTransport(fit.model), starts, config,
                      generator=torch.Generator().manual_seed(seed + 7919 * ens.rank + 104729),
                      callback=bar, thin=thin, initial_step=initial_step, modes=modes,
                      extend=extend if kind is None else None,
                      max_solves=max(budget - fit.nfs - outputs, 0) // ens.size
                      if budget else None, approximation=approximation,
                      pool=ens.gather)
    finally:
        bar.close()
    c = res.chains
    samples, log_target, flow_lp, accept, imh, jumps = (
        ens.gather(torch.from_numpy(np.ascontiguousarray(a))).numpy()
        for a in (c.samples, c.log_prob, res.flow_log_prob, c.acceptance,
                  res.independence_acceptance, res.jump_acceptance))
    nfs, failed, step = ens.sum(c.nfs, res.failed, c.step_size)
    pooled = ChainResult(samples, log_target, accept, int(nfs), step / ens.size, c.wall_time,
                         c.method, c.warmup)
    keep = _thinned(samples.shape[0] * samples.shape[1], case.config["output"]["samples"])
    x = pooled.flat()[keep]
    with torch.no_grad():
        pred = posterior.forward(torch.from_numpy(x[ens.part(len(keep))]))
    pred = ens.gather(pred.to(torch.float64)).numpy()
    flow = {"x": fit.x, "log_prob": fit.log_prob, "log_target": fit.log_target,
            **_psis_estimates(fit.x, fit.log_target, fit.log_prob)}
    diagnostics = {**fit.diagnostics, **_chain_diagnostics(pooled)}
    if kind is None:
        diagnostics.update({
            "correction": c.method.rsplit("-", 1)[-1], "metric": res.metric,
            "coordinates": config.coordinates,
            "leapfrog": res.leapfrog if res.leapfrog is not None else math.nan,
            "independence_acceptance": float(np.nanmean(imh)) if config.independence
            else math.nan,
            "correction_nfs": int(nfs) + len(keep), "correction_failed_solves": int(failed),
            "correction_mode_coordinates": maps,
            "correction_limit": _correction_limit(config, res, stopped.get("budget", False)),
            "leapfrog_wanted": res.leapfrog_wanted or math.nan,
            "correction_pilot_leapfrog": res.pilot_leapfrog or math.nan,
            "correction_hmc_solves_per_ess": res.hmc_solves_per_ess or math.nan,
            "correction_region_exits": int(ens.sum(res.exits)[0]),
            "independence_moves": res.independence_moves,
            "mode_jump_acceptance": float(np.nanmean(jumps)) if maps > 1 else math.nan})
    else:
        diagnostics["failed_solves"] = diagnostics.get("failed_solves", 0) + int(failed)
    if len(modes) > 1:
        diagnostics.update(_mode_diagnostics(modes, samples))
    draws, every = samples.shape[1], pooled.flat()
    level_means = dict(fit.level_means or {})
    if level_means:              # the finest level's mean is now the corrected one
        level_means[max(level_means)] = every.mean(0)
    return dataclasses.replace(
        fit, x=x, log_prob=flow_lp.reshape(-1)[keep], log_target=log_target.reshape(-1)[keep],
        predicted=np.nanmean(pred, 0), nfs=fit.nfs + int(nfs) + len(keep),
        diagnostics=diagnostics, chain=keep // draws, draw=keep % draws, flow=flow,
        draws=every, level_means=level_means)


def _mode_diagnostics(modes, samples, chunk=1024):
    """The chains' draws ``samples (chains, draws, ny, nx)`` weighed between the ``modes``
    found (Laplace fits): each mode's share of the draws in its region (the fit most
    responsible for the field, :meth:`ModeCoordinates.region`), the shares' MCSE and their ESS
    (:func:`~geoinvert.diagnostics.mode_shares`). No solves."""
    import torch
    from geoinvert.diagnostics import mode_shares
    from geoinvert.inference.correction import ModeCoordinates
    coordinates = ModeCoordinates(modes)
    flat = torch.from_numpy(np.ascontiguousarray(samples.reshape(-1, *samples.shape[2:])))
    regions = torch.cat([coordinates.region(flat[i:i + chunk])
                         for i in range(0, flat.shape[0], chunk)]).numpy()
    shares, mcse, ess = mode_shares(regions.reshape(samples.shape[:2]), len(modes))
    return {"mode_shares": shares.tolist(), "mode_shares_mcse": mcse.tolist(), "mode_ess": ess}


def _fit_laplace(case, seed, lay, posterior, *, progress=False):
    """The low-rank Laplace approximation (``laplace``: its draws, importance-checked) or
    generalized pCN on it (``gpcn``: chains in its coordinates, started from its draws).

    Every solve group fits the same approximation (the search and the probes are
    deterministic); its solves are counted once.
    """
    import torch
    from geoinvert.inference.config import CorrectionConfig
    from geoinvert.inference.laplace import fit_laplace
    from geoinvert.parallel import Ensemble
    s, ens = case.config["sampler"], Ensemble(lay.ensemble)
    generator = torch.Generator().manual_seed(seed)
    laplace = fit_laplace(posterior, generator=generator)
    n = case.config["output"]["samples"]
    with torch.no_grad():
        x, log_prob = laplace.transport.sample(n, generator)
        log_target, pred = posterior.evaluate(x[ens.part(n)])
    log_target, pred = ens.gather(log_target), ens.gather(pred)
    x, log_prob, log_target = x.numpy(), log_prob.numpy(), log_target.numpy()
    diagnostics = {**_importance_diagnostics(log_target, log_prob),
                   "laplace_rank": int(laplace.eigenvalues.numel()),
                   "laplace_map_gradient": laplace.gradient,
                   "laplace_nfs": int(laplace.nfs), "failed_solves": int(laplace.failed),
                   "other_modes": len(laplace.other_modes),
                   "other_modes_gap": min(laplace.other_modes, default=math.nan)}
    fit = _Fit(x, log_prob, log_target, np.nanmean(pred.numpy(), 0), {}, [], laplace.nfs + n,
               diagnostics, map=laplace.x_map.numpy())
    if s["kind"] == "laplace":
        variance = getattr(posterior.prior, "variance", None)   # a Gaussian prior's
        moments = None if variance is None else \
            laplace.transport.moments(variance(posterior.level))
        return dataclasses.replace(fit, psis=_psis_estimates(x, log_target, log_prob),
                                   moments=moments)
    from geoinvert.case import chain_config
    c = chain_config(case.config)
    config = CorrectionConfig(kernel="pcn", chains=c.chains, draws=c.draws, max_draws=c.draws,
                              warmup=c.warmup, independence=False)
    return _corrected(fit, case, seed, lay, posterior, config, progress=progress,
                      transport=laplace.transport, thin=c.thin, initial_step=c.step_size,
                      kind="gpcn")


def _fit_mcmc(case, seed, lay, posterior, *, progress=False):
    """Run the case's MCMC chains on the finest level; the draws are thinned evenly to
    ``output.samples`` (all of them if fewer).

    Under MPI the chains are shared out over the solve groups, each group's with its own seed
    (``seed`` + group), so MCMC results depend on the number of groups (flows do not).
    """
    import torch
    from geoinvert import samplers
    from geoinvert.case import chain_config
    from geoinvert.parallel import Ensemble
    kind, c, ens = case.config["sampler"]["kind"], chain_config(case.config), \
        Ensemble(lay.ensemble)
    chains = ens.share(c.chains)
    if chains == 0:
        from geoinvert.errors import CaseError
        raise CaseError("sampler.chains", f"{c.chains} is fewer than the {ens.size} solve "
                        "groups of this MPI run: every group needs a chain")
    step = {"pcn": "beta"}.get(kind, "step_size")
    options = {"chains": chains, "draws": c.draws, "warmup": c.warmup, "thin": c.thin,
               "generator": torch.Generator().manual_seed(seed + 7919 * ens.rank)}
    if c.step_size is not None:
        options[step] = c.step_size
    if kind == "hmc":
        options["n_leapfrog"] = c.leapfrog
    runner = {"pcn": samplers.run_pcn, "mala": samplers.run_mala, "hmc": samplers.run_hmc}
    bar = _ChainProgress(c.warmup + c.draws * c.thin, progress, kind)

    def monitor(samples, log_target):       # every group calls it at the same draws
        d = _convergence(ens.gather(torch.from_numpy(np.ascontiguousarray(samples))).numpy(),
                         ens.gather(torch.from_numpy(np.ascontiguousarray(log_target))).numpy())
        bar.set(rhat=d["rhat"], ess=min(d["ess"], d["ess_tail"]))

    try:
        res = runner[kind](posterior, callback=bar, monitor=monitor if progress or
                                ens.size > 1 else None, **options)
    finally:
        bar.close()
    samples = ens.gather(torch.from_numpy(res.samples)).numpy()
    log_target = ens.gather(torch.from_numpy(res.log_prob)).numpy()
    acceptance = ens.gather(torch.from_numpy(np.asarray(res.acceptance, float))).numpy()
    (nfs,) = ens.sum(res.nfs)
    pooled = samplers.ChainResult(samples, log_target, acceptance, int(nfs), res.step_size,
                                  res.wall_time, res.method, res.warmup)
    flat, flat_target = pooled.flat(), log_target.reshape(-1)
    keep = _thinned(flat.shape[0], case.config["output"]["samples"])
    x = flat[keep]
    with torch.no_grad():
        pred = posterior.forward(torch.from_numpy(x[ens.part(len(keep))]))
    pred = ens.gather(pred.to(torch.float64)).numpy()
    diagnostics = {**_chain_diagnostics(pooled), "failed_solves": int(ens.sum(res.failed)[0])}
    draws = samples.shape[1]
    return _Fit(x, np.full(len(keep), np.nan), flat_target[keep], np.nanmean(pred, 0), {}, [],
                int(nfs) + len(keep), diagnostics, chain=keep // draws, draw=keep % draws,
                draws=flat)


def run(case, *, out=None, seed=None, comm=None, progress=True, resume=False, ranks_per_solve=1,
        checkpoint_every=None, stop=None):
    """Run the case's sampler (``sampler.kind``) and write the result.

    Flows (``msign``, ``asvgd``) are trained stage by stage and sampled; the trained model is
    saved beside ``out`` (``.pt`` + ``.json``) and training checkpoints (``.ckpt``, every
    ``checkpoint_every`` steps and at each stage end) let ``resume`` continue an interrupted
    run. MCMC kinds (``pcn``, ``mala``, ``hmc``) run chains on the finest level and store
    evenly thinned draws (``log_prob`` is NaN: a chain has no density). The result ``out``
    (netCDF) has the same layout for every kind and is written atomically, only on success.

    Under MPI (``comm`` with several ranks) every rank calls :func:`run` with the same
    arguments: batches (or chains) are shared out over solve groups of ``ranks_per_solve``
    ranks, gradients summed, and rank 0 alone writes files. While a run writes ``out`` it
    holds a lock file beside it (``out.lock``, with its PID); a second run on the same output
    is refused, and a lock left by a killed run is taken over. For flows a seed gives the same
    result on any number of ranks (up to the rounding of the gradient sums), and a resumed run
    the same as an uninterrupted one on the same ranks.

    Args:
        case: A :class:`~geoinvert.case.Case`, a path to a case file or a dict.
        out: Result path (default: see :func:`result_path`).
        seed: Overrides ``sampler.seed``.
        comm: MPI communicator of the whole run (default: one process).
        progress: Show a progress bar (on rank 0; flows).
        resume: Continue from the checkpoint beside ``out`` (from the start if there is none).
        ranks_per_solve: Ranks sharing each PDE solve (a divisor of the number of ranks).
        checkpoint_every: Steps between checkpoints (default ``sampler.checkpoint_every``).
        stop: ``stop() -> bool`` polled after every training step (see
            :class:`geoinvert.parallel.StopRequest`); when true, a checkpoint is written and
            :class:`geoinvert.inference.trainer.TrainingInterrupted` raised.

    Returns:
        :class:`Result` (``model`` and ``model_path`` are None for MCMC kinds).
    """
    from geoinvert.case import Case, load_case
    from geoinvert.parallel import layout
    case = case if isinstance(case, Case) else load_case(case)
    seed = case.seed if seed is None else int(seed)
    lay = layout(comm, ranks_per_solve)
    path, start_time = result_path(case, out), time.perf_counter()
    _check_writable(path, lay)
    held = acquire_lock(path, case.name) if lay.root else None
    held = lay.bcast(held)
    if held:
        from geoinvert.errors import CaseError
        advice = "wait for it to finish or choose" if held.startswith("another run") else \
            "choose"
        raise CaseError(str(path), f"{held}; {advice} another --out")
    try:
        with failures.counted():
            return _run_locked(case, seed, lay, path, start_time, progress=progress,
                               resume=resume, stop=stop, checkpoint_every=checkpoint_every)
    finally:
        if lay.root:
            release_lock(path)


def _run_locked(case, seed, lay, path, start_time, *, progress, resume, stop, checkpoint_every):
    """:func:`run` once the output's lock is held."""
    from geoinvert.case import MCMC_KINDS, VI_KINDS
    if lay.root:
        _remove_stale_temporaries(path)
    kind = case.config["sampler"]["kind"]
    latent = _latent_problem(case, lay) if case.learned_prior else None
    finest = latent or case.posterior(case.finest, lay.solve)
    if kind in ("laplace", "gpcn"):
        fit = _fit_laplace(case, seed, lay, finest, progress=progress and lay.root)
    elif kind in MCMC_KINDS:
        fit = _fit_mcmc(case, seed, lay, finest, progress=progress and lay.root)
    elif kind in VI_KINDS:
        fit = _fit_vi(case, seed, lay, finest, progress=progress)
    else:
        posteriors = {l: case.posterior(l, lay.solve) for l in case.levels}
        fit = _fit_flow(case, seed, lay, posteriors, path, progress=progress, resume=resume,
                        stop=stop, checkpoint_every=checkpoint_every)
    if latent:
        fit = _to_fields(fit, latent.forward)
    return _finish(case, fit, seed, lay, path, start_time, kind)


def _latent_problem(case, lay):
    """The posterior of a learned prior's case pulled back to the prior's latent space
    (Whang et al.'s composed flows): an iid N(0, 1) prior on latent fields z and the forward
    model F(G(z)) (:class:`~geoinvert.priors.learned.LatentForward`), on which every sampler
    runs unchanged; :func:`_to_fields` takes its result back to the fields x = G(z)."""
    from geoinvert.inference.correction import FlowTransport
    from geoinvert.priors import IIDPrior
    from geoinvert.priors.learned import LatentForward
    from geoinvert.problem.posterior import Posterior
    forward = LatentForward(case.forward(case.finest, lay.solve),
                            FlowTransport(case.prior().model))
    prior = IIDPrior(case.finest, case.bounds, mean=0.0, std=1.0)
    return Posterior(prior, forward, case.data, case.noise, case.finest)


def _to_fields(fit, forward):
    """A fit in the latent space of a learned prior G taken to the fields x = G(z): draws,
    the MAP point, the chains' draws and the flow's draws mapped, and their densities
    changed by log|det dG/dz| (the importance weights, ratios of the two, are unchanged)."""
    import torch
    from geoinvert.parallel import in_chunks

    def mapped(z):
        with torch.no_grad():
            x, logdet = in_chunks(forward.fields, torch.as_tensor(np.asarray(z, float)))
        return x.numpy(), logdet.numpy()

    x, logdet = mapped(fit.x)
    draws = None if fit.draws is None else mapped(fit.draws)[0]
    flow = fit.flow
    if flow is not None:
        fx, fdet = mapped(flow["x"])
        flow = {"x": fx, "log_prob": flow["log_prob"] - fdet,
                "log_target": flow["log_target"] - fdet}
        flow.update(_psis_estimates(fx, flow["log_target"], flow["log_prob"]))
    log_prob, log_target = fit.log_prob - logdet, fit.log_target - logdet
    psis = _psis_estimates(x, log_target, log_prob) if fit.psis else fit.psis
    return dataclasses.replace(
        fit, x=x, log_prob=log_prob, log_target=log_target, flow=flow, psis=psis,
        level_means={max(fit.level_means): (x if draws is None else draws).mean(0)}
        if fit.level_means else {},
        map=None if fit.map is None else mapped(fit.map[None])[0][0], draws=draws,
        moments=None,            # a Gaussian in z is none in x: the draws' moments instead
        diagnostics={**fit.diagnostics, "latent": "learned prior"})


def _with_shift(fit):
    """``fit`` with the distance of its draws from their importance-weighted estimates in its
    diagnostics (:func:`~geoinvert.diagnostics.importance_shift`), when no chains ran and the
    weights are usable (PSIS k-hat below 0.7)."""
    from geoinvert.diagnostics import KHAT_USABLE, importance_shift
    d = fit.diagnostics
    if "rhat" in d or not d.get("psis_khat", math.inf) < KHAT_USABLE or fit.log_target is None:
        return fit
    mean, std, noise = importance_shift(fit.x, np.asarray(fit.log_target, float)
                                        - np.asarray(fit.log_prob, float))
    if not np.isfinite(mean):
        return fit
    return dataclasses.replace(fit, diagnostics={**d, "psis_mean_shift": mean,
                                                 "psis_std_shift": std, "psis_shift_noise": noise})


def _finish(case, fit, seed, lay, path, start_time, kind):
    """The verdict, the result Dataset, the saved model and figures of a fit; rank 0 writes."""
    from geoinvert.case import MCMC_KINDS
    from geoinvert.diagnostics import verdict
    fit = _with_shift(_without_failed_draws(fit))
    attrs = _attrs(case, seed, fit.nfs, time.perf_counter() - start_time, fit.diagnostics,
                   lay.size, fit.resumed)
    warnings = verdict(fit.diagnostics, raise_draws="sampler.draws" if kind in MCMC_KINDS
                       else fit.diagnostics.get("correction_limit", "sampler.correction.draws"),
                       approximation={"laplace": "Laplace approximation",
                                      "amortized": "amortized posterior"}.get(kind, "flow"))
    attrs["verdict"] = " | ".join(warnings) if warnings else "ok"
    ds = build_dataset(
        fit.x, log_prob=fit.log_prob, log_target=fit.log_target, bounds=case.bounds,
        units=case.config["domain"]["units"], quantiles=case.config["output"]["quantiles"],
        level_means=fit.level_means, observations=_observations(case, fit.predicted),
        truth=case.truth, direction=_direction(case), history=_history(fit.history),
        attrs={**attrs, "sampler": kind}, draws=fit.draws, moments=fit.moments)
    if fit.chain is not None:
        ds["chain"] = ("sample", fit.chain, {"long_name": "MCMC chain of each sample"})
        ds["draw"] = ("sample", fit.draw, {"long_name": "draw of each sample in its chain"})
    if fit.flow is not None:
        _add_flow_vars(ds, fit.flow, "laplace" if kind == "gpcn" else "flow")
    if fit.map is not None:
        ds["map"] = (("y", "x"), fit.map, {"long_name": "maximum a posteriori field"})
    for name, value in (fit.psis or {}).items():
        ds[name] = (("y", "x"), value, {"long_name": f"PSIS-reweighted estimate of the "
                                        f"posterior {name[5:]} from the samples"})
    mpath = model_path(path) if fit.model is not None and kind != "amortized" else None
    if lay.root:
        if mpath is not None:
            save_model(fit.model, mpath, {**checkpoint_meta(case, seed),
                                           "completed_stage": case.finest})
        write_netcdf(ds, path)
        if case.config["output"]["figures"]:
            figures(ds, path.with_suffix("").with_name(path.stem + "_figures"))
    return Result(ds, fit.model, path, mpath)




# -- amortized inversion ------------------------------------------------------------------

def amortize(case, simulations, out, *, epochs=20, batch=128, seed=0, progress=False,
             method="msign"):
    """Train the amortized posterior of ``case`` on a ``geoinvert simulate`` file and save it
    to ``out`` (.pt and .json, with the case text, so that :func:`infer` can rebuild the
    case). ``method``: the conditional MsIGN (``msign``) or the single-loss joint flow
    (``joint``, :class:`~geoinvert.inference.joint.JointFlow`).

    Raises:
        CaseError: the simulations were made on another lattice or with other observations.
    """
    import torch
    from geoinvert.errors import CaseError
    from geoinvert.inference.amortized import train_amortized
    from geoinvert.io import read_simulations
    if case.learned_prior:
        raise CaseError("prior.kind", "amortized inversion trains a conditional MsIGN on the "
                        "conditioning layers of a Gaussian prior; a learned prior has none "
                        "(run the case with sampler.kind composed instead)")
    field, data = next(read_simulations(simulations, stop=1))
    shape = case.lattice_shape(case.finest)
    if field.shape[1:] != shape or data.shape[1] != case.n_obs:
        raise CaseError(str(simulations), f"holds fields {field.shape[1:]} and {data.shape[1]} "
                        f"observations; the case has {shape} and {case.n_obs}")
    if method == "joint" and case.n_obs >= 4 ** case.finest:
        raise CaseError("--method", f"joint maps the {4 ** case.finest} parameters onto the "
                        f"{case.n_obs} data and a latent rest: it needs fewer observations "
                        "than parameters; use msign")
    from geoinvert.progress import bar as progress_bar
    bar = progress_bar(total=epochs, unit="epoch", disable=not progress,
                       desc="amortized training")

    def step(record):
        bar.set_postfix(nll=f"{record['loss']:.4f}", held_out=f"{record['held_out']:.4f}")
        bar.update(1)

    try:
        post, history = train_amortized(case.prior(), simulations, epochs=epochs, batch=batch,
                                        generator=torch.Generator().manual_seed(int(seed)),
                                        callback=step, method=method)
    finally:
        bar.close()
    adapter = _Saver(post, {**checkpoint_meta(case, seed), "simulations": str(simulations),
                            "history": history})
    save_model(adapter, out, {})
    return post, history


class _Saver:
    """``save(path, metadata)`` of an amortized posterior, for :func:`~geoinvert.io.save_model`."""

    def __init__(self, post, metadata):
        self.post, self.metadata = post, metadata

    def save(self, path, *, metadata=None):
        self.post.save(path, metadata={**self.metadata, **(metadata or {})})


def load_amortized(path):
    """``(AmortizedPosterior, case)`` of a model saved by :func:`amortize` (the case rebuilt
    from the text stored with it)."""
    import json
    import yaml
    from geoinvert.case import load_case
    from geoinvert.inference.amortized import AmortizedPosterior
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text()).get("metadata", {})
    case = load_case(yaml.safe_load(meta["case"]), folder=Path(meta.get("folder", ".")))
    return AmortizedPosterior.load(path, case.prior()), case


@failures.counted()      # failed solves are counted in the results' summaries
def infer(path, data, out, *, samples=None, seed=0, correct=False, progress=False,
          fine_tune=0):
    """Posterior of each data set in ``data`` from the amortized model at ``path``, written as
    the standard result (one file per set: ``out``, or ``out`` with ``_k`` before the suffix
    for several sets).

    The draws of q(x | y) are evaluated against the case's posterior at y (one solve each), so
    the result carries the importance diagnostics of the amortized fit (PSIS k-hat: how far
    q(x | y) is from the exact posterior of this y) and the verdict; with ``correct`` they are
    corrected to exactness (``sampler.correction`` of the case), at the cost of a correction.

    Args:
        path: The model (.pt).
        data: ``(n_obs,)`` or ``(sets, n_obs)``.
        out: Result file (.nc).
        samples: Stored draws (default ``output.samples`` of the case).
        correct: Correct the draws.
        fine_tune: Reverse-KL steps (32 solves each) that refine a copy of the network on
            each data set before drawing (:func:`~geoinvert.inference.amortized.fine_tune`).

    Returns:
        List of :class:`~geoinvert.app.Result`.
    """
    import torch
    import yaml
    from geoinvert.case import load_case
    from geoinvert.inference.amortized import AtData
    from geoinvert.problem.posterior import Posterior
    from geoinvert.parallel import in_chunks, layout
    post, case = load_amortized(path)
    data = np.atleast_2d(np.asarray(data, float))
    if data.shape[1] != case.n_obs:
        from geoinvert.errors import CaseError
        raise CaseError("--data", f"has {data.shape[1]} values per data set, the case "
                        f"{case.n_obs} observations")
    lay = layout(None)
    results = []
    for k, y in enumerate(data):
        start = time.perf_counter()
        config = yaml.safe_load(case.text)
        config["data"] = {"values": y.tolist()}
        if samples:
            config.setdefault("output", {})["samples"] = int(samples)
        here = load_case(config, folder=case.folder)
        n = here.config["output"]["samples"]
        # the stored case's prior and forward model serve every data set (built once)
        posterior = Posterior(case.prior(), case.forward(case.finest), here.data, case.noise,
                              case.finest)
        here_post, tuned = post, {}
        if fine_tune:
            from geoinvert.inference.amortized import fine_tune as refine
            here_post, history = refine(post, posterior, y, steps=fine_tune,
                                        generator=torch.Generator().manual_seed(int(seed) + k))
            tuned = {"fine_tune_steps": int(fine_tune), "fine_tune_nfs": history[-1]["nfs"],
                     "fine_tune_elbo_first": history[0]["elbo"],
                     "fine_tune_elbo_last": history[-1]["elbo"],
                     "failed_solves": int(sum(h["failed"] for h in history))}
        x, log_q = here_post.sample(n, y,
                                    generator=torch.Generator().manual_seed(int(seed) + k))
        log_target, pred = in_chunks(posterior.evaluate, x)
        diagnostics = {**_importance_diagnostics(log_target.numpy(), log_q.numpy()), **tuned}
        outside = post.outside(y)
        if outside.size:
            diagnostics["outside_simulations"] = int(outside.size)
        fit = _Fit(x.numpy(), log_q.numpy(), log_target.numpy(), np.nanmean(pred.numpy(), 0),
                   {here.finest: x.mean(0).numpy()}, [], n + tuned.get("fine_tune_nfs", 0),
                   diagnostics, here_post.model)
        if correct:
            fit = _correct_fit(fit, here, int(seed) + k, lay, posterior, progress=progress,
                               approximation=AtData(here_post, y))
        target = Path(out) if len(data) == 1 else Path(out).with_name(
            f"{Path(out).stem}_{k}{Path(out).suffix}")
        results.append(_finish(here, fit, int(seed) + k, lay, target, start, "amortized"))
    return results


def calibrate(path, simulations, out, *, sets=200, draws=99, seed=0):
    """Calibration of an amortized posterior over simulated data sets it was not trained on:
    SBC ranks of the truth (the domain mean and eight cells on a regular sub-grid) and TARP
    expected coverage with references drawn from the prior. Writes ``out/calibration.json``
    and ``out/sbc.png``, ``out/tarp.png``.

    Returns:
        dict with ``sbc_p`` (per summary), ``sbc_ok`` (smallest p above 0.01 / summaries),
        ``tarp_levels``, ``tarp_coverage``, ``tarp_deviation`` (largest |coverage - level|),
        ``tarp_bound`` (4 binomial standard errors at level 0.5) and ``tarp_ok``.
    """
    import json
    import torch
    from geoinvert.diagnostics import rank_uniformity, sbc_ranks, tarp_coverage
    from geoinvert.io import read_simulations
    post, case = load_amortized(path)
    fields, data = [], []
    for f, d in read_simulations(simulations, stop=sets):
        fields.append(f)
        data.append(d)
    fields, data = np.concatenate(fields), np.concatenate(data)
    if len(fields) < 20:
        raise ValueError(f"{simulations}: {len(fields)} simulations; calibration needs at "
                         "least 20 (200 or more for a sharp test)")
    n = fields.shape[1]
    cells = np.linspace(0, n - 1, 4).round().astype(int)
    picks = [(i, j) for i in cells[1:3] for j in cells] + [(cells[0], cells[1]),
                                                         (cells[3], cells[2])]

    def summaries(x):
        x = np.asarray(x)
        return np.column_stack([x.mean((1, 2))] + [x[:, i, j] for i, j in picks[:8]])

    samples = np.stack([post.sample(draws, y, generator=torch.Generator().manual_seed(seed + k))
                        [0].numpy() for k, y in enumerate(data)])
    ranks = sbc_ranks(samples, fields, summaries)
    stat, p = rank_uniformity(ranks, draws)
    refs = case.prior().sample(len(fields), case.finest,
                               generator=torch.Generator().manual_seed(seed + 7)).numpy()
    levels, coverage = tarp_coverage(samples, fields, refs)
    bound = 4 * 0.5 / np.sqrt(len(fields))
    result = {"sets": int(len(fields)), "draws": int(draws),
              "sbc_summaries": ["domain mean"] + [f"cell ({i}, {j})" for i, j in picks[:8]],
              "sbc_statistic": stat.tolist(), "sbc_p": p.tolist(),
              "sbc_ok": bool(p.min() > 0.01 / len(p)),
              "tarp_levels": levels.tolist(), "tarp_coverage": coverage.tolist(),
              "tarp_deviation": float(np.abs(coverage - levels).max()),
              "tarp_bound": float(bound)}
    result["tarp_ok"] = bool(result["tarp_deviation"] <= bound)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    _calibration_figures(ranks, draws, result, out)
    return result


def _calibration_figures(ranks, draws, result, out):
    from matplotlib.figure import Figure
    k = ranks.shape[1]
    cols = min(k, 5)
    rows = -(-k // cols)
    fig = Figure(figsize=(2.3 * cols, 2.2 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[k:]:
        ax.set_visible(False)
    for ax, r, name, p in zip(axes, ranks.T, result["sbc_summaries"], result["sbc_p"]):
        ax.hist(r, bins=10, range=(0, draws + 1), color="C0", alpha=0.8)
        ax.axhline(len(r) / 10, color="k", lw=0.8)
        ax.set_title(f"{name}\np = {p:.2f}", fontsize=7)
        ax.set_yticks([])
    fig.suptitle(f"SBC ranks of the truth among {draws} draws ({len(ranks)} data sets)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "sbc.png", dpi=110)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    levels = np.asarray(result["tarp_levels"])
    ax.plot(levels, result["tarp_coverage"], label="amortized posterior")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    ax.fill_between(levels, levels - result["tarp_bound"], levels + result["tarp_bound"],
                    color="0.85", label="4 standard errors")
    ax.set(xlabel="credibility level", ylabel="expected coverage", xlim=(0, 1), ylim=(0, 1),
           title=f"TARP ({result['sets']} data sets)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tarp.png", dpi=110)


def summary_lines(ds):
    """A result's verdict as a few lines: method, cost, flow fit, chains, and the warnings.

    Args:
        ds: a result Dataset (:func:`build_dataset` attributes).

    Returns:
        ``(lines, warnings)``, lists of str.
    """
    from geoinvert.diagnostics import fit_word, format_shares
    a = ds.attrs
    get = lambda key: a.get(f"diagnostics_{key}", math.nan)   # noqa: E731
    sampler = a.get("sampler", "?")
    correction = a.get("diagnostics_correction")
    where = {"laplace": ", in Laplace coordinates", "flow": ", in the flow's latent space"}.get(
        a.get("diagnostics_coordinates"), "")
    if a.get("diagnostics_correction_mode_coordinates", 1) > 1:
        where = f", in the Laplace coordinates of each chain's mode (of " \
            f"{int(a['diagnostics_correction_mode_coordinates'])})"
    method = f"{sampler} + correction ({correction}, {a.get('diagnostics_metric', '')} metric" \
        f"{where})" if correction else sampler
    pilot, block = get("correction_pilot_leapfrog"), get("correction_hmc_solves_per_ess")
    if correction == "lifted":           # its metric is the Gauss-Newton Hessian at each point
        chosen = ""
        if np.isfinite(block):
            chosen = f"; chosen after HMC's first block of draws, which cost {block:.0f} " \
                "solves per effective draw"
        elif np.isfinite(pilot):
            chosen = f"; chosen: HMC's quarter period took {pilot:.0f} leapfrog steps"
        maps = int(a.get("diagnostics_correction_mode_coordinates", 1))
        jumps = f", jumping between the Laplace coordinates of {maps} modes" if maps > 1 else ""
        method = f"{sampler} + correction (lifted: constrained HMC on the manifold of fields " \
            f"and residuals, in the prior's coordinates{jumps}{chosen})"
    share = f" ({int(a['diagnostics_correction_nfs'])} in the correction)" \
        if "diagnostics_correction_nfs" in a else ""
    lines = [f"method: {method}; {int(a.get('nfs', 0))} forward solves{share}; "
             f"{a.get('wall_time', math.nan):.0f} s"]
    if np.isfinite(get("psis_khat")) or "diagnostics_is_ess" in a:
        what = "Laplace fit" if sampler in ("laplace", "gpcn") else "flow fit"
        drawn = a.get("diagnostics_drawn",
                      ds.sizes.get("flow_sample", ds.sizes.get("sample", 0)))
        word = fit_word(get("psis_khat"), get("is_ess") * drawn)
        after = "; the corrected draws do not depend on it, only their cost does" \
            if correction and word != "good" else ""
        shift = f"; draws {get('psis_mean_shift'):.2f} std and " \
            f"{100 * get('psis_std_shift'):.0f} % from their weighted mean and std" \
            if np.isfinite(get("psis_mean_shift")) else ""
        lines.append(f"{what}: {word} (PSIS k-hat {get('psis_khat'):.2f},"
                     f" importance ESS {100 * get('is_ess'):.1f} %{shift}){after}")
    if "diagnostics_laplace_rank" in a:
        lines.append(f"Laplace: MAP found to a gradient norm {get('laplace_map_gradient'):.1e} "
                     f"(prior-whitened); Gauss-Newton Hessian of rank {int(get('laplace_rank'))}; "
                     f"{int(get('laplace_nfs'))} solves")
    if "diagnostics_rhat" in a:
        what = "correction" if correction else "chains"
        imh = get("independence_acceptance")
        modes = a.get("diagnostics_modes_found")
        per = int(a.get("diagnostics_independence_moves", 1))
        which = f" (flow + Laplace at {int(modes)} mode{'s' if modes != 1 else ''}" \
            f"{f', {per} per local move' if per > 1 else ''})" if modes else ""
        extra = f", independence moves{which} accepted {imh:.2f}" if np.isfinite(imh) else ""
        jumps = get("mode_jump_acceptance")
        extra += f", mode jumps accepted {jumps:.2f}" if np.isfinite(jumps) else ""
        lines.append(f"{what}: R-hat {get('rhat'):.3f}, ESS bulk {get('ess'):.0f} / tail "
                     f"{get('ess_tail'):.0f}, MCSE of the mean {get('mcse_mean'):.3f} std, "
                     f"acceptance {get('acceptance'):.2f}{extra}")
    if "diagnostics_mode_shares" in a:
        shares = np.atleast_1d(a["diagnostics_mode_shares"])
        lines.append(f"modes: the draws' share of each of the {shares.size} modes found "
                     f"{format_shares(shares, np.atleast_1d(a['diagnostics_mode_shares_mcse']))}"
                     f" (effective sample size of the shares {get('mode_ess'):.0f})")
    failed = int(sum(np.nan_to_num(get(key)) for key in (
        "failed_solves", "mode_search_failed_solves", "correction_failed_solves")))
    if failed:
        lines.append(f"{failed} forward solves failed, all at proposals, trial points or "
                     "training draws that were set aside; none is in the result")
    if "diagnostics_failed_draws" in a:
        lines.append(f"{int(get('failed_draws'))} of {int(get('drawn'))} draws left out (their "
                     "forward solve failed)")
    verdict = a.get("verdict", "ok")
    warnings = [] if verdict == "ok" else verdict.split(" | ")
    lines.append("verdict: " + ("ok" if not warnings else "NOT RELIABLE, see the warnings"))
    return lines, warnings


def _add_flow_vars(ds, flow, prefix="flow"):
    """The approximation's own draws, densities and importance weights (and PSIS estimates)
    beside the corrected samples: ``flow_*`` for a trained flow, ``laplace_*`` for gpCN."""
    what = {"flow": "the trained flow", "laplace": "the Laplace approximation"}[prefix]
    dims = (f"{prefix}_sample", "y", "x")
    ds[f"{prefix}_samples"] = (dims, flow["x"], {"long_name": f"draws of {what}"})
    ds[f"{prefix}_log_prob"] = (dims[0], flow["log_prob"],
                                {"long_name": f"log density of {what} at each of its draws"})
    ds[f"{prefix}_log_target"] = (dims[0], flow["log_target"],
                                  {"long_name": f"unnormalised posterior log density of each "
                                   f"draw of {what}"})
    ds[f"{prefix}_log_weight"] = (dims[0], flow["log_target"] - flow["log_prob"],
                                  {"long_name": "importance log weight (log_target - log_prob)"})
    for name in ("mean", "std"):
        if f"psis_{name}" in flow:
            ds[f"psis_{name}"] = (("y", "x"), flow[f"psis_{name}"],
                                  {"long_name": f"PSIS-reweighted estimate of the posterior "
                                   f"{name} from the draws of {what}"})


def _direction(case):
    spec = case.config["output"]["direction"]
    return None if spec is None else case.evaluate(spec)
