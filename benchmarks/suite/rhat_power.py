"""R-hat's power against a stuck chain, with 4 chains against 8.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/rhat_power.py

A chain that stays away from the others (a metastable region, a mode it has not left) is
what R-hat is there to catch. With m chains, one of them offset by delta (in posterior standard
deviations) raises R-hat^2 - 1 by about delta^2 / m: fewer chains make a given offset more
visible, and the offset that gets through biases the pooled mean by delta / m.

Measured on stationary AR(1) chains (``stopping.ar1_chains``: 64 cells and a log target, all
with coefficient ``--phi``; 0.67 gives an ESS of about a fifth of the draws, as the demo's
correction has), one chain offset by delta in one cell (the hardest case for the largest
R-hat over 65 summaries), stopped by the package's rule (``stopping.replay``: the first block
of 250 draws per chain, then as many as ``diagnostics.further_draws`` asks, at most 2000). For
each number of chains and delta: how many runs end flagged (R-hat > 1.01 or an ESS < 400 at
the cap), the mean draws per chain at the stop, and, over the runs that pass, the error of the
pooled mean of the offset cell (its truth is 0).

Writes ``benchmarks/results/rhat_power.json`` and ``.md``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT  # noqa: E402
from stopping import ar1_chains, replay  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.diagnostics import ESS_TARGET, RHAT_MAX  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run(chains, delta, phi, seed, most):
    """``(stop, flagged, error)``: where the rule stops m = ``chains`` AR(1) chains, one of them
    offset by ``delta`` in cell (0, 0), whether the verdict flags them, and the pooled mean of
    that cell at the stop."""
    samples, log_prob = ar1_chains(phi, 1000 * chains + seed, most, chains=chains)
    samples[0, :, 0, 0] += delta
    stop, _ = replay(samples, log_prob, "extend", CorrectionConfig.draws, most)
    d = _convergence(samples[:, :stop], log_prob[:, :stop])
    flagged = not (d["rhat"] <= RHAT_MAX and min(d["ess"], d["ess_tail"]) >= ESS_TARGET)
    return stop, flagged, float(samples[:, :stop, 0, 0].mean())


def measure(chain_counts, deltas, phi, seeds, most):
    rows = []
    for delta in deltas:
        for m in chain_counts:
            runs = [run(m, delta, phi, seed, most) for seed in seeds]
            passed = [abs(e) for _, f, e in runs if not f]
            rows.append({"delta": delta, "chains": m, "runs": len(runs),
                         "flagged": sum(f for _, f, _ in runs),
                         "draws": float(np.mean([s for s, _, _ in runs])),
                         "error_mean": float(np.mean(passed)) if passed else None,
                         "error_max": float(np.max(passed)) if passed else None})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows, command, phi, most):
    lines = ["# R-hat's power against a stuck chain", "", f"Command: `{command}`", "",
             f"Stationary AR(1) chains (phi {phi}, 64 cells and a log target), one chain offset "
             "by delta posterior std in one cell, stopped by the package's rule (R-hat <= 1.01 "
             f"and bulk and tail ESS >= 400, at most {most} draws per chain). *flagged*: runs "
             "whose verdict warns; *draws*: mean draws per chain at the stop; *error*: |pooled "
             "mean| of the offset cell over the runs that pass (truth 0), in std.", "",
             "| delta | chains | flagged | draws per chain | draws in all | error (mean / max) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        error = ("-" if r["error_mean"] is None
                 else f"{r['error_mean']:.3f} / {r['error_max']:.3f}")
        lines.append(f"| {r['delta']} | {r['chains']} | {r['flagged']} of {r['runs']} | "
                     f"{r['draws']:.0f} | {r['draws'] * r['chains']:.0f} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains", default="4,8")
    p.add_argument("--deltas", default="0,0.2,0.3,0.4,0.6")
    p.add_argument("--phi", type=float, default=0.67)
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--max-draws", type=int, default=CorrectionConfig.max_draws)
    args = p.parse_args(argv)
    rows = measure([int(v) for v in args.chains.split(",")],
                   [float(v) for v in args.deltas.split(",")], args.phi, range(args.seeds),
                   args.max_draws)
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/rhat_power.py " + " ".join(
        argv if argv is not None else sys.argv[1:])).strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rhat_power.json").write_text(json.dumps(
        {"command": command, "phi": args.phi, "rows": rows}, indent=1))
    text = markdown(rows, command, args.phi, args.max_draws)
    (RESULTS / "rhat_power.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
