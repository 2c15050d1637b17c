"""Benchmark of the prior conditioning layers: set-up time, memory and batch sampling/inversion per L.

Usage: ``.venv/bin/python benchmarks/prior.py [--levels 5 6 7 8] [--batch 64] [--threads 1]``.
Each L runs in a fresh subprocess so that its peak resident memory is its own. Writes
``benchmarks/results/prior.json`` and ``benchmarks/results/prior.md``.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_gb():
    """Current resident set size in GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _timed(fn, repeats=3):
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_one(levels, batch, kind):
    """Set up every layer of one hierarchy and time it; returns a dict."""
    import torch

    from geoinvert.priors import IIDPrior, MaternPrior

    start = time.perf_counter()
    prior = (MaternPrior(levels, alpha=2, correlation_length=0.1, boundary="dirichlet")
             if kind == "matern" else IIDPrior(levels, std=1.0))
    prior.coarsest(torch.zeros(1, 2, 2, dtype=torch.float64))
    per_level = []
    for level in range(2, levels + 1):
        t0 = time.perf_counter()
        layer = prior.conditioning(level)
        per_level.append({"level": level, "kind": type(layer._cond).__name__.strip("_"),
                          "setup_s": time.perf_counter() - t0, "layer_mb": layer.nbytes / 1e6,
                          "rss_gb": _rss_gb(), "peak_gb": _peak_gb()})
    setup = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    x = prior.sample(batch, levels, generator=gen)

    def inverse():
        cur = x
        for level in range(levels, 1, -1):
            cur = prior.conditioning(level).inverse(cur)[0]
        return prior.coarsest_inverse(cur)

    return {"L": levels, "dims": 4 ** levels, "kind": kind, "batch": batch,
            "setup_s": setup, "peak_gb": _peak_gb(), "per_level": per_level,
            "sample_s": _timed(lambda: prior.sample(batch, levels, generator=gen)),
            "inverse_s": _timed(inverse),
            "log_prob_s": _timed(lambda: prior.log_prob(x, levels))}


def _markdown(rows, meta):
    lines = [f"# Prior conditioning benchmark ({meta['kind']})", "",
             f"Machine: {meta['machine']}; threads: {meta['threads']}; batch {meta['batch']}; "
             f"float64; times are medians of 3 after a warm-up.", "",
             "| L | dims | set-up (s) | peak RSS (GB) | sample (s) | inverse (s) | log_prob (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['L']} | {r['dims']} | {r['setup_s']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['sample_s']:.3f} | {r['inverse_s']:.3f} | {r['log_prob_s']:.3f} |" for r in rows]
    lines += ["", "Per level (set-up of PC_l, stored factors, resident memory after it):", "",
              "| L | level | layer | set-up (s) | factors (MB) | RSS after (GB) |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['L']} | {p['level']} | {p['kind']} | {p['setup_s']:.2f} | "
              f"{p['layer_mb']:.1f} | {p['rss_gb']:.2f} |" for r in rows for p in r["per_level"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Run the benchmark for each requested L in a subprocess and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[5, 6, 7])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kind", choices=["matern", "iid"], default="matern")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.one, args.batch, args.kind)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rows = []
    for levels in args.levels:
        cmd = [sys.executable, __file__, "--one", str(levels), "--batch", str(args.batch),
               "--threads", str(args.threads), "--kind", args.kind]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"L={levels} dims={r['dims']} setup={r['setup_s']:.2f}s peak={r['peak_gb']:.2f}GB "
              f"sample={r['sample_s']:.3f}s inverse={r['inverse_s']:.3f}s "
              f"log_prob={r['log_prob_s']:.3f}s", flush=True)
    meta = {"kind": args.kind, "batch": args.batch, "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.kind == "matern" else f"_{args.kind}"
    (RESULTS / f"prior{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=2) + "\n")
    (RESULTS / f"prior{suffix}.md").write_text(_markdown(rows, meta))


if __name__ == "__main__":
    main()
