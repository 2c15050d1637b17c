"""Inference around a trained flow: correction of its draws to exact posterior samples.

Names load lazily: :mod:`geoinvert.inference.config` is torch-free (the case schema uses it),
:mod:`geoinvert.inference.correction` imports torch.
"""

from importlib import import_module

_LAZY = {
    "CORRECTION_KERNELS": "geoinvert.inference.config",
    "CorrectionConfig": "geoinvert.inference.config",
    "CorrectionResult": "geoinvert.inference.correction",
    "FlowTransport": "geoinvert.inference.correction",
    "LatentTarget": "geoinvert.inference.correction",
    "correct": "geoinvert.inference.correction",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geoinvert.inference' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
