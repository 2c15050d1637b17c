"""Tests for geoinvert.flows.msign: densities, inversion, Jacobians, surrogate, persistence.

The generic tests run on every upsampling variant (prior conditioning, stochastic
nearest-neighbour upsampling, Glow's squeeze/split).
"""

import json
import math

import pytest
import torch

from geoinvert.flows.msign import UPSAMPLINGS, MsIGN, noise_shape
from geoinvert.hierarchy import haar, pool
from geoinvert.priors import MaternPrior

F64 = torch.float64


def make_prior(levels):
    """Matern prior with a sloped mean: dense conditioning layers below the finest, sparse at it."""
    n = 2**levels
    mean = torch.linspace(-0.5, 0.5, n, dtype=F64).numpy()[:, None] + 0.1 * torch.ones(n, n).numpy()
    return MaternPrior(levels, alpha=2, correlation_length=0.3, std=1.0, mean=mean,
                       boundary="neumann")


def make_model(levels=3, *, stage=None, perturbed=True, seed=0, upsampling="prior"):
    torch.manual_seed(seed)
    model = MsIGN(make_prior(levels), blocks_per_level=2, hidden=8, stage=stage or levels,
                  upsampling=upsampling)
    model = model.to(F64)
    if perturbed:
        with torch.no_grad():
            for p in model.active_parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=UPSAMPLINGS)
def upsampling(request):
    return request.param


def test_identity_model_is_prior():
    model = make_model(3, perturbed=False)
    x, log_q = model.sample(16, generator=gen())
    assert x.shape == (16, 8, 8) and x.dtype == F64
    torch.testing.assert_close(log_q, model.prior.log_prob(x, 3), rtol=0, atol=1e-9)
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-9)


def test_log_prob_of_samples(upsampling):
    model = make_model(3, upsampling=upsampling)
    x, log_q = model.sample(16, generator=gen())
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-9)
    assert (log_q - model.prior.log_prob(x, 3)).abs().max() > 1e-3  # the flows act


def test_round_trip(upsampling):
    model = make_model(3, upsampling=upsampling)
    zs = model.sample_noise(4, 3, generator=gen())
    assert [tuple(z.shape[1:]) for z in zs] == [noise_shape(k) for k in (1, 2, 3)]
    x, logdet = model.decode(zs)
    zs2, logdet_inv = model.encode(x)
    for z, z2 in zip(zs, zs2):
        torch.testing.assert_close(z2, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.decode(zs2)[0], x, rtol=0, atol=1e-10)


def test_logdet_is_slogdet_of_jacobian(upsampling):
    model = make_model(3, upsampling=upsampling)  # 64 dimensions, two upsampling layers

    def noises(v):
        return [v[:4].reshape(1, 2, 2), v[4:16].reshape(1, 3, 2, 2), v[16:].reshape(1, 3, 4, 4)]

    for v in torch.randn(2, 64, dtype=F64, generator=gen()):
        jac = torch.autograd.functional.jacobian(lambda v: model.decode(noises(v))[0].flatten(), v)
        _, logdet = model.decode(noises(v))
        torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-9)


def test_sample_levels(upsampling):
    model = make_model(3, upsampling=upsampling)
    xs, log_ps = model.sample_levels(5, generator=gen())
    assert [x.shape[-1] for x in xs] == [2, 4, 8]
    x, log_q = model.sample(5, generator=gen())
    torch.testing.assert_close(xs[-1], x, rtol=0, atol=0)
    torch.testing.assert_close(log_ps[-1], log_q, rtol=0, atol=0)
    for x_l, log_p in zip(xs, log_ps):
        torch.testing.assert_close(model.log_prob(x_l), log_p, rtol=0, atol=1e-9)


def test_gradients_reach_every_parameter(upsampling):
    model = make_model(3, upsampling=upsampling)
    x, log_q = model.sample(4, generator=gen())
    (x.square().sum() + log_q.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    model.zero_grad(set_to_none=True)
    model.log_prob(x.detach()).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_surrogate_equals_model_when_last_flow_is_identity(upsampling):
    model = make_model(3, stage=2, upsampling=upsampling)
    model.grow()
    assert model.stage == 3
    x, log_q = model.sample(6, generator=gen())
    xs, log_s = model.sample_surrogate(6, generator=gen())
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    torch.testing.assert_close(log_s, log_q, rtol=0, atol=1e-9)
    torch.testing.assert_close(model.surrogate_log_prob(x), log_q, rtol=0, atol=1e-9)
    assert not log_s.requires_grad


def test_surrogate_is_previous_stage_pushed_through_conditioning(upsampling):
    model = make_model(3, upsampling=upsampling)  # F_3 perturbed: model and surrogate differ
    xs, log_s = model.sample_surrogate(6, 3, generator=gen())
    model.set_stage(2)
    x, log_q = model.sample(6, generator=gen(), level=3)
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    torch.testing.assert_close(log_s, log_q, rtol=0, atol=1e-9)
    model.set_stage(3)
    torch.testing.assert_close(model.surrogate_log_prob(xs), log_s, rtol=0, atol=1e-9)
    assert (model.log_prob(xs) - log_s).abs().max() > 1e-3


def test_stage_bounds():
    model = make_model(2, stage=2, perturbed=False)
    with pytest.raises(ValueError, match="stage"):
        model.grow()
    with pytest.raises(ValueError, match="stage"):
        model.set_stage(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load(tmp_path, dtype, upsampling):
    model = make_model(3, stage=2, upsampling=upsampling).to(dtype)
    model.save(tmp_path / "model.pt", metadata={"case": "test"})
    loaded = MsIGN.load(tmp_path / "model.pt", model.prior)
    assert loaded.stage == 2 and loaded.dtype == dtype and loaded.upsampling == upsampling
    x, log_q = model.sample(4, generator=gen())
    x2, log_q2 = loaded.sample(4, generator=gen())
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)


def test_float32_matches_float64(upsampling):
    model = make_model(3, upsampling=upsampling)
    zs = model.sample_noise(8, 3, generator=gen())
    x, logdet = model.decode(zs)
    model32 = make_model(3, upsampling=upsampling).to(torch.float32)
    x32, logdet32 = model32.decode([z.float() for z in zs])
    assert x32.dtype == logdet32.dtype == torch.float32
    assert model32.sample(2)[1].dtype == torch.float32
    torch.testing.assert_close(x32.double(), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logdet32.double(), logdet, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(model32.log_prob(x32).double(), model.log_prob(x), rtol=1e-4, atol=1e-3)


def test_base_density_constant():
    model = make_model(1, perturbed=False)
    z = torch.zeros(1, 2, 2, dtype=F64)
    x, logdet = model.decode([z])
    log_q = model.log_prob(x)
    torch.testing.assert_close(log_q, -2 * math.log(2 * math.pi) - logdet, rtol=0, atol=1e-12)


def test_level_mismatch_raises():
    model = make_model(2, perturbed=False)
    x = torch.zeros(1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match="level 1"):
        model.log_prob(x, level=1)
    with pytest.raises(ValueError, match="shape"):
        model.surrogate_log_prob(torch.zeros(1, 4, 3, dtype=F64))


def test_untrained_flows_are_the_identity(upsampling):
    model = make_model(3, perturbed=False, upsampling=upsampling)
    zs = model.sample_noise(5, 3, generator=gen())
    x, logdet = model.decode(zs)
    x0, logdet0 = model.decode(zs, upto=0)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet0, rtol=0, atol=1e-12)


def test_nearest_upsampling_keeps_averages_and_prior_mean():
    model = make_model(3, perturbed=False, upsampling="nearest")
    xs, _ = model.sample_levels(6, generator=gen())
    for coarse, fine in zip(xs, xs[1:]):
        torch.testing.assert_close(pool(fine), coarse, rtol=0, atol=1e-12)
    zeros = [torch.zeros(1, *noise_shape(k), dtype=F64) for k in (1, 2, 3)]
    mean = torch.from_numpy(model.prior.mean(3))[None]
    torch.testing.assert_close(model.decode(zeros)[0], mean, rtol=0, atol=1e-12)
    for level in (2, 3):  # same volume change as PC_l; independent details of scale sigma
        layer, pc = model.conditioning(level), model.prior.conditioning(level)
        assert layer.logdet == pytest.approx(pc.logdet, abs=1e-9) and layer.sigma > 0
    x, _ = model.conditioning(3).forward(xs[1], torch.ones(6, 3, 4, 4, dtype=F64))
    details = haar(x)[1] - haar(torch.from_numpy(model.prior.mean(3)))[1]
    torch.testing.assert_close(details, torch.full_like(details, model.conditioning(3).sigma))


def test_squeeze_split_places_coarse_field_and_noise():
    model = make_model(3, perturbed=False, upsampling="squeeze")
    zs = model.sample_noise(3, 3, generator=gen())
    x2 = model.decode(zs[:2])[0]
    x3, logdet3 = model.decode(zs)
    torch.testing.assert_close(x3[:, ::2, ::2], x2, rtol=0, atol=0)
    torch.testing.assert_close(x3[:, ::2, 1::2], zs[2][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(x3[:, 1::2, 1::2], zs[2][:, 2], rtol=0, atol=0)
    torch.testing.assert_close(logdet3, model.decode(zs[:1])[1], rtol=0, atol=0)  # permutations


def test_upsampling_option_is_checked_and_old_configs_load(tmp_path):
    with pytest.raises(ValueError, match="upsampling"):
        MsIGN(make_prior(2), upsampling="bilinear")
    model = make_model(2, stage=2)
    model.save(tmp_path / "model.pt")
    config = json.loads((tmp_path / "model.json").read_text())
    del config["upsampling"]  # written before the option existed
    (tmp_path / "model.json").write_text(json.dumps(config))
    assert MsIGN.load(tmp_path / "model.pt", model.prior).upsampling == "prior"
