"""MsIGN ablations on the quadratic test bed: objectives, stages, upsampling layers, A-SVGD.

Usage (default, 16 x 16, L = 4, equal nFS budget per variant, ~15 min on a busy 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/msign_ablation.py

Larger (32 x 32)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/msign_ablation.py --levels 5 --budget 150000 \
        --tag 32

Every variant trains a fresh model (same seed) with the same total forward-solve budget and is
evaluated like ``msign_quadratic.py``: Monte-Carlo Jeffreys divergence to the exact posterior
(+/- standard error), fraction of samples in each mode, moment errors. Variants:

- ``jeffreys``: multi-stage, Jeffreys, defensive surrogate/prior proposal (this package's choice);
- ``jeffreys-surrogate``: multi-stage, Jeffreys, the surrogate PC_l(p_{l-1}) alone (the paper's);
- ``reverse-kl``: multi-stage, reverse KL only;
- ``jeffreys-single``: single-stage (finest level only, from the prior-conditioned model);
- ``reverse-kl-single``: single-stage, reverse KL;
- ``nearest``: as ``jeffreys`` with stochastic nearest-neighbour upsampling instead of the prior
  conditioning layer (``MsIGN(..., upsampling="nearest")``);
- ``squeeze``: as ``jeffreys`` with Glow's squeeze/split (``upsampling="squeeze"``). For these
  two the "prior" half of the defensive proposal is the untrained model (every F = identity),
  which is no longer the prior above level 1 (still a valid importance proposal);
- ``asvgd``: amortized SVGD (:func:`geoinvert.inference.trainer.train_asvgd`) on the same network,
  multi-stage, one solve per sample per step; the MsIGN paper's baseline.

Writes ``benchmarks/results/<name>.json``, ``<name>.md`` and ``<name>.png``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msign_linear import machine, parse_steps  # noqa: E402
from msign_quadratic import (HEADER, RESULTS, evaluate, projections, setup,  # noqa: E402
                             train)

from geoinvert.flows.msign import MsIGN  # noqa: E402
from geoinvert.inference.trainer import train_asvgd  # noqa: E402

_JEFFREYS = dict(objective="jeffreys", single_stage=False, proposal="defensive")
VARIANTS = {
    "jeffreys": dict(_JEFFREYS, upsampling="prior"),
    "jeffreys-surrogate": dict(_JEFFREYS, upsampling="prior", proposal="surrogate"),
    "reverse-kl": dict(objective="reverse_kl", single_stage=False, proposal="auto",
                       upsampling="prior"),
    "jeffreys-single": dict(objective="jeffreys", single_stage=True, proposal="auto",
                            upsampling="prior"),
    "reverse-kl-single": dict(objective="reverse_kl", single_stage=True, proposal="auto",
                              upsampling="prior"),
    "nearest": dict(_JEFFREYS, upsampling="nearest"),
    "squeeze": dict(_JEFFREYS, upsampling="squeeze"),
    "asvgd": dict(objective="asvgd", single_stage=False, proposal="-", upsampling="prior"),
}


def new_model(prior, args, upsampling):
    torch.manual_seed(args.seed)
    return MsIGN(prior, blocks_per_level=args.blocks, hidden=args.hidden,
                 upsampling=upsampling).to(torch.float32)


def row_text(label, r):
    """A row of the accuracy table (large D_J in 3 significant digits)."""
    def num(v):
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
    return (f"| {label} | {num(r['jeffreys'])} +/- {num(r['jeffreys_se'])} | "
            f"{100 * r['mode_positive']:.1f} / {100 * r['mode_negative']:.1f} | "
            f"{r['mean_rms']:.4f} | {r['std_rms']:.4f} | {r['var_rel']:.4f} |")


def train_variant(model, posteriors, args, v):
    """Train one variant with the command-line settings; returns (history, seconds)."""
    if v["objective"] != "asvgd":
        return train(model, posteriors, args, objective=v["objective"],
                     single_stage=v["single_stage"])
    start = time.perf_counter()
    history = train_asvgd(model, posteriors, steps=parse_steps(args.steps, args.levels),
                          batch=args.batch, lr=args.lr, budget=args.budget,
                          generator=torch.Generator().manual_seed(args.seed))
    return history, time.perf_counter() - start


def figure(path, exact, results, samples, title):
    """D_J per variant (bars with 2 s.e.), mode fractions, and t-histograms."""
    from matplotlib.figure import Figure
    names = list(results)
    fig = Figure(figsize=(15, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    dj = [results[n]["jeffreys"] for n in names]
    se = [2 * results[n]["jeffreys_se"] for n in names]
    ax1.bar(range(len(names)), dj, yerr=se, color="C0")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax1.set(ylabel="D_J to the exact posterior", yscale="log", title=title)
    pos = [100 * results[n]["mode_positive"] for n in names]
    ax2.bar(range(len(names)), pos, color="C1", label="t > 0")
    ax2.bar(range(len(names)), [100 - p for p in pos], bottom=pos, color="C2", label="t < 0")
    ax2.axhline(50, color="k", lw=0.8, ls="--")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax2.set(ylabel="% of samples", title="mode fractions (exact: 50 / 50)")
    ax2.legend(fontsize=7)
    grid = np.linspace(-3.2 * exact.t_std, 3.2 * exact.t_std, 800)
    ax3.plot(grid, np.exp(exact.t_log_density(grid)), "k", lw=1.2, label="exact")
    for n in names:
        ax3.hist(projections(exact, samples[n]), bins=100, range=(grid[0], grid[-1]),
                 density=True, histtype="step", lw=0.9, label=n)
    top = float(np.exp(exact.t_log_density(grid)).max())
    ax3.set(xlabel="t = <phi, x>", ylabel="density", title="marginal along phi (clipped)",
            ylim=(0, 2 * top))
    ax3.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--steps", default="100000", help="upper bound; the budget decides")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--budget", type=int, default=40000, help="total nFS of every variant")
    p.add_argument("--noise", type=float, default=0.3, help="noise std / y")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    name = "msign_ablation" + (f"_{args.tag}" if args.tag else "")
    started = time.perf_counter()
    prior, posteriors, exact, moments, prior_std = setup(args)
    results, samples = {}, {}
    for variant in args.variants.split(","):
        v = VARIANTS[variant]
        args.proposal = v["proposal"]
        model = new_model(prior, args, v["upsampling"])
        history, seconds = train_variant(model, posteriors, args, v)
        r, x = evaluate(model, exact, moments, prior_std, args.samples, args.seed + 7)
        r.update(nfs=history[-1]["nfs"], nfs_finest=history[-1]["nfs_finest"],
                 steps=len(history), train_s=seconds, skipped=history[-1]["skipped"], **v)
        results[variant], samples[variant] = r, x
        print(row_text(variant, r), flush=True)
    wall = time.perf_counter() - started
    command = "python benchmarks/msign_ablation.py " + " ".join(argv or sys.argv[1:])
    md = "\n".join([
        f"# {name}", "", f"Command: `{command}`", "", f"Config: {json.dumps(vars(args))}", "",
        f"Quadratic test bed {2 ** args.levels} x {2 ** args.levels} (L = {args.levels}), "
        f"y = {exact.y:.4g}, noise std {exact.noise:.3g}; every variant gets {args.budget} nFS. "
        f"Total wall time {wall:.0f} s. Machine: {machine()}.", "",
        *[h.replace("| model |", "| variant |") for h in HEADER[:1]],
        HEADER[1], *[row_text(n, r) for n, r in results.items()], "",
        "| variant | objective | upsampling | stages | steps | nFS | finest equivalents "
        "| train time (s) | skipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {n} | {r['objective']} | {r['upsampling']} | "
          f"{'single' if r['single_stage'] else 'multi'} | {r['steps']} | {r['nfs']} | "
          f"{r['nfs_finest']:.0f} | {r['train_s']:.0f} | {r['skipped']} |"
          for n, r in results.items()], ""])
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"config": vars(args), "wall_s": wall, "machine": machine(), "results": results},
        indent=1))
    figure(RESULTS / f"{name}.png", exact, results, samples, f"{name} ({args.budget} nFS each)")


if __name__ == "__main__":
    main()
