"""Lattices of the level hierarchy, 2x2 pooling, Haar blocks and the level FE mesh sizes."""

import numpy as np
import scipy.sparse as sp

__all__ = ["pool", "upsample", "pool_matrix", "haar", "inverse_haar", "laplacian_1d", "Lattice",
           "Hierarchy"]

BOUNDARIES = ("dirichlet", "neumann", "periodic")


def _blocks(x):
    """The four cells of each 2x2 block, ``x00, x01, x10, x11`` (row offset, column offset)."""
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def pool(x):
    """2x2 average pooling A: ``(..., 2m, 2m) -> (..., m, m)``, numpy array or torch tensor."""
    x00, x01, x10, x11 = _blocks(x)
    return (x00 + x01 + x10 + x11) / 4


def upsample(x):
    """Nearest-neighbour upsampling ``(..., m, m) -> (..., 2m, 2m)`` (= 4 A^T); ``pool(upsample(x)) == x``."""
    if isinstance(x, np.ndarray):
        return x.repeat(2, axis=-2).repeat(2, axis=-1)
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def _pool_1d(n):
    """Pair averaging ``(n/2, n)`` in one dimension (CSR)."""
    rows = np.arange(n) // 2
    return sp.csr_matrix((np.full(n, 0.5), (rows, np.arange(n))), shape=(n // 2, n))


def pool_matrix(level):
    """The pooling matrix A_level, scipy CSR ``(4**(level-1), 4**level)`` on row-major flattening.

    A = P_y (x) P_x with P the one-dimensional pair average, so ``(A x)_k`` is the mean of the
    four fine cells of coarse cell k.
    """
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    p = _pool_1d(2 ** level)
    return sp.kron(p, p, format="csr")


def haar(x):
    r"""Orthonormal 2x2 Haar transform of each block: ``(..., 2m, 2m) -> (a (..., m, m), d (..., 3, m, m))``.

    For a block [[x00, x01], [x10, x11]] (rows along y): a = (x00 + x01 + x10 + x11) / 2
    (so ``a = 2 pool(x)``), d_0 = (x00 - x01 + x10 - x11) / 2 (detail along x),
    d_1 = (x00 + x01 - x10 - x11) / 2 (along y), d_2 = (x00 - x01 - x10 + x11) / 2 (diagonal).
    Works on numpy arrays and torch tensors.
    """
    x00, x01, x10, x11 = _blocks(x)
    s0, s1, t0, t1 = x00 + x01, x10 + x11, x00 - x01, x10 - x11
    d = [(t0 + t1) / 2, (s0 - s1) / 2, (t0 - t1) / 2]
    stack = np.stack if isinstance(x, np.ndarray) else _torch_stack
    return (s0 + s1) / 2, stack(d, -3)


def _torch_stack(parts, axis):
    import torch
    return torch.stack(parts, dim=axis)


def inverse_haar(a, d):
    """Inverse of :func:`haar`: ``(a (..., m, m), d (..., 3, m, m)) -> x (..., 2m, 2m)``."""
    d0, d1, d2 = d[..., 0, :, :], d[..., 1, :, :], d[..., 2, :, :]
    s0, s1, t0, t1 = a + d1, a - d1, d0 + d2, d0 - d2
    parts = ((s0 + t0) / 2, (s0 - t0) / 2, (s1 + t1) / 2, (s1 - t1) / 2)  # x00, x01, x10, x11
    if not isinstance(a, np.ndarray):
        return _interleave(parts)
    m = a.shape[-1]
    x = np.empty((*a.shape[:-2], 2 * m, 2 * m), dtype=np.result_type(a, d))
    for (r, c), part in zip(((0, 0), (0, 1), (1, 0), (1, 1)), parts):
        x[..., r::2, c::2] = part
    return x


def _interleave(parts):
    """Differentiable assembly of x from its four block cells (torch)."""
    import torch
    x00, x01, x10, x11 = parts
    top = torch.stack((x00, x01), -1).flatten(-2)  # (..., m, 2m): row 2i
    bottom = torch.stack((x10, x11), -1).flatten(-2)
    return torch.stack((top, bottom), -2).flatten(-3, -2)


def laplacian_1d(n, h, boundary):
    """Cell-centred second difference ``(n, n)`` with ghost cells (u_ghost = -u, u, or wrap)."""
    main = np.full(n, -2.0)
    if boundary == "dirichlet":
        main[[0, -1]] = -3.0
    elif boundary == "neumann":
        main[[0, -1]] = -1.0
    lap = sp.diags([np.ones(n - 1), main, np.ones(n - 1)], [-1, 0, 1], format="lil")
    if boundary == "periodic":
        lap[0, -1] += 1.0
        lap[-1, 0] += 1.0
    return lap.tocsr() / h ** 2


class Lattice:
    """The n x n cell lattice of one level, n = 2**level, covering ``bounds = (x0, x1, y0, y1)``.

    Args:
        level: Level l >= 1.
        bounds: ``(x0, x1, y0, y1)`` with x0 < x1 and y0 < y1.
    """

    def __init__(self, level, bounds=(0.0, 1.0, 0.0, 1.0)):
        self.level = _check_level(level)
        self.bounds = _check_bounds(bounds)
        self.n = 2 ** self.level

    @property
    def shape(self):
        """``(ny, nx)``."""
        return (self.n, self.n)

    @property
    def size(self):
        """Number of cells ``n**2``."""
        return self.n ** 2

    @property
    def cell_size(self):
        """``(hx, hy)``."""
        x0, x1, y0, y1 = self.bounds
        return ((x1 - x0) / self.n, (y1 - y0) / self.n)

    def centres(self):
        """Cell-centre coordinates ``(xc (nx,), yc (ny,))``; ``xc[j] = x0 + (j + 1/2) hx``."""
        (hx, hy), (x0, _, y0, _) = self.cell_size, self.bounds
        k = np.arange(self.n) + 0.5
        return x0 + k * hx, y0 + k * hy

    def laplacian(self, boundary="dirichlet"):
        r"""Five-point cell-centred Laplacian Delta_h, scipy CSR ``(n**2, n**2)`` (row-major).

        Ghost cells beyond the boundary take the value -u (``"dirichlet"``: zero on the boundary
        faces), u (``"neumann"``: zero normal flux) or wrap around (``"periodic"``).
        Delta_h = I_y (x) D_x / hx^2 + D_y / hy^2 (x) I_x. With the Dirichlet-type choice,
        sin(k pi s_1) sin(l pi s_2) on the unit-square cell centres is an exact eigenvector.
        """
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        (hx, hy), eye = self.cell_size, sp.identity(self.n, format="csr")
        return (sp.kron(eye, laplacian_1d(self.n, hx, boundary))
                + sp.kron(laplacian_1d(self.n, hy, boundary), eye)).tocsr()


class Hierarchy:
    """Lattices of levels 1..L and the size of each level's FE mesh.

    Args:
        levels: Finest level L >= 1.
        bounds: ``(x0, x1, y0, y1)`` of the lattices.
        refine: r >= 0; the FE mesh of level l has at least 2**l * 2**r cells per side.
        min_cells: No FE mesh is coarser than this many cells per side.
    """

    def __init__(self, levels, bounds=(0.0, 1.0, 0.0, 1.0), refine=0, min_cells=8):
        self.levels = _check_level(levels, "levels")
        self.bounds = _check_bounds(bounds)
        if int(refine) != refine or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        if int(min_cells) != min_cells or min_cells < 1:
            raise ValueError(f"min_cells must be an integer >= 1, got {min_cells!r}")
        self.refine, self.min_cells = int(refine), int(min_cells)

    def lattice(self, level):
        """The :class:`Lattice` of ``level`` (1..L)."""
        return Lattice(self._check(level), self.bounds)

    def mesh_cells(self, level):
        """FE cells per side of level l: max(2**l * 2**refine, min_cells), rounded up to a multiple of 2**l."""
        n = 2 ** self._check(level)
        cells = max(n * 2 ** self.refine, self.min_cells)
        return -(-cells // n) * n

    def cell_map(self, level):
        """Lattice cell of every FE cell, int array ``(mesh_cells(l)**2,)``.

        FE quads are numbered row-major like the lattice: quad (I, J) (row I along y) is entry
        ``I * N + J`` with N = mesh_cells(l); it lies inside lattice cell (I // k, J // k),
        k = N / 2**l, whose row-major index ``(I // k) * 2**l + J // k`` is returned.
        """
        n, big = 2 ** self._check(level), self.mesh_cells(level)
        coarse = np.arange(big) // (big // n)
        return (coarse[:, None] * n + coarse[None, :]).ravel()

    def pool_matrix(self, level):
        """A_level, see :func:`pool_matrix`."""
        return pool_matrix(self._check(level))

    def _check(self, level):
        if not 1 <= level <= self.levels:
            raise ValueError(f"level must be in 1..{self.levels}, got {level}")
        return int(level)


def _check_level(level, name="level"):
    if int(level) != level or level < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {level!r}")
    return int(level)


def _check_bounds(bounds):
    try:
        x0, x1, y0, y1 = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be four numbers (x0, x1, y0, y1), got {bounds!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"bounds must satisfy x0 < x1 and y0 < y1, got {bounds!r}")
    return (x0, x1, y0, y1)
