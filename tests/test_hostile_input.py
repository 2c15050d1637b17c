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
    "10000-digit integer": (BASE.replace("  batch: 32\n", "  batch: 32\n  seed: " + "9" * 10000
                                         + "\n"), "a number has too many digits"),
    "seed too large": (BASE.replace("  batch: 32\n", "  batch: 32\n  seed: "
                                    "1180591620717411303424\n"),
                       "sampler.seed: must be between 0 and 4294967295, got 1180591620717"),
    "not a mapping": ("- just\n- a list\n", "a case file must be a mapping of sections"),
    "chains for a flow": (BASE.replace("  batch: 32\n", "  batch: 32\n  chains: 8\n"),
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
}


def _write(tmp_path, name, content):
    path = tmp_path / f"{name.replace(' ', '_')}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _refused(capsys, args, expected):
    start = time.monotonic()
    code = cli.main(args)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("geoinvert: error: ") and expected in err[0], err
    return elapsed


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_case_is_refused_in_one_line(name, tmp_path, capsys):
    content, expected = HOSTILE[name]
    path = _write(tmp_path, name, content)
    (tmp_path / "truth.nc").write_text("not netCDF")
    _refused(capsys, ["check", str(path)], expected)
    out = tmp_path / "out" / "r.nc"
    _refused(capsys, ["run", str(path), "--out", str(out), "-q"], expected)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("name, content, expected", [
    ("utf16", BASE.encode("utf-16"), "is not UTF-8 text"),
    ("binary", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("nul", (BASE + "\x00").encode(), "is not a text file"),
    ("too big", (BASE + "#" + "x" * 1_000_001 + "\n").encode(), "a case file may have at most"),
])
def test_a_case_file_that_is_not_small_utf8_text_is_refused(name, content, expected, tmp_path,
                                                            capsys):
    _refused(capsys, ["check", str(_write(tmp_path, name, content))], expected)


def test_a_seed_beyond_the_limit_on_the_command_line_is_refused(tmp_path, capsys):
    path = _write(tmp_path, "case", BASE)
    _refused(capsys, ["run", str(path), "--seed", "99999999999999999999999", "--out",
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
    _refused(capsys, ["plot", str(path)], expected)
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
    _refused(capsys, ["run", str(case), "--out", str(out), "-q"],
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
    elapsed = _refused(capsys, ["run", str(case), "--out", "/proc/geoinvert-test.nc", "-q"],
                       "/proc/geoinvert-test.nc: ")
    assert elapsed < 30
