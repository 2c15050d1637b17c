"""geoinvert: Bayesian inversion of elliptic PDE models with multiscale invertible generative networks.

Heavy dependencies (dolfinx, PETSc, torch) are imported lazily: ``import geoinvert`` is cheap and
the building blocks load on first attribute access.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "CaseError": "geoinvert.errors",
    "Case": "geoinvert.case",
    "load_case": "geoinvert.case",
    "run": "geoinvert.app",
    "Result": "geoinvert.app",
    "load_model": "geoinvert.io",
    "build_dataset": "geoinvert.io",
    "write_netcdf": "geoinvert.io",
    "read_result": "geoinvert.io",
    "figures": "geoinvert.io",
    "taylor_test": "geoinvert.verify",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geoinvert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
