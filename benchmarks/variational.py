"""The variational families at equal training nFS: IAF, mean-field Gaussian and the MsIGN.

On three suite problems (linear-Gaussian 16x16, the quadratic test bed at the paper's noise
ratio, the elliptic demo; exact posteriors or long-run references, benchmarks/suite/), every
family is trained with the same number of forward solves as the default MsIGN training of that
problem, and *not corrected* (``sampler.correction: none``), so that the table compares the
approximations themselves: the ELBO (against the unnormalised posterior, higher is better; the
families share the target, so differences are differences of KL(q || p)), the importance
diagnostics of their draws (PSIS k-hat, ESS fraction), the posterior mean and std errors of
their draws in reference-std units, the mass of t > 0 on the bimodal problem, the training wall
time, and the cost of the density of *given* fields (what the forward-KL half of the Jeffreys
objective and the correction's independence moves need): an IAF inverts d sequential passes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/variational.py [--problems a,b]

Writes benchmarks/results/variational.json and variational.md.
"""

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "suite"))

from problems import ROOT, by_name, reference, scores  # noqa: E402

import geoinvert  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROBLEMS = ("linear-matern-16", "quadratic-a-paper", "elliptic-demo")
FAMILIES = ("msign", "iaf", "meanfield")


def _config(problem, family, nfs=None):
    config = json.loads(json.dumps(problem.config))
    config["output"] = {**config.get("output", {}), "samples": 2000, "figures": False}
    sampler = {k: v for k, v in config.get("sampler", {}).items() if k == "seed"}
    if family == "msign":
        config["sampler"] = {**config.get("sampler", {}), "correction": "none"}
    else:
        batch = 64
        sampler.update(kind=family, batch=batch, steps=max(1, nfs // batch), lr=5e-3,
                       correction="none")
        if family == "iaf":
            sampler["blocks"] = 4
        config["sampler"] = sampler
    return config


def _density_seconds(model, x):
    """Seconds of log_prob at 100 given fields, and of 100 draws with their density."""
    x = torch.as_tensor(x[:100])
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        start = time.perf_counter()
        model.log_prob(x.to(dtype))
        given = time.perf_counter() - start
        start = time.perf_counter()
        model.sample(100)
        own = time.perf_counter() - start
    return given, own


def run_family(problem, ref, family, nfs, outdir):
    config = _config(problem, family, nfs)
    start = time.perf_counter()
    result = geoinvert.run(config, out=Path(outdir) / f"{problem.name}-{family}.nc",
                           progress=False)
    wall = time.perf_counter() - start
    ds, a = result.dataset, result.dataset.attrs
    log_w = ds["log_target"].values - ds["log_prob"].values
    given, own = _density_seconds(result.model, ds["samples"].values)
    row = {"problem": problem.name, "family": family, "nfs": int(a["nfs"]), "wall_s": wall,
           "elbo": float(np.mean(log_w[np.isfinite(log_w)])),
           "psis_khat": float(a["diagnostics_psis_khat"]),
           "is_ess": float(a["diagnostics_is_ess"]), "density_given_s": given,
           "sample_with_density_s": own, **scores(ref, ds["samples"].values)}
    print(f"{problem.name:18s} {family:9s} nFS {row['nfs']:7d} ELBO {row['elbo']:9.3f} "
          f"k-hat {row['psis_khat']:5.2f} mean {row['mean_error_rms']:.3f} std "
          f"{row['std_error_rms']:.3f} wall {wall:5.0f} s", flush=True)
    return row


def markdown(rows, command):
    lines = ["# Variational families at equal training nFS (uncorrected draws)", "",
             f"Command: `{command}`", "",
             "ELBO: mean of log p~ - log q over the family's 2000 draws (higher is better); "
             "errors of the draws in reference-std units (RMS over cells); density: seconds "
             "for log q at 100 given fields / for 100 draws with their density.", "",
             "| problem | family | nFS | wall (s) | ELBO | k-hat | IS ESS | mean err | std err "
             "| t > 0 | density given / own (s) |", "| --- " * 11 + "|"]
    for r in rows:
        modes = f"{100 * r['t_positive']:.1f} %" if "t_positive" in r else "-"
        lines.append(f"| {r['problem']} | {r['family']} | {r['nfs']} | {r['wall_s']:.0f} | "
                     f"{r['elbo']:.3f} | {r['psis_khat']:.2f} | {100 * r['is_ess']:.1f} % | "
                     f"{r['mean_error_rms']:.3f} | {r['std_error_rms']:.3f} | {modes} | "
                     f"{r['density_given_s']:.3f} / {r['sample_with_density_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default=",".join(PROBLEMS))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems.split(","):
            problem = by_name(name)
            ref = reference(problem)
            base = run_family(problem, ref, "msign", None, tmp)
            training = base["nfs"] - 2000            # the final draws are not training
            rows.append(base)
            for family in FAMILIES[1:]:
                rows.append(run_family(problem, ref, family, training, tmp))
    RESULTS.mkdir(exist_ok=True)
    about = {"machine": platform.machine(), "python": platform.python_version(),
             "torch": torch.__version__}
    (RESULTS / "variational.json").write_text(json.dumps({"about": about, "rows": rows},
                                                         indent=1))
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/variational.py"
    (RESULTS / "variational.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
