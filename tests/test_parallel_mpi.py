"""Runs under ``mpirun -n 2`` (``make test``): the same seed gives the same training and result
on 1 and 2 ranks, with one rank per solve and with both ranks sharing each solve.

Every rank also computes the one-process answer itself, so the tests pass on one process too.
"""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from geoinvert.case import load_case
from geoinvert.app import run
from geoinvert.parallel import layout
from geoinvert.testing import flat_parameters, linear_gaussian, small_case, small_flow

SMALL = small_case()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


def shared_tmp():
    """A temporary folder made by rank 0, the same path on every rank."""
    return Path(WORLD.bcast(tempfile.mkdtemp() if WORLD.rank == 0 else None))


@pytest.mark.parametrize("extra", [{}, {"coarse_sampler": "laplace", "pool_levels": 2,
                                        "frozen_proposal": True}])
def test_training_is_the_same_on_one_and_all_ranks(extra):
    # The Laplace pools' mode search evaluates single points on one rank: every rank must
    # still take the same path and get the same pool.
    prior, posteriors, _ = linear_gaussian()
    models = []
    for comm in (None, WORLD):
        model = small_flow(prior).to(torch.float64)
        history = train_msign_small(model, posteriors, comm, **extra)
        models.append((flat_parameters(model), history))
    (serial, h1), (parallel, h2) = models
    torch.testing.assert_close(parallel, serial, rtol=1e-9, atol=1e-11)
    assert [h["nfs"] for h in h1] == [h["nfs"] for h in h2]
    np.testing.assert_allclose([h["loss"] for h in h2], [h["loss"] for h in h1], rtol=1e-8)


def train_msign_small(model, posteriors, comm, **extra):
    from geoinvert.inference.trainer import train_msign
    return train_msign(model, posteriors, steps=[3, 3, 4], batch=7, lr=3e-3, pool=33,
                       generator=gen(), comm=comm, **extra)


@pytest.mark.parametrize("ranks_per_solve", [1, WORLD.size])
def test_run_result_is_the_same_on_one_and_all_ranks(ranks_per_solve):
    config = {**SMALL, "forward": {"kind": "elliptic", "source": 1.0,
                                   "dirichlet": {"left": 1.0, "right": 0.0}},
              "observations": {"points": [[0.3, 0.3], [0.7, 0.6], [0.5, 0.5]]},
              "levels": {"finest": 2, "min_cells": 8}, "output": {"samples": 9, "figures": False},
              "sampler": {**SMALL["sampler"], "correction": "none"}}
    case = load_case(config)
    folder = shared_tmp()
    serial = run(case, out=folder / f"serial{WORLD.rank}.nc", progress=False)
    parallel = run(case, out=folder / "parallel.nc", progress=False, comm=WORLD,
                   ranks_per_solve=ranks_per_solve)
    a, b = serial.dataset, parallel.dataset
    # the flow is float32: gradients summed in another order differ by a few ulp (~1e-7)
    np.testing.assert_allclose(b["samples"], a["samples"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b["log_target"], a["log_target"], rtol=1e-5)
    assert b.attrs["nfs"] == a.attrs["nfs"] and b.attrs["mpi_ranks"] == WORLD.size
    WORLD.Barrier()
    written = sorted(p.name for p in folder.iterdir() if p.name.startswith("parallel"))
    assert written == ["parallel.ckpt", "parallel.json", "parallel.nc", "parallel.pt"]


def test_corrected_run_shares_its_chains_over_the_ranks():
    """The correction's chains are shared out over the solve groups and gathered: every chain
    appears in the result, and the solves of all ranks are counted once."""
    from geoinvert.case import correction_config
    config = {**SMALL, "output": {"samples": 12, "figures": False}}
    case = load_case(config)
    result = run(case, out=shared_tmp() / "corrected.nc", progress=False, comm=WORLD)
    ds, c = result.dataset, correction_config(case.config)
    assert sorted(set(ds["chain"].values.tolist())) == list(range(c.chains))
    assert np.isfinite(ds["samples"]).all() and np.isfinite(ds["log_target"]).all()
    training = int(ds["train_nfs"][-1])
    search = int(ds.attrs["diagnostics_mode_search_nfs"])      # once, though every group ran it
    correction = int(ds.attrs["diagnostics_correction_nfs"])    # chains' solves + predictions
    errors = int(ds.attrs["diagnostics_coarse_error_nfs"])      # the coarse levels' error model
    assert ds.attrs["nfs"] == training + search + correction + errors + 12
    assert 12 < correction <= c.solves() + 12


def test_correction_readapts_in_step_on_every_rank():
    """Chains too slow for max_draws (here fewer than four warm-ups) turn their first block
    into warm-up on every rank at once (the decision comes from the gathered chains): 4 chains
    of 10 draws cannot reach ESS 400, so both re-adaptations happen, and the run ends with
    every chain gathered."""
    correction = {**SMALL["sampler"]["correction"], "draws": 10, "max_draws": 12}
    config = {**SMALL, "sampler": {**SMALL["sampler"], "correction": correction},
              "output": {"samples": 12, "figures": False}}
    ds = run(load_case(config), out=shared_tmp() / "readapt.nc", progress=False,
             comm=WORLD).dataset
    warmup = correction["warmup"]
    assert ds.attrs["diagnostics_warmup"] == warmup + 2 * (10 + int(0.15 * warmup))
    assert ds.attrs["diagnostics_draws"] == 12
    assert sorted(set(ds["chain"].values.tolist())) == list(range(correction["chains"]))
    assert ds.attrs["diagnostics_correction_limit"] == "sampler.correction.max_draws"


def test_metric_windows_pool_the_chains_of_every_group():
    """Every solve group learns the metric from all the chains' draws, as one process does:
    4 chains hold 4 x 72 = 288 draws in the last window of 160 warm-up iterations, enough for
    a dense metric on 64 cells (4 d = 256), though the 2 chains of each of two groups hold
    only 144."""
    correction = {**SMALL["sampler"]["correction"], "warmup": 160}
    config = {**SMALL, "sampler": {**SMALL["sampler"], "correction": correction},
              "output": {"samples": 12, "figures": False}}
    ds = run(load_case(config), out=shared_tmp() / "pooled.nc", progress=False,
             comm=WORLD).dataset
    assert correction["chains"] == 4 and ds.attrs["diagnostics_metric"] == "dense"


def test_the_auto_kernel_decides_alike_on_every_group():
    """Each solve group runs its own chains with its own generator; the choice of the
    ``auto`` kernel comes from the mean of their quarter periods, so that every group switches
    (or not) at once and the later collective steps match. A flow near the prior of three
    precise linear data: HMC's trajectories are long, every group goes on with the lifted
    kernel."""
    from geoinvert.flows.msign import MsIGN
    from geoinvert.inference.config import CorrectionConfig
    from geoinvert.inference.correction import FlowTransport, correct
    from geoinvert.parallel import Ensemble
    from geoinvert.priors import MaternPrior
    from geoinvert.problem.forward.testbeds import (ExactLinearPosterior, LinearForward,
                                                    paper_phi)
    from geoinvert.problem.posterior import Posterior
    prior = MaternPrior(3, correlation_length=0.3, std=1.0)
    forward = LinearForward([paper_phi, lambda x, y: x + y ** 2], (8, 8))
    data, noise = np.array([0.1, 0.8]), np.array([0.01, 0.02])
    posterior = Posterior(prior, forward, data, noise, 3)
    exact = ExactLinearPosterior(prior.mean(3).ravel(), prior.covariance(3), forward.matrix,
                                 data, noise, shape=(8, 8))
    torch.manual_seed(0)
    model = MsIGN(prior, blocks_per_level=2, hidden=8).to(torch.float64)
    ens = Ensemble(WORLD)
    starts = exact.sample(2, gen(5 + WORLD.rank)).reshape(2, 8, 8)
    res = correct(posterior, FlowTransport(model), starts,
                  CorrectionConfig(kernel="auto", warmup=40, draws=8, leapfrog=16),
                  generator=gen(6 + WORLD.rank), pool=ens.gather)
    every = WORLD.allgather((res.chains.method, res.pilot_leapfrog))
    assert all(e == every[0] for e in every), every
    assert every[0][0].endswith("-lifted") and every[0][1] > 16



@pytest.mark.mpi
def test_auto_kernels_second_choice_is_made_alike_on_every_group(monkeypatch):
    """After HMC's first block each solve group weighs the cost of all groups' draws (their
    ESS and solves, pooled): every group takes the same decision from the same figure."""
    import geoinvert.inference.correction as correction
    from geoinvert.inference.config import CorrectionConfig
    from geoinvert.inference.correction import correct
    from geoinvert.inference.laplace import fit_laplace
    from geoinvert.parallel import Ensemble
    from geoinvert.testing import linear_gaussian
    _, posteriors, exact = linear_gaussian()
    posterior = posteriors[3]
    laplace = fit_laplace(posterior, generator=gen(1))
    monkeypatch.setattr(correction, "LIFTED_SOLVES_PER_ESS", 0.1)
    starts = exact.sample(2, gen(5 + WORLD.rank)).reshape(2, 8, 8)
    res = correct(posterior, laplace.transport, starts,
                  CorrectionConfig(kernel="auto", warmup=40, draws=100, max_draws=400,
                                   leapfrog=16),
                  generator=gen(6 + WORLD.rank), pool=Ensemble(WORLD).gather,
                  extend=lambda samples, log_prob, nfs: 300 if samples.shape[1] == 100 else 0)
    every = WORLD.allgather((res.chains.method, res.hmc_solves_per_ess))
    assert all(e == every[0] for e in every), every
    assert every[0][0] == "laplace-lifted" and every[0][1] > 0


def test_layout_groups():
    if WORLD.size == 1:
        assert layout(WORLD, 1) == layout(None, 1) and layout(WORLD).root
        return
    lay = layout(WORLD, WORLD.size)
    assert lay.solve.Get_size() == WORLD.size and lay.groups == 1 and lay.ensemble is None
    lay = layout(WORLD, 1)
    assert lay.solve.Get_size() == 1 and lay.groups == WORLD.size
    with pytest.raises(ValueError, match="divisor"):
        layout(WORLD, WORLD.size + 1)


@pytest.mark.parametrize("kind", ["laplace", "gpcn"])
def test_laplace_kinds_under_mpi_share_draws_and_chains(kind):
    """Every solve group fits the same Laplace approximation (its solves counted once); the
    laplace draws do not depend on the rank count, and gpCN's chains are all gathered."""
    sampler = {"kind": kind, **({"chains": 2, "warmup": 10, "draws": 12} if kind == "gpcn"
                                else {})}
    config = {**SMALL, "sampler": sampler, "output": {"samples": 12, "figures": False}}
    folder = shared_tmp()
    serial = run(config, out=folder / f"serial_{kind}{WORLD.rank}.nc", progress=False)
    parallel = run(config, out=folder / f"parallel_{kind}.nc", progress=False, comm=WORLD)
    a, b = serial.dataset, parallel.dataset
    assert a.attrs["diagnostics_laplace_nfs"] == b.attrs["diagnostics_laplace_nfs"]
    np.testing.assert_allclose(b["map"], a["map"], rtol=1e-10, atol=1e-12)
    if kind == "laplace":
        np.testing.assert_allclose(b["samples"], a["samples"], rtol=1e-10, atol=1e-12)
        assert b.attrs["nfs"] == a.attrs["nfs"]
    else:
        assert sorted(set(b["chain"].values.tolist())) == [0, 1]
        assert np.isfinite(b["log_target"]).all()


@pytest.mark.parametrize("kind", ["iaf", "meanfield"])
def test_variational_training_is_the_same_on_one_and_all_ranks(kind):
    from geoinvert.flows.autoregressive import IAF, MeanField
    from geoinvert.inference.vi import train_vi
    prior, posteriors, _ = linear_gaussian(2)

    def trained(comm):
        torch.manual_seed(0)
        model = IAF(prior, 2, transforms=1) if kind == "iaf" else MeanField(prior, 2)
        history = train_vi(model, posteriors[2], steps=15, batch=8, lr=1e-2, generator=gen(3),
                           comm=comm)
        return flat_parameters(model), history[-1]["loss"]

    alone, loss_alone = trained(None)
    shared, loss_shared = trained(WORLD)
    torch.testing.assert_close(shared, alone, rtol=1e-9, atol=1e-11)
    assert loss_shared == pytest.approx(loss_alone, rel=1e-9)


def test_simulations_are_the_same_on_one_and_all_ranks():
    from geoinvert.io import read_simulations
    from geoinvert.simulate import simulate
    case = load_case(small_case())
    folder = shared_tmp()
    simulate(case, 50, folder / "all.nc", seed=1, chunk=16, comm=WORLD)
    if WORLD.rank == 0:
        simulate(case, 50, folder / "one.nc", seed=1, chunk=16)
        for (f1, d1), (f2, d2) in zip(read_simulations(folder / "all.nc"),
                                      read_simulations(folder / "one.nc")):
            np.testing.assert_array_equal(f1, f2)
            np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-12)
    WORLD.Barrier()
