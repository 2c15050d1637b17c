"""Forward + adjoint-gradient throughput of the elliptic model against the naive loop.

The naive loop (measured in the same run) does, per sample: dolfinx assembly of A(m) and b,
PETSc LU factorisation, the forward solve, the adjoint solve with the same factorisation, and
dolfinx assembly of the cell gradient. The fast path is ``EllipticForward(solver="fast")`` on a
batch: its compiled interleaved Cholesky (8 samples per SIMD vector) and, as a reference, the same
solver with PETSc's native Cholesky. All must give the same observations and gradients to 1e-10
relative. Everything runs on one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forward.py [--batch 64] [--rounds 3]

Writes benchmarks/results/forward.json and forward.md.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from geoinvert.problem.forward.elliptic import EllipticForward, FastSolver

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEM = dict(
    source="1 + exp(-((x-0.3)^2 + (y-0.7)^2) / 0.02)",
    dirichlet={"left": 0.0, "right": 1.0},
    points=[[(i + 0.5) / 5, (j + 0.5) / 5] for i in range(5) for j in range(5)],
)


def fields(num, shape, seed):
    """Smooth-ish random log-coefficients of unit scale (a 2-level sum of lattice noise)."""
    rng = np.random.default_rng(seed)
    coarse = np.kron(rng.normal(size=(num, shape[0] // 8, shape[1] // 8)), np.ones((8, 8)))
    return 0.8 * coarse + 0.3 * rng.normal(size=(num, *shape))


def time_fast(model, m, w):
    t0 = time.perf_counter()
    y, state = model.solve_batch(m)
    grad = model.vjp_batch(state, w)
    return time.perf_counter() - t0, y, grad


def time_naive(model, m, w):
    t0 = time.perf_counter()
    y, grad = model.solver.value_and_vjp(m, w)
    return time.perf_counter() - t0, y, grad


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_case(name, mesh_cells, batch, rounds, naive_batch):
    shape = (64, 64)
    fast = EllipticForward(MPI.COMM_SELF, shape, mesh_cells=mesh_cells, solver="fast", **PROBLEM)
    naive = EllipticForward(MPI.COMM_SELF, shape, mesh_cells=mesh_cells, solver="lu", **PROBLEM)
    petsc = EllipticForward(MPI.COMM_SELF, shape, mesh_cells=mesh_cells, solver="fast", **PROBLEM)
    petsc.solver = FastSolver(petsc.disc, backend="petsc")
    backend = type(fast.solver.backend).__name__.strip("_")
    n_dofs = fast.disc.V.dofmap.index_map.size_global
    m = fields(batch, shape, 0)
    w = np.random.default_rng(1).normal(size=(batch, fast.n_obs))
    time_fast(fast, m, w)                       # warm-up: factor slots, JIT caches
    time_fast(petsc, m[:2], w[:2])
    time_naive(naive, m[:2], w[:2])
    t_fast, t_petsc, t_naive, errors = [], [], [], []
    for r in range(rounds):                     # interleaved, so drift hits all alike
        tf, yf, gf = time_fast(fast, m, w)
        tp, yp, gp = time_fast(petsc, m[:naive_batch], w[:naive_batch])
        tn, yn, gn = time_naive(naive, m[:naive_batch], w[:naive_batch])
        t_fast.append(tf / batch)
        t_petsc.append(tp / naive_batch)
        t_naive.append(tn / naive_batch)
        errors.append(max(rel_err(yf[:naive_batch], yn), rel_err(gf[:naive_batch], gn),
                          rel_err(yp, yn), rel_err(gp, gn)))
    fast_ms, naive_ms = 1e3 * np.median(t_fast), 1e3 * np.median(t_naive)
    petsc_ms = 1e3 * np.median(t_petsc)
    row = dict(case=name, mesh_cells=list(mesh_cells), dofs=int(n_dofs), batch=batch,
               backend=backend, naive_samples=naive_batch, fast_ms_per_sample=fast_ms,
               fast_petsc_ms_per_sample=petsc_ms, naive_ms_per_sample=naive_ms,
               fast_per_second=1e3 / fast_ms, naive_per_second=1e3 / naive_ms,
               speedup=naive_ms / fast_ms, speedup_petsc_backend=naive_ms / petsc_ms,
               max_rel_difference=max(errors),
               ratios_per_round=[n / f for n, f in zip(t_naive, t_fast)])
    print(f"{name:>22}  dofs {n_dofs:6d}  fast {fast_ms:8.2f} ms ({backend})  "
          f"fast/PETSc {petsc_ms:8.2f} ms  naive {naive_ms:8.2f} ms  "
          f"speed-up {row['speedup']:5.2f}x ({row['speedup_petsc_backend']:.2f}x)  "
          f"max rel diff {row['max_rel_difference']:.1e}", flush=True)
    return row


def write(rows, args):
    RESULTS.mkdir(exist_ok=True)
    meta = dict(python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), omp_threads=os.environ.get("OMP_NUM_THREADS"),
                batch=args.batch, rounds=args.rounds, date=time.strftime("%Y-%m-%d %H:%M"),
                load_average=[round(v, 2) for v in os.getloadavg()])
    (RESULTS / "forward.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["# Forward + gradient throughput (64x64 lattice, 25 point observations)", "",
             f"Median of {args.rounds} interleaved rounds, batch {args.batch}, "
             f"OMP_NUM_THREADS={meta['omp_threads']}, {meta['date']}, load average "
             f"{meta['load_average'][0]:.1f} on {meta['cpus']} cores at the end.", "",
             f"Fast solver backend: {rows[0]['backend']}; 'fast, PETSc LLT' is the same solver "
             "with PETSc's native Cholesky.", "",
             "| mesh | dofs | fast ms/sample | fast, PETSc LLT ms/sample | naive ms/sample | "
             "fast evals/s | speed-up | speed-up, PETSc LLT | max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dofs']} | {r['fast_ms_per_sample']:.2f} | "
                     f"{r['fast_petsc_ms_per_sample']:.2f} | "
                     f"{r['naive_ms_per_sample']:.2f} | {r['fast_per_second']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_petsc_backend']:.2f}x | "
                     f"{r['max_rel_difference']:.1e} |")
    (RESULTS / "forward.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="only the 64x64 mesh")
    args = parser.parse_args()
    rows = [run_case("Q1 64x64 mesh", (64, 64), args.batch, args.rounds, args.batch)]
    if not args.skip_large:
        rows.append(run_case("Q1 256x256 mesh", (256, 256), args.batch // 4, args.rounds, 4))
    write(rows, args)


if __name__ == "__main__":
    main()
