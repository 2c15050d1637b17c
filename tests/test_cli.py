"""The geoinvert command and geoinvert.run: in-process (real trainer, tiny sizes), plus subprocesses."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

import geoinvert
from geoinvert import cli
from geoinvert.problem.forward import failures
from geoinvert.testing import small_case

ROOT = Path(__file__).resolve().parents[1]
SMALL = small_case()


@pytest.fixture
def trainer(monkeypatch):
    """Record the runs of the real geoinvert.inference.trainer.Trainer (tiny sizes keep it fast)."""
    from geoinvert.inference import trainer as train
    calls, real = [], train.Trainer.run

    def run(self, *, start=1, generator=None, resume=None):
        calls.append({"start": start, "levels": sorted(self.posteriors), "steps": self.steps,
                      "resume": resume and (resume["stage"], resume["step"])})
        return real(self, start=start, generator=generator, resume=resume)
    monkeypatch.setattr(train.Trainer, "run", run)
    return calls


@pytest.fixture
def case_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL, sort_keys=False))
    return path


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"geoinvert {geoinvert.__version__}"


def test_usage_error_is_status_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 2


def test_unknown_option_is_named_in_its_commands_usage(capsys):
    """An option the command does not have is reported with that command's usage, which lists
    the options it does have (``-o`` for ``--out``), not the top level's."""
    assert cli.main(["run", "case.yaml", "-o", "out.nc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: geoinvert run ") and "--out OUT" in err
    assert err.strip().splitlines()[-1] == "geoinvert run: error: unrecognized arguments: -o out.nc"


def test_check_summary(case_file, capsys):
    assert cli.main(["check", str(case_file)]) == 0
    out = capsys.readouterr().out
    assert "observations: 2" in out and "level 3: 8 x 8 = 64 unknowns" in out
    # the estimate says what it assumes of the correction
    cost = next(line for line in out.splitlines() if line.startswith("estimated cost:"))
    assert cost.endswith("if the correction's chains converge in their first 10 draws with "
                         "short trajectories (at most 8 leapfrog steps)")


def test_run_writes_result_and_model(case_file, tmp_path, trainer, capsys):
    out = tmp_path / "res" / "small.nc"
    assert cli.main(["run", str(case_file), "--out", str(out), "--seed", "5", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.ckpt", "small.json", "small.nc",
                                                               "small.pt"]
    assert trainer == [{"start": 1, "levels": [1, 2, 3], "steps": 2, "resume": None}]
    with xr.open_dataset(out) as ds:
        assert ds["samples"].dims == ("sample", "y", "x") and ds.sizes["sample"] == 40
        assert {"mean", "std", "quantiles", "log_prob", "log_target", "truth", "direction",
                "observed", "predictive_mean", "mean_level1", "train_loss"} <= set(ds.variables)
        assert ds.attrs["seed"] == 5 and ds.attrs["case"].startswith("name: small")
        assert ds.attrs["nfs"] > 0 and ds.attrs["wall_time"] > 0
        assert 0 < ds.attrs["diagnostics_is_ess"] <= 1 and np.isfinite(ds.attrs["diagnostics_psis_khat"])
        assert np.all(np.isfinite(ds["log_target"])) and np.all(np.isfinite(ds["log_prob"]))
    model = geoinvert.load_model(out)
    x, log_p = model.sample(3)
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(model.log_prob(x), log_p)


def test_resume_of_a_finished_run_trains_no_more(case_file, tmp_path, trainer):
    out = tmp_path / "small.nc"
    assert cli.main(["run", str(case_file), "--out", str(out), "-q"]) == 0
    first = xr.open_dataset(out).load()
    assert cli.main(["run", str(case_file), "--out", str(out), "-q", "--resume"]) == 0
    assert [c["resume"] for c in trainer] == [None, (3, 2)]
    with xr.open_dataset(out) as again:
        xr.testing.assert_identical(again["samples"], first["samples"])
        assert again.attrs["resumed"] == 1 and again.attrs["nfs"] == first.attrs["nfs"]


def test_failed_run_leaves_nothing(case_file, tmp_path, monkeypatch, capsys):
    from geoinvert.inference import trainer as train

    def broken(*args, **kwargs):
        raise RuntimeError("training diverged")
    monkeypatch.setattr(train.Trainer, "run", broken)
    out = tmp_path / "res" / "small.nc"
    assert cli.main(["run", str(case_file), "--out", str(out), "-q"]) == 1
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists() and not any(out.parent.glob("*"))


def test_python_api_run(trainer, tmp_path):
    case = geoinvert.load_case(SMALL, folder=tmp_path)
    result = geoinvert.run(case, out=tmp_path / "api.nc", progress=False)
    assert isinstance(result, geoinvert.Result) and result.path.is_file()
    assert result.dataset["mean"].shape == (8, 8)
    assert result.model_path == tmp_path / "api.pt"


def test_plot(case_file, tmp_path, trainer, capsys):
    out = tmp_path / "small.nc"
    assert cli.main(["run", str(case_file), "--out", str(out), "-q"]) == 0
    assert cli.main(["plot", str(out)]) == 0
    names = sorted(p.name for p in (tmp_path / "small_figures").iterdir())
    assert names == ["marginal.png", "mean_std.png", "samples.png", "training.png"]


def test_plot_errors(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "none.nc")]) == 2
    (tmp_path / "junk.nc").write_text("not netcdf")
    assert cli.main(["plot", str(tmp_path / "junk.nc")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"geoinvert: error: {tmp_path / 'none.nc'}: no such result file"
    assert err[1].startswith(f"geoinvert: error: {tmp_path / 'junk.nc'}: ")


def _subprocess(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "geoinvert.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_subprocess_check_ok():
    proc = _subprocess("check", str(ROOT / "cases" / "default.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "estimated cost" in proc.stdout


def test_subprocess_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "noise": {"std": -1}}))
    proc = _subprocess("check", str(path))
    assert proc.returncode == 2
    assert proc.stderr == "geoinvert: error: noise.std: must be > 0, got -1.0\n"


def test_example_script(tmp_path, trainer, monkeypatch, capsys):
    import runpy
    monkeypatch.setenv("GEOINVERT_EXAMPLE_SMALL", "1")
    monkeypatch.setattr(sys, "argv", ["build_and_run.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "build_and_run.py"), run_name="__main__")
    assert (tmp_path / "example.nc").is_file() and (tmp_path / "example.png").is_file()
    assert "is-ESS" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["asvgd", "pcn", "mala", "hmc"])
def test_every_sampler_kind_writes_the_same_result_format(kind, tmp_path):
    from geoinvert.app import run
    if kind == "asvgd":
        sampler = {**SMALL["sampler"], "kind": kind, "upsampling": "nearest"}
    else:
        sampler = {"kind": kind, "chains": 3, "draws": 30, "warmup": 20,
                   **({"leapfrog": 3} if kind == "hmc" else {})}
    config = {**SMALL, "sampler": sampler}
    result = run(config, out=tmp_path / f"{kind}.nc", progress=False, seed=1)
    with xr.open_dataset(result.path) as ds:
        assert ds["samples"].dims == ("sample", "y", "x") and ds.attrs["sampler"] == kind
        assert {"mean", "std", "quantiles", "log_prob", "log_target", "predictive_mean",
                "truth"} <= set(ds.variables)
        assert np.all(np.isfinite(ds["log_target"])) and ds.attrs["nfs"] > 0
        if kind == "asvgd":
            assert np.all(np.isfinite(ds["log_prob"])) and "train_loss" in ds
            assert geoinvert.load_model(result.model_path).upsampling == "nearest"
            assert ds.attrs["diagnostics_correction"] == "hmc"
            assert ds["flow_samples"].dims == ("flow_sample", "y", "x")
            assert sorted(set(ds["chain"].values)) == [0, 1, 2, 3]
        else:
            assert np.all(np.isnan(ds["log_prob"])) and result.model is None
            assert ds.sizes["sample"] == 40 and sorted(set(ds["chain"].values)) == [0, 1, 2]
            assert 0 < ds.attrs["diagnostics_acceptance"] <= 1 and ds.attrs["diagnostics_ess"] > 0
            expected = 3 * (1 + (20 + 30) * (3 if kind == "hmc" else 1)) + 40   # + start, output
            assert ds.attrs["nfs"] == expected


def test_the_stored_summaries_are_those_of_every_chain_draw_not_only_of_the_stored_samples(
        tmp_path):
    """Thinning to ``output.samples`` changes what is stored, not the mean, std and quantiles:
    the same chains kept whole and thinned to 12 samples give the same summaries."""
    from geoinvert.app import run
    sampler = {"kind": "pcn", "chains": 3, "draws": 40, "warmup": 10}
    whole = run({**SMALL, "sampler": sampler, "output": {"samples": 1000}},
                out=tmp_path / "whole.nc", progress=False, seed=2).dataset
    thin = run({**SMALL, "sampler": sampler, "output": {"samples": 12}},
               out=tmp_path / "thin.nc", progress=False, seed=2).dataset
    assert whole.sizes["sample"] == 120 and thin.sizes["sample"] == 12
    draws = whole["samples"].values
    np.testing.assert_allclose(thin["mean"], draws.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(thin["std"], draws.std(0, ddof=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(thin["quantiles"], np.quantile(draws, [0.05, 0.5, 0.95], axis=0),
                               rtol=0, atol=1e-12)
    assert np.abs(thin["samples"].values.mean(0) - draws.mean(0)).max() > 1e-3


def test_a_corrected_run_summarises_every_draw_of_its_chains(tmp_path, monkeypatch):
    """The corrected draws behind a flow's result: its mean and std are those of all the
    chains' draws, of which ``samples`` keep 12."""
    from geoinvert import app
    seen, real = {}, app.build_dataset

    def spy(samples, **kw):
        seen["draws"] = kw["draws"]
        return real(samples, **kw)
    monkeypatch.setattr(app, "build_dataset", spy)
    ds = app.run({**SMALL, "output": {"samples": 12}}, out=tmp_path / "c.nc", progress=False,
                 seed=2).dataset
    draws = seen["draws"]
    finest = max(int(v[len("mean_level"):]) for v in ds.variables if v.startswith("mean_level"))
    np.testing.assert_allclose(ds[f"mean_level{finest}"], ds["mean"], rtol=0, atol=1e-12)
    assert ds.sizes["sample"] == 12
    assert draws.shape == (ds.attrs["diagnostics_chains"] * ds.attrs["diagnostics_draws"],
                           *ds["mean"].shape)
    np.testing.assert_allclose(ds["mean"], draws.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds["std"], draws.std(0, ddof=1), rtol=0, atol=1e-12)


def test_a_run_corrected_by_the_lifted_kernel_says_so(tmp_path, capsys):
    """``sampler.correction.kernel: lifted`` end to end: the result names it, its solves are
    counted and the stored draws' log densities are the posterior's."""
    case = json.loads(json.dumps(SMALL))
    case["sampler"]["correction"]["kernel"] = "lifted"
    out = tmp_path / "lifted.nc"
    ds = geoinvert.run(case, out=out, progress=False).dataset
    a = ds.attrs
    assert a["diagnostics_correction"] == "lifted" and a["diagnostics_metric"] == "unit"
    assert a["diagnostics_correction_nfs"] > 0 and a["nfs"] > a["diagnostics_correction_nfs"]
    assert np.isfinite(a["diagnostics_rhat"]) and a["diagnostics_leapfrog"] >= 1
    assert np.isfinite(ds["samples"]).all()


def test_temporaries_left_by_a_killed_run_are_removed(case_file, tmp_path):
    out = tmp_path / "small.nc"
    stale = [tmp_path / "small.nc.tmpabc123", tmp_path / "small.ckpt.tmpxyz"]
    for path in stale:
        path.write_bytes(b"half a file")
    (tmp_path / "small.pt.tmpdir9").mkdir()
    (tmp_path / "other.nc.tmp1").write_bytes(b"not ours")
    assert cli.main(["run", str(case_file), "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == ["other.nc.tmp1"]


def test_failed_solves_are_counted_and_reported(case_file, tmp_path, monkeypatch, capsys):
    from geoinvert.problem.forward.testbeds import LinearForward
    real = LinearForward.__call__

    counted = []

    def flaky(self, x):       # every fourth field of a batch "fails" (not the truth's solve)
        counted.append(failures.is_counted())
        y = real(self, x)
        bad = (torch.arange(y.shape[0]) % 4 == 0) & (y.shape[0] > 1)
        return torch.where(bad[:, None], torch.full_like(y, float("nan")), y)
    monkeypatch.setattr(LinearForward, "__call__", flaky)
    out = tmp_path / "small.nc"
    config = {**SMALL, "sampler": {**SMALL["sampler"], "correction": "none"}}
    case_file.write_text(yaml.safe_dump(config, sort_keys=False))
    assert cli.main(["run", str(case_file), "--out", str(out)]) == 0
    with xr.open_dataset(out) as ds:
        failed = int(ds.attrs["diagnostics_failed_solves"])
        assert failed == int(ds["train_failed"].sum()) > 0
        assert np.isfinite(ds["train_loss"]).all()
    assert f"{failed} forward solves failed" in capsys.readouterr().out
    assert all(counted[1:])             # the synthetic data's solve comes before the run


def test_the_summary_counts_the_failed_solves_of_every_part_of_a_run():
    from geoinvert.app import summary_lines
    ds = xr.Dataset(attrs={"sampler": "msign", "nfs": 100, "wall_time": 1.0, "verdict": "ok",
                           "diagnostics_failed_solves": 3,
                           "diagnostics_mode_search_failed_solves": 2,
                           "diagnostics_correction_failed_solves": 5})
    lines, warnings = summary_lines(ds)
    assert any(line.startswith("10 forward solves failed") for line in lines)
    assert not warnings
    ds.attrs.update(diagnostics_failed_solves=0, diagnostics_mode_search_failed_solves=0,
                    diagnostics_correction_failed_solves=0)
    assert not any("failed" in line for line in summary_lines(ds)[0])


@pytest.mark.parametrize("sampler, extra, message", [
    ("smc", {}, "stage 1: tempered SMC pool"),
    ("laplace", {"pool_levels": 2, "reverse_weight": 0.0, "frozen_proposal": True,
                 "pool_warmup": 1.0, "lr_warmup": 0.2, "steps": [2, 4, 2]},
     "stage 2: Laplace pool")])
def test_coarse_sampler_from_the_case_file(tmp_path, caplog, sampler, extra, message):
    from geoinvert.app import run
    config = {**SMALL, "sampler": {**SMALL["sampler"], "coarse_sampler": sampler, **extra}}
    with caplog.at_level("INFO", logger="geoinvert.inference.trainer"):
        result = run(config, out=tmp_path / "smc.nc", progress=False, seed=1)
    assert message in caplog.text
    with xr.open_dataset(result.path) as ds:
        assert np.all(np.isfinite(ds["log_prob"])) and ds.attrs["nfs"] > 0


def test_repeated_warnings_are_shown_three_times_then_counted():
    import logging
    f = cli.RepeatFilter(shown=3)
    record = lambda i: logging.LogRecord("geoinvert.problem.forward", logging.WARNING, __file__, 1,  # noqa: E731
                                         "%d of 8 samples failed", (i,), None)
    passed = [f.filter(record(i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    error = logging.LogRecord("geoinvert", logging.ERROR, __file__, 1, "boom", (), None)
    assert all(f.filter(error) for _ in range(5))
    assert f.summary() == ['WARNING geoinvert.problem.forward: 7 more warnings like "0 of 8 samples '
                           'failed" not shown']


def test_the_chain_progress_bar_shows_r_hat_to_three_decimals():
    """R-hat 1.0132 misses the criterion of 1.01: the bar must not round it to 1.01."""
    from geoinvert.app import _ChainProgress
    bar = _ChainProgress(10, True, "correction")
    bar.set(rhat=1.0132, ess=231.4)
    bar(5, 10, 0.912)
    text = str(bar.bar)
    bar.close()
    assert "rhat=1.013" in text and "ess=231" in text and "accept=0.91" in text


def test_the_finished_chain_progress_bar_shows_the_last_look(capsys):
    """The look that stops the chains comes after their last iteration: the bar must end
    with its R-hat, not the previous look's (it showed 1.014 above a summary of 1.007)."""
    from geoinvert.app import _ChainProgress
    bar = _ChainProgress(10, True, "correction")
    bar.set(rhat=1.0141, ess=231.0)
    bar(10, 10, 0.9)
    bar.set(rhat=1.0072, ess=696.0)           # the last look, no iteration after it
    bar.close()
    last = [record for record in capsys.readouterr().err.split("\r") if record.strip()][-1]
    assert "rhat=1.007" in last and "ess=696" in last


def test_run_prints_its_verdict(case_file, tmp_path, capsys):
    out = tmp_path / "small.nc"
    assert cli.main(["run", str(case_file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "method: msign + correction (hmc" in captured.out
    assert "flow fit:" in captured.out and "correction: R-hat" in captured.out
    with xr.open_dataset(out) as ds:
        verdict = ds.attrs["verdict"]
        assert {"flow_samples", "flow_log_weight", "chain", "draw"} <= set(ds.variables)
        assert ds.attrs["diagnostics_correction_nfs"] > 0
        share = f"{ds.attrs['nfs']} forward solves ({ds.attrs['diagnostics_correction_nfs']} in " \
            "the correction)"
        fit = [line for line in captured.out.splitlines() if line.startswith("flow fit:")][0]
    assert share in captured.out      # where the solves went
    # a poor flow fit is no defect of the corrected draws, only of their cost: the line says so
    assert fit.startswith("flow fit: good") != fit.endswith("do not depend on it, only their "
                                                            "cost does")
    # tiny chains (4 x 10 draws) cannot reach an ESS of 100: the verdict says so, loudly
    assert verdict != "ok" and "effective sample size" in verdict
    assert "verdict: NOT RELIABLE" in captured.out
    assert "WARNING: effective sample size" in captured.err


def test_summary_names_the_per_mode_coordinates_and_moves():
    """With several modes the summary says the chains moved in their own modes' coordinates,
    how many independence moves followed each local move and how often they and the mode
    jumps were accepted."""
    from geoinvert.app import summary_lines
    attrs = {"sampler": "msign", "nfs": 1000, "wall_time": 1.0, "verdict": "ok",
             "diagnostics_correction": "hmc", "diagnostics_metric": "dense",
             "diagnostics_coordinates": "laplace", "diagnostics_correction_nfs": 800,
             "diagnostics_correction_mode_coordinates": 2, "diagnostics_independence_moves": 7,
             "diagnostics_mode_jump_acceptance": 0.93,
             "diagnostics_modes_found": 2, "diagnostics_independence_acceptance": 0.1,
             "diagnostics_rhat": 1.005, "diagnostics_ess": 900.0, "diagnostics_ess_tail": 800.0,
             "diagnostics_mcse_mean": 0.03, "diagnostics_acceptance": 0.8}
    lines, warnings = summary_lines(xr.Dataset(attrs=attrs))
    assert lines[0].startswith("method: msign + correction (hmc, dense metric, in the Laplace "
                               "coordinates of each chain's mode (of 2))")
    assert "independence moves (flow + Laplace at 2 modes, 7 per local move) accepted 0.10, " \
        "mode jumps accepted 0.93" in lines[1]
    assert warnings == [] and lines[-1] == "verdict: ok"
    # each mode's share of the draws, with its Monte-Carlo error
    shares = {**attrs, "diagnostics_mode_shares": np.array([0.512, 0.488]),
              "diagnostics_mode_shares_mcse": np.array([0.021, 0.021]),
              "diagnostics_mode_ess": 566.0}
    lines, _ = summary_lines(xr.Dataset(attrs=shares))
    assert "modes: the draws' share of each of the 2 modes found 51 +/- 2 %, 49 +/- 2 % " \
        "(effective sample size of the shares 566)" in lines
    one = {**attrs, "diagnostics_correction_mode_coordinates": 1,
           "diagnostics_independence_moves": 1, "diagnostics_mode_jump_acceptance": math.nan,
           "diagnostics_modes_found": 1}
    lines, _ = summary_lines(xr.Dataset(attrs=one))
    assert "(hmc, dense metric, in Laplace coordinates)" in lines[0]
    lifted = {**one, "diagnostics_correction": "lifted", "diagnostics_metric": "unit"}
    lines, _ = summary_lines(xr.Dataset(attrs=lifted))
    assert lines[0].startswith("method: msign + correction (lifted: constrained HMC on the "
                               "manifold of fields and residuals, in the prior's coordinates);")
    assert "(flow + Laplace at 1 mode) accepted 0.10" in lines[1]
    assert "jumps" not in lines[1]
    chosen = {**lifted, "diagnostics_correction_pilot_leapfrog": 27.0}
    lines, _ = summary_lines(xr.Dataset(attrs=chosen))
    assert "in the prior's coordinates; chosen: HMC's quarter period took 27 leapfrog " \
        "steps);" in lines[0]
    again = {**lifted, "diagnostics_correction_pilot_leapfrog": 12.0,
             "diagnostics_correction_hmc_solves_per_ess": 412.3}
    lines, _ = summary_lines(xr.Dataset(attrs=again))
    assert "in the prior's coordinates; chosen after HMC's first block of draws, which cost " \
        "412 solves per effective draw);" in lines[0]
    modes = {**attrs, "diagnostics_correction": "lifted", "diagnostics_metric": "unit"}
    lines, _ = summary_lines(xr.Dataset(attrs=modes))
    assert "in the prior's coordinates, jumping between the Laplace coordinates of 2 modes)" \
        in lines[0]


def test_the_verdict_names_the_limit_that_stopped_the_correction():
    """Chains cut by the budget name sampler.budget; chains at max_draws name it (raising
    `draws` alone would not lengthen them); chains that stopped by themselves name `draws`."""
    import types
    import numpy as np
    from geoinvert.app import _correction_limit
    from geoinvert.diagnostics import verdict
    from geoinvert.inference.config import CorrectionConfig
    config = CorrectionConfig(draws=250, max_draws=1000)
    def ran(draws):
        return types.SimpleNamespace(chains=types.SimpleNamespace(
            samples=np.zeros((8, draws, 2, 2))))
    assert _correction_limit(config, ran(1000), False) == "sampler.correction.max_draws"
    assert _correction_limit(config, ran(600), False) == "sampler.correction.draws"
    assert _correction_limit(config, ran(600), True) == "sampler.budget"
    d = {"rhat": 1.05, "ess": 500.0, "ess_tail": 500.0}
    assert "raise sampler.correction.max_draws and the warm-up" in verdict(
        d, raise_draws=_correction_limit(config, ran(1000), False))[0]


@pytest.mark.slow
def test_a_budget_holds_with_the_correction_and_the_mode_search(tmp_path):
    """Training gets what the budget leaves after the reservation; the mode search's actual
    cost and the correction's trajectories (shortened to fit) keep the total within it."""
    from geoinvert.app import run
    budget = 4000
    correction = {**SMALL["sampler"]["correction"], "max_draws": 40, "leapfrog": 12}
    config = {**SMALL, "sampler": {**SMALL["sampler"], "budget": budget, "steps": 1000,
                                   "correction": correction}}
    ds = run(config, out=tmp_path / "budget.nc", progress=False).dataset
    assert budget / 2 < ds.attrs["nfs"] <= budget
    assert ds.attrs["diagnostics_mode_search_nfs"] > 0


def test_too_few_finite_flow_draws_leave_the_correction_unstarted_not_the_run_failed():
    """Fewer finite flow draws than chains: the flow's correction cannot start (the run keeps
    the flow's draws, flagged, with the reason); gpCN's chains, which have nothing else to
    return, fail the run."""
    import numpy as np
    from geoinvert.app import _chain_starts
    from geoinvert.errors import TrainingError
    from geoinvert.samplers.chains import NonFiniteStart
    x = np.arange(10.0)[:, None, None] * np.ones((10, 2, 2))
    log_target = np.full(10, -np.inf)
    log_target[[1, 4, 7]] = 0.0
    assert _chain_starts(x, log_target, 3)[:, 0, 0].tolist() == [1.0, 4.0, 7.0]
    with pytest.raises(NonFiniteStart) as err:
        _chain_starts(x, log_target, 8)
    assert err.value.chains == [3, 4, 5, 6, 7]
    assert "only 3 of 10 flow draws have a finite posterior density" in err.value.reason
    with pytest.raises(TrainingError, match="only 3 of 10 Laplace draws"):
        _chain_starts(x, log_target, 8, flow=False)


def test_a_progress_bar_written_to_a_file_updates_rarely():
    """A batch job's redirected stderr gets the bar's start and end, not one record per
    update; a terminal keeps tqdm's frequent updates."""
    import io
    from geoinvert import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        bar = progress.bar(file=stream, total=2000, unit="it", desc="correction")
        for i in range(2000):
            bar.set_postfix({"accept": f"{i / 2000:.2f}"}, refresh=False)
            bar.update(1)
        bar.close()
    assert log.getvalue().count("\r") == 2 and "2000/2000" in log.getvalue()
    for stream, interval in ((log, progress.LOG_INTERVAL), (terminal, 0.1)):
        bar = progress.bar(file=stream, total=1)
        assert bar.mininterval == interval
        bar.close()
