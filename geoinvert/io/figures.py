"""Figures of a result: posterior maps, samples, the marginal along the data direction and
the training history, each with the verdict as a caption line."""

import logging
from pathlib import Path

import numpy as np

from geoinvert.io.dataset import marginal_direction

__all__ = ['figures']

logger = logging.getLogger(__name__)


def _image(ax, da, title, ds, cmap="viridis", limits=None):
    x, y = ds["x"].values, ds["y"].values
    dx, dy = (x[1] - x[0]) / 2 if x.size > 1 else 0.5, (y[1] - y[0]) / 2 if y.size > 1 else 0.5
    vmin, vmax = limits if limits is not None else (None, None)
    im = ax.imshow(np.asarray(da), origin="lower", cmap=cmap, aspect="equal", vmin=vmin,
                   vmax=vmax, extent=(x[0] - dx, x[-1] + dx, y[0] - dy, y[-1] + dy))
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    if "obs_x" in ds:
        ax.plot(ds["obs_x"].values, ds["obs_y"].values, "w^", ms=4, mec="k", mew=0.5)
    return im


def _subplots(nrows, ncols, *, figsize, squeeze=True):
    """A figure and its axes without pyplot (no GUI backend, nothing global)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _caption(ds, width):
    """The result's verdict as a caption line (or lines, wrapped at ``width`` characters)."""
    import textwrap
    verdict = ds.attrs.get("verdict")
    if verdict is None:
        return ""
    text = f"{ds.attrs.get('sampler', '')}: " + (
        "verdict ok" if verdict == "ok" else "NOT RELIABLE - " + verdict)
    return "\n".join(textwrap.wrap(text, width))


def _save(fig, path, ds=None):
    """Save ``fig`` with the verdict of ``ds`` as a caption right below its lowest axes (their
    tick labels included), wherever the axes' aspect left them in the figure."""
    caption = _caption(ds, int(fig.get_figwidth() * 14)) if ds is not None else ""
    if caption:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw_without_rendering()
        bottom = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
        y = fig.transFigure.inverted().transform((0, bottom))[1]
        fig.text(0.0, y - 0.02, caption, fontsize=7, va="top", ha="left",
                 color="k" if ds.attrs["verdict"] == "ok" else "firebrick")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _maps_figure(ds, outdir):
    panels = [("truth", "truth")] if "truth" in ds else []
    panels += [("mean", "posterior mean"), ("std", "posterior std")]
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    fields = [ds[var].values for var, _ in panels if var != "std"]
    shared = (min(np.nanmin(f) for f in fields), max(np.nanmax(f) for f in fields))
    for ax, (var, title) in zip(axes[0], panels):
        # the truth and the mean on one colour scale, so that they can be compared by eye
        _image(ax, ds[var].values, title, ds, "magma" if var == "std" else "viridis",
               None if var == "std" else shared)
    return _save(fig, outdir / "mean_std.png", ds)


def _samples_figure(ds, outdir, count=4):
    n = min(count, ds.sizes["sample"])
    fig, axes = _subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, i in zip(axes[0], np.linspace(0, ds.sizes["sample"] - 1, n).astype(int)):
        _image(ax, ds["samples"].values[i], f"sample {i}", ds)
    return _save(fig, outdir / "samples.png", ds)


def _training_figure(ds, outdir):
    """The loss per stage against nFS and, when training measured them, the importance ESS
    of the forward KL's proposal draws (solid; Jeffreys) and of the flow's own draws
    (dashed); a variational run (one stage, ELBO) shows its loss as -ELBO."""
    curves = [ds[k].values if k in ds else np.full(ds.sizes["step"], np.nan)
              for k in ("train_ess", "train_flow_ess")]
    with_ess = any(np.isfinite(c).any() for c in curves)
    fig, axes = _subplots(1, 2 if with_ess else 1, figsize=(9, 3.4) if with_ess else (5, 3.4),
                          squeeze=False)
    ax1 = axes[0][0]
    nfs = ds["train_nfs"].values
    variational = ds.attrs.get("sampler") in ("iaf", "meanfield")
    for stage in np.unique(ds["train_stage"].values):
        sel = ds["train_stage"].values == stage
        label = f"level {stage}" if variational else f"stage {stage}"
        line, = ax1.plot(nfs[sel], ds["train_loss"].values[sel], label=label)
        if with_ess:
            for curve, style in zip(curves, ("-", "--")):
                axes[0][1].plot(nfs[sel], curve[sel], style, color=line.get_color())
    ylabel = "-ELBO (reverse KL - log Z)" if variational else "loss"
    ax1.set(xlabel="forward solves (nFS)", ylabel=ylabel, title="training loss")
    if with_ess:
        axes[0][1].set(xlabel="forward solves (nFS)", ylabel="ESS / n", ylim=(0, 1.05),
                       title="importance ESS\n(solid: proposal's draws; dashed: the flow's own)")
    ax1.legend(fontsize=7)
    return _save(fig, outdir / "training.png", ds)


def _marginal_figure(ds, outdir):
    d = marginal_direction(ds)
    proj = np.tensordot(ds["samples"].values, d, axes=([1, 2], [0, 1]))
    fig, ax = _subplots(1, 1, figsize=(5, 3.4))
    ax.hist(proj, bins=min(60, max(10, proj.size // 10)), density=True, alpha=0.75,
            label="posterior samples")
    if "truth" in ds:
        ax.axvline(float(np.sum(ds["truth"].values * d)), color="k", ls="--", label="truth")
    which = "given direction" if "direction" in ds else "leading principal component"
    ax.set(xlabel=f"<d, x>  ({which})", ylabel="density", title="marginal along a direction")
    ax.legend(fontsize=8)
    return _save(fig, outdir / "marginal.png", ds)


def figures(ds, outdir):
    """Write PNG figures of a result: maps, samples, training curves, a marginal.

    Args:
        ds: Result Dataset (see :func:`build_dataset`).
        outdir: Folder for the PNGs (created).

    Returns:
        List of written paths: ``mean_std.png`` (with the truth when known), ``samples.png``,
        ``marginal.png`` and, when training curves are present, ``training.png``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [_maps_figure(ds, outdir), _samples_figure(ds, outdir), _marginal_figure(ds, outdir)]
    if "train_loss" in ds:
        paths.append(_training_figure(ds, outdir))
    logger.info("wrote %d figures to %s", len(paths), outdir)
    return paths
