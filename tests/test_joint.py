"""The joint flows (Xiao-Yan-Amit single loss, Ardizzone et al.'s INN): the bijection, its
density, save and load, and what training gives on the linear-Gaussian test bed."""

import numpy as np
import pytest
import torch

from geoinvert.case import load_case
from geoinvert.inference.amortized import AmortizedPosterior, train_amortized
from geoinvert.inference.joint import INN, JointFlow, mmd
from geoinvert.problem.forward.testbeds import ExactLinearPosterior
from geoinvert.simulate import simulate
from geoinvert.testing import linear_gaussian, small_case


@pytest.fixture(scope="module")
def prior():
    return linear_gaussian(levels=2)[0]


def test_the_split_map_is_a_bijection_with_its_log_determinant(prior):
    torch.manual_seed(0)
    flow = JointFlow(prior, 2, 3, eps=0.1, transforms=4, hidden=16)
    x = prior.sample(3, 2, generator=torch.Generator().manual_seed(1)).double()
    y_hat, z, logdet = flow.split(x)
    back, back_logdet = flow.join(y_hat, z)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(back_logdet, -logdet, rtol=0, atol=1e-10)
    # the log-determinant of x -> [y_hat, z] is the slogdet of its autograd Jacobian
    for k in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: torch.cat(flow.split(v.reshape(1, 4, 4))[:2], 1).reshape(-1),
            x[k].reshape(-1))
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[k], rtol=0, atol=1e-8)


def test_draws_carry_their_exact_density(prior):
    torch.manual_seed(0)
    flow = JointFlow(prior, 2, 3, eps=0.2, transforms=4, hidden=16)
    y = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64)
    x, log_q = flow.sample(50, generator=torch.Generator().manual_seed(2), context=y)
    torch.testing.assert_close(flow.log_prob(x, y), log_q, rtol=0, atol=1e-9)


def test_the_density_integrates_to_one_in_one_dimension():
    """On a 2x2 lattice with 3 observations there is one latent coordinate: q(x | y) must be
    a normalised density for every y (checked by importance sampling from the prior: the mean
    of q / p over prior draws is 1, within 4 Monte-Carlo errors)."""
    prior = linear_gaussian(levels=1)[0]
    torch.manual_seed(3)
    flow = JointFlow(prior, 1, 3, eps=1.0, transforms=2, hidden=8)
    x = prior.sample(200000, 1, generator=torch.Generator().manual_seed(4)).double()
    with torch.no_grad():
        ratio = torch.exp(flow.log_prob(x, torch.zeros(3, dtype=torch.float64))
                          - prior.log_prob(x, 1).double()).numpy()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / np.sqrt(ratio.size)


def test_fewer_observations_than_parameters_are_needed(prior):
    with pytest.raises(ValueError, match="fewer observations than parameters"):
        JointFlow(prior, 2, 16)


def test_an_inn_has_draws_but_no_density(prior):
    torch.manual_seed(0)
    inn = INN(prior, 2, 3, transforms=2, hidden=8)
    x, log_q = inn.sample(5, context=torch.zeros(3))
    assert x.shape == (5, 4, 4) and torch.isnan(log_q).all()
    with pytest.raises(NotImplementedError, match="no density"):
        inn.log_prob(x, torch.zeros(3))


def test_mmd_separates_distributions_and_not_samples_of_one():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(400, 5, generator=g, dtype=torch.float64) for _ in range(2))
    # between samples of one distribution the (biased) estimate is O(1/n), a shift of one
    # standard deviation in each coordinate is far above it
    assert float(mmd(a, b)) < 0.1 * float(mmd(a, b + 1.0))


@pytest.fixture(scope="module")
def simulations(tmp_path_factory):
    config = small_case()
    config["levels"] = {"finest": 2}
    config["noise"] = {"std": 0.05}
    case = load_case(config)
    path = tmp_path_factory.mktemp("joint") / "sims.nc"
    simulate(case, 4000, path, seed=2)
    return case, path


def _exact(case, seed):
    prior, forward = case.prior(), case.forward(2)
    x = prior.sample(1, 2, generator=torch.Generator().manual_seed(500 + seed))
    with torch.no_grad():
        y = forward(x)[0].numpy() + 0.05 * np.random.default_rng(seed).standard_normal(2)
    return y, ExactLinearPosterior(prior.mean(2).ravel(), prior.covariance(2), forward.matrix,
                                   y, 0.05)


def _mean_error(post, case, sets=5):
    errors = []
    for k in range(sets):
        y, exact = _exact(case, k)
        x, _ = post.sample(2000, y, generator=torch.Generator().manual_seed(k))
        sd = np.sqrt(np.diag(exact.cov))
        errors.append(np.sqrt(np.mean(((x.reshape(2000, -1).numpy().mean(0) - exact.mean)
                                       / sd) ** 2)))
    return float(np.mean(errors))


def test_the_inn_learns_the_posterior_and_the_joint_flow_its_surrogate(simulations, tmp_path):
    """Trained on the same simulations, the INN's draws for new data are closer to the exact
    posterior than the prior is (by more than the 0.02 Monte-Carlo error of these errors; how
    much closer is the benchmark's question); the joint flow's data coordinates are a surrogate of
    the forward model within a few noise standard deviations; a saved joint flow loads."""
    case, path = simulations
    inn, history = train_amortized(case.prior(), path, epochs=3, batch=128, method="inn",
                                   generator=torch.Generator().manual_seed(0))
    assert history[-1]["held_out"] < history[0]["held_out"]
    prior_error = _mean_error(_PriorAsPosterior(case), case)
    assert _mean_error(inn, case) < 0.8 * prior_error
    joint, _ = train_amortized(case.prior(), path, epochs=3, batch=128, method="joint",
                               generator=torch.Generator().manual_seed(0))
    x = case.prior().sample(200, 2, generator=torch.Generator().manual_seed(9)).double()
    with torch.no_grad():
        clean = case.forward(2)(x).numpy()
    assert np.sqrt(np.mean((joint.surrogate(x) - clean) ** 2)) < 3 * 0.05
    joint.save(tmp_path / "joint.pt")
    again = AmortizedPosterior.load(tmp_path / "joint.pt", case.prior())
    y, _ = _exact(case, 0)
    draws, log_q = joint.sample(10, y, generator=torch.Generator().manual_seed(1))
    assert again.method == "joint"
    torch.testing.assert_close(again.log_prob(draws, y), log_q, rtol=0, atol=1e-8)


class _PriorAsPosterior:
    """The prior's draws whatever the data: the baseline an amortized posterior must beat."""

    def __init__(self, case):
        self.case = case

    def sample(self, num, y, generator=None):
        return self.case.prior().sample(num, 2, generator=generator), None
