"""Why a fixed-metric HMC correction is slow on some elliptic problems: the posterior's local
curvature against its global spread, measured on the long-run reference draws.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/geometry.py \
        --problems elliptic-demo,elliptic-iid-8-heads,elliptic-iid-16

The best fixed metric of HMC (the one the correction's warm-up estimates) is the posterior
covariance S. In the coordinates it whitens, w = L^-1 (z - m) with S = L L^T and z the prior's
whitened coordinates, a Gaussian posterior is N(0, I) everywhere. A non-Gaussian one is not:
the negative log posterior's Gauss-Newton Hessian at a point x, H(x) = I + G^T G with
G = Gamma^-1/2 J(x) C (J the forward model's Jacobian at x, C the prior's factor), becomes
L^T H(x) L there. Its largest eigenvalue lambda_max(x) bounds the leapfrog step that is
stable at x (eps < 2 / sqrt(lambda_max)), while the trajectory must still travel the unit
global spread, so a transition needs about (pi / 2) sqrt(lambda_max) leapfrog steps. A
lambda_max far above 1 at typical draws means the posterior is thin locally and wide
globally: a curved ridge whose thin directions turn along it, which no fixed metric
straightens (a position-dependent metric or a transport map fitted to the ridge can).

For each problem: quantiles of lambda_max and lambda_min of the whitened Gauss-Newton
Hessian over 60 reference draws (matrix-free, as the Laplace fit applies it), the
eigenvalue range of S in the prior-whitened coordinates, and the leapfrog steps a transition
then needs. Writes ``benchmarks/results/geometry.json`` and ``geometry.md``.
"""

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name  # noqa: E402

from geoinvert.inference.laplace import _hessian_operator, linearise  # noqa: E402
from geoinvert.samplers.whitening import prior_whitening  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
_F64 = torch.float64


def measure(problem, points=60):
    """The row of one problem (see the module docstring)."""
    import xarray as xr
    case = problem.case()
    posterior = case.posterior(case.finest)
    whitening = prior_whitening(posterior.prior, case.finest)
    with xr.open_dataset(problem.reference) as ds:
        x = torch.tensor(ds["samples"].values, dtype=_F64)
    z = whitening.to_z(x)
    d = z.shape[1]
    cov = torch.cov(z.T)
    spread = torch.linalg.eigvalsh(cov)
    factor = torch.linalg.cholesky(cov)
    basis = torch.eye(d, dtype=_F64)
    top, bottom = [], []
    for i in np.linspace(0, len(x) - 1, points).astype(int):
        # H~ = C^T J^T Gamma^-1 J C, the Laplace fit's operator, applied to the identity
        misfit = _hessian_operator(posterior, whitening, linearise(posterior.forward, x[i]))
        h = factor.T @ (basis + misfit(basis)) @ factor
        e = torch.linalg.eigvalsh(h)
        top.append(float(e[-1]))
        bottom.append(float(e[0]))
    top, bottom = np.array(top), np.array(bottom)
    q = (0.1, 0.5, 0.9)
    return {"problem": problem.name, "parameters": d, "observations": case.n_obs,
            "points": points,
            "lambda_max": [float(v) for v in np.quantile(top, q)],
            "lambda_min": [float(v) for v in np.quantile(bottom, q)],
            "covariance_eigenvalues": [float(spread[0]), float(spread[-1])],
            "stable_step": float(2 / math.sqrt(np.median(top))),
            "leapfrog": float(math.pi / 2 * math.sqrt(np.median(top)))}


def markdown(rows):
    out = ["# Posterior geometry: local curvature against global spread", "",
           "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/geometry.py`", "",
           "Whitened Gauss-Newton Hessian L^T H(x) L at reference draws (L: Cholesky factor of "
           "the posterior covariance in the prior's whitened coordinates; a Gaussian posterior "
           "has all its eigenvalues at 1); quantiles 10 / 50 / 90 % over the draws; stable "
           "step 2 / sqrt(median lambda_max); leapfrog: (pi / 2) sqrt(median lambda_max), the "
           "steps of a transition that travels the global spread.", "",
           "| problem | parameters | observations | lambda_max (10 / 50 / 90 %) | lambda_min "
           "(10 / 50 / 90 %) | covariance eigenvalues (prior-whitened) | stable step | "
           "leapfrog |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fmt = lambda v: " / ".join(f"{x:.3g}" for x in v)  # noqa: E731
        out.append(f"| {r['problem']} | {r['parameters']} | {r['observations']} | "
                   f"{fmt(r['lambda_max'])} | {fmt(r['lambda_min'])} | "
                   f"{fmt(r['covariance_eigenvalues'])} | {r['stable_step']:.3f} | "
                   f"{r['leapfrog']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="elliptic-demo,elliptic-iid-8-heads,elliptic-iid-16")
    p.add_argument("--points", type=int, default=60)
    args = p.parse_args(argv)
    rows = []
    for name in args.problems.split(","):
        rows.append(measure(by_name(name), args.points))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "geometry.json").write_text(json.dumps(
        {"rows": rows, "machine": platform.machine()}, indent=1))
    (RESULTS / "geometry.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
