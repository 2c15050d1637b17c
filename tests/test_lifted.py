"""Constrained HMC on the lifted data manifold (:mod:`geoinvert.samplers.lifted`): its geometry
against finite differences, and its draws against exact posteriors."""

import numpy as np
import pytest
import torch
from mpi4py import MPI

from geoinvert.problem.forward.elliptic import EllipticForward
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import MaternPrior
from geoinvert.samplers.chains import DualAveraging
from geoinvert.samplers.lifted import LiftedManifold, lifted_transition, quarter_period
from geoinvert.testing import bimodal_quadratic, gaussian_kl, linear_gaussian, z_scores


def _elliptic_posterior(solver="auto"):
    prior = MaternPrior(2, correlation_length=0.3, std=1.0)
    forward = EllipticForward(MPI.COMM_SELF, (4, 4), mesh_cells=(8, 8), solver=solver,
                              points=[[0.3, 0.3], [0.7, 0.6]], functions=["x * y"],
                              dirichlet={"left": 0.0, "right": 1.0}, source=1.0)
    return Posterior(prior, forward, np.array([0.2, 0.4, 0.1]), np.array([0.01, 0.01, 0.02]), 2)


def _hard_data_posterior():
    """The elliptic posterior above with the field measured at one cell (hard data)."""
    from geoinvert.problem.forward.hard import SolvedWithHardData, with_hard_data
    post = _elliptic_posterior()
    forward = with_hard_data(post.forward, [[0.6, 0.2]], (0, 1, 0, 1))
    assert isinstance(forward, SolvedWithHardData)
    return Posterior(post.prior, forward, np.append(post.data, 0.3),
                     np.append(post.noise, 0.05), 2)


def test_hard_data_solved_outside_torch_match_the_torch_model():
    """The stacked model's batch solve and Jacobian against its torch form (autograd), and
    its second-order adjoints against central differences of its Jacobian."""
    forward = _hard_data_posterior().forward
    rng = np.random.default_rng(3)
    x = 0.4 * rng.standard_normal((2, 4, 4))
    pred, state = forward.solve_batch(x)
    xt = torch.from_numpy(x).requires_grad_(True)
    np.testing.assert_allclose(pred, forward(xt).detach().numpy(), rtol=1e-12)
    jac = forward.jacobian_batch(state)
    auto = torch.autograd.functional.jacobian(lambda v: forward(v), xt)
    auto = torch.stack([auto[i, :, i] for i in range(2)]).numpy()
    np.testing.assert_allclose(jac, auto, rtol=1e-8, atol=1e-12)
    a, b = rng.standard_normal((2, 1, forward.n_obs)), rng.standard_normal((2, 1, 4, 4))
    grad = forward.trace_gradient_batch(state, a, b)
    dx, h = rng.standard_normal(x.shape), 1e-5

    def contracted(x):
        j = forward.jacobian_batch(forward.solve_batch(x)[1])
        return np.einsum("sri,sipq,srpq->s", a, j, b)
    fd = (contracted(x + h * dx) - contracted(x - h * dx)) / (2 * h)
    np.testing.assert_allclose((grad * dx).sum((1, 2)), fd, rtol=1e-6)


@pytest.mark.parametrize("make", [_elliptic_posterior, _hard_data_posterior,
                                  lambda: bimodal_quadratic(2)[0]],
                         ids=["elliptic", "elliptic-hard-data", "torch-quadratic"])
def test_log_determinant_force_is_its_gradient(make):
    """The force (second-order adjoints, or autograd for a torch model) against central
    differences of 1/2 log det(I + J J^T), J by adjoint solves: second-order convergence."""
    manifold = LiftedManifold(make())
    rng = np.random.default_rng(0)
    z, dz = 0.5 * rng.standard_normal((2, manifold.d)), rng.standard_normal((2, manifold.d))
    force = manifold.evaluate(z)[2][:, : manifold.d]

    def half_logdet(z):
        return 0.5 * np.linalg.slogdet(manifold.gram(manifold.evaluate(z)[1]))[1]
    slope = (force * dz).sum(1)
    errors = [np.abs((half_logdet(z + h * dz) - half_logdet(z - h * dz)) / (2 * h) - slope)
              for h in (1e-3, 5e-4)]
    assert np.all(np.log2(errors[0] / errors[1]) == pytest.approx(2.0, abs=0.2))
    assert np.all(errors[1] < 1e-4 * (1 + np.abs(slope)))


def test_a_failed_solve_is_a_counted_nan_row_without_numpy_warnings():
    """Fields whose solve fails (or whose Jacobian overflows) give NaN rows, counted in
    ``failed``, and no floating-point warning reaches the user; the other rows of the batch
    are those of their own evaluation."""
    import warnings
    manifold = LiftedManifold(_elliptic_posterior())
    z = np.zeros((3, manifold.d))
    z[0], z[2] = -200.0, 400.0
    z[1] = 0.1 * np.random.default_rng(0).standard_normal(manifold.d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r, jac, force = manifold.evaluate(z)
    assert manifold.failed == 2
    assert np.isnan(r[[0, 2]]).all() and np.isnan(force[[0, 2]]).all()
    alone = manifold.evaluate(z[1:2])
    for got, want in zip((r, jac, force), alone):
        np.testing.assert_allclose(got[1], want[0], rtol=1e-10, atol=1e-12)


def test_the_kernel_needs_second_order_adjoints():
    with pytest.raises(NotImplementedError, match="second-order adjoints"):
        LiftedManifold(_elliptic_posterior(solver="lu"))


def test_a_torch_model_must_declare_its_second_derivatives():
    """The test beds (all torch) and hard data over them declare them; a torch module around
    the elliptic solver (a learned prior's latent model), whose adjoint has no derivative of
    its own, and an undeclared torch callable do not, and are refused."""
    from types import SimpleNamespace
    from geoinvert.priors.learned import LatentForward
    from geoinvert.problem.forward.hard import with_hard_data
    from geoinvert.samplers.lifted import check_forward
    quadratic = bimodal_quadratic(2)[0].forward
    check_forward(quadratic)
    check_forward(with_hard_data(quadratic, [[0.5, 0.5]], (0, 1, 0, 1)))
    elliptic = _elliptic_posterior().forward
    for model in (LatentForward(elliptic, None), lambda x: x.sum((1, 2))[:, None],
                  SimpleNamespace(shape=(4, 4), n_obs=1)):
        with pytest.raises(NotImplementedError, match="second derivatives"):
            check_forward(model)


def test_states_stay_on_the_manifold_and_the_momenta_tangent():
    manifold = LiftedManifold(_elliptic_posterior())
    rng = np.random.default_rng(1)
    state = manifold.lift(0.3 * rng.standard_normal((3, 4, 4)))
    for _ in range(3):
        state, accept, failed = lifted_transition(manifold, state, 0.3, 5, rng)
    q, r, jac, _ = state
    assert failed == 0 and np.all(accept > 0)
    np.testing.assert_allclose(q[:, manifold.d:], -r, atol=1e-9)           # c(q) = 0
    p = manifold.project(rng.standard_normal(q.shape), jac)
    np.testing.assert_allclose(jac @ p[:, : manifold.d, None] + p[:, manifold.d:, None], 0,
                               atol=1e-8)
    np.testing.assert_allclose(manifold.project(p, jac), p, atol=1e-10)


def test_a_step_newton_cannot_follow_is_a_failed_rejected_trajectory():
    manifold = LiftedManifold(_elliptic_posterior())
    rng = np.random.default_rng(2)
    state = manifold.lift(0.3 * rng.standard_normal((3, 4, 4)))
    new, accept, failed = lifted_transition(manifold, state, 60.0, 2, rng)
    assert failed == 3
    np.testing.assert_array_equal(accept, 0.0)
    for a, b in zip(new, state):
        np.testing.assert_array_equal(a, b)


def _chains(posterior, starts, iterations, warmup, seed):
    """Draws ``(chains, iterations, n)`` of the lifted kernel with a step adapted in warm-up."""
    manifold = LiftedManifold(posterior)
    rng = np.random.default_rng(seed)
    state = manifold.lift(starts)
    adapt, step, draws = DualAveraging(0.2, 0.8), 0.2, []
    for i in range(warmup + iterations):
        h = step * rng.uniform(0.8, 1.2)
        state, accept, _ = lifted_transition(manifold, state, h, quarter_period(h, 64), rng)
        if i < warmup:
            adapt.update(float(accept.mean()))
            step = adapt.value if i < warmup - 1 else adapt.final()
        else:
            draws.append(manifold.to_x(state[0][:, : manifold.d]).reshape(len(starts), -1))
    return np.stack(draws, 1)


def test_draws_of_a_linear_gaussian_posterior_are_exact():
    """A flat manifold: mean z-scores and the Gaussian KL of the draws' moments (16 cells, 4
    chains of 400 draws) within their Monte-Carlo error."""
    _, posteriors, exact = linear_gaussian(2)
    post = posteriors[2]
    starts = exact.sample(4, torch.Generator().manual_seed(0)).numpy().reshape(4, 4, 4)
    x = _chains(post, starts, 400, 50, 3)
    z = z_scores(x, exact.mean)
    assert np.abs(z).max() < 4.0 and np.sqrt(np.mean(z ** 2)) < 1.6, z
    flat = x.reshape(-1, 16)
    kl = gaussian_kl(flat.mean(0), np.cov(flat.T), exact.mean, exact.cov)
    assert kl < 0.1, kl          # about d (d + 3) / (4 n_eff) = 0.05 at an ESS of ~1500


def test_draws_of_a_curved_quadratic_posterior_are_exact():
    """y = <w, x>^2 + e: the manifold is curved and its Gram determinant varies. The chains
    start in the mode t > 0 and the modes are mirror images under x -> -x, so the draws of
    x sign(t) and |t| follow the exact posterior whatever the chains' crossings: their means
    (z-scores) and the width of |t| against exact draws."""
    post, exact, w = bimodal_quadratic(2)
    ref = exact.sample(20000, torch.Generator().manual_seed(1)).numpy().reshape(20000, -1)
    t_ref = ref @ w
    starts = ref[t_ref > 0][:4].reshape(4, 4, 4)
    x = _chains(post, starts, 400, 50, 4)
    t = x @ w
    folded = x * np.sign(t)[..., None]
    target = (ref * np.sign(t_ref)[:, None]).mean(0)
    z = z_scores(np.concatenate([folded, np.abs(t)[..., None]], axis=2),
                 np.append(target, np.abs(t_ref).mean()))
    assert np.abs(z).max() < 4.0 and np.sqrt(np.mean(z ** 2)) < 1.6, z
    assert np.abs(t).std() == pytest.approx(np.abs(t_ref).std(), rel=0.15)
