"""The defaults on problems drawn at random: a check of generalisation that no one chose.

Usage (problem seeds; rows of ``drawn.json`` for the same seed are replaced, the others
kept)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/drawn.py --seeds 0-11

The suite and the held-out set are problems someone wrote down, and a setting can end up
fitting them. Here a seed draws a problem from a broad family with an exact posterior, so
that nothing but the draw decides it and no reference run is needed:

- the lattice: 8x8, 16x16 or 32x32 (probabilities 0.3, 0.5, 0.2);
- the prior: Matern (std 0.5 to 2, correlation length 0.1 to 0.5) or iid (std 0.5 to 2);
- linear-Gaussian (a third of the draws): 1 to 24 Gaussian measurement kernels at random
  centres (width 0.05 to 0.3), data from a prior draw, noise 0.003 to 0.3 (log-uniform)
  times each observation's prior std, and with probability 0.3 a prior mean
  a cos(k pi x) cos(l pi y) (|a| <= 0.5, k, l from 1 to 3);
- quadratic (the rest): one measurement function, a Gaussian kernel at a random place
  or sin(k pi x) sin(l pi y) (k, l from 1 to 3), data (c s_t)^2 with s_t the prior std of
  t = <phi, x> and c from 1.5 to 3, noise 0.03 to 1 (log-uniform) times the data: two modes
  from separated to merged; with probability 0.3 the prior mean a phi (|a| <= 0.3), which
  makes their masses unequal.

With ``--elliptic`` a seed draws an elliptic problem instead (``drawn-elliptic-S``), the
package's own kind, whose posterior has no closed form; its reference is a long run of
``reference.py`` (made first when it is missing, with trajectories of up to 128 leapfrog
steps, and stored beside the suite's with 1000 of its draws; a problem whose reference does
not meet R-hat < 1.01 and ESS > 2000 is reported and not scored):

- an 8x8 or 16x16 lattice (probabilities 0.6, 0.4), a Matern prior (std 0.5 to 1.5,
  correlation length 0.15 to 0.5) or an iid one (std 0.5 to 1.5);
- one of four flow settings, equally likely: u = 1 on the left and 0 on the right without
  a source; u = 0 on the boundary with a uniform source; inflow through the bottom and u = 0
  on top; u = 1 and 0 on the left and right with a Gaussian source at a random place;
- 3 to 25 heads at random places in [0.1, 0.9]^2, with probability 0.3 one or two integrals
  of u against Gaussian kernels as well, data from a prior draw, noise 0.002 to 0.05
  (log-uniform).

Each problem runs as the suite's ``msign`` rows do (``run.py``'s ``run_one``: the package
defaults, ``output.samples`` 2000) and is scored against its reference with the suite's
criteria (mean and std error <= 0.1, mode mass within 0.05, R-hat <= 1.01). Per row: the
problem, its solves against the budget the suite aims at (1e5 up to 64 parameters, 2.5e5
beyond), the scores, the verdict, and whether it is a silent failure (criteria missed,
verdict ok).

Writes ``benchmarks/results/drawn.json`` and ``.md`` (``--elliptic``: ``drawn_elliptic``).
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import REFERENCES, ROOT, Problem, _base, reference  # noqa: E402
from run import (_fmt, _modes, head_commit, locked_results, machine, run_case,  # noqa: E402
                 run_one)
from seeds import budget, seeds  # noqa: E402

import geoinvert  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _prior(rng, std=(0.5, 2.0), correlation_length=(0.1, 0.5)):
    """A Matern or an iid prior (equally likely), its std and correlation length uniform in
    the ranges given."""
    value = round(float(rng.uniform(*std)), 2)
    if rng.uniform() < 0.5:
        return {"kind": "matern", "std": value,
                "correlation_length": round(float(rng.uniform(*correlation_length)), 2)}
    return {"kind": "iid", "std": value}


def _kernel(rng, lo=0.05, hi=0.3):
    return {"shape": "gaussian",
            "center": [round(float(c), 3) for c in rng.uniform(0.1, 0.9, 2)],
            "width": round(float(rng.uniform(lo, hi)), 3)}


def _observation_std(config, finest):
    """Prior std of each observation's linear functional."""
    case = geoinvert.load_case(config, folder=ROOT)
    w = np.atleast_2d(case.forward(finest).matrix)
    cov = case.prior().covariance(finest)
    return np.sqrt(np.einsum("ki,ij,kj->k", w, cov, w))


def drawn(seed):
    """The problem of ``seed``."""
    rng = np.random.default_rng(10_000 + seed)
    finest = int(rng.choice([3, 4, 5], p=[0.3, 0.5, 0.2]))
    prior = _prior(rng)
    name = f"drawn-{seed}"
    if rng.uniform() < 1 / 3:
        kernels = [_kernel(rng) for _ in range(int(rng.integers(1, 25)))]
        if rng.uniform() < 0.3:
            k, l = rng.integers(1, 4, 2)
            prior["mean"] = (f"{rng.uniform(-0.5, 0.5):.2f} * cos({k}*pi*x) "
                             f"* cos({l}*pi*y)")
        config = _base(name, finest, prior, {"kind": "linear"}, {"functions": kernels},
                       {"synthetic": {"truth": "prior", "seed": seed}}, 1.0)
        ratio = _log_uniform(rng, 0.003, 0.3)
        config["noise"] = {"std": [float(ratio * s) for s in _observation_std(config, finest)]}
        about = (f"linear, {2 ** finest}x{2 ** finest} {prior['kind']} prior, "
                 f"{len(kernels)} kernel{'s' if len(kernels) > 1 else ''}, noise {ratio:.3g} "
                 "x their prior std")
        return Problem(name, about, config, "exact")
    if rng.uniform() < 0.5:
        phi = _kernel(rng, 0.1, 0.3)
        shape = f"a bump at ({phi['center'][0]}, {phi['center'][1]})"
    else:
        k, l = (int(v) for v in rng.integers(1, 4, 2))
        phi = f"sin({k}*pi*x) * sin({l}*pi*y)"
        shape = phi
    config = _base(name, finest, prior, {"kind": "quadratic"}, {"functions": [phi]},
                   {"values": [1.0]}, 1.0)
    s_t = float(_observation_std(config, finest)[0])
    c, ratio = float(rng.uniform(1.5, 3.0)), _log_uniform(rng, 0.03, 1.0)
    y = (c * s_t) ** 2
    config["data"], config["noise"] = {"values": [y]}, {"std": ratio * y}
    shift = ""
    if rng.uniform() < 0.3:             # unequal modes: the prior mean moved along phi
        a = float(rng.uniform(-0.3, 0.3))
        mean = dict(phi, amplitude=a) if isinstance(phi, dict) else f"{a:.3f} * {phi}"
        config["prior"] = dict(prior, mean=mean)
        shift = f", prior mean {a:.2f} phi"
    about = (f"quadratic, {2 ** finest}x{2 ** finest} {prior['kind']} prior, phi {shape}, "
             f"data ({c:.2f} s_t)^2, noise {ratio:.3g} y{shift}")
    return Problem(name, about, config, "exact", True)


def drawn_elliptic(seed):
    """The elliptic problem of ``seed``."""
    rng = np.random.default_rng(20_000 + seed)
    finest = int(rng.choice([3, 4], p=[0.6, 0.4]))
    prior = _prior(rng, std=(0.5, 1.5), correlation_length=(0.15, 0.5))
    setting = int(rng.integers(4))
    forward = [
        {"kind": "elliptic", "source": 0.0, "dirichlet": {"left": 1.0, "right": 0.0}},
        {"kind": "elliptic", "source": 1.0, "dirichlet": {"all": 0.0}},
        {"kind": "elliptic", "source": 0.0, "dirichlet": {"top": 0.0},
         "neumann": {"bottom": 1.0}},
        {"kind": "elliptic", "source": dict(_kernel(rng, 0.08, 0.15), amplitude=5.0),
         "dirichlet": {"left": 1.0, "right": 0.0}},
    ][setting]
    heads = [[round(float(c), 3) for c in rng.uniform(0.1, 0.9, 2)]
             for _ in range(int(rng.integers(3, 26)))]
    observations = {"points": heads}
    if rng.uniform() < 0.3:
        observations["functions"] = [_kernel(rng, 0.1, 0.25)
                                     for _ in range(int(rng.integers(1, 3)))]
    noise = _log_uniform(rng, 0.002, 0.05)
    name = f"drawn-elliptic-{seed}"
    config = _base(name, finest, prior, forward, observations,
                   {"synthetic": {"truth": "prior", "seed": seed}}, noise)
    flows = ["u = 1 left, 0 right", "u = 0 around, source 1", "inflow at the bottom, u = 0 on top",
             "u = 1 left, 0 right, a Gaussian source"][setting]
    integrals = len(observations.get("functions", []))
    about = (f"elliptic, {2 ** finest}x{2 ** finest} {prior['kind']} prior "
             f"(std {prior['std']}), "
             f"{flows}, {len(heads)} heads" + (f" and {integrals} integral"
                                              f"{'s' if integrals > 1 else ''}" if integrals
                                              else "") + f", noise {noise:.3g}")
    return Problem(name, about, config, str(REFERENCES / f"{name}.nc"))


def by_seed_name(name):
    """The drawn problem called ``name`` (``drawn-S`` or ``drawn-elliptic-S``), or None."""
    head, _, tail = name.rpartition("-")
    if not tail.isdigit():
        return None
    if head == "drawn":
        return drawn(int(tail))
    if head == "drawn-elliptic":
        return drawn_elliptic(int(tail))
    return None


def _ensure_reference(problem):
    """``problem``'s reference, made by ``reference.py`` when it is missing; None when the
    long run did not meet its criteria."""
    path = Path(problem.reference)
    if not path.exists():
        import reference as long_run
        # the scores use its mean and std, so 1000 draws are kept; trajectories as long as
        # a quarter period wants, up to 128 leapfrog steps (a thin ridge needs 50 to 100)
        command = [problem.name, "--keep", "1000", "--leapfrog", "128"]
        print(f"  making its reference: reference.py {' '.join(command)}", flush=True)
        long_run.main(command)
    import xarray as xr
    with xr.open_dataset(path) as ds:
        if not int(ds.attrs.get("accepted", 0)):
            return None
    return reference(problem)


def markdown(rows, about, command, elliptic=False):
    scored = ("exact posterior" if not elliptic else
              "long-run reference (`benchmarks/suite/references/`)")
    lines = ["# The default run on problems drawn at random", "",
             f"Command: `{command}`", "", f"Machine: {about}", "",
             f"Each seed draws a problem (`benchmarks/suite/drawn.py`: its family), scored "
             f"against its {scored} as in `suite.md` (errors in posterior-std "
             "units, RMS over cells; *meets*: mean and std error <= 0.1, mode mass within 0.05, "
             "R-hat <= 1.01; *silent*: misses that while the verdict says ok; budget: 1e5 "
             "solves up to 64 parameters, 2.5e5 beyond).", "",
             "| seed | problem | parameters | nFS | within budget | mean err | std err | "
             + ("" if elliptic else "mass t > 0 (exact) | ") + "R-hat | kernel | "
             + ("" if elliptic else "flow's D_J | ") + "verdict | meets |",
             "|" + " --- |" * (11 if elliptic else 13)]
    for r in rows:
        scored = r.get("scored", True)
        meets = ("yes" if r["meets"] else ("**SILENT**" if r["silent_failure"] else "no")) \
            if scored else "not scored: no reference"
        verdict = "ok" if r["verdict"] == "ok" else "warns"
        errors = (f"{r['mean_error_rms']:.3f} | {r['std_error_rms']:.3f}" if scored
                  else "- | -")
        extra = (f"{_modes(r, ' %')} | ", f"{_divergence(r)} | ") if not elliptic else ("", "")
        lines.append(f"| {r['seed']} | {r['about']} | {r['parameters']} | {r['nfs']:,} | "
                     f"{'yes' if r['within_budget'] else 'no'} | {errors} | {extra[0]}"
                     f"{_fmt(r['rhat'], '.3f')} | {r.get('correction') or '-'} | {extra[1]}"
                     f"{verdict} | {meets} |")
    scored = [r for r in rows if r.get("scored", True)]
    lines += ["", f"Meet the criteria: {sum(r['meets'] for r in scored)} of {len(scored)} "
              f"scored; warn: {sum(r['verdict'] != 'ok' for r in rows)} of {len(rows)}; silent "
              f"failures: {sum(r['silent_failure'] for r in scored)}; within the solve budget: "
              f"{sum(r['within_budget'] for r in rows)} of {len(rows)}."]
    unscored = len(rows) - len(scored)
    if unscored:
        lines += ["", f"Not scored: {unscored} problem{'s' if unscored > 1 else ''} whose "
                  "long reference run did not meet R-hat < 1.01 and ESS > 2000 (the default "
                  "run's own verdict is shown)."]
    return "\n".join(lines) + "\n"


def _divergence(r):
    return f"{r['jeffreys']:.3g} +/- {r['jeffreys_se']:.2g}" if "jeffreys" in r else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0-11", help='"0-11" or "0,3,5"')
    p.add_argument("--elliptic", action="store_true",
                   help="elliptic problems against long-run references (drawn_elliptic.json)")
    args = p.parse_args(argv)
    path = RESULTS / ("drawn_elliptic.json" if args.elliptic else "drawn.json")
    for seed in seeds(args.seeds):
        problem = (drawn_elliptic if args.elliptic else drawn)(seed)
        print(f"seed {seed}: {problem.about}", flush=True)
        ref = _ensure_reference(problem) if args.elliptic else reference(problem)
        with tempfile.TemporaryDirectory() as out:
            if ref is None:
                print("  its reference run did not meet R-hat < 1.01 and ESS > 2000: the "
                      "default run is not scored", flush=True)
                row = _unscored(problem, out)
            else:
                row = run_one(problem, ref, "msign", None, out)
        parameters = 4 ** problem.case().finest
        row.update(seed=seed, about=problem.about, parameters=parameters,
                   within_budget=bool(row["nfs"] <= budget(parameters)), commit=head_commit())
        print(f"  nFS {row['nfs']}, mean error {row.get('mean_error_rms', math.nan):.3f}, "
              f"std error {row.get('std_error_rms', math.nan):.3f}, modes "
              f"{_modes(row, ' %')}, R-hat {row['rhat']:.4f}, verdict {row['verdict']!r}, "
              f"meets {row['meets']}", flush=True)
        with locked_results(path) as document:
            rows = [r for r in document["rows"] if r["seed"] != seed] + [row]
            rows.sort(key=lambda r: r["seed"])
            document.update(rows=rows, machine=machine())
            path.with_suffix(".md").write_text(markdown(
                rows, document["machine"], _command(rows, args.elliptic), args.elliptic))


def _unscored(problem, outdir):
    """The default run of a problem without a reference, as ``run_one`` makes it: its cost,
    R-hat, kernel and verdict."""
    a = run_case(problem, "msign", None, outdir)[0].dataset.attrs
    return {"problem": problem.name, "method": "msign", "nfs": int(a["nfs"]),
            "verdict": a["verdict"], "rhat": float(a.get("diagnostics_rhat", math.nan)),
            "correction": a.get("diagnostics_correction", ""),
            "modes_found": int(a.get("diagnostics_modes_found", 0)), "scored": False,
            "meets": False, "silent_failure": False}


def _command(rows, elliptic=False):
    """The command that makes ``rows``: their seeds as a range where they are one."""
    got = sorted(r["seed"] for r in rows)
    listed = f"{got[0]}-{got[-1]}" if got == list(range(got[0], got[-1] + 1)) \
        else ",".join(map(str, got))
    return ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/drawn.py "
            + ("--elliptic " if elliptic else "") + f"--seeds {listed}")


if __name__ == "__main__":
    main()
