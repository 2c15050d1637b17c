"""The default run's cost over seeds: how the solves spread between runs of one problem.

Usage (problems and seeds; rows of ``seeds.json`` for the same problem and seed are replaced,
the others kept, so two invocations may share the machine's cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/seeds.py elliptic-demo \
        elliptic-iid-8-heads --seeds 0-9

The default run stops when its correction's criteria hold (R-hat <= 1.01, bulk and tail ESS
>= 400), so its solves are a random quantity: another seed draws other flow samples and
other chains, and one run may re-adapt its metric where another does not. One row per run is
not a measure of it. Each run here is the suite's ``msign`` run (``run.py``'s ``run_one``:
``geoinvert.run`` with the package defaults, ``output.samples`` 2000) with ``sampler.seed``
set, scored against the problem's reference. Per problem the table gives the solves'
quantiles, how many runs met the suite's criteria, how many were within the solve budget the
suite aims at (1e5 solves up to 64 parameters, 2.5e5 above), any silent failure, and how many
runs re-adapted the correction's metric (their warm-up ran longer than configured); the rows
follow, one per run.

Writes ``benchmarks/results/seeds.json`` and ``.md``.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, by_name, reference  # noqa: E402
from run import head_commit, locked_results, machine, run_one  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SMALL, SMALL_BUDGET, LARGE_BUDGET = 64, 100_000, 250_000


def budget(parameters):
    """The solve budget the suite aims at for a problem of ``parameters`` parameters."""
    return SMALL_BUDGET if parameters <= SMALL else LARGE_BUDGET


def seeds(text):
    """``"0-9"`` or ``"0,3,5"`` as a list of seeds."""
    if "-" in text:
        lo, hi = (int(t) for t in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(t) for t in text.split(",")]


def summary(rows):
    """Per problem: solves' quantiles, runs meeting the criteria, share within the budget."""
    out = []
    for name in dict.fromkeys(r["problem"] for r in rows):
        mine = sorted((r for r in rows if r["problem"] == name), key=lambda r: r["seed"])
        nfs = np.array([r["nfs"] for r in mine])
        limit = budget(mine[0]["parameters"])
        out.append({"problem": name, "parameters": mine[0]["parameters"], "runs": len(mine),
                    "min": int(nfs.min()), "median": float(np.median(nfs)),
                    "mean": float(nfs.mean()), "max": int(nfs.max()), "budget": limit,
                    "within": int((nfs <= limit).sum()),
                    "meets": int(sum(r["meets"] for r in mine)),
                    "silent": int(sum(r["silent_failure"] for r in mine)),
                    "readapted": int(sum(_kernel(r) == "hmc" and r["warmup"] > r["warmup_config"]
                                         for r in mine)),
                    "lifted": int(sum(_kernel(r) == "lifted" for r in mine))})
    return out


def _kernel(row):
    """The correction's kernel of a run (rows from before ``kernel: auto`` ran HMC)."""
    return row.get("correction") or "hmc"


def markdown(rows):
    commands = dict.fromkeys(r["command"] for r in rows)
    lines = ["# The default run's solves over seeds", "",
             "Commands (each row records the one that made it):", "",
             *(f"    OMP_NUM_THREADS=1 .venv/bin/python {c}" for c in commands), "",
             "Code versions: " + ", ".join(dict.fromkeys(r["commit"] for r in rows))
             + "; machines: " + ", ".join(dict.fromkeys(r["machine"] for r in rows)) + ".", "",
             "The default `msign` run of each problem (as in `run.py`, `output.samples` 2000) "
             "with `sampler.seed` set. *Within budget*: runs with at most the solves the suite "
             "aims at (1e5 up to 64 parameters, 2.5e5 above); *meet*: runs within the suite's "
             "accuracy and R-hat criteria; *re-adapted*: runs whose HMC correction turned its "
             "first block into a further metric window; *lifted*: runs whose correction went "
             "on with the lifted kernel (`kernel: auto`).", "",
             "| problem | parameters | runs | nFS min / median / mean / max | within budget | "
             "meet | silent failures | re-adapted | lifted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary(rows):
        lines.append(f"| {s['problem']} | {s['parameters']} | {s['runs']} | {s['min']:,} / "
                     f"{s['median']:,.0f} / {s['mean']:,.0f} / {s['max']:,} | {s['within']} of "
                     f"{s['runs']} (<= {s['budget']:,}) | {s['meets']} | {s['silent']} | "
                     f"{s['readapted']} | {s['lifted']} |")
    lines += ["", "| problem | seed | nFS | correction nFS | kernel | draws / chain | warm-up | "
              "leapfrog | mean err | std err | R-hat | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["problem"], r["seed"])):
        lines.append(f"| {r['problem']} | {r['seed']} | {r['nfs']:,} | {r['correction_nfs']:,} | "
                     f"{_kernel(r)} | {r['draws']} | {r['warmup']} | {r['leapfrog']:.0f} | "
                     f"{r['mean_error_rms']:.3f} | {r['std_error_rms']:.3f} | {r['rhat']:.4f} | "
                     f"{r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problems", nargs="+", help="suite or held-out problems")
    p.add_argument("--seeds", type=seeds, default=list(range(10)),
                   help="seeds: a range 0-9 (the default) or a list 0,3,5")
    args = p.parse_args(argv)
    command = "benchmarks/suite/seeds.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    path = RESULTS / "seeds.json"
    commit, about = head_commit(), machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for problem in map(by_name, args.problems):
        ref = reference(problem)
        case = problem.case()
        parameters = int(np.prod(case.lattice_shape(case.finest)))
        warmup = case.config["sampler"]["correction"]["warmup"]   # what the defaults resolve to
        for seed in args.seeds:
            config = json.loads(json.dumps(problem.config))
            config["sampler"] = {**config.get("sampler", {}), "seed": seed}
            with tempfile.TemporaryDirectory() as tmp:
                row = run_one(dataclasses.replace(problem, config=config), ref, "msign", None,
                              tmp)
            row.update(seed=seed, parameters=parameters, warmup_config=warmup, command=command,
                       commit=commit, machine=about)
            print(json.dumps(row), flush=True)
            with locked_results(path) as document:
                document["rows"] = [r for r in document["rows"]
                                    if (r["problem"], r["seed"]) != (row["problem"], seed)]
                document["rows"].append(row)
                text = markdown(document["rows"])
                path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
