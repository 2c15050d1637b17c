"""Tests for the multi-start Laplace mixture (a standard method for the coarsest MsIGN stage)."""

import math

import numpy as np
import pytest
import torch

from geoinvert.forward.testbeds import ExactQuadraticPosterior, QuadraticForward
from geoinvert.posterior import Posterior
from geoinvert.prior import MaternPrior
from geoinvert.samplers import find_modes, laplace_mixture
from geoinvert.train import laplace_pool

from test_smc import linear_level1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior():
    return MaternPrior(2, alpha=2, correlation_length=0.3, std=1.0, boundary="dirichlet")


def test_gaussian_posterior_is_recovered_exactly(prior):
    # For a Gaussian q the Laplace approximation is exact: the mode is the posterior mean, the
    # Hessian its precision and the log mass log p(y). With inflation s the importance ESS
    # fraction is (s^2 / sqrt(2 s^2 - 1))^-d = 0.48 for s = 1.5, d = 4, so 2048 weighted draws
    # keep ~980 effective ones: the weighted mean's error is ~0.03 posterior std (0.15 bound)
    # and the evidence estimate's ~0.03 nats (0.1 bound).
    posterior, exact = linear_level1(prior, 1e-3)
    starts = prior.sample(4, 1, generator=gen())
    result = laplace_mixture(posterior.grad_log_prob, posterior.log_prob, starts, 2048,
                             generator=gen())
    assert len(result.modes) == 1
    mode = result.modes[0]
    std = np.sqrt(np.diag(exact.cov))
    np.testing.assert_array_less(np.abs(mode.x.numpy().ravel() - exact.mean) / std, 1e-3)
    np.testing.assert_allclose(mode.hessian.numpy(), np.linalg.inv(exact.cov), rtol=1e-4,
                               atol=1e-4 * np.abs(np.linalg.inv(exact.cov)).max())
    assert mode.log_mass == pytest.approx(exact.log_evidence, abs=1e-3)
    assert result.ess == pytest.approx(0.48, abs=0.08)
    w, x = result.w.numpy(), result.x.flatten(1).numpy()
    np.testing.assert_array_less(np.abs(w @ x - exact.mean) / std, 0.15)
    assert result.log_evidence == pytest.approx(exact.log_evidence, abs=0.1)
    assert result.evaluations > 2048 + 4 * 2          # searches + Hessian + importance draws


def bimodal_level1(prior, rel_noise):
    """y = <phi, x>^2 on the 2x2 level, y = (2 t_std)^2: two modes t = +-2 t_std."""
    forward = QuadraticForward((2, 2))
    w = torch.as_tensor(forward.functional).flatten().to(torch.float64)
    cov = prior.covariance(1)
    t_std = float(torch.sqrt(w @ torch.as_tensor(cov) @ w))
    data, noise = (2 * t_std) ** 2, rel_noise * (2 * t_std) ** 2
    exact = ExactQuadraticPosterior(prior.mean(1).ravel(), cov, w.numpy(), [data], noise,
                                    shape=(2, 2))
    return Posterior(prior, forward, [data], noise, 1), exact, w


@pytest.mark.parametrize("seed", [0, 1])
def test_bimodal_modes_and_masses(prior, seed):
    # Two mirror modes of equal mass. 4096 draws with an ESS of ~0.4: the weight in t > 0 has
    # a Monte-Carlo std of ~0.012, so 0.05 is a 4-sigma bound; E|t| is within 2 %.
    posterior, exact, w = bimodal_level1(prior, 0.02)
    starts = prior.sample(8, 1, generator=gen(seed))
    result = laplace_mixture(posterior.grad_log_prob, posterior.log_prob, starts, 4096,
                             generator=gen(seed))
    t_modes = sorted(float(m.x.flatten() @ w) for m in result.modes)
    assert len(t_modes) == 2 and t_modes[0] == pytest.approx(-t_modes[1], rel=1e-4)
    t = result.x.flatten(1) @ w
    assert abs(float(result.w[t > 0].sum()) - exact.mode_mass()) < 0.05
    assert float(result.mode_mass.sum()) == pytest.approx(1.0)
    assert abs(float(result.mode_mass[0]) - 0.5) < 0.05
    exact_abs_t = float(exact.sample_t(200_000, gen(7)).abs().mean())
    assert float(result.w @ t.abs()) == pytest.approx(exact_abs_t, rel=0.02)
    assert result.log_evidence == pytest.approx(exact.log_evidence, abs=0.1)


def test_a_saddle_is_not_a_mode(prior):
    # Started on the symmetry plane t = 0, L-BFGS stays on it (the gradient has no t part) and
    # ends at the saddle between the modes: its Hessian is indefinite, so it is left out.
    posterior, _, w = bimodal_level1(prior, 0.02)
    mean = torch.as_tensor(prior.mean(1), dtype=torch.float64)
    on_plane = mean - (mean.flatten() @ w) / (w @ w) * w.reshape(2, 2)
    modes, _ = find_modes(posterior.grad_log_prob, on_plane[None])
    assert modes == []
    with pytest.raises(ValueError, match="none of the 1 starts reached a mode"):
        laplace_mixture(posterior.grad_log_prob, posterior.log_prob, on_plane[None], 16)


def test_failed_evaluations(prior):
    posterior, _ = linear_level1(prior, 1e-2)

    def failing(x):
        value, grad = posterior.grad_log_prob(x)
        return torch.full_like(value, -math.inf), grad

    with pytest.raises(ValueError, match="reached a mode"):
        laplace_mixture(failing, posterior.log_prob, prior.sample(2, 1, generator=gen()), 16)

    def flaky(x):                     # the importance draws with x_00 > mean fail
        value = posterior.log_prob(x).clone()
        value[x[:, 0, 0] > float(posterior_mean[0, 0])] = math.nan
        return value

    posterior_mean = laplace_mixture(posterior.grad_log_prob, posterior.log_prob,
                                     prior.sample(2, 1, generator=gen()), 16).modes[0].x
    result = laplace_mixture(posterior.grad_log_prob, flaky, prior.sample(2, 1, generator=gen()),
                             256, generator=gen())
    assert (result.x[result.w > 0][:, 0, 0] <= posterior_mean[0, 0]).all()
    assert torch.isinf(result.log_q[result.w == 0]).all()


@pytest.mark.parametrize("kwargs, match", [(dict(num=1), "num"), (dict(inflation=0.0), "inflation")])
def test_bad_arguments(prior, kwargs, match):
    posterior, _ = linear_level1(prior, 1e-2)
    args = dict(num=16) | kwargs
    with pytest.raises(ValueError, match=match):
        laplace_mixture(posterior.grad_log_prob, posterior.log_prob,
                        prior.sample(2, 1, generator=gen()), args.pop("num"), **args)


def test_pool_from_the_laplace_mixture(prior):
    from geoinvert.flows.msign import MsIGN
    posterior, _ = linear_level1(prior, 1e-3)
    model = MsIGN(prior, blocks_per_level=1, hidden=8)
    pool, result = laplace_pool(model, posterior, 64, gen())
    assert pool.x.dtype == model.dtype and pool.x.shape == (64, 2, 2)
    torch.testing.assert_close(pool.log_q, posterior.log_prob(result.x).to(torch.float64))
    assert pool.ess > 0.2


def test_training_with_laplace_pools_at_two_levels():
    # The linear test bed of test_train (8x8, 3 levels): stages 1 and 2 start from Laplace
    # pools (their solves counted once, at the stage start), stage 3 from the surrogate.
    from test_train import make_problem, new_model
    from geoinvert.train import train_msign
    prior, posteriors, _ = make_problem()
    model = new_model(prior)
    before = sum(p.forward.n_solves for p in posteriors.values())
    history = train_msign(model, posteriors, steps=[10, 10, 4], batch=8, lr=3e-3, pool=128,
                          coarse_sampler="laplace", pool_levels=2, generator=gen(),
                          callback=None, checkpoint=None)
    solves = sum(p.forward.n_solves for p in posteriors.values()) - before
    first = {s: next(h for h in history if h["stage"] == s) for s in (1, 2, 3)}
    last = {s: [h for h in history if h["stage"] == s][-1] for s in (1, 2, 3)}
    assert first[1]["nfs"] > 128 and first[1]["ess"] > 0.2
    assert first[2]["nfs"] - last[1]["nfs"] > 128 and first[2]["ess"] > 0.05
    # 5 pool-only steps then 5 Jeffreys steps of 8 solves in stages 1 and 2, 4 x 16 in stage 3
    assert last[2]["nfs"] - first[2]["nfs"] == 5 * 8
    assert history[-1]["nfs"] == solves == last[2]["nfs"] + 4 * 16


def test_pool_levels_must_be_positive():
    from test_train import make_problem, new_model
    from geoinvert.train import train_msign
    prior, posteriors, _ = make_problem()
    with pytest.raises(ValueError, match="pool_levels"):
        train_msign(new_model(prior), posteriors, pool_levels=0, callback=None, checkpoint=None)


def test_mode_balance_labels_and_weights():
    # Two modes at +-m on the 2x2 level; samples of the 4x4 level are pooled down first.
    from geoinvert.train import Ensemble, ModeBalance
    m = torch.tensor([[1.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    balance = ModeBalance(1, torch.stack((m, -m)), eye.expand(2, 4, 4),
                          torch.tensor([0.5, 0.5], dtype=torch.float64))
    fine = lambda x: x.repeat_interleave(2, 0).repeat_interleave(2, 1)   # noqa: E731
    x = torch.stack([fine(m + 0.1), fine(m - 0.2), fine(0.9 * m), fine(-m)])
    assert balance.labels(x).tolist() == [0, 0, 0, 1]
    ok = torch.tensor([True, True, True, True])
    # P = (3/4, 1/4), Q = (1/2, 1/2): weights Q/P = 2/3 and 2, mean 1
    torch.testing.assert_close(balance.weights(x, ok, Ensemble()),
                               torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0], dtype=torch.float64))
    # a failed sample gets 0 and does not count; a mode without samples is left out
    ok[3] = False
    torch.testing.assert_close(balance.weights(x, ok, Ensemble()),
                               torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))


def test_training_with_mode_balance():
    from test_train import make_problem, new_model
    from geoinvert.train import train_msign
    prior, posteriors, _ = make_problem()
    states = []
    history = train_msign(new_model(prior), posteriors, steps=[6, 4, 4], batch=8, lr=3e-3,
                          pool=128, coarse_sampler="laplace", balance_modes=True,
                          generator=gen(), callback=None, checkpoint=states.append)
    assert all(math.isfinite(h["loss"]) for h in history)
    balance = states[-1]["balance"]
    assert balance["level"] == 1 and balance["centres"].shape == (1, 2, 2)
    assert float(balance["masses"].sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="balance_modes"):
        train_msign(new_model(prior), posteriors, balance_modes=True, callback=None,
                    checkpoint=None)


def test_evaluation_cap(prior):
    # The search stops short of the cap and the importance draws get what is left; training
    # with a small budget stays within it.
    from test_train import make_problem, new_model
    from geoinvert.train import train_msign
    posterior, _ = linear_level1(prior, 1e-3)
    starts = prior.sample(8, 1, generator=gen())
    result = laplace_mixture(posterior.grad_log_prob, posterior.log_prob, starts, 4096,
                             generator=gen(), max_evaluations=300)
    assert result.evaluations <= 300 and 2 <= result.x.shape[0] < 300
    with pytest.raises(ValueError, match="within 5 evaluations"):
        laplace_mixture(posterior.grad_log_prob, posterior.log_prob, starts, 16,
                        max_evaluations=5)
    prior3, posteriors, _ = make_problem()
    budget = 2000
    history = train_msign(new_model(prior3), posteriors, steps=50, batch=8, pool=4096,
                          coarse_sampler="laplace", pool_levels=2, budget=budget,
                          generator=gen(), callback=None, checkpoint=None)
    assert history[-1]["nfs"] <= budget and {h["stage"] for h in history} == {1, 2, 3}
