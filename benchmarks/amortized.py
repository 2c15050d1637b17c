"""Amortized inversion against the exact posterior as the number of simulations grows.

On the linear-Gaussian test bed (8x8 Matern prior, two integral observations, noise 0.05:
every data set has an exact Gaussian posterior), a conditional MsIGN is trained on N
simulations for N in ``--sizes``; for 20 data sets it never saw, the RMS over cells of the
posterior mean and std errors of 2000 draws (in exact-posterior std units) are averaged, and
SBC and TARP are computed over 200 unseen data sets (``geoinvert.app.calibrate``'s checks).
The time to draw 1000 samples for a new data set is measured at 8x8 and, with an untrained
network of the same architecture, at 32x32.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortized.py [--sizes 1000,4000,16000]

Writes benchmarks/results/amortized.json and amortized.md.
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
from geoinvert.problem.forward.testbeds import ExactLinearPosterior  # noqa: E402
from geoinvert.simulate import simulate  # noqa: E402
from geoinvert.testing import small_case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NOISE = 0.05


def _case(level=3):
    config = small_case()
    config["levels"] = {"finest": level}
    config["noise"] = {"std": NOISE}
    return load_case(config)


def _data_set(case, seed):
    prior, forward = case.prior(), case.forward(case.finest)
    x = prior.sample(1, case.finest, generator=torch.Generator().manual_seed(10_000 + seed))
    e = NOISE * torch.randn(forward.n_obs, generator=torch.Generator().manual_seed(20_000 + seed),
                            dtype=torch.float64)
    with torch.no_grad():
        y = (forward(x)[0] + e).numpy()
    exact = ExactLinearPosterior(prior.mean(case.finest).ravel(), prior.covariance(case.finest),
                                 forward.matrix, y, NOISE)
    return x[0].numpy(), y, exact


def _errors(post, case, sets=20):
    means, stds = [], []
    for k in range(sets):
        _, y, exact = _data_set(case, k)
        x = post.sample(2000, y, generator=torch.Generator().manual_seed(k))[0]
        x = x.reshape(2000, -1).numpy()
        sd = np.sqrt(np.diag(exact.cov))
        means.append(np.sqrt(np.mean(((x.mean(0) - exact.mean) / sd) ** 2)))
        stds.append(np.sqrt(np.mean((x.std(0) / sd - 1) ** 2)))
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,4000,16000")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    case = _case()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            path = Path(tmp) / f"s{n}.nc"
            simulate(case, n, path, seed=1)
            start = time.perf_counter()
            post, history = train_amortized(case.prior(), path, epochs=args.epochs,
                                            generator=torch.Generator().manual_seed(0))
            train = time.perf_counter() - start
            mean, std = _errors(post, case)
            sbc, tarp = _calibration(post, case)
            _, y, _ = _data_set(case, 0)
            row = {"simulations": n, "epochs": args.epochs, "train_s": train,
                   "held_out_nll": history[-1]["held_out"], "mean_error": mean,
                   "std_error": std, "sbc_p_bonferroni": min(sbc, 1.0), "tarp_deviation": tarp,
                   "draw_1000_s": _draw_seconds(post, y)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    big = _case(5)
    model = MsIGN(big.prior(), blocks_per_level=4, hidden=32, stage=5,
                  context_features=big.n_obs).to(torch.float32)
    untrained = AmortizedPosterior(model, np.zeros(big.n_obs), np.ones(big.n_obs))
    timing_32 = _draw_seconds(untrained, np.zeros(big.n_obs))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "amortized.json").write_text(json.dumps({"rows": rows,
                                                         "draw_1000_32x32_s": timing_32},
                                                        indent=1))
    lines = ["# Amortized inversion against the exact posterior", "",
             "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortized.py`: linear-Gaussian "
             "test bed, 8x8, two observations, noise 0.05; errors of 2000 draws for 20 unseen "
             "data sets (exact-posterior std units, RMS over cells, averaged); SBC over 200 "
             "unseen data sets (smallest p of 8 cells times 8, Bonferroni: calibrated above "
             "0.01) and TARP (largest coverage error; 4 standard errors: 0.14).", "",
             "| simulations | training (s) | held-out NLL / dim | mean error | std error | "
             "SBC p (Bonferroni) | TARP error | 1000 draws (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['simulations']} | {r['train_s']:.0f} | {r['held_out_nll']:.3f} | "
              f"{r['mean_error']:.3f} | {r['std_error']:.3f} | {r['sbc_p_bonferroni']:.3f} | "
              f"{r['tarp_deviation']:.3f} | {r['draw_1000_s']:.3f} |" for r in rows]
    lines += ["", f"1000 draws for a new data set at 32x32 (the same architecture, one core): "
              f"{timing_32:.2f} s."]
    (RESULTS / "amortized.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
