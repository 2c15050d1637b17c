"""Hard data: observations of the field itself at known cells (values measured at wells),
stacked after the forward model's own observations.

With a Gaussian prior and a linear forward model the stacked model stays linear (its matrix
gains one selection row per datum), so the exact posterior still holds; with any other model
the field values are appended to its predictions.
"""

import numpy as np
import torch

from geoinvert.problem.forward.testbeds import LinearForward

__all__ = ["cell_indices", "WithHardData", "SolvedWithHardData", "with_hard_data"]


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
    # the hard data are linear: second derivatives are the inner model's
    twice_differentiable = property(
        lambda self: getattr(self.inner, "twice_differentiable", False))

    def __call__(self, x):
        pred = self.inner(x)
        values = torch.as_tensor(x).reshape(x.shape[0], -1)[:, self.cells].to(pred.dtype)
        return torch.cat([pred, values], dim=1)


class SolvedWithHardData(WithHardData):
    """:class:`WithHardData` over a model that solves outside torch (the elliptic one): its
    batch solve, full Jacobian and second-order adjoints with the hard data's rows appended,
    for the samplers that need them (the lifted kernel). The hard data are linear in the field:
    their Jacobian rows select the cells and add nothing to a second derivative.

    ``solver`` is the inner model's, whose abilities (the serial solver's Jacobian and
    second-order adjoints) these methods have.
    """

    solver = property(lambda self: getattr(self.inner, "solver", self.inner))

    def solve_batch(self, m):
        """``(predictions (num, n_obs), state)`` of fields ``m (num, ny, nx)``."""
        m = np.asarray(m, dtype=float)
        pred, state = self.inner.solve_batch(m)
        values = m.reshape(m.shape[0], -1)[:, self.cells.numpy()]
        return np.concatenate([pred, values], axis=1), state

    def jacobian_batch(self, state):
        """dF/dm ``(num, n_obs, ny, nx)``: the inner model's, then one selection row per
        hard datum."""
        inner = self.inner.jacobian_batch(state)
        num = inner.shape[0]
        rows = np.zeros((num, len(self.cells), inner[0, 0].size))
        rows[:, np.arange(len(self.cells)), self.cells.numpy()] = 1.0
        return np.concatenate([inner, rows.reshape(num, -1, *inner.shape[2:])], axis=1)

    def trace_gradient_batch(self, state, weights, directions):
        """``d/dm sum_i a_i^T (dF/dm) b_i``: the hard data's rows are constant, so only the
        inner model's weights count."""
        return self.inner.trace_gradient_batch(state, weights[:, :, : self.inner.n_obs],
                                               directions)


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
    if hasattr(forward, "solve_batch"):
        return SolvedWithHardData(forward, cells)
    return WithHardData(forward, cells)
