"""Ensemble scaling on this machine: forward+gradient throughput and a short training run on
1 and N MPI ranks, each measured in the same invocation, with the ratio.

    .venv/bin/python benchmarks/parallel.py                  # 1 vs 2 ranks
    .venv/bin/python benchmarks/parallel.py --ranks 1 2 --rounds 5

Forward: every rank builds the 64x64 elliptic model on ``COMM_SELF`` (the ``FastSolver``) and
evaluates its block of a batch of 256 fields (values and adjoint gradients); the time of a round
is the slowest rank's. Training: ``geoinvert run`` on a case (default ``cases/aquifer.yaml``,
32 x 32) with a fixed number of steps per stage, under ``mpirun -n N``. Results go to ``benchmarks/results/parallel.{json,md}``.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _worker_forward(args):
    import numpy as np
    import torch
    from mpi4py import MPI

    from geoinvert.problem.forward.elliptic import EllipticForward
    from geoinvert.parallel import Ensemble
    world = MPI.COMM_WORLD
    n = 64
    pts = [[(i + 0.5) / 5, (j + 0.5) / 5] for i in range(5) for j in range(5)]
    model = EllipticForward(MPI.COMM_SELF, (n, n), solver="fast", mesh_cells=(n, n),
                            source=1.0, dirichlet={"left": 1.0, "right": 0.0}, points=pts)
    rng = np.random.default_rng(0)
    batch = torch.tensor(rng.normal(size=(args.batch, n, n)) * 0.8)
    mine = batch[Ensemble(world).part(args.batch)].clone().requires_grad_(True)
    times = []
    for r in range(args.rounds + 1):             # the first round warms up (JIT, factors)
        world.Barrier()
        t0 = time.perf_counter()
        model(mine).sum().backward()
        mine.grad = None
        elapsed = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if r:
            times.append(elapsed)
    if world.rank == 0:
        print(json.dumps({"times": times}))


def _mpirun(ranks, argv, timeout):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = ["mpirun", *root, "--oversubscribe", "-n", str(ranks), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout, time.perf_counter() - started


def forward_throughput(ranks, args):
    out, _ = _mpirun(ranks, [sys.executable, __file__, "--worker", "--batch", str(args.batch),
                             "--rounds", str(args.rounds)], timeout=1800)
    times = json.loads(out.strip().splitlines()[-1])["times"]
    best = sorted(times)[len(times) // 2]                  # median round
    return {"ranks": ranks, "round_s": best, "rounds": times,
            "samples_per_s": args.batch / best}


def training_time(ranks, args):
    """``geoinvert run`` of ``args.case`` with ``args.steps`` steps per stage under mpirun."""
    source = Path(args.case).resolve()
    text = re.sub(r"(?m)^(\s*steps:\s*)\d+", rf"\g<1>{args.steps}", source.read_text())
    # beside the original, so that its relative input paths still resolve
    case = source.with_name(f".parallel-{os.getpid()}-{source.name}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            case.write_text(text)
            _, wall = _mpirun(ranks, [sys.executable, "-m", "geoinvert.cli", "run", str(case),
                                      "--out", str(Path(tmp) / "out.nc"), "-q",
                                      "--checkpoint-every", "0"], timeout=3600)
        finally:
            case.unlink(missing_ok=True)
        import xarray as xr
        with xr.open_dataset(Path(tmp) / "out.nc") as ds:
            nfs, inner = int(ds.attrs["nfs"]), float(ds.attrs["wall_time"])
    return {"ranks": ranks, "wall_s": wall, "run_s": inner, "nfs": nfs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per stage")
    parser.add_argument("--case", default=str(ROOT / "cases" / "aquifer.yaml"),
                        help="case trained at each rank count (default: cases/aquifer.yaml)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker_forward(args)
    if shutil.which("mpirun") is None:
        sys.exit("mpirun not found")
    load = os.getloadavg()[0]
    forward = [forward_throughput(r, args) for r in args.ranks]
    training = [training_time(r, args) for r in args.ranks]
    base_f, base_t = forward[0]["samples_per_s"], training[0]["run_s"]
    for row in forward:
        row["speedup"] = row["samples_per_s"] / base_f
    for row in training:
        row["speedup"] = base_t / row["run_s"]
    result = {"machine_cores": os.cpu_count(), "load_average_before": load,
              "batch": args.batch, "steps_per_stage": args.steps, "case": args.case,
              "forward": forward,
              "training": training}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parallel.json").write_text(json.dumps(result, indent=2))
    lines = [f"Ensemble scaling, {os.cpu_count()} cores, load average {load:.1f} before the run "
             "(`.venv/bin/python benchmarks/parallel.py`).", "",
             f"Forward + adjoint gradient, 64x64 lattice on a 64x64 Q1 mesh, {args.batch} fields "
             "split over the ranks (median of the rounds, slowest rank):", "",
             "| ranks | round (s) | samples/s | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['ranks']} | {r['round_s']:.3f} | {r['samples_per_s']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in forward]
    lines += ["", f"Training `{Path(args.case).relative_to(ROOT) if Path(args.case).resolve().is_relative_to(ROOT) else args.case}` ({args.steps} steps per stage, "
              "`geoinvert run` under `mpirun -n N`; run time excludes start-up):", "",
              "| ranks | run (s) | whole command (s) | nFS | speed-up |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['ranks']} | {r['run_s']:.1f} | {r['wall_s']:.1f} | {r['nfs']} | "
              f"{r['speedup']:.2f}x |" for r in training]
    (RESULTS / "parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
