#!/usr/bin/env bash
# Installs everything geoinvert needs on Debian 12 and is quick when nothing changed:
# Debian's FEniCSx (dolfinx 0.5, PETSc, OpenMPI, mpi4py), a venv that sees them, torch (CPU),
# numpy<2 (Debian's petsc4py is built against numpy 1.x) and the package itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
log() { printf '[setup] %s\n' "$*"; }

missing=()
/usr/bin/python3 -c "import dolfinx, petsc4py, mpi4py" 2>/dev/null ||
  missing+=(python3-dolfinx-real python3-petsc4py-real python3-mpi4py)
# netCDF4 from Debian, linked to Debian's HDF5: PyPI's wheel bundles another HDF5 that
# crashes (SIGSEGV) when dolfinx's HDF5 is loaded in the same process.
/usr/bin/python3 -c "import netCDF4" 2>/dev/null || missing+=(python3-netcdf4)
/usr/bin/python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
[ -f /usr/include/python3.11/Python.h ] || missing+=(python3-dev)   # dolfinx JIT-compiles forms
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v ncdump >/dev/null || missing+=(netcdf-bin)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV (with Debian's system packages visible)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi

stamp="$VENV/.geoinvert-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_args=(-q --disable-pip-version-check)
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
log "installing torch 2.13.0 (CPU), numpy<2 and geoinvert into $VENV"
"$VENV/bin/pip" install "${pip_args[@]}" "numpy<2" "torch==2.13.0"
"$VENV/bin/pip" install "${pip_args[@]}" -e ".[test]"
# a netCDF4 wheel in the venv would shadow Debian's (see above): remove it
if ! "$VENV/bin/python" -c "import netCDF4, sys; sys.exit(not netCDF4.__file__.startswith('/usr/lib/'))"; then
  "$VENV/bin/pip" uninstall -y -q netCDF4
fi
"$VENV/bin/python" -c "import dolfinx, petsc4py, torch, xarray, netCDF4; import geoinvert"
echo "$want" > "$stamp"
log "ready: $VENV"
