"""Ensembles of fields for learned priors: the channel generator's documented process, the
Gaussian ensembles of a case's prior, and their files."""

import numpy as np
import pytest
import torch

from geoinvert import cli
from geoinvert.case import load_case
from geoinvert.ensembles import channel_fields, gaussian_fields, read_ensemble, write_ensemble
from geoinvert.testing import small_case


def test_channel_fields_follow_their_process():
    """Two facies values, smoothed: the fields lie between background - noise and channel +
    noise (a few noise stds); channels take a plausible share of the area; every field has at
    least one channel; the seed fixes the ensemble and other seeds change it."""
    fields, facies = channel_fields(200, 32, seed=3)
    assert fields.shape == facies.shape == (200, 32, 32)
    assert fields.min() > -1.0 - 6 * 0.05 and fields.max() < 2.0 + 6 * 0.05
    share = facies.mean((1, 2))
    assert share.min() > 0 and 0.05 < share.mean() < 0.5
    # channel cells are high, background cells low (the smoothing blurs only the edges)
    assert np.median(fields[facies]) > 1.0 and np.median(fields[~facies]) < -0.5
    again, _ = channel_fields(200, 32, seed=3)
    assert np.array_equal(fields, again)
    assert not np.array_equal(fields, channel_fields(200, 32, seed=4)[0])
    with pytest.raises(ValueError, match="unknown channel parameters"):
        channel_fields(1, 8, widht=0.1)


def test_gaussian_ensemble_has_the_prior_covariance():
    """4000 draws of the 8x8 Matern prior: every entry of the sample covariance within 5
    Monte-Carlo standard errors (sqrt((S_ij^2 + S_ii S_jj) / n)) of the analytic one."""
    case = load_case(small_case())
    fields = gaussian_fields(case, 4000, seed=1).reshape(4000, -1)
    exact = case.prior().covariance(3)
    se = np.sqrt((exact ** 2 + np.outer(np.diag(exact), np.diag(exact))) / 4000)
    assert np.max(np.abs(np.cov(fields.T) - exact) / se) < 5


def test_ensemble_files_round_trip_and_bad_files_are_refused(tmp_path):
    fields, _ = channel_fields(5, 16, seed=0)
    path = write_ensemble(tmp_path / "e.nc", fields, generator="channels",
                          parameters={"seed": 0})
    assert np.array_equal(read_ensemble(path), fields)
    import xarray as xr
    xr.Dataset({"field": (("sample", "y", "x"), np.zeros((2, 6, 6)))}).to_netcdf(tmp_path / "b.nc")
    with pytest.raises(ValueError, match="power of two"):
        read_ensemble(tmp_path / "b.nc")
    with pytest.raises(ValueError, match="no variable 'perm'"):
        read_ensemble(path, "perm")


def test_ensemble_command(tmp_path, capsys):
    out = tmp_path / "train.nc"
    assert cli.main(["ensemble", "channels", "--n", "20", "--size", "16", "--out", str(out),
                     "-q"]) == 0
    assert read_ensemble(out).shape == (20, 16, 16)
    case = tmp_path / "c.yaml"
    case.write_text(__import__("yaml").safe_dump(small_case()))
    assert cli.main(["ensemble", "gaussian", str(case), "--n", "10", "--out",
                     str(tmp_path / "g.nc"), "-q"]) == 0
    assert read_ensemble(tmp_path / "g.nc").shape == (10, 8, 8)
    assert cli.main(["ensemble", "gaussian", "--n", "10", "--out", str(tmp_path / "x.nc")]) == 2
    assert "needs a case file" in capsys.readouterr().err


@pytest.mark.parametrize("model, count", [("gaussian", 300), ("exponential", 300),
                                          ("matern", 20)])
def test_gstools_fields_have_their_covariance_model(model, count):
    """GSTools' fields (variance 1.5, length scale 0.25) on a 16x16 lattice: the cell variance
    is 1.5 and the correlation at a lag of 0.25 along x is the model's, within 10 % over 300
    fields (the Monte-Carlo error of 300 fields of correlated cells is a few %, GSTools'
    randomisation method adds about 1 %) and within 25 % over 20 (Matern draws are slow:
    0.4 s a field)."""
    import gstools as gs
    from geoinvert.ensembles import gstools_fields
    fields = gstools_fields(count, 16, model=model, var=1.5, len_scale=0.25, nu=1.5, seed=3)
    assert fields.shape == (count, 16, 16)
    tol = 0.1 if count >= 300 else 0.25
    assert abs(fields.var(0).mean() / 1.5 - 1) < tol
    lag = 4                                          # cells: 0.25 of the side
    a, b = fields[:, :, :-lag].ravel(), fields[:, :, lag:].ravel()
    kinds = {"gaussian": gs.Gaussian, "exponential": gs.Exponential, "matern": gs.Matern}
    cov = kinds[model](dim=2, var=1.5, len_scale=0.25, **({"nu": 1.5} if model == "matern"
                                                         else {}))
    assert abs(np.corrcoef(a, b)[0, 1] - cov.correlation(lag / 16)) < tol


def test_truncated_gstools_fields_have_two_facies_in_the_gaussian_proportion():
    """Truncated at 0.5 standard deviations, the high facies covers 1 - Phi(0.5) = 30.9 % of
    the cells (within 3 points over 200 fields of 16x16)."""
    from geoinvert.ensembles import gstools_fields
    fields = gstools_fields(200, 16, model="gaussian", len_scale=0.15, truncate=0.5, seed=1)
    assert set(np.unique(fields)) == {-1.0, 2.0}
    assert abs((fields == 2.0).mean() - 0.3085) < 0.03
    with pytest.raises(ValueError, match="model must be one of"):
        gstools_fields(2, 8, model="spherical")


def test_gstools_ensemble_command(tmp_path, capsys):
    out = tmp_path / "g.nc"
    assert cli.main(["ensemble", "gstools", "--n", "20", "--size", "16", "--out", str(out),
                     "--model", "exponential", "--len-scale", "0.3", "-q"]) == 0
    assert read_ensemble(out).shape == (20, 16, 16)
    assert cli.main(["ensemble", "gstools", "--n", "5", "--size", "16", "--out",
                     str(tmp_path / "h.nc"), "--var", "-1"]) == 2
    assert "--var: must be a positive number" in capsys.readouterr().err
