"""Simulations of a case, (x, y) pairs with x from the prior and y = F(x) + e, written to and
streamed from netCDF in chunks (the training data of amortized inference).

File layout (netCDF4): dimensions ``simulation`` (unlimited), ``y``, ``x`` (the finest lattice)
and ``observation``; variables ``field (simulation, y, x)`` (float64, the log-coefficient
fields), ``data (simulation, observation)`` (float64, noisy observations) and ``noise
(observation)``; attributes ``case`` (the case text), ``seed``, ``simulations``, ``failed``
(draws whose solve failed, left out), ``chunk`` and ``geoinvert_version``. :func:`geoinvert.simulate.simulate`
writes it to a temporary name and renames it when complete, so a reader never sees a partial
one.
"""

from pathlib import Path

import numpy as np

__all__ = ["SimulationWriter", "read_simulations", "simulation_count", "simulation_noise",
           "SIMULATION_CHUNK"]

SIMULATION_CHUNK = 256
"""Simulations drawn, solved and written at a time."""


class SimulationWriter:
    """Writes simulations chunk by chunk into an open netCDF4 file (see the module text).

    Args:
        path: File to create.
        case_text, name: The case's text and name (attributes).
        shape: ``(ny, nx)`` of the fields; ``noise``: ``(n_obs,)`` noise std.
        seed, chunk: Attributes (and the storage chunk size).
    """

    def __init__(self, path, *, case_text, name, shape, noise, seed, chunk=SIMULATION_CHUNK):
        import netCDF4
        from geoinvert import __version__
        ny, nx = shape
        noise = np.asarray(noise, float)
        self.handle = netCDF4.Dataset(path, "w", format="NETCDF4")
        h = self.handle
        h.createDimension("simulation", None)
        h.createDimension("y", ny)
        h.createDimension("x", nx)
        h.createDimension("observation", noise.size)
        rows = min(chunk, 1024)
        field = h.createVariable("field", "f8", ("simulation", "y", "x"), chunksizes=(rows, ny, nx))
        field.long_name = "log-coefficient field drawn from the prior (finest lattice)"
        data = h.createVariable("data", "f8", ("simulation", "observation"),
                                chunksizes=(rows, noise.size))
        data.long_name = "simulated observations F(field) + noise"
        h.createVariable("noise", "f8", ("observation",))[:] = noise
        h.setncatts({"title": f"geoinvert simulations: {name}", "case": case_text,
                     "seed": int(seed), "chunk": int(chunk), "geoinvert_version": __version__,
                     "simulations": 0, "failed": 0})
        self.written = 0

    def append(self, field, data):
        """Add simulations ``field (k, ny, nx)`` and ``data (k, n_obs)``."""
        rows = slice(self.written, self.written + len(field))
        self.handle["field"][rows] = np.asarray(field, float)
        self.handle["data"][rows] = np.asarray(data, float)
        self.written += len(field)

    def close(self, failed=0):
        """Record the counts and close the file."""
        self.handle.setncattr("simulations", self.written)
        self.handle.setncattr("failed", int(failed))
        self.handle.close()


def read_simulations(path, *, chunk=SIMULATION_CHUNK, start=0, stop=None):
    """Iterate over the simulations of ``path`` in chunks: ``(field (k, ny, nx), data (k,
    n_obs))`` float64 arrays, reading one chunk at a time (the file need not fit in memory).

    Raises:
        ValueError: ``path`` is not a simulations file (one line naming what is missing).
    """
    import netCDF4
    path = Path(path)
    try:
        handle = netCDF4.Dataset(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: cannot read as netCDF ({str(err).splitlines()[0][:80]})") \
            from None
    with handle:
        missing = [v for v in ("field", "data") if v not in handle.variables]
        if missing:
            raise ValueError(f"{path}: not a geoinvert simulations file (missing "
                             f"{', '.join(missing)})")
        total = handle.dimensions["simulation"].size
        stop = total if stop is None else min(stop, total)
        for first in range(start, stop, chunk):
            last = min(first + chunk, stop)
            yield (np.asarray(handle["field"][first:last], float),
                   np.asarray(handle["data"][first:last], float))


def simulation_count(path):
    """Simulations in the file ``path``."""
    import netCDF4
    with netCDF4.Dataset(path, "r") as handle:
        return handle.dimensions["simulation"].size


def simulation_noise(path):
    """The noise std ``(n_obs,)`` the simulations of ``path`` were made with."""
    import netCDF4
    with netCDF4.Dataset(path, "r") as handle:
        if "noise" not in handle.variables:
            raise ValueError(f"{path}: not a geoinvert simulations file (missing noise)")
        return np.asarray(handle["noise"][:], float)
