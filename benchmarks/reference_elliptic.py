"""Long multi-chain MCMC reference of the elliptic bimodal posterior, symmetrised by its mirror.

Usage (default, prior-preconditioned HMC, 3 x 6 chains, 1.0e6 nFS, ~20 min on a busy
2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_elliptic.py

Longer::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_elliptic.py --draws 6000 --tag long

Problem: ``cases/elliptic_bimodal.yaml`` ("a long multi-chain MCMC run, saved once
with its diagnostics"). Three groups of chains run as one batch (one batched forward and adjoint
evaluation per leapfrog step): ``truth`` (started near the truth, truth + 0.3 x prior draw),
``mirror`` (the mirror images of those starts) and ``prior`` (prior draws). The step is adapted
by dual averaging during the warm-up and frozen; draws after the warm-up are kept.

The exact symmetry. Source, boundary conditions, prior and measurements are invariant under the
mirror M: s2 -> 1 - s2 (on the lattice, ``x[::-1, :]``), so the posterior satisfies
q(M x) = q(x) exactly (checked below: log q(M x) - log q(x) at the truth and at chain draws is
zero to round-off). One might expect the chains to rarely cross between the two modes; then
the raw fraction of draws in each mode would only say where the chains started. Crossings are
counted and reported: on this case file the chains cross every few draws (the two "modes" are
the two halves of one broad symmetric hump, see ``msign_elliptic_bimodal.md``), and the raw
fraction is then a genuine estimate of 1/2 with an ESS-based standard error. Either way, since
q is M-invariant, for any chain whose draws follow a q|A or q|B or any
mixture of them (A, B the two modes, B = M A), the *symmetrised* sample {x_i} u {M x_i}
follows (q|A + q|B) / 2 = q. So the reference is all post-warm-up draws of all chains together
with their mirror images: its mode weights are exactly 1/2 by construction (not an estimate),
and its mean and std are exactly mirror-symmetric; what MCMC has to get right is the shape of
each mode. That is checked by the *folded* diagnostics: every draw is mapped to the truth's
side (x -> M x when x . d < 0, d the case's mirror-antisymmetric ``output.direction``), and the
split R-hat and bulk ESS of the folded chains are computed over all chains and per group.

Saves ``benchmarks/results/reference_elliptic.nc`` (thinned symmetrised samples, mean, std,
the mean of the truth's mode, the per-cell Monte-Carlo error of the mean, mode fractions,
nFS and diagnostics as attributes), ``reference_elliptic.json``, ``reference_elliptic.md`` and
``reference_elliptic.png``.
"""

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msign_linear import _image, machine  # noqa: E402

import geoinvert  # noqa: E402
from geoinvert.diagnostics import mcmc_ess, split_rhat  # noqa: E402
from geoinvert.samplers import run_hmc, run_mala, run_pcn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CASE = ROOT / "cases" / "elliptic_bimodal.yaml"
GROUPS = ("truth", "mirror", "prior")


def mirror(x):
    """The mirror s2 -> 1 - s2 of fields ``(..., ny, nx)`` (rows run along y)."""
    return np.flip(x, axis=-2)


def starts(case, per_group, *, spread, seed):
    """Initial fields ``(3 * per_group, ny, nx)``: near the truth, their mirrors, prior draws."""
    gen = torch.Generator().manual_seed(seed)
    prior = case.prior()
    noise = prior.sample(per_group, case.finest, generator=gen, dtype=torch.float64)
    mean = torch.as_tensor(prior.mean(case.finest))
    near = torch.as_tensor(case.truth) + spread * (noise - mean)
    from_prior = prior.sample(per_group, case.finest, generator=gen, dtype=torch.float64)
    return torch.cat([near, near.flip(-2), from_prior])


def run(case, args):
    """All chains as one batch with the chosen sampler; returns the ChainResult."""
    post = case.posterior(case.finest)
    init = starts(case, args.chains, spread=args.spread, seed=args.seed)
    common = dict(chains=len(init), draws=args.draws, warmup=args.warmup, thin=args.thin,
                  init=init, generator=torch.Generator().manual_seed(args.seed + 1))
    if args.method == "hmc":
        return run_hmc(post, n_leapfrog=args.leapfrog, step_size=0.05, **common)
    if args.method == "mala":
        return run_mala(post, step_size=0.1, **common)
    return run_pcn(post, beta=0.1, **common)


def projections(samples, direction):
    """t = x . d of draws ``(..., ny, nx)``, shape ``(...)``."""
    return samples.reshape(*samples.shape[:-2], -1) @ direction.ravel()


def folded(samples, direction):
    """Every draw mapped to the truth's side: M x where x . d < 0."""
    t = projections(samples, direction)
    return np.where((t < 0)[..., None, None], mirror(samples), samples)


def crossings(t, threshold):
    """Mode switches of each chain ``(chains, draws)`` with hysteresis: |t| must pass
    ``threshold`` on the other side before a switch counts."""
    out = []
    for row in t:
        side, count = 0, 0
        for v in row:
            new = 1 if v > threshold else -1 if v < -threshold else side
            count += side != 0 and new != side
            side = new
        out.append(count)
    return np.asarray(out)


def group_diagnostics(result, direction, rows):
    """R-hat and ESS (raw and folded), acceptance and mode fractions of one group of chains."""
    sub = dataclasses.replace(result, samples=result.samples[rows],
                              log_prob=result.log_prob[rows], acceptance=result.acceptance[rows])
    fold = dataclasses.replace(sub, samples=folded(sub.samples, direction))
    t = projections(sub.samples, direction)
    positive = (t > 0).mean(1)
    return {"chains": int(len(sub.samples)), "rhat": sub.rhat(), "ess": sub.ess(),
            "rhat_folded": fold.rhat(), "ess_folded": fold.ess(),
            "rhat_t": split_rhat(t), "ess_t": mcmc_ess(t),
            "rhat_abs_t": split_rhat(np.abs(t)), "ess_abs_t": mcmc_ess(np.abs(t)),
            "acceptance": sub.acceptance.tolist(), "mode_positive_per_chain": positive.tolist(),
            "mode_positive": float(positive.mean())}


def symmetry_check(post, truth, samples):
    """max |log q(M x) - log q(x)| at the truth and at a few draws."""
    x = torch.as_tensor(np.concatenate([truth[None], samples[:7]]))
    with torch.no_grad():
        diff = post.log_prob(x.flip(-2)) - post.log_prob(x)
    return float(diff.abs().max())


def reference_moments(result, direction, *, keep):
    """Symmetrised samples (thinned to ``keep`` before mirroring), mean, std, MC error."""
    draws = result.samples.reshape(-1, *result.samples.shape[2:])
    sym = np.concatenate([draws, mirror(draws)])
    mean, std = sym.mean(0), sym.std(0, ddof=1)
    fold = folded(result.samples, direction)
    mode_mean = fold.reshape(-1, *fold.shape[2:]).mean(0)
    cells = fold.reshape(*fold.shape[:2], -1)
    ess = np.array([mcmc_ess(cells[:, :, k]) for k in range(cells.shape[2])])
    ess = ess.reshape(fold.shape[2:])
    # the symmetrised mean is (m_F + M m_F) / 2 with m_F the folded mean, whose cells have
    # standard errors se = std_F / sqrt(ESS_F); by Cauchy-Schwarz (se + M se) / 2 bounds it
    se = fold.reshape(-1, *fold.shape[2:]).std(0, ddof=1) / np.sqrt(ess)
    mean_se = (se + mirror(se)) / 2
    stride = max(1, len(draws) // keep)
    thin = draws[::stride][:keep]
    return {"samples": np.concatenate([thin, mirror(thin)]), "mean": mean, "std": std,
            "mode_mean": mode_mean, "mean_se": mean_se, "cell_ess_folded": ess,
            "n_draws": int(len(draws))}


def save_netcdf(path, case, ref, attrs):
    """The reference as an xarray Dataset (CF-style coordinates), written atomically."""
    import xarray as xr
    xc, yc = case.centres()
    dims = ("y", "x")
    ds = xr.Dataset(
        {"samples": (("sample", *dims), ref["samples"]),
         "mean": (dims, ref["mean"]), "std": (dims, ref["std"]),
         "mode_mean": (dims, ref["mode_mean"]), "mean_se": (dims, ref["mean_se"]),
         "cell_ess_folded": (dims, ref["cell_ess_folded"]), "truth": (dims, case.truth)},
        coords={"x": ("x", xc, {"units": "1"}), "y": ("y", yc, {"units": "1"})},
        attrs={k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
               for k, v in attrs.items()})
    ds["mode_mean"].attrs["long_name"] = "mean of the truth's mode (draws folded by the mirror)"
    ds["mean_se"].attrs["long_name"] = ("upper bound of the Monte-Carlo standard error of mean "
                                        "(folded ESS)")
    ds["samples"].attrs["long_name"] = "thinned draws followed by their mirror images"
    tmp = Path(path).with_suffix(".nc.tmp")
    encoding = {"samples": {"dtype": "float32", "zlib": True, "complevel": 4}}
    ds.to_netcdf(tmp, encoding=encoding)
    tmp.replace(path)


def figure(path, result, ref, direction, truth, groups, title):
    """Traces of t = x . d and log q per chain, histogram of t, reference mean/std maps."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 6.4))
    axes = fig.subplots(2, 3)
    t = projections(result.samples, direction)
    colours = {"truth": "C0", "mirror": "C1", "prior": "C2"}
    for name, rows in groups.items():
        for k, row in enumerate(rows):
            axes[0, 0].plot(t[row], lw=0.4, color=colours[name],
                            label=f"{name} start" if k == 0 else None)
            axes[1, 0].plot(result.log_prob[row], lw=0.4, color=colours[name])
    t_true = float(truth.ravel() @ direction.ravel())
    for v in (t_true, -t_true):
        axes[0, 0].axhline(v, color="k", lw=0.6, ls="--")
    axes[0, 0].set(xlabel="draw after warm-up", ylabel="t = x . d", title=title)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].set(xlabel="draw after warm-up", ylabel="log q (unnormalised)")
    span = max(1.6 * abs(t_true), float(np.quantile(np.abs(t), 0.999)))
    axes[0, 1].hist(t.ravel(), bins=100, range=(-span, span), density=True, histtype="step",
                    label="raw chains")
    axes[0, 1].hist(projections(ref["samples"], direction), bins=100, range=(-span, span),
                    density=True, histtype="step", label="symmetrised reference")
    axes[0, 1].axvline(t_true, color="k", lw=0.6, ls="--")
    axes[0, 1].axvline(-t_true, color="k", lw=0.6, ls="--")
    axes[0, 1].set(xlabel="t = x . d", ylabel="density", title="marginal along d")
    axes[0, 1].legend(fontsize=7)
    _image(axes[1, 1], ref["mode_mean"], "mean of the truth's mode")
    _image(axes[0, 2], ref["mean"], "reference mean (symmetric)")
    _image(axes[1, 2], ref["std"], "reference std", "magma", 0, ref["std"].max() * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(name, args, summary, diag):
    lines = [
        f"# {name}", "", f"Command: `{summary['command']}`", "",
        f"Config: {json.dumps(vars(args))}", "",
        f"Sampler: {args.method} (prior-preconditioned, whitened coordinates), "
        f"{3 * args.chains} chains in one batch, {args.warmup} warm-up + {args.draws} draws "
        f"(thin {args.thin}), frozen step {summary['step_size']:.4g}"
        + (f", {args.leapfrog} leapfrog steps" if args.method == "hmc" else "") + ".", "",
        f"Cost: nFS {summary['nfs']} (all finest level; one forward + one adjoint solve per "
        f"chain per gradient evaluation, counted once as in the MsIGN paper), wall time "
        f"{summary['wall_s']:.0f} s. Machine: {summary['machine']}.", "",
        f"Symmetry check: max |log q(M x) - log q(x)| = {summary['symmetry_check']:.2e} at the "
        "truth and 7 draws.", "",
        "## Diagnostics per group of chains", "",
        "Raw: all 256 cells and log q; folded: every draw mapped to the truth's side first "
        "(the within-mode convergence the reference relies on). t = x . d.", "",
        "| group | chains | acceptance | R-hat raw | ESS raw | R-hat folded | ESS folded "
        "| R-hat t | R-hat abs t | ESS abs t | draws with t > 0 | crossings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g, d in diag["groups"].items():
        acc = np.asarray(d["acceptance"])
        lines.append(
            f"| {g} | {d['chains']} | {acc.mean():.2f} ({acc.min():.2f}-{acc.max():.2f}) | "
            f"{d['rhat']:.3f} | {d['ess']:.0f} | {d['rhat_folded']:.3f} | "
            f"{d['ess_folded']:.0f} | {d['rhat_t']:.3f} | {d['rhat_abs_t']:.3f} | "
            f"{d['ess_abs_t']:.0f} | {100 * d['mode_positive']:.1f} % | {d['crossings']} |")
    lines += [
        "", f"ESS: smallest bulk ESS over the summaries, summed over the group's chains. "
        f"Crossings: mode switches with hysteresis |t| > {summary['threshold']:.1f} "
        "(half the truth's t).", "",
        "## Reference", "",
        f"Raw fraction of draws with t > 0 over all chains: {100 * diag['raw_positive']:.1f} % "
        f"+/- {100 * diag['raw_positive_se']:.1f} % (ESS of t, summed over the groups: "
        f"{diag['ess_t_all']:.0f}); "
        + (f"the chains crossed between the sides {diag['crossings']} times, so this is a "
           "genuine estimate of the mode weight (exact: 50 %)."
           if diag["crossings"] >= 10 * sum(d["chains"] for d in diag["groups"].values())
           else f"only {diag['crossings']} crossings, so it mostly reflects the starts.")
        + " The reference is every post-warm-up "
        "draw plus its mirror image, so its mode fractions are exactly 50 / 50 and its mean "
        "and std are mirror-symmetric by construction (see the module docstring for why this "
        "is exact).", "",
        f"Monte-Carlo error of the reference mean: ||mean_se|| / ||std|| = "
        f"{diag['mean_se_rel']:.3f} (the floor of any mean error measured against it); "
        f"per-cell folded ESS {diag['cell_ess_min']:.0f} (min) to {diag['cell_ess_median']:.0f} "
        "(median).", "",
        f"Saved: `{name}.nc` with {diag['saved_samples']} samples "
        f"({diag['saved_samples'] // 2} thinned draws + mirrors, float32) of "
        f"{diag['n_draws']} draws, "
        "mean, std, mode_mean, mean_se.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="hmc", choices=["hmc", "mala", "pcn"])
    p.add_argument("--chains", type=int, default=6, help="chains per group (3 groups)")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--thin", type=int, default=1)
    p.add_argument("--leapfrog", type=int, default=25, help="HMC leapfrog steps")
    p.add_argument("--spread", type=float, default=0.3, help="start = truth + spread * prior")
    p.add_argument("--keep", type=int, default=500, help="thinned draws saved (x2 mirrored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    name = "reference_elliptic" + (f"_{args.tag}" if args.tag else "")
    started = time.perf_counter()
    case = geoinvert.load_case(CASE)
    direction = case.evaluate(case.config["output"]["direction"])
    result = run(case, args)
    groups = {g: list(range(k * args.chains, (k + 1) * args.chains))
              for k, g in enumerate(GROUPS)}
    threshold = 0.5 * abs(float(case.truth.ravel() @ direction.ravel()))
    t = projections(result.samples, direction)
    diag = {"groups": {}}
    for g, rows in groups.items():
        diag["groups"][g] = group_diagnostics(result, direction, rows)
        diag["groups"][g]["crossings"] = int(crossings(t[rows], threshold).sum())
    diag["all_folded_rhat"] = dataclasses.replace(
        result, samples=folded(result.samples, direction)).rhat()
    diag["raw_positive"] = float((t > 0).mean())
    diag["ess_t_all"] = sum(d["ess_t"] for d in diag["groups"].values())  # independent groups
    diag["raw_positive_se"] = math.sqrt(diag["raw_positive"] * (1 - diag["raw_positive"])
                                        / diag["ess_t_all"])
    diag["crossings"] = sum(d["crossings"] for d in diag["groups"].values())
    ref = reference_moments(result, direction, keep=args.keep)
    diag.update(mean_se_rel=float(np.linalg.norm(ref["mean_se"]) / np.linalg.norm(ref["std"])),
                cell_ess_min=float(ref["cell_ess_folded"].min()),
                cell_ess_median=float(np.median(ref["cell_ess_folded"])),
                saved_samples=int(len(ref["samples"])), n_draws=ref["n_draws"])
    summary = {"command": "python benchmarks/reference_elliptic.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "nfs": int(result.nfs), "step_size": float(result.step_size),
               "sampling_s": result.wall_time, "wall_s": time.perf_counter() - started,
               "machine": machine(), "threshold": threshold,
               "symmetry_check": symmetry_check(case.posterior(case.finest), case.truth,
                                                result.samples[:, -1])}
    md = markdown(name, args, summary, diag)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"config": vars(args), "summary": summary, "diagnostics": diag}, indent=1))
    attrs = {"method": args.method, "nfs": summary["nfs"], "wall_s": summary["wall_s"],
             "mode_positive": 0.5, "mode_positive_raw": diag["raw_positive"],
             "construction": "post-warm-up draws of all chains plus their mirror images "
                             "x[::-1, :] (exact symmetry q(Mx) = q(x))",
             "rhat_folded": diag["all_folded_rhat"], "mean_se_rel": diag["mean_se_rel"],
             "case": CASE.read_text(), "command": summary["command"]}
    save_netcdf(RESULTS / f"{name}.nc", case, ref, attrs)
    figure(RESULTS / f"{name}.png", result, ref, direction, case.truth, groups,
           f"{name}: {args.method}, {3 * args.chains} chains")


if __name__ == "__main__":
    main()
