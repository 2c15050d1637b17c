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
