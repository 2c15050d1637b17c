"""Verification of the dolfinx elliptic forward model and its adjoint gradients."""

import logging

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, geometry
from mpi4py import MPI

from geoinvert.problem.forward.elliptic import EllipticForward
from geoinvert.verify import taylor_test

SELF = MPI.COMM_SELF
OPTIONS = dict(
    source="exp(-((x-0.3)^2 + (y-0.6)^2) / 0.02)",
    dirichlet={"left": 0.0, "right": "y"},
    neumann={"top": 0.5},
    points=[[0.25, 0.25], [0.7, 0.4], [0.5, 0.9]],
    functions=[{"shape": "gaussian", "center": [0.6, 0.6], "width": 0.1}],
)


def _field(seed, shape=(8, 8), num=3, scale=0.5):
    return torch.tensor(np.random.default_rng(seed).normal(size=(num, *shape)) * scale)


def _l2_error(u, exact):
    msh = u.function_space.mesh
    x = ufl.SpatialCoordinate(msh)
    err = fem.form((u - exact(x)) ** 2 * ufl.dx)
    return np.sqrt(msh.comm.allreduce(fem.assemble_scalar(err), op=MPI.SUM))


@pytest.mark.parametrize("degree, cell, rate", [
    (1, "quadrilateral", 2.0), (1, "triangle", 2.0), (2, "quadrilateral", 3.0), (2, "triangle", 3.0),
])
def test_manufactured_solution_converges(degree, cell, rate):
    """u = sin(pi x) cos(pi y / 2) + x y with k = 2.5: f = -k lap u, Dirichlet + Neumann data."""
    k = 2.5
    exact_ufl = lambda x: ufl.sin(np.pi * x[0]) * ufl.cos(np.pi * x[1] / 2) + x[0] * x[1]
    source = f"{k} * (pi^2 + pi^2/4) * sin(pi*x) * cos(pi*y/2)"
    flux_top = f"{k} * (-pi/2 * sin(pi*x) * sin(pi/2) + x)"   # k du/dy at y = 1
    dirichlet = {side: "sin(pi*x) * cos(pi*y/2) + x*y" for side in ("left", "right", "bottom")}
    errors, sizes = [], [4, 8, 16]
    for n in sizes:
        model = EllipticForward(SELF, (2, 2), mesh_cells=(n, n), cell=cell, degree=degree,
                                source=source, dirichlet=dirichlet, neumann={"top": flux_top},
                                points=[[0.5, 0.5]])
        u = model.solution(np.full((2, 2), np.log(k)))
        errors.append(_l2_error(u, exact_ufl))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert rates[-1] == pytest.approx(rate, abs=0.15), (errors, rates)


def test_one_dimensional_layered_problem_is_exact():
    """k varies with y only, u = 0 at the bottom, 1 at the top, insulated sides, f = 0:
    u(y) = int_0^y dt/k / int_0^1 dt/k, piecewise linear, reproduced exactly by Q1 on the rows."""
    ny = 8
    m_rows = np.random.default_rng(3).normal(size=ny)
    m = np.repeat(m_rows[:, None], 4, axis=1)
    ys = np.array([0.03, 0.31, 0.5, 0.77, 0.99])
    model = EllipticForward(SELF, (ny, 4), mesh_cells=(8, 2 * ny), source=0.0,
                            dirichlet={"bottom": 0.0, "top": 1.0},
                            points=np.column_stack([np.full(ys.size, 0.4), ys]))
    edges = np.linspace(0, 1, ny + 1)
    resist = np.concatenate([[0.0], np.cumsum(np.diff(edges) / np.exp(m_rows))])
    expected = np.interp(ys, edges, resist) / resist[-1]
    y = model(torch.tensor(m)[None]).numpy()[0]
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("cell", ["quadrilateral", "triangle"])
def test_fast_solver_matches_assembly(cell, degree):
    """Two discretely identical solvers (precomputed values vs per-sample assembly) agree."""
    kwargs = dict(mesh_cells=(16, 16), cell=cell, degree=degree, **OPTIONS)
    fast = EllipticForward(SELF, (8, 8), solver="fast", **kwargs)
    slow = EllipticForward(SELF, (8, 8), solver="lu", **kwargs)
    m = _field(0).requires_grad_(True)
    w = torch.tensor(np.random.default_rng(1).normal(size=(3, fast.n_obs)))
    grads = []
    for model in (fast, slow):
        (model(m) * w).sum().backward()
        grads.append(m.grad.clone())
        m.grad = None
    with torch.no_grad():
        np.testing.assert_allclose(fast(m), slow(m), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12 * float(grads[1].abs().max()))


@pytest.mark.parametrize("solver", ["fast", "lu"])
def test_taylor_test_of_adjoint_gradient(solver):
    model = EllipticForward(SELF, (8, 8), mesh_cells=(16, 16), solver=solver, **OPTIONS)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    result = taylor_test(lambda x: (model(x) * w).sum(), _field(2, num=1)[0],
                         generator=torch.Generator().manual_seed(0))
    assert np.all(np.abs(result.first_rates - 1.0) < 0.1), result.first_rates
    assert np.all(np.abs(result.second_rates - 2.0) < 0.1), result.second_rates


@pytest.mark.parametrize("cell, degree", [("quadrilateral", 1), ("triangle", 2)])
def test_second_order_adjoint_is_the_gradient_of_the_jacobian_contraction(cell, degree):
    """sum_i a_i^T J(m) b_i (J by adjoint solves) against its gradient by second-order
    adjoints: central differences converge at rate 2 to it, with Dirichlet, Neumann, point and
    integral observations and several samples in one batch."""
    model = EllipticForward(SELF, (8, 8), mesh_cells=(16, 16), cell=cell, degree=degree,
                            **OPTIONS)
    rng = np.random.default_rng(3)
    num, r = 3, 5
    a = rng.normal(size=(num, r, model.n_obs))
    b = rng.normal(size=(num, r, 8, 8))
    m, dm = _field(5, num=num).numpy(), rng.normal(size=(num, 8, 8))

    def contraction(m):
        _, state = model.solve_batch(m)
        rows = [model.vjp_batch(state, np.eye(model.n_obs)[[k] * num])
                for k in range(model.n_obs)]
        jac = np.stack(rows, axis=1).reshape(num, model.n_obs, -1)
        return np.einsum("nro,nol,nrl->n", a, jac, b.reshape(num, r, -1))

    _, state = model.solve_batch(m)
    slope = (model.trace_gradient_batch(state, a, b) * dm).sum((1, 2))
    errors = [np.abs((contraction(m + h * dm) - contraction(m - h * dm)) / (2 * h) - slope)
              for h in (1e-2, 5e-3)]
    assert np.all(np.log2(errors[0] / errors[1]) == pytest.approx(2.0, abs=0.15))
    assert np.all(errors[1] < 1e-3 * np.abs(slope))


def test_jacobian_rows_are_the_adjoint_gradients():
    model = EllipticForward(SELF, (8, 8), mesh_cells=(16, 16), **OPTIONS)
    m = _field(6, num=3).numpy()
    _, state = model.solve_batch(m)
    rows = [model.vjp_batch(state, np.eye(model.n_obs)[[k] * 3]) for k in range(model.n_obs)]
    np.testing.assert_allclose(model.jacobian_batch(state), np.stack(rows, axis=1),
                               rtol=1e-12, atol=1e-14)


def test_second_order_adjoints_need_the_serial_solver():
    model = EllipticForward(SELF, (4, 4), mesh_cells=(8, 8), solver="lu", **OPTIONS)
    _, state = model.solve_batch(np.zeros((1, 4, 4)))
    with pytest.raises(NotImplementedError, match="serial solver"):
        model.trace_gradient_batch(state, np.ones((1, 1, model.n_obs)), np.ones((1, 1, 4, 4)))
    with pytest.raises(NotImplementedError, match="serial solver"):
        model.jacobian_batch(state)


def test_gradient_matches_finite_differences_per_cell():
    model = EllipticForward(SELF, (4, 4), mesh_cells=(8, 8), **OPTIONS)
    m = _field(4, shape=(4, 4), num=1)[0].requires_grad_(True)
    model(m)[1].backward()
    fd = np.zeros((4, 4))
    h = 1e-6
    with torch.no_grad():
        for i, j in np.ndindex(4, 4):
            e = torch.zeros(4, 4, dtype=torch.float64)
            e[i, j] = h
            fd[i, j] = float(model(m + e)[1] - model(m - e)[1]) / (2 * h)
    np.testing.assert_allclose(m.grad.numpy(), fd, rtol=1e-6, atol=1e-9)


def test_failed_samples_are_flagged_and_do_not_spoil_the_batch():
    model = EllipticForward(SELF, (4, 4), **OPTIONS)
    m = _field(5, shape=(4, 4), num=4)
    m[1, 0, 0] = 800.0       # exp overflows
    m[2, 3, 3] = float("nan")
    m.requires_grad_(True)
    y = model(m)
    assert list(model.last_failures) == [1, 2]
    assert torch.isnan(y[[1, 2]]).all() and torch.isfinite(y[[0, 3]]).all()
    torch.where(torch.isfinite(y), y, 0.0).sum().backward()
    assert torch.isfinite(m.grad).all() and (m.grad[[1, 2]] == 0).all()
    reference = model(m.detach()[[0, 3]])
    np.testing.assert_allclose(y.detach()[[0, 3]], reference, rtol=1e-12)


@pytest.mark.parametrize("solver", ["fast", "lu"])
def test_repeated_failed_solves_log_a_few_warnings_then_stop(solver, caplog):
    """A sampler's rejected proposals may fail by the thousand; a script's logging gets a few
    warnings and one line saying the rest go unlogged, whichever solver failed."""
    model = EllipticForward(SELF, (4, 4), solver=solver, **OPTIONS)
    m = np.zeros((5, 4, 4))     # finite exp(m) whose matrices cannot be factorised (which of
    m[0, ::2], m[0, 1::2] = 340.0, -340.0             # them fail depends on the solver), and 0
    m[1, 0, 0], m[1, 1, 1], m[1, 2, 2] = 690.0, -690.0, 690.0
    m[2] = np.where(np.indices((4, 4)).sum(0) % 2, 690.0, -690.0)
    m[3, :, :2], m[3, :, 2:] = 699.0, -699.0
    with caplog.at_level("DEBUG", logger="geoinvert.problem.forward.elliptic"):
        for _ in range(10):
            y, state = model.solve_batch(m)
            assert state["failed"].size and np.isfinite(y[4]).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4 and "not logged" in warnings[-1]
    assert sum(r.levelname == "DEBUG" for r in caplog.records) >= 10 - 3


def test_failed_solves_a_caller_counts_are_logged_at_debug_only(caplog):
    """Within ``failures.counted()`` (a run, whose summary reports the total) failed solves
    leave no warning; outside it again, a script's logging gets its few warnings."""
    from geoinvert.problem.forward import failures
    model = EllipticForward(SELF, (4, 4), solver="fast", **OPTIONS)
    m = np.zeros((5, 4, 4))     # as in the test above: fields the factorisation fails on
    m[0, ::2], m[0, 1::2] = 340.0, -340.0
    m[1, 0, 0], m[1, 1, 1], m[1, 2, 2] = 690.0, -690.0, 690.0
    m[2] = np.where(np.indices((4, 4)).sum(0) % 2, 690.0, -690.0)
    m[3, :, :2], m[3, :, 2:] = 699.0, -699.0
    with caplog.at_level("DEBUG", logger="geoinvert.problem.forward"):
        with failures.counted(), failures.counted():
            for _ in range(5):
                assert model.solve_batch(m)[1]["failed"].size
        with failures.counted():
            model.solve_batch(m)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert sum(r.levelname == "DEBUG" and "factorisation" in r.getMessage()
                   for r in caplog.records) == 6
        model.solve_batch(m)
    assert [r.levelname for r in caplog.records].count("WARNING") == 1


def test_solve_counter_and_shapes():
    model = EllipticForward(SELF, (4, 4), **OPTIONS)
    assert model(_field(6, shape=(4, 4), num=5)).shape == (5, 4)
    assert model(_field(6, shape=(4, 4), num=1)[0]).shape == (4,)
    assert model.n_solves == 6
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("cell, degree", [("quadrilateral", 1), ("triangle", 1),
                                          ("quadrilateral", 2), ("triangle", 2)])
def test_point_observations_are_the_solution_evaluated_at_the_points(cell, degree):
    """The sparse observation rows reproduce dolfinx's own evaluation of u at the points, for
    many points sharing cells, on vertices and edges (where cells share dofs) and in the
    interior; each row has at most one cell's dofs."""
    rng = np.random.default_rng(4)
    points = np.vstack([rng.uniform(0.01, 0.99, (500, 2)), [[0.25, 0.5], [0.5, 0.5], [0.375, 0.6],
                                                            [0.0, 0.0], [1.0, 0.3]]])
    model = EllipticForward(SELF, (4, 4), mesh_cells=(8, 8), cell=cell, degree=degree,
                            dirichlet={"left": 0.0, "right": 1.0}, points=points)
    u = model.solution(_field(5, shape=(4, 4), num=1)[0].numpy())
    observed = model.disc.observation @ u.x.array
    tree = geometry.BoundingBoxTree(u.function_space.mesh, 2)
    p3 = np.column_stack([points, np.zeros(len(points))])
    cells = geometry.compute_colliding_cells(u.function_space.mesh,
                                             geometry.compute_collisions(tree, p3), p3)
    first = np.array([cells.links(i)[0] for i in range(len(points))], dtype=np.int32)
    np.testing.assert_allclose(observed, u.eval(p3, first).ravel(), rtol=0, atol=1e-13)
    per_row = np.diff(model.disc.observation.indptr)
    assert per_row.max() <= model.disc.V.dofmap.dof_layout.num_dofs


def test_observation_outside_mesh_and_bad_boundary_are_errors():
    with pytest.raises(ValueError, match="outside the mesh"):
        EllipticForward(SELF, (4, 4), points=[[1.5, 0.5]])
    with pytest.raises(ValueError, match="unknown boundary"):
        EllipticForward(SELF, (4, 4), points=[[0.5, 0.5]], dirichlet={"west": 0.0})
    with pytest.raises(ValueError, match="no observations"):
        EllipticForward(SELF, (4, 4))


def test_mesh_finer_than_lattice_and_not_aligned():
    """Each FE cell takes the lattice value at its centre, also for a non-nested mesh."""
    model = EllipticForward(SELF, (4, 4), mesh_cells=(10, 6), **OPTIONS)
    lattice = model.disc.cell_lattice
    centres_x = (np.arange(10) + 0.5) / 10
    centres_y = (np.arange(6) + 0.5) / 6
    got = set(map(tuple, np.column_stack([lattice // 4, lattice % 4])))
    expected = {(int(y * 4), int(x * 4)) for x in centres_x for y in centres_y}
    assert got == expected
    m = _field(7, shape=(4, 4), num=1)[0]
    result = taylor_test(lambda x: model(x).sum(), m, generator=torch.Generator().manual_seed(1))
    assert result.rate == pytest.approx(2.0, abs=0.1)


MESHES = __import__("pathlib").Path(__file__).resolve().parents[1] / "meshes"


def test_read_mesh_reproduces_linear_solution():
    """On the L-shaped XDMF mesh, u = 1 + 2x + 3y (k constant, f = 0) is in the P1 space."""
    points = [[0.1, 0.2], [0.45, 0.9], [0.9, 0.3], [0.5, 0.5]]
    model = EllipticForward(SELF, (4, 4), mesh=MESHES / "lshape.xdmf", source=0.0,
                            dirichlet={"all": "1 + 2*x + 3*y"}, points=points)
    assert model.disc.bounds == pytest.approx((0.0, 1.0, 0.0, 1.0))
    y = model(torch.full((1, 4, 4), 0.7, dtype=torch.float64))[0].numpy()
    expected = [1 + 2 * x + 3 * y for x, y in points]
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_read_mesh_with_facet_tags_gradients():
    """Facet tags select boundary parts; lattice cells in the notch get no gradient."""
    kwargs = dict(mesh=MESHES / "lshape.xdmf", source=1.0, dirichlet={1: 0.0, 3: 1.0},
                  neumann={2: 0.2}, points=[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]])
    fast = EllipticForward(SELF, (4, 4), solver="fast", **kwargs)
    slow = EllipticForward(SELF, (4, 4), solver="lu", **kwargs)
    m = _field(8, shape=(4, 4), num=1)[0].requires_grad_(True)
    fast(m).sum().backward()
    g_fast = m.grad.clone()
    m.grad = None
    slow(m).sum().backward()
    np.testing.assert_allclose(g_fast, m.grad, rtol=1e-9, atol=1e-14)
    assert (g_fast[2:, 2:] == 0).all() and (g_fast[:2, :2] != 0).all()
    # (a plain sum of these three heads has an almost vanishing second derivative along this
    # direction, which makes the remainder third order: weight the heads instead)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    result = taylor_test(lambda x: (fast(x) * w).sum(), m.detach(),
                         generator=torch.Generator().manual_seed(2))
    assert np.all(np.abs(result.second_rates - 2.0) < 0.1), result.second_rates
    with pytest.raises(ValueError, match="outside the mesh"):
        EllipticForward(SELF, (4, 4), mesh=MESHES / "lshape.xdmf", points=[[0.8, 0.8]])


def _solver_answers(solver, m, w):
    y, state = solver.solve_batch(m)
    return y, solver.vjp_batch(state, w)


@pytest.mark.parametrize("num", [1, 3, 11])
def test_interleaved_cholesky_matches_petsc_and_assembly(num):
    """The compiled interleaved Cholesky (lanes 8, 4, 2, 1, padded chunks) against PETSc's
    Cholesky in the same FastSolver and against per-sample assembly, to 1e-10 relative."""
    from geoinvert.problem.forward.elliptic import AssemblySolver, FastSolver

    model = EllipticForward(SELF, (8, 8), mesh_cells=(24, 20), **OPTIONS)
    interleaved = FastSolver(model.disc, backend="interleaved")
    solvers = [interleaved, FastSolver(model.disc, backend="petsc"), AssemblySolver(model.disc)]
    m = _field(9, num=num).numpy()
    w = np.random.default_rng(10).normal(size=(num, model.n_obs))
    answers = [_solver_answers(solver, m, w) for solver in solvers]
    for y, grad in answers[1:]:
        assert np.abs(answers[0][0] - y).max() <= 1e-10 * np.abs(y).max()
        assert np.abs(answers[0][1] - grad).max() <= 1e-10 * np.abs(grad).max()
    assert np.array_equal(np.sort(interleaved.backend.perm), np.arange(interleaved.backend.n))


def test_interleaved_cholesky_refactorises_past_the_memory_budget():
    """With no memory for kept factors the backward pass refactorises: same gradients."""
    from geoinvert.problem.forward.elliptic import FastSolver

    model = EllipticForward(SELF, (8, 8), mesh_cells=(16, 16), **OPTIONS)
    m = _field(11, num=19).numpy()
    w = np.random.default_rng(12).normal(size=(19, model.n_obs))
    kept = _solver_answers(FastSolver(model.disc, backend="interleaved"), m, w)
    tight = FastSolver(model.disc, backend="interleaved", max_factor_bytes=1)
    y, state = tight.solve_batch(m)
    assert len(tight._slots) == 1
    np.testing.assert_array_equal(y, kept[0])
    np.testing.assert_allclose(tight.vjp_batch(state, w), kept[1], rtol=1e-12, atol=0)


def test_fast_solver_uses_the_compiled_kernels():
    """The default fast path is the interleaved Cholesky (the fallback only without a compiler),
    and its adjoint gradient passes the Taylor test."""
    from geoinvert.problem.forward.cholesky import InterleavedCholesky

    model = EllipticForward(SELF, (8, 8), mesh_cells=(16, 16), solver="fast", **OPTIONS)
    assert isinstance(model.solver.backend, InterleavedCholesky)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    result = taylor_test(lambda x: (model(x) * w).sum(), _field(13, num=1)[0],
                         generator=torch.Generator().manual_seed(3))
    assert np.all(np.abs(result.first_rates - 1.0) < 0.1), result.first_rates
    assert np.all(np.abs(result.second_rates - 2.0) < 0.1), result.second_rates


def test_interleaved_cholesky_lanes_are_independent_and_flag_indefinite_matrices():
    """Two lanes on a 2-D five-point pattern: a positive definite lane solves to rounding, an
    indefinite lane is flagged and leaves the other untouched."""
    import scipy.sparse as sp

    from geoinvert.problem.forward.cholesky import InterleavedCholesky

    n1 = 7
    line = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n1, n1))
    A = (sp.kron(sp.eye(n1), line) + sp.kron(line, sp.eye(n1))).tocsr()
    coords = np.array([(i, j) for j in range(n1) for i in range(n1)], dtype=float)
    chol = InterleavedCholesky(A.indptr, A.indices, coords)
    values = np.column_stack([A.data, np.where(A.data > 0, -A.data, A.data)])
    slot = chol.new_slot(2)
    failed = chol.factorise(slot, chol.value_map(sp.eye(A.nnz, format="csr")) @ values)
    assert failed.tolist() == [False, True]
    b = np.random.default_rng(14).normal(size=(n1 * n1, 2))
    x = chol.solve(slot, b)
    np.testing.assert_allclose(A @ x[:, 0], b[:, 0], rtol=0, atol=1e-12 * np.abs(b).max())


def test_fast_solver_falls_back_to_petsc_without_compiled_kernels(monkeypatch):
    import geoinvert.problem.forward.cholesky as cholesky
    import geoinvert.problem.forward.elliptic as elliptic

    def no_compiler():
        raise OSError("no C compiler")

    monkeypatch.setattr(cholesky, "kernels", no_compiler)
    model = EllipticForward(SELF, (4, 4), solver="fast", **OPTIONS)
    assert isinstance(model.solver.backend, cholesky.PetscCholesky)
    reference = EllipticForward(SELF, (4, 4), solver="lu", **OPTIONS)
    m = _field(15, shape=(4, 4), num=2)
    np.testing.assert_allclose(model(m), reference(m), rtol=1e-11)
    with pytest.raises(OSError, match="no C compiler"):
        elliptic.FastSolver(model.disc, backend="interleaved")
