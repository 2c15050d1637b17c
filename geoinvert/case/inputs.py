"""The files a case refers to: observed data (CSV or netCDF), synthetic truths and XDMF
meshes, read and checked with one-line errors naming the key.
"""

import csv
from pathlib import Path

import numpy as np

from geoinvert.errors import CaseError
from geoinvert.case.schema import MAX_MESH_XML_BYTES, MAX_OBSERVATIONS, short, suggest

__all__ = ["resolve", "read_netcdf", "read_data_file", "check_mesh", "mesh_cells",
           "check_learned_prior"]


# --- files ---------------------------------------------------------------------------------------

def resolve(folder, key, value, *, must_exist=True):
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if must_exist and not path.is_file():
        raise CaseError(key, f"no such file: {path}")
    return path


def _read_csv(path, key):
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise CaseError(key, f"cannot read CSV {path}: {short(err, 100)}") from None
    header = [h.strip() for h in header or []]
    if "value" not in header:
        raise CaseError(key, f"CSV {path} needs a header with a 'value' column (and optional x, y)")
    twice = sorted({h for h in header if header.count(h) > 1 and h})
    if twice:
        raise CaseError(key, f"CSV {path} has the column {twice[0]!r} more than once")
    if len(rows) > MAX_OBSERVATIONS:
        raise CaseError(key, f"CSV {path} has {len(rows)} rows; a case may have at most "
                        f"{MAX_OBSERVATIONS} observations")
    short = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if short is not None:
        raise CaseError(key, f"CSV {path} line {short + 2} has {len(rows[short])} fields, the "
                        f"header {len(header)}")
    column = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    coords = {c: _numbers(key, column[c]) for c in ("x", "y") if c in column}
    return _numbers(key, column["value"]), coords


def _numbers(key, values):
    try:
        return np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as err:
        raise CaseError(key, f"non-numeric entry: {err}") from None


def read_netcdf(path, key, variable, var_key):
    import xarray as xr
    try:
        with xr.open_dataset(path) as ds:
            if variable not in ds:
                raise CaseError(var_key, f"no variable {variable!r} in {path}; it has "
                                f"{', '.join(map(str, ds.data_vars))}"
                                + suggest(variable, ds.data_vars))
            da = ds[variable].load()
    except CaseError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable user file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = "not a netCDF file" if "IO backends" in first else short(first, 100)
        raise CaseError(key, f"cannot read netCDF {path}: {reason}") from None
    return da


def read_data_file(path, config):
    key = "data.file"
    if path.suffix.lower() == ".csv":
        return _read_csv(path, key)
    variable = config["data"]["variable"]
    da = read_netcdf(path, key, variable, "data.variable")
    if da.dtype.kind not in "iuf":
        raise CaseError("data.variable", f"{variable!r} in {path} holds {_dtype_name(da.dtype)}, "
                        "not numbers")
    if da.size > MAX_OBSERVATIONS:
        raise CaseError(key, f"{variable!r} in {path} has {da.size} values; a case may have at "
                        f"most {MAX_OBSERVATIONS} observations")
    coords = {}
    for c in ("x", "y"):
        if c in da.coords and da[c].shape == da.shape:
            if da[c].dtype.kind not in "iuf":
                raise CaseError(key, f"coordinate {c!r} in {path} holds "
                                f"{_dtype_name(da[c].dtype)}, not numbers")
            coords[c] = np.asarray(da[c].values, float).ravel()
    return np.asarray(da.values, float).ravel(), coords


def _dtype_name(dtype):
    return {"U": "strings", "S": "strings", "O": "strings or objects", "M": "dates",
            "m": "time spans", "b": "booleans", "c": "complex numbers"}.get(dtype.kind,
                                                                           str(dtype))


def check_mesh(path):
    """``domain.mesh``: an XDMF file with a grid named ``mesh`` (triangles or quadrilaterals,
    2-D geometry) whose data lie in HDF5 files beside it. Read as XML here, so that ``check``
    refuses what dolfinx could not read."""
    import xml.etree.ElementTree as ET
    key = "domain.mesh"
    size = path.stat().st_size
    if size > MAX_MESH_XML_BYTES:
        raise CaseError(key, f"{path} is {size} bytes; an XDMF file may have at most "
                        f"{MAX_MESH_XML_BYTES} (its data belong in the HDF5 file)")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, UnicodeDecodeError, ValueError) as err:
        raise CaseError(key, f"{path} is not an XDMF mesh (not XML: {short(err, 60)})") from None
    if root.tag != "Xdmf":
        raise CaseError(key, f"{path} is not an XDMF mesh (its root element is "
                        f"<{short(root.tag, 30)}>, not <Xdmf>)")
    grid = next((g for g in root.iter("Grid") if g.get("Name") == "mesh"), None)
    if grid is None:
        raise CaseError(key, f"{path} has no grid named 'mesh' (write it with dolfinx's "
                        "XDMFFile.write_mesh, see meshes/make_meshes.py)")
    topology, geometry = grid.find("Topology"), grid.find("Geometry")
    cell = (topology.get("TopologyType", "") if topology is not None else "").lower()
    if cell not in ("triangle", "quadrilateral"):
        raise CaseError(key, f"{path}: the mesh's cells must be triangles or quadrilaterals, "
                        f"got {short(cell or 'none', 30)!r}")
    if geometry is None or geometry.get("GeometryType", "XY") not in ("XY", "XYZ"):
        raise CaseError(key, f"{path}: the mesh needs an XY geometry")
    for item in grid.iter("DataItem"):
        if item.get("Format", "XML") != "HDF":
            continue
        file = (item.text or "").strip().split(":", 1)[0]
        h5 = path.parent / file
        if not h5.is_file():
            raise CaseError(key, f"{path} refers to {file!r}, which does not exist beside it")
        with open(h5, "rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                raise CaseError(key, f"{h5} is not an HDF5 file")


def mesh_cells(path):
    import xml.etree.ElementTree as ET
    topology = next(ET.parse(path).getroot().iter("Topology"), None)
    try:
        return int(topology.get("NumberOfElements"))
    except (AttributeError, TypeError, ValueError):
        return 0


def check_learned_prior(path, config):
    """``prior.model``: a learned prior written by ``geoinvert prior fit`` (its .json beside
    the .pt, of the format this version reads), on the case's finest lattice and bounds.
    Only the small .json is read here; the weights load when the case runs."""
    import json
    key = "prior.model"
    side = path.with_suffix(".json")
    if not side.is_file():
        raise CaseError(key, f"{side.name} is missing beside {path.name} (geoinvert prior fit "
                        "writes both)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8")).get("metadata", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CaseError(key, f"{side} is not a model description ({short(err, 60)})") from None
    from geoinvert.priors.learned import FORMAT_VERSION
    if not isinstance(meta, dict) or meta.get("learned_prior") != FORMAT_VERSION:
        raise CaseError(key, f"{path} is not a learned prior of format version "
                        f"{FORMAT_VERSION} (write it with geoinvert prior fit)")
    g = meta.get("gaussian", {})
    level, finest = g.get("level"), config["levels"]["finest"]
    if level != finest:
        n = 2 ** level if isinstance(level, int) else "?"
        raise CaseError(key, f"holds {n}x{n} fields (level {level}), but levels.finest is "
                        f"{finest}: set levels.finest to {level}")
    bounds = np.asarray(g.get("bounds", []), float)
    want = np.asarray(config["domain"]["bounds"], float)
    if bounds.shape != want.shape or not np.allclose(bounds, want):
        raise CaseError(key, f"was fitted on the bounds {bounds.tolist()}, but domain.bounds "
                        f"is {want.tolist()}")
