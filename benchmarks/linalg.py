"""Benchmark of BatchedCholesky (factor + 2 solves per sample) against PETSc's native Cholesky.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linalg.py [--grids 64 128]
[--batch 16 64] [--threads 1 2] [--repeats 5]``.

The matrices are Q1 stiffness matrices K_b = sum_c k_{b,c} K_c + r M_lumped on an m x m cell
grid with log-normal cell coefficients (one 9-point pattern, different values per sample). The
baseline is what the forward model does today: one KSP (preonly + PC cholesky, "nd" ordering)
whose symbolic factorisation is reused, and per sample ``setValuesCSR; assemble; setOperators;
setUp; solve; solve``. Both methods are timed in the same process, interleaved, and both wall
and CPU (process) time are recorded because the machine is shared. Writes
``benchmarks/results/linalg.json`` and ``benchmarks/results/linalg.md``.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

RESULTS = Path(__file__).resolve().parent / "results"
Q1 = np.array([[4, -1, -2, -1], [-1, 4, -1, -2], [-2, -1, 4, -1], [-1, -2, -1, 4]]) / 6.0


def q1_matrices(m, batch, seed=0, reaction=1e-2):
    """CSR pattern and (batch, nnz) values of Q1 stiffness + lumped reaction on an m x m grid."""
    nx = m + 1
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    base = (i * nx + j).ravel()
    cells = np.stack([base, base + 1, base + nx + 1, base + nx], 1)
    rows = np.concatenate([np.repeat(cells, 4, 1).ravel(), np.arange(nx * nx)])
    cols = np.concatenate([np.tile(cells, (1, 4)).ravel(), np.arange(nx * nx)])
    pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(nx * nx,) * 2)
    key = np.repeat(np.arange(nx * nx), np.diff(pattern.indptr)) * nx * nx + pattern.indices
    pos = np.searchsorted(key, rows * nx * nx + cols)
    S = sp.csr_matrix((np.ones(rows.size), (pos, np.arange(rows.size))), shape=(key.size, rows.size))
    k = np.exp(np.random.default_rng(seed).standard_normal((batch, m * m)))
    per_entry = np.concatenate([(k[:, :, None] * Q1.ravel()).reshape(batch, -1),
                                np.full((batch, nx * nx), reaction / m ** 2)], 1)
    return pattern.indptr, pattern.indices, np.asarray((S @ per_entry.T).T)


class PetscBaseline:
    """PETSc native sparse Cholesky (nd ordering) with the symbolic factorisation reused."""

    def __init__(self, indptr, indices, values):
        import petsc4py

        petsc4py.init()
        from petsc4py import PETSc

        n = len(indptr) - 1
        self.indptr = np.asarray(indptr, dtype=PETSc.IntType)
        self.indices = np.asarray(indices, dtype=PETSc.IntType)
        self.A = PETSc.Mat().createAIJ(size=(n, n), csr=(self.indptr, self.indices, values),
                                       comm=PETSc.COMM_SELF)
        self.A.setOption(PETSc.Mat.Option.SPD, True)
        self.ksp = PETSc.KSP().create(PETSc.COMM_SELF)
        self.ksp.setOperators(self.A)
        self.ksp.setType("preonly")
        self.ksp.getPC().setType("cholesky")
        self.ksp.getPC().setFactorOrdering("nd")
        self.x, self.b = self.A.createVecs()
        self.ksp.setUp()

    def run(self, values, rhs1, rhs2):
        """Factor + 2 solves per sample; returns the (B, n) solutions of both systems."""
        out1, out2 = np.empty_like(rhs1), np.empty_like(rhs2)
        for s in range(len(values)):
            self.A.setValuesCSR(self.indptr, self.indices, values[s])
            self.A.assemble()
            self.ksp.setOperators(self.A)
            self.ksp.setUp()
            for rhs, out in ((rhs1, out1), (rhs2, out2)):
                self.b.setArray(rhs[s])
                self.ksp.solve(self.b, self.x)
                out[s] = self.x.getArray()
        return out1, out2


def batched_run(chol, values, rhs1, rhs2):
    """Factor the batch and solve twice; returns both (B, n) solutions as numpy arrays."""
    chol.factor(values)
    return chol.solve(rhs1).numpy(), chol.solve(rhs2).numpy()


def _clock(fn):
    """(wall, cpu) seconds and result of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def bench_grid(m, batches, threads, repeats):
    """All rows of the table for one grid."""
    import torch

    from geoinvert.linalg import BatchedCholesky

    indptr, indices, values = q1_matrices(m, max(batches))
    t0 = time.perf_counter()
    chol = BatchedCholesky(indptr, indices)
    symbolic = time.perf_counter() - t0
    t0 = time.perf_counter()
    petsc = PetscBaseline(indptr, indices, values[0])
    petsc_symbolic = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    rows = []
    for B in batches:
        vals, r1, r2 = values[:B], rng.standard_normal((B, chol.n)), rng.standard_normal((B, chol.n))
        tv = torch.from_numpy(vals)
        for nt in threads:
            torch.set_num_threads(nt)
            batched_run(chol, tv, r1, r2)
            ours, base = [], []
            for _ in range(repeats):
                ours.append(_clock(lambda: batched_run(chol, tv, r1, r2)))
                base.append(_clock(lambda: petsc.run(vals, r1, r2)))
            x, y = ours[-1][2], base[-1][2]
            err = max(np.abs(x[0] - y[0]).max() / np.abs(y[0]).max(),
                      np.abs(x[1] - y[1]).max() / np.abs(y[1]).max())
            rows.append(_row(m, chol, B, nt, ours, base, err, symbolic, petsc_symbolic))
    torch.set_num_threads(1)
    return rows


def _row(m, chol, B, nt, ours, base, err, symbolic, petsc_symbolic):
    """Per-sample milliseconds (best and median over repeats) and ratios."""
    def per(ts, k, how):
        v = sorted(t[k] for t in ts)
        return 1e3 * (v[0] if how == "min" else v[len(v) // 2]) / B
    row = {"grid": m, "n": chol.n, "nnz": chol.nnz, "nnz_factor": chol.nnz_factor,
           "groups": len(chol.groups), "B": B, "torch_threads": nt,
           "symbolic_s": symbolic, "petsc_symbolic_s": petsc_symbolic, "max_rel_diff": err}
    for name, ts in (("batched", ours), ("petsc", base)):
        for k, clock in ((0, "wall"), (1, "cpu")):
            for how in ("min", "median"):
                row[f"{name}_{clock}_{how}_ms"] = per(ts, k, how)
    for clock in ("wall", "cpu"):
        row[f"speedup_{clock}"] = row[f"petsc_{clock}_min_ms"] / row[f"batched_{clock}_min_ms"]
    return row


def write(rows):
    """benchmarks/results/linalg.{json,md}."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    (RESULTS / "linalg.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# BatchedCholesky vs PETSc native Cholesky (factor + 2 solves, per sample)", "",
             "Q1 stiffness, random cell coefficients, nd ordering, symbolic phase reused by both. "
             "Milliseconds per sample, best of the repeats (median in brackets); CPU = process "
             "time (the machine is shared, so wall times are noisy). PETSc is single-threaded.", "",
             "| grid | n | B | torch threads | batched wall | PETSc wall | speedup wall "
             "| batched CPU | PETSc CPU | speedup CPU | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['grid']}x{r['grid']} | {r['n']} | {r['B']} | {r['torch_threads']} "
            f"| {r['batched_wall_min_ms']:.2f} ({r['batched_wall_median_ms']:.2f}) "
            f"| {r['petsc_wall_min_ms']:.2f} ({r['petsc_wall_median_ms']:.2f}) "
            f"| {r['speedup_wall']:.2f} "
            f"| {r['batched_cpu_min_ms']:.2f} | {r['petsc_cpu_min_ms']:.2f} | {r['speedup_cpu']:.2f} "
            f"| {r['max_rel_diff']:.1e} |")
    (RESULTS / "linalg.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [r for m in args.grids for r in bench_grid(m, args.batch, args.threads, args.repeats)]
    return write(rows)


if __name__ == "__main__":
    import sys

    sys.stdout.write(main() + "\n")
