"""Malformed and hostile case files: each is refused by `geoinvert check` and `run` with exit
status 2 and one line naming what is wrong, quickly and without writing anything."""

import time
from pathlib import Path

import pytest

from geoinvert import cli

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT / "cases" / "default.yaml").read_text()


def _bomb(depth=9, width=9):
    """The classic alias bomb: each anchor lists the previous one ``width`` times."""
    lines = ["a0: &a0 [1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]"
              for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def _observed(file):
    """The demo case with observed data read from ``file`` instead of synthetic data."""
    return BASE.replace("  synthetic:\n    truth: {shape: gaussian, center: [0.6, 0.4], width: "
                        "0.15, amplitude: -1.5}\n    seed: 0\n", f"  file: {file}\n")


HOSTILE = {
    "duplicate key": (BASE.replace("noise:\n  std: 0.005", "noise:\n  std: 0.005\n  std: 0.5"),
                      "duplicate key 'std'"),
    "duplicate section": (BASE + "noise:\n  std: 0.1\n", "duplicate key 'noise'"),
    "alias": (BASE.replace("source: 1.0", "source: &s 1.0").replace(
        "dirichlet: {left: 1.0, right: 0.0}", "dirichlet: {left: *s, right: 0.0}"),
        "YAML aliases (*s) are not allowed"),
    "alias bomb": (BASE.replace("forward:\n", "forward:\n  source: *a9\n", 1).replace(
        "name: default\n", _bomb() + "name: default\n"), "YAML aliases"),
    "deep nesting": (BASE + "description: " + "[" * 5000 + "]" * 5000 + "\n",
                     "nested more than 32 levels deep"),
    "10000-digit integer": (BASE.replace("sampler:\n", "sampler:\n  seed: " + "9" * 10000
                                         + "\n"), "a number has too many digits"),
    "seed too large": (BASE.replace("sampler:\n", "sampler:\n  seed: "
                                    "1180591620717411303424\n"),
                       "sampler.seed: must be between 0 and 4294967295, got 1180591620717"),
    "not a mapping": ("- just\n- a list\n", "a case file must be a mapping of sections"),
    "chains for a flow": (BASE.replace("sampler:\n", "sampler:\n  chains: 8\n"),
                          "sampler.chains: applies to sampler.kind pcn"),
    "overflowing source": (BASE.replace("source: 1.0", 'source: "exp(1e308)"'),
                           "forward.source: is not finite on the lattice (got inf"),
    "overflowing measurement": (BASE.replace("observations:\n", "observations:\n  functions: "
                                             "[\"1/(x-x)\"]\n", 1),
                                "observations.functions[0]: is not finite"),
    "tiny correlation length": (BASE.replace("correlation_length: 0.3",
                                             "correlation_length: 1e-300"),
                                "prior.correlation_length: 1e-300 is not of the domain's scale"),
    "no Dirichlet boundary": (BASE.replace("dirichlet: {left: 1.0, right: 0.0}", "dirichlet: {}"),
                              "forward.dirichlet: an elliptic problem needs a Dirichlet"),
    "truth file not netCDF": (BASE.replace("truth: {shape: gaussian, center: [0.6, 0.4], width: "
                                           "0.15, amplitude: -1.5}", "file: truth.nc"),
                              "data.synthetic.file: cannot read netCDF"),
    "alias in functions": (BASE.replace("observations:\n", "observations:\n  functions: &f "
                                        "[x]\n  names: *f\n", 1), "YAML aliases (*f)"),
    "NaN noise": (BASE.replace("std: 0.005", "std: .nan"), "noise.std: must be finite, got nan"),
    "infinite noise": (BASE.replace("std: 0.005", "std: .inf"), "noise.std: must be finite"),
    "too many levels": (BASE.replace("finest: 3", "finest: 40"),
                        "levels.finest: must be between 2 and 8, got 40"),
    "misspelt kind": (BASE.replace("  kind: msign ", "  kind: msgin "),
                      "(did you mean 'msign'?)"),
    "misspelt key": (BASE.replace("  std: 1.0\n", "  stdd: 1.0\n"),
                     "prior.stdd: unknown key"),
    "reversed bounds": (BASE.replace("bounds: [0, 1, 0, 1]", "bounds: [1, 0, 0, 1]"),
                        "domain.bounds: needs x1 > x0"),
    "unknown function": (BASE.replace("source: 1.0", 'source: "foo(x)"'),
                         "forward.source: unknown function 'foo'"),
    "deeply nested expression": (BASE.replace("source: 1.0", 'source: "' + "(" * 5000 + "x"
                                              + ")" * 5000 + '"'),
                                 "forward.source: expression longer than 2000 characters"),
    "overflowing constant": (BASE.replace("source: 1.0", 'source: "2^1e308"'),
                             "forward.source: overflows"),
    "no observations": (BASE.replace("  points: [[0.25, 0.25], [0.5, 0.25], [0.75, 0.25],\n"
                                     "           [0.25, 0.5], [0.5, 0.5], [0.75, 0.5],\n"
                                     "           [0.25, 0.75], [0.5, 0.75], [0.75, 0.75]]",
                                     "  points: []"), "observations: no observations"),
    "point not a pair": (BASE.replace("[0.25, 0.25], [0.5, 0.25]", "[0.25], [0.5, 0.25]"),
                         "observations.points[0]: must be a pair [x, y]"),
    "a number as text": (BASE.replace("std: 0.005", "std: lots"),
                         "noise.std: must be a number, got 'lots'"),
    "tab indentation": (BASE.replace("noise:\n  std", "noise:\n\tstd"),
                        "invalid YAML at line"),
    "mesh not XDMF": (BASE.replace("  units: \"1\"\n", "  units: \"1\"\n  mesh: text.xdmf\n"),
                      "domain.mesh: "),
    "mesh without its HDF5 file": (BASE.replace("  units: \"1\"\n",
                                                "  units: \"1\"\n  mesh: orphan.xdmf\n"),
                                   "refers to 'orphan.h5', which does not exist"),
    "point outside the mesh": (BASE.replace("  units: \"1\"\n", "  units: \"1\"\n  mesh: "
                                            "lshape.xdmf\n").replace(
        "dirichlet: {left: 1.0, right: 0.0}", "dirichlet: {all: 0.0}").replace(
        "[0.25, 0.25], [0.5, 0.25]", "[0.9, 0.9], [0.5, 0.25]"),
        "observations.points[0]: [0.9, 0.9] lies outside the mesh"),
    "netCDF data of strings": (_observed("strings.nc"), "data.variable: 'value' in "),
    "CSV with a column twice": (_observed("twice.csv"), "has the column 'value' more than once"),
    "CSV with a short row": (_observed("ragged.csv"), "line 3 has 1 fields, the header 2"),
    "CSV with text values": (_observed("words.csv"), "data.file: non-numeric entry"),
    "CSV of the wrong length": (_observed("ten.csv"),
                                "data.file: has 10 values but there are 9 observations"),
    "data file is a folder": (_observed("folder.nc"), "data.file: no such file"),
}


def _files(folder):
    """The input files the hostile cases refer to, written into ``folder``."""
    import numpy as np
    import xarray as xr
    (folder / "truth.nc").write_text("not netCDF")
    (folder / "text.xdmf").write_text("hello, this is not XML\n")
    (folder / "orphan.xdmf").write_text(
        '<?xml version="1.0"?>\n<Xdmf><Domain><Grid Name="mesh"><Topology TopologyType='
        '"Triangle"><DataItem Format="HDF">orphan.h5:/Mesh/topology</DataItem></Topology>'
        '<Geometry GeometryType="XY"><DataItem Format="HDF">orphan.h5:/Mesh/geometry'
        '</DataItem></Geometry></Grid></Domain></Xdmf>\n')
    for suffix in ("xdmf", "h5"):
        (folder / f"lshape.{suffix}").write_bytes((ROOT / "meshes" / f"lshape.{suffix}")
                                                  .read_bytes())
    xr.Dataset({"value": (("obs",), np.array(["a"] * 9))}).to_netcdf(folder / "strings.nc")
    (folder / "twice.csv").write_text("value,value\n" + "1,2\n" * 9)
    (folder / "ragged.csv").write_text("value,note\n1,a\n2\n" + "3,c\n" * 7)
    (folder / "words.csv").write_text("value\n" + "one\n" * 9)
    (folder / "ten.csv").write_text("value\n" + "0.5\n" * 10)
    (folder / "folder.nc").mkdir()


def _write(tmp_path, name, content):
    path = tmp_path / f"{name.replace(' ', '_')}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


MAX_SECONDS = 30
"""Time bound of a refusal (they take well under a second; set-up-time checks a few)."""
MAX_PYTHON_BYTES = 300e6
"""Bound on the Python and numpy allocations of a refusal (tracemalloc's peak)."""


def assert_refused(capsys, args, expected):
    """``geoinvert ARGS`` exits with status 2 and one error line containing ``expected``,
    within :data:`MAX_SECONDS` and :data:`MAX_PYTHON_BYTES`."""
    import tracemalloc
    tracemalloc.start()
    start = time.monotonic()
    try:
        code = cli.main(args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("geoinvert: error: ") and expected in err[0], err
    assert elapsed < MAX_SECONDS and peak < MAX_PYTHON_BYTES, (elapsed, peak)
    return elapsed


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_case_is_refused_in_one_line(name, tmp_path, capsys):
    content, expected = HOSTILE[name]
    path = _write(tmp_path, name, content)
    _files(tmp_path)
    assert_refused(capsys, ["check", str(path)], expected)
    out = tmp_path / "out" / "r.nc"
    assert_refused(capsys, ["run", str(path), "--out", str(out), "-q"], expected)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("name, content, expected", [
    ("utf16", BASE.encode("utf-16"), "is not UTF-8 text"),
    ("binary", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("nul", (BASE + "\x00").encode(), "is not a text file"),
    ("too big", (BASE + "#" + "x" * 1_000_001 + "\n").encode(), "a case file may have at most"),
])
def test_a_case_file_that_is_not_small_utf8_text_is_refused(name, content, expected, tmp_path,
                                                            capsys):
    assert_refused(capsys, ["check", str(_write(tmp_path, name, content))], expected)


def test_a_seed_beyond_the_limit_on_the_command_line_is_refused(tmp_path, capsys):
    path = _write(tmp_path, "case", BASE)
    assert_refused(capsys, ["run", str(path), "--seed", "99999999999999999999999", "--out",
                      str(tmp_path / "r.nc"), "-q"], "--seed: must be at most 4294967295")


@pytest.mark.parametrize("name, make, expected", [
    ("not netcdf", lambda p: p.write_text("not netcdf"), "cannot read as netCDF (not a netCDF "
                                                         "file)"),
    ("no mean", lambda p: __import__("xarray").Dataset(
        {"samples": (("sample", "y", "x"), __import__("numpy").zeros((2, 2, 2)))}).to_netcdf(p),
     "not a geoinvert result (missing 'mean', 'std')"),
    ("missing", lambda p: None, "no such result file"),
])
def test_plot_of_a_file_that_is_not_a_result_is_refused(name, make, expected, tmp_path, capsys):
    path = tmp_path / "r.nc"
    make(path)
    assert_refused(capsys, ["plot", str(path)], expected)
    assert not (tmp_path / "r_figures").exists()


def test_a_second_run_on_the_same_output_is_refused_and_a_stale_lock_taken_over(tmp_path,
                                                                                capsys):
    """A live process holding the output's lock (here: this test process) makes a run fail at
    once naming it; a lock whose process is gone is taken over and released at the end."""
    import os
    import subprocess
    import sys
    from geoinvert.io import lock_path
    from geoinvert.testing import small_case
    case = tmp_path / "small.yaml"
    case.write_text(__import__("yaml").safe_dump(small_case()))
    out = tmp_path / "res" / "small.nc"
    out.parent.mkdir()
    lock_path(out).write_text(f"{os.getpid()} {__import__('socket').gethostname()} other\n")
    assert_refused(capsys, ["run", str(case), "--out", str(out), "-q"],
             f"another run (PID {os.getpid()} on")
    assert not out.exists() and lock_path(out).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock_path(out).write_text(f"{gone} {__import__('socket').gethostname()} killed\n")
    assert cli.main(["run", str(case), "--out", str(out), "-q"]) == 0
    assert out.exists() and not lock_path(out).exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    from geoinvert.testing import small_case
    case = tmp_path / "small.yaml"
    case.write_text(__import__("yaml").safe_dump(small_case()))
    elapsed = assert_refused(capsys, ["run", str(case), "--out", "/proc/geoinvert-test.nc", "-q"],
                       "/proc/geoinvert-test.nc: ")
    assert elapsed < 30


@pytest.mark.parametrize("name, edit, machine", [
    ("levels beyond the machine", lambda c: c.replace("finest: 3\n  min_cells: 16",
                                                     "finest: 8\n  min_cells: 1024"), 8e9),
    ("200,000 observation points", None, 2e9),
])
def test_a_case_beyond_the_machine_is_refused_unless_forced(name, edit, machine, tmp_path,
                                                            capsys, monkeypatch):
    """On a machine of ``machine`` bytes (the test's), a case whose estimated memory exceeds
    it is refused by check and run, naming --force; with --force, check accepts it."""
    import geoinvert.case.cost
    monkeypatch.setattr(geoinvert.case.cost, "machine_memory", lambda: machine)
    expected = "the run needs an estimated"
    if edit is None:
        rng = __import__("numpy").random.default_rng(0)
        points = rng.uniform(0.01, 0.99, (200_000, 2))
        (tmp_path / "wells.csv").write_text("x,y,value\n" + "".join(
            f"{x:.5f},{y:.5f},0.5\n" for x, y in points))
        content = _observed("wells.csv").replace(
            BASE[BASE.index("  points:"):BASE.index("data:")], "")
    else:
        content = edit(BASE)
    path = _write(tmp_path, name, content)
    assert_refused(capsys, ["check", str(path)], expected)
    out = tmp_path / "out" / "r.nc"
    assert_refused(capsys, ["run", str(path), "--out", str(out), "-q"], "use --force")
    assert not out.parent.exists()
    assert cli.main(["check", str(path), "--force"]) == 0
    assert "estimated memory" in capsys.readouterr().out


def test_a_prior_too_wide_for_the_solver_is_reported_not_hidden(tmp_path, capsys):
    """prior.std 100 makes exp(m) span 1e250: most solves fail. The run still ends, but check
    warns beforehand, the failed draws are left out of the result and counted, the
    correction that cannot start says so, the verdict is NOT RELIABLE, and the thousands of
    failed solves give a handful of lines, not one each."""
    import numpy as np
    from geoinvert.io import read_result
    content = BASE.replace("  std: 1.0\n", "  std: 100\n").replace(
        "sampler:\n", "sampler:\n  blocks: 3\n  hidden: 16\n  steps: 20\n  batch: 16\n").replace(
        "  samples: 300\n  figures: true", "  samples: 64\n  figures: false")
    path = _write(tmp_path, "wide", content)
    assert cli.main(["check", str(path)]) == 0
    assert "prior.std: 100.0 lets a field of the prior span" in capsys.readouterr().err
    out = tmp_path / "wide.nc"
    assert cli.main(["run", str(path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    left_out = [l for l in captured.out.splitlines() if "draws left out" in l]
    assert len(left_out) == 1 and "verdict: NOT RELIABLE" in captured.out, captured.out
    err = [l for l in captured.err.replace("\r", "\n").splitlines()
           if l.strip() and "nFS/s" not in l and "it/s" not in l]
    assert len(err) < 15, err
    assert any("the correction could not start" in l for l in err), err
    ds = read_result(out)
    failed, drawn = ds.attrs["diagnostics_failed_draws"], ds.attrs["diagnostics_drawn"]
    assert 0 < failed < drawn == 64 and ds.sizes["sample"] == drawn - failed
    assert np.isfinite(ds["log_target"]).all() and np.isfinite(ds["mean"]).all()
    assert "forward solve failed for" in ds.attrs["verdict"]
