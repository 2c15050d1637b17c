"""Tests for geoinvert.flows.msign: densities, inversion, Jacobians, surrogate, persistence."""

import math

import pytest
import torch

from geoinvert.flows.msign import MsIGN, noise_shape

F64 = torch.float64


class DensePrior:
    """Stand-in Gaussian prior with dense matrices, following the prior.py interface contract.

    Sigma_L(i, j) = exp(-|c_i - c_j| / 0.3) on the cell centres of the unit square; exact coarse
    covariances A Sigma A^T; PC_l splits each 2x2 block into its mean and 3 orthonormal Haar
    details w = D x and draws w | x_coarse.
    """

    def __init__(self, levels: int):
        self.levels = levels
        n = 2**levels
        c = (torch.arange(n, dtype=F64) + 0.5) / n
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        pts = torch.stack([yy.flatten(), xx.flatten()], 1)
        self.cov = {levels: torch.exp(-torch.cdist(pts, pts) / 0.3)}
        self.mu = {levels: 0.1 * pts[:, 0] - 0.2}
        for level in range(levels, 1, -1):
            a = block_matrix(2 ** (level - 1), [[0.25] * 4])
            self.cov[level - 1] = a @ self.cov[level] @ a.T
            self.mu[level - 1] = a @ self.mu[level]

    def coarsest(self, z):
        chol = torch.linalg.cholesky(self.cov[1])
        x = self.mu[1] + z.flatten(1) @ chol.T
        return x.reshape(-1, 2, 2), chol.diagonal().log().sum().item()

    def coarsest_inverse(self, x):
        chol = torch.linalg.cholesky(self.cov[1])
        z = torch.linalg.solve_triangular(chol, (x.flatten(1) - self.mu[1]).T, upper=False).T
        return z.reshape(-1, 2, 2), -chol.diagonal().log().sum().item()

    def conditioning(self, level):
        return DenseConditioning(self.cov[level], self.mu[level], 2 ** (level - 1))

    def log_prob(self, x, level):
        mvn = torch.distributions.MultivariateNormal(self.mu[level], self.cov[level])
        return mvn.log_prob(x.flatten(1))


HAAR = [[0.25] * 4, [0.5, -0.5, 0.5, -0.5], [0.5, 0.5, -0.5, -0.5], [0.5, -0.5, -0.5, 0.5]]


def block_matrix(m, rows):
    """Rows k * m*m + i*m + j applying rows[k] to the 2x2 block (i, j) of a (2m, 2m) field."""
    out = torch.zeros(len(rows) * m * m, 4 * m * m, dtype=F64)
    for k, row in enumerate(rows):
        for i in range(m):
            for j in range(m):
                cells = [(2 * i) * 2 * m + 2 * j, (2 * i) * 2 * m + 2 * j + 1,
                         (2 * i + 1) * 2 * m + 2 * j, (2 * i + 1) * 2 * m + 2 * j + 1]
                out[k * m * m + i * m + j, cells] = torch.tensor(row, dtype=F64)
    return out


class DenseConditioning:
    """x_fine = T^-1 [x_c; mean(w | x_c) + chol(S) z] with T = [A; D]."""

    def __init__(self, cov, mu, m):
        self.m, self.a, self.d = m, block_matrix(m, HAAR[:1]), block_matrix(m, HAAR[1:])
        t = torch.cat([self.a, self.d])
        self.t_inv = torch.linalg.inv(t)
        s_cc, s_wc = self.a @ cov @ self.a.T, self.d @ cov @ self.a.T
        self.gain = torch.linalg.solve(s_cc, s_wc.T).T
        self.mu_c, self.mu_w = self.a @ mu, self.d @ mu
        self.chol = torch.linalg.cholesky(self.d @ cov @ self.d.T - self.gain @ s_wc.T)
        self.logdet = (self.chol.diagonal().log().sum() - torch.linalg.slogdet(t)[1]).item()

    def forward(self, x_coarse, z):
        xc = x_coarse.flatten(1)
        w = self.mu_w + (xc - self.mu_c) @ self.gain.T + z.flatten(1) @ self.chol.T
        x = torch.cat([xc, w], 1) @ self.t_inv.T
        return x.reshape(-1, 2 * self.m, 2 * self.m), self.logdet

    def inverse(self, x_fine):
        xc, w = x_fine.flatten(1) @ self.a.T, x_fine.flatten(1) @ self.d.T
        r = w - self.mu_w - (xc - self.mu_c) @ self.gain.T
        z = torch.linalg.solve_triangular(self.chol, r.T, upper=False).T
        return xc.reshape(-1, self.m, self.m), z.reshape(-1, 3, self.m, self.m), -self.logdet


def make_prior(levels):
    return DensePrior(levels)


def make_model(levels=3, *, stage=None, perturbed=True, seed=0):
    torch.manual_seed(seed)
    model = MsIGN(make_prior(levels), blocks_per_level=2, hidden=8, stage=stage or levels)
    model = model.to(F64)
    if perturbed:
        with torch.no_grad():
            for p in model.active_parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_identity_model_is_prior():
    model = make_model(3, perturbed=False)
    x, log_q = model.sample(16, generator=gen())
    assert x.shape == (16, 8, 8) and x.dtype == F64
    torch.testing.assert_close(log_q, model.prior.log_prob(x, 3), rtol=0, atol=1e-9)
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-9)


def test_log_prob_of_samples():
    model = make_model(3)
    x, log_q = model.sample(16, generator=gen())
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-9)
    assert (log_q - model.prior.log_prob(x, 3)).abs().max() > 1e-3  # the flows act


def test_round_trip():
    model = make_model(3)
    zs = model.sample_noise(4, 3, generator=gen())
    assert [tuple(z.shape[1:]) for z in zs] == [noise_shape(k) for k in (1, 2, 3)]
    x, logdet = model.decode(zs)
    zs2, logdet_inv = model.encode(x)
    for z, z2 in zip(zs, zs2):
        torch.testing.assert_close(z2, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.decode(zs2)[0], x, rtol=0, atol=1e-10)


def test_logdet_is_slogdet_of_jacobian():
    model = make_model(2)

    def decode(v):
        return model.decode([v[:4].reshape(1, 2, 2), v[4:].reshape(1, 3, 2, 2)])[0].flatten()

    for v in torch.randn(2, 16, dtype=F64, generator=gen()):
        jac = torch.autograd.functional.jacobian(decode, v)
        _, logdet = model.decode([v[:4].reshape(1, 2, 2), v[4:].reshape(1, 3, 2, 2)])
        torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


def test_sample_levels():
    model = make_model(3)
    xs, log_ps = model.sample_levels(5, generator=gen())
    assert [x.shape[-1] for x in xs] == [2, 4, 8]
    x, log_q = model.sample(5, generator=gen())
    torch.testing.assert_close(xs[-1], x, rtol=0, atol=0)
    torch.testing.assert_close(log_ps[-1], log_q, rtol=0, atol=0)
    for x_l, log_p in zip(xs, log_ps):
        torch.testing.assert_close(model.log_prob(x_l), log_p, rtol=0, atol=1e-9)


def test_gradients_reach_every_parameter():
    model = make_model(3)
    x, log_q = model.sample(4, generator=gen())
    (x.square().sum() + log_q.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    model.zero_grad(set_to_none=True)
    model.log_prob(x.detach()).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_surrogate_equals_model_when_last_flow_is_identity():
    model = make_model(3, stage=2)
    model.grow()
    assert model.stage == 3
    x, log_q = model.sample(6, generator=gen())
    xs, log_s = model.sample_surrogate(6, generator=gen())
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    torch.testing.assert_close(log_s, log_q, rtol=0, atol=1e-9)
    torch.testing.assert_close(model.surrogate_log_prob(x), log_q, rtol=0, atol=1e-9)
    assert not log_s.requires_grad


def test_surrogate_is_previous_stage_pushed_through_conditioning():
    model = make_model(3)  # F_3 perturbed: model and surrogate now differ
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
def test_save_load(tmp_path, dtype):
    model = make_model(3, stage=2).to(dtype)
    model.save(tmp_path / "model.pt", metadata={"case": "test"})
    loaded = MsIGN.load(tmp_path / "model.pt", model.prior)
    assert loaded.stage == 2 and loaded.dtype == dtype
    x, log_q = model.sample(4, generator=gen())
    x2, log_q2 = loaded.sample(4, generator=gen())
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)


def test_float32_matches_float64():
    model = make_model(3)
    zs = model.sample_noise(8, 3, generator=gen())
    x, logdet = model.decode(zs)
    model32 = make_model(3).to(torch.float32)
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
