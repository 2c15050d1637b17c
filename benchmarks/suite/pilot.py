"""HMC's quarter period at the end of the correction's first step-only phase against after its
whole warm-up: the measurement the ``auto`` correction kernel chooses by.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/pilot.py elliptic-demo heldout-mixed-8

For each problem: the Laplace fit (seed 1), four Laplace draws as starts, and the package's HMC
correction (``kernel: hmc``, warm-up 250, no independence moves, four draws). The leapfrog steps
of every warm-up transition are recorded: those of the last transition of the first step-only
phase (iteration 37; ``auto`` compares the quarter period at the smoothed step there, about
these, with ``LIFTED_BREAKEVEN``) and after the warm-up (the draws' trajectories). Also the
parameters and observations, which with the forward model decide whether the lifted kernel can
run at all, and the wall time of a step's work at the starts for either kernel (the reason
for ``LIFTED_MAX_PARAMETERS``).

Writes ``benchmarks/results/pilot.json`` and ``.md``.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name  # noqa: E402

from geoinvert.inference import correction  # noqa: E402
from geoinvert.inference.config import LIFTED_BREAKEVEN, CorrectionConfig  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402
from geoinvert.samplers.lifted import LiftedManifold  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def measure(name, seed):
    """The warm-up's leapfrog steps per transition on problem ``name``."""
    case = by_name(name).case()
    posterior = case.posterior(case.finest)
    gen = torch.Generator().manual_seed(seed)
    laplace = fit_laplace(posterior, generator=gen)
    u = torch.randn((4, laplace.transport.dim), generator=gen, dtype=torch.float64)
    starts, _ = laplace.transport.to_x(u)
    steps, original = [], correction._warmup_leapfrog

    def recording(*args, **kw):
        steps.append(original(*args, **kw))
        return steps[-1]
    config = CorrectionConfig(kernel="hmc", draws=4, max_draws=4, independence=False)
    with mock.patch.object(correction, "_warmup_leapfrog", recording):
        res = correction.correct(posterior, laplace.transport, starts, config, generator=gen)
    phase = int(correction._STEP_PHASE * config.warmup)      # where auto chooses
    return {"problem": name, "parameters": laplace.transport.dim, "observations":
            int(posterior.n_obs), "step_phase": steps[phase - 1], "warmed_up": res.leapfrog,
            "nfs": int(res.chains.nfs + laplace.nfs), **point_costs(posterior, starts)}


def point_costs(posterior, x, repeats=3):
    """Wall time (ms) of what a step of each kernel does at the four fields ``x``: HMC's
    log posterior and its gradient (one solve and one adjoint each), and a Newton point of
    the lifted kernel (solves, the Jacobian in whitened coordinates; without and with the
    Gram determinant's force); None where the lifted kernel cannot run."""
    def timed(fn):
        fn()                                          # warm caches and imports
        begin = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - begin) / repeats

    def hmc():
        xt = x.detach().clone().requires_grad_(True)
        posterior.log_prob(xt).sum().backward()
    out = {"hmc_point_ms": timed(hmc), "lifted_point_ms": None, "lifted_force_ms": None}
    try:
        manifold = LiftedManifold(posterior)
    except NotImplementedError:
        return out
    z = manifold.to_z(x.detach().numpy())
    out["lifted_point_ms"] = timed(lambda: manifold.evaluate(
        z, wanted=lambda r: np.zeros(len(r), bool)))
    out["lifted_force_ms"] = timed(lambda: manifold.evaluate(z))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problems", nargs="+")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rows = []
    for name in args.problems:
        rows.append(measure(name, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/pilot.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pilot.json").write_text(json.dumps({"command": command, "rows": rows},
                                                   indent=1) + "\n")
    lines = ["# HMC's quarter period after the first step-only phase and after the warm-up", "",
             f"Command: `{command}`", "",
             "The package's HMC correction in the Laplace coordinates from four Laplace draws "
             f"(seed {args.seed}), warm-up 250: leapfrog steps of the last transition of the "
             "first step-only phase (iteration 37) and after the warm-up. The `auto` kernel "
             f"switches to `lifted` there when a quarter period takes more than "
             f"{LIFTED_BREAKEVEN} steps and the lifted kernel can run (one mode, observations "
             "<= parameters, at most 32x32 parameters, the serial solver or a torch model, no "
             "budget). The last columns: wall time of what a step does at the four starts, "
             "HMC's log posterior with its gradient, and a Newton point of the lifted kernel "
             "(solves and the Jacobian in whitened coordinates, then with the Gram "
             "determinant's force); '-' where it cannot run.", "",
             "| problem | parameters | observations | steps, end of first step phase | "
             "steps after warm-up | solves | HMC point ms | lifted point ms | with force ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"
    lines += [f"| {r['problem']} | {r['parameters']} | {r['observations']} | {r['step_phase']}"
              f" | {r['warmed_up']} | {r['nfs']:,} | {ms(r['hmc_point_ms'])} | "
              f"{ms(r['lifted_point_ms'])} | {ms(r['lifted_force_ms'])} |" for r in rows]
    (RESULTS / "pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
