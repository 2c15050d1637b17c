"""Reading and validating a case file: bounded YAML (no aliases, no duplicate keys, limited
depth and size), every key against the schema, the cross-key rules, the input files, and
what a run needs (:func:`load_case`).
"""

import re
from pathlib import Path

import numpy as np
import yaml

from geoinvert.errors import CaseError
from geoinvert.inference.config import RECIPE_KEYS, STEPS, recipe_options, stage_steps
from geoinvert.case.build import Case, build_elliptic
from geoinvert.case.inputs import check_learned_prior, check_mesh, read_data_file, resolve
from geoinvert.case.schema import (KEYS, KINDS, MAX_CASE_BYTES, MAX_DEPTH, MAX_OBSERVATIONS,
                                   REQUIRED, REQUIRED_SECTIONS, SAMPLER_KEY_KINDS, SCHEMA,
                                   TRAINED_KINDS, VI_KINDS, correction_config, short, suggest,
                                   type_error)

__all__ = ["CaseLoader", "load_case", "prior_from_text"]


# --- reading and structural checks ---------------------------------------------------------------

class _Refused(yaml.YAMLError):
    """A YAML construct that case files do not allow, with where it is."""

    def __init__(self, problem, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class CaseLoader(yaml.SafeLoader):
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


CaseLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"))


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
                            + suggest(name, valid))
        if key not in KEYS and value is not None:
            if not isinstance(value, dict):
                raise type_error(key, "a section (mapping)", value)
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
        raw = yaml.load(text, Loader=CaseLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise CaseError(where, f"invalid YAML{line}: {getattr(err, 'problem', err)}") from None
    except ValueError as err:        # e.g. an integer of more digits than Python converts
        what = "a number has too many digits" if "digits" in str(err) else short(err, 80)
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
    _default_steps(config)
    for rule in _RULES:
        rule(config)
    _rule_correction_for_flows(raw, config)
    _rule_learned_prior(raw, config)
    return config


def _apply_recipe(raw, config):
    """The recipe's values for the training keys the case does not give."""
    s = config["sampler"]
    given = {key: s[key] if _lookup(raw, f"sampler.{key}")[1] else None for key in RECIPE_KEYS}
    s.update(recipe_options(s["recipe"], **given))


def _default_steps(config):
    """Unset ``sampler.steps``: sized to each stage's parameters
    (:func:`~geoinvert.inference.config.stage_steps`); one number for the one-level kinds."""
    s, finest = config["sampler"], config["levels"]["finest"]
    if s["steps"] is None:
        s["steps"] = STEPS if s["kind"] in VI_KINDS else \
            [stage_steps(level, finest) for level in range(1, finest + 1)]


def _rule_keys_of_the_kind(raw, kind):
    """A ``sampler`` key given for a kind that does not use it is a mistake, not a no-op."""
    for key, kinds in SAMPLER_KEY_KINDS.items():
        if kind in kinds or not _lookup(raw, f"sampler.{key}")[1]:
            continue
        hint = ""
        if kind in TRAINED_KINDS and key in ("chains", "draws", "warmup", "leapfrog"):
            hint = f" (the flow's correction has its own: sampler.correction.{key})"
        raise CaseError(f"sampler.{key}", f"applies to sampler.kind {', '.join(kinds)}, not "
                        f"to {kind}{hint}")


_GAUSSIAN_PRIOR_KEYS = ("mean", "std", "correlation_length", "alpha", "boundary")
_NEEDS_GAUSSIAN = {"msign": "trains on the coarse levels of a Gaussian prior",
                   "asvgd": "trains on the coarse levels of a Gaussian prior",
                   "iaf": "runs in the prior's whitened coordinates"}


def _rule_learned_prior(raw, config):
    """A learned prior has its model and none of the Gaussian's keys, and the kinds that
    need a Gaussian prior are refused with it; ``composed`` needs it."""
    p, kind = config["prior"], config["sampler"]["kind"]
    if p["kind"] != "learned":
        if p["model"] is not None:
            raise CaseError("prior.model", f"is read only with prior.kind learned, not "
                            f"{p['kind']}")
        if kind == "composed":
            raise CaseError("sampler.kind", "composed trains in the latent space of a learned "
                            "prior: set prior.kind learned and prior.model")
        return
    if p["model"] is None:
        raise CaseError("prior.model", "prior.kind learned needs the model written by "
                        "geoinvert prior fit")
    for key in _GAUSSIAN_PRIOR_KEYS:
        if _lookup(raw, f"prior.{key}")[1]:
            raise CaseError(f"prior.{key}", "applies to the Gaussian priors (matern, iid), "
                            "not to a learned one, whose model holds its own")
    if kind in _NEEDS_GAUSSIAN:
        raise CaseError("sampler.kind", f"{kind} {_NEEDS_GAUSSIAN[kind]}; with a learned prior "
                        "use composed (an IAF in the prior's latent space), meanfield, "
                        "laplace or an MCMC kind, which run in that latent space")


def _rule_hard_data(config):
    """Hard data lie in the domain and have one value each (or, with synthetic data, take
    the truth's)."""
    hard, x0, x1, y0, y1 = (config["observations"]["hard_data"], *config["domain"]["bounds"])
    for i, (px, py) in enumerate(hard["points"]):
        if not (x0 <= px <= x1 and y0 <= py <= y1):
            raise CaseError(f"observations.hard_data.points[{i}]",
                            f"point ({px}, {py}) lies outside the domain {[x0, x1, y0, y1]}")
    values, synthetic = hard["values"], any(
        config["data"]["synthetic"][k] is not None for k in ("truth", "file"))
    if values is None and hard["points"] and not synthetic:
        raise CaseError("observations.hard_data.values", "give one value per hard-data point "
                        "(only synthetic data take them from the truth)")
    if values is not None and len(values) != len(hard["points"]):
        raise CaseError("observations.hard_data.values", f"has {len(values)} values but there "
                        f"are {len(hard['points'])} hard-data points")
    bad = [i for i, v in enumerate(values or []) if not np.isfinite(v)]
    if bad:
        raise CaseError(f"observations.hard_data.values[{bad[0]}]", "must be finite")


def _rule_correction_for_flows(raw, config):
    """Each ``sampler`` key belongs to the kinds that use it (``sampler.correction`` to
    flows); a budget must leave room for training."""
    s = config["sampler"]
    _rule_keys_of_the_kind(raw, s["kind"])
    if s["kind"] in VI_KINDS and isinstance(s["steps"], list):
        raise CaseError("sampler.steps", f"{s['kind']} trains one level: give one number of "
                        "steps")
    if s["kind"] not in TRAINED_KINDS:
        return
    if s["budget"] and correction_config(config).kernel == "lifted":
        raise CaseError("sampler.correction.kernel", "the lifted kernel does not share a solve "
                        "budget: remove sampler.budget or use the kernel hmc")
    reserved = correction_config(config).reserved() + config["output"]["samples"]
    if s["budget"] and s["budget"] <= reserved:
        raise CaseError("sampler.budget", f"{s['budget']} forward solves leave nothing for "
                        f"training: the correction and the final draws take {reserved} "
                        "(lower sampler.correction.draws or .chains, or raise the budget)")


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
    if kind == "quadratic" and not obs["functions"]:
        raise CaseError("observations.functions", "forward.kind quadratic needs at least one "
                        "measurement function")
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


_RULES = (_rule_points_inside, _rule_forward_observations, _rule_one_data_source, _rule_beta,
          _rule_hard_data)


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


def _resolve_inputs(config, folder):
    """Check files exist and load observed data; returns the observed array or None."""
    if config["domain"]["mesh"]:
        check_mesh(resolve(folder, "domain.mesh", config["domain"]["mesh"]))
    if config["prior"]["model"] is not None:
        check_learned_prior(resolve(folder, "prior.model", config["prior"]["model"]), config)
    data = config["data"]
    if data["synthetic"]["file"] is not None:
        resolve(folder, "data.synthetic.file", data["synthetic"]["file"])
    if data["values"] is not None:
        values = np.asarray(data["values"], float)
        key = "data.values"
    elif data["file"] is not None:
        values, coords = read_data_file(resolve(folder, "data.file", data["file"]), config)
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
            raise CaseError(key, f"cannot be evaluated: {short(err, 80)}") from None
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
            build_elliptic(case, level, None, case.lattice_shape(level))
    for i, spec in enumerate(obs["functions"]):
        _finite_spec(case, f"observations.functions[{i}]", spec)
    x0, x1, y0, y1 = case.bounds
    scale = max(x1 - x0, y1 - y0)
    length = config["prior"]["correlation_length"]
    if config["prior"]["kind"] == "matern" and not 1e-4 * scale <= length <= 1e4 * scale:
        raise CaseError("prior.correlation_length", f"{short(length)} is not of the domain's "
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
