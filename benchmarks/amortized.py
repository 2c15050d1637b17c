"""Amortized inversion against the exact posterior as the number of simulations grows.

Two test beds with exact posteriors for every data set: linear-Gaussian (8x8 Matern prior,
two integral observations, noise 0.05) and quadratic (8x8, y = <phi, x>^2 + e, noise 0.05:
two modes); and the elliptic demo (8x8, nine heads, noise 0.005), where the one data set with
a reference is the case's own, compared with the suite's long-run reference of its posterior
(``benchmarks/suite/references/elliptic-demo.nc``, made by the corrected sampler; SBC and
TARP need no exact posterior and run over 200 simulated data sets). On each, three networks
are trained on the same N simulations for N in ``--sizes`` with the same epochs: the conditional MsIGN (default), the single-loss joint flow
of Xiao, Yan and Amit, and the multi-loss INN of Ardizzone et al. (the comparison that paper
makes). For 20 data sets they never saw, the RMS over cells of the posterior mean and std
errors of 2000 draws (in exact-posterior std units) are averaged, and SBC and TARP are computed
over 200 unseen data sets (``geoinvert.app.calibrate``'s checks). The time to draw 1000
samples for a new data set is measured at 8x8 and, with untrained networks of the same
architectures, at 32x32.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortized.py [--sizes 1000,4000,16000]

Writes benchmarks/results/amortized.json (rows of the beds run replace theirs) and
amortized.md.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geoinvert.case import load_case  # noqa: E402
from geoinvert.diagnostics import rank_uniformity, sbc_ranks, tarp_coverage  # noqa: E402
from geoinvert.flows.msign import MsIGN  # noqa: E402
from geoinvert.inference.amortized import AmortizedPosterior, train_amortized  # noqa: E402
from geoinvert.inference.joint import JointFlow  # noqa: E402
from geoinvert.problem.forward.testbeds import (ExactLinearPosterior,  # noqa: E402
                                                ExactQuadraticPosterior)
from geoinvert.simulate import simulate  # noqa: E402
from geoinvert.testing import small_case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NOISE = 0.05
BEDS = ("linear", "quadratic", "elliptic")
REFERENCE = ROOT / "benchmarks" / "suite" / "references" / "elliptic-demo.nc"
METHODS = ("msign", "joint", "inn")


def _case(level=3, bed="linear"):
    if bed == "elliptic":
        import yaml
        config = yaml.safe_load((ROOT / "cases" / "default.yaml").read_text())
        config.pop("sampler")
        config["output"] = {"samples": 300, "figures": False}
        return load_case(config, folder=ROOT / "cases")
    config = small_case()
    config["levels"] = {"finest": level}
    config["noise"] = {"std": NOISE}
    if bed == "quadratic":
        config["forward"] = {"kind": "quadratic"}
        config["observations"] = {"functions": [config["observations"]["functions"][0]]}
    return load_case(config)


class _Moments:
    """Mean and std ``(d,)`` of an exact posterior: closed form, or from 20000 exact draws."""

    def __init__(self, exact):
        if isinstance(exact, ExactLinearPosterior):
            self.mean, self.sd = exact.mean, np.sqrt(np.diag(exact.cov))
        else:
            x = exact.sample(20000, torch.Generator().manual_seed(5)).reshape(20000, -1).numpy()
            self.mean, self.sd = x.mean(0), x.std(0)


class _Reference:
    """The suite's long-run reference of the demo's posterior, as :class:`_Moments`."""

    def __init__(self):
        import xarray as xr
        with xr.open_dataset(REFERENCE) as ds:
            x = ds["samples"].values.reshape(ds.sizes["sample"], -1).astype(float)
        self.mean, self.sd = x.mean(0), x.std(0)


def _noise(case):
    return float(np.asarray(case.noise).ravel()[0])


def _data_set(case, seed):
    if case.config["forward"]["kind"] == "elliptic":
        return _elliptic_set(case, seed)
    prior, forward = case.prior(), case.forward(case.finest)
    x = prior.sample(1, case.finest, generator=torch.Generator().manual_seed(10_000 + seed))
    e = NOISE * torch.randn(forward.n_obs, generator=torch.Generator().manual_seed(20_000 + seed),
                            dtype=torch.float64)
    with torch.no_grad():
        y = (forward(x)[0] + e).numpy()
    mean, cov = prior.mean(case.finest).ravel(), prior.covariance(case.finest)
    if case.config["forward"]["kind"] == "quadratic":
        exact = ExactQuadraticPosterior(mean, cov, forward.functional, y, NOISE)
    else:
        exact = ExactLinearPosterior(mean, cov, forward.matrix, y, NOISE)
    return x[0].numpy(), y, exact


def _elliptic_set(case, seed):
    """A simulated (truth, data) pair of the elliptic case (no exact posterior: None)."""
    prior, forward = case.prior(), case.forward(case.finest)
    x = prior.sample(1, case.finest, generator=torch.Generator().manual_seed(10_000 + seed))
    e = _noise(case) * torch.randn(forward.n_obs, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(20_000 + seed))
    with torch.no_grad():
        y = (forward(x.double())[0] + e).numpy()
    return x[0].numpy(), y, None


def _errors(post, case, sets=20):
    if case.config["forward"]["kind"] == "elliptic":
        ref = _Reference()          # the case's own data, against the long-run reference
        x = post.sample(2000, case.data, generator=torch.Generator().manual_seed(0))[0]
        x = x.reshape(2000, -1).numpy()
        return (float(np.sqrt(np.mean(((x.mean(0) - ref.mean) / ref.sd) ** 2))),
                float(np.sqrt(np.mean((x.std(0) / ref.sd - 1) ** 2))))
    means, stds = [], []
    for k in range(sets):
        _, y, exact = _data_set(case, k)
        x = post.sample(2000, y, generator=torch.Generator().manual_seed(k))[0]
        x = x.reshape(2000, -1).numpy()
        m = _Moments(exact)
        means.append(np.sqrt(np.mean(((x.mean(0) - m.mean) / m.sd) ** 2)))
        stds.append(np.sqrt(np.mean((x.std(0) / m.sd - 1) ** 2)))
    return float(np.mean(means)), float(np.mean(stds))


def _calibration(post, case, sets=200, draws=99):
    truths, samples = [], []
    for k in range(sets):
        x_true, y, _ = _data_set(case, 1000 + k)
        truths.append(x_true)
        samples.append(post.sample(draws, y, generator=torch.Generator().manual_seed(k))[0]
                       .numpy())
    truths, samples = np.asarray(truths), np.asarray(samples)
    flat = lambda x: np.asarray(x).reshape(len(x), -1)[:, ::8]   # noqa: E731 - 8 cells
    _, p = rank_uniformity(sbc_ranks(samples, truths, flat), draws)
    refs = case.prior().sample(sets, case.finest,
                               generator=torch.Generator().manual_seed(7)).numpy()
    levels, coverage = tarp_coverage(samples, truths, refs)
    return float(p.min() * len(p)), float(np.abs(coverage - levels).max())


def _draw_seconds(post, y, repeats=3):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        post.sample(1000, y)
        best = min(best, time.perf_counter() - start)
    return best


def _row(case, bed, method, n, path, epochs):
    start = time.perf_counter()
    post, history = train_amortized(case.prior(), path, epochs=epochs, method=method,
                                    generator=torch.Generator().manual_seed(0))
    train = time.perf_counter() - start
    mean, std = _errors(post, case)
    sbc, tarp = _calibration(post, case)
    _, y, _ = _data_set(case, 0)
    return {"bed": bed, "method": method, "simulations": n, "epochs": epochs,
            "train_s": train, "held_out": history[-1]["held_out"], "mean_error": mean,
            "std_error": std, "sbc_p_bonferroni": min(sbc, 1.0), "tarp_deviation": tarp,
            "draw_1000_s": _draw_seconds(post, y)}


def _timing_32():
    """Seconds for 1000 draws at 32x32 of untrained networks of the default architectures."""
    big = _case(5)
    model = MsIGN(big.prior(), blocks_per_level=4, hidden=32, stage=5,
                  context_features=big.n_obs).to(torch.float32)
    joint = JointFlow(big.prior(), 5, big.n_obs, eps=0.05, transforms=8, hidden=128)
    zeros, ones = np.zeros(big.n_obs), np.ones(big.n_obs)
    return {name: _draw_seconds(AmortizedPosterior(m, zeros, ones), zeros)
            for name, m in (("msign", model), ("joint", joint))}


def markdown(rows, timing, note=""):
    lines = ["# Amortized inversion against the exact posterior", "",
             "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortized.py`: 8x8 test beds with "
             "exact posteriors (linear: two integral observations; quadratic: y = <phi, x>^2, "
             "two modes), noise 0.05, and the elliptic demo (nine heads, noise 0.005: the "
             "case's own data against the suite's long-run reference); the conditional MsIGN, the single-loss joint flow "
             "(Xiao, Yan, Amit) and the multi-loss INN (Ardizzone et al.) trained on the same "
             "simulations and epochs; errors of 2000 draws for 20 unseen data sets "
             "(exact-posterior std units, RMS over cells, averaged); SBC over 200 unseen data "
             "sets (smallest p of 8 cells times 8, Bonferroni: calibrated above 0.01) and TARP "
             "(largest coverage error; 4 standard errors: 0.14). Held out: the negative log "
             "likelihood per dimension (the INN has none: its loss).", ""]
    for bed in BEDS:
        lines += [f"## {bed}", "",
                  "| simulations | network | training (s) | held out | mean error | std error | "
                  "SBC p (Bonferroni) | TARP error | 1000 draws (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['simulations']} | {r['method']} | {r['train_s']:.0f} | "
                  f"{r['held_out']:.3f} | {r['mean_error']:.3f} | {r['std_error']:.3f} | "
                  f"{r['sbc_p_bonferroni']:.3f} | {r['tarp_deviation']:.3f} | "
                  f"{r['draw_1000_s']:.3f} |" for r in rows if r["bed"] == bed]
        lines.append("")
    lines += [f"1000 draws for a new data set at 32x32 (untrained networks of the default "
              f"architectures, one core): conditional MsIGN {timing['msign']:.2f} s, joint "
              f"flow {timing['joint']:.2f} s." + (f" {note}" if note else "")]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,4000,16000")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--beds", default=",".join(BEDS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="keep the stored 32x32 draw times (measure them alone on a quiet "
                   "machine)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bed in args.beds.split(","):
            case = _case(bed=bed)
            for n in (int(v) for v in args.sizes.split(",")):
                path = Path(tmp) / f"{bed}{n}.nc"
                simulate(case, n, path, seed=1)
                for method in args.methods.split(","):
                    rows.append(_row(case, bed, method, n, path, args.epochs))
                    print(json.dumps(rows[-1]), flush=True)
    path = RESULTS / "amortized.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    ran = set(args.beds.split(","))              # rows of the beds not run are kept
    rows = [r for r in old["rows"] if r["bed"] not in ran] + rows
    rows.sort(key=lambda r: (BEDS.index(r["bed"]), r["simulations"],
                             METHODS.index(r["method"])))
    timing = _timing_32() if args.timing else old["draw_1000_32x32_s"]
    RESULTS.mkdir(exist_ok=True)
    note = "" if args.timing else old.get("draw_1000_32x32_note", "")
    path.write_text(json.dumps({"rows": rows, "draw_1000_32x32_s": timing,
                                "draw_1000_32x32_note": note}, indent=1))
    text = markdown(rows, timing, note)
    (RESULTS / "amortized.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
