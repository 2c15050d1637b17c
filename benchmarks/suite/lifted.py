"""Constrained HMC on the lifted data manifold, a kernel whose metric follows the ridge, against
the package's HMC correction.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/lifted.py elliptic-demo --seeds 1,2,3

The kernel (:mod:`geoinvert.samplers.lifted`: RATTLE on the manifold {(z, eta): r(z) + eta = 0}
of the prior-whitened field z and the residuals r in noise units, whose induced metric is the
Gauss-Newton Hessian) runs 4 chains from the Laplace draws the correction would start from. Its
warm-up (``--warmup`` iterations) adapts the step alone by dual averaging (target acceptance
0.8); a transition integrates for a quarter period with a jittered step and a fresh momentum.
No metric is estimated. After every ``--block`` draws per chain the script records the solves
so far (the Laplace fit's included), R-hat, bulk and tail ESS (the package's stopping rule
wants R-hat <= 1.01 and both ESS >= 400) and the errors against the suite reference, and stops
once the criteria hold. ``--no-force`` leaves the log-determinant's gradient out of the
dynamics (the Metropolis test still counts it).

Solves are counted as the package counts them: one per forward solve (each factorisation); the
adjoint, tangent-linear and second-order solves reuse its factorisation and are reported
separately (back-substitutions). For each problem and seed the script runs, from one Laplace fit
and the same 4 Laplace draws, the lifted kernel and the package's HMC correction alone
(``correction_trace.py --variants default``: HMC in the Laplace coordinates with its warm-up,
no independence moves), and reports the solves where each first meets the criteria.
``--no-baseline linear-matern-16`` checks the kernel on a linear problem (M is flat, the
posterior Gaussian and exact).

``--full PROBLEMS --seeds S --name lifted_runs`` runs instead the whole default run (training,
mode search, correction: ``run.py``'s msign row) with ``sampler.correction.kernel`` lifted and
hmc for each seed.

Writes ``benchmarks/results/lifted.json`` and ``.md`` (``--name`` for another name).
"""

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import correction_trace  # noqa: E402
from problems import ROOT, by_name, reference, scores  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402
from geoinvert.samplers.chains import DualAveraging  # noqa: E402
from geoinvert.samplers.lifted import LiftedManifold, lifted_transition, quarter_period  # noqa: E402,E501

RESULTS = ROOT / "benchmarks" / "results"
F64 = torch.float64
_INITIAL_STEP = 0.1


def _met(row):
    return row["rhat"] <= 1.01 and min(row["ess"], row["ess_tail"]) >= 400


def lifted(posterior, laplace, gen_state, ref, args):
    """The lifted kernel's block-by-block rows and its summary; 4 chains from the Laplace draws
    the package's correction would start from (the generator at ``gen_state``)."""
    gen_t = torch.Generator()
    gen_t.set_state(gen_state)
    chains, model = args.chains, LiftedManifold(posterior, force=not args.no_force)
    gen = np.random.default_rng(args.seed)
    u = torch.randn((chains, laplace.transport.dim), generator=gen_t, dtype=F64)
    state = model.lift(laplace.transport.to_x(u)[0].detach().numpy())
    adapt = DualAveraging(_INITIAL_STEP, args.target)
    step, begin, rows, draws, logp, failed, accepts = _INITIAL_STEP, time.perf_counter(), \
        [], [], [], 0, []
    warm_nfs = 0
    for it in range(args.warmup + args.max_draws):
        h = step * gen.uniform(0.8, 1.2)                         # a jittered step
        n = quarter_period(h, args.max_leapfrog)
        state, acc, bad = lifted_transition(model, state, h, n, gen)
        failed += bad
        if it < args.warmup:
            adapt.update(float(acc.mean()))
            step = adapt.value if it < args.warmup - 1 else adapt.final()
            warm_nfs = model.nfs
            continue
        accepts.append(float(acc.mean()))
        q = state[0]
        draws.append(model.to_x(q[:, : model.d]))
        logp.append(model.log_posterior(q))
        k = it - args.warmup + 1
        if k % args.block == 0:
            samples = np.stack(draws, 1)
            diag = _convergence(samples, np.stack(logp, 1))
            sc = scores(ref, samples.reshape(-1, *model.shape))
            rows.append({"draws": k, "nfs": int(model.nfs + laplace.nfs),
                         "back_substitutions": int(model.back_substitutions),
                         "rhat": diag["rhat"], "ess": diag["ess"], "ess_tail": diag["ess_tail"],
                         "mean_error_rms": sc["mean_error_rms"],
                         "std_error_rms": sc["std_error_rms"],
                         "wall_s": time.perf_counter() - begin})
            print(json.dumps(rows[-1]), flush=True)
            if _met(rows[-1]):
                break
    return {"kernel": "lifted", "warmup": args.warmup, "warmup_nfs": int(warm_nfs + laplace.nfs),
            "step": step, "leapfrog": quarter_period(step, args.max_leapfrog),
            "acceptance": float(np.mean(accepts)), "failed": failed, "rows": rows}


def summary(run):
    """Solves, draws, errors and wall time where the criteria first hold (or at the end)."""
    rows = run["rows"]
    met = next((r for r in rows if _met(r)), None)
    at = met or rows[-1]
    first = rows[0]
    rate = 1000 * (at["ess"] - first["ess"]) / max(at["nfs"] - first["nfs"], 1)
    return {"met": met is not None, "nfs": at["nfs"], "draws": at["draws"], "rhat": at["rhat"],
            "ess": at["ess"], "ess_tail": at["ess_tail"], "mean_error_rms": at["mean_error_rms"],
            "std_error_rms": at["std_error_rms"], "wall_s": at["wall_s"],
            "ess_per_1000_nfs": rate}


def markdown(results, args, command):
    lines = ["# Constrained HMC on the lifted data manifold against the HMC correction", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {command}`", "",
             "Both from one Laplace fit and the same 4 Laplace draws per seed: the package's "
             "correction (HMC in the Laplace coordinates, warm-up 250 with step and metric "
             "adaptation, no independence moves: `correction_trace.py --variants default`) and "
             f"the lifted kernel (warm-up {args.warmup}, step adaptation only). R-hat and ESS "
             f"after every {args.block} draws per chain; *solves* are those (the Laplace fit's "
             "included) where R-hat <= 1.01 and bulk and tail ESS >= 400 first hold (a "
             "'>' where they did not within the draws). Errors there, in reference-std units, "
             "RMS over cells. ESS / 1000 solves: bulk ESS gained from the first block to that "
             "point. Back-substitutions: the lifted kernel's adjoint, tangent-linear and "
             "second-order solves with kept factorisations, not counted as solves.", "",
             "| problem | seed | lifted solves (warm-up) | draws | step x steps, accept | "
             "ESS / 1000 solves | mean / std err | wall s | back-subst. | HMC solves | draws | "
             "leapfrog | ESS / 1000 solves | mean / std err | wall s | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- | --- |"]
    for res in results:
        lf, lsum = res["lifted"], summary(res["lifted"])
        back = next((r for r in lf["rows"] if r["draws"] == lsum["draws"]))["back_substitutions"]
        cells = [res["problem"], str(res["seed"]),
                 f"{'' if lsum['met'] else '>'}{lsum['nfs']:,} ({lf['warmup_nfs']:,})",
                 str(lsum["draws"]), f"{lf['step']:.2f} x {lf['leapfrog']}, "
                 f"{lf['acceptance']:.2f}", f"{lsum['ess_per_1000_nfs']:.1f}",
                 f"{lsum['mean_error_rms']:.3f} / {lsum['std_error_rms']:.3f}",
                 f"{lsum['wall_s']:.0f}", f"{back:,}"]
        if res.get("hmc"):
            h, hsum = res["hmc"], summary(res["hmc"])
            cells += [f"{'' if hsum['met'] else '>'}{hsum['nfs']:,}", str(hsum["draws"]),
                      str(h["leapfrog"]), f"{hsum['ess_per_1000_nfs']:.1f}",
                      f"{hsum['mean_error_rms']:.3f} / {hsum['std_error_rms']:.3f}",
                      f"{hsum['wall_s']:.0f}", f"{lsum['nfs'] / hsum['nfs']:.2f}"]
        else:
            cells += ["-"] * 7
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problems", nargs="+", help="suite problems")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (Laplace fit, starts)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=60, help="the lifted kernel's warm-up")
    p.add_argument("--max-draws", type=int, default=1500)
    p.add_argument("--max-leapfrog", type=int, default=64)
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--target", type=float, default=0.8, help="target acceptance")
    p.add_argument("--no-force", action="store_true",
                   help="leave the log-determinant's gradient out of the dynamics")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the HMC correction (e.g. for the linear check)")
    p.add_argument("--baseline-max-draws", type=int, default=1000)
    p.add_argument("--name", default="lifted")
    p.add_argument("--full", action="store_true",
                   help="whole default runs (training, mode search, correction: run.py's "
                   "msign row) with sampler.correction.kernel lifted and hmc, sampler.seed "
                   "from --seeds")
    p.add_argument("--merge", action="store_true",
                   help="PROBLEMS are results files of this script (runs split over processes, "
                   "all of one mode): write them as one set")
    args = p.parse_args(argv)
    command = "benchmarks/suite/lifted.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.problems]
        # the parts' own file names do not matter to their numbers
        command = " and ".join(re.sub(r" --name \S+", "", part["command"]) for part in parts)
        if "rows" in parts[0]:                                   # --full runs
            return _write_full([r for part in parts for r in part["rows"]], args, command)
        results = [r for part in parts for r in part["results"]]
        args.warmup, args.block = parts[0]["warmup"], parts[0]["block"]
        return _write(results, args, command)
    if args.full:
        return _full(args, command)
    results = []
    for name in args.problems:
        problem = by_name(name)
        ref = reference(problem)
        case = problem.case()
        posterior = case.posterior(case.finest)
        for seed in map(int, args.seeds.split(",")):
            args.seed = seed
            gen = torch.Generator().manual_seed(seed)
            laplace = fit_laplace(posterior, generator=gen)
            state = gen.get_state()
            print(f"{name}, seed {seed}: lifted", flush=True)
            res = {"problem": name, "seed": seed,
                   "lifted": lifted(posterior, laplace, state, ref, args)}
            if not args.no_baseline:
                print(f"{name}, seed {seed}: HMC correction", flush=True)
                base = argparse.Namespace(warmup=CorrectionConfig.warmup, block=args.block,
                                          max_draws=args.baseline_max_draws)
                res["hmc"] = correction_trace.trace(posterior, laplace, state, ref,
                                                    {"until_met": True}, base)
            results.append(res)
    return _write(results, args, command)


def _full(args, command):
    """Default runs with either kernel, as ``run.py`` makes its rows, over seeds."""
    import tempfile

    import run
    rows = []
    for name in args.problems:
        problem = by_name(name)
        ref = reference(problem)
        for seed in map(int, args.seeds.split(",")):
            for kernel in ("lifted", "hmc"):
                config = json.loads(json.dumps(problem.config))
                sampler = config.setdefault("sampler", {})
                sampler["seed"] = seed
                sampler.setdefault("correction", {})["kernel"] = kernel
                with tempfile.TemporaryDirectory() as out:
                    row = run.run_one(dataclasses.replace(problem, config=config), ref, "msign",
                                      None, out)
                rows.append({**row, "seed": seed, "kernel": kernel})
                print(json.dumps(rows[-1]), flush=True)
    return _write_full(rows, args, command)


def _write_full(rows, args, command):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows},
                                                          indent=1))
    lines = ["# Default runs with the lifted kernel and with HMC", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {command}`", "",
             "The default `msign` run (as `run.py` makes its rows) with "
             "`sampler.correction.kernel` lifted or hmc and `sampler.seed` set; errors in "
             "reference-std units, RMS over cells; *meets*: the suite's accuracy and R-hat "
             "criteria.", "",
             "| problem | seed | kernel | nFS | correction nFS | draws / chain | leapfrog | "
             "R-hat | mean / std err | wall s | verdict | meets |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['problem']} | {r['seed']} | {r['kernel']} | {r['nfs']:,} | "
              f"{r['correction_nfs']:,} | {r['draws']} | {r['leapfrog']:.0f} | {r['rhat']:.4f} | "
              f"{r['mean_error_rms']:.3f} / {r['std_error_rms']:.3f} | {r['wall_s']:.0f} | "
              f"{r['verdict']} | {'yes' if r['meets'] else 'no'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


def _write(results, args, command):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "warmup": args.warmup, "block": args.block, "results": results},
        indent=1))
    text = markdown(results, args, command)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
