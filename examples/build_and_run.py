"""Worked example: build an inversion in pure Python, run MsIGN on it and plot with xarray.

Run ``python examples/build_and_run.py [OUTDIR]``; set ``GEOINVERT_EXAMPLE_SMALL=1`` for a
seconds-long smoke run (used by the tests).
"""

import os
import sys
from pathlib import Path

import geoinvert


def make_case(small):
    """A linear test bed: four Gaussian-weighted averages of a 16 x 16 field, truth from the prior."""
    bumps = [{"shape": "gaussian", "center": [cx, cy], "width": 0.12}
             for cx, cy in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]]
    return geoinvert.load_case({
        "name": "example",
        "levels": {"finest": 3 if small else 4},
        "prior": {"kind": "matern", "std": 1.0, "correlation_length": 0.25},
        "forward": {"kind": "linear"},
        "observations": {"functions": bumps},
        "data": {"synthetic": {"truth": "prior", "seed": 3}},
        "noise": {"std": 0.005},
        "sampler": {"blocks": 1 if small else 4, "hidden": 4 if small else 32,
                    "steps": 2 if small else 300, "batch": 8 if small else 64,
                    # the correction's defaults suit real runs; the smoke test keeps it tiny
                    **({"correction": {"chains": 2, "warmup": 10, "draws": 5, "max_draws": 5,
                                    "leapfrog": 2}}
                       if small else {})},
        "output": {"samples": 40 if small else 500},
    })


def plot(ds, outdir):
    """Truth, posterior mean and std with xarray's plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    ds["truth"].plot(ax=axes[0])
    ds["mean"].plot(ax=axes[1])
    ds["std"].plot(ax=axes[2], cmap="magma")
    for ax, title in zip(axes, ["truth", "posterior mean", "posterior std"]):
        ax.set_title(title)
        ax.set_aspect("equal")
    path = Path(outdir) / "example.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(outdir="results/example"):
    small = os.environ.get("GEOINVERT_EXAMPLE_SMALL") == "1"
    case = make_case(small)
    result = geoinvert.run(case, out=Path(outdir) / "example.nc", progress=not small)
    ds = result.dataset
    print(f"flow: is-ESS {ds.attrs['diagnostics_is_ess']:.2f}, "
          f"k-hat {ds.attrs['diagnostics_psis_khat']:.2f}; corrected draws: "
          f"R-hat {ds.attrs['diagnostics_rhat']:.3f}, ESS {ds.attrs['diagnostics_ess']:.0f}; "
          f"verdict: {ds.attrs['verdict']}")
    print(f"wrote {result.path} and {plot(ds, outdir)}")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
