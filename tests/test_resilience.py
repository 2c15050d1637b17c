"""Runs killed and resumed, stopped by signals, and a rank failing alone under mpirun.

Each test starts ``geoinvert run`` in subprocesses on a tiny linear-Gaussian case (no PDE), so
what is exercised is the real command: checkpoints written atomically every step, ``--resume``,
the SIGTERM handler and the MPI error path.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from geoinvert.testing import small_case

SMALL = small_case()

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CASE = {**SMALL, "sampler": {"blocks": 1, "hidden": 4, "steps": 12, "batch": 8,
                             "checkpoint_every": 1, "correction": SMALL["sampler"]["correction"]},
        "output": {"samples": 30, "figures": False}}


@pytest.fixture
def case_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(CASE, sort_keys=False))
    return path


def command(case_file, out, *extra, python=(sys.executable,)):
    return [*python, "-m", "geoinvert.cli", "run", str(case_file), "--out", str(out), "-q",
            "--seed", "3", *extra]


def finish(args, timeout=300):
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


STOPPING = """
import os, signal, sys
from geoinvert import app, cli
after, sig = int(sys.argv[1]), int(sys.argv[2])
written, real = [], app.write_checkpoint
def write_then_signal(*args, **kwargs):      # the signal arrives right after a checkpoint
    real(*args, **kwargs)
    written.append(1)
    if len(written) == after:
        os.kill(os.getpid(), sig)
app.write_checkpoint = write_then_signal
sys.exit(cli.main(sys.argv[3:]))
"""


def interrupt(case_file, out, after, sig, *extra):
    """Run ``geoinvert run`` and send it ``sig`` right after its ``after``-th checkpoint
    write (the same point of the run every time); returns the return code and stderr."""
    script = case_file.parent / "stopping.py"
    script.write_text(STOPPING)
    args = command(case_file, out, *extra, python=(sys.executable, str(script), str(after),
                                                   str(int(sig))))
    args.remove("-m")
    args.remove("geoinvert.cli")
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


def saved_state(path):
    return torch.load(path, weights_only=True)["state"]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(case_file, tmp_path):
    reference = tmp_path / "ref" / "small.nc"
    finish(command(case_file, reference))
    out = tmp_path / "run" / "small.nc"
    ckpt = out.with_suffix(".ckpt")
    rng = random.Random(7)
    # first SIGKILL from scratch, then SIGTERM (clean stop) and SIGKILL again while resuming
    code, _ = interrupt(case_file, out, rng.randint(2, 8), signal.SIGKILL)
    assert code == -signal.SIGKILL and ckpt.exists() and not out.exists()
    first = saved_state(ckpt)
    code, err = interrupt(case_file, out, rng.randint(2, 8), signal.SIGTERM, "--resume")
    assert code == 143, err
    assert "checkpoint saved to" in err and "--resume" in err and not out.exists()
    state = saved_state(ckpt)
    assert not state["complete"] and state["step"] >= 1
    code, _ = interrupt(case_file, out, rng.randint(2, 8), signal.SIGKILL, "--resume")
    assert code == -signal.SIGKILL
    later = saved_state(ckpt)
    assert (later["stage"], later["step"]) > (first["stage"], first["step"])
    finish(command(case_file, out, "--resume"))
    assert not list(out.parent.glob("*.tmp*")), "a temporary file was left behind"
    a, b = torch.load(reference.with_suffix(".pt"), weights_only=True), \
        torch.load(out.with_suffix(".pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed model differs"
    with xr.open_dataset(reference) as ra, xr.open_dataset(out) as rb:
        np.testing.assert_array_equal(ra["samples"], rb["samples"])
        np.testing.assert_array_equal(ra["train_loss"], rb["train_loss"])
        assert rb.attrs["resumed"] == 1 and rb.attrs["nfs"] == ra.attrs["nfs"]


def test_a_corrupt_or_foreign_checkpoint_is_a_user_error(case_file, tmp_path):
    from geoinvert import cli
    out = tmp_path / "small.nc"
    out.with_suffix(".ckpt").write_bytes(b"not a checkpoint")
    assert cli.main(command(case_file, out, "--resume", python=())[2:]) == 2
    other = tmp_path / "other.yaml"
    other.write_text(case_file.read_text().replace("seed: 2", "seed: 4"))
    assert cli.main(command(case_file, out, python=())[2:]) == 0
    assert cli.main(command(other, out, "--resume", python=())[2:]) == 2
    assert cli.main(command(case_file, out, "--resume", python=())[2:-2]
                    + ["--seed", "9"]) == 2


FAILING_RANK = """
import sys
from mpi4py import MPI
from geoinvert import cli
from geoinvert.problem import posterior
if MPI.COMM_WORLD.rank == 1:           # rank 1 alone fails in its third gradient evaluation
    calls, real = [], posterior.Posterior.grad_log_prob
    def failing(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self, x)
    posterior.Posterior.grad_log_prob = failing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_one_failing_rank_ends_the_whole_job(case_file, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "res" / "small.nc"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    args = ["mpirun", *root, "--oversubscribe", "-n", "2", sys.executable, str(script), "run",
            str(case_file), "--out", str(out), "-q"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "geoinvert: error: rank 1: internal error: RuntimeError: injected failure" in done.stderr
    assert not out.exists()


SIGNALLED = """
import os, signal, sys
from geoinvert import cli
import {module} as target
where, sig = "{name}", int(sys.argv[1])
real = getattr(target, where)
def signalled(*args, **kwargs):                # the signal arrives as this step begins
    os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
setattr(target, where, signalled)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module, name, phase", [
    ("geoinvert.case", "Case.posterior", "set-up"),
    ("geoinvert.inference.laplace", "fit_laplace", "correction"),
])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_training_stops_the_run_at_once(case_file, tmp_path, module, name,
                                                         phase, sig):
    """SIGTERM or SIGINT while the forward models are built, or when the correction begins
    (after training), ends the run at once with 143 or 130 and one line, writes no result,
    and keeps the training checkpoint when there is one (a resumed run then finishes)."""
    owner, _, attr = name.rpartition(".")
    script = tmp_path / "signalled.py"
    if owner:      # a method: patch it on its class
        text = SIGNALLED.replace("import {module} as target", f"from {module} import {owner} "
                                 "as target").replace("{name}", attr)
    else:
        text = SIGNALLED.replace("{module}", module).replace("{name}", name)
    script.write_text(text)
    out = tmp_path / "run" / "small.nc"
    args = [sys.executable, str(script), str(int(sig)), "run", str(case_file), "--out", str(out),
            "-q", "--seed", "3"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + int(sig), done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"geoinvert: error: {signal.Signals(sig).name} received: "
                                "stopped, no result written"), lines
    assert not out.exists() and not list(tmp_path.glob("run/*.tmp*"))
    ckpt = out.with_suffix(".ckpt")
    assert ckpt.exists() == (phase == "correction")
    if phase == "correction":
        assert "continue with --resume" in lines[-1]
        finish(command(case_file, out, "--resume"))
        assert out.exists()


@pytest.mark.parametrize("tamper, expected", [
    (lambda s: s.pop("optimizer"), "is not a whole training state (missing optimizer)"),
    (lambda s: s["model"].update({k: v[..., :1] for k, v in [next(
        (k, v) for k, v in s["model"].items() if v.ndim and v.shape[-1] > 1)]}),
     "this case's network has"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "holds another network"),
    (lambda s: s.update(stage=99), "is at stage 99"),
    (lambda s: s.update(version=0), "has checkpoint version 0"),
])
def test_a_checkpoint_of_the_right_case_but_a_broken_state_is_a_user_error(case_file, tmp_path,
                                                                           tamper, expected,
                                                                           capsys):
    from geoinvert import cli
    out = tmp_path / "small.nc"
    assert cli.main(command(case_file, out, python=())[2:]) == 0
    ckpt = out.with_suffix(".ckpt")
    saved = torch.load(ckpt, weights_only=True)
    tamper(saved["state"])
    torch.save(saved, ckpt)
    capsys.readouterr()
    assert cli.main(command(case_file, out, "--resume", python=())[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "delete it" in err[0], err
