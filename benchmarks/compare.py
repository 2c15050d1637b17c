"""Every sampler at equal nFS budgets: quadratic test bed (exact) and elliptic bimodal (reference).

One command reproduces the table (default 4e4 nFS per method on (a), 1e5 on (b); ~30 min
on a busy 2-core machine; needs ``reference_elliptic.nc``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py

Smoke run (a minute or two)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --quick

Larger budgets::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --budget-quadratic 100000 \
        --budget-elliptic 250000 --tag big

Problems:

(a) the quadratic test bed y = <phi, x>^2 of ``msign_quadratic.py`` (Matern prior, Dirichlet
    boundary, phi an eigenvector of the prior precision, noise 0.3 y) on 16 x 16 (L = 4),
    with the exact posterior (:class:`~geoinvert.problem.forward.testbeds.ExactQuadraticPosterior`):
    exact mean and std, exact normalised density (Jeffreys divergence of the flows), modes
    t = <phi, x> > 0 / < 0 of exactly 1/2 each;
(b) ``cases/elliptic_bimodal.yaml`` (16 x 16 log-permeability, mirror-symmetric, so the two
    sides x . d > 0 and < 0 have exactly 1/2 of the mass each; on this case file they are the
    halves of one broad hump, not separated modes, see ``msign_elliptic_bimodal.md``) against
    the MCMC reference ``benchmarks/results/reference_elliptic.nc``
    of ``reference_elliptic.py`` (run it first); modes by the sign of x . d, d the case's
    mirror-antisymmetric ``output.direction``.

Methods, every one with the same total forward-solve budget nFS per problem (a solve of level
l counts 1, as in the MsIGN paper; finest-level equivalents are reported too):

- ``MsIGN``: multi-stage, Jeffreys divergence (:func:`~geoinvert.inference.trainer.train_msign`);
- ``MsIGN reverse-KL``: multi-stage, reverse KL only;
- ``A-SVGD``: the same network trained multi-stage along the Stein variational direction
  (:func:`geoinvert.inference.trainer.train_asvgd`), as the paper's baseline;
- ``Laplace``: the low-rank Gauss-Newton Laplace approximation at the MAP point
  (:func:`geoinvert.inference.laplace.fit_laplace`), its draws importance-weighted like a
  flow's (its fit uses far less than the budget);
- ``pCN``, ``MALA``, ``HMC``: the package's samplers (prior-preconditioned), ``--chains``
  chains started from prior draws, the first quarter of the iterations as warm-up (step
  adaptation), all draws after it kept;
- ``gpCN``: the Laplace fit, then ``--chains`` pCN chains in its coordinates (generalized pCN)
  started from its draws, with the rest of the budget.

Numbers: nFS, wall time, ``mean_error = ||mean - mean_ref|| / ||std_ref||`` and
``std_error = ||std - std_ref|| / ||std_ref||`` (:func:`geoinvert.diagnostics.moment_errors`),
Jeffreys divergence D_J (flows on (a), +/- standard error), percentage of samples in each mode
(with its standard error), and effective samples per 1000 nFS: for a flow the importance ESS
of ``--samples`` weighted samples over (training nFS + the ``--samples`` solves of the
weights); for MCMC the smallest bulk ESS over cells and log q over the nFS of the run.
For flows the solves spent evaluating the target at their samples are not part of the
training budget; they are listed separately.

Writes ``benchmarks/results/compare.json``, ``compare.md`` and ``compare.png``.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msign_elliptic_bimodal import load_reference  # noqa: E402
from msign_linear import machine  # noqa: E402
from msign_quadratic import build as build_quadratic  # noqa: E402
from msign_quadratic import exact_moments  # noqa: E402

import geoinvert  # noqa: E402
from geoinvert.diagnostics import (importance_ess, jeffreys_divergence, mcmc_ess,  # noqa: E402
                                   moment_errors, psis_khat)
from geoinvert.flows.msign import MsIGN  # noqa: E402
from geoinvert.samplers import run_hmc, run_mala, run_pcn  # noqa: E402
from geoinvert.inference.trainer import train_msign  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CASE = ROOT / "cases" / "elliptic_bimodal.yaml"

METHODS = ("msign", "msign-rkl", "asvgd", "laplace", "pcn", "mala", "hmc", "gpcn")
LABELS = {"msign": "MsIGN (Jeffreys)", "msign-rkl": "MsIGN reverse-KL", "asvgd": "A-SVGD",
          "laplace": "Laplace", "pcn": "pCN", "mala": "MALA", "hmc": "HMC",
          "gpcn": "gpCN"}
FLOWS = ("msign", "msign-rkl", "asvgd")
PAPER = {
    "quadratic": "MsIGN Table 1 (64 x 64, 8e5 nFS): MsIGN D_J = 56.77 +/- 0.15, A-SVGD "
                 "D_J = 3372 +/- 21.",
    "elliptic": "MsIGN paper, elliptic problem: MsIGN and HMC agree and capture both modes; "
                "A-SVGD misses one mode.",
}


@dataclass
class Problem:
    """A target with everything needed to score samples of it."""

    name: str
    prior: object
    posteriors: dict
    direction: np.ndarray          # mode split: sign of x . direction
    mean: np.ndarray               # reference (exact) mean and std
    std: np.ndarray
    exact: object = None           # ExactQuadraticPosterior on (a), None on (b)
    reference_samples: np.ndarray = None
    info: dict = field(default_factory=dict)

    @property
    def finest(self):
        return max(self.posteriors)

    @property
    def posterior(self):
        return self.posteriors[self.finest]


def quadratic_problem(levels, noise):
    """(a): the quadratic test bed with exact moments and density."""
    prior, posteriors, exact = build_quadratic(levels, noise=noise)
    mean, std = exact_moments(exact)
    return Problem("quadratic", prior, posteriors, exact.w.reshape(exact.shape), mean, std,
                   exact=exact, info={"size": f"{2 ** levels} x {2 ** levels}",
                                      "noise_std": exact.noise, "data": exact.y})


def elliptic_problem():
    """(b): the elliptic bimodal case against the symmetrised MCMC reference."""
    ref = load_reference()
    if ref is None:
        raise SystemExit("benchmarks/results/reference_elliptic.nc is missing: run "
                         "benchmarks/reference_elliptic.py first")
    case = geoinvert.load_case(CASE)
    posteriors = {level: case.posterior(level) for level in case.levels}
    direction = case.evaluate(case.config["output"]["direction"])
    import xarray as xr
    with xr.open_dataset(RESULTS / "reference_elliptic.nc") as ds:
        about = {k: ds.attrs[k] for k in ("method", "nfs", "mean_se_rel", "rhat_folded")}
    return Problem("elliptic", case.prior(), posteriors, direction, ref["mean"], ref["std"],
                   reference_samples=ref["samples"],
                   info={"size": "16 x 16", "case": "cases/elliptic_bimodal.yaml",
                         "reference": {k: (v.item() if hasattr(v, "item") else v)
                                       for k, v in about.items()}})


# -- methods --------------------------------------------------------------------------------------


def run_flow(problem, method, budget, args, seed):
    """Train a fresh MsIGN network with ``method``'s objective within ``budget`` nFS."""
    torch.manual_seed(seed)
    model = MsIGN(problem.prior, blocks_per_level=args.blocks, hidden=args.hidden)
    model = model.to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    common = dict(start=1, steps=10**7, batch=args.batch, lr=args.lr, budget=budget,
                  generator=gen)
    start = time.perf_counter()
    if method == "asvgd":
        from geoinvert.inference.trainer import train_asvgd
        history = train_asvgd(model, problem.posteriors, **common)
    else:
        objective = "jeffreys" if method == "msign" else "reverse_kl"
        history = train_msign(model, problem.posteriors, objective=objective, **common)
    train_s = time.perf_counter() - start
    return model, {"nfs": int(history[-1]["nfs"]), "nfs_finest": float(history[-1]["nfs_finest"]),
                   "train_s": train_s, "steps": len(history),
                   "skipped": int(history[-1]["skipped"])}


def score_flow(problem, model, args, seed):
    """Samples of the flow, their importance weights against the target, D_J on (a)."""
    gen = torch.Generator().manual_seed(seed + 7)
    start = time.perf_counter()
    with torch.no_grad():
        x, log_q = model.sample(args.samples, generator=gen, level=model.levels)
        x, log_q = x.to(torch.float64), log_q.to(torch.float64)
        log_t = torch.cat([problem.posterior.log_prob(c) for c in x.split(500)])
    lw = (log_t - log_q).numpy()
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    out = {"is_ess": importance_ess(lw), "is_ess_fraction": importance_ess(lw) / len(lw),
           "psis_khat": psis_khat(lw), "eval_nfs": args.samples}
    if problem.exact is not None:
        with torch.no_grad():
            x_p = problem.exact.sample(args.samples, gen)
            log_q_p = torch.cat([model.log_prob(c.to(model.dtype)) for c in x_p.split(500)])
        dj = jeffreys_divergence(log_q.numpy(), problem.exact.log_prob(x).numpy(),
                                 problem.exact.log_prob(x_p).numpy(), log_q_p.double().numpy())
        out.update(jeffreys=dj.value, jeffreys_se=dj.stderr)
    out["score_s"] = time.perf_counter() - start
    return x.numpy(), out


CHAIN_RUNNERS = {"pcn": (run_pcn, 1), "mala": (run_mala, 1), "hmc": (run_hmc, None)}


def run_chain(problem, method, budget, args, seed):
    """``args.chains`` chains from prior draws using at most ``budget`` nFS in total."""
    runner, cost = CHAIN_RUNNERS[method]
    cost = cost or args.leapfrog
    iterations = max(8, (budget // args.chains - 1) // cost)
    warmup = iterations // 4
    kwargs = {"n_leapfrog": args.leapfrog} if method == "hmc" else {}
    result = runner(problem.posterior, chains=args.chains, draws=iterations - warmup,
                    warmup=warmup, generator=torch.Generator().manual_seed(seed), **kwargs)
    t = projections(result.samples, problem.direction)
    return result.flat(), {
        "nfs": int(result.nfs), "nfs_finest": float(result.nfs), "train_s": result.wall_time,
        "iterations": iterations, "warmup": warmup, "step_size": float(result.step_size),
        "acceptance": float(result.acceptance.mean()), "rhat": result.rhat(),
        "mcmc_ess": result.ess(), "ess_t": mcmc_ess(t) if np.ptp(t) > 0 else math.nan,
        "chain_mode_positive": (t > 0).mean(1).tolist()}


def run_laplace(problem, method, budget, args, seed):
    """The low-rank Laplace fit; ``laplace``: ``args.samples`` importance-weighted draws of
    it; ``gpcn``: pCN chains on it with what is left of ``budget``."""
    from geoinvert.inference.config import CorrectionConfig
    from geoinvert.inference.correction import correct
    from geoinvert.inference.laplace import fit_laplace
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    fit = fit_laplace(problem.posterior, generator=gen)
    r = {"laplace_nfs": int(fit.nfs), "rank": int(fit.eigenvalues.numel()),
         "other_modes": len(fit.other_modes)}
    if method == "laplace":
        with torch.no_grad():
            x, log_q = fit.transport.sample(args.samples, gen)
            log_t = torch.cat([problem.posterior.log_prob(c) for c in x.split(500)])
        lw = (log_t - log_q).numpy()
        r.update(nfs=int(fit.nfs), nfs_finest=float(fit.nfs), eval_nfs=args.samples,
                 is_ess=importance_ess(lw), psis_khat=psis_khat(lw),
                 train_s=time.perf_counter() - start)
        return x.numpy(), r
    iterations = max(8, (budget - fit.nfs) // args.chains - 1)
    warmup = iterations // 4
    starts, _ = fit.transport.sample(args.chains, gen)
    config = CorrectionConfig(kernel="pcn", chains=args.chains, draws=iterations - warmup,
                              warmup=warmup, independence=False)
    result = correct(problem.posterior, fit.transport, starts, config, generator=gen).chains
    t = projections(result.samples, problem.direction)
    r.update(nfs=int(fit.nfs + result.nfs), nfs_finest=float(fit.nfs + result.nfs),
             train_s=time.perf_counter() - start, iterations=iterations, warmup=warmup,
             step_size=float(result.step_size), acceptance=float(result.acceptance.mean()),
             rhat=result.rhat(), mcmc_ess=result.ess(),
             ess_t=mcmc_ess(t) if np.ptp(t) > 0 else math.nan,
             chain_mode_positive=(t > 0).mean(1).tolist())
    return result.flat(), r


def projections(x, direction):
    return x.reshape(*x.shape[:-2], -1) @ direction.ravel()


def score_common(problem, x, r, method):
    """Moment errors, mode fractions with standard errors, effective samples per 1000 nFS."""
    mean_err, std_err = moment_errors(x, problem.mean, problem.std)
    p = float((projections(x, problem.direction) > 0).mean())
    if method in FLOWS or method == "laplace":
        n_eff = len(x)
        per_1000 = 1000 * r["is_ess"] / (r["nfs"] + r["eval_nfs"])
    else:
        n_eff = r["ess_t"]
        per_1000 = 1000 * r["mcmc_ess"] / r["nfs"]
    se = math.sqrt(p * (1 - p) / n_eff) if n_eff and n_eff > 0 and math.isfinite(n_eff) \
        else math.nan
    return {"mean_error": mean_err, "std_error": std_err, "mode_positive": p,
            "mode_positive_se": se, "ess_per_1000_nfs": per_1000}


def run_method(problem, method, budget, args):
    seed = args.seed
    start = time.perf_counter()
    if method in FLOWS:
        model, r = run_flow(problem, method, budget, args, seed)
        x, scores = score_flow(problem, model, args, seed)
        r.update(scores)
    elif method in ("laplace", "gpcn"):
        x, r = run_laplace(problem, method, budget, args, seed)
    else:
        x, r = run_chain(problem, method, budget, args, seed)
    r.update(score_common(problem, x, r, method))
    r["wall_s"] = time.perf_counter() - start
    r["budget"] = budget
    return r, x


# -- report -------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(results):
    lines = ["| problem | method | nFS (finest eq.) | wall (s) | mean error | std error | D_J "
             "| modes + / - (%) | eff. samples / 1000 nFS | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for prob, rows in results.items():
        for method, r in rows.items():
            if "error" in r:
                lines.append(f"| {prob} | {LABELS[method]} | - | - | - | - | - | - | - | "
                             f"{r['error']} |")
                continue
            dj = (f"{r['jeffreys']:.3g} +/- {r['jeffreys_se']:.2g}" if "jeffreys" in r else "-")
            modes = (f"{100 * r['mode_positive']:.1f} / {100 - 100 * r['mode_positive']:.1f} "
                     f"(+/- {_fmt(100 * r['mode_positive_se'], '.1f')})")
            if method in FLOWS:
                notes = (f"IS ESS {100 * r['is_ess_fraction']:.1f} % of {r['eval_nfs']}, "
                         f"k-hat {r['psis_khat']:.2f}, {r['steps']} steps")
            elif method == "laplace":
                notes = (f"IS ESS {100 * r['is_ess'] / r['eval_nfs']:.1f} % of "
                         f"{r['eval_nfs']}, k-hat {r['psis_khat']:.2f}, rank {r['rank']}, "
                         f"{r['other_modes']} other modes found")
            else:
                notes = (f"R-hat {r['rhat']:.2f}, acc. {r['acceptance']:.2f}, "
                         f"{r['iterations']} it./chain")
            lines.append(
                f"| {prob} | {LABELS[method]} | {r['nfs']} ({r['nfs_finest']:.0f}) | "
                f"{r['wall_s']:.0f} | {r['mean_error']:.3f} | {r['std_error']:.3f} | {dj} | "
                f"{modes} | {r['ess_per_1000_nfs']:.2f} | {notes} |")
    return lines


def figure(path, problems, samples, results):
    """Per problem: marginal of t = x . d per method, and mean/std errors per method."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 3.6 * len(problems)))
    axes = fig.subplots(len(problems), 2, squeeze=False)
    for k, prob in enumerate(problems.values()):
        ax = axes[k, 0]
        ref = (prob.exact.sample(20000, torch.Generator().manual_seed(11)).numpy()
               if prob.exact is not None else prob.reference_samples)
        t_ref = projections(ref, prob.direction)
        span = 1.5 * np.abs(t_ref).max()
        heights = ax.hist(t_ref, bins=80, range=(-span, span), density=True, color="0.8",
                          label="exact" if prob.exact is not None else "MCMC reference")[0]
        for method, x in samples[prob.name].items():
            ax.hist(projections(x, prob.direction), bins=80, range=(-span, span), density=True,
                    histtype="step", lw=1.0, label=LABELS[method])
        ax.set_ylim(0, 3 * heights.max())  # a collapsed sampler's spike would hide the rest
        ax.set(xlabel="t = x . d", ylabel="density",
               title=f"({'ab'[k]}) {prob.name}: marginal along the mode direction")
        ax.legend(fontsize=7)
        ax = axes[k, 1]
        rows = {m: r for m, r in results[prob.name].items() if "error" not in r}
        pos = np.arange(len(rows))
        ax.bar(pos - 0.2, [r["mean_error"] for r in rows.values()], 0.4, label="mean error")
        ax.bar(pos + 0.2, [r["std_error"] for r in rows.values()], 0.4, label="std error")
        ax.set_xticks(pos, [LABELS[m] for m in rows], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="error / ||std_ref||", yscale="log",
               title=f"({'ab'[k]}) {prob.name}: equal nFS "
                     f"({next(iter(rows.values()))['budget'] if rows else '-'})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(name, args, results, problems, wall):
    lines = [f"# {name}", "", f"Command: `{args.command}`", "",
             f"Config: {json.dumps({k: v for k, v in vars(args).items() if k != 'command'})}",
             "", f"Total wall time {wall:.0f} s. Machine: {machine()}.", ""]
    for prob, info in problems.items():
        lines.append(f"- {prob}: {json.dumps(info)}")
    lines += ["", "Every flow draws its evaluation samples from the same noise z (common random "
              "numbers), so on a mirror-symmetric target their mode fractions are nearly "
              "identical (the sign of x . d is mostly set by z); the +/- is each one's own "
              "Monte-Carlo error.", "", "Errors are ||mean - mean_ref|| / ||std_ref|| and ||std - std_ref|| / "
              "||std_ref|| against the exact posterior (quadratic) or the symmetrised MCMC "
              "reference (elliptic). Modes: % of samples with t = x . d > 0 / < 0 (exact: "
              "50 / 50); the standard error uses n independent samples for flows and the "
              "MCMC ESS of t for chains (NaN when all chains stay on one side). Effective "
              "samples per 1000 nFS: importance ESS / (training + weight solves) for flows, "
              "smallest bulk ESS / nFS for chains. Monte-Carlo floor of the errors with n "
              "independent exact samples: about 1 / sqrt(n) for the mean error and "
              f"1 / sqrt(2 n) for the std error ({1 / math.sqrt(args.samples):.3f} and "
              f"{1 / math.sqrt(2 * args.samples):.3f} for the flows' {args.samples} samples); "
              "chains reach 1 / sqrt(ESS).", "", *table(results), "",
              "## Paper reference and where ours differs", ""]
    for prob in problems:
        lines += [f"- {prob}: paper: {PAPER[prob]}", f"  ours: {ours(prob, results[prob])}"]
    lines.append("")
    return "\n".join(lines)


def _modes(r):
    p = r["mode_positive"]
    verdict = "misses a mode" if min(p, 1 - p) < 0.1 else \
        "both modes, unbalanced" if abs(p - 0.5) > 0.1 else "both modes"
    return f"{100 * p:.1f} / {100 - 100 * p:.1f} % ({verdict})"


def ours(prob, rows):
    """Our numbers for the paper's claims, in one line."""
    done = {m: r for m, r in rows.items() if "error" not in r}
    if prob == "quadratic":
        parts = [f"{LABELS[m]} D_J = {r['jeffreys']:.3g} +/- {r['jeffreys_se']:.2g}, modes "
                 f"{_modes(r)}" for m, r in done.items() if "jeffreys" in r]
        budget = next(iter(done.values()))["budget"] if done else "-"
        return ("; ".join(parts) + f". A smaller problem ({budget} nFS per method; the size is "
                "in the problem line above) than the paper's 64 x 64 with 8e5 nFS, so the D_J "
                "values are not comparable in size, only in order (D_J grows with the "
                "dimension).")
    parts = [f"{LABELS[m]} modes {_modes(r)}, mean error {r['mean_error']:.3f}, std error "
             f"{r['std_error']:.3f}" for m, r in done.items()]
    return "; ".join(parts) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="quadratic,elliptic")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget-quadratic", type=int, default=40000)
    p.add_argument("--budget-elliptic", type=int, default=100000)
    p.add_argument("--levels", type=int, default=4, help="quadratic test bed level")
    p.add_argument("--noise", type=float, default=0.3, help="quadratic noise std / y")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--leapfrog", type=int, default=20)
    p.add_argument("--samples", type=int, default=4000, help="flow evaluation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    p.add_argument("--tag", default="")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite <name>.md from <name>.json without running anything")
    args = p.parse_args(argv)
    args.command = ("python benchmarks/compare.py "
                    + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.quick:
        args.budget_quadratic, args.budget_elliptic, args.samples = 3000, 3000, 400
        args.tag = args.tag or "quick"
    name = "compare" + (f"_{args.tag}" if args.tag else "")
    if args.report_only:
        return report_only(name)
    started = time.perf_counter()
    builders = {"quadratic": lambda: quadratic_problem(args.levels, args.noise),
                "elliptic": elliptic_problem}
    budgets = {"quadratic": args.budget_quadratic, "elliptic": args.budget_elliptic}
    problems, results, samples = {}, {}, {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for prob_name in args.problems.split(","):
        prob = problems[prob_name] = builders[prob_name]()
        results[prob_name], samples[prob_name] = {}, {}
        for method in args.methods.split(","):
            print(f"{prob_name}: {method} ({budgets[prob_name]} nFS) ...", flush=True)
            try:
                r, x = run_method(prob, method, budgets[prob_name], args)
            except ImportError as err:  # A-SVGD not in this checkout
                results[prob_name][method] = {"error": f"not run: {err}"}
                continue
            results[prob_name][method], samples[prob_name][method] = r, x
            print("  " + table({prob_name: {method: r}})[-1], flush=True)
            (RESULTS / f"{name}.json").write_text(json.dumps(
                {"config": vars(args), "results": results, "paper": PAPER}, indent=1))
    wall = time.perf_counter() - started
    infos = {k: prob.info for k, prob in problems.items()}
    md = markdown(name, args, results, infos, wall)
    print(md)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"config": vars(args), "results": results, "paper": PAPER, "wall_s": wall,
         "machine": machine(), "problems": infos}, indent=1))
    figure(RESULTS / f"{name}.png", problems, samples, results)


def report_only(name):
    """Rewrite ``<name>.md`` from ``<name>.json`` (the figure needs the samples: not redone)."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    args = argparse.Namespace(**data["config"])
    infos = data.get("problems") or {k: {} for k in data["results"]}
    md = markdown(name, args, data["results"], infos, data["wall_s"])
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
