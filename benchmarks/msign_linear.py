"""MsIGN on the linear-Gaussian test bed: posterior mean and std against the exact posterior.

Usage (default, ~10 min on a busy 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/msign_linear.py

Full-size run (longer training, bigger flow)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/msign_linear.py --steps 400,400,600,800,1200 \
        --blocks 6 --hidden 64 --batch 64 --tag full

Problem: x on 2^L x 2^L cells of the unit square (default L = 5, 32 x 32), Matern prior
(alpha = 2, correlation length 0.2, std 1, Dirichlet boundary), observations
y_k = int phi_k x ds of 9 Gaussian bumps on a 3 x 3 grid plus N(0, noise^2) noise. The exact
posterior is Gaussian (:class:`geoinvert.problem.forward.testbeds.ExactLinearPosterior`). Errors of the
flow's mean and std are divided by the prior std cell by cell and summarised by RMS and max
over cells, next to the same numbers for the untrained (prior-conditioned) model and for as many
exact posterior samples (the Monte-Carlo floor). Writes ``benchmarks/results/<name>.json``,
``<name>.md`` and ``<name>_fields.png``, ``<name>_training.png``.
"""

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from geoinvert.diagnostics import jeffreys_divergence
from geoinvert.flows.msign import MsIGN
from geoinvert.problem.forward.testbeds import ExactLinearPosterior, LinearForward
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import MaternPrior
from geoinvert.inference.trainer import train_msign

RESULTS = Path(__file__).resolve().parent / "results"


def parse_steps(text, levels):
    """``"200"`` or ``"100,100,200,..."`` (one per level) -> list of steps per level."""
    parts = [int(s) for s in str(text).split(",")]
    if len(parts) == 1:
        return parts * levels
    if len(parts) != levels:
        raise SystemExit(f"--steps needs 1 or {levels} comma-separated values")
    return parts


def add_training_flags(p):
    """Flags of the training recipe and of the options it sets (``train_msign`` options; a
    flag given overrides the recipe's value)."""
    p.add_argument("--recipe", default="paper", choices=["paper", "forward_kl"],
                   help="named training settings (geoinvert.inference.config.RECIPES)")
    p.add_argument("--coarse-sampler", choices=["importance", "smc", "laplace"],
                   help="how stage 1 samples q_1")
    p.add_argument("--pool-levels", type=int,
                   help="stages that start from a pool of their own posterior")
    p.add_argument("--pool-warmup", type=float,
                   help="fraction of a pool stage fitting the pool alone (1: no reverse KL)")
    p.add_argument("--reverse-weight", type=float,
                   help="weight of the reverse KL in the Jeffreys gradient (stages without a pool)")
    p.add_argument("--frozen-proposal", action="store_true", default=None,
                   help="forward-KL proposal from the previous stage's frozen model")
    p.add_argument("--lr-warmup", type=float,
                   help="fraction of each stage's steps with a linear lr ramp")


def training_kwargs(args):
    """The ``train_msign`` keywords of :func:`add_training_flags` (None: the recipe's)."""
    return dict(recipe=getattr(args, "recipe", "paper"),
                **{key: getattr(args, key, None) for key in
                   ("coarse_sampler", "pool_levels", "pool_warmup", "reverse_weight",
                    "frozen_proposal", "lr_warmup")})


def bumps(count):
    """Gaussian bumps exp(-|s - c|^2 / 0.02) centred on a sqrt(count) x sqrt(count) grid."""
    k = int(round(math.sqrt(count)))
    centres = [((i + 0.5) / k, (j + 0.5) / k) for j in range(k) for i in range(k)]
    return [lambda x, y, c=c: np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / 0.02)
            for c in centres]


def build(args):
    """Prior, posteriors per level, exact finest posterior and the true field."""
    levels, n = args.levels, 2**args.levels
    prior = MaternPrior(levels, alpha=2, correlation_length=args.correlation_length, std=1.0,
                        boundary="dirichlet")
    forward = LinearForward(bumps(args.functions), (n, n))
    truth = prior.sample(1, levels, generator=torch.Generator().manual_seed(args.seed + 1))[0]
    rng = np.random.default_rng(args.seed)
    data = forward.matrix @ truth.numpy().ravel() + args.noise * rng.standard_normal(args.functions)
    posteriors = {l: Posterior(prior, forward.at_level(l), data, args.noise, l)
                  for l in range(1, levels + 1)}
    exact = ExactLinearPosterior(prior.mean(levels).ravel(), prior.covariance(levels),
                                 forward.matrix, data, args.noise, shape=(n, n))
    return prior, posteriors, exact, truth.numpy()


def moment_errors(x, exact, prior_std):
    """RMS and max over cells of |mean - exact| / prior std and |std - exact| / prior std."""
    shape = prior_std.shape
    mean_err = (x.mean(0) - exact.mean.reshape(shape)) / prior_std
    std_err = (x.std(0, ddof=1) - np.sqrt(np.diag(exact.cov)).reshape(shape)) / prior_std
    return {"mean_rms": float(np.sqrt(np.mean(mean_err**2))), "mean_max": float(np.abs(mean_err).max()),
            "std_rms": float(np.sqrt(np.mean(std_err**2))), "std_max": float(np.abs(std_err).max())}


def evaluate(model, exact, prior_std, num, seed):
    """Moment errors and the Jeffreys divergence (Monte Carlo, with standard error) to the exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x, log_p = model.sample(num, generator=gen, level=model.levels)
        x = x.to(torch.float64)
        x_exact = exact.sample(num, gen)
        log_p_exact = torch.cat([model.log_prob(c.to(model.dtype)) for c in x_exact.split(500)])
        dj = jeffreys_divergence(log_p.double().numpy(), exact.log_prob(x).numpy(),
                                 exact.log_prob(x_exact).numpy(), log_p_exact.double().numpy())
    return {**moment_errors(x.numpy(), exact, prior_std), "jeffreys": dj.value,
            "jeffreys_se": dj.stderr}, x.numpy()


def _image(ax, field, title, cmap="viridis", vmin=None, vmax=None):
    im = ax.imshow(field, origin="lower", extent=(0, 1, 0, 1), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.figure.colorbar(im, ax=ax, shrink=0.75)


def fields_figure(path, x, exact, prior_std, truth):
    """Exact vs flow mean and std, and their errors divided by the prior std."""
    from matplotlib.figure import Figure
    shape = prior_std.shape
    e_mean, e_std = exact.mean.reshape(shape), np.sqrt(np.diag(exact.cov)).reshape(shape)
    f_mean, f_std = x.mean(0), x.std(0, ddof=1)
    fig = Figure(figsize=(13, 6.4))
    axes = fig.subplots(2, 4)
    lo, hi = min(e_mean.min(), f_mean.min()), max(e_mean.max(), f_mean.max())
    _image(axes[0, 0], truth, "true field")
    _image(axes[0, 1], e_mean, "exact posterior mean", vmin=lo, vmax=hi)
    _image(axes[0, 2], f_mean, "MsIGN mean", vmin=lo, vmax=hi)
    _image(axes[0, 3], (f_mean - e_mean) / prior_std, "(MsIGN - exact) mean / prior std", "RdBu_r")
    _image(axes[1, 0], prior_std, "prior std", "magma")
    _image(axes[1, 1], e_std, "exact posterior std", "magma", 0, e_std.max() * 1.1)
    _image(axes[1, 2], f_std, "MsIGN std", "magma", 0, e_std.max() * 1.1)
    _image(axes[1, 3], (f_std - e_std) / prior_std, "(MsIGN - exact) std / prior std", "RdBu_r")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def training_figure(path, history, title):
    """Loss and importance ESS per step against cumulative nFS, one colour per stage."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    stages = sorted({h["stage"] for h in history})
    for stage in stages:
        rows = [h for h in history if h["stage"] == stage]
        nfs = [h["nfs"] for h in rows]
        ax1.plot(nfs, [h["loss"] for h in rows], lw=0.8, label=f"stage {stage}")
        ax2.plot(nfs, [h["ess"] for h in rows], lw=0.8, label=f"stage {stage}")
    ax1.set(xlabel="forward solves (nFS)", ylabel="loss (D_J estimate)", title=title,
            yscale="symlog")
    ax2.set(xlabel="forward solves (nFS)", ylabel="ESS / n", title="importance ESS", ylim=(0, 1.05))
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine():
    return {"machine": platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def markdown(name, config, rows, summary):
    lines = [f"# {name}", "", f"Command: `{summary['command']}`", "",
             f"Config: {json.dumps(config)}", "",
             f"Training: nFS {summary['nfs']}, finest-level equivalents "
             f"{summary['nfs_finest']:.0f}, wall time {summary['train_s']:.0f} s "
             f"(total {summary['wall_s']:.0f} s), skipped steps {summary['skipped']}. "
             f"Machine: {summary['machine']}.", "",
             "Errors divided by the prior std, RMS and max over cells; D_J Monte Carlo "
             f"({config['samples']} samples of each side) +/- standard error.", "",
             "| model | mean RMS | mean max | std RMS | std max | D_J |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, r in rows:
        dj = f"{r['jeffreys']:.3f} +/- {r['jeffreys_se']:.3f}" if "jeffreys" in r else "-"
        lines.append(f"| {label} | {r['mean_rms']:.4f} | {r['mean_max']:.4f} | "
                     f"{r['std_rms']:.4f} | {r['std_max']:.4f} | {dj} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--steps", default="150,150,200,250,350", help="per stage: N or N1,...,NL")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--objective", default="jeffreys", choices=["jeffreys", "reverse_kl"])
    p.add_argument("--budget", type=int, default=None, help="total nFS (default: no limit)")
    p.add_argument("--functions", type=int, default=9, help="number of bumps (a square)")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--correlation-length", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=5000, help="evaluation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output names")
    args = p.parse_args(argv)
    name = "msign_linear" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    prior, posteriors, exact, truth = build(args)
    prior_std = np.sqrt(np.diag(prior.covariance(args.levels))).reshape(truth.shape)
    torch.manual_seed(args.seed)
    model = MsIGN(prior, blocks_per_level=args.blocks, hidden=args.hidden).to(torch.float32)
    untrained, _ = evaluate(model, exact, prior_std, args.samples, args.seed + 7)
    floor = moment_errors(exact.sample(args.samples, torch.Generator().manual_seed(3)).numpy(),
                          exact, prior_std)

    t0 = time.perf_counter()
    history = train_msign(model, posteriors, start=1, steps=parse_steps(args.steps, args.levels),
                          batch=args.batch, lr=args.lr, objective=args.objective,
                          budget=args.budget, generator=torch.Generator().manual_seed(args.seed),
                          callback=_printer(), checkpoint=None)
    train_s = time.perf_counter() - t0
    trained, x = evaluate(model, exact, prior_std, args.samples, args.seed + 7)

    rows = [("untrained (prior-conditioned)", untrained), ("MsIGN trained", trained),
            (f"{args.samples} exact samples (MC floor)", floor)]
    summary = {"command": "python benchmarks/msign_linear.py " + " ".join(argv or _argv()),
               "nfs": history[-1]["nfs"], "nfs_finest": history[-1]["nfs_finest"],
               "skipped": history[-1]["skipped"], "train_s": train_s,
               "wall_s": time.perf_counter() - started, "machine": machine()}
    config = vars(args)
    print(markdown(name, config, rows, summary))
    (RESULTS / f"{name}.md").write_text(markdown(name, config, rows, summary))
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"config": config, "summary": summary, "untrained": untrained, "trained": trained,
         "mc_floor": floor, "history": history}, indent=1))
    fields_figure(RESULTS / f"{name}_fields.png", x, exact, prior_std, truth)
    training_figure(RESULTS / f"{name}_training.png", history, f"{name}: training")


def _argv():
    import sys
    return sys.argv[1:]


def _printer(every=50):
    """Progress lines every ``every`` steps (benchmarks print; the library does not)."""
    def callback(info):
        if info["step"] % every == 0:
            print(f"stage {info['stage']} step {info['step']:4d} nFS {info['nfs']:7d} "
                  f"loss {info['loss']:9.3f} ESS {info['ess']:.2f} t {info['time']:.0f}s",
                  flush=True)
    return callback


if __name__ == "__main__":
    main()
