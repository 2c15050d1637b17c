"""Correction of a flow to exactness: the latent target, its gradient, and exact posteriors.

The chains of the statistical tests are checked against exact posteriors with thresholds set
by their own Monte-Carlo error (ESS-based z-scores), as in tests/test_samplers.py.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from geoinvert.diagnostics import mcmc_ess
from geoinvert.flows.msign import MsIGN
from geoinvert.problem.forward.testbeds import (ExactLinearPosterior, ExactQuadraticPosterior,
                                        LinearForward, QuadraticForward, paper_phi)
from geoinvert.inference.config import CorrectionConfig
from geoinvert.inference.correction import (FlowTransport, LatentTarget, ModeCoordinates,
                                            correct)
from geoinvert.problem.posterior import Posterior
from geoinvert.priors import MaternPrior
from geoinvert.inference.trainer import train_msign
from geoinvert.testing import assert_sides_match, bimodal_quadratic, gaussian_kl, z_scores
from geoinvert.verify import taylor_test

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed_flow(prior, *, scale=0.05, seed=0):
    """An MsIGN near the identity (the prior) with random weights: a deliberately poor flow."""
    torch.manual_seed(seed)
    model = MsIGN(prior, blocks_per_level=2, hidden=8).to(F64)
    with torch.no_grad():
        for p in model.active_parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def linear():
    """8x8 Matern prior, three precise linear observations, and the exact posterior."""
    level = 3
    prior = MaternPrior(level, correlation_length=0.3, std=1.0, mean=0.1)
    functions = [paper_phi, lambda x, y: np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.05),
                 lambda x, y: x + y ** 2]
    forward = LinearForward(functions, (2 ** level,) * 2)
    data, noise = np.array([0.1, 0.05, 0.8]), np.array([0.01, 0.01, 0.02])
    posterior = Posterior(prior, forward, data, noise, level)
    exact = ExactLinearPosterior(prior.mean(level).ravel(), prior.covariance(level),
                                 forward.matrix, data, noise, shape=(2 ** level,) * 2)
    return posterior, exact


def test_config_counts_its_solves_and_rejects_bad_settings():
    c = CorrectionConfig(kernel="hmc", chains=3, warmup=100, draws=50, leapfrog=4)
    assert c.solves() == 3 * (1 + 2 + 150 * 5)     # start, two metric updates, (4 + 1) each
    # with two modes, as many independence moves as leapfrog steps and a mode jump
    assert c.solves(modes=2) == 3 * (1 + 2 + 150 * (4 + 4 + 1))
    assert CorrectionConfig(kernel="pcn", chains=2, warmup=10, draws=5,
                            independence=False).solves() == 2 * (1 + 15)
    assert CorrectionConfig(kernel="none").solves() == 0
    # a budget sets aside the correction at 8 leapfrog steps (the trajectories fit its share)
    assert CorrectionConfig(chains=2, warmup=0, draws=10, independence=False).reserved() == \
        2 * (1 + 10 * 8)
    with pytest.raises(ValueError, match="kernel"):
        CorrectionConfig(kernel="nuts")
    with pytest.raises(ValueError, match="draws"):
        CorrectionConfig(draws=2)


def test_latent_target_is_the_pulled_back_posterior(linear):
    """log pi_T(z) = log pi(T(z)) + log|det dT/dz| with the log-determinant checked against
    the autograd Jacobian, and log q_T at the state equals the flow's own log_prob."""
    posterior, _ = linear
    model = perturbed_flow(MaternPrior(2, correlation_length=0.3))
    forward = LinearForward([paper_phi], (4, 4))
    small = Posterior(model.prior, forward, np.array([0.2]), np.array([0.1]), 2)
    transport = FlowTransport(model)
    target = LatentTarget(small, transport)
    z = torch.randn(3, transport.dim, generator=gen(), dtype=F64)
    x, value, grad, log_post = target.whitened(z)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: transport.to_x(v[None])[0].reshape(-1), z[i])
        logdet = torch.linalg.slogdet(jac)[1]
        expected = small.log_prob(x[i:i + 1])[0] + logdet
        assert float(value[i]) == pytest.approx(float(expected), abs=1e-9)
    torch.testing.assert_close(log_post, small.log_prob(x))
    torch.testing.assert_close(target.flow_log_prob(z, value, log_post), model.log_prob(x),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(transport.to_z(x), z, rtol=0, atol=1e-10)
    assert target.nfs == 3


@pytest.mark.parametrize("metric", [None, "diagonal", "dense"])
def test_latent_target_gradient_passes_the_taylor_test(metric):
    model = perturbed_flow(MaternPrior(2, correlation_length=0.3), scale=0.1)
    forward = LinearForward([paper_phi, lambda x, y: x * y], (4, 4))
    post = Posterior(model.prior, forward, np.array([0.2, 0.1]), np.array([0.05, 0.05]), 2)
    target = LatentTarget(post, FlowTransport(model))
    d = target.transport.dim
    if metric == "diagonal":
        target.set_metric(torch.linspace(0.2, 2.0, d, dtype=F64))
    elif metric == "dense":
        a = torch.randn(d, d, generator=gen(3), dtype=F64)
        target.set_metric(torch.linalg.cholesky(a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)))
    u = torch.randn(1, d, generator=gen(1), dtype=F64)
    result = taylor_test(lambda v: _value(target, v), u, generator=gen(2))
    assert result.rate == pytest.approx(2.0, abs=0.1)


def _value(target, u):
    """log pi_u(u) as a differentiable scalar (the same expression as LatentTarget.whitened)."""
    x, logdet = target.transport.to_x(target.latent(u))
    return (target.posterior.log_prob(x) + logdet + target.logdet).sum()


def test_whitened_gradient_equals_autograd_of_the_value():
    model = perturbed_flow(MaternPrior(2, correlation_length=0.3), scale=0.1)
    forward = LinearForward([paper_phi], (4, 4))
    post = Posterior(model.prior, forward, np.array([0.2]), np.array([0.05]), 2)
    target = LatentTarget(post, FlowTransport(model))
    target.set_metric(torch.linspace(0.5, 1.5, target.transport.dim, dtype=F64))
    u = torch.randn(4, target.transport.dim, generator=gen(5), dtype=F64)
    _, value, grad, _ = target.whitened(u)
    leaf = u.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_value(target, leaf), leaf)
    torch.testing.assert_close(grad, expected)


@pytest.mark.slow
def test_correction_of_an_undertrained_flow_recovers_the_exact_linear_posterior(linear):
    """A flow trained for three steps is far from the posterior (its importance weights are
    unusable); the corrected chains match the exact mean and covariance within Monte-Carlo
    error, per cell, along the data directions, and in the Gaussian KL of their moments.

    Thresholds: 4.5 MC standard errors per statistic (64 cells: small family-wise false alarm
    rate even with a 20 % error in the estimated ESS), the RMS of the z-scores below 2; the KL
    of a Gaussian fitted to N independent draws of the exact law is about d(d+3)/(4 N), so with
    N the median ESS of the cells' squared deviations (second moments mix more slowly than
    means under HMC), twice that bounds it.
    """
    posterior, exact = linear
    level = posterior.level
    torch.manual_seed(0)
    model = MsIGN(posterior.prior, blocks_per_level=2, hidden=8).to(F64)
    train_msign(model, {l: Posterior(posterior.prior, posterior.forward.at_level(l),
                                     posterior.data, posterior.noise, l)
                        for l in range(1, level + 1)},
                steps=3, batch=16, lr=1e-3, pool=64, generator=gen())
    starts, _ = model.sample(6, generator=gen(1))
    config = CorrectionConfig(kernel="hmc", chains=6, warmup=160, draws=240, leapfrog=6)
    res = correct(posterior, FlowTransport(model), starts.detach(), config, generator=gen(2))
    c = res.chains
    assert c.nfs <= config.solves() and res.metric == "dense"
    # a transition integrates for pi / 2 (a quarter period of a unit Gaussian), at most 6 steps
    assert res.leapfrog == min(6, math.ceil(math.pi / 2 / c.step_size))
    cells = c.samples.reshape(*c.samples.shape[:2], -1)
    z_mean = z_scores(cells, exact.mean)
    z_var = z_scores((cells - exact.mean) ** 2, np.diag(exact.cov))
    for z in (z_mean, z_var):
        assert np.abs(z).max() < 4.5 and np.sqrt(np.mean(z ** 2)) < 2.0, z
    # the data directions: t_k = g_k . x, whose posterior variance the data set
    g = posterior.forward.matrix
    t = cells @ g.T
    exact_t_var = np.diag(g @ exact.cov @ g.T)
    assert np.abs(z_scores(t, g @ exact.mean)).max() < 4.5
    assert np.abs(z_scores((t - g @ exact.mean) ** 2, exact_t_var)).max() < 4.5
    flat = cells.reshape(-1, cells.shape[2])
    squares = (cells - exact.mean) ** 2
    n_eff = np.median([mcmc_ess(squares[:, :, k], rank_normalize=False) for k in range(64)])
    kl = gaussian_kl(flat.mean(0), np.cov(flat.T), exact.mean, exact.cov)
    assert kl < 2 * 64 * 67 / (4 * n_eff), (kl, n_eff)
    assert c.rhat() < 1.05 and np.isfinite(c.log_prob).all()
    np.testing.assert_allclose(c.log_prob.reshape(-1)[:5],
                               posterior.log_prob(torch.from_numpy(c.flat()[:5])).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("coordinates", ["flow", "laplace", "modes"])
def test_independence_moves_balance_the_modes_of_the_quadratic_posterior(coordinates):
    """Bimodal quadratic posterior (modes at t = +-0.14 of width 0.018, symmetric prior: exact
    masses 50/50). The flow is the prior (t-std 0.12, so it covers both modes), slightly
    perturbed; all chains start in the positive mode. The local moves run in the flow's latent
    space, in the coordinates of the Laplace approximation at one of the modes (the flow
    then proposes the independence moves alone), or each chain in those of its own mode
    (:class:`ModeCoordinates`; the Laplace approximations at both modes join the flow in the
    independence proposal).
    Local HMC alone cannot cross between the modes; with independence moves (and, in per-mode
    coordinates, mode jumps) the chains do, and the positive fraction is 0.5 within 0.05
    (about four standard errors at the ESS of the sign, which the test also requires to
    exceed 200)."""
    from geoinvert.inference.laplace import fit_laplace
    post, exact, w = bimodal_quadratic()
    prior = post.prior
    assert exact.mode_mass() == pytest.approx(0.5, abs=1e-9)
    model = perturbed_flow(prior, scale=0.02)
    draws = exact.sample(400, gen(7))
    starts = draws[draws.reshape(400, -1) @ torch.as_tensor(w) > 0][:8]
    config = CorrectionConfig(kernel="hmc", chains=8, warmup=150, draws=400, leapfrog=6)
    flow = FlowTransport(model)
    if coordinates == "flow":
        res = correct(post, flow, starts, config, generator=gen(3))
    elif coordinates == "laplace":
        laplace = fit_laplace(post, generator=gen(5))
        res = correct(post, laplace.transport, starts, config, generator=gen(3),
                      approximation=flow)
    else:
        laplace = fit_laplace(post, all_modes=True, generator=gen(5))
        assert len(laplace.modes) == 2
        res = correct(post, ModeCoordinates(laplace.modes), starts, config, generator=gen(3),
                      approximation=flow, modes=laplace.modes)
        assert res.exits < 0.01 * 8 * (config.warmup + config.draws) * config.leapfrog
        # the modes are mirror images, alike up to their Laplace maps (which fit them only
        # roughly): most jumps between them are accepted. As many independence moves as
        # leapfrog steps follow each transition; the solves of both are counted
        assert np.nanmean(res.jump_acceptance) > 0.75
        assert res.independence_moves == res.leapfrog
        assert res.chains.nfs <= config.solves(modes=2)
        assert res.chains.nfs >= config.solves(leapfrog=1, modes=2) + 8 * config.draws * 2 * (
            res.leapfrog - 1)
    t = res.chains.samples.reshape(8, config.draws, -1) @ w
    positive = (t > 0).astype(float)
    assert mcmc_ess(positive, rank_normalize=False) > 200
    if coordinates == "modes":
        # the result's mode shares: the draws in each Laplace fit's region are those on its
        # side of t = 0 (the modes lie 16 widths apart), and their ESS is that of the sign
        from geoinvert.app import _mode_diagnostics
        d = _mode_diagnostics(laplace.modes, res.chains.samples, chunk=500)
        side = 0 if float(laplace.modes[0].to_x(torch.zeros((1, laplace.modes[0].dim),
                                                                dtype=torch.float64))[0]
                          .reshape(-1) @ torch.as_tensor(w)) > 0 else 1
        assert d["mode_shares"][side] == pytest.approx(positive.mean(), abs=1e-3)
        assert d["mode_ess"] == pytest.approx(mcmc_ess(positive, rank_normalize=False),
                                              rel=0.02)
        assert d["mode_shares_mcse"][0] < 0.05 / 2
    else:
        assert np.isnan(res.jump_acceptance).all()
    assert positive.mean() == pytest.approx(0.5, abs=0.05)
    assert np.nanmean(res.independence_acceptance) > 0.05
    # the stored density is the flow's at the corrected draws, whatever the coordinates
    x = torch.from_numpy(res.chains.samples[:2, :3].reshape(6, *starts.shape[1:]))
    np.testing.assert_allclose(res.flow_log_prob[:2, :3].reshape(-1), flow.log_prob(x).numpy(),
                               rtol=1e-9, atol=1e-9)
    # the 1-D marginal along the data direction: each mode's centre and width, no mass between
    t_exact = exact.sample_t(20000, gen(9)).numpy()
    assert_sides_match(t, t_exact, centre=0.005, width=0.15)
    between = np.mean(np.abs(t_exact) < 0.07)
    assert np.mean(np.abs(t) < 0.07) < between + 0.01


@pytest.mark.slow
def test_chains_share_out_over_four_modes_in_their_exact_masses():
    """Four modes of equal mass (two quadratic observations independent under the prior,
    exact posterior known): the mode search finds all four, each chain moves in the Laplace
    coordinates of its own mode, and the independence moves carry the chains between them.
    All chains start in one orthant of t; the share of each orthant is 1/4 within 0.05
    (3.7 standard errors at an ESS of 1000 of the orthant indicators, which the test requires;
    about 2500 here), and along each data direction each side has the exact centre and
    width."""
    from geoinvert.inference.laplace import fit_laplace
    from geoinvert.testing import four_mode_quadratic
    post, exact, W = four_mode_quadratic()
    np.testing.assert_allclose(exact.orthant_masses(), 0.25, atol=1e-12)
    model = perturbed_flow(post.prior, scale=0.02)
    draws = exact.sample(800, gen(7))
    starts = draws[exact.orthant(draws) == 3][:8]
    laplace = fit_laplace(post, all_modes=True, generator=gen(5))
    assert len(laplace.modes) == 4
    config = CorrectionConfig(kernel="hmc", chains=8, warmup=150, draws=400, leapfrog=6)
    res = correct(post, ModeCoordinates(laplace.modes), starts, config, generator=gen(3),
                  approximation=FlowTransport(model), modes=laplace.modes)
    x = torch.from_numpy(res.chains.samples.reshape(-1, *starts.shape[1:]))
    which = exact.orthant(x).numpy().reshape(8, config.draws)
    for k in range(4):
        inside = (which == k).astype(float)
        assert mcmc_ess(inside, rank_normalize=False) > 1000
        assert inside.mean() == pytest.approx(0.25, abs=0.05)
    t = x.reshape(len(x), -1).numpy() @ W.T
    for k, part in enumerate(exact.parts):
        ref = part.sample_t(20000, gen(9 + k)).numpy()
        assert_sides_match(t[:, k], ref, centre=0.005, width=0.15)


def _shifted(transport, shift):
    """A copy of a Laplace transport with its centre moved by ``shift`` (whitened units)."""
    from geoinvert.inference.laplace import LaplaceTransport
    return LaplaceTransport(transport.whitening, transport.z_map + shift, transport.eigenvalues,
                            transport.eigenvectors, log_target=transport.log_target)


def test_mode_coordinates_place_each_field_in_its_modes_coordinates(linear):
    """Two Laplace maps (the linear posterior's, and one moved by three prior std along its
    stiffest direction): fields near each centre lie in its region, the maps invert row by
    row in the mode given, and the latent target is the pulled-back posterior in its chain's
    region and -inf outside it, each such evaluation counted."""
    from geoinvert.inference.laplace import fit_laplace
    posterior, _ = linear
    fit = fit_laplace(posterior, generator=gen(5))
    a = fit.transport
    b = _shifted(a, 3.0 * a.eigenvectors[:, 0])
    coords = ModeCoordinates([a, b])
    u = 0.1 * torch.randn(6, a.dim, generator=gen(1), dtype=F64)
    modes = torch.tensor([0, 1, 0, 1, 1, 0])
    x, logdet = coords.to_x(u, modes)
    assert torch.equal(coords.region(x), modes)
    torch.testing.assert_close(coords.to_z(x, modes), u, rtol=1e-9, atol=1e-9)
    for k, m in enumerate((a, b)):
        xk, lk = m.to_x(u[modes == k])
        torch.testing.assert_close(x[modes == k], xk)
        torch.testing.assert_close(logdet[modes == k], lk)
    target = LatentTarget(posterior, coords)
    torch.testing.assert_close(target.to_z(x), u, rtol=1e-9, atol=1e-9)
    assert torch.equal(target.modes, modes)
    _, value, grad, log_post = target.whitened(u)
    torch.testing.assert_close(value, posterior.log_prob(x) + logdet)
    assert target.exits == 0
    wrong = coords.to_z(x, 1 - modes)          # the same fields in the other mode's coordinates
    _, value, grad, _ = target.whitened(wrong, modes=1 - modes)
    assert torch.isneginf(value).all() and (grad == 0).all() and target.exits == 6
    with pytest.raises(ValueError, match="two or more"):
        ModeCoordinates([a])


@pytest.mark.slow
@pytest.mark.parametrize("independence", [True, False])
def test_per_mode_coordinates_keep_the_exact_linear_posterior(linear, independence):
    """A unimodal posterior split into two regions of unequal mass by two Laplace maps (its
    own, and one moved by 1.5 posterior std along its best-determined direction): each chain
    moves in its region's coordinates, local moves that leave it are rejected, and the mode
    jumps (with or without independence moves) carry chains between the regions. A jump
    keeps the chain's coordinates, so it moves the field by the shift between the maps, and
    the target differs on the two sides: only the Metropolis-Hastings ratio keeps the chains
    exact. The pooled chains match the exact mean and covariance within Monte-Carlo error (the
    thresholds of the flow's test above), and so does the mass of the smaller region."""
    from geoinvert.inference.laplace import fit_laplace
    posterior, exact = linear
    fit = fit_laplace(posterior, generator=gen(5))
    a = fit.transport
    lam = float(a.eigenvalues[0])
    b = _shifted(a, 1.5 * a.eigenvectors[:, 0] / math.sqrt(1 + lam))
    coords = ModeCoordinates([a, b])
    starts, _ = a.sample(6, gen(1))
    config = CorrectionConfig(kernel="hmc", chains=6, warmup=160, draws=300, leapfrog=6,
                              independence=independence)
    res = correct(posterior, coords, starts, config, generator=gen(2), modes=[a, b],
                  approximation=FlowTransport(perturbed_flow(posterior.prior, scale=0.02)))
    c = res.chains
    assert res.exits > 0 and 0.05 < np.nanmean(res.jump_acceptance) < 0.95
    if independence:
        assert np.nanmean(res.independence_acceptance) > 0.05
    else:
        assert np.isnan(res.independence_acceptance).all()
    cells = c.samples.reshape(*c.samples.shape[:2], -1)
    z_mean = z_scores(cells, exact.mean)
    z_var = z_scores((cells - exact.mean) ** 2, np.diag(exact.cov))
    for z in (z_mean, z_var):
        assert np.abs(z).max() < 4.5 and np.sqrt(np.mean(z ** 2)) < 2.0, z
    flat = cells.reshape(-1, cells.shape[2])
    squares = (cells - exact.mean) ** 2
    n_eff = np.median([mcmc_ess(squares[:, :, k], rank_normalize=False) for k in range(64)])
    kl = gaussian_kl(flat.mean(0), np.cov(flat.T), exact.mean, exact.cov)
    assert kl < 2 * 64 * 67 / (4 * n_eff), (kl, n_eff)
    # the second region's mass: the regions split the exact posterior's draws
    regions = coords.region(torch.from_numpy(c.flat())).numpy().reshape(c.samples.shape[:2])
    truth = coords.region(torch.from_numpy(
        exact.sample(20000, gen(8)).numpy().reshape(-1, 8, 8))).double().mean().item()
    assert 0.05 < truth < 0.45
    assert np.abs(z_scores(regions[:, :, None].astype(float), [truth])).max() < 4.5


def _assert_exact_linear(chains, posterior, exact):
    """The chains' mean and variance per cell and their mean along the data directions match
    the exact linear posterior (ESS-based z-scores)."""
    cells = chains.samples.reshape(*chains.samples.shape[:2], -1)
    for z in (z_scores(cells, exact.mean), z_scores((cells - exact.mean) ** 2,
                                                    np.diag(exact.cov))):
        assert np.abs(z).max() < 4.5 and np.sqrt(np.mean(z ** 2)) < 2.0, z
    g = posterior.forward.matrix
    assert np.abs(z_scores(cells @ g.T, g @ exact.mean)).max() < 4.5


def test_lifted_kernel_in_the_correction_recovers_the_exact_linear_posterior(linear):
    """The lifted kernel as the correction's local move, with the flow's independence moves
    (a poor flow near the prior): exact mean and variance per cell and along the data
    directions (z-scores, as the HMC test above), the stored log densities are the posterior's,
    every solve is counted, and a transition integrates for a quarter period."""
    posterior, exact = linear
    model = perturbed_flow(posterior.prior)
    starts = exact.sample(4, gen(5)).reshape(4, 8, 8)
    config = CorrectionConfig(kernel="lifted", chains=4, warmup=40, draws=200, leapfrog=16)
    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(6))
    c = res.chains
    assert c.method.endswith("-lifted") and res.metric == "unit"
    # no metric windows: the warm-up keeps its step-only phases (75 of 250 at the default)
    assert c.warmup == config.warmup_iterations() == 12
    assert CorrectionConfig(kernel="lifted").warmup_iterations() == 75
    assert res.leapfrog == min(16, math.ceil(math.pi / 2 / c.step_size))
    _assert_exact_linear(c, posterior, exact)
    np.testing.assert_allclose(c.log_prob.reshape(-1)[:5],
                               posterior.log_prob(torch.from_numpy(c.flat()[:5])).numpy())
    # starts (4), their lift (4) and at least two forward solves a leapfrog step
    assert c.nfs >= 8 + 2 * 4 * (config.warmup + config.draws)
    assert np.isfinite(res.independence_acceptance).all()


def test_auto_kernel_switches_to_lifted_where_hmc_trajectories_are_long(linear):
    """``auto`` in the latent space of a poor flow (near the prior) of a posterior with three
    precise data: HMC's quarter period after the first step-only phase is far beyond the
    break-even, so the chains go on with the lifted kernel, and its draws are exact (as the
    lifted kernel's above); the HMC phase counts towards the lifted warm-up."""
    from geoinvert.inference.config import LIFTED_BREAKEVEN
    posterior, exact = linear
    starts = exact.sample(4, gen(5)).reshape(4, 8, 8)
    config = CorrectionConfig(kernel="auto", chains=4, warmup=40, draws=200, leapfrog=16)
    res = correct(posterior, FlowTransport(perturbed_flow(posterior.prior)), starts, config,
                  generator=gen(6))
    c = res.chains
    assert res.pilot_leapfrog > LIFTED_BREAKEVEN
    assert c.method.endswith("-lifted") and res.metric == "unit"
    # 6 HMC iterations (15 % of 40), then the rest of the lifted kernel's 12
    assert c.warmup == CorrectionConfig(kernel="lifted", warmup=40).warmup_iterations() == 12
    _assert_exact_linear(c, posterior, exact)


def test_auto_kernel_is_hmc_where_its_trajectories_are_short(linear):
    """In the Laplace coordinates of a linear posterior (exact whitening) a quarter period
    takes a few leapfrog steps: ``auto`` keeps HMC, and its chains are those of ``hmc``, bit
    for bit (the choice draws nothing and solves nothing)."""
    from geoinvert.inference.laplace import fit_laplace
    posterior, exact = linear
    laplace = fit_laplace(posterior, generator=gen(1))
    starts = exact.sample(4, gen(5)).reshape(4, 8, 8)
    runs = {kernel: correct(posterior, laplace.transport, starts,
                            CorrectionConfig(kernel=kernel, warmup=40, draws=20),
                            generator=gen(6))
            for kernel in ("auto", "hmc")}
    assert runs["auto"].pilot_leapfrog <= 16 and runs["hmc"].pilot_leapfrog is None
    assert runs["auto"].chains.method == runs["hmc"].chains.method == "laplace-hmc"
    np.testing.assert_array_equal(runs["auto"].chains.samples, runs["hmc"].chains.samples)
    assert runs["auto"].chains.nfs == runs["hmc"].chains.nfs


def test_auto_kernel_chooses_again_from_the_cost_of_hmcs_first_block(linear, monkeypatch):
    """The second choice, after HMC's first block: where the lifted kernel's solves per
    effective draw are far below HMC's measured ones (here made so by setting the lifted
    kernel's figure to a tenth of a solve), the chains drop the block, warm the lifted kernel
    up and go on with it, and their draws are exact; where HMC's block is cheaper than the
    lifted kernel's warm-up alone could be, HMC goes on bit for bit."""
    import geoinvert.inference.correction as correction
    from geoinvert.inference.laplace import fit_laplace
    posterior, exact = linear
    laplace = fit_laplace(posterior, generator=gen(1))
    starts = exact.sample(4, gen(5)).reshape(4, 8, 8)
    config = CorrectionConfig(kernel="auto", chains=4, warmup=40, draws=100, max_draws=400,
                              leapfrog=16)
    asked = []

    def extend(samples, log_prob, nfs):
        asked.append(samples.shape[1])
        return 100 if len(asked) < 3 else 0       # blocks of 100 until the third look

    runs = {}
    for kernel in ("auto", "hmc"):
        asked.clear()
        runs[kernel] = correct(posterior, laplace.transport, starts,
                               dataclasses.replace(config, kernel=kernel), generator=gen(6),
                               extend=extend)
    assert runs["auto"].pilot_leapfrog <= 16 and runs["auto"].hmc_solves_per_ess is None
    np.testing.assert_array_equal(runs["auto"].chains.samples, runs["hmc"].chains.samples)

    monkeypatch.setattr(correction, "LIFTED_SOLVES_PER_ESS", 0.1)
    asked.clear()
    res = correct(posterior, laplace.transport, starts, config, generator=gen(6),
                  extend=extend)
    c = res.chains
    assert res.pilot_leapfrog <= 16 and res.hmc_solves_per_ess > 0
    assert c.method == "laplace-lifted" and res.leapfrog < 16
    # HMC's warm-up, its dropped block of 100 draws and the lifted kernel's own 12
    assert c.warmup == 40 + 100 + 12
    assert asked == [100, 100, 200] and c.samples.shape[1] == 200
    _assert_exact_linear(c, posterior, exact)


def test_the_second_choice_weighs_hmcs_measured_cost_against_the_lifted_kernels():
    """:func:`_lifted_pays` on blocks of known mixing: independent draws at 10 solves an
    iteration keep HMC; draws as correlated as a slow HMC's (AR(1), phi 0.99) at 100 solves
    an iteration switch, and the figure returned is the block's solves per effective draw."""
    from geoinvert.inference.config import LIFTED_BREAKEVEN, LIFTED_SOLVES_PER_ESS
    from geoinvert.inference.correction import _lifted_pays
    from geoinvert.samplers import ChainResult
    rng = np.random.default_rng(3)
    config = CorrectionConfig(kernel="hmc")
    iid = (rng.standard_normal((4, 200, 2, 2)), rng.standard_normal((4, 200)))
    assert _lifted_pays(iid, 4 * 200 * 10, 200, False, config, lambda a: a) is None
    noise = rng.standard_normal((4, 200, 5))
    ar = np.empty_like(noise)
    ar[:, 0] = noise[:, 0]
    for i in range(1, 200):
        ar[:, i] = 0.99 * ar[:, i - 1] + math.sqrt(1 - 0.99 ** 2) * noise[:, i]
    slow = (ar[..., :4].reshape(4, 200, 2, 2), ar[..., 4])
    ess = ChainResult.of_draws(*slow).ess()
    assert ess < 100
    got = _lifted_pays(slow, 4 * 200 * 100, 200, False, config, lambda a: a)
    assert got == pytest.approx(4 * 200 * 100 / ess)
    # the same block where HMC's transitions are cheap: the lifted warm-up alone costs more
    lifted = 75 * 4 * 2 * LIFTED_BREAKEVEN + 2 * ess * LIFTED_SOLVES_PER_ESS
    assert 200 * 4 * 5 < lifted
    assert _lifted_pays(slow, 4 * 200 * 5, 200, False, config, lambda a: a) is None


def test_auto_kernel_keeps_hmc_where_the_lifted_kernel_cannot_run(linear):
    """No choice is made (HMC throughout, no pilot) with more observations than parameters,
    more than 32x32 parameters, a forward model without second-order adjoints, or a solve
    budget; several modes do not stop it."""
    from types import SimpleNamespace
    from geoinvert.inference.correction import _lifted_possible
    from geoinvert.problem.forward.elliptic import EllipticForward
    from mpi4py import MPI
    posterior, exact = linear
    assert _lifted_possible(LatentTarget(posterior, SimpleNamespace(dim=64)))
    assert not _lifted_possible(LatentTarget(posterior, SimpleNamespace(dim=2)))
    assert not _lifted_possible(LatentTarget(posterior, SimpleNamespace(dim=64 * 64)))
    two = ModeCoordinates([SimpleNamespace(dim=64, log_mass=0.0)] * 2)
    assert _lifted_possible(LatentTarget(posterior, two))      # several modes: per-mode jumps
    forward = EllipticForward(MPI.COMM_SELF, (4, 4), mesh_cells=(8, 8), solver="lu",
                              points=[[0.3, 0.3]], dirichlet={"left": 0.0, "right": 1.0},
                              source=1.0)
    lu = Posterior(MaternPrior(2, correlation_length=0.3), forward, np.array([0.2]),
                   np.array([0.01]), 2)
    assert not _lifted_possible(LatentTarget(lu, SimpleNamespace(dim=16)))
    starts = exact.sample(4, gen(5)).reshape(4, 8, 8)
    res = correct(posterior, FlowTransport(perturbed_flow(posterior.prior)), starts,
                  CorrectionConfig(kernel="auto", warmup=40, draws=4), generator=gen(6),
                  max_solves=10 ** 6)
    assert res.pilot_leapfrog is None and res.chains.method.endswith("-hmc")


def test_lifted_kernel_places_a_chain_that_crosses_into_another_modes_region():
    """With per-mode coordinates the lifted kernel is not held to a chain's region: a chain
    that crosses the saddle between two joined modes is placed in the other mode's
    coordinates, and its stored target is the pulled-back posterior there."""
    from geoinvert.inference.laplace import fit_laplace
    from geoinvert.samplers.lifted import LiftedKernel
    post, exact, w = bimodal_quadratic(noise=0.012)      # 29 % of the mass between the modes
    laplace = fit_laplace(post, all_modes=True, generator=gen(5))
    coords = ModeCoordinates(laplace.modes)
    target = LatentTarget(post, coords)
    kernel = LiftedKernel(target, exact.sample(8, gen(7)), most=16)
    crossed = 0
    for k in range(30):
        before = target.modes.clone()
        kernel.step(0.4, gen(10 + k))
        crossed += int((target.modes != before).sum())
        np.testing.assert_array_equal(target.modes.numpy(), coords.region(kernel.x).numpy())
    assert crossed > 0 and target.exits == 0
    x, value, _, log_prob = target.whitened(kernel.z, grad=False)
    np.testing.assert_allclose(x.numpy(), kernel.x.numpy(), atol=1e-9)
    np.testing.assert_allclose(value.numpy(), kernel.value.numpy(), rtol=1e-9)
    np.testing.assert_allclose(log_prob.numpy(), kernel.log_prob.numpy(), rtol=1e-9)


@pytest.mark.slow
def test_lifted_kernel_with_mode_jumps_weighs_two_joined_modes():
    """The lifted kernel in per-mode coordinates with the mode jumps and no independence
    moves, on a bimodal quadratic posterior whose modes are joined (29 % of the mass lies
    between them; exact masses 50/50). All chains start on one side; the positive fraction is
    0.5 within 0.05 (more than six standard errors at the sign's ESS, which the test requires
    to exceed 1000), and along the data direction each side has the exact centre and width and
    the exact mass near the saddle."""
    from geoinvert.inference.laplace import fit_laplace
    post, exact, w = bimodal_quadratic(noise=0.012)
    laplace = fit_laplace(post, all_modes=True, generator=gen(5))
    assert len(laplace.modes) == 2
    draws = exact.sample(400, gen(7))
    starts = draws[draws.reshape(400, -1) @ torch.as_tensor(w) > 0][:8]
    config = CorrectionConfig(kernel="lifted", chains=8, warmup=60, draws=250, leapfrog=16,
                              independence=False)
    res = correct(post, ModeCoordinates(laplace.modes), starts, config, generator=gen(3),
                  modes=laplace.modes)
    assert res.chains.method == "laplace-lifted" and res.exits == 0
    assert np.nanmean(res.jump_acceptance) > 0.5
    t = res.chains.samples.reshape(8, config.draws, -1) @ w
    positive = (t > 0).astype(float)
    assert mcmc_ess(positive, rank_normalize=False) > 1000
    assert positive.mean() == pytest.approx(0.5, abs=0.05)
    t_exact = exact.sample_t(20000, gen(9)).numpy()
    assert_sides_match(t, t_exact, centre=0.01, width=0.1)
    near = 0.5 * math.sqrt(0.02)
    assert np.mean(np.abs(t) < near) == pytest.approx(np.mean(np.abs(t_exact) < near), abs=0.05)


def test_lifted_kernel_relifts_chains_other_moves_moved(linear):
    """After an accepted independence move the chain's lifted state is stale: the next
    transition lifts it again (one solve) from its new field."""
    from geoinvert.samplers.lifted import LiftedKernel
    posterior, exact = linear
    target = LatentTarget(posterior, FlowTransport(perturbed_flow(posterior.prior)))
    kernel = LiftedKernel(target, exact.sample(3, gen(7)).reshape(3, 8, 8), most=8)
    other = exact.sample(3, gen(8)).reshape(3, 8, 8)
    u = target.to_z(other)
    x, value, grad, log_prob = target.whitened(u, grad=False)
    flags = torch.tensor([True, False, True])
    kernel.accept(flags, u, x, value, grad, log_prob)
    before = target.nfs
    kernel.step(1e-6, gen(9))         # a tiny step: the chains stay near where they are
    assert target.nfs >= before + 2
    z = kernel.manifold.to_z(kernel.x.numpy())
    np.testing.assert_allclose(kernel.lifted[0][:, : kernel.manifold.d], z, atol=1e-9)
    np.testing.assert_allclose(kernel.x.numpy()[[0, 2]], other.numpy()[[0, 2]], atol=1e-4)


def test_failed_solves_of_proposals_are_counted_and_rejected(linear):
    """A forward model that fails (NaN) beyond |x| > 2.2 anywhere: the chains never accept a
    failed point, and every failure is counted."""
    posterior, _ = linear

    class Fragile:
        n_obs = posterior.forward.n_obs

        def __call__(self, x):
            y = posterior.forward(x)
            bad = x.reshape(x.shape[0], -1).abs().amax(1) > 2.2
            return torch.where(bad[:, None], torch.full_like(y, math.nan), y)

    fragile = Posterior(posterior.prior, Fragile(), posterior.data, posterior.noise,
                        posterior.level)
    model = perturbed_flow(posterior.prior, scale=0.0)
    starts = torch.zeros(4, 8, 8, dtype=F64) + 0.1
    config = CorrectionConfig(kernel="hmc", chains=4, warmup=60, draws=40, leapfrog=4)
    res = correct(fragile, FlowTransport(model), starts, config, generator=gen(4))
    assert res.failed > 0
    assert np.isfinite(res.chains.log_prob).all()
    assert np.abs(res.chains.samples).max() <= 2.2


def test_extend_sets_the_length_of_each_further_block(linear):
    """``extend`` sees all draws so far and answers the next block's length (capped by
    ``draws`` and ``max_draws``); 0 stops the chains."""
    posterior, _ = linear
    model = perturbed_flow(posterior.prior, scale=0.0)
    starts = torch.zeros(2, 8, 8, dtype=F64) + 0.1
    config = CorrectionConfig(kernel="mala", chains=2, warmup=10, draws=20, max_draws=100,
                              independence=False)
    asked, answers = [], iter([7, 500, 0])

    def extend(samples, log_prob, nfs):
        asked.append((samples.shape[:2], log_prob.shape, nfs))
        return next(answers)

    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(5),
                  extend=extend)
    assert [a[0] for a in asked] == [(2, 20), (2, 27), (2, 47)]
    assert all(a[1] == a[0] for a in asked)
    assert res.chains.samples.shape[:2] == (2, 47)
    assert asked[-1][2] == res.chains.nfs
    config = CorrectionConfig(kernel="mala", chains=2, warmup=10, draws=20, max_draws=30,
                              independence=False)
    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(5),
                  extend=lambda *a: 500)
    assert res.chains.samples.shape[1] == 30


def test_chains_too_slow_for_their_warm_up_turn_their_first_block_into_warm_up(linear):
    """When, after the first block, ``extend`` asks for more draws in all than four times the
    warm-up (at least one block, at most ``max_draws``: the warm-up saw too few draws for
    the chains' pace), the block becomes a further metric window followed by a step phase,
    its draws are dropped, and the chains start again; at most twice. The kept draws and the
    reported warm-up say so."""
    posterior, _ = linear
    model = perturbed_flow(posterior.prior, scale=0.0)
    starts = torch.zeros(2, 8, 8, dtype=F64) + 0.1
    config = CorrectionConfig(kernel="mala", chains=2, warmup=10, draws=20, max_draws=30,
                              independence=False)
    asked = []

    def extend(samples, log_prob, nfs):
        asked.append(samples.shape[1])
        return 500

    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(5),
                  extend=extend)
    assert asked == [20, 20, 20]                  # two re-adaptations, then the last block
    assert res.chains.samples.shape[:2] == (2, 30)
    assert res.chains.warmup == 10 + 2 * (20 + 1)    # each: the block and a step phase
    # one solve per chain: its start, every iteration (warm-up, the two dropped blocks and
    # step phases, the kept draws) and the re-evaluation at each new metric
    assert res.chains.nfs == 2 * (1 + 10 + 2 * (20 + 1) + 30 + 2)
    # max_draws far away: four warm-ups (40 draws) decide. 20 + 25 draws would be more, so
    # the first block is dropped; then 20 + 15 are fewer, and the chains go on and stop
    config = CorrectionConfig(kernel="mala", chains=2, warmup=10, draws=20, max_draws=1000,
                              independence=False)
    asked, answers = [], iter([25, 15, 0])

    def extend(samples, log_prob, nfs):
        asked.append(samples.shape[1])
        return next(answers)

    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(5),
                  extend=extend)
    assert asked == [20, 20, 35]
    assert res.chains.samples.shape[:2] == (2, 35)
    assert res.chains.warmup == 10 + 20 + 1


def test_hmc_transitions_integrate_a_quarter_period_and_no_longer_in_warm_up(linear,
                                                                          monkeypatch):
    """After warm-up an HMC transition takes pi / (2 step) leapfrog steps of the step it is
    made with (at most ``leapfrog``); in warm-up and in each re-adaptation's step phase (while
    the step adapts again) those of the larger of the step iterate and its running average,
    so never more than a quarter period of the step it is made with, and a quarter period
    whenever the iterate is not below its average. A trajectory left at the length of the
    previous step would integrate for another time than the one the kernel is tuned for."""
    from geoinvert.inference import correction
    posterior, _ = linear
    model = perturbed_flow(posterior.prior, scale=0.0)
    starts = torch.zeros(2, 8, 8, dtype=F64) + 0.1
    config = CorrectionConfig(kernel="hmc", chains=2, warmup=20, draws=10, max_draws=15,
                              leapfrog=64, independence=False)
    seen, iterate, leapfrog = [], correction._iterate, correction._warmup_leapfrog
    smoothed = []

    def spy(state, step, *args, **kwargs):
        seen.append((float(step), state.n_leapfrog))
        return iterate(state, step, *args, **kwargs)

    def spy_leapfrog(adapter, *args, **kwargs):
        smoothed.append(max(adapter.value, adapter.final()))
        return leapfrog(adapter, *args, **kwargs)

    monkeypatch.setattr(correction, "_iterate", spy)
    monkeypatch.setattr(correction, "_warmup_leapfrog", spy_leapfrog)
    res = correct(posterior, FlowTransport(model), starts, config, generator=gen(5),
                  extend=lambda *a: 500)
    assert res.chains.warmup == 20 + 2 * (10 + 3)    # two re-adaptations happened
    assert len(seen) == 20 + 2 * (10 + 3) + 15
    assert len(smoothed) == 20 + 2 * 3             # warm-up and the two step phases
    assert len({n for _, n in seen}) > 1           # the step did change the trajectory
    adapting = [i for i in range(len(seen)) if i < 20 or 30 <= i < 33 or 43 <= i < 46]
    for i, s in zip(adapting, smoothed):
        step, n = seen[i]
        assert s >= step
        assert n == min(64, math.ceil(math.pi / 2 / s)) <= math.ceil(math.pi / 2 / step)
    assert any(s > step for (step, _), s in zip((seen[i] for i in adapting), smoothed))
    for i in set(range(len(seen))) - set(adapting):
        step, n = seen[i]
        assert n == min(64, math.ceil(math.pi / 2 / step))


def test_flow_transport_density_is_the_flow_density():
    """FlowTransport draws carry log q_T, and its log_prob (by inversion) agrees with them and
    with the model's own density."""
    prior = MaternPrior(3, correlation_length=0.3, std=1.0)
    model = perturbed_flow(prior, scale=0.05)
    flow = FlowTransport(model)
    x, log_q = flow.sample(5, gen(1))
    np.testing.assert_allclose(flow.log_prob(x).numpy(), log_q.numpy(), rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(model.log_prob(x).detach().numpy(), log_q.numpy(), rtol=1e-9,
                               atol=1e-8)


def test_a_dense_metric_that_cannot_be_factorised_falls_back_to_the_diagonal():
    """Warm-up draws of chains stuck far apart (six directions of variance 1e24 beside unit
    ones, and one direction a combination of them) give a covariance estimate that no
    Cholesky factorisation survives in double precision; the metric is then the diagonal one,
    finite and positive."""
    from geoinvert.inference import correction
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 12, generator=g, dtype=F64)
    z[:, :6] *= 1e12
    z[:, 6] = z[:, :6].sum(1) / 3
    factor = correction._metric(z, dense=True)
    assert factor.ndim == 1 and torch.isfinite(factor).all() and (factor > 0).all()
    ok = correction._metric(torch.randn(400, 12, generator=g, dtype=F64), dense=True)
    assert ok.ndim == 2


def test_metric_windows_pool_the_draws_of_the_chains_other_processes_run(linear):
    """Under MPI every solve group runs some of the chains; ``pool`` (the ensemble's gather)
    joins each metric window's draws with the other groups', so that every group learns the
    metric of all the chains, as one process does. Two chains alone hold 2 x 72 draws in the
    last window of 160 warm-up iterations, fewer than the 4 d = 256 a dense metric needs on
    64 cells; pooled with as many from another group (here a copy) they hold 288, and the
    metric is dense. The windows are pooled at their ends, with these chains' draws first."""
    from geoinvert.inference.laplace import fit_laplace
    posterior, _ = linear
    transport = fit_laplace(posterior, generator=gen()).transport
    starts, _ = transport.to_x(torch.randn((2, transport.dim), generator=gen(1), dtype=F64))
    config = CorrectionConfig(kernel="hmc", chains=2, warmup=160, draws=4, max_draws=4,
                              leapfrog=4, independence=False)
    seen = []

    def pool(z):
        seen.append(z.clone())
        return torch.cat([z, z])

    alone = correct(posterior, transport, starts, config, generator=gen(2))
    pooled = correct(posterior, transport, starts, config, generator=gen(2), pool=pool)
    assert alone.metric == "diagonal" and pooled.metric == "dense"
    assert [z.shape for z in seen] == [(2 * 40, 64), (2 * 72, 64)]


@pytest.mark.slow
def test_a_bimodal_run_weighs_its_modes_and_goes_on_until_their_shares_converge(monkeypatch,
                                                                                 tmp_path):
    """A default run (five training steps a stage) on a 4x4 quadratic posterior with a
    symmetric prior: two modes, each with exactly half the mass. The mode search finds both,
    and the result gives each mode's share of the corrected draws with its Monte-Carlo error
    (within four of which each share is 1/2), as the summary does. The stopping rule watches
    the shares: counted at a tenth of their ESS (as if the chains changed modes a tenth as
    often; the mode jumps change them at most iterations), the chains go on past the first
    block, where the cells' R-hat and ESS alone let them stop."""
    import geoinvert
    import geoinvert.app as app
    config = {"name": "bimodal", "domain": {"bounds": [0, 1, 0, 1], "units": "1"},
              "levels": {"finest": 2},
              "prior": {"kind": "matern", "std": 1.0, "correlation_length": 0.3},
              "forward": {"kind": "quadratic"},
              "observations": {"functions": ["sin(pi*x) * sin(2*pi*y)"]},
              "data": {"values": [1.0]}, "noise": {"std": 1.0}}
    case = geoinvert.load_case(config)
    w = case.forward(2).functional
    y = 4 * float(w @ case.prior().covariance(2) @ w)        # data at twice the prior's t-std
    config.update(data={"values": [y]}, noise={"std": 0.1 * y},
                  sampler={"steps": 5, "seed": 3, "correction": {"max_draws": 400}},
                  output={"figures": False})
    seen = []
    convergence, shares = app._convergence, app._mode_diagnostics

    def spy(samples, log_target):
        d = convergence(samples, log_target)
        seen.append((samples.shape[1], d))
        return d

    def slower(modes, samples, chunk=1024):
        d = shares(modes, samples, chunk)
        return {**d, "mode_ess": d["mode_ess"] / 10}

    monkeypatch.setattr(app, "_convergence", spy)
    monkeypatch.setattr(app, "_mode_diagnostics", slower)
    ds = geoinvert.run(config, out=tmp_path / "bimodal.nc", progress=False).dataset
    a = ds.attrs
    assert a["diagnostics_modes_found"] == 2
    share, mcse = a["diagnostics_mode_shares"], a["diagnostics_mode_shares_mcse"]
    assert share.sum() == pytest.approx(1.0)
    assert np.all(np.abs(share - 0.5) < 4 * mcse) and np.all(mcse < 0.05)
    assert 100 <= a["diagnostics_mode_ess"]
    # the first block met the cells' criteria but not the shares' (a tenth): the chains went on
    draws, first = seen[0]
    assert first["rhat"] <= 1.01 and min(first["ess"], first["ess_tail"]) >= 400
    assert a["diagnostics_draws"] > draws == 250
    lines, _ = app.summary_lines(ds)
    assert any(line.startswith("modes: the draws' share of each of the 2 modes found")
               for line in lines)
    # the training curves hold the flow's own importance ESS beside the proposal's (NaN for
    # steps without a reverse term: the first stage's warm-up on its importance pool)
    own, stage = ds["train_flow_ess"].values, ds["train_stage"].values
    last = own[stage == stage.max()]
    assert own.shape == stage.shape and np.all((last > 0) & (last <= 1))
