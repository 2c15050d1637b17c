"""Constrained HMC on the lifted data manifold: a kernel whose metric follows the ridge.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/lifted.py elliptic-demo

In the prior's whitened coordinates z (x = mu + C z, z ~ N(0, I)) with residuals
r(z) = (F(x) - y) / noise, the posterior is N(z; 0, I) exp(-|r(z)|^2 / 2). Lift it to
q = (z, eta) in R^(d + m) and restrict N(q; 0, I) to the manifold

    M = {q : c(q) = r(z) + eta = 0},

the graph of -r. By the co-area formula the density of q on M with respect to its surface
measure, N(q; 0, I) det(G(q))^(-1/2) with G = Dc Dc^T = I + J J^T (J = dr/dz), has the
posterior as its z-marginal: the surface element det(I + J^T J)^(1/2) dz cancels the factor.
The metric M induces on z is I + J^T J, the Gauss-Newton Hessian, so Hamiltonian dynamics on M
follow the ridge's curvature without the metric's derivatives (Au, Graham and Thiery, "Manifold
lifting: scaling MCMC to the vanishing noise regime", JRSS B 2023; Brubaker, Salzmann and
Urtasun 2012 for constrained HMC).

The integrator is RATTLE for the potential |q|^2 / 2 + 1/2 log det G(q): a half kick and a
projection of the momentum onto the tangent space, a position step q' = q + h p - Dc(q)^T lambda
solved for c(q') = 0 by Newton's method (one forward solve, the Jacobian's rows and the
log-determinant's gradient per iteration), the momentum (q' - q) / h projected at q', a
reversibility check (the position step back from q' must return to q: Zappa, Holmes-Cerfon and
Goodman 2018; Lelievre, Rousset and Stoltz 2019), and a second half kick. The gradient of
1/2 log det G = tr(W^T J) with W = G^-1 J held fixed comes from second-order adjoints
(:meth:`~geoinvert.problem.forward.elliptic.EllipticForward.trace_gradient_batch`). Leaving it
out of the dynamics (``--no-force``; the Metropolis test still counts it, so the chain stays
exact) costs little where the data are few (nine heads) and ruins the acceptance with many
(169 heads: the term changes by several nats along a trajectory). A transition integrates for
a quarter period (pi / 2: the dynamics rotate with period 2 pi where M is flat) with a fresh
momentum; the step is adapted by dual averaging (target 0.8) in the warm-up. No metric is
estimated. 4 chains start from Laplace draws, as the correction's do; after every ``--block``
draws per chain the script records the solves so far (the Laplace fit's included), R-hat,
bulk and tail ESS (the package's stopping rule wants R-hat <= 1.01 and both ESS >= 400) and
the errors against the suite reference, and stops once the criteria hold.

Solves are counted as the package counts them: one per forward solve (each factorisation); the
adjoint, tangent-linear and second-order solves reuse its factorisation and are reported
separately (back-substitutions). For each problem and seed the script runs, from one Laplace fit
and the same 4 Laplace draws, the lifted kernel and the package's HMC correction alone
(``correction_trace.py --variants default``: HMC in the Laplace coordinates with its warm-up,
no independence moves), and reports the solves where each first meets the criteria.
``--no-baseline linear-matern-16`` checks the kernel on a linear problem (M is flat, the
posterior Gaussian and exact).

Writes ``benchmarks/results/lifted.json`` and ``.md`` (``--name`` for another name).
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

import correction_trace  # noqa: E402
from problems import ROOT, by_name, reference, scores  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402
from geoinvert.samplers.chains import DualAveraging  # noqa: E402
from geoinvert.samplers.whitening import prior_whitening  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
F64 = torch.float64
_INITIAL_STEP = 0.1
_LENGTH = math.pi / 2          # a quarter period: where M is flat the dynamics rotate by 2 pi


class Lifted:
    """The residual map r(z), its Jacobian and the manifold's projections, batched over chains."""

    def __init__(self, posterior):
        self.post = posterior
        w = prior_whitening(posterior.prior, posterior.level)
        d = 4 ** posterior.level
        with torch.no_grad():
            self.mu = w.to_x(torch.zeros(1, d, dtype=F64))[0].numpy()
            self.C = torch.autograd.functional.jacobian(
                lambda z: w.to_x(z[None])[0].reshape(-1), torch.zeros(d, dtype=F64)).numpy()
        self.shape, self.d = self.mu.shape, d
        self.y, self.noise = np.asarray(posterior.data, float), np.asarray(posterior.noise, float)
        self.m = self.y.size
        self.forward = posterior.forward
        self.nfs = self.adjoint = 0
        self.logdet_force = True

    def residual(self, z):
        """``(r (c, m), J (c, m, d), force (c, d + m))`` at ``z (c, d)``: the residuals, their
        Jacobian and the gradient of 1/2 log det G (zero unless ``logdet_force``); rows of
        non-finite solves are NaN."""
        c = z.shape[0]
        x = (self.mu.reshape(-1)[None] + z @ self.C.T).reshape(c, *self.shape)
        self.nfs += c
        if hasattr(self.forward, "solve_batch"):
            pred, state = self.forward.solve_batch(x)
            jac = self.forward.jacobian_batch(state).reshape(c, self.m, -1) @ self.C
        else:                                                # a torch model (the linear check)
            xt = torch.as_tensor(x)
            pred = self.forward(xt).detach().numpy()
            jac = np.stack([torch.autograd.functional.jacobian(
                lambda t: self.forward(t[None])[0], xt[i]).reshape(self.m, -1).numpy() @ self.C
                for i in range(c)])
        self.adjoint += c * self.m
        r = (pred - self.y) / self.noise
        jac /= self.noise[None, :, None]
        bad = ~np.all(np.isfinite(r), axis=1) | ~np.all(np.isfinite(jac), axis=(1, 2))
        r[bad], jac[bad] = np.nan, np.nan
        force = np.zeros((c, self.d + self.m))
        if self.logdet_force and hasattr(self.forward, "solve_batch"):
            # grad_z 1/2 log det G = grad_z tr(W^T J(z)), W = G^-1 J fixed: second-order adjoints
            # as sum_i a_i^T J_x b_i with the fewer of n_obs or d terms (J_x = dF/dx)
            w = np.linalg.solve(self.gram(np.nan_to_num(jac)), np.nan_to_num(jac))
            w /= self.noise[None, :, None]
            if self.m <= self.d:
                a = np.repeat(np.eye(self.m)[None], c, axis=0)
                b = w @ self.C.T
            else:
                a = w.transpose(0, 2, 1)
                b = np.repeat(self.C.T[None], c, axis=0)
            g = self.forward.trace_gradient_batch(state, a, b.reshape(c, -1, *self.shape))
            force[:, : self.d] = g.reshape(c, -1) @ self.C
            self.adjoint += c * (2 * a.shape[1] + 1)
        force[bad] = np.nan
        return r, jac, force

    def gram(self, jac):
        return np.eye(self.m)[None] + jac @ jac.transpose(0, 2, 1)

    def project(self, p, jac):
        """The momentum ``p (c, d + m)`` projected onto the tangent spaces (Dc = [J, I])."""
        d = self.d
        dcp = jac @ p[:, :d, None] + p[:, d:, None]
        lam = np.linalg.solve(self.gram(jac), dcp)[..., 0]
        out = p.copy()
        out[:, :d] -= (jac.transpose(0, 2, 1) @ lam[..., None])[..., 0]
        out[:, d:] -= lam
        return out

    def retract(self, q0, jac0, step, tol=1e-9, max_iter=40):
        """Solve c(q0 + step - Dc(q0)^T lam) = 0 by Newton's method for every chain.

        Returns ``(q (c, d + m), r, J, force, ok (c,))``; ``ok`` is False where it did not converge.
        """
        d, c = self.d, q0.shape[0]
        lam = np.zeros((c, self.m))
        q = q0 + step
        r = np.full((c, self.m), np.nan)
        jac = np.full((c, self.m, d), np.nan)
        force = np.full((c, d + self.m), np.nan)
        ok = np.zeros(c, bool)
        active = np.ones(c, bool)
        for _ in range(max_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            rk, jk, fk = self.residual(q[idx, :d])
            r[idx], jac[idx], force[idx] = rk, jk, fk
            con = rk + q[idx, d:]
            finite = np.all(np.isfinite(con), axis=1)
            done = finite & (np.abs(con).max(1) < tol)
            ok[idx[done]] = True
            active[idx[done | ~finite]] = False
            go = idx[finite & ~done]
            if go.size == 0:
                continue
            # Dc(q_k) Dc(q0)^T = J_k J0^T + I
            a = np.eye(self.m)[None] + jac[go] @ jac0[go].transpose(0, 2, 1)
            try:
                delta = np.linalg.solve(a, con[finite & ~done][..., None])[..., 0]
            except np.linalg.LinAlgError:
                active[go] = False
                continue
            lam[go] += delta
            q[go, :d] -= (jac0[go].transpose(0, 2, 1) @ delta[..., None])[..., 0]
            q[go, d:] -= delta
            if np.any(np.abs(lam[go]) > 1e8):
                blow = go[np.abs(lam[go]).max(1) > 1e8]
                active[blow] = False
        return q, r, jac, force, ok

    def energy(self, q, p, jac):
        sign, logdet = np.linalg.slogdet(self.gram(jac))
        return 0.5 * (q * q).sum(1) + 0.5 * logdet + 0.5 * (p * p).sum(1)


def transition(model, state, step, n_steps, gen):
    """One constrained HMC transition for every chain from ``state = (q, r, J, force)``;
    returns the new state, the acceptance probabilities and the number of chains whose
    trajectory failed (a Newton solve that did not converge or the reversibility check)."""
    q, r, jac, force = state
    c = q.shape[0]
    p = model.project(gen.standard_normal(q.shape), jac)
    h0 = model.energy(q, p, jac)
    q1, r1, j1, f1, p1 = q.copy(), r.copy(), jac.copy(), force.copy(), p.copy()
    alive = np.ones(c, bool)
    for _ in range(n_steps):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        qa, ja, pa = q1[idx], j1[idx], p1[idx]
        pa = model.project(pa - 0.5 * step * (qa + f1[idx]), ja)
        qn, rn, jn, fn, ok = model.retract(qa, ja, step * pa)
        jn, fn = np.nan_to_num(jn), np.nan_to_num(fn)
        pn = model.project(np.where(ok[:, None], (qn - qa) / step, 0.0), jn)
        # reversibility: the position step back from qn must return to qa
        qb, _, _, _, okb = model.retract(qn, jn, -step * pn)
        back = ok & okb & (np.abs(qb - qa).max(1) < 1e-7)
        pn = model.project(pn - 0.5 * step * (qn + fn), jn)
        alive[idx[~back]] = False
        keep = idx[back]
        q1[keep], r1[keep], j1[keep], f1[keep], p1[keep] = (qn[back], rn[back], jn[back],
                                                           fn[back], pn[back])
    h1 = np.where(alive, model.energy(q1, p1, j1), np.inf)
    accept = np.nan_to_num(np.exp(np.minimum(h0 - h1, 0.0)), nan=0.0)
    flags = gen.random(c) < accept
    new = tuple(a.copy() for a in state)
    for a, b in zip(new, (q1, r1, j1, f1)):
        a[flags] = b[flags]
    return new, accept, int((~alive).sum())


def _met(row):
    return row["rhat"] <= 1.01 and min(row["ess"], row["ess_tail"]) >= 400


def lifted(posterior, laplace, gen_state, ref, args):
    """The lifted kernel's block-by-block rows and its summary; 4 chains from the Laplace draws
    the package's correction would start from (the generator at ``gen_state``)."""
    gen_t = torch.Generator()
    gen_t.set_state(gen_state)
    chains, model = args.chains, Lifted(posterior)
    model.logdet_force = not args.no_force
    gen = np.random.default_rng(args.seed)
    u = torch.randn((chains, laplace.transport.dim), generator=gen_t, dtype=F64)
    x0 = laplace.transport.to_x(u)[0].detach().numpy().reshape(chains, -1)
    z = np.linalg.lstsq(model.C, (x0 - model.mu.reshape(-1)).T, rcond=None)[0].T
    r, jac, force = model.residual(z)
    state = (np.concatenate([z, -r], axis=1), r, jac, force)
    adapt = DualAveraging(_INITIAL_STEP, args.target)
    step, begin, rows, draws, logp, failed, accepts = _INITIAL_STEP, time.perf_counter(), \
        [], [], [], 0, []
    warm_nfs = 0
    for it in range(args.warmup + args.max_draws):
        h = step * gen.uniform(0.8, 1.2)                         # a jittered step
        n = min(max(1, math.ceil(_LENGTH / h)), args.max_leapfrog)
        state, acc, bad = transition(model, state, h, n, gen)
        failed += bad
        if it < args.warmup:
            adapt.update(float(acc.mean()))
            step = adapt.value if it < args.warmup - 1 else adapt.final()
            warm_nfs = model.nfs
            continue
        accepts.append(float(acc.mean()))
        q = state[0]
        draws.append((model.mu.reshape(-1)[None] + q[:, : model.d] @ model.C.T)
                     .reshape(chains, *model.shape))
        logp.append(-0.5 * (q * q).sum(1))         # log posterior up to a constant (eta = -r)
        k = it - args.warmup + 1
        if k % args.block == 0:
            samples = np.stack(draws, 1)
            diag = _convergence(samples, np.stack(logp, 1))
            sc = scores(ref, samples.reshape(-1, *model.shape))
            rows.append({"draws": k, "nfs": int(model.nfs + laplace.nfs),
                         "back_substitutions": int(model.adjoint),
                         "rhat": diag["rhat"], "ess": diag["ess"], "ess_tail": diag["ess_tail"],
                         "mean_error_rms": sc["mean_error_rms"],
                         "std_error_rms": sc["std_error_rms"],
                         "wall_s": time.perf_counter() - begin})
            print(json.dumps(rows[-1]), flush=True)
            if _met(rows[-1]):
                break
    return {"kernel": "lifted", "warmup": args.warmup, "warmup_nfs": int(warm_nfs + laplace.nfs),
            "step": step, "leapfrog": min(math.ceil(_LENGTH / step), args.max_leapfrog),
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
    p.add_argument("--merge", action="store_true",
                   help="PROBLEMS are results files of this script (runs split over processes): "
                   "write them as one set")
    args = p.parse_args(argv)
    command = "benchmarks/suite/lifted.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.problems]
        command = " and ".join(part["command"] for part in parts)
        results = [r for part in parts for r in part["results"]]
        args.warmup, args.block = parts[0]["warmup"], parts[0]["block"]
        return _write(results, args, command)
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
                res["hmc"] = correction_trace.trace(posterior, laplace, state, ref, {}, base)
            results.append(res)
    return _write(results, args, command)


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
