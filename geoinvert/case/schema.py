"""The case schema: one :class:`Key` per case-file key (type, default, meaning, example,
range check), the coercions of values to their types, and typed views of a validated
configuration (:func:`train_options`, :func:`flow_config`, :func:`chain_config`,
:func:`correction_config`).
"""

import dataclasses
import difflib
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from geoinvert.errors import CaseError
from geoinvert.inference.config import (CHAIN_KINDS, CORRECTION_COORDINATES, CORRECTION_KERNELS,
                                        RECIPE_KEYS,
                                        LEAST_STEPS, RECIPES, STEPS,
                                        UPSAMPLINGS, FLOW_BLOCKS,
                                        ChainConfig,
                                        CorrectionConfig,
                                        FlowConfig,
                                        TrainOptions)

__all__ = ["REQUIRED", "SECTIONS", "REQUIRED_SECTIONS", "BOUNDARIES", "Key", "MAX_CASE_BYTES",
           "MAX_DEPTH", "MAX_SEED", "MAX_OBSERVATIONS", "MAX_MESH_XML_BYTES", "short",
           "SAMPLER_KINDS", "MCMC_KINDS", "FLOW_KINDS", "VI_KINDS", "TRAINED_KINDS", "SCHEMA", "KEYS", "type_error",
           "KINDS", "suggest", "SAMPLER_KEY_KINDS", "correction_config", "flow_config",
           "chain_config", "train_options"]


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


def short(value, most=40):
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
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {short(v)}"
    check.__doc__ = f"{lo}..{hi}"
    return check


SAMPLER_KINDS = ("msign", "asvgd", "iaf", "meanfield", "composed", "laplace", "pcn", "mala",
                 "hmc", "gpcn")

MCMC_KINDS = CHAIN_KINDS

FLOW_KINDS = ("msign", "asvgd")
VI_KINDS = ("iaf", "meanfield", "composed")
"""Single-level variational families trained by the reverse KL (no stages, no checkpoints)."""
TRAINED_KINDS = FLOW_KINDS + VI_KINDS
"""The kinds that train a network and then correct its draws."""


def _one_of(*choices):
    def check(v):
        if v in choices:
            return None
        return f"must be one of {', '.join(map(str, choices))}, got {v!r}" + suggest(v, choices)
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
                "upsampling": _one_of(*UPSAMPLINGS), "flow": _one_of(*FLOW_BLOCKS)}


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
    Key("prior.kind", "str", "matern", "Prior family: the Gaussians `matern` (precision "
        "(tau^2 I - Laplacian)^alpha) or `iid` (independent cells), or `learned` (an MsIGN "
        "trained on an ensemble of fields by `geoinvert prior fit`, read from `prior.model`; "
        "inference then runs in its latent space).", "iid",
        _one_of("matern", "iid", "learned")),
    Key("prior.model", "path", None, "prior.kind learned: the model written by `geoinvert "
        "prior fit` (the .pt file, with its .json beside it), on the finest lattice and the "
        "domain's bounds.", "prior.pt"),
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
        "`linear` (y_k = int phi_k x) or `quadratic` (y_k = (int phi_k x)^2).", "elliptic",
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
        "first, then functions, then hard data).", "[W1, W2]"),
    Key("observations.hard_data.points", "points", [], "Hard data: `[x, y]` locations where "
        "the log-coefficient itself is known (e.g. measured at wells); each conditions the "
        "lattice cell holding it.", "[[0.3, 0.5], [0.7, 0.5]]"),
    Key("observations.hard_data.values", "floats", None, "Hard data: the known values, one "
        "per point (synthetic data: default the truth's values in those cells).",
        "[1.2, -0.4]"),
    Key("observations.hard_data.noise", "float", 0.01, "Hard data: standard deviation of "
        "their measurement error.", "0.05", _positive),
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
        "`asvgd` (the same network trained by amortized SVGD), `iaf` (an inverse "
        "autoregressive flow on the finest level, `sampler.blocks` MADE maps, trained by the "
        "reverse KL), `meanfield` (a mean-field Gaussian, likewise), `composed` (with "
        "`prior.kind: learned`: the same IAF trained in the learned prior's latent space, "
        "so that prior and IAF compose into one flow), `laplace` (the Gaussian at the "
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
    Key("sampler.steps", "int_or_ints", None, "Training steps per stage: one number, or one per "
        "level from the coarsest (as many as `levels.finest`). Unset: "
        f"{STEPS} on the finest level and, on a coarser one, in proportion to its parameters "
        f"(a quarter per level down), at least {LEAST_STEPS}; a problem below 16x16 trains as "
        "the stages of its sizes do in a 16x16 one (8x8: [25, 25, 50]); "
        f"{STEPS} for the one-level kinds (iaf, meanfield, composed).", "[300, 1500, 500, 1000]",
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
    Key("output.samples", "int", 500, "Posterior samples stored in the result (chains are "
        "thinned evenly to it; the stored mean, std and quantiles use every chain draw).",
        "1000", _between(2, 10**6)),
    Key("output.quantiles", "floats", [0.05, 0.5, 0.95], "Quantiles stored in the result.",
        "[0.1, 0.9]", _quantiles),
    Key("output.direction", "spec", None, "Direction field for the marginal plot (default: "
        "the leading principal component of the samples).", "sin(pi*x)*sin(2*pi*y)"),
    Key("output.figures", "bool", False, "Also write the PNG figures after a run.", "true"),
)


KEYS = {k.path: k for k in SCHEMA}


# --- type checks -------------------------------------------------------------------------------

def type_error(key, expected, value):
    return CaseError(key, f"must be {expected}, got {value!r}")


def _as_float(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise type_error(key, "a number", v)
    if not math.isfinite(v):
        raise CaseError(key, f"must be finite, got {v}")
    return float(v)


def _as_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise type_error(key, "an integer", v)
    return v


def _as_list(key, v, what):
    if not isinstance(v, list):
        raise type_error(key, f"a list of {what}", v)
    return v


def _as_floats(key, v):
    return [_as_float(f"{key}[{i}]", s) for i, s in enumerate(_as_list(key, v, "numbers"))]


def _as_str(key, v):
    if not isinstance(v, str):
        raise type_error(key, "a string", v)
    return v


def _as_bool(key, v):
    if not isinstance(v, bool):
        raise type_error(key, "true or false", v)
    return v


def _as_points(key, v):
    points = []
    for i, p in enumerate(_as_list(key, v, "[x, y] pairs")):
        if not isinstance(p, list) or len(p) != 2:
            raise type_error(f"{key}[{i}]", "a pair [x, y]", p)
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
        raise CaseError(key, short(err, 120)) from None
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
        raise type_error(key, "a mapping {boundary: spec}", v)
    out = {}
    for name, spec in v.items():
        if not (isinstance(name, int) and not isinstance(name, bool)) and name not in BOUNDARIES:
            raise CaseError(f"{key}.{name}", "unknown boundary; valid: "
                            f"{', '.join(BOUNDARIES)} or an integer facet tag"
                            + suggest(str(name), BOUNDARIES))
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


def suggest(word, choices):
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


SAMPLER_KEY_KINDS = {
    **{key: TRAINED_KINDS for key in ("steps", "batch", "lr", "budget", "correction")},
    **{key: FLOW_KINDS + ("iaf", "composed") for key in ("blocks", "hidden")},
    **{key: FLOW_KINDS for key in ("upsampling", "flow", "lr_warmup", "checkpoint_every")},
    **{key: ("msign",) for key in ("objective", "recipe", "coarse_sampler", "pool_levels",
                                   "reverse_weight", "frozen_proposal", "pool_warmup")},
    **{f.name: f.metadata["kinds"] for f in dataclasses.fields(ChainConfig)},
}
"""The sampler kinds each ``sampler.*`` key applies to (keys not listed apply to all)."""


def correction_config(config):
    """The :class:`CorrectionConfig` of a validated config (``case.config``)."""
    return CorrectionConfig(**config["sampler"]["correction"]).resolved(
        config["sampler"]["kind"], 4 ** config["levels"]["finest"])


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
