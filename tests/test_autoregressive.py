"""The variational families (IAF, mean-field Gaussian): bijections, Jacobians, densities, save
and load, and their reverse-KL training against exact answers on the linear-Gaussian test bed."""

import numpy as np
import pytest
import torch

from geoinvert.flows.autoregressive import IAF, MeanField, WhitenedFlow
from geoinvert.inference.vi import train_vi
from geoinvert.samplers.whitening import prior_whitening
from geoinvert.testing import gaussian_kl, linear_gaussian

F64 = torch.float64


def _perturbed(model, scale=0.05, seed=0):
    """The model with random parameters (a trained-looking, non-identity map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.fixture(scope="module")
def bed():
    return linear_gaussian(2)          # 4x4 lattice: 16 parameters, exact posterior


@pytest.mark.parametrize("family", [IAF, MeanField])
def test_untrained_family_is_the_prior(bed, family):
    prior, _, _ = bed
    model = family(prior, 2)
    x, log_q = model.sample(50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_q, prior.log_prob(x, 2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", [IAF, MeanField])
def test_inverse_logdet_and_density_agree(bed, family):
    """inverse(forward(z)) = z; log|det| of the map equals slogdet of its autograd Jacobian;
    log_prob at a model's own draws equals the density the draws came with."""
    prior, _, _ = bed
    model = _perturbed(family(prior, 2))
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    x, logdet = model.to_x(z)
    torch.testing.assert_close(model.to_z(x), z, rtol=0, atol=1e-10)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model._forward(v[None])[0][0], z[i])
        assert model._forward(z[i:i + 1])[1].item() == pytest.approx(
            torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    whitening = prior_whitening(prior, 2)
    assert (logdet - model._forward(z)[1]).allclose(torch.tensor(whitening.logdet, dtype=F64))
    x, log_q = model.sample(20, torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-10)


def test_each_autoregressive_map_has_a_triangular_jacobian(bed):
    """Output i of a MADE map depends on inputs before i in its order only (and on input i
    through the scale): ascending order for the first map, descending for the second."""
    prior, _, _ = bed
    model = _perturbed(IAF(prior, 2, transforms=2, hidden=8))
    z = torch.randn(16, generator=torch.Generator().manual_seed(4), dtype=F64)
    for k, made in enumerate(model.maps):
        jac = torch.autograd.functional.jacobian(lambda v: made()(v[None])[0], z)
        order = jac if k == 0 else jac.flip(0).flip(1)
        assert torch.count_nonzero(torch.triu(order, diagonal=1)) == 0
        assert torch.all(torch.diagonal(order) > 0)
        assert torch.count_nonzero(torch.tril(order, diagonal=-1)) > 0   # not just diagonal


@pytest.mark.parametrize("family", [IAF, MeanField])
def test_save_and_load_round_trip(bed, family, tmp_path):
    prior, _, _ = bed
    model = _perturbed(family(prior, 2))
    model.save(tmp_path / "m.pt", metadata={"note": "test"})
    again = WhitenedFlow.load(tmp_path / "m.pt", prior)
    assert type(again) is family and again.config == model.config
    x, log_q = model.sample(10, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.log_prob(x), log_q, rtol=0, atol=1e-12)
    meta = (tmp_path / "m.json").read_text().replace('"format_version": 1', '"format_version": 9')
    (tmp_path / "m.json").write_text(meta)
    with pytest.raises(ValueError, match="format version 9"):
        WhitenedFlow.load(tmp_path / "m.pt", prior)


def _moments(model, num=20000, seed=6):
    x, _ = model.sample(num, torch.Generator().manual_seed(seed))
    x = x.reshape(num, -1).numpy()
    return x.mean(0), np.cov(x.T)


def test_iaf_trained_by_reverse_kl_matches_the_exact_gaussian_posterior(bed):
    """On a Gaussian posterior the IAF family holds the answer (a linear triangular map):
    after training, KL(q || p) from the moments is small, and the means and stds match the
    exact ones; along the data direction (the first observation functional) the marginal's
    mean and std match. The thresholds are a few Monte-Carlo standard errors of 20,000 draws
    (std / sqrt(n) = 0.007 std for a mean, 0.005 relative for a std) plus the training's
    residual."""
    prior, posteriors, exact = bed
    torch.manual_seed(0)
    model = IAF(prior, 2, transforms=2)
    history = train_vi(model, posteriors[2], steps=600, batch=64, lr=5e-3,
                       generator=torch.Generator().manual_seed(1))
    assert history[-1]["nfs"] == 600 * 64
    mean, cov = _moments(model)
    sd = np.sqrt(np.diag(exact.cov))
    assert np.sqrt(np.mean(((mean - exact.mean) / sd) ** 2)) < 0.05
    assert np.sqrt(np.mean((np.sqrt(np.diag(cov)) / sd - 1) ** 2)) < 0.05
    assert gaussian_kl(mean, cov, exact.mean, exact.cov) < 0.05
    g = posteriors[2].likelihood.forward.matrix[0]
    t_sd = np.sqrt(g @ exact.cov @ g)
    assert abs(g @ mean - g @ exact.mean) < 0.05 * t_sd
    assert np.sqrt(g @ cov @ g) / t_sd == pytest.approx(1, abs=0.05)


def test_mean_field_reaches_its_known_optimum(bed):
    """The reverse-KL optimum of a mean-field Gaussian for a Gaussian target N(m, S) in the
    whitened coordinates is mean m and variances 1 / diag(S^-1) (it under-disperses wherever
    the coordinates correlate); training reaches it within Monte-Carlo error."""
    prior, posteriors, exact = bed
    model = MeanField(prior, 2)
    train_vi(model, posteriors[2], steps=1500, batch=64, lr=1e-2,
             generator=torch.Generator().manual_seed(1))
    whitening = prior_whitening(prior, 2)
    # exact posterior in whitened coordinates u = C^-1 (x - mu): mean and covariance
    basis = whitening.to_z(torch.eye(16, dtype=F64).reshape(16, 4, 4)
                           + torch.from_numpy(prior.mean(2))) - whitening.to_z(
        torch.from_numpy(prior.mean(2))[None])
    inv_c = basis.numpy().T                   # u = inv_c (x - mu), columns of identity
    m_u = whitening.to_z(torch.from_numpy(exact.mean.reshape(1, 4, 4))).numpy()[0]
    s_u = inv_c @ exact.cov @ inv_c.T
    optimum = 1 / np.diag(np.linalg.inv(s_u))
    loc, var = model.loc.detach().numpy(), np.exp(2 * model.log_scale.detach().numpy())
    assert np.max(np.abs(loc - m_u) / np.sqrt(np.diag(s_u))) < 0.05
    assert np.max(np.abs(var / optimum - 1)) < 0.1
    assert np.max(var / np.diag(s_u)) < 1.0 + 0.1          # never wider than the truth


@pytest.mark.parametrize("kind", ["iaf", "meanfield"])
def test_variational_kinds_run_from_a_case_and_are_corrected(kind, tmp_path):
    """``sampler.kind: iaf`` / ``meanfield`` train, draw, correct and write the standard result
    and the model; the solves add up; keys of other kinds are refused."""
    import geoinvert
    from geoinvert.case import load_case
    from geoinvert.errors import CaseError
    from geoinvert.io import load_model
    from geoinvert.testing import small_case
    config = small_case()
    config["sampler"] = {"kind": kind, "steps": 30, "batch": 16,
                         **({"blocks": 1} if kind == "iaf" else {}),
                         "correction": config["sampler"]["correction"]}
    result = geoinvert.run(config, out=tmp_path / "r.nc", progress=False)
    ds = result.dataset
    assert ds.attrs["sampler"] == kind and ds.attrs["diagnostics_correction"] == "hmc"
    assert ds["samples"].shape[1:] == (8, 8) and "flow_samples" in ds
    assert ds.attrs["nfs"] >= 30 * 16 + ds.attrs["diagnostics_correction_nfs"]
    assert np.isfinite(ds["log_target"]).all()
    model = load_model(tmp_path / "r.pt")
    assert model.kind == kind
    x = torch.from_numpy(ds["flow_samples"].values[:5])
    torch.testing.assert_close(model.log_prob(x).detach(),
                               torch.from_numpy(ds["flow_log_prob"].values[:5]),
                               rtol=0, atol=1e-8)
    bad = small_case()
    bad["sampler"] = {"kind": kind, "upsampling": "nearest"}
    with pytest.raises(CaseError, match="sampler.upsampling: applies to sampler.kind msign"):
        load_case(bad)
    bad["sampler"] = {"kind": kind, "steps": [10, 10, 10]}
    with pytest.raises(CaseError, match="trains one level"):
        load_case(bad)


def test_msign_with_autoregressive_flows(bed, tmp_path):
    """``flow="iaf"``: every F_l is a stack of MADE maps; the untrained model is the prior,
    densities of its own draws agree with the ones they came with, the log-det of F_l is the
    slogdet of its Jacobian, and the model saves and loads."""
    from geoinvert.flows.autoregressive import AutoregressiveFieldFlow
    from geoinvert.flows.msign import MsIGN
    prior, _, _ = bed
    model = MsIGN(prior, flow="iaf", blocks_per_level=2, hidden=8, stage=2).to(F64)
    x, log_q = model.sample(20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_q, prior.log_prob(x, 2), rtol=0, atol=1e-10)
    _perturbed(model, 0.05)
    x, log_q = model.sample(20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-9)
    flow = model.flows[1]
    assert isinstance(flow, AutoregressiveFieldFlow)
    v = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda t: flow(t.reshape(1, 4, 4))[0].ravel(),
                                             v.ravel())
    assert flow(v)[1].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    model.save(tmp_path / "m.pt")
    again = MsIGN.load(tmp_path / "m.pt", prior)
    torch.testing.assert_close(again.log_prob(x), log_q, rtol=0, atol=1e-9)


def test_sampler_flow_iaf_runs_from_a_case(tmp_path):
    import geoinvert
    from geoinvert.testing import small_case
    config = small_case()
    config["sampler"]["flow"] = "iaf"
    result = geoinvert.run(config, out=tmp_path / "r.nc", progress=False)
    assert '"flow": "iaf"' in (tmp_path / "r.json").read_text()
    assert np.isfinite(result.dataset["log_target"]).all()
