"""Long-run MCMC references of the suite's elliptic problems.

Usage (one problem at a time, in the background)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/reference.py elliptic-demo
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/reference.py elliptic-iid-16 --draws 3000

Sampler: HMC in the coordinates of the problem's low-rank Laplace approximation (the MAP point
and the Gauss-Newton Hessian, :mod:`geoinvert.inference.laplace`), with a dense metric learnt
in the warm-up windows (:func:`geoinvert.inference.correction.correct`, no independence
moves). Exactness does not depend on the Laplace fit: it only preconditions the chains.
Chains start from Laplace draws with 1.5 times its spread (``--spread``): over-dispersed, so
that R-hat can see chains that have not forgotten their starts.

A mirror-symmetric bimodal problem (``--mirror``: ``elliptic-bimodal``, whose posterior is
invariant under the mirror M: s2 -> 1 - s2, ``x[::-1, :]``) is sampled within one mode: the
chains start at the MAP point's Laplace draws, every draw is folded to the MAP's side of the
case's mirror-antisymmetric ``output.direction`` (x -> M x where <d, x> has the other sign),
the diagnostics are those of the folded draws, and the reference is the folded draws plus
their mirror images. Its mode masses are then exactly 1/2 by symmetry, and what MCMC has to
get right is the shape of one mode (see ``benchmarks/reference_elliptic.py`` for the argument).

A reference is accepted when the largest split R-hat (over cells, principal components and the
log target) is below 1.01 and the smallest bulk ESS above 2000; the script says whether it
is, and stores the numbers either way. Writes ``benchmarks/suite/references/<name>.nc``
(4000 thinned draws as float32, or ``--keep``; the mean, std and Monte-Carlo standard error of
the mean of every cell from all draws; nFS, R-hat, ESS, acceptance, step, the command) and a line of
``benchmarks/suite/references/README.md``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from problems import REFERENCES, by_name  # noqa: E402
from reference_elliptic import folded, mirror  # noqa: E402

from geoinvert.diagnostics import mcmc_ess, mcmc_tail_ess, split_rhat  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference.correction import correct  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402

RHAT_MAX, ESS_MIN = 1.01, 2000


def _folded(samples, case, x_map):
    """Draws ``(chains, draws, ny, nx)`` mapped to the side of ``x_map`` along the case's
    mirror-antisymmetric ``output.direction``."""
    d = case.evaluate(case.config["output"]["direction"])
    return folded(samples, np.sign(float((x_map * d).sum())) * d)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problem")
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--leapfrog", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread", type=float, default=1.5,
                   help="spread of the starts in Laplace standard deviations")
    p.add_argument("--keep", type=int, default=4000,
                   help="draws stored, evenly thinned from all draws (fewer for a large lattice)")
    p.add_argument("--mirror", action="store_true",
                   help="mirror-symmetric bimodal problem: sample one mode, fold, mirror")
    args = p.parse_args(argv)
    problem = by_name(args.problem)
    case = problem.case()
    posterior = case.posterior(case.finest)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    laplace = fit_laplace(posterior, generator=gen)
    u = args.spread * torch.randn((args.chains, laplace.transport.dim), generator=gen,
                          dtype=torch.float64)
    starts, _ = laplace.transport.to_x(u)
    config = CorrectionConfig(kernel="hmc", chains=args.chains, warmup=args.warmup,
                              draws=args.draws, leapfrog=args.leapfrog, independence=False)
    last = [time.perf_counter()]

    def progress(i, total, accept):
        if time.perf_counter() - last[0] > 60:
            last[0] = time.perf_counter()
            print(f"  {i}/{total} iterations, acceptance {accept:.2f}", flush=True)

    res = correct(posterior, laplace.transport, starts, config, generator=gen,
                  callback=progress)
    chains = res.chains
    wall = time.perf_counter() - start
    if args.mirror:
        chains.samples = _folded(chains.samples, case, laplace.x_map.numpy())
    x = chains.samples                                     # (chains, draws, n, n)
    cells = x.reshape(*x.shape[:2], -1)
    summaries = chains.summaries()
    rhat = max(split_rhat(summaries[:, :, k]) for k in range(summaries.shape[2]))
    ess = min(mcmc_ess(summaries[:, :, k]) for k in range(summaries.shape[2]))
    ess_tail = min(mcmc_tail_ess(summaries[:, :, k]) for k in range(summaries.shape[2]))
    cell_ess = np.array([mcmc_ess(cells[:, :, k], rank_normalize=False)
                         for k in range(cells.shape[2])])
    flat = cells.reshape(-1, cells.shape[2])
    mean, std = flat.mean(0), flat.std(0, ddof=1)
    mcse = std / np.sqrt(cell_ess)
    if args.mirror:          # the reference: every draw and its mirror image
        shape = x.shape[2:]
        flat = np.concatenate([flat, mirror(flat.reshape(-1, *shape)).reshape(len(flat), -1)])
        mean, std = flat.mean(0), flat.std(0, ddof=1)
        se = (mcse.reshape(shape) + mirror(mcse.reshape(shape))) / 2
        mcse = se.ravel()
    accepted = rhat < RHAT_MAX and ess > ESS_MIN
    keep = np.unique(np.linspace(0, len(flat) - 1, min(args.keep, len(flat))).astype(int))
    shape = x.shape[2:]
    import xarray as xr
    ds = xr.Dataset(
        {"samples": (("sample", "y", "x"), flat[keep].reshape(-1, *shape).astype(np.float32)),
         "mean": (("y", "x"), mean.reshape(shape)), "std": (("y", "x"), std.reshape(shape)),
         "mean_se": (("y", "x"), mcse.reshape(shape))},
        attrs={"method": "Laplace-preconditioned HMC, dense metric"
               + (", one mode folded and mirrored" if args.mirror else ""),
               "problem": problem.name,
               "nfs": int(laplace.nfs + chains.nfs), "rhat": float(rhat), "ess": float(ess),
               "ess_tail": float(ess_tail), "acceptance": float(chains.acceptance.mean()),
               "step_size": float(chains.step_size), "chains": args.chains,
               "warmup": args.warmup, "draws": args.draws, "leapfrog": args.leapfrog,
               "accepted": int(accepted), "wall_s": wall,
               "case": json.dumps(problem.config),
               "command": "python benchmarks/suite/reference.py " + " ".join(
                   argv if argv is not None else sys.argv[1:])})
    REFERENCES.mkdir(parents=True, exist_ok=True)
    path = REFERENCES / f"{problem.name}.nc"
    tmp = path.with_suffix(".nc.tmp")
    ds.to_netcdf(tmp)
    tmp.replace(path)
    line = (f"{problem.name}: {ds.attrs['nfs']} nFS, {wall:.0f} s, R-hat {rhat:.4f}, ESS bulk "
            f"{ess:.0f} / tail {ess_tail:.0f}, acceptance {ds.attrs['acceptance']:.2f}, step "
            f"{chains.step_size:.3g}, largest MCSE of a mean {np.max(mcse / std):.3f} std: "
            + ("accepted" if accepted else f"NOT accepted (needs R-hat < {RHAT_MAX} and ESS > "
                                          f"{ESS_MIN})"))
    print(line)
    readme = REFERENCES / "README.md"
    lines = readme.read_text().splitlines() if readme.exists() else [
        "# Suite references", "", "Written by `benchmarks/suite/reference.py`; one line per "
        "reference.", ""]
    lines = [l for l in lines if not l.startswith(f"- {problem.name}:")] + [f"- {line}"]
    readme.write_text("\n".join(lines) + "\n")
    return 0 if accepted else 1


if __name__ == "__main__":
    sys.exit(main())
