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
run at all.

Writes ``benchmarks/results/pilot.json`` and ``.md``.
"""

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name  # noqa: E402

from geoinvert.inference import correction  # noqa: E402
from geoinvert.inference.config import LIFTED_BREAKEVEN, CorrectionConfig  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402

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
    phase = int(0.15 * config.warmup)
    return {"problem": name, "parameters": laplace.transport.dim, "observations":
            int(posterior.n_obs), "step_phase": steps[phase - 1], "warmed_up": res.leapfrog,
            "nfs": int(res.chains.nfs + laplace.nfs)}


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
             "<= parameters, the serial solver or a torch model, no budget).", "",
             "| problem | parameters | observations | steps, end of first step phase | "
             "steps after warm-up | solves |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['problem']} | {r['parameters']} | {r['observations']} | {r['step_phase']}"
              f" | {r['warmed_up']} | {r['nfs']:,} |" for r in rows]
    (RESULTS / "pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
