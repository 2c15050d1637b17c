"""The correction's stopping rules replayed on the same chains: whole blocks against the
extrapolated extension.

Usage (problems and seeds; each chain set runs to ``--max-draws`` draws per chain)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/stopping.py \
        elliptic-demo,elliptic-iid-8-heads,heldout-neumann-8 --seeds 0,1,2

For every problem and seed the correction (:func:`geoinvert.inference.correction.correct`)
runs once, as in ``correction_trace.py``: HMC in the coordinates of the problem's Laplace fit,
from Laplace draws, the package's warm-up, no independence moves, to ``--max-draws`` draws per
chain. A stopping rule only decides where the chains stop, so both rules are replayed on the
stored chains:

- *blocks* (the earlier rule): look after every block of ``draws`` (250) draws per chain;
- *extend* (the package's): look after the first block, then after as many draws as
  :func:`geoinvert.diagnostics.further_draws` asks.

The same replay on stationary AR(1) chains (``--phis``) shows how the rules compare when the
draws needed fall anywhere in a block, not near its end.

Each stops at the first look where R-hat <= 1.01 and the bulk and tail ESS >= 400 (the
package's ``_convergence`` of the prefix), or at ``--max-draws``. The solves to that point are
the warm-up's plus the draws' (every draw costs the same leapfrog steps after warm-up); the
errors of the stopped prefix are against the suite reference.

Writes ``benchmarks/results/stopping.json`` and ``.md``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name, reference, scores  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.diagnostics import ESS_TARGET, RHAT_MAX, further_draws  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference.correction import correct  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def chains(problem, seed, max_draws):
    """``(chains, warm-up solves, solves per draw, leapfrog)`` of one correction run to
    ``max_draws`` draws per chain: the warm-up's solves include the Laplace fit's, a draw's
    are those of all chains."""
    case = problem.case()
    posterior = case.posterior(case.finest)
    gen = torch.Generator().manual_seed(seed)
    laplace = fit_laplace(posterior, generator=gen)
    config = CorrectionConfig(kernel="hmc", max_draws=max_draws, independence=False)
    u = torch.randn((config.chains, laplace.transport.dim), generator=gen, dtype=torch.float64)
    starts, _ = laplace.transport.to_x(u)
    looks = []

    def record(samples, log_target, nfs):
        looks.append((samples.shape[1], nfs))
        return config.draws

    res = correct(posterior, laplace.transport, starts, config, generator=gen, extend=record)
    (n1, nfs1), (n2, nfs2) = looks[0], looks[1]
    per_draw = (nfs2 - nfs1) / (n2 - n1)
    return res.chains, nfs1 - n1 * per_draw + laplace.nfs, per_draw, res.leapfrog


def replay(samples, log_prob, rule, draws, most):
    """``(stop, looks)``: the draws per chain at which ``rule`` stops, and its looks."""
    done, looks = draws, 0
    while True:
        looks += 1
        d = _convergence(samples[:, :done], log_prob[:, :done])
        ess = min(d["ess"], d["ess_tail"])
        if (d["rhat"] <= RHAT_MAX and ess >= ESS_TARGET) or done >= most:
            return done, looks
        more = draws if rule == "blocks" else further_draws(done, d["rhat"], ess, most=draws)
        done = min(done + more, most)


def ar1_chains(phi, seed, max_draws, chains=8, shape=(8, 8)):
    """Stationary AR(1) chains with coefficient ``phi`` in every cell and in the log target:
    ``(samples (chains, max_draws, *shape), log_prob (chains, max_draws))``."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((chains, max_draws, int(np.prod(shape)) + 1))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, max_draws):
        x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi * phi) * e[:, t]
    return x[:, :, :-1].reshape(chains, max_draws, *shape), x[:, :, -1]


def synthetic(phis, seeds, max_draws):
    """Mean draws per chain at which each rule stops on AR(1) chains, by ``phi``: how the
    rules compare when the draws needed fall anywhere in a block."""
    rows = []
    for phi in phis:
        stops = {"blocks": [], "extend": []}
        for seed in seeds:
            samples, log_prob = ar1_chains(phi, seed, max_draws)
            for rule in stops:
                stops[rule].append(replay(samples, log_prob, rule, CorrectionConfig.draws,
                                          max_draws)[0])
        rows.append({"phi": phi, "seeds": len(seeds),
                     **{rule: float(np.mean(v)) for rule, v in stops.items()},
                     **{f"{rule}_se": float(np.std(v) / np.sqrt(len(v)))
                        for rule, v in stops.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure(problem, seed, max_draws):
    ref = reference(problem)
    result, warmup_nfs, per_draw, leapfrog = chains(problem, seed, max_draws)
    out = {"problem": problem.name, "seed": seed, "chains": int(result.samples.shape[0]),
           "leapfrog": leapfrog,
           "warmup_nfs": int(warmup_nfs), "nfs_per_draw": per_draw}
    for rule in ("blocks", "extend"):
        stop, looks = replay(result.samples, result.log_prob, rule, CorrectionConfig.draws,
                             max_draws)
        d = _convergence(result.samples[:, :stop], result.log_prob[:, :stop])
        s = scores(ref, result.samples[:, :stop].reshape(-1, *result.samples.shape[2:]))
        out[rule] = {"draws": stop, "looks": looks, "nfs": int(warmup_nfs + stop * per_draw),
                     "rhat": d["rhat"], "ess": min(d["ess"], d["ess_tail"]),
                     "converged": bool(d["rhat"] <= RHAT_MAX
                                       and min(d["ess"], d["ess_tail"]) >= ESS_TARGET),
                     "mean_error_rms": s["mean_error_rms"], "std_error_rms": s["std_error_rms"]}
    print(json.dumps(out), flush=True)
    return out


def markdown(rows, command, synthetic_rows=()):
    lines = ["# Stopping rules replayed on the same chains", "", f"Command: `{command}`", "",
             "HMC in the Laplace coordinates from Laplace draws "
             f"({', '.join(sorted({str(r['chains']) for r in rows}))} chains, "
             "the package's warm-up, "
             "no independence moves); both rules replayed on the stored chains. *blocks*: look "
             "every 250 draws per chain; *extend*: the package's extrapolation "
             "(`diagnostics.further_draws`). Solves include the Laplace fit and the warm-up; "
             "errors in reference-std units, RMS over cells.", "",
             "| problem | seed | leapfrog | rule | draws | looks | nFS | R-hat | ESS | mean err "
             "| std err |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for rule in ("blocks", "extend"):
            x = r[rule]
            flag = "" if x["converged"] else " (not converged)"
            lines.append(f"| {r['problem']} | {r['seed']} | {r['leapfrog']} | {rule} | "
                         f"{x['draws']}{flag} | {x['looks']} | {x['nfs']} | {x['rhat']:.4f} | "
                         f"{x['ess']:.0f} | {x['mean_error_rms']:.3f} | "
                         f"{x['std_error_rms']:.3f} |")
    saved = [r["blocks"]["nfs"] - r["extend"]["nfs"] for r in rows]
    lines += ["", f"Solves saved by *extend* over *blocks*: mean {np.mean(saved):,.0f}, "
              f"from {min(saved):,} to {max(saved):,} over {len(rows)} chain sets."]
    if synthetic_rows:
        lines += ["", "Stationary AR(1) chains (8 chains, 64 cells and a log target, all with "
                  "coefficient phi): mean draws per chain at the stop, +/- its standard error.",
                  "", "| phi | seeds | blocks | extend |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['phi']} | {r['seeds']} | {r['blocks']:.0f} +/- {r['blocks_se']:.0f} | "
                  f"{r['extend']:.0f} +/- {r['extend_se']:.0f} |" for r in synthetic_rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problems")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-draws", type=int, default=1000)
    p.add_argument("--phis", default="0.2,0.35,0.45,0.55,0.65",
                   help="AR(1) coefficients of the synthetic chains")
    p.add_argument("--synthetic-seeds", type=int, default=40)
    args = p.parse_args(argv)
    rows = [measure(by_name(name), int(seed), args.max_draws)
            for name in args.problems.split(",") for seed in args.seeds.split(",")]
    synthetic_rows = synthetic([float(v) for v in args.phis.split(",")],
                               range(args.synthetic_seeds), args.max_draws)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/stopping.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stopping.json").write_text(json.dumps(
        {"command": command, "rows": rows, "synthetic": synthetic_rows}, indent=1))
    text = markdown(rows, command, synthetic_rows)
    (RESULTS / "stopping.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
