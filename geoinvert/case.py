"""Case files: one schema table, validation at load time, and the resolved :class:`Case`."""

import csv
import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import yaml

from geoinvert.errors import CaseError
from geoinvert.parallel import EVALUATION_CHUNK
from geoinvert.inference.config import (CHAIN_KINDS, CORRECTION_COORDINATES, CORRECTION_KERNELS,
                                        RECIPE_KEYS, RECIPES, STEPS, UPSAMPLINGS,
                                        ChainConfig, CorrectionConfig, FlowConfig,
                                        TrainOptions, recipe_options)

__all__ = ["Case", "Key", "SCHEMA", "SECTIONS", "load_case", "prior_from_text", "estimate_cost",
           "estimate_memory", "machine_memory", "memory_refusal", "correction_config",
           "reserved_solves", "training_solves", "schema_markdown", "update_doc"]

REQUIRED = object()
"""Marks a key without a default."""

SECTIONS = ("domain", "levels", "prior", "forward", "observations", "data", "noise", "sampler",
            "output")
REQUIRED_SECTIONS = ("forward", "observations", "data", "noise")
BOUNDARIES = ("left", "right", "bottom", "top", "all")


class Key(NamedTuple):
    """One entry of the case schema.

    Attributes:
        path: Dotted key path, e.g. ``"prior.correlation_length"``.
        kind: Type name, one of :data:`KINDS`.
        default: Default value, or :data:`REQUIRED`.
        doc: One-sentence meaning.
        example: A valid value, as YAML text.
        check: Optional ``check(value) -> str | None`` returning what is wrong.
    """

    path: str
    kind: str
    default: Any
    doc: str
    example: str
    check: Callable | None = None


MAX_CASE_BYTES = 1_000_000
"""Largest case file read (data belong in CSV or netCDF files beside it)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in a case file."""
MAX_SEED = 2**32 - 1
"""Largest random seed (``sampler.seed``, ``--seed``)."""
MAX_LOG_CONTRAST = math.log(1e14)
"""Coefficient contrast (max k / min k, in log units) past which the elliptic solves lose
their accuracy in double precision: the stiffness matrix's condition number grows with it."""
MAX_OBSERVATIONS = 1_000_000
"""Most observations (points and functions) of a case."""
MAX_MESH_XML_BYTES = 10_000_000
"""Largest XDMF (XML) mesh description read; the mesh data lie in its HDF5 file."""


# --- checks: return a message (str) when the value is wrong, None when it is fine -------------

def _positive(v):
    """> 0"""
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v):
    """>= 0"""
    return None if v >= 0 else f"must be >= 0, got {v}"


def _short(value, most=40):
    """``value`` as text for a message, shortened to ``most`` characters."""
    text = str(value)
    if len(text) <= most:
        return text
    cut = text[:most - 12]
    if " " in cut:                       # a message: end at a word, not inside one
        cut = cut[:cut.rindex(" ")]
    return f"{cut}... ({len(text)} characters)"


def _between(lo, hi):
    def check(v):
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {_short(v)}"
    check.__doc__ = f"{lo}..{hi}"
    return check


SAMPLER_KINDS = ("msign", "asvgd", "laplace", "pcn", "mala", "hmc", "gpcn")
MCMC_KINDS = CHAIN_KINDS
FLOW_KINDS = ("msign", "asvgd")


def _one_of(*choices):
    def check(v):
        if v in choices:
            return None
        return f"must be one of {', '.join(map(str, choices))}, got {v!r}" + _suggest(v, choices)
    check.__doc__ = " / ".join(f"`{c}`" for c in choices)
    return check


def _bounds(v):
    if len(v) != 4:
        return f"must be [x0, x1, y0, y1], got {len(v)} numbers"
    return None if v[1] > v[0] and v[3] > v[2] else f"needs x1 > x0 and y1 > y0, got {v}"


def _each_between(lo, hi):
    def check(v):
        bad = [s for s in (v if isinstance(v, list) else [v]) if not lo <= s <= hi]
        return f"must be between {lo} and {hi}, got {bad[0]}" if bad else None
    check.__doc__ = f"{lo}..{hi}"
    return check


def _each_positive(v):
    """> 0"""
    v = v if isinstance(v, list) else [v]
    bad = [s for s in v if not s > 0]
    return f"must be > 0, got {bad[0]}" if bad else None


def _quantiles(v):
    """in (0, 1)"""
    bad = [q for q in v if not 0 < q < 1]
    return f"quantiles must lie in (0, 1), got {bad[0]}" if bad else None


_CORRECTION_LIMITS = {"kernel": _one_of(*CORRECTION_KERNELS),
                      "coordinates": _one_of(*CORRECTION_COORDINATES), "chains": _between(1, 10**5),
                      "draws": _between(4, 10**8), "max_draws": _between(4, 10**8),
                      "warmup": _between(0, 10**8),
                      "leapfrog": _between(1, 10**4), "independence": None, "modes": None}


_FLOW_LIMITS = {"blocks": _between(1, 64), "hidden": _between(2, 1024),
                "upsampling": _one_of(*UPSAMPLINGS)}


def _flow_keys():
    """``sampler.blocks``, ``.hidden``, ``.upsampling``, derived from :class:`FlowConfig`."""
    types = {int: "int", str: "str"}
    return tuple(Key(f"sampler.{f.name}", types[type(f.default)], f.default,
                     f.metadata["doc"], f.metadata["example"], _FLOW_LIMITS[f.name])
                 for f in dataclasses.fields(FlowConfig))


_CHAIN_LIMITS = {"chains": _between(1, 10**5), "draws": _between(1, 10**8),
                 "warmup": _between(0, 10**8), "thin": _between(1, 10**6),
                 "step_size": _positive, "leapfrog": _between(1, 10**4)}


def _chain_keys():
    """``sampler.chains`` ... ``sampler.leapfrog``, derived from :class:`ChainConfig`."""
    types = {"step_size": "float"}
    return tuple(Key(f"sampler.{f.name}", types.get(f.name, "int"), f.default,
                     f.metadata["doc"], f.metadata["example"], _CHAIN_LIMITS[f.name])
                 for f in dataclasses.fields(ChainConfig))


def _correction_keys():
    """``sampler.correction.*``, derived from :class:`CorrectionConfig` (defaults, docs)."""
    kinds = {str: "str", int: "int", bool: "bool"}
    fields = dataclasses.fields(CorrectionConfig)
    return tuple(Key(f"sampler.correction.{f.name}", kinds[type(f.default)], f.default,
                     "Flows: " + f.metadata["doc"][0].lower() + f.metadata["doc"][1:],
                     f.metadata["example"], _CORRECTION_LIMITS[f.name]) for f in fields)


SCHEMA = (
    Key("name", "str", None, "Case name used in titles and default output names "
        "(default: the file name without extension).", "aquifer"),
    Key("description", "str", "", "Free text, copied into the result's attributes.",
        "Confined aquifer, 9 wells"),
    Key("domain.bounds", "floats", [0.0, 1.0, 0.0, 1.0], "Bounding box `[x0, x1, y0, y1]` covered "
        "by the parameter lattice.", "[0, 2000, 0, 1000]", _bounds),
    Key("domain.units", "str", "m", "Units of the coordinates (written to the result).", "m"),
    Key("domain.mesh", "path", None, "Optional XDMF mesh for the elliptic solver "
        "(default: a structured mesh of the bounds).", "meshes/aquifer.xdmf"),
    Key("domain.cell", "str", "quadrilateral", "Cell type of the structured FE mesh.",
        "triangle", _one_of("quadrilateral", "triangle")),
    Key("levels.finest", "int", 4, "Finest level L: the parameter is a 2^L x 2^L lattice; "
        "training runs through levels 1..L.", "6", _between(2, 8)),
    Key("levels.refine", "int", 0, "FE mesh of level l has 2^l * 2^refine cells per side.",
        "1", _between(0, 4)),
    Key("levels.min_cells", "int", 8, "Minimum FE cells per side on any level.", "16",
        _between(1, 1024)),
    Key("prior.kind", "str", "matern", "Gaussian prior family: `matern` (precision "
        "(tau^2 I - Laplacian)^alpha) or `iid` (independent cells).", "iid",
        _one_of("matern", "iid")),
    Key("prior.mean", "spec", 0.0, "Prior mean of the log-coefficient: number, expression or "
        "shape.", "-0.5 + 0.2 * x"),
    Key("prior.std", "float", 1.0, "Marginal standard deviation (approximately, for matern).",
        "0.8", _positive),
    Key("prior.correlation_length", "float", 0.2, "Correlation length in coordinate units "
        "(matern only).", "150.0", _positive),
    Key("prior.alpha", "int", 2, "Integer exponent alpha of the matern precision.", "2",
        _between(1, 4)),
    Key("prior.boundary", "str", "neumann", "Boundary treatment of the matern Laplacian.",
        "dirichlet", _one_of("neumann", "dirichlet", "periodic")),
    Key("forward.kind", "str", REQUIRED, "Forward model: `elliptic` (-div(exp(x) grad u) = f), "
        "`linear` (y_k = int phi_k x) or `quadratic` (y = (int phi x)^2).", "elliptic",
        _one_of("elliptic", "linear", "quadratic")),
    Key("forward.source", "spec", 1.0, "Source term f (elliptic).",
        "{shape: gaussian, center: [0.5, 0.5], width: 0.1}"),
    Key("forward.dirichlet", "boundaries", {"left": 0.0}, "Dirichlet values `{boundary: spec}`; "
        "boundary is left, right, bottom, top, all or a facet tag of a read mesh (elliptic).",
        "{left: 10.0, right: 0.0}"),
    Key("forward.neumann", "boundaries", None, "Prescribed flux `{boundary: spec}`; sides without "
        "a condition have zero flux (elliptic).", "{top: 0.1}"),
    Key("forward.degree", "int", 1, "Lagrange degree of the FE space (elliptic).", "2",
        _between(1, 2)),
    Key("forward.solver", "str", "auto", "Elliptic solver: `auto` (fast serial solver on one "
        "process, assembly otherwise), `fast`, `lu` or `cg` (assembly with LU or CG + GAMG).",
        "cg", _one_of("auto", "fast", "lu", "cg")),
    Key("observations.points", "points", [], "Point values of u at `[x, y]` locations "
        "(elliptic); may come from a CSV or netCDF data file instead.",
        "[[0.25, 0.5], [0.75, 0.5]]"),
    Key("observations.functions", "specs", [], "Measurement functions phi_k: int phi_k u "
        "(elliptic) or int phi_k x (linear, quadratic).",
        "[\"sin(pi*x)*sin(2*pi*y)\"]"),
    Key("observations.names", "strs", None, "Optional names, one per observation (points "
        "first, then functions).", "[W1, W2]"),
    Key("data.values", "floats", None, "Observed values inline, one per observation.",
        "[0.31, 0.27]"),
    Key("data.file", "path", None, "Observed values from a netCDF file (variable "
        "`data.variable`, optional coordinates `x`, `y`) or a CSV file with a header "
        "`x,y,value` (coordinates optional).", "heads.csv"),
    Key("data.variable", "str", "value", "Variable name in a netCDF data file.", "head"),
    Key("data.synthetic.truth", "truth", None, "Synthetic data: the true field as a spec "
        "evaluated at cell centres, or the word `prior` for a prior draw.",
        "{shape: gaussian, center: [0.3, 0.7], width: 0.15}"),
    Key("data.synthetic.file", "path", None, "Synthetic data: the true field from a netCDF "
        "file, shaped like the finest lattice.", "truth.nc"),
    Key("data.synthetic.variable", "str", "truth", "Variable name of the true field in "
        "`data.synthetic.file`.", "logk"),
    Key("data.synthetic.seed", "int", 0, "Seed of the prior draw and of the added noise.", "7",
        _non_negative),
    Key("noise.std", "float_or_floats", REQUIRED, "Standard deviation of the Gaussian "
        "observation noise: one number or one per observation.", "0.01", _each_positive),
    Key("sampler.kind", "str", "msign", "Sampler: `msign` (the flow, trained stage by stage), "
        "`asvgd` (the same network trained by amortized SVGD), `laplace` (the Gaussian at the "
        "MAP point with the low-rank Gauss-Newton Hessian, uncorrected), or a reference MCMC "
        "run on the finest level: `pcn`, `mala`, `hmc`, `gpcn` (pCN with the Laplace "
        "covariance as proposal).", "hmc", _one_of(*SAMPLER_KINDS)),
    *_flow_keys(),
    Key("sampler.coarse_sampler", "str", TrainOptions.coarse_sampler,
        "Flows with the Jeffreys objective: how the first stage gets samples of the 2x2 "
        "posterior, `importance` (4096 prior "
        "draws, importance-weighted), `smc` (tempered sequential Monte Carlo, 1024 particles, "
        "several times the solves) or `laplace` (L-BFGS from 16 prior draws to the modes, then "
        "4096 importance-weighted draws of a mixture of Gaussians fitted at them; for data so "
        "precise that the importance ESS is a few samples: the log shows it).", "laplace",
        _one_of("importance", "smc", "laplace")),
    Key("sampler.pool_levels", "int", TrainOptions.pool_levels,
        "Flows with the Jeffreys objective: the first `pool_levels` stages start from samples of "
        "their own posterior drawn by "
        "`coarse_sampler`, the later ones from the stage before. Raise it when the 2x2 "
        "posterior is no guide to the finer ones (very precise data: the log's per-stage "
        "mode search shows where the modes lie).", "2", _between(1, 16)),
    Key("sampler.steps", "int_or_ints", STEPS, "Training steps per stage: one number, or one per "
        "level from the coarsest (as many as `levels.finest`).", "[300, 1500, 500, 1000]",
        _each_between(1, 10**7)),
    Key("sampler.batch", "int", TrainOptions.batch, "Samples per training step.", "128",
        _between(2, 10**5)),
    Key("sampler.lr", "float", TrainOptions.lr, "Adam learning rate.", "5e-4", _positive),
    Key("sampler.objective", "str", TrainOptions.objective, "Training objective.", "reverse_kl",
        _one_of("jeffreys", "reverse_kl")),
    Key("sampler.recipe", "str", "paper", "Named training settings: `paper` (the MsIGN paper's "
        "Jeffreys training) or `forward_kl` (for sharp multimodal posteriors: "
        "`coarse_sampler: laplace`, `pool_levels: 2`, `pool_warmup: 1`, `reverse_weight: 0`, "
        "`frozen_proposal: true`, `lr_warmup: 0.2`). Those keys, given beside it, override "
        "it.", "forward_kl", _one_of(*RECIPES)),
    Key("sampler.reverse_weight", "float", TrainOptions.reverse_weight,
        "Flows with the Jeffreys objective: weight of the reverse KL in the gradient of the "
        "stages after the pools. 0 trains by the forward "
        "KL alone, which keeps every mode of a sharp multimodal posterior (with wider modes); "
        "1 is the MsIGN paper's Jeffreys divergence.", "0", _between(0, 1)),
    Key("sampler.frozen_proposal", "bool", TrainOptions.frozen_proposal,
        "Flows with the Jeffreys objective: draw the forward-KL proposal of a stage from the "
        "model as it was when the stage began, not "
        "from the coarse flows the stage keeps training.", "true"),
    Key("sampler.pool_warmup", "float", TrainOptions.pool_warmup,
        "Flows with the Jeffreys objective: fraction of a pool stage's steps that fit its pool "
        "alone (no solves); 1: no reverse KL there.", "1",
        _between(0, 1)),
    Key("sampler.lr_warmup", "float", TrainOptions.lr_warmup,
        "Fraction of each stage's steps over which the learning rate ramps up linearly.", "0.2",
        _between(0, 0.99)),
    Key("sampler.budget", "int", 0, "Total forward-solve budget nFS over all stages (0: no "
        "limit); training stops when it is used up.", "100000", _non_negative),
    Key("sampler.checkpoint_every", "int", 50, "Training steps between checkpoints within a "
        "stage (0: at stage ends only); CLI `--checkpoint-every` overrides.", "20",
        _between(0, 10**7)),
    *_chain_keys(),
    *_correction_keys(),
    Key("sampler.seed", "int", 0, "Random seed of training and sampling (CLI `--seed` "
        "overrides it).", "42", _between(0, MAX_SEED)),
    Key("output.path", "path_out", None, "Result netCDF file (default: "
        "`results/<name>.nc` under the current directory).", "out/aquifer.nc"),
    Key("output.samples", "int", 500, "Posterior samples stored in the result.", "1000",
        _between(2, 10**6)),
    Key("output.quantiles", "floats", [0.05, 0.5, 0.95], "Quantiles stored in the result.",
        "[0.1, 0.9]", _quantiles),
    Key("output.direction", "spec", None, "Direction field for the marginal plot (default: "
        "the leading principal component of the samples).", "sin(pi*x)*sin(2*pi*y)"),
    Key("output.figures", "bool", False, "Also write the PNG figures after a run.", "true"),
)

KEYS = {k.path: k for k in SCHEMA}


# --- type checks -------------------------------------------------------------------------------

def _type_error(key, expected, value):
    return CaseError(key, f"must be {expected}, got {value!r}")


def _as_float(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(key, "a number", v)
    if not math.isfinite(v):
        raise CaseError(key, f"must be finite, got {v}")
    return float(v)


def _as_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(key, "an integer", v)
    return v


def _as_list(key, v, what):
    if not isinstance(v, list):
        raise _type_error(key, f"a list of {what}", v)
    return v


def _as_floats(key, v):
    return [_as_float(f"{key}[{i}]", s) for i, s in enumerate(_as_list(key, v, "numbers"))]


def _as_str(key, v):
    if not isinstance(v, str):
        raise _type_error(key, "a string", v)
    return v


def _as_bool(key, v):
    if not isinstance(v, bool):
        raise _type_error(key, "true or false", v)
    return v


def _as_points(key, v):
    points = []
    for i, p in enumerate(_as_list(key, v, "[x, y] pairs")):
        if not isinstance(p, list) or len(p) != 2:
            raise _type_error(f"{key}[{i}]", "a pair [x, y]", p)
        points.append([_as_float(f"{key}[{i}]", c) for c in p])
    return points


def _as_spec(key, v):
    from geoinvert.expressions import compile_spec
    try:
        f = compile_spec(v)
        np.asarray(f(np.array([0.5]), np.array([0.5])), dtype=float)
    except CaseError:
        raise
    except OverflowError:
        raise CaseError(key, "overflows: a value is beyond the largest double (1.8e308)") from None
    except Exception as err:  # noqa: BLE001 - any failure of a user spec is a user error
        raise CaseError(key, _short(err, 120)) from None
    return v


def _as_truth(key, v):
    return "prior" if isinstance(v, str) and v.strip() == "prior" else _as_spec(key, v)


def _as_specs(key, v):
    return [_as_spec(f"{key}[{i}]", s) for i, s in enumerate(_as_list(key, v, "specs"))]


def _as_strs(key, v):
    return [_as_str(f"{key}[{i}]", s) for i, s in enumerate(_as_list(key, v, "strings"))]


def _as_float_or_floats(key, v):
    return _as_floats(key, v) if isinstance(v, list) else _as_float(key, v)


def _as_int_or_ints(key, v):
    if isinstance(v, list):
        return [_as_int(f"{key}[{i}]", s) for i, s in enumerate(_as_list(key, v, "integers"))]
    return _as_int(key, v)


def _as_boundaries(key, v):
    if not isinstance(v, dict):
        raise _type_error(key, "a mapping {boundary: spec}", v)
    out = {}
    for name, spec in v.items():
        if not (isinstance(name, int) and not isinstance(name, bool)) and name not in BOUNDARIES:
            raise CaseError(f"{key}.{name}", "unknown boundary; valid: "
                            f"{', '.join(BOUNDARIES)} or an integer facet tag"
                            + _suggest(str(name), BOUNDARIES))
        out[name] = _as_spec(f"{key}.{name}", spec)
    return out


KINDS = {
    "float": (_as_float, "number"),
    "int": (_as_int, "integer"),
    "bool": (_as_bool, "boolean"),
    "str": (_as_str, "string"),
    "path": (_as_str, "path (relative to the case file)"),
    "path_out": (_as_str, "path (relative to the case file)"),
    "floats": (_as_floats, "list of numbers"),
    "strs": (_as_strs, "list of strings"),
    "float_or_floats": (_as_float_or_floats, "number or list of numbers"),
    "int_or_ints": (_as_int_or_ints, "integer or list of integers"),
    "points": (_as_points, "list of [x, y]"),
    "spec": (_as_spec, "spec"),
    "specs": (_as_specs, "list of specs"),
    "truth": (_as_truth, "spec or `prior`"),
    "boundaries": (_as_boundaries, "mapping boundary -> spec"),
}


# --- reading and structural checks ---------------------------------------------------------------

class _Refused(yaml.YAMLError):
    """A YAML construct that case files do not allow, with where it is."""

    def __init__(self, problem, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` as a float (YAML 1.2 style), and refuses
    duplicate keys (which would otherwise silently keep the last), aliases (``*name``: a few
    lines of them expand to millions of entries) and nesting deeper than :data:`MAX_DEPTH`."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases (*{event.anchor}) are not allowed in a case file; "
                           "write the value out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _Refused(f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"))


def _suggest(word, choices):
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _children(prefix):
    """Names allowed directly below ``prefix`` ('' for the top level), in schema order."""
    depth = prefix.count(".") + 1 if prefix else 0
    names = [k.path.split(".")[depth] for k in SCHEMA
             if k.path.startswith(prefix + "." if prefix else "") and k.path.count(".") >= depth]
    return list(dict.fromkeys(names))


def _check_structure(raw, prefix=""):
    """Reject unknown keys and non-mapping sections, recursively."""
    valid = _children(prefix)
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in valid:
            raise CaseError(key, f"unknown key; valid keys here: {', '.join(valid)}"
                            + _suggest(name, valid))
        if key not in KEYS and value is not None:
            if not isinstance(value, dict):
                raise _type_error(key, "a section (mapping)", value)
            _check_structure(value, key)


def _lookup(raw, path):
    node = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _validate_key(raw, key):
    value, present = _lookup(raw, key.path)
    if not present:
        if key.default is REQUIRED:
            raise CaseError(key.path, "required key missing")
        return _copy(key.default)
    if value is None and key.default is not REQUIRED:
        return _copy(key.default)
    value = KINDS[key.kind][0](key.path, value)
    message = key.check(value) if key.check else None
    if message:
        raise CaseError(key.path, message)
    return value


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value)) if isinstance(value, (list, dict)) else value


def _nest(flat):
    out = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _read_text(path):
    path = Path(path)
    if not path.is_file():
        raise CaseError(str(path), "no such case file")
    size = path.stat().st_size
    if size > MAX_CASE_BYTES:
        raise CaseError(str(path), f"is {size} bytes; a case file may have at most "
                        f"{MAX_CASE_BYTES} (put data in a CSV or netCDF file beside it)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaseError(str(path), f"is not UTF-8 text (byte {err.start}); save the case "
                        "file as UTF-8") from None
    if "\x00" in text:
        raise CaseError(str(path), "is not a text file (it contains NUL bytes)")
    return text


def _parse(text, where):
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise CaseError(where, f"invalid YAML{line}: {getattr(err, 'problem', err)}") from None
    except ValueError as err:        # e.g. an integer of more digits than Python converts
        what = "a number has too many digits" if "digits" in str(err) else _short(err, 80)
        raise CaseError(where, f"invalid YAML: {what}") from None
    if not isinstance(raw, dict):
        raise CaseError(where, "a case file must be a mapping of sections")
    return raw


def _normalise(raw):
    """Shorthands: ``sampler.correction: none`` (or false) for ``{kernel: none}``."""
    sampler = raw.get("sampler")
    if isinstance(sampler, dict) and sampler.get("correction") in ("none", False):
        raw = {**raw, "sampler": {**sampler, "correction": {"kernel": "none"}}}
    return raw


def _validate(raw):
    """Structure, sections, every key, then cross-key rules; returns the nested config."""
    raw = _normalise(raw)
    _check_structure(raw)
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise CaseError(section, "required section missing")
    config = _nest({k.path: _validate_key(raw, k) for k in SCHEMA})
    _apply_recipe(raw, config)
    for rule in _RULES:
        rule(config)
    _rule_correction_for_flows(raw, config)
    return config


def _apply_recipe(raw, config):
    """The recipe's values for the training keys the case does not give."""
    s = config["sampler"]
    given = {key: s[key] if _lookup(raw, f"sampler.{key}")[1] else None for key in RECIPE_KEYS}
    s.update(recipe_options(s["recipe"], **given))


SAMPLER_KEY_KINDS = {
    **{key: FLOW_KINDS for key in ("blocks", "hidden", "upsampling", "steps", "batch", "lr",
                                   "lr_warmup", "budget", "checkpoint_every", "correction")},
    **{key: ("msign",) for key in ("objective", "recipe", "coarse_sampler", "pool_levels",
                                   "reverse_weight", "frozen_proposal", "pool_warmup")},
    **{f.name: f.metadata["kinds"] for f in dataclasses.fields(ChainConfig)},
}
"""The sampler kinds each ``sampler.*`` key applies to (keys not listed apply to all)."""


def _rule_keys_of_the_kind(raw, kind):
    """A ``sampler`` key given for a kind that does not use it is a mistake, not a no-op."""
    for key, kinds in SAMPLER_KEY_KINDS.items():
        if kind in kinds or not _lookup(raw, f"sampler.{key}")[1]:
            continue
        hint = ""
        if kind in FLOW_KINDS and key in ("chains", "draws", "warmup", "leapfrog"):
            hint = f" (the flow's correction has its own: sampler.correction.{key})"
        raise CaseError(f"sampler.{key}", f"applies to sampler.kind {', '.join(kinds)}, not "
                        f"to {kind}{hint}")


def _rule_correction_for_flows(raw, config):
    """Each ``sampler`` key belongs to the kinds that use it (``sampler.correction`` to
    flows); a budget must leave room for training."""
    s = config["sampler"]
    _rule_keys_of_the_kind(raw, s["kind"])
    if s["kind"] not in FLOW_KINDS:
        return
    reserved = correction_config(config).reserved() + config["output"]["samples"]
    if s["budget"] and s["budget"] <= reserved:
        raise CaseError("sampler.budget", f"{s['budget']} forward solves leave nothing for "
                        f"training: the correction and the final draws take {reserved} "
                        "(lower sampler.correction.draws or .chains, or raise the budget)")


def correction_config(config):
    """The :class:`CorrectionConfig` of a validated config (``case.config``)."""
    return CorrectionConfig(**config["sampler"]["correction"])


def flow_config(config):
    """The :class:`~geoinvert.inference.config.FlowConfig` of a validated config."""
    s = config["sampler"]
    return FlowConfig(**{f.name: s[f.name] for f in dataclasses.fields(FlowConfig)})


def chain_config(config):
    """The :class:`~geoinvert.inference.config.ChainConfig` of a validated config."""
    s = config["sampler"]
    return ChainConfig(**{f.name: s[f.name] for f in dataclasses.fields(ChainConfig)})


def train_options(config):
    """The :class:`~geoinvert.inference.config.TrainOptions` of a flow's validated config
    (the recipe already applied): the one mapping of the case's training keys."""
    s = config["sampler"]
    objective = "asvgd" if s["kind"] == "asvgd" else s["objective"]
    return TrainOptions(objective=objective, batch=s["batch"], lr=s["lr"],
                        **{key: s[key] for key in RECIPE_KEYS})


# --- cross-key rules ---------------------------------------------------------------------------

def _rule_points_inside(config):
    x0, x1, y0, y1 = config["domain"]["bounds"]
    for i, (px, py) in enumerate(config["observations"]["points"]):
        if not (x0 <= px <= x1 and y0 <= py <= y1):
            raise CaseError(f"observations.points[{i}]",
                            f"point ({px}, {py}) lies outside the domain {[x0, x1, y0, y1]}")


def _rule_forward_observations(config):
    kind, obs = config["forward"]["kind"], config["observations"]
    if kind != "elliptic" and obs["points"]:
        raise CaseError("observations.points", f"forward.kind {kind} observes only "
                        "observations.functions (integrals of the field)")
    if kind == "quadratic" and len(obs["functions"]) != 1:
        raise CaseError("observations.functions", "forward.kind quadratic needs exactly one "
                        f"measurement function, got {len(obs['functions'])}")
    if kind != "elliptic" and config["domain"]["mesh"]:
        raise CaseError("domain.mesh", f"a mesh is used only by forward.kind elliptic, not {kind}")


def _rule_one_data_source(config):
    data = config["data"]
    given = [k for k in ("values", "file") if data[k] is not None]
    synth = data["synthetic"]
    truths = [k for k in ("truth", "file") if synth[k] is not None]
    if truths:
        given.append("synthetic")
    if len(given) != 1:
        raise CaseError("data", "give exactly one of values, file, synthetic; got "
                        + (", ".join(given) or "none"))
    if len(truths) > 1:
        raise CaseError("data.synthetic", "give either truth or file, not both")


def _rule_beta(config):
    s = config["sampler"]
    if s["kind"] in ("pcn", "gpcn") and s["step_size"] is not None and s["step_size"] > 1:
        raise CaseError("sampler.step_size", f"is the {s['kind']} beta, which must lie in "
                        f"(0, 1], got {s['step_size']}")


_RULES = (_rule_points_inside, _rule_forward_observations, _rule_one_data_source, _rule_beta)


# --- files ---------------------------------------------------------------------------------------

def _resolve(folder, key, value, *, must_exist=True):
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if must_exist and not path.is_file():
        raise CaseError(key, f"no such file: {path}")
    return path


def _read_csv(path, key):
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise CaseError(key, f"cannot read CSV {path}: {_short(err, 100)}") from None
    header = [h.strip() for h in header or []]
    if "value" not in header:
        raise CaseError(key, f"CSV {path} needs a header with a 'value' column (and optional x, y)")
    twice = sorted({h for h in header if header.count(h) > 1 and h})
    if twice:
        raise CaseError(key, f"CSV {path} has the column {twice[0]!r} more than once")
    if len(rows) > MAX_OBSERVATIONS:
        raise CaseError(key, f"CSV {path} has {len(rows)} rows; a case may have at most "
                        f"{MAX_OBSERVATIONS} observations")
    short = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if short is not None:
        raise CaseError(key, f"CSV {path} line {short + 2} has {len(rows[short])} fields, the "
                        f"header {len(header)}")
    column = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    coords = {c: _numbers(key, column[c]) for c in ("x", "y") if c in column}
    return _numbers(key, column["value"]), coords


def _numbers(key, values):
    try:
        return np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as err:
        raise CaseError(key, f"non-numeric entry: {err}") from None


def _read_netcdf(path, key, variable, var_key):
    import xarray as xr
    try:
        with xr.open_dataset(path) as ds:
            if variable not in ds:
                raise CaseError(var_key, f"no variable {variable!r} in {path}; it has "
                                f"{', '.join(map(str, ds.data_vars))}" + _suggest(variable, ds.data_vars))
            da = ds[variable].load()
    except CaseError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable user file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = "not a netCDF file" if "IO backends" in first else _short(first, 100)
        raise CaseError(key, f"cannot read netCDF {path}: {reason}") from None
    return da


def _read_data_file(path, config):
    key = "data.file"
    if path.suffix.lower() == ".csv":
        return _read_csv(path, key)
    variable = config["data"]["variable"]
    da = _read_netcdf(path, key, variable, "data.variable")
    if da.dtype.kind not in "iuf":
        raise CaseError("data.variable", f"{variable!r} in {path} holds {_dtype_name(da.dtype)}, "
                        "not numbers")
    if da.size > MAX_OBSERVATIONS:
        raise CaseError(key, f"{variable!r} in {path} has {da.size} values; a case may have at "
                        f"most {MAX_OBSERVATIONS} observations")
    coords = {}
    for c in ("x", "y"):
        if c in da.coords and da[c].shape == da.shape:
            if da[c].dtype.kind not in "iuf":
                raise CaseError(key, f"coordinate {c!r} in {path} holds "
                                f"{_dtype_name(da[c].dtype)}, not numbers")
            coords[c] = np.asarray(da[c].values, float).ravel()
    return np.asarray(da.values, float).ravel(), coords


def _dtype_name(dtype):
    return {"U": "strings", "S": "strings", "O": "strings or objects", "M": "dates",
            "m": "time spans", "b": "booleans", "c": "complex numbers"}.get(dtype.kind,
                                                                           str(dtype))


def _check_mesh(path):
    """``domain.mesh``: an XDMF file with a grid named ``mesh`` (triangles or quadrilaterals,
    2-D geometry) whose data lie in HDF5 files beside it. Read as XML here, so that ``check``
    refuses what dolfinx could not read."""
    import xml.etree.ElementTree as ET
    key = "domain.mesh"
    size = path.stat().st_size
    if size > MAX_MESH_XML_BYTES:
        raise CaseError(key, f"{path} is {size} bytes; an XDMF file may have at most "
                        f"{MAX_MESH_XML_BYTES} (its data belong in the HDF5 file)")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, UnicodeDecodeError, ValueError) as err:
        raise CaseError(key, f"{path} is not an XDMF mesh (not XML: {_short(err, 60)})") from None
    if root.tag != "Xdmf":
        raise CaseError(key, f"{path} is not an XDMF mesh (its root element is "
                        f"<{_short(root.tag, 30)}>, not <Xdmf>)")
    grid = next((g for g in root.iter("Grid") if g.get("Name") == "mesh"), None)
    if grid is None:
        raise CaseError(key, f"{path} has no grid named 'mesh' (write it with dolfinx's "
                        "XDMFFile.write_mesh, see meshes/make_meshes.py)")
    topology, geometry = grid.find("Topology"), grid.find("Geometry")
    cell = (topology.get("TopologyType", "") if topology is not None else "").lower()
    if cell not in ("triangle", "quadrilateral"):
        raise CaseError(key, f"{path}: the mesh's cells must be triangles or quadrilaterals, "
                        f"got {_short(cell or 'none', 30)!r}")
    if geometry is None or geometry.get("GeometryType", "XY") not in ("XY", "XYZ"):
        raise CaseError(key, f"{path}: the mesh needs an XY geometry")
    for item in grid.iter("DataItem"):
        if item.get("Format", "XML") != "HDF":
            continue
        file = (item.text or "").strip().split(":", 1)[0]
        h5 = path.parent / file
        if not h5.is_file():
            raise CaseError(key, f"{path} refers to {file!r}, which does not exist beside it")
        with open(h5, "rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                raise CaseError(key, f"{h5} is not an HDF5 file")


def _check_values(key, values, n_obs):
    if values.size != n_obs:
        raise CaseError(key, f"has {values.size} values but there are {n_obs} observations")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise CaseError(f"{key}[{bad[0]}]", f"must be finite, got {values[bad[0]]}")
    return values


def _merge_points(config, coords):
    """Take observation points from a data file's coordinates, or check they agree."""
    obs = config["observations"]
    if len(coords) != 2:
        return
    points = np.column_stack([coords["x"], coords["y"]])
    if not obs["points"]:
        if obs["functions"]:
            raise CaseError("data.file", "coordinates in the data file and "
                            "observations.functions: list the points in observations.points")
        obs["points"] = points.tolist()
        _rule_points_inside(config)
    elif np.shape(obs["points"]) != points.shape or not np.allclose(obs["points"], points):
        raise CaseError("data.file", "coordinates differ from observations.points")


# --- the case ------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Case:
    """A validated case: configuration, resolved inputs and builders of the model objects.

    Attributes:
        config: Nested dict of every key of :data:`SCHEMA` with defaults filled in.
        text: The original YAML text (or a YAML dump of the dict it came from).
        folder: Folder against which relative paths were resolved.
        name: Case name.
    """

    config: dict
    text: str
    folder: Path
    name: str
    observed: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, section):
        """The validated section ``case["prior"]`` (a dict)."""
        return self.config[section]

    @property
    def finest(self):
        """Finest level L."""
        return self.config["levels"]["finest"]

    @property
    def levels(self):
        """Levels ``1..L`` trained in turn."""
        return range(1, self.finest + 1)

    @property
    def bounds(self):
        """``(x0, x1, y0, y1)`` of the lattice."""
        return tuple(self.config["domain"]["bounds"])

    @property
    def n_obs(self):
        """Number of observations (points first, then functions)."""
        obs = self.config["observations"]
        return len(obs["points"]) + len(obs["functions"])

    @property
    def synthetic(self):
        """Whether the data are synthetic (a truth is known)."""
        return self.observed is None

    @property
    def noise(self):
        """Observation noise std, ndarray ``(n_obs,)``."""
        return np.broadcast_to(np.asarray(self.config["noise"]["std"], float), (self.n_obs,)).copy()

    @property
    def seed(self):
        """Sampler seed."""
        return self.config["sampler"]["seed"]

    def _level(self, level):
        level = self.finest if level is None else int(level)
        if not 1 <= level <= self.finest:
            raise ValueError(f"level must be in 1..{self.finest}, got {level}")
        return level

    def lattice_shape(self, level=None):
        """``(ny, nx)`` of level ``level`` (default: finest)."""
        n = 2 ** self._level(level)
        return (n, n)

    def centres(self, level=None):
        """Cell-centre coordinates ``(xc (nx,), yc (ny,))`` of a level."""
        ny, nx = self.lattice_shape(level)
        x0, x1, y0, y1 = self.bounds
        return (x0 + (np.arange(nx) + 0.5) * (x1 - x0) / nx,
                y0 + (np.arange(ny) + 0.5) * (y1 - y0) / ny)

    def evaluate(self, spec, level=None):
        """A spec evaluated at the cell centres of a level, ndarray ``(ny, nx)``."""
        from geoinvert.expressions import compile_spec
        xc, yc = self.centres(level)
        xx, yy = np.meshgrid(xc, yc)
        return np.asarray(compile_spec(spec)(xx, yy), dtype=float)

    def hierarchy(self):
        """The :class:`geoinvert.hierarchy.Hierarchy` of lattices and FE meshes."""
        if "hierarchy" not in self._cache:
            from geoinvert.hierarchy import Hierarchy
            lv = self.config["levels"]
            self._cache["hierarchy"] = Hierarchy(
                self.finest, self.bounds, refine=lv["refine"], min_cells=lv["min_cells"])
        return self._cache["hierarchy"]

    def prior(self, level=None):
        """The Gaussian prior (defined on the finest level, exact on every coarser one).

        Args:
            level: Accepted for symmetry with :meth:`forward`; the returned prior serves all levels.
        """
        self._level(level)
        if "prior" not in self._cache:
            self._cache["prior"] = _build_prior(self)
        return self._cache["prior"]

    def forward(self, level=None, comm=None):
        """Forward model on a level: Tensor ``(num, ny, nx) -> (num, n_obs)``."""
        level = self._level(level)
        key = ("forward", level)
        if key not in self._cache:
            self._cache[key] = _build_forward(self, level, comm)
        return self._cache[key]

    def posterior(self, level=None, comm=None):
        """The unnormalised posterior :class:`geoinvert.problem.posterior.Posterior` on a level."""
        from geoinvert.problem.posterior import Posterior
        level = self._level(level)
        return Posterior(self.prior(level), self.forward(level, comm), self.data, self.noise,
                         level)

    @functools.cached_property
    def truth(self):
        """The true field ``(ny, nx)`` on the finest level for synthetic data, else None."""
        return _synthetic_truth(self) if self.synthetic else None

    @functools.cached_property
    def data(self):
        """Observed values ``(n_obs,)``: as given, or synthetic ``F_L(truth) + noise``."""
        if not self.synthetic:
            return self.observed
        return _synthetic_data(self)

    def observation_names(self):
        """One name per observation."""
        names = self.config["observations"]["names"]
        if names:
            return list(names)
        obs = self.config["observations"]
        return ([f"point{i}" for i in range(len(obs["points"]))]
                + [f"function{i}" for i in range(len(obs["functions"]))])

    def summary(self):
        """Lines describing the case for ``geoinvert check``."""
        return _summary_lines(self)

    def warnings(self):
        """Valid settings that will likely go wrong numerically, one line each (see
        :data:`MAX_LOG_CONTRAST`)."""
        return _case_warnings(self)


def _build_prior(case):
    from geoinvert import priors
    p = case.config["prior"]
    mean = case.evaluate(p["mean"])
    if p["kind"] == "iid":
        return priors.IIDPrior(case.finest, case.bounds, mean=mean, std=p["std"])
    return priors.MaternPrior(case.finest, bounds=case.bounds, mean=mean, std=p["std"],
                              correlation_length=p["correlation_length"], alpha=p["alpha"],
                              boundary=p["boundary"])


def _build_forward(case, level, comm):
    from geoinvert.expressions import compile_spec
    fw, obs = case.config["forward"], case.config["observations"]
    shape = case.lattice_shape(level)
    functions = [compile_spec(s) for s in obs["functions"]]
    if fw["kind"] == "linear":
        from geoinvert.problem.forward.testbeds import LinearForward
        return LinearForward(functions, shape, bounds=case.bounds)
    if fw["kind"] == "quadratic":
        from geoinvert.problem.forward.testbeds import QuadraticForward
        return QuadraticForward(shape, phi=functions[0], bounds=case.bounds)
    return _build_elliptic(case, level, comm, shape)


def _build_elliptic(case, level, comm, shape):
    from geoinvert.problem.forward.elliptic import EllipticForward, OutsideMesh
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_SELF
    fw, dom, obs = case.config["forward"], case.config["domain"], case.config["observations"]
    cells = case.hierarchy().mesh_cells(level)
    mesh = str(_resolve(case.folder, "domain.mesh", dom["mesh"])) if dom["mesh"] else None
    try:
        return EllipticForward(
            comm, shape, bounds=case.bounds, mesh_cells=None if mesh else (cells, cells),
            mesh=mesh, cell=dom["cell"], degree=fw["degree"], source=fw["source"],
            dirichlet=fw["dirichlet"], neumann=fw["neumann"],
            points=np.asarray(obs["points"], float).reshape(-1, 2) if obs["points"] else None,
            functions=obs["functions"] or None, solver=fw["solver"])
    except OutsideMesh as err:
        raise CaseError(f"observations.points[{err.index}]", f"{list(err.point)} lies outside "
                        f"the mesh {mesh or ''}".rstrip()) from None
    except RuntimeError as err:        # dolfinx could not read the mesh file
        if mesh is None:
            raise
        raise CaseError("domain.mesh", f"cannot read the mesh {mesh}: "
                        f"{_short(str(err).strip().splitlines()[0], 80)}") from None


def _synthetic_truth(case):
    synth = case.config["data"]["synthetic"]
    if synth["file"] is not None:
        return _truth_from_file(case)
    if synth["truth"] == "prior":
        import torch
        gen = torch.Generator().manual_seed(synth["seed"])
        draw = case.prior().sample(1, case.finest, generator=gen, dtype=torch.float64)
        return draw[0].numpy()
    return case.evaluate(synth["truth"])


def _truth_from_file(case):
    synth = case.config["data"]["synthetic"]
    path = _resolve(case.folder, "data.synthetic.file", synth["file"])
    da = _read_netcdf(path, "data.synthetic.file", synth["variable"], "data.synthetic.variable")
    values = np.asarray(da.values, float)
    if values.shape != case.lattice_shape():
        raise CaseError("data.synthetic.file", f"field has shape {values.shape}, the finest "
                        f"lattice is {case.lattice_shape()}")
    if not np.isfinite(values).all():
        raise CaseError("data.synthetic.file", "field contains NaN or infinite values")
    return values


def _synthetic_data(case):
    import torch
    clean = case.forward(case.finest)(torch.as_tensor(case.truth)[None]).detach().numpy()[0]
    rng = np.random.default_rng(case.config["data"]["synthetic"]["seed"])
    return clean + case.noise * rng.standard_normal(case.n_obs)


def _resolve_inputs(config, folder):
    """Check files exist and load observed data; returns the observed array or None."""
    if config["domain"]["mesh"]:
        _check_mesh(_resolve(folder, "domain.mesh", config["domain"]["mesh"]))
    data = config["data"]
    if data["synthetic"]["file"] is not None:
        _resolve(folder, "data.synthetic.file", data["synthetic"]["file"])
    if data["values"] is not None:
        values = np.asarray(data["values"], float)
        key = "data.values"
    elif data["file"] is not None:
        values, coords = _read_data_file(_resolve(folder, "data.file", data["file"]), config)
        _merge_points(config, coords)
        key = "data.file"
    else:
        values = None
    obs = config["observations"]
    n_obs = len(obs["points"]) + len(obs["functions"])
    _check_counts(config, n_obs)
    return None if values is None else _check_values(key, values, n_obs)


def _check_counts(config, n_obs):
    if n_obs == 0:
        raise CaseError("observations", "no observations: give points or functions")
    if n_obs > MAX_OBSERVATIONS:
        raise CaseError("observations", f"{n_obs} observations; a case may have at most "
                        f"{MAX_OBSERVATIONS}")
    std, names = config["noise"]["std"], config["observations"]["names"]
    if isinstance(std, list) and len(std) != n_obs:
        raise CaseError("noise.std", f"has {len(std)} values but there are {n_obs} observations")
    steps, levels = config["sampler"]["steps"], config["levels"]["finest"]
    if isinstance(steps, list) and len(steps) != levels:
        raise CaseError("sampler.steps", f"has {len(steps)} values but there are {levels} levels "
                        "(levels.finest)")
    if names is not None and len(names) != n_obs:
        raise CaseError("observations.names", f"has {len(names)} names but there are {n_obs} "
                        "observations")


def load_case(source, *, folder=None):
    """Read and validate a case file or dict.

    Every key is checked once here (type, range, unknown keys, files, data length); the returned
    :class:`Case` is trusted by the rest of the package.

    Args:
        source: Path to a YAML case file, or a dict with the same structure.
        folder: Folder for relative paths when ``source`` is a dict (default: current directory).

    Returns:
        Case

    Raises:
        CaseError: naming the offending key (``"noise.std: must be > 0, got -1"``).
    """
    if isinstance(source, dict):
        text, where = yaml.safe_dump(source, sort_keys=False), "<dict>"
        raw, folder, stem = _copy(source), Path(folder or Path.cwd()), "case"
    else:
        path = Path(source)
        text, where = _read_text(path), str(path)
        raw, folder, stem = _parse(text, where), path.resolve().parent, path.stem
    config = _validate(raw)
    observed = _resolve_inputs(config, folder)
    case = Case(config=config, text=text, folder=folder, name=config["name"] or stem,
                observed=observed)
    _check_inputs(case)
    return case


def _finite_spec(case, key, spec):
    """``spec`` evaluated on the finest lattice must be finite."""
    import warnings
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            values = case.evaluate(spec)
        except OverflowError:
            raise CaseError(key, "overflows on the lattice: a value is beyond the largest "
                            "double (1.8e308)") from None
        except (ValueError, TypeError, ArithmeticError) as err:
            raise CaseError(key, f"cannot be evaluated: {_short(err, 80)}") from None
    bad = values[~np.isfinite(values)]
    if bad.size:
        raise CaseError(key, f"is not finite on the lattice (got {bad[0]} at {bad.size} cell "
                        "centres)")


def _check_inputs(case):
    """What the schema cannot see: expressions finite on the lattice, an elliptic problem
    with a Dirichlet boundary, a correlation length of the domain's scale, and a readable
    synthetic truth (from a file or an expression), so that ``check`` refuses what ``run``
    could not do."""
    config = case.config
    fwd, obs = config["forward"], config["observations"]
    if fwd["kind"] == "elliptic":
        if not fwd["dirichlet"]:
            raise CaseError("forward.dirichlet", "an elliptic problem needs a Dirichlet "
                            "condition on some boundary (without one the solution is not "
                            "unique)")
        _finite_spec(case, "forward.source", fwd["source"])
        for kind in ("dirichlet", "neumann"):
            for side, spec in (fwd[kind] or {}).items():
                _finite_spec(case, f"forward.{kind}.{side}", spec)
        if config["domain"]["mesh"]:
            # dolfinx reads the mesh once: it must load, and hold every observation point
            level = case.levels[0]
            _build_elliptic(case, level, None, case.lattice_shape(level))
    for i, spec in enumerate(obs["functions"]):
        _finite_spec(case, f"observations.functions[{i}]", spec)
    x0, x1, y0, y1 = case.bounds
    scale = max(x1 - x0, y1 - y0)
    length = config["prior"]["correlation_length"]
    if config["prior"]["kind"] == "matern" and not 1e-4 * scale <= length <= 1e4 * scale:
        raise CaseError("prior.correlation_length", f"{_short(length)} is not of the domain's "
                        f"scale ({scale:g}): it must lie between 1e-4 and 1e4 times it")
    synth = config["data"]["synthetic"]
    if case.synthetic and synth["file"] is not None:
        case.truth                              # reads and checks the file
    elif case.synthetic and synth["truth"] not in (None, "prior"):
        _finite_spec(case, "data.synthetic.truth", synth["truth"])


def prior_from_text(text):
    """The prior of a case given its YAML text (input files are not read).

    Used to rebuild a saved model, whose file stores the case text.
    """
    config = _validate(_parse(text, "<case text>"))
    case = Case(config=config, text=text, folder=Path.cwd(), name=config["name"] or "case")
    return case.prior()


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
    step); ``laplace`` and ``gpcn`` add the Laplace fit (:func:`_laplace_solves`). Flows: each stage takes ``steps`` steps of ``batch`` samples, twice for the Jeffreys
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
    options = train_options(c) if s["kind"] in FLOW_KINDS else None
    if s["kind"] in FLOW_KINDS:
        flow = flow_config(c)
        total += 4 * options.batch * 4 ** L * flow.hidden * flow.blocks * 2
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
        held += max(min(FACTOR_BYTES_HELD, batch * per_sample), min(batch, 8) * per_sample)
        transient = max(transient, min(batch, 8) * per_sample + 8 * batch * (2 * n + 12 * n_obs))
        total += 3 * 8 * n * len(c["observations"]["functions"])
    return total + held + transient


def _free_dofs(case, level):
    """Dofs of a level's FE mesh: the structured mesh of the bounds, or the mesh read."""
    c = case.config
    degree = c["forward"]["degree"]
    if c["domain"]["mesh"]:
        cells = _mesh_cells(_resolve(case.folder, "domain.mesh", c["domain"]["mesh"]))
        return max(int(cells * degree ** 2), 1)
    per_side = case.hierarchy().mesh_cells(level) if _has_hierarchy() else 2 ** level
    return (per_side * degree + 1) ** 2


def _mesh_cells(path):
    import xml.etree.ElementTree as ET
    topology = next(ET.parse(path).getroot().iter("Topology"), None)
    try:
        return int(topology.get("NumberOfElements"))
    except (AttributeError, TypeError, ValueError):
        return 0


def _largest_batch(case, level, options):
    """Samples of the largest batched evaluation on a level (see :func:`estimate_memory`)."""
    c = case.config
    kind = c["sampler"]["kind"]
    finest = level == case.finest
    if kind in MCMC_KINDS or kind in ("laplace", "gpcn"):
        return max(chain_config(c).chains,
                   min(c["output"]["samples"], EVALUATION_CHUNK) if finest else 0, 50)
    chunk = EVALUATION_CHUNK
    batch = options.batch * options.evaluations
    if options.objective == "jeffreys" and level <= options.pool_levels:
        batch = max(batch, min(options.pool, chunk))
    if finest:
        batch = max(batch, min(c["output"]["samples"], chunk), correction_config(c).chains)
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


def _summary_lines(case):
    obs = case.config["observations"]
    solves, equiv, seconds = estimate_cost(case)
    lines = [f"case {case.name}: forward {case.config['forward']['kind']}, "
             f"prior {case.config['prior']['kind']}, data "
             f"{'synthetic' if case.synthetic else 'observed'}",
             f"observations: {case.n_obs} ({len(obs['points'])} points, "
             f"{len(obs['functions'])} functions)"]
    for level in case.levels:
        ny, nx = case.lattice_shape(level)
        lines.append(f"  level {level}: {ny} x {nx} = {ny * nx} unknowns")
    lines.append(f"estimated cost: {solves} forward solves (~{equiv:.0f} finest-level "
                 f"equivalents), roughly {_duration(seconds)} on one core")
    have = machine_memory()
    lines.append(f"estimated memory: {estimate_memory(case) / 1e9:.1f} GB per process"
                 + (f" (this machine has {have / 1e9:.1f} GB)" if have else ""))
    s = case.config["sampler"]
    correction = correction_config(case.config)
    if s["kind"] in FLOW_KINDS and correction.enabled:
        most = correction.most_solves() - correction.reserved()
        if s["budget"]:
            most = max(min(most, s["budget"] - solves), 0)
        if most > 0:
            per_solve = seconds / max(equiv, 1)
            lines.append(f"  (the correction may take up to {most} more, about "
                         f"{_duration(most * per_solve)}, if its chains need long trajectories "
                         "or more draws to converge)")
    return lines


def _case_warnings(case):
    """A prior whose draws span a coefficient contrast the solver cannot handle: the expected
    range of n standard normal values, 2 sqrt(2 ln n), times ``prior.std``."""
    c = case.config
    if c["forward"]["kind"] != "elliptic":
        return []
    std = c["prior"]["std"]
    spread = 2 * math.sqrt(2 * math.log(4 ** case.finest)) * std
    if spread <= MAX_LOG_CONTRAST:
        return []
    return [f"prior.std: {_short(std)} lets a field of the prior span a permeability contrast "
            f"of about 1e{spread / math.log(10):.0f}; the solves lose accuracy past about "
            f"1e{MAX_LOG_CONTRAST / math.log(10):.0f} and fail further out, so many draws "
            "will be left out or the correction may not start (log-permeabilities of real "
            "aquifers rarely have std above 3)"]


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _markdown_default(key):
    if key.default is REQUIRED:
        return "**required**"
    if key.default is None:
        return "—"
    return f"`{yaml.safe_dump(key.default, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _markdown_type(key):
    rule = key.check.__doc__ if key.check and key.check.__doc__ else ""
    return KINDS[key.kind][1] + (f", {rule}" if rule else "")


def schema_markdown():
    """The reference tables of ``docs/case-files.md``, generated from :data:`SCHEMA`."""
    out = []
    for section in ("", *SECTIONS):
        keys = [k for k in SCHEMA if (k.path.split(".")[0] == section if section
                                      else "." not in k.path)]
        title = f"### `{section}`" if section else "### top level"
        if section in REQUIRED_SECTIONS:
            title += " (required section)"
        out += ["", title, "", "| key | type | default | meaning | example |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| `{k.path}` | {_markdown_type(k)} | {_markdown_default(k)} | "
                f"{k.doc.replace('|', '/')}{_markdown_kinds(k)} | `{k.example}` |" for k in keys]
    return "\n".join(out).lstrip("\n") + "\n"


def _markdown_kinds(key):
    """`` Kinds: ...`` for the ``sampler`` keys that apply to some kinds only."""
    parts = key.path.split(".")
    kinds = SAMPLER_KEY_KINDS.get(parts[1]) if parts[0] == "sampler" and len(parts) > 1 else None
    return f" Kinds: {', '.join(f'`{k}`' for k in kinds)}." if kinds else ""


DOC_START, DOC_END = "<!-- schema:start -->", "<!-- schema:end -->"


def update_doc(path):
    """Rewrite the generated block between the schema markers of a Markdown file.

    Returns:
        True if the file changed.
    """
    path = Path(path)
    text = path.read_text()
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    new = f"{head}{DOC_START}\n{schema_markdown()}{DOC_END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
