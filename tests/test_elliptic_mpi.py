"""The elliptic model on a mesh distributed over MPI ranks agrees with the serial fast solver.

Run under ``mpirun -n 2`` by ``make test`` (it also passes on one process).
"""

import numpy as np
import pytest
import torch
from mpi4py import MPI

from geoinvert.problem.forward.elliptic import EllipticForward

pytestmark = pytest.mark.mpi

OPTIONS = dict(
    mesh_cells=(24, 24),
    source="1 + x*y",
    dirichlet={"left": 0.0, "bottom": "x"},
    neumann={"right": 0.3},
    points=[[0.2, 0.3], [0.5, 0.5], [0.8, 0.55], [0.51, 0.97]],
    functions=["sin(pi*x) * sin(pi*y)"],
)


@pytest.mark.parametrize("method", ["lu", "cg"])
def test_distributed_solve_and_adjoint_match_serial(method):
    world = MPI.COMM_WORLD
    distributed = EllipticForward(world, (8, 8), solver=method, **OPTIONS)
    serial = EllipticForward(MPI.COMM_SELF, (8, 8), solver="fast", **OPTIONS)
    m = torch.tensor(np.random.default_rng(0).normal(size=(2, 8, 8)) * 0.7, requires_grad=True)
    w = torch.tensor(np.random.default_rng(1).normal(size=(2, serial.n_obs)))
    grads = []
    for model in (distributed, serial):
        (model(m) * w).sum().backward()
        grads.append(m.grad.clone())
        m.grad = None
    rtol = 1e-11 if method == "lu" else 1e-8      # CG stops at a relative residual of 1e-12
    with torch.no_grad():
        np.testing.assert_allclose(distributed(m), serial(m), rtol=rtol)
    np.testing.assert_allclose(grads[0], grads[1], rtol=100 * rtol, atol=rtol * float(grads[1].abs().max()))
    # every rank holds the same observations and gradients
    gathered = world.allgather(grads[0].numpy())
    np.testing.assert_array_equal(gathered[0], gathered[-1])


def test_distributed_read_mesh_matches_serial():
    """The L-shaped XDMF mesh read on all ranks: bounds, observations and gradients agree."""
    from pathlib import Path

    mesh = Path(__file__).resolve().parents[1] / "meshes" / "lshape.xdmf"
    kwargs = dict(mesh=mesh, source=1.0, dirichlet={1: 0.0, 3: 1.0}, neumann={2: 0.2},
                  points=[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]])
    distributed = EllipticForward(MPI.COMM_WORLD, (4, 4), solver="lu", **kwargs)
    serial = EllipticForward(MPI.COMM_SELF, (4, 4), solver="fast", **kwargs)
    assert distributed.disc.bounds == pytest.approx((0.0, 1.0, 0.0, 1.0))
    m = torch.tensor(np.random.default_rng(2).normal(size=(2, 4, 4)) * 0.5, requires_grad=True)
    grads = []
    for model in (distributed, serial):
        model(m).sum().backward()
        grads.append(m.grad.clone())
        m.grad = None
    with torch.no_grad():
        np.testing.assert_allclose(distributed(m), serial(m), rtol=1e-11)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
