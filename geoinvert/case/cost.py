"""What a run will cost before it starts: forward solves, time and memory
(:func:`estimate_cost`, :func:`estimate_memory`), the summary ``geoinvert check`` prints and
the warnings about settings that will likely go wrong numerically.
"""

import math

from geoinvert.case.inputs import mesh_cells, resolve
from geoinvert.case.schema import (FLOW_KINDS, MCMC_KINDS, TRAINED_KINDS, VI_KINDS, chain_config,
                                   correction_config, flow_config, short, train_options)
from geoinvert.inference.config import TYPICAL_LEAPFROG, made_width
from geoinvert.parallel import EVALUATION_CHUNK

__all__ = ["MAX_LOG_CONTRAST", "reserved_solves", "training_solves", "estimate_cost", "BASE_BYTES",
           "FACTOR_BYTES_HELD", "estimate_memory", "machine_memory", "memory_refusal",
           "summary_lines", "case_warnings"]


MAX_LOG_CONTRAST = math.log(1e14)
"""Coefficient contrast (max k / min k, in log units) past which the elliptic solves lose
their accuracy in double precision: the stiffness matrix's condition number grows with it."""


# --- summary and documentation -----------------------------------------------------------------

def reserved_solves(config):
    """Solves a flow run spends after training: the final flow draws and, with the correction,
    its chains and the predictions of the stored samples (a budget's share that training
    does not get)."""
    correction, samples = correction_config(config), config["output"]["samples"]
    if not correction.enabled:
        return samples
    searched = (correction.independence and correction.modes) or correction.coordinates == "laplace"
    search = _mode_search_solves(config) if searched else 0
    return samples + correction.reserved() + samples + search


def training_solves(case):
    """Planned training solves of a flow (capped by what the budget leaves)."""
    return _training_cost(case)[0]


def _per_solve_seconds(case):
    fe_cells = case.hierarchy().mesh_cells(case.finest) ** 2 if _has_hierarchy() \
        else 4 ** case.finest
    return 2.5e-3 * fe_cells / 4096 if case.config["forward"]["kind"] == "elliptic" else 1e-5


def _training_cost(case):
    """``(solves, finest equivalents, seconds of flow steps)`` of a flow's training."""
    s = case.config["sampler"]
    steps = s["steps"] if isinstance(s["steps"], list) else [s["steps"]] * case.finest
    per_step = s["batch"] * (2 if s["objective"] == "jeffreys" else 1)
    stage = [steps[l - 1] * per_step for l in case.levels]
    if s["kind"] == "msign" and s["objective"] == "jeffreys":     # pool stages: see train_msign
        for l in range(1, min(s["pool_levels"], case.finest) + 1):
            stage[l - 1] = 4096 + steps[l - 1] * (1 - s["pool_warmup"]) * s["batch"]
    solves = int(sum(stage))
    if s["budget"]:
        solves = min(solves, max(s["budget"] - reserved_solves(case.config), 0))
    equivalents = sum(min(stage[l - 1], solves) * _relative_solve_cost(case, l)
                      for l in case.levels)
    step = 0.13 * (s["batch"] / 64) * max(4 ** case.finest / 4096, 0.15)  # measured 64x64
    return solves, equivalents, step * sum(steps)


def estimate_cost(case):
    """Rough cost of a run: ``(forward solves, finest-solve equivalents, seconds)``.

    MCMC kinds: every chain iteration solves once on the finest level (HMC: once per leapfrog
    step); ``laplace`` and ``gpcn`` add the Laplace fit (:func:`_laplace_solves`). Flows:
    each stage takes ``steps`` steps of ``batch`` samples, twice for the Jeffreys
    objective (samples of the flow and importance samples); a level-l solve costs its share of
    FE cells of a finest solve; then the final draws and the correction
    (:func:`reserved_solves`) solve on the finest level, each batched evaluation of the
    chains also passing through the flow and back. A 64x64 elliptic solve with its adjoint
    takes about 2.5 ms (benchmarks/forward.py), the test beds are nearly free.
    """
    s = case.config["sampler"]
    per_solve = _per_solve_seconds(case)
    solves, equivalents, seconds = _sampling_cost(case, per_solve)
    return solves, equivalents, seconds + _setup_seconds(case)


def _setup_seconds(case):
    """Building the observation operators: about 30 us per point and level (elliptic)."""
    if case.config["forward"]["kind"] != "elliptic":
        return 0.0
    return 3e-5 * len(case.config["observations"]["points"]) * len(case.levels)


def _sampling_cost(case, per_solve):
    s = case.config["sampler"]
    laplace = _laplace_solves(case) if s["kind"] in ("laplace", "gpcn") else 0
    if s["kind"] == "laplace":
        solves = laplace + case.config["output"]["samples"]
        return solves, float(solves), solves * per_solve
    if s["kind"] in MCMC_KINDS:      # every iteration of every chain solves on the finest level
        solves = laplace + chain_config(case.config).solves(s["kind"])
        return solves, float(solves), solves * per_solve
    if s["kind"] in VI_KINDS:       # one level: steps x batch solves, about 5 ms a step
        solves = s["steps"] * s["batch"]
        if s["budget"]:
            solves = min(solves, max(s["budget"] - reserved_solves(case.config), 0))
        equivalents, flow = float(solves), 5e-3 * s["steps"] * max(4 ** case.finest / 64, 1)
    else:
        solves, equivalents, flow = _training_cost(case)
    reserved = reserved_solves(case.config)
    correction = correction_config(case.config)
    batches = correction.reserved() / correction.chains if correction.enabled else 0
    scale = max(4 ** case.finest / 4096, 0.15)
    flow += batches * (0.005 + correction.chains * 2e-3 * scale)
    return (solves + reserved, equivalents + reserved,
            (equivalents + reserved) * per_solve + flow)


BASE_BYTES = 600e6
"""Resident memory of a run before its own arrays: Python, torch, dolfinx, the compiled forms."""

FACTOR_BYTES_HELD = 2 * 1024**3
"""Factorisations a solver keeps for its adjoint solves (``FastSolver.max_factor_bytes``)."""


def estimate_memory(case):
    """Rough peak resident memory of a run on one process, in bytes.

    The model, whose terms were measured on 16x16 to 128x128 FE meshes
    (``benchmarks/memory.py`` compares it with measured peaks):

    * :data:`BASE_BYTES` for the libraries;
    * elliptic forward models, on every level l: Cholesky factors of
      ``nnz(L) ~ c n log2 n`` entries for the n free dofs of that level's FE mesh
      (c = 3 for degree 1, 4.5 for degree 2), kept for at most the batch of the largest
      evaluation on that level but at most :data:`FACTOR_BYTES_HELD` (at least one slot of
      8 samples) and one slot more while a batch is factorised; plus, on the level with the
      largest batch, two copies of its solutions and twelve of its predicted data (the
      likelihood's temporaries and what the allocator keeps of them, as measured); batches
      without gradients are evaluated :data:`~geoinvert.parallel.EVALUATION_CHUNK` samples
      at a time;
    * dense observation rows of the measurement functions (three copies per level);
    * a Matern prior's dense Haar conditionals on levels 2..L-1 (25 a^2 doubles for
      a = 4^(l-1) coarse cells, half as much again while they are built);
    * the flow's activations in training and the result's arrays.

    The largest evaluation of a level is the training batch (twice, for Jeffreys), the
    importance pool on the pool levels, and on the finest level the stored draws and the
    chains.
    """
    c = case.config
    s, L = c["sampler"], case.finest
    per_cell = 8 * 4 ** L
    total = BASE_BYTES + per_cell * c["output"]["samples"] * 12
    options = train_options(c) if s["kind"] in TRAINED_KINDS else None
    if s["kind"] in FLOW_KINDS:
        flow = flow_config(c)
        total += 4 * options.batch * 4 ** L * flow.hidden * flow.blocks * 2
    elif s["kind"] in ("iaf", "composed"):          # MADE weights (two layers) and their Adam moments
        width = made_width(4 ** L, s["hidden"])
        total += 4 * 8 * s["blocks"] * (2 * width * 4 ** L + width ** 2)
    if c["prior"]["kind"] == "matern":
        total += sum(1.5 * 8 * 25 * 16 ** (l - 1) for l in range(2, L))
    if c["forward"]["kind"] != "elliptic":
        n_obs = len(c["observations"]["points"]) + len(c["observations"]["functions"])
        return total + 3 * 8 * n_obs * 4 ** L
    held, transient = 0.0, 0.0
    n_obs = case.n_obs
    for level in case.levels:
        n = _free_dofs(case, level)
        per_sample = 8 * (3.0 if c["forward"]["degree"] == 1 else 4.5) * n * math.log2(max(n, 2))
        batch = _largest_batch(case, level, options)
        if batch == 0:                     # no model on this level
            continue
        held += max(min(FACTOR_BYTES_HELD, batch * per_sample), min(batch, 8) * per_sample)
        transient = max(transient, min(batch, 8) * per_sample + 8 * batch * (2 * n + 12 * n_obs))
        total += 3 * 8 * n * len(c["observations"]["functions"])
    return total + held + transient


def _free_dofs(case, level):
    """Dofs of a level's FE mesh: the structured mesh of the bounds, or the mesh read."""
    c = case.config
    degree = c["forward"]["degree"]
    if c["domain"]["mesh"]:
        cells = mesh_cells(resolve(case.folder, "domain.mesh", c["domain"]["mesh"]))
        return max(int(cells * degree ** 2), 1)
    per_side = case.hierarchy().mesh_cells(level) if _has_hierarchy() else 2 ** level
    return (per_side * degree + 1) ** 2


def _largest_batch(case, level, options):
    """Samples of the largest batched evaluation on a level (see :func:`estimate_memory`)."""
    c = case.config
    kind = c["sampler"]["kind"]
    finest = level == case.finest
    if kind in MCMC_KINDS or kind in ("laplace", "gpcn"):
        return max(chain_config(c).chains,
                   min(c["output"]["samples"], EVALUATION_CHUNK) if finest else 0, 50)
    if kind in VI_KINDS:               # one level only
        return max(c["sampler"]["batch"], min(c["output"]["samples"], EVALUATION_CHUNK),
                   correction_config(c).chains, 50) if finest else 0
    batch = options.batch * options.evaluations
    if options.objective == "jeffreys" and level <= options.pool_levels:
        batch = max(batch, min(options.pool, EVALUATION_CHUNK))
    if finest:
        batch = max(batch, min(c["output"]["samples"], EVALUATION_CHUNK),
                    correction_config(c).chains)
    return batch


def machine_memory():
    """Physical memory of this machine in bytes (0 if unknown)."""
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_refusal(case):
    """The one-line reason to refuse ``case`` on this machine (its estimated memory exceeds
    the physical memory), or None."""
    need, have = estimate_memory(case), machine_memory()
    if not have or need <= have:
        return None
    return (f"the run needs an estimated {need / 1e9:.1f} GB of memory, more than the "
            f"{have / 1e9:.1f} GB of this machine (fewer levels, a coarser levels.min_cells or "
            "a smaller sampler.batch need less); use --force to try anyway")


def _mode_search_solves(config):
    """Typical solves of a Laplace fit: about 60 evaluations for each of the 8 MAP searches,
    then two randomized passes over the Hessian's probes (a forward, a tangent-linear and an
    adjoint solve each) at a mode, probes bounded by the parameters, the observations and
    50."""
    obs = config["observations"]
    n_obs = len(obs["points"]) + len(obs["functions"])
    probes = min(4 ** config["levels"]["finest"], n_obs, 50)
    return 8 * 60 + 2 * 3 * probes


def _laplace_solves(case):
    return _mode_search_solves(case.config)


def _relative_solve_cost(case, level):
    """Cost of a level's solve in finest solves: the ratio of FE cells (lattice cells for the
    test beds)."""
    if case.config["forward"]["kind"] != "elliptic" or not _has_hierarchy():
        return 4.0 ** (level - case.finest)
    h = case.hierarchy()
    return (h.mesh_cells(level) / h.mesh_cells(case.finest)) ** 2


def _has_hierarchy():
    try:
        import geoinvert.hierarchy  # noqa: F401
    except ImportError:
        return False
    return True


def summary_lines(case):
    obs = case.config["observations"]
    solves, equiv, seconds = estimate_cost(case)
    lines = [f"case {case.name}: forward {case.config['forward']['kind']}, "
             f"prior {case.config['prior']['kind']}, data "
             f"{'synthetic' if case.synthetic else 'observed'}",
             f"observations: {case.n_obs} ({len(obs['points'])} points, "
             f"{len(obs['functions'])} functions"
             + (f", {len(obs['hard_data']['points'])} hard data)" if obs["hard_data"]["points"]
                else ")")]
    for level in case.levels:
        ny, nx = case.lattice_shape(level)
        lines.append(f"  level {level}: {ny} x {nx} = {ny * nx} unknowns")
    s = case.config["sampler"]
    correction = correction_config(case.config)
    corrected = s["kind"] in TRAINED_KINDS and correction.enabled
    fewest = (f", if the correction's chains converge in their first {correction.draws} "
              f"draws with short trajectories (at most {TYPICAL_LEAPFROG} leapfrog steps)"
              if corrected and correction.planned == "hmc" else "")
    lines.append(f"estimated cost: {solves} forward solves (~{equiv:.0f} finest-level "
                 f"equivalents), roughly {_duration(seconds)} on one core{fewest}")
    if corrected:
        most = correction.most_solves() - correction.reserved()
        if s["budget"]:
            most = max(min(most, s["budget"] - solves), 0)
        if most > 0:
            per_solve = seconds / max(equiv, 1)
            lines.append(f"  (the correction may take up to {most} more, about "
                         f"{_duration(most * per_solve)}, if its chains need long trajectories "
                         "or more draws to converge)")
    have = machine_memory()
    lines.append(f"estimated memory: {estimate_memory(case) / 1e9:.1f} GB per process"
                 + (f" (this machine has {have / 1e9:.1f} GB)" if have else ""))
    return lines


def case_warnings(case):
    """A prior whose draws span a coefficient contrast the solver cannot handle: the expected
    range of n standard normal values, 2 sqrt(2 ln n), times ``prior.std``."""
    c = case.config
    if c["forward"]["kind"] != "elliptic" or case.learned_prior:
        return []
    std = c["prior"]["std"]
    spread = 2 * math.sqrt(2 * math.log(4 ** case.finest)) * std
    if spread <= MAX_LOG_CONTRAST:
        return []
    return [f"prior.std: {short(std)} lets a field of the prior span a permeability contrast "
            f"of about 1e{spread / math.log(10):.0f}; the solves lose accuracy past about "
            f"1e{MAX_LOG_CONTRAST / math.log(10):.0f} and fail further out, so many draws "
            "will be left out or the correction may not start (log-permeabilities of real "
            "aquifers rarely have std above 3)"]


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
