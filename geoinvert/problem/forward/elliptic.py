"""Elliptic forward model -div(exp(m) grad u) = f with dolfinx + PETSc and exact discrete adjoints.

The log-coefficient m is piecewise constant on a lattice of ``ny x nx`` cells over the bounding box
of the domain; every finite-element cell takes the value of the lattice cell containing its centre.
Observations are point values of u and integrals of phi_k u over the domain.

Two solvers share one discretisation (:class:`Discretisation`):

* :class:`FastSolver` (one process per solve): the stiffness matrix is linear in k = exp(m),
  A(k) = sum_c k_c A_c, so the map k -> matrix values is a sparse matrix ``M`` computed once by
  assembling with dolfinx on colour classes of lattice cells. The pattern, the fill-reducing
  ordering (nested dissection by dof coordinates) and the pattern of the Cholesky factor are
  computed once; every sample costs one numeric factorisation, done for up to 8 samples at once
  by a small compiled kernel whose SIMD lanes are the samples (:class:`InterleavedCholesky`;
  PETSc's Cholesky is the fallback), and the factorisation is kept for the adjoint solve (A is
  symmetric after symmetric elimination of the Dirichlet dofs). The gradient is the contraction
  -k_c lambda^T A_c u = -k * M^T (lambda_i u_j), for a chunk of samples at once.
* :class:`AssemblySolver` (any communicator, also the benchmark's naive baseline): per sample,
  dolfinx assembles A(k), PETSc factorises (or runs CG + GAMG for large distributed meshes), and
  the gradient is the assembled form -k * grad(u) . grad(lambda) tested with cell indicators.
"""

import contextlib
import logging

import numpy as np
import scipy.sparse as sp
import torch
import ufl
from dolfinx import fem, geometry, mesh as dmesh
from petsc4py import PETSc

from geoinvert.expressions import compile_spec
from geoinvert.problem.forward.autograd import apply_adjoint_model
from geoinvert.problem.forward import cholesky
from geoinvert.problem.forward.cholesky import InterleavedCholesky, PetscCholesky
from geoinvert.problem.forward.failures import FailureLog

__all__ = ["EllipticForward", "Discretisation", "OutsideMesh", "FastSolver", "AssemblySolver",
           "MAX_LOG_COEFFICIENT"]

log = logging.getLogger(__name__)

#: |m| above this overflows exp(m) in double precision (exp(709.8) is the largest double).
MAX_LOG_COEFFICIENT = 700.0
_SIDES = ("left", "right", "bottom", "top", "all")


def _side_marker(side, bounds):
    x0, x1, y0, y1 = bounds
    tol = 1e-10 * max(x1 - x0, y1 - y0)
    near = {
        "left": lambda p: np.isclose(p[0], x0, atol=tol),
        "right": lambda p: np.isclose(p[0], x1, atol=tol),
        "bottom": lambda p: np.isclose(p[1], y0, atol=tol),
        "top": lambda p: np.isclose(p[1], y1, atol=tol),
    }
    if side == "all":
        return lambda p: np.ones(p.shape[1], dtype=bool)
    return near[side]


def _interpolate(space, spec):
    f = fem.Function(space)
    fn = compile_spec(spec)
    f.interpolate(lambda p: fn(p[0], p[1]))
    return f


def _read_mesh(comm, path):
    from dolfinx.io import XDMFFile

    with XDMFFile(comm, str(path), "r") as xdmf:
        msh = xdmf.read_mesh(name="mesh")
        msh.topology.create_connectivity(1, 2)
        try:
            tags = xdmf.read_meshtags(msh, name="facets")
        except RuntimeError:
            tags = None
    return msh, tags


class OutsideMesh(ValueError):
    """An observation point (number ``index``, at ``point``) that no cell of the mesh holds."""

    def __init__(self, index, point):
        self.index, self.point = index, point
        super().__init__(f"observation point {point} lies outside the mesh")


class Discretisation:
    """Mesh, spaces, boundary conditions, load vector and observation functionals.

    Args:
        comm: MPI communicator of the mesh.
        shape: ``(ny, nx)`` of the parameter lattice.
        bounds: ``(x0, x1, y0, y1)`` of the lattice (the mesh's bounding box for a read mesh).
        mesh_cells: ``(mx, my)`` cells of a structured mesh of the bounds; default the lattice.
        mesh: path of an XDMF mesh (grid ``mesh``, optional facet tags ``facets``) instead.
        cell: ``"quadrilateral"`` or ``"triangle"`` for the structured mesh.
        degree: Lagrange degree (1 or 2).
        source, dirichlet, neumann, points, functions: see :class:`EllipticForward`.
    """

    def __init__(self, comm, shape, *, bounds=(0.0, 1.0, 0.0, 1.0), mesh_cells=None, mesh=None,
                 cell="quadrilateral", degree=1, source=1.0, dirichlet=None, neumann=None,
                 points=None, functions=None):
        self.comm, self.shape, self.degree = comm, tuple(int(s) for s in shape), int(degree)
        self.msh, self.facet_tags, self.bounds = self._make_mesh(mesh, mesh_cells, cell, bounds)
        self.V = fem.FunctionSpace(self.msh, ("Lagrange", self.degree))
        self.Q = fem.FunctionSpace(self.msh, ("DG", 0))
        self.k = fem.Function(self.Q)
        self.k.x.array[:] = 1.0
        self.cell_lattice = self._cell_to_lattice()
        u, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)
        self.a = fem.form(self.k * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
        self.bcs = self._dirichlet(dirichlet or {})
        self.L = fem.form(self._rhs(v, source, neumann or {}))
        self.obs_points = np.zeros((0, 2)) if points is None else np.asarray(points, float).reshape(-1, 2)
        self.observation = self._observation_matrix(functions or [])

    # -- mesh and lattice ---------------------------------------------------------------
    def _make_mesh(self, path, mesh_cells, cell, bounds):
        if path is not None:
            msh, tags = _read_mesh(self.comm, path)
            x = msh.geometry.x
            # per-component floats: object allreduce with MIN/MAX does not compare arrays
            lo = [self.comm.allreduce(float(v), op=_MPI_MIN()) for v in x[:, :2].min(axis=0)]
            hi = [self.comm.allreduce(float(v), op=_MPI_MAX()) for v in x[:, :2].max(axis=0)]
            return msh, tags, (lo[0], hi[0], lo[1], hi[1])
        x0, x1, y0, y1 = (float(b) for b in bounds)
        mx, my = mesh_cells if mesh_cells is not None else (self.shape[1], self.shape[0])
        cell_type = {"quadrilateral": dmesh.CellType.quadrilateral,
                     "triangle": dmesh.CellType.triangle}[cell]
        msh = dmesh.create_rectangle(self.comm, [np.array([x0, y0]), np.array([x1, y1])],
                                     [int(mx), int(my)], cell_type=cell_type)
        return msh, None, (x0, x1, y0, y1)

    def _cell_to_lattice(self):
        """Lattice index (row-major) of the lattice cell containing each local cell's centre."""
        tdim = self.msh.topology.dim
        n_local = self.msh.topology.index_map(tdim).size_local
        n_cells = n_local + self.msh.topology.index_map(tdim).num_ghosts
        centres = dmesh.compute_midpoints(self.msh, tdim, np.arange(n_cells, dtype=np.int32))
        x0, x1, y0, y1 = self.bounds
        ny, nx = self.shape
        j = np.clip(np.floor((centres[:, 0] - x0) / (x1 - x0) * nx), 0, nx - 1).astype(np.int64)
        i = np.clip(np.floor((centres[:, 1] - y0) / (y1 - y0) * ny), 0, ny - 1).astype(np.int64)
        return i * nx + j

    def set_coefficient(self, k_lattice):
        """k on every FE cell from lattice values ``k_lattice`` (flat, length ny * nx)."""
        self.k.x.array[:] = k_lattice[self.cell_lattice]

    # -- boundary conditions and load ---------------------------------------------------
    def _boundary_facets(self, where):
        fdim = self.msh.topology.dim - 1
        if isinstance(where, (int, np.integer)) and not isinstance(where, bool):
            if self.facet_tags is None:
                raise ValueError(f"boundary tag {where} given but the mesh has no facet tags")
            return self.facet_tags.find(int(where))
        if where not in _SIDES:
            raise ValueError(f"unknown boundary {where!r} (allowed: {', '.join(_SIDES)} or a facet tag)")
        return dmesh.locate_entities_boundary(self.msh, fdim, _side_marker(where, self.bounds))

    def _dirichlet(self, dirichlet):
        fdim = self.msh.topology.dim - 1
        bcs = []
        for where, spec in dirichlet.items():
            dofs = fem.locate_dofs_topological(self.V, fdim, self._boundary_facets(where))
            bcs.append(fem.dirichletbc(_interpolate(self.V, spec), dofs))
        return bcs

    def _rhs(self, v, source, neumann):
        W = fem.FunctionSpace(self.msh, ("Lagrange", self.degree + 1))
        form = _interpolate(W, source) * v * ufl.dx
        if neumann:
            fdim = self.msh.topology.dim - 1
            facets, values = [], []
            for tag, (where, spec) in enumerate(neumann.items(), start=1):
                f = np.unique(self._boundary_facets(where))
                facets.append(f)
                values.append(np.full(f.size, tag, dtype=np.int32))
            facets, values = np.concatenate(facets), np.concatenate(values)
            order = np.argsort(facets)
            tags = dmesh.meshtags(self.msh, fdim, facets[order].astype(np.int32), values[order])
            ds = ufl.Measure("ds", domain=self.msh, subdomain_data=tags)
            for tag, spec in enumerate(neumann.values(), start=1):
                form += _interpolate(W, spec) * v * ds(tag)
        return form

    # -- observations -------------------------------------------------------------------
    def _observation_matrix(self, functions):
        """O (n_obs, n_local_dofs), sparse CSR, with y = O u: point evaluations, then integrals.

        A point's row holds the basis functions of its cell evaluated there (a few entries), on
        the lowest rank whose local cells hold it; an integral's row is dense over the owned
        dofs. Built in a fixed number of vectorised evaluations, so memory and time grow with
        the number of points, not with points x dofs.
        """
        n_dofs = self.V.dofmap.index_map.size_local + self.V.dofmap.index_map.num_ghosts
        probe = fem.Function(self.V)   # created collectively, before any rank-dependent branch
        rows, cols, vals = self._point_entries(probe)
        points = sp.csr_matrix((vals, (rows, cols)), shape=(len(self.obs_points), n_dofs))
        W = fem.FunctionSpace(self.msh, ("Lagrange", self.degree + 2))
        v = ufl.TestFunction(self.V)
        dense = []
        for spec in functions:
            vec = fem.assemble_vector(fem.form(_interpolate(W, spec) * v * ufl.dx))
            vec.scatter_reverse(_insert_add())
            row = vec.array.copy()
            row[self.V.dofmap.index_map.size_local:] = 0.0  # count owned dofs only
            dense.append(row)
        integrals = sp.csr_matrix(np.array(dense).reshape(-1, n_dofs))
        return sp.vstack([points, integrals], format="csr")

    def _point_entries(self, probe):
        """``(rows, cols, values)`` of the point evaluations owned by this rank.

        Evaluating the probe with one at dof j of a point's cell gives phi_j there. Cells that
        share no dof are evaluated together: the occupied cells are coloured greedily so that
        two cells of a colour share no dof, and each (colour, local dof) pair costs one
        evaluation of the probe at all of its points.
        """
        pts = self.obs_points
        p3 = np.column_stack([pts, np.zeros(len(pts))]) if len(pts) else np.zeros((0, 3))
        tree = geometry.BoundingBoxTree(self.msh, self.msh.topology.dim)
        colliding = geometry.compute_colliding_cells(
            self.msh, geometry.compute_collisions(tree, p3), p3)
        offsets, found = colliding.offsets, colliding.array
        here = offsets[1:] > offsets[:-1]
        owner = np.where(here, self.comm.rank, self.comm.size).astype(np.int64)
        self.comm.Allreduce(_in_place(), owner, op=_MPI_MIN())
        outside = np.flatnonzero(owner == self.comm.size)
        if outside.size:
            raise OutsideMesh(int(outside[0]), tuple(pts[outside[0]]))
        mine = np.flatnonzero(owner == self.comm.rank)
        cells = found[offsets[mine]].astype(np.int32)
        cell_dofs = self.V.dofmap.list.array.reshape(-1, self.V.dofmap.dof_layout.num_dofs)
        colours = _colour_cells(np.unique(cells), cell_dofs)
        rows, cols, vals = [], [], []
        for colour in np.unique(colours[cells]) if cells.size else []:
            sel = np.flatnonzero(colours[cells] == colour)
            dofs = cell_dofs[cells[sel]]
            for j in range(dofs.shape[1]):
                probe.x.array[:] = 0.0
                probe.x.array[dofs[:, j]] = 1.0
                rows.append(mine[sel])
                cols.append(dofs[:, j])
                vals.append(probe.eval(p3[mine[sel]], cells[sel]).ravel())
        if not rows:
            return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    @property
    def n_obs(self):
        return self.observation.shape[0]


def _colour_cells(cells, cell_dofs):
    """Greedy colours of ``cells`` (others get -1) such that two cells of a colour share no dof."""
    colour = -np.ones(cell_dofs.shape[0], dtype=np.int64)
    by_dof = {}
    for c in cells:
        for d in cell_dofs[c]:
            by_dof.setdefault(int(d), []).append(int(c))
    for c in cells:
        used = {colour[o] for d in cell_dofs[c] for o in by_dof[int(d)]}
        k = 0
        while k in used:
            k += 1
        colour[c] = k
    return colour


def _in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def _MPI_MIN():
    from mpi4py import MPI

    return MPI.MIN


def _MPI_MAX():
    from mpi4py import MPI

    return MPI.MAX


def _insert_add():
    from dolfinx import la

    return la.ScatterMode.add


@contextlib.contextmanager
def _quiet_jit():
    """Hide the compiler command lines that ffcx's JIT logs at INFO on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _log_coefficient_ok(m):
    """Samples whose exp(m) is finite and positive in double precision."""
    flat = m.reshape(m.shape[0], -1)
    return np.all(np.isfinite(flat), axis=1) & (np.abs(flat).max(axis=1) <= MAX_LOG_COEFFICIENT)


class FastSolver:
    """Serial solver with precomputed k -> A(k) values, fixed pattern and kept factorisations.

    Args:
        disc: a :class:`Discretisation` on a one-process communicator.
        backend: ``"auto"`` (the compiled interleaved Cholesky, PETSc's if it cannot be built),
            ``"interleaved"`` or ``"petsc"``.
        max_factor_bytes: memory for keeping the batch's factorisations until the adjoint solve;
            past it, the backward pass refactorises (same answers, more time).
    """

    def __init__(self, disc, *, backend="auto", max_factor_bytes=2 * 1024**3):
        if disc.comm.size != 1:
            raise ValueError("FastSolver needs a one-process communicator; use AssemblySolver")
        if backend not in ("auto", "interleaved", "petsc"):
            raise ValueError(f"unknown backend {backend!r} (allowed: auto, interleaved, petsc)")
        self.disc, self.max_factor_bytes = disc, max_factor_bytes
        self._matrix_map()
        self._reduce_to_free_dofs()
        self.backend = self._make_backend(backend)
        self.M_factor = self.backend.value_map(self.M_ff)
        self._slots, self._generation = [], 0
        self._failures = FailureLog(log)

    # -- set-up ------------------------------------------------------------------------
    def _lattice_colours(self):
        """Greedy colouring of lattice cells so that no two of one colour share a dof."""
        d = self.disc
        n_lat = d.shape[0] * d.shape[1]
        dofmap = d.V.dofmap.list.array.reshape(-1, d.V.dofmap.dof_layout.num_dofs)
        cells_lat = d.cell_lattice[: dofmap.shape[0]]
        pairs = sp.coo_matrix((np.ones(dofmap.size), (np.repeat(cells_lat, dofmap.shape[1]),
                                                        dofmap.ravel())),
                              shape=(n_lat, int(dofmap.max()) + 1))
        touch = (pairs.tocsr() > 0).astype(np.int8)
        adjacency = (touch @ touch.T).tolil()
        colour = -np.ones(n_lat, dtype=np.int64)
        for c in range(n_lat):
            used = {colour[o] for o in adjacency.rows[c] if o != c}
            colour[c] = next(k for k in range(n_lat) if k not in used)
        return colour, dofmap, cells_lat

    def _matrix_map(self):
        """Sparse M (nnz, n_lattice) with A(k).data = M @ k, by assembling per colour class."""
        d = self.disc
        colour, dofmap, cells_lat = self._lattice_colours()
        entries, lattice, values = [], [], []
        for c in range(colour.max() + 1):
            in_class = colour == c
            d.set_coefficient(in_class.astype(float))
            A = fem.assemble_matrix(d.a)
            A.finalize()
            owner = -np.ones(d.V.dofmap.index_map.size_local + d.V.dofmap.index_map.num_ghosts,
                             dtype=np.int64)
            mask = in_class[cells_lat]
            owner[dofmap[mask].ravel()] = np.repeat(cells_lat[mask], dofmap.shape[1])
            row_of = np.repeat(np.arange(A.indptr.size - 1), np.diff(A.indptr))
            hit = (owner[row_of] >= 0) & (A.data != 0.0)
            entries.append(np.flatnonzero(hit))
            lattice.append(owner[row_of[hit]])
            values.append(A.data[hit])
        n_lat = d.shape[0] * d.shape[1]
        self.indptr, self.indices = A.indptr.astype(np.int64), A.indices.astype(np.int64)
        self.rows = np.repeat(np.arange(self.indptr.size - 1), np.diff(self.indptr))
        self.M = sp.csr_matrix((np.concatenate(values), (np.concatenate(entries),
                                np.concatenate(lattice))), shape=(self.indices.size, n_lat))
        self.M_T = self.M.T.tocsr()
        d.set_coefficient(np.ones(n_lat))

    def _reduce_to_free_dofs(self):
        """Symmetric elimination of Dirichlet dofs: A_FF u_F = b_F - A_FD g_D."""
        d = self.disc
        n = self.indptr.size - 1
        g = np.zeros(n)
        fixed = np.zeros(n, dtype=bool)
        for bc in d.bcs:
            dofs, _ = bc.dof_indices()
            g[dofs] = bc.g.x.array[dofs]
            fixed[dofs] = True
        self.g, self.free = g, np.flatnonzero(~fixed)
        renumber = -np.ones(n, dtype=np.int64)
        renumber[self.free] = np.arange(self.free.size)
        rows, cols = self.rows, self.indices
        ff = (~fixed[rows]) & (~fixed[cols])
        fd = (~fixed[rows]) & fixed[cols]
        self.M_ff = self.M[np.flatnonzero(ff)]
        # lifting: (A_FD g)_i = sum_e M[e, :] k g[col_e] -> a sparse (n_free, n_lat) operator
        P = sp.csr_matrix((g[cols[fd]], (renumber[rows[fd]], np.arange(fd.sum()))),
                          shape=(self.free.size, int(fd.sum())))
        self.lift = (P @ self.M[np.flatnonzero(fd)]).tocsr()
        b = fem.assemble_vector(d.L)
        b.scatter_reverse(_insert_add())
        self.b_free = b.array[self.free].copy()
        ff_rows, ff_cols = renumber[rows[ff]], renumber[cols[ff]]
        counts = np.bincount(ff_rows, minlength=self.free.size)
        self.ff_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(PETSc.IntType)
        self.ff_indices = ff_cols.astype(PETSc.IntType)
        self.obs_free = d.observation[:, self.free].tocsr()
        self.obs_fixed = d.observation @ g

    def _make_backend(self, name):
        if name != "petsc":
            try:
                cholesky.kernels()
            except Exception as err:  # no compiler, no cffi, no writable cache: PETSc's instead
                if name == "interleaved":
                    raise
                log.warning("compiled Cholesky unavailable (%s); using PETSc's", err)
                return PetscCholesky(self.ff_indptr, self.ff_indices)
            coords = self.disc.V.tabulate_dof_coordinates()[self.free, : self.disc.msh.geometry.dim]
            return InterleavedCholesky(self.ff_indptr, self.ff_indices, coords)
        return PetscCholesky(self.ff_indptr, self.ff_indices)

    # -- factorisations ----------------------------------------------------------------
    def _chunks(self, num):
        """``(chunk, samples, lanes)`` covering ``range(num)`` in the backend's lane counts."""
        widest, start, chunk = max(self.backend.lanes), 0, 0
        while start < num:
            left = num - start
            lanes = widest if left >= widest else min(w for w in self.backend.lanes if w >= left)
            yield chunk, np.arange(start, min(start + lanes, num)), lanes
            start, chunk = start + lanes, chunk + 1

    @staticmethod
    def _lanes(k, samples, lanes):
        """Coefficients ``(n_lattice, lanes)`` of a chunk; unused lanes hold k = 1."""
        kc = np.ones((k.shape[1], lanes))
        kc[:, : samples.size] = k[samples].T
        return kc

    def _slot(self, index, lanes):
        """Factor storage for a chunk; past the memory budget slots are reused cyclically."""
        if index >= len(self._slots):
            held = sum(self.backend.slot_bytes(s) for s in self._slots)
            if self._slots and held >= self.max_factor_bytes:
                index %= len(self._slots)
            else:
                self._slots.append(self.backend.new_slot(lanes))
                index = len(self._slots) - 1
        if self._slots[index]["lanes"] != lanes:
            self._slots[index] = self.backend.new_slot(lanes)
        return self._slots[index]

    def _factorised(self, chunk, kc, tag):
        """The chunk's slot holding the factors of A(kc[:, b]), refactorised unless tagged."""
        slot = self._slot(chunk, kc.shape[1])
        if slot["tag"] != tag:
            slot["tag"] = None
            slot["failed"] = self.backend.factorise(slot, self.M_factor @ kc)
            slot["tag"] = tag
        return slot

    # -- solves ------------------------------------------------------------------------
    def solve_batch(self, m):
        """Solve for a batch ``m (num, ny, nx)``; returns ``(y (num, n_obs), state)``."""
        num = m.shape[0]
        self._generation += 1
        k = np.exp(np.clip(m.reshape(num, -1), -MAX_LOG_COEFFICIENT, MAX_LOG_COEFFICIENT))
        ok = _log_coefficient_ok(m)
        k_safe = np.where(ok[:, None], k, 1.0)
        u_free = np.empty((num, self.free.size))
        for chunk, samples, lanes in self._chunks(num):
            kc = self._lanes(k_safe, samples, lanes)
            slot = self._factorised(chunk, kc, (self._generation, chunk))
            u = self.backend.solve(slot, self.b_free[:, None] - self.lift @ kc)[:, : samples.size]
            u[:, slot["failed"][: samples.size]] = np.nan
            u_free[samples] = u.T
        u_free[~ok | ~np.all(np.isfinite(u_free), axis=1)] = np.nan
        y = (self.obs_free @ u_free.T).T + self.obs_fixed
        failed = np.flatnonzero(~np.all(np.isfinite(y), axis=1))
        broken = np.intersect1d(failed, np.flatnonzero(ok)).size
        if broken:
            self._failures("%d of %d samples of a batch: the Cholesky factorisation or the "
                           "solve failed (their target is -inf)", broken, num)
        return y, {"k": k, "u": u_free, "generation": self._generation, "failed": failed}

    def full_solution(self, state, s):
        """Dof vector of u (Dirichlet values included) for sample ``s`` of a solved batch."""
        u = self.g.copy()
        u[self.free] = state["u"][s]
        return u

    def vjp_batch(self, state, w):
        """w^T dF/dm per sample: one adjoint solve with the kept (or redone) factorisation,
        then dF/dk_c^T w = -lambda^T A_c u contracted for all lattice cells at once."""
        k, u_free = state["k"], state["u"]
        usable = np.all(np.isfinite(u_free), axis=1) & np.any(w != 0, axis=1)
        k_safe = np.where(np.all(np.isfinite(u_free), axis=1)[:, None], k, 1.0)
        grad = np.zeros_like(k)
        for chunk, samples, lanes in self._chunks(k.shape[0]):
            if not usable[samples].any():
                continue
            kc = self._lanes(k_safe, samples, lanes)
            slot = self._factorised(chunk, kc, (state["generation"], chunk))
            wc = np.zeros((self.obs_free.shape[0], lanes))
            wc[:, : samples.size] = np.where(usable[samples, None], w[samples], 0.0).T
            lam = np.zeros((self.g.size, lanes))
            lam[self.free] = self.backend.solve(slot, self.obs_free.T @ wc)
            u = np.repeat(self.g[:, None], lanes, axis=1)
            u[self.free, : samples.size] = np.where(usable[samples, None], u_free[samples], 0.0).T
            # a nearly singular A (a proposal far out) overflows: its gradient is not finite,
            # and the samplers reject the trajectory, so numpy need not warn of it
            with np.errstate(over="ignore", invalid="ignore"):
                contraction = self.M_T @ (lam[self.rows] * u[self.indices])
                grad[samples] = -(kc * contraction)[:, : samples.size].T
        grad[~usable] = 0.0
        return grad.reshape(k.shape[0], *self.disc.shape)

    def jvp_batch(self, state, v):
        """dF/dm v per sample (the tangent-linear model): A du = -dA[k v] u with the kept (or
        redone) factorisation, du = 0 on Dirichlet dofs, then dF = O du.

        Args:
            state: of :meth:`solve_batch`; v: directions ``(num, ny, nx)``.

        Returns:
            ``(num, n_obs)``; NaN rows for failed samples.
        """
        k, u_free = state["k"], state["u"]
        num = k.shape[0]
        v = np.asarray(v, dtype=float).reshape(num, -1)
        ok = np.all(np.isfinite(u_free), axis=1)
        k_safe = np.where(ok[:, None], k, 1.0)
        du = np.zeros((num, self.free.size))
        for chunk, samples, lanes in self._chunks(num):
            kc = self._lanes(k_safe, samples, lanes)
            slot = self._factorised(chunk, kc, (state["generation"], chunk))
            u = np.repeat(self.g[:, None], lanes, axis=1)
            u[self.free, : samples.size] = np.where(ok[samples, None], u_free[samples], 0.0).T
            dk = np.zeros((k.shape[1], lanes))
            dk[:, : samples.size] = (np.where(ok[samples, None], v[samples], 0.0) * kc[:, : samples.size].T).T
            values = self.M @ dk                                    # dA's entries, per lane
            rhs = np.stack([sp.csr_matrix((values[:, b], self.indices, self.indptr),
                                          shape=(self.g.size, self.g.size)) @ u[:, b]
                            for b in range(lanes)], axis=1)
            du[samples] = self.backend.solve(slot, -rhs[self.free])[:, : samples.size].T
        dy = (self.obs_free @ du.T).T
        dy[~ok] = np.nan
        return dy

    def jacobian_batch(self, state):
        """dF/dm per sample, ``(num, n_obs, ny, nx)``: one adjoint back-substitution per
        observation with the kept (or redone) factorisation, contracted for all at once."""
        k, u_free = state["k"], state["u"]
        num, n_obs = k.shape[0], self.obs_free.shape[0]
        ok = np.all(np.isfinite(u_free), axis=1)
        k_safe = np.where(ok[:, None], k, 1.0)
        out = np.zeros((num, n_obs, k.shape[1]))
        obs = self.obs_free.toarray()
        for chunk, samples, lanes in self._chunks(num):
            kc = self._lanes(k_safe, samples, lanes)
            slot = self._factorised(chunk, kc, (state["generation"], chunk))
            u = np.repeat(self.g[:, None], lanes, axis=1)
            u[self.free, : samples.size] = np.where(ok[samples, None], u_free[samples], 0.0).T
            lam = np.zeros((self.g.size, n_obs, lanes))
            for j in range(n_obs):
                lam[self.free, j] = self.backend.solve(slot, np.repeat(obs[j][:, None], lanes, 1))
            with np.errstate(over="ignore", invalid="ignore"):
                con = self.M_T @ (lam[self.rows] * u[self.indices][:, None]).reshape(
                    self.rows.size, -1)
            jac = -(con.reshape(-1, n_obs, lanes) * kc[:, None])      # (n_lat, n_obs, lanes)
            out[samples] = jac[:, :, : samples.size].transpose(2, 1, 0)
        out[~ok] = np.nan
        return out.reshape(num, n_obs, *self.disc.shape)

    def _entries(self, values, vectors):
        """``A(values[:, b]) @ vectors[:, b]`` per lane, for A's entries ``values (nnz, lanes)``:
        the entries' products summed into their rows."""
        if not hasattr(self, "_row_sum"):
            nnz = self.indices.size
            self._row_sum = sp.csr_matrix((np.ones(nnz), (self.rows, np.arange(nnz))),
                                          shape=(self.g.size, nnz))
        return self._row_sum @ (values * vectors[self.indices])

    def trace_gradient_batch(self, state, weights, directions):
        r"""The gradient in m of sum_i a_i^T J(m) b_i per sample, with the weights a_i and the
        directions b_i fixed (J = dF/dm): second-order adjoints.

        Each term is a_i^T O du_i with A u = b and A du_i = -dA[k b_i] u, so it equals
        -lambda_i^T dA[k b_i] u with A lambda_i = O^T a_i. With A mu = sum_i dA[k b_i] lambda_i and
        c(x, y)_j = x^T A_j y the contraction with cell j's matrix (A = sum_j k_j A_j,
        dk_j/dm_j = k_j), the gradient is

            -k (.) sum_i [c(lambda_i, du_i) + b_i (.) c(lambda_i, u)] + k (.) c(mu, u).

        For a matrix V = sum_i a_i b_i^T of rank r this is the gradient of tr(V^T J) (e.g. of
        1/2 log det(I + J J^T), by r = min(n_obs, parameters) terms). Every solve reuses the
        batch's factorisation: 2 r + 1 back-substitutions a sample, no new factorisation.

        Args:
            state: of :meth:`solve_batch`; weights: ``(num, r, n_obs)``;
            directions: ``(num, r, ny, nx)``.

        Returns:
            ``(num, ny, nx)``; NaN for failed samples.
        """
        k, u_free = state["k"], state["u"]
        num = k.shape[0]
        weights = np.asarray(weights, dtype=float)
        directions = np.asarray(directions, dtype=float).reshape(num, weights.shape[1], -1)
        ok = np.all(np.isfinite(u_free), axis=1)
        k_safe = np.where(ok[:, None], k, 1.0)
        out = np.zeros_like(k)
        for chunk, samples, lanes in self._chunks(num):
            kc = self._lanes(k_safe, samples, lanes)
            slot = self._factorised(chunk, kc, (state["generation"], chunk))
            u = np.repeat(self.g[:, None], lanes, axis=1)
            u[self.free, : samples.size] = np.where(ok[samples, None], u_free[samples], 0.0).T
            grad = np.zeros_like(kc)
            b_lam = np.zeros((self.g.size, lanes))
            terms = weights.shape[1]
            group = max(1, min(terms, int(4e6 // (self.indices.size * lanes))))
            with np.errstate(over="ignore", invalid="ignore"):
                for start in range(0, terms, group):
                    idx = np.arange(start, min(start + group, terms))
                    g = idx.size                    # the group's terms side by side: (., g * lanes)
                    a = np.zeros((g, self.obs_free.shape[0], lanes))
                    a[:, :, : samples.size] = np.where(ok[samples, None, None],
                                                       weights[samples][:, idx], 0.0).transpose(1, 2, 0)
                    bk = np.zeros((g, k.shape[1], lanes))
                    bk[:, :, : samples.size] = np.where(ok[samples, None, None],
                                                        directions[samples][:, idx],
                                                        0.0).transpose(1, 2, 0)
                    lam = np.zeros((g, self.g.size, lanes))
                    for t in range(g):
                        lam[t, self.free] = self.backend.solve(slot, self.obs_free.T @ a[t])
                    values = self.M @ (bk * kc).transpose(1, 0, 2).reshape(k.shape[1], -1)
                    lam_wide = lam.transpose(1, 0, 2).reshape(self.g.size, -1)
                    u_wide = np.tile(u, (1, g))
                    rhs = -self._entries(values, u_wide)[self.free].reshape(-1, g, lanes)
                    du = np.zeros((g, self.g.size, lanes))
                    for t in range(g):
                        du[t, self.free] = self.backend.solve(slot, rhs[:, t])
                    du_wide = du.transpose(1, 0, 2).reshape(self.g.size, -1)
                    b_lam += self._entries(values, lam_wide).reshape(-1, g, lanes).sum(1)
                    both = (self.M_T @ (lam_wide[self.rows] * du_wide[self.indices])
                            + bk.transpose(1, 0, 2).reshape(k.shape[1], -1)
                            * (self.M_T @ (lam_wide[self.rows] * u_wide[self.indices])))
                    grad -= both.reshape(-1, g, lanes).sum(1)
                mu = np.zeros((self.g.size, lanes))
                mu[self.free] = self.backend.solve(slot, b_lam[self.free])
                grad += self.M_T @ (mu[self.rows] * u[self.indices])
                out[samples] = (kc * grad)[:, : samples.size].T
        out[~ok] = np.nan
        return out.reshape(num, *self.disc.shape)


class AssemblySolver:
    """Per-sample dolfinx assembly and PETSc solve; works on distributed meshes.

    Args:
        disc: a :class:`Discretisation` on any communicator.
        method: ``"lu"`` (direct; MUMPS in parallel) or ``"cg"`` (CG + GAMG, for large meshes).
        rtol: relative tolerance of CG.
    """

    def __init__(self, disc, *, method="lu", rtol=1e-12):
        self.disc, self.method, self.rtol = disc, method, rtol
        self._failures = FailureLog(log)
        self.lam = fem.Function(disc.V)
        self.u = fem.Function(disc.V)
        v = ufl.TestFunction(disc.Q)
        grad_form = -disc.k * ufl.inner(ufl.grad(self.u), ufl.grad(self.lam)) * v * ufl.dx
        self.grad_form = fem.form(grad_form)
        self.dk, self.du = fem.Function(disc.Q), fem.Function(disc.V)
        test = ufl.TestFunction(disc.V)
        self.tangent_form = fem.form(-self.dk * disc.k * ufl.inner(ufl.grad(self.u),
                                                                   ufl.grad(test)) * ufl.dx)

    def _ksp(self, A):
        ksp = PETSc.KSP().create(self.disc.comm)
        ksp.setOperators(A)
        if self.method == "cg":
            ksp.setType("cg")
            ksp.getPC().setType("gamg")
            ksp.setTolerances(rtol=self.rtol, atol=0.0, max_it=2000)
        else:
            ksp.setType("preonly")
            ksp.getPC().setType("lu")
            if self.disc.comm.size > 1:
                ksp.getPC().setFactorSolverType("mumps")
        return ksp

    def _forward_one(self, k):
        from dolfinx.fem.petsc import apply_lifting, assemble_matrix, assemble_vector, set_bc

        d = self.disc
        d.set_coefficient(k)
        A = assemble_matrix(d.a, bcs=d.bcs)
        A.assemble()
        b = assemble_vector(d.L)
        apply_lifting(b, [d.a], bcs=[d.bcs])
        b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        set_bc(b, d.bcs)
        ksp = self._ksp(A)
        ksp.solve(b, self.u.vector)
        self.u.x.scatter_forward()
        if ksp.getConvergedReason() < 0:
            raise PETSc.Error(ksp.getConvergedReason())
        return A, ksp

    def _observe(self):
        """O u summed over ranks (point rows may use ghost dofs; integral rows owned dofs only)."""
        return self.disc.comm.allreduce(self.disc.observation @ self.u.x.array)

    def solve_batch(self, m):
        """Solve for a batch ``m (num, ny, nx)``; returns ``(y (num, n_obs), state)``."""
        num = m.shape[0]
        ok = _log_coefficient_ok(m)
        k = np.exp(np.clip(m.reshape(num, -1), -MAX_LOG_COEFFICIENT, MAX_LOG_COEFFICIENT))
        y = np.full((num, self.disc.n_obs), np.nan)
        u = np.full((num, self.u.x.array.size), np.nan)
        for s in np.flatnonzero(ok):
            y[s] = self._try_forward(k[s])
            u[s] = self.u.x.array
        failed = np.flatnonzero(~np.all(np.isfinite(y), axis=1))
        return y, {"k": k, "u": u, "failed": failed}

    def full_solution(self, state, s):
        """Local dof vector of u for sample ``s`` of a solved batch."""
        return state["u"][s]

    def _try_forward(self, k):
        try:
            A, ksp = self._forward_one(k)
            ksp.destroy(), A.destroy()
        except PETSc.Error as err:
            self._failures("PETSc solve failed (%s)", err)
            return np.nan
        ok = self.disc.comm.allreduce(bool(np.all(np.isfinite(self.u.x.array))), op=_MPI_MIN())
        return self._observe() if ok else np.nan

    def _adjoint_gradient(self, A, ksp, w):
        """dF/dm^T w for the forward solution held in ``self.u``: one adjoint solve with A."""
        from dolfinx.fem.petsc import assemble_vector

        n_owned = self.disc.V.dofmap.index_map.size_local
        self.lam.x.array[:] = self.disc.observation.T @ w
        self.lam.x.scatter_reverse(_insert_add())   # ghost contributions to their owners
        rhs = A.createVecLeft()
        rhs.getArray()[:] = self.lam.x.array[:n_owned]
        for bc in self.disc.bcs:
            dofs, n = bc.dof_indices()
            rhs.getArray()[dofs[:n][dofs[:n] < n_owned]] = 0.0
        ksp.solve(rhs, self.lam.vector)
        self.lam.x.scatter_forward()
        rhs.destroy()
        return self._cells_to_lattice(assemble_vector(self.grad_form).array)

    def vjp_batch(self, state, w):
        """w^T dF/dm per sample: re-solve the forward problem, then one adjoint solve."""
        k = state["k"]
        grad = np.zeros_like(k)
        for s in range(k.shape[0]):
            if s in state["failed"] or not np.any(w[s]):
                continue
            A, ksp = self._forward_one(k[s])
            grad[s] = self._adjoint_gradient(A, ksp, w[s])
            ksp.destroy(), A.destroy()
        return grad.reshape(k.shape[0], *self.disc.shape)

    def jvp_batch(self, state, v):
        """dF/dm v per sample: re-solve the forward problem, assemble -dA[k v] u and solve
        with A (zero on Dirichlet dofs); NaN rows for failed samples."""
        from dolfinx.fem.petsc import assemble_vector, set_bc

        k = state["k"]
        v = np.asarray(v, dtype=float).reshape(k.shape[0], -1)
        dy = np.full((k.shape[0], self.disc.n_obs), np.nan)
        for s in range(k.shape[0]):
            if s in state["failed"]:
                continue
            A, ksp = self._forward_one(k[s])
            self.dk.x.array[:] = v[s][self.disc.cell_lattice]
            rhs = assemble_vector(self.tangent_form)
            rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            set_bc(rhs, self.disc.bcs, scale=0.0)
            ksp.solve(rhs, self.du.vector)
            self.du.x.scatter_forward()
            dy[s] = self.disc.comm.allreduce(self.disc.observation @ self.du.x.array)
            rhs.destroy(), ksp.destroy(), A.destroy()
        return dy

    def value_and_vjp(self, m, w):
        """The naive loop: per sample assemble, factorise, solve, adjoint-solve, assemble dF^T w.

        Args:
            m: ``(num, ny, nx)`` fields; w: ``(num, n_obs)`` cotangents.

        Returns:
            ``(y (num, n_obs), grad (num, ny, nx))``.
        """
        num = m.shape[0]
        k = np.exp(m.reshape(num, -1))
        y, grad = np.empty((num, self.disc.n_obs)), np.empty_like(k)
        for s in range(num):
            A, ksp = self._forward_one(k[s])
            y[s] = self._observe()
            grad[s] = self._adjoint_gradient(A, ksp, w[s])
            ksp.destroy(), A.destroy()
        return y, grad.reshape(m.shape)

    def _cells_to_lattice(self, cell_values):
        d = self.disc
        n_owned = d.msh.topology.index_map(d.msh.topology.dim).size_local
        local = np.bincount(d.cell_lattice[:n_owned], weights=cell_values[:n_owned],
                            minlength=d.shape[0] * d.shape[1])
        return d.comm.allreduce(local)


class EllipticForward:
    """F(m): lattice log-coefficient -> observations of u solving -div(exp(m) grad u) = f.

    Args:
        comm: MPI communicator for the mesh (``MPI.COMM_SELF`` for ensemble parallelism).
        shape: ``(ny, nx)`` lattice of the parameter.
        bounds: ``(x0, x1, y0, y1)``.
        mesh_cells: ``(mx, my)`` structured FE mesh; default the lattice itself.
        mesh: path of an XDMF mesh instead of the structured one.
        cell: ``"quadrilateral"`` or ``"triangle"``.
        degree: Lagrange degree 1 or 2.
        source: spec of f (number, expression, shape; see :mod:`geoinvert.expressions`).
        dirichlet: ``{boundary: spec}`` for u = g; boundaries ``left``, ``right``, ``bottom``,
            ``top``, ``all`` or a facet tag of a read mesh.
        neumann: ``{boundary: spec}`` for exp(m) du/dn = h; other boundaries are insulated.
        points: ``(k, 2)`` coordinates where u is observed.
        functions: specs of measurement functions phi_k, observed as int phi_k u dx.
        solver: ``"auto"`` (fast serial solver on one process, assembly otherwise), ``"fast"``,
            ``"lu"`` or ``"cg"`` (per-sample assembly with LU or CG + GAMG).

    Calling the model on a tensor ``(num, ny, nx)`` returns ``(num, n_obs)`` and is differentiable
    with exact discrete adjoint gradients. A failed sample (|m| > 700 or a failed solve) gives a
    row of NaN, is listed in ``last_failures``, and leaves the rest of the batch intact.
    """

    def __init__(self, comm, shape, *, solver="auto", **options):
        with _quiet_jit():
            self.disc = Discretisation(comm, shape, **options)
            if self.disc.n_obs == 0:
                raise ValueError("no observations: give points and/or measurement functions")
            if solver == "auto":
                solver = "fast" if comm.size == 1 else "lu"
            self.solver = (FastSolver(self.disc) if solver == "fast"
                           else AssemblySolver(self.disc, method=solver))
        self.shape, self.n_obs, self.n_solves = self.disc.shape, self.disc.n_obs, 0
        self.last_failures = np.zeros(0, dtype=int)

    def solve_batch(self, m):
        """Numpy forward solve of ``m (num, ny, nx)``: ``(y (num, n_obs), state)``."""
        m = np.asarray(m, dtype=float)
        if m.shape[1:] != self.shape:
            raise ValueError(f"expected fields of shape (num, {self.shape[0]}, {self.shape[1]}), got {m.shape}")
        y, state = self.solver.solve_batch(m)
        self.n_solves += m.shape[0]
        self.last_failures = state["failed"]
        if state["failed"].size:
            # expected now and then (a sampler's proposal far out); callers count and report them
            log.info("%d of %d forward solves failed", state["failed"].size, m.shape[0])
        return y, state

    def vjp_batch(self, state, w):
        """``w^T dF/dm`` for the batch solved into ``state``: ``(num, ny, nx)``."""
        return self.solver.vjp_batch(state, w)

    def jvp_batch(self, state, v):
        """``dF/dm v`` for the batch solved into ``state`` and directions ``v (num, ny, nx)``:
        ``(num, n_obs)``, one tangent-linear solve each."""
        return self.solver.jvp_batch(state, v)

    def jacobian_batch(self, state):
        """dF/dm ``(num, n_obs, ny, nx)`` for the batch solved into ``state``, by one adjoint
        solve per observation; serial solver only."""
        if not hasattr(self.solver, "jacobian_batch"):
            raise NotImplementedError("the full Jacobian needs the serial solver")
        return self.solver.jacobian_batch(state)

    def trace_gradient_batch(self, state, weights, directions):
        """``d/dm sum_i a_i^T (dF/dm) b_i`` (a_i, b_i fixed) for the batch solved into ``state``,
        weights ``a (num, r, n_obs)`` and directions ``b (num, r, ny, nx)``: ``(num, ny, nx)``
        by second-order adjoints (:meth:`FastSolver.trace_gradient_batch`); serial solver
        only."""
        if not hasattr(self.solver, "trace_gradient_batch"):
            raise NotImplementedError("second-order adjoints need the serial solver")
        return self.solver.trace_gradient_batch(state, weights, directions)

    def __call__(self, x):
        """Differentiable ``F(x)`` for a tensor ``(num, ny, nx)`` or ``(ny, nx)``."""
        return apply_adjoint_model(self, x)

    def solution(self, m):
        """The FE solution u (a dolfinx Function on this process) for one field ``m (ny, nx)``."""
        _, state = self.solver.solve_batch(np.asarray(m, dtype=float)[None])
        if state["failed"].size:
            raise RuntimeError("the forward solve failed for this field")
        u = fem.Function(self.disc.V)
        u.x.array[:] = self.solver.full_solution(state, 0)
        return u
