"""Run the default settings on every suite problem, with the baselines at the same nFS.

Usage (all problems and methods; long: run it in the background with a log)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/run.py

A subset (rows of ``suite.json`` are replaced, the others kept)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/run.py --problems quadratic-a-sharp \
        --methods msign,hmc

The held-out problems (``problems.heldout()``: no setting was chosen on them; their
long-run references are made by ``reference.py`` like the suite's) go to ``heldout.json``
and ``heldout.md``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/run.py --heldout --methods msign

Methods, every one run through ``geoinvert.run`` on the problem's case with the package
defaults (``output.samples`` 2000 so that the stored draws carry the Monte-Carlo accuracy
of the runs, figures off):

- ``msign``: the default flow with its default correction;
- ``laplace``: the low-rank Laplace approximation (its own, small, cost);
- ``hmc``, ``mala``, ``pcn``, ``gpcn``: default chains (4) with as many iterations as give
  the ``msign`` run's nFS (the first quarter warm-up; thinned to at most 4000 stored draws).

Scores against the problem's reference (``problems.py``): RMS over cells of the mean error
and of the relative std error, both in units of the reference std; for bimodal problems, the
mass of t = <d, x> > 0, the mass between the modes and each side's centre and width, against
the reference's; for the flows on exact problems the Jeffreys divergence of the trained flow;
R-hat and bulk ESS of the chains; effective samples per 1000 nFS (chains: the smallest bulk
ESS; Laplace: the importance ESS of its draws); and the verdict the package printed. A row
*meets* the acceptance when mean error <= 0.1, std error <= 0.1, the mode mass within 0.05
of the reference's and R-hat <= 1.01; a row that misses it while the verdict says ``ok`` is
a *silent failure*, the one outcome the package must never produce.

Writes ``benchmarks/results/suite.json`` and ``suite.md``.
"""

import argparse
import contextlib
import fcntl
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import ROOT, heldout, problems, reference, scores  # noqa: E402

import geoinvert  # noqa: E402
from geoinvert.diagnostics import jeffreys_divergence  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("msign", "laplace", "hmc", "mala", "pcn", "gpcn")
MEAN_MAX, STD_MAX, MODE_MAX, RHAT_MAX = 0.1, 0.1, 0.05, 1.01


def _chain_sampler(method, nfs, chains=4, leapfrog=10, stored=4000):
    """Sampler settings with ``chains`` chains using about ``nfs`` solves."""
    cost = leapfrog if method == "hmc" else 1
    laplace = 700 if method == "gpcn" else 0
    iterations = max(40, (nfs - laplace) // (chains * cost) - 1)
    warmup = iterations // 4
    draws = iterations - warmup
    thin = max(1, math.ceil(chains * draws / stored))
    return {"kind": method, "chains": chains, "warmup": warmup, "draws": draws // thin,
            "thin": thin}


def _flow_divergence(result, ref):
    """D_J of the trained flow against the exact posterior (normalised densities)."""
    ds, model = result.dataset, result.model
    x_q = torch.from_numpy(ds["flow_samples"].values)
    log_q_q = ds["flow_log_prob"].values
    log_p_q = ref.exact.log_prob(x_q).numpy()
    x_p = torch.from_numpy(ref.samples)
    with torch.no_grad():
        log_q_p = torch.cat([model.log_prob(c.to(next(model.parameters()).dtype))
                             for c in x_p.split(500)]).double().numpy()
    log_p_p = ref.exact.log_prob(x_p).numpy()
    d = jeffreys_divergence(log_q_q, log_p_q, log_p_p, log_q_p)
    return d.value, d.stderr


def run_case(problem, method, nfs, outdir):
    """``(result, wall seconds)`` of ``method`` on ``problem``'s case as the suite runs it:
    the package defaults (``msign``) or a baseline at about ``nfs`` solves, 2000 stored
    draws, no figures."""
    config = json.loads(json.dumps(problem.config))
    config["output"] = {**config.get("output", {}), "samples": 2000, "figures": False}
    if method == "laplace":
        config["sampler"] = {"kind": "laplace"}
    elif method != "msign":
        config["sampler"] = _chain_sampler(method, nfs)
    start = time.perf_counter()
    result = geoinvert.run(config, out=Path(outdir) / f"{problem.name}-{method}.nc",
                           progress=False)
    return result, time.perf_counter() - start


def run_one(problem, ref, method, nfs, outdir):
    result, wall = run_case(problem, method, nfs, outdir)
    ds = result.dataset
    a = ds.attrs
    row = {"problem": problem.name, "method": method, "nfs": int(a["nfs"]), "wall_s": wall,
           **scores(ref, ds["samples"].values), "verdict": a["verdict"],
           "rhat": float(a.get("diagnostics_rhat", math.nan)),
           "ess": float(a.get("diagnostics_ess", math.nan)),
           "psis_khat": float(a.get("diagnostics_psis_khat", math.nan)),
           "draws": int(a.get("diagnostics_draws", 0)),
           "correction_nfs": int(a.get("diagnostics_correction_nfs", 0)),
           "leapfrog": float(a.get("diagnostics_leapfrog", math.nan)),
           "correction": a.get("diagnostics_correction", ""),
           "pilot_leapfrog": float(a.get("diagnostics_correction_pilot_leapfrog", math.nan)),
           "warmup": int(a.get("diagnostics_warmup", 0)),
           "modes_found": int(a.get("diagnostics_modes_found", 0)),
           "mode_jump_acceptance": float(a.get("diagnostics_mode_jump_acceptance", math.nan))}
    if method == "laplace":
        row["ess_per_1000_nfs"] = 1000 * a["diagnostics_is_ess"] * ds.sizes["sample"] / a["nfs"]
    else:
        row["ess_per_1000_nfs"] = 1000 * row["ess"] / a["nfs"]
    if method == "msign" and ref.exact is not None:
        row["jeffreys"], row["jeffreys_se"] = _flow_divergence(result, ref)
    meets = (row["mean_error_rms"] <= MEAN_MAX and row["std_error_rms"] <= STD_MAX
             and (not np.isfinite(row["rhat"]) or row["rhat"] <= RHAT_MAX))
    if "t_positive" in row:
        meets = meets and abs(row["t_positive"] - row["t_positive_ref"]) <= MODE_MAX
    if "orthant_error" in row:
        meets = meets and row["orthant_error"] <= MODE_MAX
    row["meets"] = bool(meets)
    row["silent_failure"] = bool(not meets and a["verdict"] == "ok")
    return row


def _modes(r, unit=""):
    """The modes cell: the mass of t > 0 against the exact one, or with several data
    directions the mass of each orthant of t, in percent."""
    if "orthants" in r:
        got, ref = (" / ".join(f"{100 * m:.1f}" for m in r[k]) for k in ("orthants",
                                                                         "orthants_ref"))
        return f"{got}{unit} ({ref}{unit})"
    if "t_positive" in r:
        return f"{100 * r['t_positive']:.1f}{unit} ({100 * r['t_positive_ref']:.1f}{unit})"
    return "-"


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else format(v, spec)


def markdown(rows, about, command, title="Benchmark suite: default settings on every problem"):
    lines = [f"# {title}", "",
             f"Command: `{command}`", "", f"Machine: {about}", "",
             "Errors in reference-std units (RMS over cells); modes: mass of t = <d, x> > 0 in "
             "percent, or with several data directions the mass of each orthant of t (orthant "
             "k: t_j > 0 where bit j of k is set), reference in brackets; ESS / 1000 nFS: "
             "smallest bulk ESS of the chains (Laplace: importance ESS) per 1000 solves; "
             "*meets*: mean and std error <= 0.1, every mode mass within 0.05, R-hat <= 1.01; "
             "*silent*: misses that while the verdict says ok.", "",
             "| problem | method | nFS | wall (s) | mean err | std err | modes + (ref) | "
             "R-hat | ESS / 1000 nFS | D_J | verdict | meets |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        modes = _modes(r)
        dj = f"{r['jeffreys']:.3g} +/- {r['jeffreys_se']:.2g}" if "jeffreys" in r else "-"
        verdict = "ok" if r["verdict"] == "ok" else f"{len(r['verdict'].split(' | '))} warnings"
        meets = "yes" if r["meets"] else ("**SILENT**" if r["silent_failure"] else "no")
        lines.append(f"| {r['problem']} | {r['method']} | {r['nfs']} | {r['wall_s']:.0f} | "
                     f"{r['mean_error_rms']:.3f} | {r['std_error_rms']:.3f} | {modes} | "
                     f"{_fmt(r['rhat'], '.3f')} | {_fmt(r['ess_per_1000_nfs'], '.2f')} | {dj} | "
                     f"{verdict} | {meets} |")
    bimodal = [r for r in rows if "t_positive" in r]
    if bimodal:
        lines += ["", "Marginal along the data direction (centre / width of each side, mass "
                  "between the modes; reference in brackets):", "",
                  "| problem | method | centre + | width + | centre - | width - | between |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in bimodal:
            cells = [f"{_fmt(r[f't_{k}'], '.3g')} ({_fmt(r[f't_{k}_ref'], '.3g')})"
                     for k in ("centre_plus", "width_plus", "centre_minus", "width_minus")]
            lines.append(f"| {r['problem']} | {r['method']} | " + " | ".join(cells) +
                         f" | {100 * r['t_between']:.2f} % ({100 * r['t_between_ref']:.2f} %) |")
    return "\n".join(lines) + "\n"


def headline(rows):
    """The README's table: the default run on every problem, and the silent-failure count."""
    lines = ["| problem | nFS | mean error | std error | mass t > 0 (exact) | R-hat | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in rows if r["method"] == "msign"):
        modes = _modes(r, " %")
        verdict = "ok" if r["verdict"] == "ok" else "warns"
        lines.append(f"| {r['problem']} | {r['nfs']:,} | {r['mean_error_rms']:.3f} | "
                     f"{r['std_error_rms']:.3f} | {modes} | {_fmt(r['rhat'], '.3f')} | "
                     f"{verdict} |")
    silent = sum(r["silent_failure"] for r in rows)
    lines += ["", "Silent failures (a result outside the suite's accuracy criteria whose verdict "
              f"says ok):\n{silent} of {len(rows)} runs, all methods included."]
    return "\n".join(lines)


def machine():
    """The machine and the threads the runs use, as the results record them."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads"


def head_commit():
    """The checkout's short commit hash, as the result rows record it."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def locked_results(path):
    """The results document ``{"rows": [...], ...}`` stored at ``path``, to be updated in
    place while an exclusive lock on it is held (several invocations may share one results
    set), then written back whole."""
    with open(Path(tempfile.gettempdir()) / f"geoinvert-{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        document = json.loads(path.read_text()) if path.exists() else {"rows": []}
        yield document
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(path)


def _store(path, row, chosen, title, command):
    """Replace ``row``'s (problem, method) in ``path`` and rewrite the markdown beside it; the
    rows after the update, in the order of ``chosen``'s list."""
    with locked_results(path) as document:
        rows = [r for r in document["rows"]
                if (r["problem"], r["method"]) != (row["problem"], row["method"])]
        rows.append(row)
        order = {q.name: i for i, q in enumerate(chosen)}
        rows.sort(key=lambda r: (order.get(r["problem"], 99), METHODS.index(r["method"])))
        document.update(rows=rows, machine=machine())
        path.with_suffix(".md").write_text(markdown(rows, document["machine"], command, title))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="all")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--heldout", action="store_true",
                   help="the held-out problems (problems.heldout), written to heldout.json")
    p.add_argument("--headline", action="store_true",
                   help="print the README's table from suite.json and stop")
    args = p.parse_args(argv)
    if args.headline:
        print(headline(json.loads((RESULTS / "suite.json").read_text())["rows"]))
        return
    listed = heldout() if args.heldout else problems()
    chosen = [q for q in listed if args.problems == "all" or q.name in
              args.problems.split(",")]
    methods = args.methods.split(",")
    path = RESULTS / ("heldout.json" if args.heldout else "suite.json")
    title = ("Held-out problems: default settings on problems no setting was chosen on"
             if args.heldout else "Benchmark suite: default settings on every problem")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/run.py" + \
        (" --heldout" if args.heldout else "")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    commit = head_commit()
    with tempfile.TemporaryDirectory() as outdir:
        for problem in chosen:
            ref = reference(problem)
            nfs = None
            for method in methods:
                if method != "msign" and method != "laplace" and nfs is None:
                    nfs = next((r["nfs"] for r in rows if r["problem"] == problem.name
                                and r["method"] == "msign"), 100_000)
                print(f"{problem.name}: {method} ...", flush=True)
                row = run_one(problem, ref, method, nfs, outdir)
                row["commit"] = commit
                if method == "msign":
                    nfs = row["nfs"]
                table = markdown([row], "", "").splitlines()
                print("\n".join("  " + l for l in table if l.startswith(f"| {problem.name}")),
                      flush=True)
                rows = _store(path, row, listed, title, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
