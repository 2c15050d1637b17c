"""Result Dataset, atomic netCDF round trip and figures."""

import shutil
import subprocess

import netCDF4
import numpy as np
import pytest
import xarray as xr

from geoinvert.io import build_dataset, figures, marginal_direction, write_netcdf


def _dataset(n=40, level=3, truth=True):
    rng = np.random.default_rng(0)
    side = 2**level
    samples = rng.standard_normal((n, side, side))
    samples[: n // 2] += 2.0
    history = {"stage": np.repeat([1, 2, 3], 5), "nfs": np.arange(15) * 64,
               "loss": np.linspace(3, 1, 15), "ess": np.linspace(0.1, 0.8, 15)}
    obs = {"name": ["W1", "W2", "int0"], "value": [1.0, 2.0, 3.0], "noise": [0.1, 0.1, 0.2],
           "x": [10.0, 30.0, np.nan], "y": [5.0, 15.0, np.nan], "predicted": [1.1, 1.9, 3.0]}
    return build_dataset(
        samples, log_prob=rng.standard_normal(n), log_target=rng.standard_normal(n),
        bounds=(0.0, 40.0, 0.0, 20.0), units="m", quantiles=(0.1, 0.5, 0.9),
        level_means={1: np.zeros((2, 2)), 2: np.ones((4, 4))}, observations=obs,
        truth=samples[0] if truth else None, history=history,
        attrs={"geoinvert_version": "0.1.0", "case": "forward:\n  kind: linear\n", "seed": 3,
               "nfs": 960, "wall_time": 1.5, "diagnostics": {"ess": 0.4, "khat": 0.6},
               "resumed": False, "unused": None})


def test_dataset_contract():
    ds = _dataset()
    assert ds["samples"].dims == ("sample", "y", "x")
    assert ds["mean"].dims == ds["std"].dims == ("y", "x")
    assert ds["log_prob"].dims == ds["log_target"].dims == ("sample",)
    assert ds["x"].attrs["units"] == "m" and ds["y"].attrs["units"] == "m"
    np.testing.assert_allclose(ds["x"].values, 2.5 + 5.0 * np.arange(8))
    np.testing.assert_allclose(ds["y"].values, 1.25 + 2.5 * np.arange(8))
    np.testing.assert_allclose(ds["mean"], ds["samples"].mean("sample"))
    assert ds["quantiles"].sizes["quantile"] == 3
    assert ds["mean_level2"].dims == ("y_l2", "x_l2")
    assert ds.attrs["diagnostics_khat"] == 0.6 and ds.attrs["resumed"] == 0
    assert "unused" not in ds.attrs


def test_netcdf_round_trip(tmp_path):
    ds = _dataset()
    path = write_netcdf(ds, tmp_path / "sub" / "result.nc")
    with xr.open_dataset(path) as back:
        xr.testing.assert_identical(back.load(), ds)
    with netCDF4.Dataset(path) as nc:
        assert nc.variables["samples"].dimensions == ("sample", "y", "x")
        assert nc.getncattr("case").startswith("forward:")
        assert nc.variables["x"].units == "m"
    assert [p.name for p in path.parent.iterdir()] == ["result.nc"]


def test_failed_write_leaves_nothing(tmp_path):
    ds = _dataset().assign_attrs(bad={1, 2})  # a set cannot be a netCDF attribute
    with pytest.raises(Exception):
        write_netcdf(ds, tmp_path / "result.nc")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path):
    path = write_netcdf(_dataset(), tmp_path / "result.nc")
    before = path.read_bytes()
    with pytest.raises(Exception):
        write_netcdf(_dataset().assign_attrs(bad={1}), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.skipif(shutil.which("ncdump") is None, reason="ncdump (netcdf-bin) not installed")
def test_ncdump_header(tmp_path):
    path = write_netcdf(_dataset(), tmp_path / "result.nc")
    out = subprocess.run(["ncdump", "-h", str(path)], capture_output=True, text=True, check=True)
    assert "double samples(sample, y, x)" in out.stdout
    assert "x:units = \"m\"" in out.stdout
    assert ":geoinvert_version = \"0.1.0\"" in out.stdout


def test_marginal_direction_is_unit():
    ds = _dataset()
    d = marginal_direction(ds)
    assert d.shape == (8, 8) and np.isclose(np.linalg.norm(d), 1.0)


@pytest.mark.parametrize("truth", [True, False])
def test_figures(tmp_path, truth):
    paths = figures(_dataset(truth=truth), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["marginal.png", "mean_std.png", "samples.png", "training.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_the_verdict_caption_sits_right_below_the_lowest_axes(tmp_path):
    """A square image in a tall figure leaves empty space below its axes: the caption goes
    right below the axes' tick labels, not to the foot of the figure."""
    from geoinvert.io.figures import _save, _subplots
    fig, ax = _subplots(1, 1, figsize=(4, 8))
    ax.imshow(np.zeros((8, 8)), aspect="equal")
    _save(fig, tmp_path / "f.png", _dataset().assign_attrs(verdict="ok", sampler="msign"))
    renderer = fig.canvas.get_renderer()
    (caption,) = fig.texts
    assert caption.get_text() == "msign: verdict ok"
    gap = ax.get_tightbbox(renderer).y0 - caption.get_window_extent(renderer).y1
    assert 0 <= gap < 0.05 * fig.bbox.height
