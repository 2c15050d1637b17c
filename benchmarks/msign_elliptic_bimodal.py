"""MsIGN on the mirror-symmetric elliptic problem (cases/elliptic_bimodal.yaml): both modes?

Usage (default, 16 x 16, L = 4, ~15 min on a busy 2-core machine, 2.5e5 nFS)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/msign_elliptic_bimodal.py

Longer training, bigger flow::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/msign_elliptic_bimodal.py \
        --steps 600,600,1000,2000 --batch 64 --blocks 6 --hidden 64 --tag long

Problem: -div(exp(x) grad u) = f on the unit square, u = 0 on the left and right
sides, zero flux on the bottom and top; source, boundary conditions, prior and measurements are
all invariant under the mirror s2 -> 1 - s2, the truth (a permeable channel in the lower half)
is not. Hence F(x) = F(mirror(x)) and the posterior has two modes of exactly equal mass: the
truth and its mirror image. MsIGN is trained stage by stage on the case's posteriors
(levels 1..4), then sampled; samples are put in a mode by the sign of their projection on the
case's mirror-antisymmetric ``output.direction`` field, and, unsupervised, by 2-means on the
whole fields (:func:`geoinvert.diagnostics.two_means`). The mode fractions are reported with
their Monte-Carlo standard error sqrt(p (1 - p) / n) (flow samples are independent), plus the
self-normalised importance-weighted fraction (weights q~ / p, the flow's density is known),
which corrects a flow that puts the right shape but the wrong mass on a mode. When
``benchmarks/results/reference_elliptic.nc`` exists (``reference_elliptic.py``), mean and std
errors against the MCMC reference are reported too.

Writes ``benchmarks/results/<name>.json``, ``<name>.md``, ``<name>_fields.png``,
``<name>_modes.png`` and ``<name>_training.png``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msign_linear import (_image, _printer, add_training_flags, machine, parse_steps,  # noqa: E402
                          training_figure, training_kwargs)

import geoinvert  # noqa: E402
from geoinvert.diagnostics import (importance_ess_fraction, moment_errors,  # noqa: E402
                                   psis_khat, two_means)
from geoinvert.flows.msign import MsIGN  # noqa: E402
from geoinvert.inference.trainer import train_msign  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CASE = ROOT / "cases" / "elliptic_bimodal.yaml"
REFERENCE = RESULTS / "reference_elliptic.nc"


def load():
    """The case, its posteriors per level, the mode direction d and the truth ``(16, 16)``."""
    case = geoinvert.load_case(CASE)
    posteriors = {level: case.posterior(level) for level in case.levels}
    direction = case.evaluate(case.config["output"]["direction"])
    return case, posteriors, direction


def mirror(x):
    """The mirror s2 -> 1 - s2 of fields ``(..., ny, nx)`` (rows run along y)."""
    return np.flip(x, axis=-2)


def load_reference(path=REFERENCE):
    """``{"mean", "std", "mode_positive", ...}`` of the MCMC reference, or None without one."""
    if not Path(path).exists():
        return None
    import xarray as xr
    with xr.open_dataset(path) as ds:
        return {"mean": ds["mean"].values, "std": ds["std"].values,
                "mode_positive": float(ds.attrs["mode_positive"]),
                "samples": ds["samples"].values}


def mode_summary(x, direction, *, log_weights=None, ess=None, seed=0):
    """Mode fractions of samples ``(n, ny, nx)``: sign of x . d, 2-means, IS-weighted.

    Args:
        x: samples.
        direction: mirror-antisymmetric field d; the positive side is the truth's mode.
        log_weights: optional importance log-weights (target / sampler) of the samples.
        ess: effective sample size for the standard error (default: n, independent samples).
        seed: seed of the 2-means restarts.

    Returns:
        dict with ``positive``, ``positive_se`` (sqrt(p (1 - p) / ess)), ``kmeans_positive``
        (fraction in the 2-means cluster whose centre has x . d > 0), ``kmeans_agreement``
        (fraction of samples on which 2-means and the sign agree), and when weights are given
        ``weighted_positive`` with its delta-method standard error.
    """
    proj = x.reshape(len(x), -1) @ direction.ravel()
    sign = proj > 0
    n_eff = float(ess if ess is not None else len(x))
    p = float(sign.mean())
    labels, centres = two_means(x, seed=seed)
    positive_cluster = int(np.argmax(centres.reshape(2, -1) @ direction.ravel()))
    in_pos = labels == positive_cluster
    out = {"positive": p, "negative": 1 - p, "positive_se": math.sqrt(p * (1 - p) / n_eff),
           "n_eff": n_eff, "kmeans_positive": float(in_pos.mean()),
           "kmeans_agreement": float((in_pos == sign).mean()),
           "projection_mean_pos": float(proj[sign].mean()) if sign.any() else math.nan,
           "projection_mean_neg": float(proj[~sign].mean()) if (~sign).any() else math.nan}
    if log_weights is not None:
        out.update(weighted_mode_fraction(sign, log_weights))
    return out


def weighted_mode_fraction(sign, log_weights):
    """Self-normalised IS estimate of P(positive) and its delta-method standard error."""
    lw = np.asarray(log_weights, np.float64)
    ok = np.isfinite(lw)
    w = np.exp(lw[ok] - lw[ok].max())
    w /= w.sum()
    s = sign[ok].astype(float)
    p = float((w * s).sum())
    return {"weighted_positive": p,
            "weighted_positive_se": float(math.sqrt((w**2 * (s - p) ** 2).sum()))}


def segment_profile(posterior, truth, points=11):
    """log q and log L along the straight segment from the truth to its mirror image.

    If the two "modes" were separated, log q would dip in the middle; a flat profile means a
    mirror-symmetric field (truth + M truth) / 2 explains the data as well as the truth.

    Returns:
        ``{"s", "log_q", "log_likelihood"}`` lists, s = 0 at the truth, 1 at the mirror.
    """
    s = torch.linspace(0, 1, points, dtype=torch.float64)
    t = torch.as_tensor(truth)
    x = torch.stack([(1 - a) * t + a * t.flip(-2) for a in s])
    with torch.no_grad():
        return {"s": s.tolist(), "log_q": posterior.log_prob(x).tolist(),
                "log_likelihood": posterior.log_likelihood(x).tolist()}


def segment_text(profile):
    """One sentence on the truth-to-mirror profile."""
    q = np.asarray(profile["log_q"])
    return (f"log q along the straight segment truth -> mirror (11 points): "
            f"{q[0]:.2f} at the truth, {q[len(q) // 2]:.2f} at the symmetric midpoint "
            f"(truth + mirror) / 2, range {q.max() - q.min():.2f}: "
            + ("no barrier along it. The truth itself can be far from the MAP (a strong truth "
               "costs much prior density), so this segment proves little either way: "
               "`benchmarks/elliptic_modes.py` compares the MAP with the best symmetric field."
               if q[len(q) // 2] >= q[0] - 1 else "a barrier separates the modes."))


def per_mode_means(x, direction, truth):
    """Mean field of each mode and its correlation with the truth and with its mirror."""
    sign = x.reshape(len(x), -1) @ direction.ravel() > 0
    out, means = {}, {}
    for name, rows in (("positive", sign), ("negative", ~sign)):
        if rows.sum() < 2:
            continue
        m = x[rows].mean(0)
        means[name] = m
        out[name] = {"count": int(rows.sum()),
                     "corr_truth": float(np.corrcoef(m.ravel(), truth.ravel())[0, 1]),
                     "corr_mirror": float(np.corrcoef(m.ravel(), mirror(truth).ravel())[0, 1]),
                     "rel_dist_truth": float(np.linalg.norm(m - truth) / np.linalg.norm(truth)),
                     "rel_dist_mirror": float(np.linalg.norm(m - mirror(truth))
                                              / np.linalg.norm(truth))}
    return out, means


def evaluate(model, posterior, direction, truth, reference, *, num, seed):
    """Samples of the trained model and every number of the report.

    Costs ``num`` finest-level solves (the target at the samples, for the importance weights);
    they are reported apart from the training budget.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x, log_q = model.sample(num, generator=gen, level=model.levels)
        x = x.to(torch.float64)
        log_t = torch.cat([posterior.log_prob(c) for c in x.split(500)])
    xs, lw = x.numpy(), (log_t - log_q.to(torch.float64)).numpy()
    modes = mode_summary(xs, direction, log_weights=lw, seed=seed)
    per_mode, means = per_mode_means(xs, direction, truth)
    out = {"modes": modes, "per_mode": per_mode,
           "segment": segment_profile(posterior, truth),
           "is_ess_fraction": importance_ess_fraction(np.where(np.isfinite(lw), lw, -np.inf)),
           "psis_khat": psis_khat(np.where(np.isfinite(lw), lw, -np.inf)),
           "log_q_finite": bool(np.isfinite(log_q.numpy()).all()),
           "failed_targets": int((~np.isfinite(log_t.numpy())).sum()), "eval_nfs": num + 11}
    if reference is not None:
        mean_err, std_err = moment_errors(xs, reference["mean"], reference["std"])
        out["vs_reference"] = {"mean_error": mean_err, "std_error": std_err}
    return out, xs, means


# -- figures ------------------------------------------------------------------------------------


def fields_figure(path, x, truth, means, reference):
    """Truth and mirror, sample mean and std, the per-mode means (and the reference's)."""
    from matplotlib.figure import Figure
    ncols = 4
    fig = Figure(figsize=(13, 6.6))
    axes = fig.subplots(2, ncols)
    lo, hi = min(truth.min(), -0.2), max(truth.max(), x.mean(0).max())
    _image(axes[0, 0], truth, "truth", vmin=lo, vmax=hi)
    _image(axes[0, 1], mirror(truth), "mirror of the truth", vmin=lo, vmax=hi)
    for k, name in enumerate(("positive", "negative")):
        if name in means:
            label = "x.d > 0 (truth's side)" if name == "positive" else "x.d < 0 (mirror side)"
            _image(axes[0, 2 + k], means[name], f"MsIGN mean, {label}", vmin=lo, vmax=hi)
        else:
            axes[0, 2 + k].set_axis_off()
    std = x.std(0, ddof=1)
    vmax = std.max() * 1.1 if reference is None else max(std.max(), reference["std"].max()) * 1.1
    _image(axes[1, 0], x.mean(0), "MsIGN posterior mean")
    _image(axes[1, 1], std, "MsIGN posterior std", "magma", 0, vmax)
    if reference is not None:
        _image(axes[1, 2], reference["mean"], "MCMC reference mean")
        _image(axes[1, 3], reference["std"], "MCMC reference std", "magma", 0, vmax)
    else:
        axes[1, 2].set_axis_off()
        axes[1, 3].set_axis_off()
    fig.suptitle("16 x 16 log-permeability; y runs upwards, the mirror is s2 -> 1 - s2",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def modes_figure(path, curves, direction, truth, title):
    """Histograms of the projection t = x . d per sampler, with the truth's and mirror's t."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.8, 3.6))
    ax = fig.subplots()
    t_true = float(truth.ravel() @ direction.ravel())
    span = max([1.6 * abs(t_true)] + [float(np.quantile(np.abs(
        x.reshape(len(x), -1) @ direction.ravel()), 0.999)) for _, x in curves])
    for label, x in curves:
        t = x.reshape(len(x), -1) @ direction.ravel()
        ax.hist(t, bins=60, range=(-span, span), density=True, histtype="step", lw=1.0,
                label=label)
    for value, label in ((t_true, "truth"), (-t_true, "mirror")):
        ax.axvline(value, color="k", lw=0.8, ls="--")
        ax.text(value, ax.get_ylim()[1] * 0.95, f" {label}", fontsize=7, va="top")
    ax.set(xlabel="t = x . d (d: mirror-antisymmetric direction)", ylabel="density",
           title=title)
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- report -------------------------------------------------------------------------------------


def markdown(name, args, summary, result, reference):
    m = result["modes"]
    lines = [
        f"# {name}", "", f"Command: `{summary['command']}`", "",
        f"Config: {json.dumps(vars(args))}", "",
        f"Problem: `cases/elliptic_bimodal.yaml`, {summary['problem']}; the exact mode weights "
        "are 1/2 each by symmetry.", "",
        f"Training: nFS {summary['nfs']} ({summary['nfs_finest']:.0f} finest-level "
        f"equivalents), training wall time {summary['train_s']:.0f} s, skipped steps "
        f"{summary['skipped']}; evaluation {result['eval_nfs']} more finest solves (target at "
        f"the samples); total wall time {summary['wall_s']:.0f} s. Machine: "
        f"{summary['machine']}.", "",
        f"## Modes ({args.samples} independent flow samples)", "",
        "| estimate | truth's mode (x.d > 0) | mirror mode | standard error |",
        "| --- | --- | --- | --- |",
        f"| sign of x . d | {100 * m['positive']:.1f} % | {100 * m['negative']:.1f} % | "
        f"{100 * m['positive_se']:.1f} % |",
        f"| 2-means cluster (agrees with the sign on {100 * m['kmeans_agreement']:.1f} % of "
        f"samples) | {100 * m['kmeans_positive']:.1f} % | {100 - 100 * m['kmeans_positive']:.1f} % "
        "| - |",
        f"| importance-weighted (q~ / p) | {100 * m['weighted_positive']:.1f} % | "
        f"{100 - 100 * m['weighted_positive']:.1f} % | {100 * m['weighted_positive_se']:.1f} % |",
        "", f"Target 50 +/- 5 %: {'met' if abs(m['positive'] - 0.5) <= 0.05 else 'NOT met'} "
        f"(|p - 1/2| = {100 * abs(m['positive'] - 0.5):.1f} %, "
        f"{abs(m['positive'] - 0.5) / max(m['positive_se'], 1e-12):.1f} standard errors).", "",
        f"Importance ESS of the flow against the target: {result['is_ess_fraction']:.3f} of "
        f"the samples; PSIS k-hat {result['psis_khat']:.2f}.", "",
        "## Are there two modes?", "",
        segment_text(result["segment"]) + " The marginal of t = x . d (`" + name
        + "_modes.png`) shows whether the two sides are separated by a gap.", "",
        "## Per-mode means", "",
        "| mode | samples | corr. with truth | corr. with mirror | |mean - truth| / |truth| "
        "| |mean - mirror| / |truth| |", "| --- | --- | --- | --- | --- | --- |"]
    for name_, r in result["per_mode"].items():
        lines.append(f"| {name_} | {r['count']} | {r['corr_truth']:.3f} | "
                     f"{r['corr_mirror']:.3f} | {r['rel_dist_truth']:.3f} | "
                     f"{r['rel_dist_mirror']:.3f} |")
    if reference is not None and "vs_reference" in result:
        r = result["vs_reference"]
        lines += ["", "## Against the MCMC reference (`reference_elliptic.nc`)", "",
                  f"mean error ||mean - mean_ref|| / ||std_ref|| = {r['mean_error']:.3f}, "
                  f"std error ||std - std_ref|| / ||std_ref|| = {r['std_error']:.3f}."]
    lines += ["", f"Figures: `{name}_fields.png`, `{name}_modes.png`, `{name}_training.png`.",
              ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="300,300,500,1000", help="per stage: N or N1,...,N4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--objective", default="jeffreys", choices=["jeffreys", "reverse_kl"])
    p.add_argument("--proposal", default="auto",
                   choices=["auto", "surrogate", "defensive", "mixture"])
    add_training_flags(p)
    p.add_argument("--budget", type=int, default=None, help="total nFS (default: no limit)")
    p.add_argument("--samples", type=int, default=4000, help="evaluation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output names")
    args = p.parse_args(argv)
    name = "msign_elliptic_bimodal" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    case, posteriors, direction = load()
    truth, reference = case.truth, load_reference()
    torch.manual_seed(args.seed)
    model = MsIGN(case.prior(), blocks_per_level=args.blocks, hidden=args.hidden)
    model = model.to(torch.float32)
    t0 = time.perf_counter()
    history = train_msign(model, posteriors, start=1,
                          steps=parse_steps(args.steps, case.finest), batch=args.batch,
                          lr=args.lr, objective=args.objective, budget=args.budget,
                          proposal=args.proposal, **training_kwargs(args),
                          generator=torch.Generator().manual_seed(args.seed),
                          callback=_printer())
    train_s = time.perf_counter() - t0
    result, x, means = evaluate(model, posteriors[case.finest], direction, truth, reference,
                                num=args.samples, seed=args.seed + 7)
    summary = {"command": "python benchmarks/msign_elliptic_bimodal.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "nfs": history[-1]["nfs"], "nfs_finest": history[-1]["nfs_finest"],
               "nfs_per_stage": {s: max(h["nfs"] for h in history if h["stage"] == s)
                                 for s in sorted({h["stage"] for h in history})},
               "skipped": history[-1]["skipped"], "train_s": train_s,
               "wall_s": time.perf_counter() - started, "machine": machine(),
               "problem": f"{case.lattice_shape()[0]} x {case.lattice_shape()[1]} "
                          f"log-permeability (L = {case.finest}), {case.n_obs} mirror-symmetric "
                          f"integral observations, noise std {case.noise.min():g}"}
    md = markdown(name, args, summary, result, reference)
    print(md)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"config": vars(args), "summary": summary, "result": result, "history": history},
        indent=1))
    fields_figure(RESULTS / f"{name}_fields.png", x, truth, means, reference)
    curves = [("MsIGN", x)] + ([("MCMC reference", reference["samples"])] if reference else [])
    modes_figure(RESULTS / f"{name}_modes.png", curves, direction, truth,
                 f"{name}: marginal along d")
    training_figure(RESULTS / f"{name}_training.png", history, f"{name}: training")


if __name__ == "__main__":
    main()
