"""The validated :class:`Case` and the model objects it builds: hierarchy, prior, forward
models and posteriors of every level, the synthetic truth and data.
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geoinvert.errors import CaseError
from geoinvert.case.cost import case_warnings, summary_lines
from geoinvert.case.inputs import read_netcdf, resolve
from geoinvert.case.schema import short

__all__ = ["Case", "build_elliptic"]


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
        """Number of observations (points first, then functions, then hard data)."""
        obs = self.config["observations"]
        return len(obs["points"]) + len(obs["functions"]) + len(obs["hard_data"]["points"])

    @property
    def hard_points(self):
        """``(k, 2)`` locations of the hard data (field values at known cells)."""
        return np.asarray(self.config["observations"]["hard_data"]["points"],
                          float).reshape(-1, 2)

    @property
    def synthetic(self):
        """Whether the data are synthetic (a truth is known)."""
        return self.observed is None

    @property
    def noise(self):
        """Observation noise std, ndarray ``(n_obs,)`` (the hard data's last)."""
        hard = self.config["observations"]["hard_data"]
        k = len(hard["points"])
        own = np.broadcast_to(np.asarray(self.config["noise"]["std"], float), (self.n_obs - k,))
        return np.concatenate([own, np.full(k, float(hard["noise"]))])

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

    @property
    def learned_prior(self):
        """Whether the prior is a learned flow (``prior.kind: learned``)."""
        return self.config["prior"]["kind"] == "learned"

    def prior(self, level=None):
        """The prior: Gaussian (defined on the finest level, exact on every coarser one), or
        the :class:`~geoinvert.priors.learned.LearnedPrior` of ``prior.model``.

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
        hard = self.config["observations"]["hard_data"]["values"]
        if not self.synthetic:
            return np.concatenate([self.observed, np.asarray(hard or [], float)])
        data = _synthetic_data(self)
        if hard is not None:
            data[self.n_obs - len(hard):] = hard
        return data

    def observation_names(self):
        """One name per observation."""
        names = self.config["observations"]["names"]
        if names:
            return list(names)
        obs = self.config["observations"]
        return ([f"point{i}" for i in range(len(obs["points"]))]
                + [f"function{i}" for i in range(len(obs["functions"]))]
                + [f"hard{i}" for i in range(len(obs["hard_data"]["points"]))])

    def summary(self):
        """Lines describing the case for ``geoinvert check``."""
        return summary_lines(self)

    def warnings(self):
        """Valid settings that will likely go wrong numerically, one line each (see
        :data:`MAX_LOG_CONTRAST`)."""
        return case_warnings(self)


def _build_prior(case):
    from geoinvert import priors
    p = case.config["prior"]
    if p["kind"] == "learned":
        from geoinvert.priors.learned import LearnedPrior
        return LearnedPrior.load(resolve(case.folder, "prior.model", p["model"]))
    mean = case.evaluate(p["mean"])
    if p["kind"] == "iid":
        return priors.IIDPrior(case.finest, case.bounds, mean=mean, std=p["std"])
    return priors.MaternPrior(case.finest, bounds=case.bounds, mean=mean, std=p["std"],
                              correlation_length=p["correlation_length"], alpha=p["alpha"],
                              boundary=p["boundary"])


def _build_forward(case, level, comm):
    from geoinvert.problem.forward.hard import with_hard_data
    return with_hard_data(_own_forward(case, level, comm), case.hard_points, case.bounds)


def _own_forward(case, level, comm):
    from geoinvert.expressions import compile_spec
    fw, obs = case.config["forward"], case.config["observations"]
    shape = case.lattice_shape(level)
    functions = [compile_spec(s) for s in obs["functions"]]
    if fw["kind"] == "linear":
        from geoinvert.problem.forward.testbeds import LinearForward
        return LinearForward(functions, shape, bounds=case.bounds)
    if fw["kind"] == "quadratic":
        from geoinvert.problem.forward.testbeds import QuadraticForward
        return QuadraticForward(shape, phi=functions, bounds=case.bounds)
    return build_elliptic(case, level, comm, shape)


def build_elliptic(case, level, comm, shape):
    from geoinvert.problem.forward.elliptic import EllipticForward, OutsideMesh
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_SELF
    fw, dom, obs = case.config["forward"], case.config["domain"], case.config["observations"]
    cells = case.hierarchy().mesh_cells(level)
    mesh = str(resolve(case.folder, "domain.mesh", dom["mesh"])) if dom["mesh"] else None
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
                        f"{short(str(err).strip().splitlines()[0], 80)}") from None


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
    path = resolve(case.folder, "data.synthetic.file", synth["file"])
    da = read_netcdf(path, "data.synthetic.file", synth["variable"], "data.synthetic.variable")
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
