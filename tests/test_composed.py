"""Hard data, a learned prior in case files, and posteriors in its latent space (composed
flows): the pieces against known answers, the case rules, and end-to-end runs."""

import math

import numpy as np
import pytest
import torch

from geoinvert import load_case, run
from geoinvert.errors import CaseError
from geoinvert.problem.forward.hard import WithHardData, cell_indices, with_hard_data
from geoinvert.problem.forward.testbeds import ExactLinearPosterior, LinearForward
from geoinvert.testing import small_case

HARD = [[0.4, 0.6], [0.8, 0.2]]


def _case_with_hard_data(values=None, **sampler):
    config = small_case()
    config["observations"]["hard_data"] = {"points": HARD, "noise": 0.02,
                                           **({"values": values} if values else {})}
    config["sampler"] = sampler or {"kind": "laplace"}
    config["output"] = {"samples": 400, "figures": False}
    return config


# -- hard data ----------------------------------------------------------------------------------

def test_cell_indices_are_the_cells_holding_the_points():
    idx = cell_indices([[0.0, 0.0], [0.99, 0.01], [0.5, 0.5], [1.0, 1.0]], (8, 8),
                       (0, 1, 0, 1))
    assert idx.tolist() == [0, 7, 4 * 8 + 4, 63]


def test_hard_data_keep_a_linear_model_linear_and_select_the_cells():
    G = LinearForward([lambda x, y: x + y], (8, 8))
    stacked = with_hard_data(G, HARD, (0, 1, 0, 1))
    assert isinstance(stacked, LinearForward) and stacked.n_obs == 3
    x = torch.randn(5, 8, 8, dtype=torch.float64)
    y = stacked(x)
    torch.testing.assert_close(y[:, 0], G(x)[:, 0])
    cells = cell_indices(HARD, (8, 8), (0, 1, 0, 1))
    torch.testing.assert_close(y[:, 1:], x.reshape(5, -1)[:, cells])
    assert with_hard_data(G, [], (0, 1, 0, 1)) is G


def test_hard_data_on_a_nonlinear_model_are_appended_and_differentiable():
    from geoinvert.problem.forward.testbeds import QuadraticForward
    q = QuadraticForward((4, 4), phi=lambda x, y: np.ones_like(x))
    stacked = with_hard_data(q, [[0.1, 0.9]], (0, 1, 0, 1))
    assert isinstance(stacked, WithHardData) and stacked.n_obs == 2
    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = stacked(x)
    torch.testing.assert_close(y[:, 1], x[:, 3, 0])          # row 3 (top), column 0
    (g,) = torch.autograd.grad(y[:, 1].sum(), x)
    assert float(g[:, 3, 0].sum()) == 3.0 and float(g.abs().sum()) == 3.0


def test_hard_data_condition_the_exact_linear_gaussian_posterior(tmp_path):
    """The Laplace approximation of a linear-Gaussian case is its exact posterior; with hard
    data it is the exact posterior of the stacked model (integral rows and selection rows),
    and at the hard cells its mean is the datum and its std below the datum's noise."""
    case = load_case(_case_with_hard_data(values=[1.5, -0.7]))
    assert case.n_obs == 4 and case.observation_names()[-2:] == ["hard0", "hard1"]
    np.testing.assert_allclose(case.data[-2:], [1.5, -0.7])
    np.testing.assert_allclose(case.noise, [0.01, 0.01, 0.02, 0.02])
    prior, forward = case.prior(), case.forward()
    exact = ExactLinearPosterior(prior.mean(3).ravel(), prior.covariance(3), forward.matrix,
                                 case.data, case.noise, shape=(8, 8))
    cells = cell_indices(HARD, (8, 8), case.bounds)
    std = np.sqrt(np.diag(exact.cov))
    assert (np.abs(exact.mean[cells] - [1.5, -0.7]) < 3 * 0.02).all()
    assert (std[cells] < 0.02).all()
    ds = run(case, out=tmp_path / "hard.nc", progress=False).dataset
    sample = ds["samples"].values.reshape(len(ds.sample), -1)
    # 400 draws: the mean is off by std / 20, the std by std / 28 (4 sigma)
    assert (np.abs(sample.mean(0) - exact.mean) < 4 * std / 20).all()
    assert (np.abs(sample.std(0) / std - 1) < 4 / 28).all()
    assert ds["obs_x"].values[-2:].tolist() == [0.4, 0.8]


def test_synthetic_hard_data_default_to_the_truth():
    case = load_case(_case_with_hard_data())
    cells = cell_indices(HARD, (8, 8), case.bounds)
    truth = case.truth.ravel()[cells]
    assert (np.abs(case.data[-2:] - truth) < 4 * 0.02).all()       # truth + noise of 0.02


@pytest.mark.parametrize("change, key, words", [
    ({"values": [1.0]}, "observations.hard_data.values", "1 values but there are 2"),
    ({"points": [[1.5, 0.5]]}, "observations.hard_data.points[0]", "outside the domain"),
    ({"noise": -1}, "observations.hard_data.noise", ""),
])
def test_bad_hard_data_are_refused(change, key, words):
    config = _case_with_hard_data(values=[1.0, 2.0])
    config["observations"]["hard_data"].update(change)
    with pytest.raises(CaseError) as err:
        load_case(config)
    assert err.value.key == key and words in str(err.value)


def test_observed_data_need_their_hard_values():
    config = _case_with_hard_data()
    config["data"] = {"values": [0.1, 0.2]}
    with pytest.raises(CaseError, match="one value per hard-data point"):
        load_case(config)


# -- a learned prior ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A small learned prior on 8x8 fields (a Gaussian ensemble, two epochs)."""
    from geoinvert.priors import MaternPrior
    from geoinvert.priors.learned import fit_prior
    gaussian = MaternPrior(3, alpha=2, boundary="neumann", std=1.0, correlation_length=0.3)
    fields = gaussian.sample(800, 3, generator=torch.Generator().manual_seed(0)).numpy()
    prior = fit_prior(fields, epochs=2, batch=64, blocks=2, hidden=8)
    path = tmp_path_factory.mktemp("learned") / "prior.pt"
    prior.save(path)
    return path


def _learned_case(path, sampler):
    config = small_case()
    config["prior"] = {"kind": "learned", "model": str(path)}
    config["observations"]["hard_data"] = {"points": HARD, "noise": 0.05}
    config["sampler"] = sampler
    config["output"] = {"samples": 200, "figures": False}
    return config


COMPOSED = {"kind": "composed", "blocks": 2, "hidden": 8, "steps": 40, "batch": 16,
            "correction": {"chains": 4, "warmup": 40, "draws": 20, "max_draws": 20,
                           "leapfrog": 4}}


def test_latent_forward_is_the_forward_model_of_the_prior_map(learned):
    from geoinvert.inference.correction import FlowTransport
    from geoinvert.priors.learned import LatentForward, LearnedPrior
    prior = LearnedPrior.load(learned)
    forward = LinearForward([lambda x, y: np.sin(3 * x) * y], (8, 8))
    latent = LatentForward(forward, FlowTransport(prior.model))
    z = torch.randn(4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, logdet = latent.fields(z)
    torch.testing.assert_close(latent(z), forward(x))
    # G maps N(0, I) to the prior: log p(x) = log N(z) - log|det dG/dz|
    log_n = -0.5 * z.reshape(4, -1).square().sum(1) - 32 * math.log(2 * math.pi)
    torch.testing.assert_close(prior.log_prob(x), log_n - logdet, rtol=0, atol=2e-4)
    # Taylor test of the gradient of a nonlinear functional through G: the first-order
    # remainder falls as h^2 (a ratio of 1/4 per halving)
    def f(z):
        return latent(z).square().sum()

    z.requires_grad_(True)
    (g,) = torch.autograd.grad(f(z), z)
    v = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f0 = f(z)
        rem = [abs(float(f(z + h * v) - f0 - h * (g * v).sum())) for h in (0.1, 0.05, 0.025)]
    assert rem[1] < 0.3 * rem[0] and rem[2] < 0.3 * rem[1]


def test_a_learned_prior_case_is_checked(learned, tmp_path):
    ok = load_case(_learned_case(learned, COMPOSED))
    assert ok.learned_prior and ok.prior().level == 3
    bad = [
        ({"prior": {"kind": "learned"}}, "prior.model", "needs the model"),
        ({"prior": {"kind": "learned", "model": str(learned), "std": 2.0}}, "prior.std",
         "applies to the Gaussian priors"),
        ({"prior": {"kind": "matern", "model": str(learned)}}, "prior.model", "only with"),
        ({"levels": {"finest": 4}}, "prior.model", "set levels.finest to 3"),
        ({"domain": {"bounds": [0, 2, 0, 1]}}, "prior.model", "fitted on the bounds"),
        ({"sampler": {"kind": "msign"}}, "sampler.kind", "use composed"),
    ]
    for change, key, words in bad:
        config = _learned_case(learned, COMPOSED)
        config.update(change)
        with pytest.raises(CaseError) as err:
            load_case(config)
        assert err.value.key == key and words in str(err.value), (change, str(err.value))
    plain = small_case()
    plain["sampler"] = {"kind": "composed"}
    with pytest.raises(CaseError, match="set prior.kind learned"):
        load_case(plain)
    (tmp_path / "other.json").write_text('{"metadata": {}}')
    (tmp_path / "other.pt").write_bytes(b"")
    with pytest.raises(CaseError, match="not a learned prior"):
        load_case(_learned_case(tmp_path / "other.pt", COMPOSED))


def test_composed_run_writes_fields_of_the_learned_prior_with_their_densities(learned,
                                                                              tmp_path):
    """A composed run (IAF in the prior's latent space, corrected) writes fields x = G(z):
    its stored log target is the posterior density of x under the learned prior (recomputed
    here from the fields alone), and the draws honour the hard data to their noise."""
    case = load_case(_learned_case(learned, COMPOSED))
    ds = run(case, out=tmp_path / "composed.nc", progress=False).dataset
    assert ds.attrs["sampler"] == "composed" and ds.attrs["diagnostics_latent"]
    assert ds.attrs["diagnostics_coordinates"] == "laplace"      # 64 parameters: auto
    x = torch.from_numpy(ds["samples"].values)
    posterior = case.posterior()            # in the fields: the learned prior's density
    with torch.no_grad():
        expected = posterior.log_prob(x).numpy()
    np.testing.assert_allclose(ds["log_target"].values, expected, rtol=0, atol=1e-3)
    lp = ds["flow_log_prob"].values
    lt = ds["flow_log_target"].values
    with torch.no_grad():
        again = posterior.log_prob(torch.from_numpy(ds["flow_samples"].values)).numpy()
    np.testing.assert_allclose(lt, again, rtol=0, atol=1e-3)
    assert np.isfinite(lp).all()
    cells = cell_indices(HARD, (8, 8), case.bounds)
    flat = ds["samples"].values.reshape(len(ds.sample), -1)[:, cells]
    assert (np.abs(flat.mean(0) - case.data[-2:]) < 3 * 0.05).all()


def test_mcmc_in_the_latent_space_of_a_learned_prior(learned, tmp_path):
    """An MCMC kind with a learned prior runs in its latent space and writes fields."""
    case = load_case(_learned_case(learned, {"kind": "hmc", "chains": 2, "draws": 30,
                                             "warmup": 20, "leapfrog": 4}))
    ds = run(case, out=tmp_path / "hmc.nc", progress=False).dataset
    x = torch.from_numpy(ds["samples"].values)
    with torch.no_grad():
        expected = case.posterior().log_prob(x).numpy()
    np.testing.assert_allclose(ds["log_target"].values, expected, rtol=0, atol=1e-3)
