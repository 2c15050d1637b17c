"""Ensembles of log-coefficient fields, the training data of learned priors.

:func:`channel_fields` draws channelised facies, the kind of geology a Gaussian prior does not
describe: a few sinuous channels of high permeability in a low-permeability background,
smoothed into a log-permeability. The random process of one field on an ``size x size``
lattice of the unit square:

1. the number of channels is uniform on ``channels`` (inclusive);
2. each channel has an orientation uniform on [0, pi), a width uniform on ``width`` (a
   fraction of the side), a centreline offset uniform across the square, and a sinuous
   centreline ``v = a sin(2 pi u / wavelength + phase)`` in the channel's frame (u along it),
   with amplitude uniform on ``amplitude`` and wavelength uniform on ``wavelength`` (fractions
   of the side) and phase uniform on [0, 2 pi);
3. a cell is channel facies when its centre lies within half the width of some centreline;
4. the log-permeability is ``background + (channel - background) * facies`` smoothed by a
   Gaussian filter of ``smoothing`` cells, plus white noise of std ``noise``.

:func:`gaussian_fields` draws an ensemble from a case's own prior (the test of a learned prior:
its covariance must match the analytic one). :func:`gstools_fields` draws Gaussian random
fields of a covariance model of the maintained geostatistics package GSTools (Gaussian,
exponential or Matern, by its randomisation method), optionally truncated into two facies
(a truncated Gaussian field: ``low`` where the field is below ``threshold`` standard
deviations, ``high`` above), an alternative source to the channel generator. :func:`write_ensemble` and
:func:`read_ensemble` store an ensemble as netCDF: variable ``field (sample, y, x)`` with the
generator and its parameters as attributes.
"""

import json
from pathlib import Path

import numpy as np

__all__ = ["CHANNEL_DEFAULTS", "channel_fields", "gaussian_fields", "gstools_fields",
           "GSTOOLS_MODELS", "write_ensemble", "read_ensemble"]

GSTOOLS_MODELS = ("gaussian", "exponential", "matern")
"""Covariance models of :func:`gstools_fields` (GSTools' ``Gaussian``, ``Exponential`` and
``Matern`` with smoothness ``nu``)."""

CHANNEL_DEFAULTS = {"channels": (2, 5), "width": (0.04, 0.10), "amplitude": (0.02, 0.12),
                    "wavelength": (0.3, 1.0), "channel": 2.0, "background": -1.0,
                    "smoothing": 0.7, "noise": 0.05}
"""Parameters of :func:`channel_fields` (log-permeabilities in natural-log units)."""


def channel_fields(num, size, *, seed=0, **parameters):
    """``num`` channelised log-permeability fields ``(num, size, size)`` (see the module text).

    Args:
        num, size: Fields and cells per side.
        seed: Seed of the process (the same seed gives the same ensemble).
        parameters: Overrides of :data:`CHANNEL_DEFAULTS`.

    Returns:
        ``(fields, facies)``: float64 ``(num, size, size)`` and the channel indicator, bool.
    """
    from scipy.ndimage import gaussian_filter
    p = {**CHANNEL_DEFAULTS, **parameters}
    unknown = set(parameters) - set(CHANNEL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown channel parameters {sorted(unknown)}; known: "
                         f"{sorted(CHANNEL_DEFAULTS)}")
    rng = np.random.default_rng(seed)
    centres = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(centres, centres)
    fields = np.empty((num, size, size))
    facies = np.zeros((num, size, size), dtype=bool)
    for k in range(num):
        for _ in range(rng.integers(p["channels"][0], p["channels"][1] + 1)):
            theta = rng.uniform(0, np.pi)
            width = rng.uniform(*p["width"])
            amp, wave = rng.uniform(*p["amplitude"]), rng.uniform(*p["wavelength"])
            phase, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.5, 0.5)
            u = (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta)
            v = -(xx - 0.5) * np.sin(theta) + (yy - 0.5) * np.cos(theta) - offset
            facies[k] |= np.abs(v - amp * np.sin(2 * np.pi * u / wave + phase)) < width / 2
        value = p["background"] + (p["channel"] - p["background"]) * facies[k]
        fields[k] = gaussian_filter(value, p["smoothing"], mode="nearest") if p["smoothing"] \
            else value
        fields[k] += p["noise"] * rng.standard_normal((size, size))
    return fields, facies


def gaussian_fields(case, num, *, seed=0):
    """``num`` draws ``(num, n, n)`` of the case's prior on its finest level."""
    import torch
    x = case.prior().sample(num, case.finest, generator=torch.Generator().manual_seed(seed))
    return x.numpy()


def gstools_fields(num, size, *, model="matern", var=1.0, len_scale=0.2, nu=1.5, mean=0.0,
                   truncate=None, low=-1.0, high=2.0, seed=0):
    """``num`` fields ``(num, size, size)`` on the unit square's cell centres, drawn with
    GSTools: a stationary Gaussian random field of covariance ``model`` (variance ``var``,
    length scale ``len_scale``, Matern smoothness ``nu``) and mean ``mean``; with ``truncate``
    (a threshold in standard deviations) the two facies ``low`` / ``high`` instead.

    Raises:
        ValueError: an unknown model, or a non-positive variance or length scale.
    """
    import gstools as gs
    if model not in GSTOOLS_MODELS:
        raise ValueError(f"model must be one of {GSTOOLS_MODELS}, got {model!r}")
    if not (var > 0 and len_scale > 0 and nu > 0):
        raise ValueError("var, len_scale and nu must be positive")
    kinds = {"gaussian": gs.Gaussian, "exponential": gs.Exponential, "matern": gs.Matern}
    extra = {"nu": nu} if model == "matern" else {}
    cov = kinds[model](dim=2, var=var, len_scale=len_scale, **extra)
    srf = gs.SRF(cov, mean=mean)
    centres = (np.arange(size) + 0.5) / size
    fields = np.empty((num, size, size))
    rng = np.random.default_rng(seed)
    for k in range(num):
        # GSTools indexes structured fields [x, y]; the lattice is [y, x]
        fields[k] = srf.structured([centres, centres], seed=int(rng.integers(2**31))).T
    if truncate is not None:
        fields = np.where(fields > mean + truncate * np.sqrt(var), high, low)
    return fields


def write_ensemble(path, fields, *, generator, parameters, bounds=(0.0, 1.0, 0.0, 1.0)):
    """Write ``fields (num, n, n)`` to a netCDF file at ``path`` (atomically)."""
    import xarray as xr
    from geoinvert.io import atomic_path
    fields = np.asarray(fields, float)
    n = fields.shape[1]
    x0, x1, y0, y1 = bounds
    ds = xr.Dataset(
        {"field": (("sample", "y", "x"), fields, {"long_name": "log-coefficient field"})},
        coords={"x": (np.arange(n) + 0.5) / n * (x1 - x0) + x0,
                "y": (np.arange(n) + 0.5) / n * (y1 - y0) + y0},
        attrs={"title": f"geoinvert ensemble: {generator}", "generator": generator,
               "parameters": json.dumps(parameters)})
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp)
    return Path(path)


def read_ensemble(path, variable="field"):
    """The fields ``(num, n, n)`` of an ensemble file: a netCDF variable ``(sample, y, x)``
    with equal, power-of-two sides.

    Raises:
        ValueError: not readable, no such variable, or not square power-of-two fields.
    """
    from geoinvert.io import read_variable
    _, fields = read_variable(path, (variable,))
    if fields.ndim != 3 or fields.shape[1] != fields.shape[2] or \
            fields.shape[1] & (fields.shape[1] - 1):
        raise ValueError(f"{path}: {variable!r} must be (sample, n, n) with n a power of two, "
                         f"got shape {fields.shape}")
    if not np.isfinite(fields).all():
        raise ValueError(f"{path}: {variable!r} must be finite")
    return fields
