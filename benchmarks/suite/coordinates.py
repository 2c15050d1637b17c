"""The correction's coordinates: the trained flow's latent space against the Laplace map.

Usage (one problem after another; long: run it in the background with a log)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/coordinates.py \
        --problems elliptic-iid-16,quadratic-a-sharp,elliptic-demo

For each suite problem the default flow is trained once (``geoinvert.run`` with the
correction off); then the default correction runs twice from the same eight flow draws, with
the same settings and seed, once with its local moves in the flow's latent space
(``coordinates: flow``, NeuTra) and once in the coordinates of the Laplace fit at the MAP
point (``coordinates: laplace``), the flow and the Laplace fits at the modes proposing the
independence moves in both. Both stop at the package's convergence rule (R-hat <= 1.01 and
bulk and tail ESS >= 400, or ``max_draws``). Reported per run: the correction's solves (the
mode search included), R-hat, ESS, ESS per 1000 solves, acceptance, leapfrog steps, wall time
and the mean and std errors against the problem's reference.

Writes ``benchmarks/results/coordinates.json`` and ``coordinates.md``.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name, reference, scores  # noqa: E402

import geoinvert  # noqa: E402
from geoinvert.app import _convergence  # noqa: E402
from geoinvert.diagnostics import further_draws  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference.correction import FlowTransport, correct  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _extend(samples, log_target, nfs):
    """The package's rule: the draws R-hat and ESS extrapolate to need, a block at most."""
    d = _convergence(samples, log_target)
    return further_draws(samples.shape[1], d["rhat"], min(d["ess"], d["ess_tail"]),
                         most=CorrectionConfig.draws)


def compare(name, seed=0):
    problem = by_name(name)
    ref = reference(problem)
    config = json.loads(json.dumps(problem.config))
    config["sampler"] = {"correction": "none"}
    config["output"] = {"samples": 64, "figures": False}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = geoinvert.run(config, out=Path(tmp) / "flow.nc", progress=False, seed=seed)
        train_wall = time.perf_counter() - start
    ds, case = result.dataset, geoinvert.load_case(config)
    posterior = case.posterior(case.finest)
    finite = np.flatnonzero(np.isfinite(ds["log_target"].values))
    chains = CorrectionConfig().chains
    starts = torch.from_numpy(ds["samples"].values[finite[:chains]])
    flow = FlowTransport(result.model)
    start = time.perf_counter()
    laplace = fit_laplace(posterior, all_modes=True,
                          generator=torch.Generator().manual_seed(seed + 31))
    search_wall = time.perf_counter() - start
    rows = []
    for coordinates in ("flow", "laplace"):
        transport = flow if coordinates == "flow" else laplace.transport
        start = time.perf_counter()
        res = correct(posterior, transport, starts, CorrectionConfig(coordinates=coordinates),
                      generator=torch.Generator().manual_seed(seed + 7), modes=laplace.modes,
                      extend=_extend, approximation=flow)
        wall = time.perf_counter() - start + search_wall
        c = res.chains
        d = _convergence(c.samples, c.log_prob)
        nfs = int(c.nfs) + laplace.nfs
        rows.append({"problem": name, "coordinates": coordinates, "correction_nfs": nfs,
                     "training_nfs": int(ds.attrs["nfs"]), "training_wall_s": train_wall,
                     "flow_khat": float(ds.attrs["diagnostics_psis_khat"]),
                     "rhat": d["rhat"], "ess": d["ess"], "ess_tail": d["ess_tail"],
                     "ess_per_1000_nfs": 1000 * min(d["ess"], d["ess_tail"]) / nfs,
                     "acceptance": float(c.acceptance.mean()),
                     "independence_acceptance": float(np.nanmean(res.independence_acceptance)),
                     "leapfrog": res.leapfrog, "step": float(c.step_size),
                     "draws": int(c.samples.shape[1]), "wall_s": wall,
                     **scores(ref, c.samples.reshape(-1, *c.samples.shape[2:]))})
        print("  " + json.dumps({k: rows[-1][k] for k in ("problem", "coordinates",
                                                          "correction_nfs", "rhat", "ess",
                                                          "mean_error_rms",
                                                          "std_error_rms")}), flush=True)
    return rows


def markdown(rows):
    lines = ["# The correction's coordinates: flow latent space against the Laplace map", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/coordinates.py`", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads. Same trained "
             "flow, starts, settings and seed for both; solves of the correction and of the "
             "mode search; errors in reference-std units (RMS over cells).", "",
             "| problem | flow k-hat | coordinates | solves | draws / chain | R-hat | ESS bulk / "
             "tail | ESS / 1000 solves | leapfrog | acceptance (local / independence) | mean "
             "err | std err | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['flow_khat']:.2f} | {r['coordinates']} | "
                     f"{r['correction_nfs']} | {r['draws']} | {r['rhat']:.3f} | "
                     f"{r['ess']:.0f} / {r['ess_tail']:.0f} | {r['ess_per_1000_nfs']:.2f} | "
                     f"{r['leapfrog']} | {r['acceptance']:.2f} / "
                     f"{r['independence_acceptance']:.2f} | {r['mean_error_rms']:.3f} | "
                     f"{r['std_error_rms']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="elliptic-iid-16,quadratic-a-sharp,elliptic-demo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for name in args.problems.split(","):
        print(f"{name} ...", flush=True)
        rows += compare(name, args.seed)
        (RESULTS / "coordinates.json").write_text(json.dumps({"rows": rows}, indent=1))
        (RESULTS / "coordinates.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
