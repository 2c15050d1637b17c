"""The memory estimate of ``geoinvert check`` against the measured peak of real runs.

Each case is a variant of ``cases/default.yaml`` (levels, FE mesh, prior, observation count),
run end to end by ``geoinvert run`` in a fresh process with a short training (2 steps a stage,
no correction, 50 stored draws), so that set-up, the importance pool, training batches, the
final draws and the result file all happen; the peak resident memory of that process
(``ru_maxrss``) is compared with :func:`geoinvert.case.estimate_memory`. The estimate is meant
as a safe side bound for refusing runs that cannot fit: the ratio estimate / measured should
lie between 1 and about 2.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py

Writes benchmarks/results/memory.json and memory.md.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

CASES = [  # name, finest level, FE cells per side at least, prior, observation points
    ("8x8, 16 FE cells", 3, 16, "matern", 9),
    ("32x32, 32 FE cells", 5, 32, "matern", 9),
    ("64x64, 64 FE cells", 6, 64, "matern", 9),
    ("64x64 iid, 64 FE cells", 6, 64, "iid", 9),
    ("8x8, 64 FE cells, 20000 points", 3, 64, "matern", 20000),
    ("128x128, 128 FE cells", 7, 128, "matern", 9),
]

CHILD = """
import resource, sys
from geoinvert import cli
code = cli.main(["run", sys.argv[1], "--out", sys.argv[2], "-q"])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def case_dict(level, cells, prior, points):
    c = yaml.safe_load((ROOT / "cases" / "default.yaml").read_text())
    c["levels"] = {"finest": level, "min_cells": cells}
    c["prior"]["kind"] = prior
    if prior == "iid":
        c["prior"].pop("correlation_length")
    if points != 9:
        rng = np.random.default_rng(0)
        c["observations"] = {"points": rng.uniform(0.02, 0.98, (points, 2)).round(5).tolist()}
    # the small flow the demo case had when these figures were measured
    c["sampler"].update(blocks=3, hidden=16, batch=32, steps=2, correction={"kernel": "none"})
    c["output"] = {"samples": 50, "figures": False}
    return c


def measure(name, level, cells, prior, points, folder):
    from geoinvert.case import estimate_memory, load_case
    path = folder / f"{name.replace(' ', '_').replace(',', '')}.yaml"
    config = case_dict(level, cells, prior, points)
    if points > 5000:       # a case file holds at most 1 MB: the points go to a CSV
        pts = config["observations"].pop("points")
        csv = path.with_suffix(".csv")
        csv.write_text("x,y,value\n" + "".join(f"{x},{y},0.5\n" for x, y in pts))
        config["data"] = {"file": csv.name}
    path.write_text(yaml.safe_dump(config))
    estimate = estimate_memory(load_case(path))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(path.with_suffix(".nc"))],
                         capture_output=True, text=True, check=True)
    code, peak = (int(v) for v in out.stdout.split()[-2:])
    assert code == 0, out.stderr
    row = {"case": name, "estimate_gb": estimate / 1e9, "measured_gb": peak / 1e9,
           "ratio": estimate / peak}
    print(f"{name:34s} estimate {row['estimate_gb']:6.2f} GB  measured "
          f"{row['measured_gb']:6.2f} GB  ratio {row['ratio']:.2f}", flush=True)
    return row


def main():
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(*case, Path(tmp)) for case in CASES]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Memory estimate against measured peaks", "",
             "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py`: each case is "
             "`cases/default.yaml` with the levels, FE mesh, prior and observations below, "
             "2 training steps a stage, no correction and 50 stored draws, run by "
             "`geoinvert run` in its own process.", "",
             "| case | estimate (GB) | measured peak (GB) | estimate / measured |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['estimate_gb']:.2f} | {r['measured_gb']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    low = [r["case"] for r in rows if r["ratio"] < 1]
    if low:
        print("estimate below the measured peak for: " + ", ".join(low))


if __name__ == "__main__":
    main()
