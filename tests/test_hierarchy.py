"""Tests of lattices, pooling, Haar blocks, the lattice Laplacian and the level FE meshes."""

import numpy as np
import pytest
import torch

from geoinvert.hierarchy import (Hierarchy, Lattice, haar, inverse_haar, pool, pool_matrix,
                                 upsample)

EPS = np.finfo(np.float64).eps


@pytest.fixture
def field():
    return np.random.default_rng(0).standard_normal((3, 8, 8))


def test_pool_averages_blocks(field):
    expected = field.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(pool(field), expected, rtol=0, atol=10 * EPS)
    np.testing.assert_allclose(pool(torch.from_numpy(field)).numpy(), expected, rtol=0,
                               atol=10 * EPS)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pool_matrix_matches_pool_and_upsample_is_4_transpose(level):
    n = 2 ** level
    x = np.random.default_rng(level).standard_normal((n, n))
    a = pool_matrix(level)
    assert a.shape == (4 ** (level - 1), 4 ** level)
    np.testing.assert_allclose(a @ x.ravel(), pool(x).ravel(), rtol=0, atol=10 * EPS)
    y = x[: n // 2, : n // 2]
    np.testing.assert_allclose(4 * (a.T @ y.ravel()), upsample(y).ravel(), rtol=0, atol=0)
    np.testing.assert_array_equal(pool(upsample(y)), y)


def test_upsample_torch_matches_numpy(field):
    np.testing.assert_array_equal(upsample(torch.from_numpy(field)).numpy(), upsample(field))


def test_haar_is_orthonormal_and_inverts(field):
    a, d = haar(field)
    assert a.shape == (3, 4, 4) and d.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(a, 2 * pool(field), rtol=0, atol=10 * EPS)
    np.testing.assert_allclose((a ** 2).sum() + (d ** 2).sum(), (field ** 2).sum(), rtol=1e-14)
    np.testing.assert_allclose(inverse_haar(a, d), field, rtol=0, atol=10 * EPS)


def test_haar_torch_is_differentiable(field):
    x = torch.tensor(field, requires_grad=True)
    a, d = haar(x)
    y = inverse_haar(a, d)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-15)
    (y * y).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=0, atol=1e-14)


def test_lattice_geometry():
    lat = Lattice(2, (0.0, 2.0, 1.0, 2.0))
    assert lat.shape == (4, 4) and lat.size == 16 and lat.cell_size == (0.5, 0.25)
    xc, yc = lat.centres()
    np.testing.assert_allclose(xc, [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(yc, [1.125, 1.375, 1.625, 1.875])


def test_dirichlet_laplacian_eigenvector():
    """phi(s) = sin(pi s1) sin(2 pi s2) at cell centres is an eigenvector (ghost value -u)."""
    lat = Lattice(4)
    n = lat.n
    xc, yc = lat.centres()
    phi = np.sin(np.pi * xc)[None, :] * np.sin(2 * np.pi * yc)[:, None]
    eig = -(4 * np.sin(np.pi / (2 * n)) ** 2 + 4 * np.sin(2 * np.pi / (2 * n)) ** 2) * n ** 2
    lap = lat.laplacian("dirichlet") @ phi.ravel()
    np.testing.assert_allclose(lap, eig * phi.ravel(), rtol=0, atol=1e-10 * abs(eig))


@pytest.mark.parametrize("boundary", ["neumann", "periodic"])
def test_laplacian_kills_constants(boundary):
    lap = Lattice(3).laplacian(boundary)
    np.testing.assert_allclose(lap @ np.ones(64), 0.0, atol=1e-12)
    assert abs(lap - lap.T).max() == 0


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="bounds"):
        Lattice(2, (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="levels"):
        Hierarchy(0)
    with pytest.raises(ValueError, match="refine"):
        Hierarchy(3, refine=-1)
    with pytest.raises(ValueError, match="min_cells"):
        Hierarchy(3, min_cells=0)
    with pytest.raises(ValueError, match="boundary"):
        Lattice(2).laplacian("robin")
    with pytest.raises(ValueError, match="level"):
        Hierarchy(3).lattice(4)


@pytest.mark.parametrize("refine, min_cells, expected", [
    (0, 8, [8, 8, 8, 16]),
    (1, 8, [8, 8, 16, 32]),
    (0, 12, [12, 12, 16, 16]),  # rounded up to a multiple of 2**l
    (2, 1, [8, 16, 32, 64]),
])
def test_mesh_cells(refine, min_cells, expected):
    h = Hierarchy(4, refine=refine, min_cells=min_cells)
    cells = [h.mesh_cells(level) for level in range(1, 5)]
    assert cells == expected
    assert all(c % 2 ** level == 0 for level, c in enumerate(cells, start=1))


def test_cell_map_places_each_fe_cell_in_its_lattice_cell():
    h = Hierarchy(3, (0.0, 2.0, 0.0, 1.0), refine=1, min_cells=8)
    for level in (1, 2, 3):
        big, lat = h.mesh_cells(level), h.lattice(level)
        cmap = h.cell_map(level)
        assert cmap.shape == (big * big,)
        # FE cell centres, row-major, must fall inside the lattice cell they map to
        x0, x1, y0, y1 = h.bounds
        xs = x0 + (np.arange(big) + 0.5) * (x1 - x0) / big
        ys = y0 + (np.arange(big) + 0.5) * (y1 - y0) / big
        hx, hy = lat.cell_size
        col = np.floor((xs - x0) / hx).astype(int)
        row = np.floor((ys - y0) / hy).astype(int)
        np.testing.assert_array_equal(cmap, (row[:, None] * lat.n + col[None, :]).ravel())
        # averaging FE-cell values per lattice cell is exact for a lattice field
        field = np.arange(lat.size, dtype=float)
        counts = np.bincount(cmap, minlength=lat.size)
        np.testing.assert_array_equal(np.bincount(cmap, field[cmap]) / counts, field)
