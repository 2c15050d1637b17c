"""Simulations for amortized inference: prior fields and noisy data, written and streamed in
chunks, checked against the known laws on the linear test bed."""

import numpy as np
import pytest
import torch

from geoinvert import cli
from geoinvert.case import load_case
from geoinvert.io import read_simulations, simulation_count
from geoinvert.simulate import simulate
from geoinvert.testing import small_case


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    case = load_case(small_case())
    path = tmp_path_factory.mktemp("sims") / "s.nc"
    written, failed = simulate(case, 1000, path, seed=4, chunk=256)
    return case, path, written, failed


def test_fields_follow_the_prior_and_data_the_noise_model(sims):
    """Per-cell means and variances of the fields match the prior's (1000 draws: a mean's
    standard error is std / 32, a variance's sqrt(2 / 1000) relative; the bounds are about
    4.5 of them, the largest of 64 cells); the standardised residuals y - G x are N(0, 1) by
    their mean and variance."""
    case, path, written, failed = sims
    assert (written, failed) == (1000, 0) and simulation_count(path) == 1000
    fields = np.concatenate([f for f, _ in read_simulations(path, chunk=300)])
    data = np.concatenate([d for _, d in read_simulations(path, chunk=300)])
    prior = case.prior()
    mean, cov = prior.mean(3).ravel(), prior.covariance(3)
    sd = np.sqrt(np.diag(cov))
    x = fields.reshape(1000, -1)
    assert np.max(np.abs(x.mean(0) - mean) / sd) < 4.5 / np.sqrt(1000)
    assert np.max(np.abs(x.var(0) / sd ** 2 - 1)) < 4.5 * np.sqrt(2 / 1000)
    forward = case.forward(3)
    with torch.no_grad():
        clean = forward(torch.from_numpy(fields)).numpy()
    r = ((data - clean) / np.asarray(case.noise)).ravel()
    assert abs(r.mean()) < 4 / np.sqrt(r.size)
    assert abs(r.var() - 1) < 4 * np.sqrt(2 / r.size)


def test_chunks_stream_in_order_and_the_seed_fixes_the_file(sims, tmp_path):
    case, path, _, _ = sims
    sizes = [len(f) for f, _ in read_simulations(path, chunk=256)]
    assert sizes == [256, 256, 256, 232]
    again = tmp_path / "again.nc"
    simulate(case, 1000, again, seed=4, chunk=256)
    for (f1, d1), (f2, d2) in zip(read_simulations(path), read_simulations(again)):
        assert np.array_equal(f1, f2) and np.array_equal(d1, d2)
    first = next(read_simulations(path, start=10, stop=20))
    assert first[0].shape == (10, 8, 8)


@pytest.mark.parametrize("args, expected", [
    (["--n", "0"], "--n: must be between 1 and 100000000, got 0"),
    (["--n", "5", "--seed", "-1"], "--seed: must be between 0 and 4294967295"),
])
def test_bad_simulate_arguments_are_refused_in_one_line(args, expected, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(__import__("yaml").safe_dump(small_case()))
    out = tmp_path / "s.nc"
    assert cli.main(["simulate", str(path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_simulate_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(__import__("yaml").safe_dump(small_case()))
    out = tmp_path / "sub" / "s.nc"
    assert cli.main(["simulate", str(path), "--n", "40", "--out", str(out), "-q"]) == 0
    assert simulation_count(out) == 40 and not (tmp_path / "sub" / "s.nc.lock").exists()
    assert cli.main(["simulate", str(path), "--n", "5", "--out", str(tmp_path), "-q"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_file_that_is_not_simulations_is_refused(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_text("not netCDF")
    with pytest.raises(ValueError, match="cannot read as netCDF"):
        next(read_simulations(bad))
