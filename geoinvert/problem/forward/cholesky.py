"""Sparse Cholesky factorisations for :class:`geoinvert.problem.forward.elliptic.FastSolver`.

* :class:`InterleavedCholesky`: up to 8 SPD matrices with one pattern factorised at once by a
  small C kernel compiled with cffi (like dolfinx's forms) whose SIMD lanes are the matrices;
  nested-dissection ordering by dof coordinates, factor pattern computed once.
* :class:`PetscCholesky`: PETSc's native Cholesky, one matrix at a time (the fallback when no
  compiler is available).

Both hand out "slots" holding the factors of a chunk of samples, kept for the adjoint solve.
"""

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from petsc4py import PETSc

__all__ = ["InterleavedCholesky", "PetscCholesky", "LANES", "kernels", "dissection_ordering",
           "cholesky_pattern"]

log = logging.getLogger(__name__)


# C kernels for InterleavedCholesky, one pair per lane count {w}: lane b of every double vector
# belongs to matrix b, so one indexed load serves w matrices and the compiler emits SIMD code.
_KERNEL_TEMPLATE = r"""
typedef double vec{w} __attribute__((vector_size({w} * 8), aligned(8)));
#define V{w}(a, i) (*(vec{w} *)((a) + (long)(i) * {w}))

/* Left-looking column Cholesky: column j = (A_j - sum_k L_jk L_k[j:]) / sqrt(pivot), k over the
   entries (j, k) of row j (their positions rpos, the ends of their columns rend). */
int factor{w}(int n, const int *restrict lp, const int *restrict li, const int *restrict rp,
              const int *restrict rpos, const int *restrict rend, double *restrict lx,
              double *restrict work, int *restrict info)
{{
    for (int j = 0; j < n; j++) {{
        for (int p = lp[j]; p < lp[j + 1]; p++) V{w}(work, li[p]) = V{w}(lx, p);
        for (int q = rp[j]; q < rp[j + 1]; q++) {{
            vec{w} ljk = V{w}(lx, rpos[q]);
            for (int p = rpos[q]; p < rend[q]; p++) V{w}(work, li[p]) -= V{w}(lx, p) * ljk;
        }}
        vec{w} d = V{w}(work, j);
        for (int b = 0; b < {w}; b++) {{
            if (!(d[b] > 0.0)) {{ if (!info[b]) info[b] = j + 1; d[b] = 1.0; }}
            d[b] = sqrt(d[b]);
        }}
        vec{w} inv = 1.0 / d;
        V{w}(lx, lp[j]) = d;
        for (int p = lp[j] + 1; p < lp[j + 1]; p++) V{w}(lx, p) = V{w}(work, li[p]) * inv;
    }}
    return 0;
}}

/* x <- L^-T L^-1 x. */
int solve{w}(int n, const int *restrict lp, const int *restrict li, const double *restrict lx,
             double *restrict x)
{{
    for (int j = 0; j < n; j++) {{
        vec{w} xj = V{w}(x, j) / V{w}(lx, lp[j]);
        V{w}(x, j) = xj;
        for (int p = lp[j] + 1; p < lp[j + 1]; p++) V{w}(x, li[p]) -= V{w}(lx, p) * xj;
    }}
    for (int j = n - 1; j >= 0; j--) {{
        vec{w} xj = V{w}(x, j);
        for (int p = lp[j] + 1; p < lp[j + 1]; p++) xj -= V{w}(lx, p) * V{w}(x, li[p]);
        V{w}(x, j) = xj / V{w}(lx, lp[j]);
    }}
    return 0;
}}
"""
_KERNEL_DECLARATIONS = """
int factor{w}(int, const int *, const int *, const int *, const int *, const int *, double *,
              double *, int *);
int solve{w}(int, const int *, const int *, const double *, double *);
"""
#: Lane counts with compiled kernels; a batch is cut into chunks of these widths.
LANES = (8, 4, 2, 1)


def _cpu_signature():
    """Text that changes with the instruction set (the kernels are built with -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


@functools.lru_cache(maxsize=None)
def kernels():
    """The compiled C kernels (built once with cffi like dolfinx's forms, cached on disk)."""
    import cffi

    source = "#include <math.h>\n" + "".join(_KERNEL_TEMPLATE.format(w=w) for w in LANES)
    flags = ["-O3", "-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
    key = hashlib.sha1((source + str(flags) + _cpu_signature()).encode()).hexdigest()[:16]
    name = f"_geoinvert_cholesky_{key}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "geoinvert"
    found = sorted(cache.glob(name + ".*so")) + sorted(cache.glob(name + ".*pyd"))
    if not found:
        ffi = cffi.FFI()
        ffi.cdef("".join(_KERNEL_DECLARATIONS.format(w=w) for w in LANES))
        ffi.set_source(name, source, extra_compile_args=flags)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:   # atomic for concurrent processes
            built = Path(ffi.compile(tmpdir=tmp))
            os.replace(built, cache / built.name)
            found = [cache / built.name]
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def dissection_ordering(indptr, indices, coords, *, leaf=16):
    """Nested dissection by coordinates: new -> old permutation of a symmetric CSR pattern.

    The nodes are split at the median coordinate of their longer extent; the nodes of the upper
    half adjacent to the lower half form the separator (numbered last), and both halves recurse
    down to ``leaf`` nodes. On a structured grid the separators are grid lines.
    """
    pattern = sp.csr_matrix((np.ones(indices.size), indices, indptr))
    order = []

    def dissect(nodes):
        if nodes.size <= leaf:
            order.append(nodes)
            return
        x = coords[nodes]
        axis = int(np.argmax(np.ptp(x, axis=0)))
        levels = np.unique(np.round(x[:, axis], 12))
        cut = levels[len(levels) // 2] - 1e-12 * (levels[-1] - levels[0])
        lower, upper = nodes[x[:, axis] < cut], nodes[x[:, axis] >= cut]
        in_lower = np.zeros(pattern.shape[0])
        in_lower[lower] = 1.0
        touching = (pattern[upper] @ in_lower) > 0
        dissect(lower)
        dissect(upper[~touching])
        order.append(upper[touching])

    dissect(np.arange(indptr.size - 1))
    return np.concatenate(order)


def cholesky_pattern(indptr, indices):
    """Column pattern of L (CSC, diagonal first) for a symmetric CSR pattern, by the recurrence
    struct(L_j) = struct(A_j below j) + sum of struct(L_c) over the children c of j."""
    n = indptr.size - 1
    pending = [[] for _ in range(n)]
    columns = []
    for j in range(n):
        row = indices[indptr[j]:indptr[j + 1]]
        below = np.unique(np.concatenate([row] + pending[j]))
        below = below[below > j]
        columns.append(np.concatenate([[j], below]))
        if below.size:
            pending[below[0]].append(below)   # j's parent in the elimination tree
    counts = np.array([c.size for c in columns])
    lp = np.concatenate([[0], np.cumsum(counts)])
    return lp, np.concatenate(columns)


class InterleavedCholesky:
    """Cholesky factorisations P A_b P^T = L_b L_b^T of up to 8 SPD matrices with one pattern.

    The factors are stored interleaved, ``lx[p, b]`` = entry p of L_b, so the compiled kernels
    run the scalar left-looking algorithm on all lanes at once with SIMD instructions. The
    ordering P is a nested dissection by dof coordinates.

    Args:
        indptr, indices: symmetric CSR pattern of A (n x n), sorted column indices.
        coords: ``(n, d)`` coordinates of the unknowns.
    """

    lanes = LANES

    def __init__(self, indptr, indices, coords):
        self.ffi, self.lib = kernels()
        n = indptr.size - 1
        self.perm = dissection_ordering(indptr, indices, coords)
        inverse = np.empty(n, dtype=np.int64)
        inverse[self.perm] = np.arange(n)
        rows = inverse[np.repeat(np.arange(n), np.diff(indptr))]
        cols = inverse[indices]
        permuted = sp.csr_matrix((np.ones(indices.size), (rows, cols)), shape=(n, n))
        permuted.sort_indices()
        lp, li = cholesky_pattern(permuted.indptr, permuted.indices)
        column = np.repeat(np.arange(n), np.diff(lp))
        # entries of A in the lower triangle of P A P^T and their positions in L
        self.lower = np.flatnonzero(rows >= cols)
        self.a_to_l = np.searchsorted(column * n + li, cols[self.lower] * n + rows[self.lower])
        below = np.flatnonzero(li != column)
        by_row = below[np.lexsort((column[below], li[below]))]
        rp = np.concatenate([[0], np.cumsum(np.bincount(li[by_row], minlength=n))])
        self.n, self.nnz = n, int(lp[-1])
        assert self.nnz < 2**31, "the kernels index the factor with 32-bit integers"
        # selects A's CSR entries into L's positions (explicit zeros at the fill)
        self._to_factor = sp.csr_matrix((np.ones(self.lower.size), (self.a_to_l, self.lower)),
                                        shape=(self.nnz, indices.size))
        self._arrays = [np.ascontiguousarray(a, dtype=np.int32)
                        for a in (lp, li, rp, by_row, lp[column[by_row] + 1])]

    def value_map(self, M):
        """``M`` mapping coefficients to A's CSR values -> the map to the factor's storage."""
        return (self._to_factor @ M).tocsr()

    def new_slot(self, lanes):
        return {"lx": None, "lanes": lanes, "tag": None}

    def slot_bytes(self, slot):
        return 8 * self.nnz * slot["lanes"]

    def factorise(self, slot, initial):
        """Factor in place ``initial (nnz_L, lanes)``: A's values at L's positions, zero fill.

        Returns:
            ``(lanes,)`` bool, the lanes whose matrix was not numerically positive definite.
        """
        lanes = slot["lanes"]
        slot["lx"] = lx = np.ascontiguousarray(initial, dtype=np.float64)
        info = np.zeros(lanes, dtype=np.int32)
        work = np.empty((self.n, lanes))
        ptrs = [self.ffi.from_buffer("int[]", a) for a in self._arrays]
        getattr(self.lib, f"factor{lanes}")(self.n, *ptrs, self.ffi.from_buffer("double[]", lx),
                                           self.ffi.from_buffer("double[]", work),
                                           self.ffi.from_buffer("int[]", info))
        return info != 0

    def solve(self, slot, rhs):
        """``A_b^-1 rhs[:, b]`` for ``rhs (n, lanes)`` with the factors held in ``slot``."""
        x = np.ascontiguousarray(rhs[self.perm])
        lp, li = (self.ffi.from_buffer("int[]", a) for a in self._arrays[:2])
        getattr(self.lib, f"solve{slot['lanes']}")(self.n, lp, li,
                                                   self.ffi.from_buffer("double[]", slot["lx"]),
                                                   self.ffi.from_buffer("double[]", x))
        out = np.empty_like(x)
        out[self.perm] = x
        return out


class PetscCholesky:
    """PETSc's native sparse Cholesky (nd ordering), one matrix per slot; the fallback."""

    lanes = (1,)

    def __init__(self, indptr, indices):
        self.indptr = indptr.astype(PETSc.IntType)
        self.indices = indices.astype(PETSc.IntType)

    def new_slot(self, lanes):
        n = self.indptr.size - 1
        A = PETSc.Mat().createAIJ(size=(n, n), csr=(self.indptr, self.indices,
                                                    np.ones(self.indices.size)),
                                  comm=PETSc.COMM_SELF)
        A.setOption(PETSc.Mat.Option.SPD, True)
        ksp = PETSc.KSP().create(PETSc.COMM_SELF)
        ksp.setOperators(A)
        ksp.setType("preonly")
        ksp.getPC().setType("cholesky")
        ksp.getPC().setFactorOrdering("nd")
        ksp.setErrorIfNotConverged(False)
        return {"A": A, "ksp": ksp, "x": A.createVecRight(), "b": A.createVecLeft(),
                "lanes": 1, "tag": None}

    def slot_bytes(self, slot):
        F = slot["ksp"].getPC().getFactorMatrix()
        return 12 * F.getInfo()["nz_used"] + 8 * (self.indptr.size - 1)

    @staticmethod
    def value_map(M):
        return M

    def factorise(self, slot, values):
        """Factor the matrix with CSR values ``values (nnz_A, 1)``; returns ``[failed]``."""
        slot["A"].setValuesCSR(self.indptr, self.indices, values[:, 0])
        slot["A"].assemble()
        slot["ksp"].setOperators(slot["A"])
        try:
            slot["ksp"].setUp()
        except PETSc.Error as err:
            log.debug("PETSc Cholesky failed (%s)", err)      # the model logs the batch
            return np.array([True])
        return np.array([False])

    def solve(self, slot, rhs):
        slot["b"].getArray()[:] = rhs[:, 0]
        slot["ksp"].solve(slot["b"], slot["x"])
        if slot["ksp"].getConvergedReason() < 0:
            return np.full_like(rhs, np.nan)
        return slot["x"].getArray().copy()[:, None]
