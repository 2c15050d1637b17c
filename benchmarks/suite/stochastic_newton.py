"""Stochastic-Newton MCMC with the local Gauss-Newton Hessian: does a metric that follows the
posterior's curvature pay for its Jacobian on a suite problem?

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/stochastic_newton.py elliptic-demo

In the prior's whitened coordinates z (x = mu + C z) the negative log posterior is
1/2 |z|^2 + 1/2 |r(z)|^2, r = (F(x) - y) / noise, and its Gauss-Newton Hessian at z is
G(z) = I + J~^T J~, J~ = dr/dz. The proposal is the local Gaussian's Crank-Nicolson move,

    z' = m(z) + sqrt(1 - rho^2) G(z)^{-1/2} xi,    m(z) = z + (1 - rho) G(z)^{-1} grad log pi(z),

which leaves the Gaussian N(z + G^-1 grad, G^-1) invariant: with rho = 0 it is stochastic
Newton (Martin, Wilcox, Burstedde, Ghattas 2012; an independent draw from the local Laplace
approximation), with rho -> 1 a small step. It is accepted by Metropolis-Hastings with the
Hessian at both points. Each proposal costs one forward solve and one adjoint solve per
observation (the rows of J), counted as 1 + n_obs solves. On a linear problem every proposal
is accepted at rho = 0 (the check in the table). 8 chains start from Laplace draws; R-hat,
ESS and the errors against the suite reference use the last three quarters of the draws.

Writes ``benchmarks/results/stochastic_newton.json`` and ``.md``.
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

from problems import ROOT, by_name, reference, scores  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.inference.laplace import fit_laplace, linearise  # noqa: E402
from geoinvert.samplers.whitening import prior_whitening  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
F64 = torch.float64


class GaussNewton:
    """log pi, its gradient and the Gauss-Newton Hessian in whitened coordinates, counting
    1 + n_obs solves per point."""

    def __init__(self, posterior):
        self.post, self.w = posterior, prior_whitening(posterior.prior, posterior.level)
        self.y = torch.as_tensor(posterior.data, dtype=F64)
        self.noise = torch.as_tensor(posterior.noise, dtype=F64)
        self.m, self.nfs = posterior.forward.n_obs, 0

    def jacobian(self, x):
        """``(F(x) (c, m), dF/dx (c, m, n))``: the Jacobian's rows by the package's adjoint
        products (:func:`~geoinvert.inference.laplace.linearise`)."""
        eye = torch.eye(self.m, dtype=F64)
        with torch.no_grad():
            pred = self.post.forward(x).to(F64)
        rows = [linearise(self.post.forward, xi).vjp(eye).reshape(self.m, -1) for xi in x]
        return pred, torch.stack(rows)

    def __call__(self, z):
        c, d = z.shape
        x = self.w.to_x(z).detach()
        pred, jx = self.jacobian(x)
        self.nfs += c * (1 + self.m)
        zz = z.detach().repeat_interleave(self.m, 0).requires_grad_(True)
        (jz,) = torch.autograd.grad(self.w.to_x(zz), zz,
                                    grad_outputs=jx.reshape(c * self.m, *x.shape[1:]))
        jt = torch.nan_to_num(jz.reshape(c, self.m, d) / self.noise[None, :, None])
        r = (pred - self.y) / self.noise
        ok = torch.isfinite(r).all(1)
        r = torch.nan_to_num(r)
        value = torch.where(ok, -0.5 * (z * z).sum(1) - 0.5 * (r * r).sum(1), -math.inf)
        grad = -z - torch.einsum("cmd,cm->cd", jt, r)
        hess = torch.eye(d, dtype=F64) + torch.einsum("cmd,cme->cde", jt, jt)
        return x, value, grad, hess, torch.linalg.cholesky(hess)


def run(problem, rho, iterations, chains, seed):
    post = problem.case().posterior(problem.case().finest)
    ref = reference(problem)
    gen = torch.Generator().manual_seed(seed)
    laplace = fit_laplace(post, generator=gen)
    target = GaussNewton(post)
    u = torch.randn((chains, laplace.transport.dim), generator=gen, dtype=F64)
    z = target.w.to_z(laplace.transport.to_x(u)[0]).detach()
    state = target(z)

    def mean(z, grad, chol):
        return z + (1 - rho) * torch.cholesky_solve(grad[..., None], chol)[..., 0]

    def log_q(to, z, grad, hess, chol):
        e = to - mean(z, grad, chol)
        quad = torch.einsum("cd,cde,ce->c", e, hess, e) / (1 - rho ** 2)
        return -0.5 * quad + torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)

    draws, accepted, begin = [], [], time.perf_counter()
    for _ in range(iterations):
        x, value, grad, hess, chol = state
        xi = torch.randn(z.shape, generator=gen, dtype=F64)
        step = torch.linalg.solve_triangular(chol.transpose(1, 2), xi[..., None], upper=True)
        zn = mean(z, grad, chol) + math.sqrt(1 - rho ** 2) * step[..., 0]
        new = target(zn)
        ratio = new[1] - value + log_q(z, zn, *new[2:]) - log_q(zn, z, grad, hess, chol)
        flags = torch.log(torch.rand(chains, generator=gen, dtype=F64)) < \
            torch.nan_to_num(ratio, nan=-math.inf)
        accepted.append(float(flags.double().mean()))
        z = torch.where(flags[:, None], zn, z)
        state = tuple(torch.where(flags.reshape(-1, *[1] * (a.ndim - 1)), b, a)
                      for a, b in zip(state, new))
        draws.append((state[0].numpy().copy(), state[1].numpy().copy()))
    keep = np.stack([d[0] for d in draws[iterations // 4:]], 1)
    lp = np.stack([d[1] for d in draws[iterations // 4:]], 1)
    d = _convergence(keep, lp)
    s = scores(ref, keep.reshape(-1, *keep.shape[2:]))
    return {"problem": problem.name, "rho": rho, "iterations": iterations, "chains": chains,
            "nfs": int(target.nfs + laplace.nfs), "solves_per_proposal": 1 + target.m,
            "acceptance": float(np.mean(accepted)), "rhat": d["rhat"],
            "ess": d["ess"], "mean_error_rms": s["mean_error_rms"],
            "std_error_rms": s["std_error_rms"], "wall_s": time.perf_counter() - begin}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problem")
    p.add_argument("--rho", default="0,0.8,0.95")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--check", default="linear-matern-16",
                   help="a linear problem run at rho = 0 (every proposal is accepted)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rows = [run(by_name(args.check), 0.0, 100, args.chains, args.seed)]
    print(json.dumps(rows[-1]), flush=True)
    for rho in map(float, args.rho.split(",")):
        rows.append(run(by_name(args.problem), rho, args.iterations, args.chains, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    command = "benchmarks/suite/stochastic_newton.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stochastic_newton.json").write_text(json.dumps(
        {"command": command, "rows": rows}, indent=1))
    lines = ["# Stochastic-Newton MCMC with the local Gauss-Newton Hessian", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {command}`", "",
             "8 chains from Laplace draws; statistics of the last three quarters of the "
             "draws; errors in reference-std units, RMS over cells; nFS includes the Laplace "
             "fit. The first row checks the sampler on a linear problem.", "",
             "| problem | rho | iterations | solves / proposal | nFS | acceptance | R-hat | "
             "ESS | mean err | std err |", "| --- | --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- |"]
    lines += [f"| {r['problem']} | {r['rho']:g} | {r['iterations']} | "
              f"{r['solves_per_proposal']} | {r['nfs']} | {r['acceptance']:.3f} | "
              f"{r['rhat']:.3g} | {r['ess']:.0f} | {r['mean_error_rms']:.3f} | "
              f"{r['std_error_rms']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (RESULTS / "stochastic_newton.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
