"""Hard data: observations of the field itself at known cells (values measured at wells),
stacked after the forward model's own observations.

With a Gaussian prior and a linear forward model the stacked model stays linear (its matrix
gains one selection row per datum), so the exact posterior still holds; with any other model
the field values are appended to its predictions.
"""

import numpy as np
import torch

from geoinvert.problem.forward.testbeds import LinearForward

__all__ = ["cell_indices", "WithHardData", "with_hard_data"]


def cell_indices(points, shape, bounds):
    """Row-major index of the lattice cell holding each point ``(k, 2)`` (a point on a cell
    edge belongs to the cell above and to the right, the domain's far edges to the last)."""
    ny, nx = shape
    x0, x1, y0, y1 = bounds
    pts = np.asarray(points, float).reshape(-1, 2)
    col = np.clip(np.floor((pts[:, 0] - x0) / (x1 - x0) * nx).astype(int), 0, nx - 1)
    row = np.clip(np.floor((pts[:, 1] - y0) / (y1 - y0) * ny).astype(int), 0, ny - 1)
    return row * nx + col


class WithHardData:
    """``x -> [F(x), x[cells]]``: a forward model followed by the field's values at ``cells``.

    Args:
        forward: forward model ``(num, ny, nx) -> (num, n_obs)``.
        cells: row-major cell indices of the hard data.

    Attributes:
        n_obs: ``forward.n_obs + len(cells)``; ``shape``, ``n_solves`` and ``last_failures``
            are the forward model's.
    """

    def __init__(self, forward, cells):
        self.inner, self.cells = forward, torch.as_tensor(np.asarray(cells, int))
        self.shape = forward.shape
        self.n_obs = forward.n_obs + len(self.cells)

    n_solves = property(lambda self: self.inner.n_solves)
    last_failures = property(lambda self: self.inner.last_failures)

    def __call__(self, x):
        pred = self.inner(x)
        values = torch.as_tensor(x).reshape(x.shape[0], -1)[:, self.cells].to(pred.dtype)
        return torch.cat([pred, values], dim=1)


def with_hard_data(forward, points, bounds):
    """``forward`` with the field's values at the cells holding ``points`` appended (the same
    object when there are none); a linear model stays a :class:`LinearForward`."""
    if len(points) == 0:
        return forward
    cells = cell_indices(points, forward.shape, bounds)
    if isinstance(forward, LinearForward):
        rows = np.zeros((len(cells), forward.matrix.shape[1]))
        rows[np.arange(len(cells)), cells] = 1.0
        return LinearForward.from_matrix(np.vstack([forward.matrix, rows]), forward.shape,
                                         bounds=bounds)
    return WithHardData(forward, cells)
