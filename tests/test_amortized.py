"""Amortized inversion: a conditional MsIGN and the single-loss joint flow trained on
simulations of the linear-Gaussian test bed, checked against the exact posterior of new data
sets and by simulation-based calibration."""

import numpy as np
import pytest
import torch

from geoinvert.case import load_case
from geoinvert.inference.amortized import AmortizedPosterior, train_amortized
from geoinvert.problem.forward.testbeds import ExactLinearPosterior
from geoinvert.simulate import simulate
from geoinvert.testing import small_case

NOISE = 0.05
_PATHS = {}


def trained_path(case):
    return _PATHS[case.name]


@pytest.fixture(scope="module")
def simulations(tmp_path_factory):
    config = small_case()
    config["levels"] = {"finest": 2}
    config["noise"] = {"std": NOISE}
    case = load_case(config)
    path = tmp_path_factory.mktemp("amortized") / "sims.nc"
    _PATHS[case.name] = path
    simulate(case, 6000, path, seed=1)
    return case, path


@pytest.fixture(scope="module", params=["msign", "joint"])
def trained(simulations, request):
    """The conditional MsIGN and the single-loss joint flow, on the same simulations."""
    case, path = simulations
    post, history = train_amortized(case.prior(), path, epochs=4, batch=128,
                                    generator=torch.Generator().manual_seed(0),
                                    method=request.param)
    assert post.method == request.param
    return case, post, history


def _new_data(case, seed):
    prior, forward = case.prior(), case.forward(2)
    x = prior.sample(1, 2, generator=torch.Generator().manual_seed(1000 + seed))
    e = NOISE * torch.randn(forward.n_obs, generator=torch.Generator().manual_seed(2000 + seed),
                            dtype=torch.float64)
    with torch.no_grad():
        y = (forward(x)[0] + e).numpy()
    exact = ExactLinearPosterior(prior.mean(2).ravel(), prior.covariance(2), forward.matrix, y,
                                 NOISE)
    return x[0].numpy(), y, exact


def test_held_out_likelihood_improves_on_the_prior(trained):
    """On the held-out 10 % of the simulations, the conditional density's negative log
    likelihood per dimension is below the prior's (the data carry information about x), by
    more than its Monte-Carlo error (600 pairs)."""
    from geoinvert.io import read_simulations
    case, post, history = trained
    fields = np.concatenate([f for f, _ in read_simulations(trained_path(case), start=5400)])
    prior_nll = -case.prior().log_prob(torch.from_numpy(fields), 2).numpy() / 16
    gap = prior_nll.mean() - history[-1]["held_out"]
    assert gap > 3 * prior_nll.std() / np.sqrt(len(prior_nll)), (gap, prior_nll.std())
    assert all(np.isfinite(h["loss"]) for h in history)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_new_data_get_the_exact_posterior(trained, seed):
    """For data the network never saw: the means and stds of 4000 draws are within 0.1
    posterior std of the exact ones (a mean's Monte-Carlo error is 0.016 std), far closer than
    the prior's mean is."""
    case, post, _ = trained
    _, y, exact = _new_data(case, seed)
    x, log_q = post.sample(4000, y, generator=torch.Generator().manual_seed(seed))
    x = x.reshape(4000, -1).numpy()
    sd = np.sqrt(np.diag(exact.cov))
    error = np.sqrt(np.mean(((x.mean(0) - exact.mean) / sd) ** 2))
    prior_error = np.sqrt(np.mean(((case.prior().mean(2).ravel() - exact.mean) / sd) ** 2))
    assert error < 0.1 and error < 0.25 * prior_error, (error, prior_error)
    assert np.sqrt(np.mean((x.std(0) / sd - 1) ** 2)) < 0.1
    torch.testing.assert_close(post.log_prob(torch.from_numpy(x[:50].reshape(50, 4, 4)), y),
                               log_q[:50], rtol=0, atol=1e-3)


def _sbc_statistic(post, case, draws=99, sets=200, shrink=1.0):
    """Chi-square statistic (10 bins) of the ranks of t* = <g, x*> among ``draws`` posterior
    draws of t, over ``sets`` simulated (x*, y) pairs; ``shrink`` < 1 narrows the draws about
    their mean (a deliberately overconfident posterior)."""
    g = case.forward(2).matrix[0]
    ranks = []
    for k in range(sets):
        x_true, y, _ = _new_data(case, 100 + k)
        x, _ = post.sample(draws, y, generator=torch.Generator().manual_seed(k))
        x = x.reshape(draws, -1).numpy()
        x = x.mean(0) + shrink * (x - x.mean(0))
        ranks.append(int(np.sum(x @ g < x_true.ravel() @ g)))
    counts = np.bincount(np.asarray(ranks) * 10 // (draws + 1), minlength=10)
    expected = sets / 10
    return float(((counts - expected) ** 2 / expected).sum())


def test_simulation_based_calibration(trained):
    """Ranks of the true value along the data direction are uniform for the amortized
    posterior (chi-square with 9 degrees of freedom below 27.9, its 0.1 % quantile) and not
    for an overconfident one (draws shrunk to half their spread), which shows the check has
    power."""
    case, post, _ = trained
    assert _sbc_statistic(post, case) < 27.9
    assert _sbc_statistic(post, case, shrink=0.5) > 27.9


def test_save_and_load_round_trip(trained, tmp_path):
    case, post, _ = trained
    post.save(tmp_path / "q.pt")
    again = AmortizedPosterior.load(tmp_path / "q.pt", case.prior())
    _, y, _ = _new_data(case, 5)
    x, log_q = post.sample(20, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.log_prob(x, y), log_q, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must have 2 observations"):
        post.sample(3, np.zeros(5))


def test_amortize_and_infer_from_the_command_line(tmp_path, capsys):
    """simulate -> amortize -> infer writes one standard result per data set (uncorrected:
    the importance diagnostics of q(x | y) against the posterior of y; with --correct: the
    corrected chains); mismatched inputs are refused in one line."""
    import xarray as xr
    import yaml
    from geoinvert import cli
    from geoinvert.io import read_result
    config = small_case()
    config["levels"] = {"finest": 2}
    config["output"] = {"samples": 200, "figures": False}
    case = tmp_path / "c.yaml"
    case.write_text(yaml.safe_dump(config))
    sims, model = tmp_path / "s.nc", tmp_path / "q.pt"
    assert cli.main(["simulate", str(case), "--n", "1500", "--out", str(sims), "-q"]) == 0
    assert cli.main(["amortize", str(case), "--simulations", str(sims), "--out", str(model),
                     "--epochs", "1", "-q"]) == 0
    data = tmp_path / "d.nc"
    xr.Dataset({"data": (("set", "observation"), np.array([[0.1, -0.2], [0.3, 0.0]]))}) \
        .to_netcdf(data)
    assert cli.main(["infer", str(model), "--data", str(data), "--out",
                     str(tmp_path / "r.nc"), "-q"]) == 0
    for k in (0, 1):
        ds = read_result(tmp_path / f"r_{k}.nc")
        assert ds.attrs["sampler"] == "amortized" and ds.sizes["sample"] == 200
        assert np.isfinite(ds.attrs["diagnostics_psis_khat"])
        np.testing.assert_allclose(ds["observed"].values, [[0.1, -0.2], [0.3, 0.0]][k])
    joint = tmp_path / "j.pt"                 # the joint flow, refined on the data set
    assert cli.main(["amortize", str(case), "--simulations", str(sims), "--out", str(joint),
                     "--epochs", "1", "--method", "joint", "-q"]) == 0
    one = tmp_path / "one.nc"
    xr.Dataset({"value": (("observation",), np.array([0.1, -0.2]))}).to_netcdf(one)
    assert cli.main(["infer", str(joint), "--data", str(one), "--out",
                     str(tmp_path / "j.nc"), "--fine-tune", "3", "-q"]) == 0
    ds = read_result(tmp_path / "j.nc")
    assert ds.attrs["diagnostics_fine_tune_steps"] == 3
    assert ds.attrs["nfs"] == 200 + 3 * 32       # the draws' solves and the fine-tuning's
    capsys.readouterr()
    bad = tmp_path / "bad.nc"
    xr.Dataset({"data": (("set", "observation"), np.zeros((1, 3)))}).to_netcdf(bad)
    assert cli.main(["infer", str(model), "--data", str(bad), "--out",
                     str(tmp_path / "x.nc"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 3 values per data set, the case 2 observations" in err[0]
    other = small_case()
    case.write_text(yaml.safe_dump(other))             # an 8x8 case: the 4x4 simulations differ
    assert cli.main(["amortize", str(case), "--simulations", str(sims), "--out",
                     str(tmp_path / "q2.pt"), "-q"]) == 2
    assert "holds fields (4, 4)" in capsys.readouterr().err


def test_data_outside_the_simulations_are_flagged(trained, tmp_path):
    """Data beyond the range of every simulated data set make the verdict say that the
    amortized posterior extrapolates; data inside do not."""
    from geoinvert.diagnostics import verdict
    case, post, _ = trained
    _, y, _ = _new_data(case, 7)
    assert post.outside(y).size == 0
    far = y + 100 * post.data_std
    assert list(post.outside(far)) == [0, 1]
    warnings = verdict({"outside_simulations": 2}, approximation="amortized posterior")
    assert len(warnings) == 1 and "extrapolates" in warnings[0]


def test_calibrate_writes_sbc_and_tarp(trained, tmp_path, capsys):
    """``geoinvert calibrate`` on simulations the model did not see: the JSON holds one SBC
    p-value per summary and the TARP curve, the figures are written, and the well-trained
    model passes both checks."""
    import json
    from geoinvert import cli
    case, post, _ = trained
    post.save(tmp_path / "q.pt", metadata={"case": case.text, "folder": str(case.folder)})
    sims = tmp_path / "held.nc"
    simulate(case, 200, sims, seed=77)
    out = tmp_path / "cal"
    assert cli.main(["calibrate", str(tmp_path / "q.pt"), "--simulations", str(sims), "--out",
                     str(out)]) == 0
    result = json.loads((out / "calibration.json").read_text())
    assert len(result["sbc_p"]) == 9 and result["sets"] == 200
    assert result["sbc_ok"] and result["tarp_ok"], result
    assert (out / "sbc.png").is_file() and (out / "tarp.png").is_file()
    assert "uniform" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["msign", "joint"])
def test_fine_tuning_on_one_data_set_raises_its_elbo(simulations, method):
    """A deliberately undertrained network (one epoch, one small block): a copy refined on one
    y by the reverse KL has a higher ELBO at that y, by more than three standard errors of
    1000 draws, and the amortized network itself is unchanged."""
    from geoinvert.inference.amortized import fine_tune
    from geoinvert.problem.posterior import Posterior
    case, path = simulations
    post, _ = train_amortized(case.prior(), path, epochs=1, batch=256, blocks=1, hidden=8,
                              generator=torch.Generator().manual_seed(0), method=method)
    _, y, _ = _new_data(case, 7)
    posterior = Posterior(case.prior(), case.forward(2), y, NOISE, 2)

    def elbo(q):
        x, log_q = q.sample(1000, y, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            w = (posterior.log_prob(x) - log_q).numpy()
        return w.mean(), w.std() / np.sqrt(w.size)

    before, se = elbo(post)
    state = {k: v.clone() for k, v in post.model.state_dict().items()}
    tuned, history = fine_tune(post, posterior, y, steps=150, lr=1e-3,
                               generator=torch.Generator().manual_seed(0))
    after, se_after = elbo(tuned)
    assert after > before + 3 * np.hypot(se, se_after), (before, after)
    assert history[-1]["nfs"] == 150 * 32 and tuned.method == post.method
    for k, v in post.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
