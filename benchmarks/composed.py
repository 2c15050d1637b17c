"""Posteriors on a learned prior: composed flows (an IAF in the prior's latent space,
corrected) against MCMC in the same latent space at equal nFS, naive VI in the fields, and
the Gaussian check.

Three parts, each from the package's own generators (no download):

1. **Gaussian check.** A learned prior fitted to 2000 draws of a known Matern prior is nearly
   that Gaussian, so the composed posterior of an elliptic case (8x8, nine heads) on it must
   match the posterior on the Gaussian prior itself (the default MsIGN run, corrected to
   exactness): mean and std errors in that posterior's std units.
2. **Channels.** A learned prior fitted to 2000 channel fields of 8x8 (``geoinvert ensemble
   channels``; MsIGN with 2 blocks of width 16 a level, whose evaluation, not the PDE solve,
   dominates a run's time at this size, with the IAF's sequential density); the truth is a fresh channel field, observed through nine heads and four
   hard data (wells). The composed run and HMC in the prior's latent space at the same nFS:
   R-hat, ESS, the hard data's residuals in noise units, and their difference in posterior
   std units; a figure of the truth, draws, mean and std.
3. **Naive VI in the fields.** The same IAF trained by the reverse KL on the channel
   posterior directly in the fields (the learned prior's density evaluated through G^-1)
   against the IAF in the latent space, with equal steps, uncorrected: ELBO (the KL is the
   same in both spaces, so the ELBOs compare) and PSIS k-hat.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/composed.py [--parts gaussian,channels]

Writes benchmarks/results/composed.json (the parts run replace theirs, the others are kept),
composed.md and composed_channels.png.
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
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import geoinvert  # noqa: E402
from geoinvert.ensembles import channel_fields  # noqa: E402
from geoinvert.priors import MaternPrior  # noqa: E402
from geoinvert.priors.learned import fit_prior  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LEVEL, N = 3, 8                  # the channels' lattice, as the Gaussian check's
PRIOR_NET = {"blocks": 2, "hidden": 16}
HEADS = [[x, y] for y in (0.25, 0.5, 0.75) for x in (0.25, 0.5, 0.75)]
WELLS = [[0.1, 0.1], [0.1, 0.9], [0.9, 0.1], [0.9, 0.9]]
MATERN = {"std": 1.0, "correlation_length": 0.3}
ENSEMBLE, EPOCHS = 2000, 15


def _case(prior, sampler, data, hard=None, noise=0.01, level=LEVEL):
    obs = {"points": HEADS}
    if hard is not None:
        obs["hard_data"] = {"points": WELLS, "noise": 0.05}
    return {"name": "composed-bench", "levels": {"finest": level, "min_cells": 16},
            "prior": prior, "forward": {"kind": "elliptic", "source": 1.0,
                                        "dirichlet": {"left": 1.0, "right": 0.0}},
            "observations": obs, "data": data, "noise": {"std": noise}, "sampler": sampler,
            "output": {"samples": 1000, "figures": False}}


def _run(config, folder, name):
    start = time.perf_counter()
    result = geoinvert.run(geoinvert.load_case(config, folder=folder), out=folder / f"{name}.nc",
                           progress=False)
    ds = result.dataset
    a = ds.attrs
    return ds, {"nfs": int(a["nfs"]), "wall_s": time.perf_counter() - start,
                "verdict": a["verdict"], "rhat": a.get("diagnostics_rhat", math.nan),
                "ess": a.get("diagnostics_ess", math.nan),
                "khat": a.get("diagnostics_psis_khat", math.nan)}


def _errors(ds, ref):
    """RMS over cells of the mean and std differences in ``ref``'s std units."""
    x, r = ds["samples"].values, ref["samples"].values
    sd = r.std(0)
    return {"mean_error_rms": float(np.sqrt(np.mean(((x.mean(0) - r.mean(0)) / sd) ** 2))),
            "std_error_rms": float(np.sqrt(np.mean((x.std(0) / sd - 1) ** 2)))}


def _fit(fields, folder, name):
    start = time.perf_counter()
    learned = fit_prior(fields, epochs=EPOCHS, seed=0, **PRIOR_NET)
    path = folder / f"{name}.pt"
    learned.save(path)
    r = learned.report
    return path, {"gaussian_nll": r["gaussian_nll"], "learned_nll": r["learned_nll"],
                  "fit_s": time.perf_counter() - start}


def _hmc_like(nfs):
    """HMC in the latent space with about ``nfs`` solves: 8 chains, 16 leapfrog steps."""
    chains, leapfrog = 8, 16
    iterations = max(nfs // (chains * leapfrog), 80)
    warmup = iterations // 3
    return {"kind": "hmc", "chains": chains, "leapfrog": leapfrog, "warmup": warmup,
            "draws": iterations - warmup}


def gaussian_check(folder, level=3):
    gaussian = MaternPrior(level, alpha=2, boundary="neumann", **MATERN)
    fields = gaussian.sample(ENSEMBLE, level, generator=torch.Generator().manual_seed(0))
    path, fit = _fit(fields.numpy(), folder, "gaussian_prior")
    data = {"synthetic": {"truth": "prior", "seed": 11}}
    exact_prior = {"kind": "matern", "boundary": "neumann", **MATERN}
    ref, ref_row = _run(_case(exact_prior, {}, data, level=level), folder,
                        "gaussian_reference")
    # the same truth and data for the learned prior: the reference case's data as values
    values = ref["observed"].values.tolist()
    composed, row = _run(_case({"kind": "learned", "model": str(path)}, {"kind": "composed"},
                               {"values": values}, level=level), folder, "gaussian_composed")
    return {"fit": fit, "reference": ref_row, "composed": {**row, **_errors(composed, ref)}}


def channels(folder):
    fields, _ = channel_fields(ENSEMBLE, N, seed=0)
    path, fit = _fit(fields, folder, "channel_prior")
    truth = channel_fields(1, N, seed=12345)[0][0]
    xr.Dataset({"truth": (("y", "x"), truth)}).to_netcdf(folder / "truth.nc")
    data = {"synthetic": {"file": str(folder / "truth.nc"), "seed": 3}}
    prior = {"kind": "learned", "model": str(path)}
    composed, row = _run(_case(prior, {"kind": "composed"}, data, hard=True), folder,
                         "channels_composed")
    hmc, hrow = _run(_case(prior, _hmc_like(row["nfs"]), data, hard=True), folder,
                     "channels_hmc")
    hard = slice(len(HEADS), None)
    residual = lambda ds: ((ds["predictive_mean"].values[hard] - ds["observed"].values[hard])  # noqa: E731
                           / ds["noise_std"].values[hard])
    row["hard_residual_max"] = float(np.abs(residual(composed)).max())
    hrow["hard_residual_max"] = float(np.abs(residual(hmc)).max())
    heads = slice(0, len(HEADS))
    misfit = lambda ds: float(np.sqrt(np.mean(((ds["predictive_mean"].values[heads]  # noqa: E731
                                               - ds["observed"].values[heads])
                                              / ds["noise_std"].values[heads]) ** 2)))
    row["head_misfit_rms"], hrow["head_misfit_rms"] = misfit(composed), misfit(hmc)
    _figure(truth, composed, RESULTS / "composed_channels.png")
    return {"fit": fit, "composed": row, "hmc": {**hrow, **_errors(hmc, composed)},
            "path": path, "data": data}


def naive_vi(folder, path, data):
    """The IAF trained in the fields against the IAF trained in the latent space."""
    from geoinvert.flows.autoregressive import IAF
    from geoinvert.inference.vi import train_vi
    from geoinvert.priors.learned import LearnedPrior
    from geoinvert.diagnostics import psis_khat
    case = geoinvert.load_case(_case({"kind": "learned", "model": str(path)},
                                     {"kind": "composed", "correction": "none"}, data,
                                     hard=True), folder=folder)
    steps, batch = 300, 64
    rows = {}
    for space in ("latent", "fields"):
        start = time.perf_counter()
        if space == "latent":
            ds, row = _run({**_case({"kind": "learned", "model": str(path)},
                                    {"kind": "composed", "correction": "none", "steps": steps,
                                     "batch": batch}, data, hard=True)}, folder, "vi_latent")
            lw = ds["log_target"].values - ds["log_prob"].values
        else:
            learned = LearnedPrior.load(path)
            posterior = case.posterior()
            torch.manual_seed(0)
            model = IAF(learned.gaussian, LEVEL, transforms=4, hidden=32)
            train_vi(model, posterior, steps=steps, batch=batch,
                     generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                z = torch.randn((1000, model.dim), generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64)
                x, logdet = model.to_x(z)
                log_q = -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) \
                    - logdet
                log_p = torch.cat([posterior.log_prob(b) for b in x.split(200)])
            lw = (log_p - log_q).numpy()
        finite = np.isfinite(lw)
        rows[space] = {"elbo": float(lw[finite].mean()), "khat": float(psis_khat(lw[finite])),
                       "failed": int((~finite).sum()), "wall_s": time.perf_counter() - start}
    return rows


def _figure(truth, ds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = ds["samples"].values
    panels = [("truth", truth), ("draw 1", x[0]), ("draw 2", x[len(x) // 2]),
              ("posterior mean", x.mean(0)), ("posterior std", x.std(0))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    lo, hi = np.percentile(truth, [1, 99])
    for ax, (title, field) in zip(axes, panels):
        im = ax.imshow(field, origin="lower", extent=(0, 1, 0, 1), cmap="viridis",
                       vmin=None if "std" in title else lo, vmax=None if "std" in title else hi)
        ax.plot(*np.asarray(HEADS).T, "w^", ms=5, mec="k", mew=0.5, label="heads")
        ax.plot(*np.asarray(WELLS).T, "rs", ms=5, label="hard data")
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    fig.suptitle("Channel prior learned from 2000 fields: composed-flow posterior "
                 f"({ds.attrs['verdict']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(out, command):
    g, c, v = out["gaussian"], out["channels"], out["naive_vi"]
    lines = ["# Posteriors on a learned prior: composed flows", "", f"Command: `{command}`", "",
             "## Gaussian check (learned prior fitted to a known Matern prior)", "",
             f"Held-out NLL per dimension: fitted Gaussian {g['fit']['gaussian_nll']:.4f}, "
             f"learned prior {g['fit']['learned_nll']:.4f} nats.", "",
             "| run | nFS | wall (s) | R-hat | mean err | std err | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| Gaussian prior, default MsIGN (reference) | {g['reference']['nfs']} | "
             f"{g['reference']['wall_s']:.0f} | {g['reference']['rhat']:.3f} | - | - | "
             f"{g['reference']['verdict']} |",
             f"| learned prior, composed | {g['composed']['nfs']} | "
             f"{g['composed']['wall_s']:.0f} | {g['composed']['rhat']:.3f} | "
             f"{g['composed']['mean_error_rms']:.3f} | {g['composed']['std_error_rms']:.3f} | "
             f"{g['composed']['verdict']} |"]
    if "composed_flow_coordinates" in g:
        f = g["composed_flow_coordinates"]
        lines.append(f"| learned prior, composed, correction in the IAF's latent space | "
                     f"{f['nfs']} | {f['wall_s']:.0f} | {f['rhat']:.3f} | "
                     f"{f['mean_error_rms']:.3f} | {f['std_error_rms']:.3f} | "
                     f"{f['verdict'][:60]} |")
    lines += ["",
             "## Channels (nine heads, four hard data)", "",
             f"Held-out NLL per dimension: fitted Gaussian {c['fit']['gaussian_nll']:.4f}, "
             f"learned prior {c['fit']['learned_nll']:.4f} nats.", "",
             "| run | nFS | wall (s) | R-hat | ESS | hard-data residual (max, noise units) | "
             "head misfit (RMS, noise units) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in (("composed", c["composed"]), ("HMC in the latent space", c["hmc"])):
        lines.append(f"| {name} | {row['nfs']} | {row['wall_s']:.0f} | {row['rhat']:.3f} | "
                     f"{row['ess']:.0f} | {row['hard_residual_max']:.2f} | "
                     f"{row['head_misfit_rms']:.2f} | {row['verdict']} |")
    lines += ["", f"HMC against the composed posterior: mean difference "
              f"{c['hmc']['mean_error_rms']:.3f}, std difference {c['hmc']['std_error_rms']:.3f}"
              " (RMS over cells, in the composed posterior's std units).", "",
              "![channels](composed_channels.png)", "",
              "## Variational inference in the fields against the latent space (IAF, "
              "equal steps, uncorrected)", "",
              "| space | ELBO | PSIS k-hat | failed draws of 1000 | wall (s) |",
              "| --- | --- | --- | --- | --- |"]
    for space, row in v.items():
        lines.append(f"| {space} | {row['elbo']:.2f} | {row['khat']:.2f} | {row['failed']} | "
                     f"{row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="gaussian,channels",
                   help="gaussian (the check on a Gaussian ensemble), channels (with the "
                   "naive VI comparison)")
    parts = p.parse_args().parts.split(",")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/composed.py"
    path = RESULTS / "composed.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "gaussian" in parts:
            out["gaussian"] = gaussian_check(folder)
            print(json.dumps(out["gaussian"], indent=1), flush=True)
        if "channels" in parts:
            ch = channels(folder)
            out["naive_vi"] = naive_vi(folder, ch.pop("path"), ch.pop("data"))
            out["channels"] = ch
            print(json.dumps({k: out[k] for k in ("channels", "naive_vi")}, indent=1),
                  flush=True)
    out["about"] = {"machine": platform.machine(), "threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if all(k in out for k in ("gaussian", "channels", "naive_vi")):
        (RESULTS / "composed.md").write_text(markdown(out, command))
        print(markdown(out, command))


if __name__ == "__main__":
    main()
