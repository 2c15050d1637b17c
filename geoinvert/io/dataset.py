"""The result Dataset (xarray, CF conventions) and its atomic netCDF files."""

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ['build_dataset', 'write_netcdf', 'atomic_path', 'read_result', 'marginal_direction']

logger = logging.getLogger(__name__)


def _centres(lo, hi, n):
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n


def _coords(bounds, shape, units, suffix=""):
    """Cell-centre coordinates ``x{suffix}``, ``y{suffix}`` with CF attributes."""
    (ny, nx), (x0, x1, y0, y1) = shape, bounds
    return {
        f"x{suffix}": (f"x{suffix}", _centres(x0, x1, nx),
                       {"units": units, "long_name": "cell-centre x coordinate", "axis": "X"}),
        f"y{suffix}": (f"y{suffix}", _centres(y0, y1, ny),
                       {"units": units, "long_name": "cell-centre y coordinate", "axis": "Y"}),
    }


def _field_vars(samples, quantiles, draws=None, moments=None, chunk=256):
    """Samples ``(n, ny, nx)`` and the mean, std and quantiles as data variables: those of
    ``draws (m, ny, nx)`` (all the draws the stored samples were thinned from; the samples
    themselves when None), or with ``moments = (mean, std)`` of a Gaussian answer, these and
    the Gaussian's quantiles. The draws' quantiles are taken a block of ``chunk`` cells at a
    time, so that a long chain's draws are not copied whole."""
    lab = {"long_name": "log-coefficient"}
    if moments is not None:
        from scipy.stats import norm
        mean, std = (np.asarray(m, dtype=float) for m in moments)
        q = mean + std * norm.ppf(quantiles)[:, None, None]
    else:
        draws = samples if draws is None else np.asarray(draws, dtype=float)
        flat = draws.reshape(draws.shape[0], -1)
        q = np.concatenate([np.quantile(flat[:, i:i + chunk], quantiles, axis=0)
                            for i in range(0, flat.shape[1], chunk)], axis=1)
        mean, std = draws.mean(axis=0), draws.std(axis=0, ddof=1)
    return {
        "samples": (("sample", "y", "x"), samples, {**lab, "long_name": "posterior samples"}),
        "mean": (("y", "x"), mean, {"long_name": "posterior mean"}),
        "std": (("y", "x"), std, {"long_name": "posterior std"}),
        "quantiles": (("quantile", "y", "x"), q.reshape(len(quantiles), *samples.shape[1:]),
                      {"long_name": "posterior quantiles"}),
    }


def _level_vars(level_means, bounds, units):
    """Per-level posterior means ``mean_level{l}(y_l{l}, x_l{l})`` and their coordinates: a
    flow's means of its approximations of each level's posterior, the finest replaced by the
    corrected mean when its draws were corrected."""
    data, coords = {}, {}
    for level, mean in sorted((level_means or {}).items()):
        s = f"_l{level}"
        coords.update(_coords(bounds, np.shape(mean), units, s))
        data[f"mean_level{level}"] = ((f"y{s}", f"x{s}"), np.asarray(mean, float),
                                      {"long_name": f"posterior mean on level {level}"})
    return data, coords


def _observation_vars(obs):
    """Observation table on dim ``obs``: data, noise, coordinates, predictive mean."""
    if not obs:
        return {}, {}
    n = len(obs["value"])
    coords = {"obs": ("obs", np.asarray(obs.get("name") or [f"obs{i}" for i in range(n)],
                                        dtype=str), {"long_name": "observation name"})}
    names = {"value": ("observed", "observed value"), "noise": ("noise_std", "noise standard "
             "deviation"), "x": ("obs_x", "observation x (NaN for integrals)"),
             "y": ("obs_y", "observation y (NaN for integrals)"),
             "predicted": ("predictive_mean", "posterior predictive mean of F(x)"),
             "truth": ("data_clean", "F(truth) without noise")}
    data = {var: ("obs", np.asarray(obs[k], float), {"long_name": doc})
            for k, (var, doc) in names.items() if obs.get(k) is not None}
    return data, coords


def _history_vars(history):
    """Training curves on dim ``step``: stage, nFS used, loss, ESS."""
    if not history:
        return {}
    docs = {"stage": "training stage (level)", "nfs": "forward solves used so far",
            "loss": "training loss",
            "ess": "importance-sampling ESS fraction of the forward KL's proposal draws",
            "flow_ess": "importance-sampling ESS fraction of the flow's own draws (the "
                        "reverse KL's): how usable the flow is as a proposal",
            "failed": "target evaluations of the step that failed (excluded)",
            "skipped": "steps skipped so far (non-finite loss or gradient)"}
    return {f"train_{k}": ("step", np.asarray(history[k]), {"long_name": doc})
            for k, doc in docs.items() if k in history}


def _clean_attrs(attrs):
    """netCDF-safe attributes: drop None, bools to ints, flatten one level of dicts."""
    out = {}
    for key, value in (attrs or {}).items():
        if isinstance(value, dict):
            out.update(_clean_attrs({f"{key}_{k}": v for k, v in value.items()}))
        elif value is None:
            continue
        elif isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (list, tuple)):
            out[key] = np.asarray(value)
        else:
            out[key] = value
    return out


def build_dataset(samples, *, log_prob, log_target, bounds, units="m",
                  quantiles=(0.05, 0.5, 0.95), level_means=None, observations=None, truth=None,
                  direction=None, history=None, attrs=None, draws=None, moments=None):
    """Assemble the result Dataset of the public contract.

    Args:
        samples: Posterior samples ``(n, ny, nx)`` of the finest level.
        log_prob: Flow log density of each sample ``(n,)``.
        log_target: Unnormalised posterior log density of each sample ``(n,)``.
        bounds: ``(x0, x1, y0, y1)`` of the lattice.
        units: Coordinate units.
        quantiles: Probabilities of the stored quantile maps.
        level_means: Optional ``{level: mean (2**l, 2**l)}``.
        observations: Optional dict with ``value``, ``noise`` and optional ``name``, ``x``, ``y``
            (NaN for integral observations), ``predicted``, ``truth`` (arrays ``(n_obs,)``).
        truth: Optional true field ``(ny, nx)`` (synthetic data).
        direction: Optional direction field ``(ny, nx)`` for the marginal plot.
        history: Optional training curves ``{stage, nfs, loss, ess: (n_steps,)}``.
        attrs: Global attributes (version, case text, seed, nfs, wall time, diagnostics...).
        draws: Optional ``(m, ny, nx)``: every draw of the chains that ``samples`` were thinned
            from; ``mean``, ``std`` and ``quantiles`` are then theirs, so that storing fewer
            samples does not make them less accurate.
        moments: Optional ``(mean, std)`` fields of a Gaussian answer (the Laplace
            approximation), stored as ``mean`` and ``std`` with the Gaussian's quantiles in
            place of the samples' Monte-Carlo estimates.

    Returns:
        xarray.Dataset with ``samples(sample, y, x)``, ``mean``, ``std``, ``quantiles``,
        ``log_prob(sample)``, ``log_target(sample)`` and the optional parts.
    """
    samples = np.asarray(samples, dtype=float)
    data = _field_vars(samples, np.asarray(quantiles, float), draws, moments)
    data["log_prob"] = ("sample", np.asarray(log_prob, float), {"long_name": "flow log density"})
    data["log_target"] = ("sample", np.asarray(log_target, float),
                          {"long_name": "unnormalised posterior log density"})
    coords = {**_coords(bounds, samples.shape[1:], units),
              "sample": ("sample", np.arange(samples.shape[0])),
              "quantile": ("quantile", np.asarray(quantiles, float))}
    for name, field in (("truth", truth), ("direction", direction)):
        if field is not None:
            data[name] = (("y", "x"), np.asarray(field, float), {"long_name": f"{name} field"})
    level_data, level_coords = _level_vars(level_means, bounds, units)
    obs_data, obs_coords = _observation_vars(observations)
    data.update({**level_data, **obs_data, **_history_vars(history)})
    coords.update({**level_coords, **obs_coords})
    return xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.8", **_clean_attrs(attrs)})


@contextmanager
def atomic_path(path):
    """A temporary path in the folder of ``path``, renamed to ``path`` when the block succeeds.

    Readers never see a half-written file: on any failure the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_path(path):
    """The lock file of a run writing ``path``: ``result.nc -> result.nc.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # a process of another user holds the PID
        return True
    return True


def acquire_lock(path, owner=""):
    """Take the lock of the output ``path`` for this process (a ``.lock`` file beside it with
    the PID, host and ``owner``); a lock left by a process that is gone is taken over.

    Returns:
        None, or a one-line description of the live run that holds the lock.
    """
    import socket
    lock, host = lock_path(path), socket.gethostname()
    text = f"{os.getpid()} {host} {owner}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except OSError as err:
            return f"cannot write beside it ({err.strerror})"
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return None
        try:
            pid, other, *_ = lock.read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            pid, other = None, host
        if pid is not None and (other != host or _alive(pid)):
            return f"another run (PID {pid} on {other}) is writing it"
        logger.info("removing the lock %s of a run that ended without releasing it", lock)
        lock.unlink(missing_ok=True)
    return "its lock file could not be taken"


def release_lock(path):
    """Remove the lock of ``path`` if this process holds it."""
    lock = lock_path(path)
    try:
        if int(lock.read_text().split()[0]) == os.getpid():
            lock.unlink()
    except (OSError, ValueError, IndexError):
        pass


def write_netcdf(ds, path):
    """Write ``ds`` to ``path`` atomically (see :func:`atomic_path`).

    Returns:
        Path of the written file.
    """
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4")
    logger.info("wrote %s", path)
    return Path(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_result(path):
    """Open a result file fully into memory (the file is closed on return)."""
    with xr.open_dataset(path) as ds:
        return ds.load()


def marginal_direction(ds):
    """Unit direction ``(ny, nx)`` for the marginal plot: ``ds.direction`` or the leading PC."""
    if "direction" in ds:
        d = np.asarray(ds["direction"].values, float)
    else:
        centred = ds["samples"].values.reshape(ds.sizes["sample"], -1)
        centred = centred - centred.mean(axis=0)
        d = np.linalg.svd(centred, full_matrices=False)[2][0].reshape(ds["mean"].shape)
    return d / (np.linalg.norm(d) or 1.0)


def read_variable(path, names):
    """``(name, values)`` of the first of ``names`` that the netCDF file ``path`` holds, as a
    float64 array.

    Raises:
        ValueError: one line: the file is not readable netCDF, or holds none of ``names``.
    """
    try:
        with xr.open_dataset(path) as ds:
            name = next((n for n in names if n in ds), None)
            if name is None:
                raise ValueError(f"{path}: no variable {' or '.join(map(repr, names))} (it has "
                                 f"{', '.join(map(str, ds.data_vars)) or 'none'})")
            return name, np.asarray(ds[name].values, float)
    except ValueError as err:
        if str(err).startswith(f"{path}: no variable"):
            raise
        raise ValueError(f"{path}: cannot read as netCDF ({str(err).splitlines()[0][:80]})") \
            from None
    except Exception as err:  # noqa: BLE001 - an unreadable user file
        raise ValueError(f"{path}: cannot read as netCDF ({str(err).splitlines()[0][:80]})") \
            from None
