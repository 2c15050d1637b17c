"""Tests of the batched supernodal sparse Cholesky against scipy and dense numpy."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch

from geoinvert.linalg import BatchedCholesky, nested_dissection

EPS = np.finfo(np.float64).eps
Q1 = np.array([[4, -1, -2, -1], [-1, 4, -1, -2], [-2, -1, 4, -1], [-1, -2, -1, 4]]) / 6.0
P1 = np.array([[2, -1, 0, -1], [-1, 2, -1, 0], [0, -1, 2, -1], [-1, 0, -1, 2]]) / 2.0


def _assemble(m, element, coefficients, reaction):
    """K_b = sum_c k_{b,c} K_c + reaction I on an (m+1)^2 grid; returns CSR pattern, (B, nnz)."""
    nx = m + 1
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    base = (i * nx + j).ravel()
    cells = np.stack([base, base + 1, base + nx + 1, base + nx], 1)
    rows = np.concatenate([np.repeat(cells, 4, 1).ravel(), np.arange(nx * nx)])
    cols = np.concatenate([np.tile(cells, (1, 4)).ravel(), np.arange(nx * nx)])
    keep = np.flatnonzero(np.concatenate([element.ravel() != 0] * len(cells) + [[True] * nx * nx]))
    rows, cols = rows[keep], cols[keep]
    gather = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(nx * nx,) * 2)
    key = np.repeat(np.arange(nx * nx), np.diff(gather.indptr)) * nx * nx + gather.indices
    pos = np.searchsorted(key, rows * nx * nx + cols)
    S = sp.csr_matrix((np.ones(rows.size), (pos, np.arange(rows.size))), shape=(key.size, rows.size))
    per_entry = np.concatenate([(coefficients[:, :, None] * element.ravel()).reshape(len(coefficients), -1),
                                np.full((len(coefficients), nx * nx), reaction)], 1)[:, keep]
    return gather.indptr, gather.indices, np.asarray((S @ per_entry.T).T)


def _random_spd(n, B, density, rng):
    """Random sparse symmetric matrices with one pattern made SPD by strict diagonal dominance."""
    R = sp.random(n, n, density=density, random_state=rng, format="csr")
    pattern = (abs(R) + abs(R.T) + sp.eye(n)).tocsr()
    pattern.sort_indices()
    indptr, indices = pattern.indptr, pattern.indices
    rows = np.repeat(np.arange(n), np.diff(indptr))
    mirror = np.lexsort((rows, indices))  # entry (c, r) of each (r, c), CSR order of A^T
    w = rng.standard_normal((B, indices.size))
    values = np.where(rows == indices, 0.0, w + w[:, mirror])
    dominance = np.stack([np.bincount(rows, abs(v), n) for v in values])
    values[:, rows == indices] = dominance + 0.1 + rng.random((B, n))
    return indptr, indices, values


def _cases():
    rng = np.random.default_rng(0)
    return {
        "q1-9pt": _assemble(12, Q1, np.exp(rng.standard_normal((5, 144))), 1e-2),
        "p1-5pt": _assemble(12, P1, np.exp(rng.standard_normal((5, 144))), 1e-2),
        "irregular": _random_spd(150, 5, 0.02, rng),
    }


CASES = _cases()


def _matrices(indptr, indices, values):
    n = len(indptr) - 1
    return [sp.csr_matrix((v, indices, indptr), shape=(n, n)) for v in values]


def _check_solution(A, x, b):
    """Backward-stable solve: |b - A x| <= c n eps |A| |x| (c generous, float64)."""
    r = np.linalg.norm(b - A @ x)
    assert r <= 100 * A.shape[0] * EPS * spl.norm(A) * np.linalg.norm(x)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 5])
def test_solve_matches_scipy(name, batch):
    indptr, indices, values = CASES[name]
    values = values[:batch]
    chol = BatchedCholesky(indptr, indices).factor(values)
    rng = np.random.default_rng(1)
    rhs = rng.standard_normal((batch, len(indptr) - 1))
    x = chol.solve(rhs).numpy()
    assert chol.failed.size == 0
    for A, xb, bb in zip(_matrices(indptr, indices, values), x, rhs):
        ref = spl.spsolve(A.tocsc(), bb)
        cond = np.linalg.cond(A.toarray())
        assert np.linalg.norm(xb - ref) <= 100 * cond * EPS * np.linalg.norm(ref)
        _check_solution(A, xb, bb)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logdet_matches_dense(name):
    indptr, indices, values = CASES[name]
    chol = BatchedCholesky(indptr, indices).factor(torch.from_numpy(values))
    ref = [np.linalg.slogdet(A.toarray())[1] for A in _matrices(indptr, indices, values)]
    np.testing.assert_allclose(chol.logdet().numpy(), ref, rtol=1e3 * EPS * len(indptr))


def test_second_solve_and_new_batch_size_reuse_symbolic():
    indptr, indices, values = CASES["q1-9pt"]
    chol = BatchedCholesky(indptr, indices)
    rng = np.random.default_rng(2)
    for batch in (5, 2, 5):
        chol.factor(values[:batch])
        for _ in range(2):
            rhs = rng.standard_normal((batch, chol.n))
            for A, xb, bb in zip(_matrices(indptr, indices, values[:batch]), chol.solve(rhs).numpy(), rhs):
                _check_solution(A, xb, bb)


def test_not_positive_definite_sample_is_flagged():
    indptr, indices, values = CASES["q1-9pt"]
    values = values.copy()
    diag = np.flatnonzero(np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) == indices)
    values[2, diag[40]] = -5.0
    chol = BatchedCholesky(indptr, indices).factor(values)
    assert chol.failed.tolist() == [2]
    rhs = np.random.default_rng(3).standard_normal((5, chol.n))
    x = chol.solve(rhs).numpy()
    assert np.isnan(x[2]).all() and np.isnan(chol.logdet()[2])
    for b in (0, 1, 3, 4):
        _check_solution(_matrices(indptr, indices, values)[b], x[b], rhs[b])


def test_user_ordering_and_nested_dissection_are_permutations():
    indptr, indices, values = CASES["irregular"]
    n = len(indptr) - 1
    perm = nested_dissection(indptr, indices)
    assert np.array_equal(np.sort(perm), np.arange(n))
    chol = BatchedCholesky(indptr, indices, ordering=np.arange(n)[::-1].copy()).factor(values)
    rhs = np.ones((len(values), n))
    for A, xb, bb in zip(_matrices(indptr, indices, values), chol.solve(rhs).numpy(), rhs):
        _check_solution(A, xb, bb)


def test_bad_shapes_raise():
    indptr, indices, values = CASES["p1-5pt"]
    chol = BatchedCholesky(indptr, indices)
    with pytest.raises(RuntimeError):
        chol.solve(np.zeros((1, chol.n)))
    with pytest.raises(ValueError):
        chol.factor(values[:, :-1])
    chol.factor(values)
    with pytest.raises(ValueError):
        chol.solve(np.zeros((2, chol.n)))
