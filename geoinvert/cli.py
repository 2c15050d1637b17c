"""The ``geoinvert`` command: run, check and plot cases."""

import argparse
import logging
import math
import sys
import traceback
from pathlib import Path

__all__ = ["main", "build_parser", "RepeatFilter"]

EXIT_USER_ERROR = 2
logger = logging.getLogger("geoinvert")


class UserError(Exception):
    """A problem the user can fix (file missing, unreadable result); printed as one line."""


def _common(parser):
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug messages)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only errors; no progress bar")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error")


def build_parser():
    """The argparse parser of ``geoinvert``."""
    from geoinvert import __version__
    parser = argparse.ArgumentParser(
        prog="geoinvert", description="Bayesian inversion of elliptic PDEs with MsIGN.")
    parser.add_argument("--version", action="version", version=f"geoinvert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices       # name -> subparser, for errors in the command's usage
    run = sub.add_parser("run", help="train on a case file and write the result")
    run.add_argument("case", type=Path, help="case file (YAML)")
    run.add_argument("--out", type=Path, help="result netCDF file (default: output.path or "
                     "results/<name>.nc)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint saved beside the result (.ckpt)")
    run.add_argument("--seed", type=int, help="random seed (overrides sampler.seed)")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="training steps between checkpoints (overrides "
                     "sampler.checkpoint_every; 0: stage ends only)")
    run.add_argument("--ranks-per-solve", type=int, default=1, metavar="K",
                     help="under mpirun: MPI ranks sharing each PDE solve (default 1: each rank "
                     "solves its own samples)")
    run.add_argument("--force", action="store_true",
                     help="run a case whose estimated memory exceeds this machine's")
    check = sub.add_parser("check", help="validate a case file and print a summary")
    check.add_argument("case", type=Path, help="case file (YAML)")
    check.add_argument("--force", action="store_true",
                       help="accept a case whose estimated memory exceeds this machine's")
    plot = sub.add_parser("plot", help="write PNG figures of a result file")
    plot.add_argument("result", type=Path, help="result netCDF file")
    plot.add_argument("--out", type=Path, help="folder for the PNGs (default: <result>_figures)")
    sim = sub.add_parser("simulate", help="draw (field, data) pairs from a case's prior and "
                         "forward model, for amortized inference")
    sim.add_argument("case", type=Path, help="case file (YAML)")
    sim.add_argument("--n", type=int, required=True, metavar="N", help="simulations to draw")
    sim.add_argument("--out", type=Path, required=True, help="netCDF file to write")
    sim.add_argument("--seed", type=int, default=0, help="seed of the fields and the noise")
    am = sub.add_parser("amortize", help="train an amortized posterior q(x | y) on simulations")
    am.add_argument("case", type=Path, help="case file (YAML)")
    am.add_argument("--simulations", type=Path, required=True, help="file of geoinvert simulate")
    am.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    am.add_argument("--epochs", type=int, default=20, help="passes over the simulations")
    am.add_argument("--seed", type=int, default=0, help="seed of the weights and shuffles")
    am.add_argument("--method", choices=("msign", "joint"), default="msign",
                    help="msign: the conditional MsIGN (default); joint: the single-loss joint "
                    "flow of Xiao, Yan and Amit (fewer observations than parameters)")
    inf = sub.add_parser("infer", help="posterior of new data from an amortized model")
    inf.add_argument("model", type=Path, help="model file of geoinvert amortize (.pt)")
    inf.add_argument("--data", type=Path, required=True,
                     help="CSV with a 'value' column, or netCDF with 'data (set, observation)'"
                     " or 'value (observation)'")
    inf.add_argument("--out", type=Path, required=True, help="result file (.nc); several data "
                     "sets give OUT_0.nc, OUT_1.nc, ...")
    inf.add_argument("--samples", type=int, help="stored draws (default: output.samples)")
    inf.add_argument("--correct", action="store_true",
                     help="correct the draws to the exact posterior of each data set")
    inf.add_argument("--seed", type=int, default=0, help="seed of the draws")
    inf.add_argument("--fine-tune", type=int, default=0, metavar="STEPS",
                     help="refine the network on each data set by STEPS reverse-KL steps "
                     "(32 forward solves each) before drawing")
    cal = sub.add_parser("calibrate",
                         help="SBC and TARP of an amortized model on simulations")
    cal.add_argument("model", type=Path, help="model file of geoinvert amortize (.pt)")
    cal.add_argument("--simulations", type=Path, required=True,
                     help="simulations the model was not trained on (geoinvert simulate with "
                     "another seed)")
    cal.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNGs")
    cal.add_argument("--sets", type=int, default=200, help="data sets used (default 200)")
    ens = sub.add_parser("ensemble", help="write an ensemble of fields (the training data of a "
                         "learned prior)")
    ens.add_argument("generator", choices=("channels", "gaussian", "gstools"),
                     help="channels: sinuous high-permeability channels (docs/priors.md); "
                     "gaussian: draws of a case's prior; gstools: Gaussian random fields of "
                     "a GSTools covariance model, optionally truncated into two facies")
    ens.add_argument("case", type=Path, nargs="?", help="case file (gaussian only)")
    ens.add_argument("--n", type=int, required=True, metavar="N", help="fields to draw")
    ens.add_argument("--size", type=int, default=64, help="cells per side (channels; a power "
                     "of two, default 64)")
    ens.add_argument("--out", type=Path, required=True, help="netCDF file to write")
    ens.add_argument("--seed", type=int, default=0, help="seed of the draws")
    ens.add_argument("--model", choices=("gaussian", "exponential", "matern"), default="matern",
                     help="gstools: covariance model (default matern)")
    ens.add_argument("--var", type=float, default=1.0, help="gstools: variance (default 1)")
    ens.add_argument("--len-scale", type=float, default=0.2,
                     help="gstools: length scale, in units of the side (default 0.2)")
    ens.add_argument("--nu", type=float, default=1.5, help="gstools: Matern smoothness")
    ens.add_argument("--truncate", type=float, metavar="T",
                     help="gstools: two facies, -1 below T standard deviations, 2 above")
    pri = sub.add_parser("prior", help="learn a prior from an ensemble of fields")
    pri.add_argument("action", choices=("fit",), help="fit: train an MsIGN by maximum "
                     "likelihood on the ensemble")
    pri.add_argument("ensemble", type=Path, help="netCDF with field (sample, y, x)")
    pri.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    pri.add_argument("--epochs", type=int, default=30, help="passes over the fields")
    pri.add_argument("--seed", type=int, default=0, help="seed of the weights and the split")
    pri.add_argument("--bounds", type=float, nargs=4, metavar=("X0", "X1", "Y0", "Y1"),
                     default=(0.0, 1.0, 0.0, 1.0), help="the domain the fields cover (a case "
                     "using the prior must have these domain.bounds; default the unit square)")
    for p in (run, check, plot, sim, am, inf, cal, ens, pri):
        _common(p)
    return parser


class RepeatFilter(logging.Filter):
    """Lets the first ``shown`` records of each message template through and counts the rest,
    so a warning repeated thousands of times (failed solves of rejected proposals) costs a few
    lines and one summary (:meth:`summary`)."""

    def __init__(self, shown=3):
        super().__init__()
        self.shown, self.counts, self.examples = shown, {}, {}

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelname, record.msg)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.examples.setdefault(key, record.getMessage())
        return self.counts[key] <= self.shown

    def summary(self):
        """One line per template that was held back: how many more times it came, with the
        first such message as the example."""
        return [f"{level} {name}: {count - self.shown} more warnings like "
                f"\"{self.examples[(name, level, msg)]}\" not shown"
                for (name, level, msg), count in self.counts.items() if count > self.shown]


def _setup_logging(args):
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if args.verbose < 2:
        handler.addFilter(RepeatFilter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return handler


def _report_repeats(handler):
    for f in handler.filters:
        for line in f.summary():
            print(line, file=sys.stderr)


def _check(args):
    from geoinvert.case import load_case
    case = load_case(args.case)
    _check_memory(case, args.force)
    print(f"{args.case}: OK")
    print("\n".join(case.summary()))
    for warning in case.warnings():
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def _check_memory(case, force):
    """Refuse a case whose estimated memory exceeds this machine's, unless ``force``."""
    from geoinvert.case import memory_refusal
    refusal = memory_refusal(case)
    if refusal and not force:
        raise UserError(refusal)
    if refusal:
        logger.warning("%s", refusal.replace("; use --force to try anyway", " (--force given)"))


def _world():
    """COMM_WORLD when started by mpirun with several ranks, else None (no MPI needed)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def _run(args):
    from geoinvert.case import MAX_SEED, load_case
    from geoinvert.app import run
    from geoinvert.io import checkpoint_path
    from geoinvert.parallel import StopRequest, Stopped
    from geoinvert.inference.trainer import TrainingInterrupted
    world = _world()
    root = world is None or world.Get_rank() == 0
    if not root:
        logger.setLevel(logging.ERROR)
    for flag, value, low in (("--seed", args.seed, 0), ("--checkpoint-every",
                             args.checkpoint_every, 0), ("--ranks-per-solve",
                             args.ranks_per_solve, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    if args.seed is not None and args.seed > MAX_SEED:
        raise UserError(f"--seed: must be at most {MAX_SEED}, got {args.seed}")
    size = 1 if world is None else world.Get_size()
    if size % args.ranks_per_solve:
        raise UserError(f"--ranks-per-solve: {args.ranks_per_solve} does not divide the "
                        f"{size} MPI ranks")
    case = load_case(args.case)
    _check_memory(case, args.force)
    if root:
        for warning in case.warnings():
            logger.warning("%s", warning)
    try:
        with StopRequest() as stop:
            result = run(case, out=args.out, seed=args.seed, comm=world, resume=args.resume,
                         progress=not args.quiet and root, ranks_per_solve=args.ranks_per_solve,
                         checkpoint_every=args.checkpoint_every, stop=stop)
    except TrainingInterrupted as err:
        if root:
            from geoinvert.app import result_path
            out = result_path(case, args.out)
            _error(f"{err}; checkpoint saved to {checkpoint_path(out)}. Resume with: "
                   f"geoinvert run {args.case} --out {out} --resume"
                   + (f" --seed {args.seed}" if args.seed is not None else ""))
        return 128 + (15 if stop.received == "SIGTERM" else 2)
    except Stopped as err:
        if root:
            from geoinvert.app import result_path
            ckpt = checkpoint_path(result_path(case, args.out))
            kept = (f"; the training checkpoint {ckpt} is kept (continue with --resume)"
                    if ckpt.exists() else "")
            _error(f"{err.signal} received: stopped, no result written{kept}")
        return 128 + (15 if err.signal == "SIGTERM" else 2)
    if root:
        _print_summary(result, quiet=args.quiet)
    return 0


def _print_summary(result, *, quiet):
    """The run's verdict: summary lines on stdout (unless quiet), warnings on stderr."""
    from geoinvert.app import summary_lines
    lines, warnings = summary_lines(result.dataset)
    if not quiet:
        model = f" and the model {result.model_path}" if result.model_path else ""
        print(f"wrote {result.path}{model}")
        print("\n".join(lines))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)


def _plot(args):
    from geoinvert.io import figures, read_result
    if not args.result.is_file():
        raise UserError(f"{args.result}: no such result file")
    try:
        ds = read_result(args.result)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = "not a netCDF file" if "IO backends" in first else first[:100]
        raise UserError(f"{args.result}: cannot read as netCDF ({reason})") from None
    missing = [v for v in ("samples", "mean", "std") if v not in ds]
    if missing:
        raise UserError(f"{args.result}: not a geoinvert result (missing "
                        f"{', '.join(map(repr, missing))})")
    outdir = args.out or args.result.with_name(args.result.stem + "_figures")
    for path in figures(ds, outdir):
        if not args.quiet:
            print(path)
    return 0


def _simulate(args):
    from geoinvert.case import MAX_SEED, load_case
    from geoinvert.io import acquire_lock, release_lock
    from geoinvert.simulate import simulate
    _bounded("--n", args.n, 1, 10**8)
    _bounded("--seed", args.seed, 0, MAX_SEED)
    case = load_case(args.case)
    world = _world()
    root = world is None or world.Get_rank() == 0
    problem = _writable(args.out) if root else None
    if root and problem is None:
        held = acquire_lock(args.out, case.name)
        advice = "; wait for it to finish or choose another --out" if held and \
            held.startswith("another run") else ""
        problem = f"{held}{advice}" if held else None
    if world is not None:
        problem = world.bcast(problem)
    if problem:
        raise UserError(f"{args.out}: {problem}")
    try:
        written, failed = simulate(case, args.n, args.out, seed=args.seed, comm=world,
                                   progress=not args.quiet)
    finally:
        if root:
            release_lock(args.out)
    if root and not args.quiet:
        print(f"wrote {args.out}: {written} simulations of {case.name}"
              + (f" ({failed} draws with a failed solve left out)" if failed else ""))
    return 0


def _one_process(args):
    """The commands that run on one process refuse an MPI start of several ranks."""
    if _world() is not None:
        raise UserError(f"geoinvert {args.command} runs on one process: start it without "
                        "mpirun")


def _bounded(flag, value, low, high):
    """Refuse ``value`` of the option ``flag`` outside ``low..high`` (None passes)."""
    if value is not None and not low <= value <= high:
        raise UserError(f"{flag}: must be between {low} and {high}, got {value}")


def _writable_out(path):
    problem = _writable(path)
    if problem:
        raise UserError(f"{path}: {problem}")


def _writable(path):
    """What prevents writing ``path`` (a message), or None; creates its folder."""
    import os
    path = Path(path)
    if path.is_dir():
        return "is a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create its folder ({err.strerror})"
    return None if os.access(path.parent, os.W_OK) else "its folder is not writable"


def _amortize(args):
    _one_process(args)
    from geoinvert.app import amortize
    from geoinvert.case import MAX_SEED, load_case
    _bounded("--epochs", args.epochs, 1, 10**5)
    _bounded("--seed", args.seed, 0, MAX_SEED)
    case = load_case(args.case)
    if not args.simulations.is_file():
        raise UserError(f"{args.simulations}: no such simulations file")
    _writable_out(args.out)
    try:
        _, history = amortize(case, args.simulations, args.out, epochs=args.epochs,
                              seed=args.seed, progress=not args.quiet, method=args.method)
    except ValueError as err:
        from geoinvert.errors import CaseError
        if isinstance(err, CaseError):
            raise
        raise UserError(str(err)) from None
    if not args.quiet:
        print(f"wrote {args.out}: held-out negative log likelihood per dimension "
              f"{history[-1]['held_out']:.4f} after {len(history)} epochs")
    return 0


def _infer_data(path):
    """Data sets ``(sets, n_obs)`` from a CSV ``value`` column or a netCDF ``data``/``value``."""
    import numpy as np
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    if path.suffix.lower() == ".csv":
        from geoinvert.case.inputs import read_data_file
        config = {"data": {"variable": "value"}}
        values, _ = read_data_file(path, config)
        return values[None]
    from geoinvert.io import read_variable
    try:
        _, values = read_variable(path, ("data", "value"))
    except ValueError as err:
        raise UserError(str(err)) from None
    if not np.isfinite(values).all():
        raise UserError(f"{path}: the data must be finite")
    return np.atleast_2d(values)


def _infer(args):
    _one_process(args)
    from geoinvert.app import infer
    _bounded("--samples", args.samples, 2, 10**6)
    _bounded("--fine-tune", args.fine_tune, 0, 10**6)
    if not args.model.is_file() or not args.model.with_suffix(".json").is_file():
        raise UserError(f"{args.model}: no such amortized model (.pt with its .json)")
    data = _infer_data(args.data)
    _writable_out(args.out)
    try:
        results = infer(args.model, data, args.out, samples=args.samples, seed=args.seed,
                        correct=args.correct, progress=not args.quiet,
                        fine_tune=args.fine_tune)
    except ValueError as err:
        from geoinvert.errors import CaseError
        if isinstance(err, CaseError):
            raise
        raise UserError(str(err)) from None
    for result in results:
        _print_summary(result, quiet=args.quiet)
    return 0


def _calibrate(args):
    _one_process(args)
    from geoinvert.app import calibrate
    _bounded("--sets", args.sets, 20, 10**5)
    for path in (args.model, args.simulations):
        if not path.is_file():
            raise UserError(f"{path}: no such file")
    try:
        result = calibrate(args.model, args.simulations, args.out, sets=args.sets)
    except ValueError as err:
        raise UserError(str(err)) from None
    if not args.quiet:
        print(f"wrote {args.out}/calibration.json, sbc.png, tarp.png ({result['sets']} data "
              "sets)")
        uniform = "uniform" if result["sbc_ok"] else "NOT uniform"
        calibrated = "calibrated" if result["tarp_ok"] else "NOT calibrated"
        print(f"SBC: smallest p {min(result['sbc_p']):.3f} over {len(result['sbc_p'])} "
              f"summaries ({uniform})")
        print(f"TARP: largest coverage error {result['tarp_deviation']:.3f} (bound "
              f"{result['tarp_bound']:.3f}: {calibrated})")
    if not (result["sbc_ok"] and result["tarp_ok"]):
        print("WARNING: the amortized posterior is not calibrated on these simulations; "
              "amortize on more simulations or epochs, or infer with --correct",
              file=sys.stderr)
    return 0


def _ensemble(args):
    _one_process(args)
    from geoinvert import ensembles
    from geoinvert.case import MAX_SEED
    _bounded("--n", args.n, 1, 10**6)
    _bounded("--seed", args.seed, 0, MAX_SEED)
    _writable_out(args.out)
    if args.generator in ("channels", "gstools"):
        if args.case is not None:
            raise UserError(f"ensemble {args.generator} takes no case file")
        if not 4 <= args.size <= 1024 or args.size & (args.size - 1):
            raise UserError(f"--size: must be a power of two from 4 to 1024, got {args.size}")
    if args.generator == "channels":
        fields, _ = ensembles.channel_fields(args.n, args.size, seed=args.seed)
        parameters, bounds = {**ensembles.CHANNEL_DEFAULTS, "seed": args.seed}, None
    elif args.generator == "gstools":
        for flag, value in (("--var", args.var), ("--len-scale", args.len_scale),
                            ("--nu", args.nu)):
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{flag}: must be a positive number, got {value}")
        if args.truncate is not None and not math.isfinite(args.truncate):
            raise UserError(f"--truncate: must be a finite number, got {args.truncate}")
        parameters = {"model": args.model, "var": args.var, "len_scale": args.len_scale,
                      "nu": args.nu, "truncate": args.truncate, "seed": args.seed}
        fields = ensembles.gstools_fields(args.n, args.size, **parameters)
        bounds = None
    else:
        from geoinvert.case import load_case
        if args.case is None:
            raise UserError("ensemble gaussian needs a case file (its prior is drawn)")
        case = load_case(args.case)
        fields = ensembles.gaussian_fields(case, args.n, seed=args.seed)
        parameters, bounds = {"case": case.text, "seed": args.seed}, case.bounds
    ensembles.write_ensemble(args.out, fields, generator=args.generator,
                             parameters=parameters, **({"bounds": bounds} if bounds else {}))
    if not args.quiet:
        print(f"wrote {args.out}: {len(fields)} {args.generator} fields of "
              f"{fields.shape[1]} x {fields.shape[2]}")
    return 0


def _prior(args):
    _one_process(args)
    from geoinvert.ensembles import read_ensemble
    from geoinvert.priors.learned import fit_prior
    _bounded("--epochs", args.epochs, 1, 10**5)
    if not args.ensemble.is_file():
        raise UserError(f"{args.ensemble}: no such ensemble file")
    _writable_out(args.out)
    x0, x1, y0, y1 = args.bounds
    if not (x1 > x0 and y1 > y0) or not all(map(math.isfinite, args.bounds)):
        raise UserError(f"--bounds: need x0 < x1 and y0 < y1, got {list(args.bounds)}")
    from geoinvert.progress import bar as progress_bar
    bar = progress_bar(total=args.epochs, unit="epoch", disable=args.quiet, desc="prior fit")

    def step(record):
        bar.set_postfix(nll=f"{record['loss']:.4f}", held_out=f"{record['held_out']:.4f}")
        bar.update(1)

    try:
        fields = read_ensemble(args.ensemble)
        learned = fit_prior(fields, epochs=args.epochs, seed=args.seed,
                            bounds=tuple(args.bounds), callback=step)
    except ValueError as err:
        raise UserError(str(err)) from None
    finally:
        bar.close()
    from geoinvert.io import save_model
    from geoinvert.priors.learned import fit_figure
    save_model(_PriorSaver(learned), args.out, {})
    figure = fit_figure(learned, fields, args.out.with_suffix(".png"))
    r = learned.report
    if not args.quiet:
        print(f"wrote {args.out} and {figure.name}: held-out {r['held_out']} fields, negative "
              f"log likelihood per dimension {r['learned_nll']:.4f} nats "
              f"({r['learned_bits']:.4f} bits); the fitted Gaussian's {r['gaussian_nll']:.4f} "
              f"({r['gaussian_bits']:.4f} bits)")
    return 0


class _PriorSaver:
    def __init__(self, learned):
        self.learned = learned

    def save(self, path, *, metadata=None):
        self.learned.save(path)


COMMANDS = {"run": _run, "check": _check, "plot": _plot, "simulate": _simulate,
            "amortize": _amortize, "infer": _infer, "calibrate": _calibrate,
            "ensemble": _ensemble, "prior": _prior}


def _error(message):
    print(f"geoinvert: error: {message}", file=sys.stderr)


def _started_world():
    """COMM_WORLD of several ranks if this process already uses MPI, else None."""
    return _world() if "mpi4py.MPI" in sys.modules else None


def _is_root():
    world = _started_world()
    return world is None or world.Get_rank() == 0


def _rank_prefix():
    """``"rank r: "`` when running under mpirun with several ranks, else ``""``."""
    world = _started_world()
    return "" if world is None else f"rank {world.Get_rank()}: "


def _abort_others(status):
    """Under MPI, end every rank now: a rank that failed alone would leave the others waiting
    forever in a collective call."""
    world = _started_world()
    if world is not None:
        sys.stderr.flush()
        world.Abort(status)


def main(argv=None):
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Exit status 0 on success, 2 for user errors (one line on stderr naming the key or path;
    ``--debug`` shows the traceback), 1 for internal errors and failed training, 130/143 on
    SIGINT/SIGTERM. Under mpirun, user errors and failed training happen on every rank alike
    and rank 0 prints them; any other error on one rank is printed by that rank and ends the
    whole job (MPI_Abort) rather than leaving the other ranks waiting.
    """
    from geoinvert.errors import CaseError
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:     # in the command's usage, not the top level's that names no option
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, --version and usage errors (status 2 from argparse)
        return int(exc.code or 0)
    handler = _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (CaseError, UserError) as err:
        if args.debug:
            raise
        if _is_root():
            _error(err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _error(f"{_rank_prefix()}interrupted")
        _abort_others(130)
        return 130
    except Exception as err:  # noqa: BLE001 - last resort: one line unless --debug
        from geoinvert.errors import TrainingError
        if isinstance(err, TrainingError):     # decided on every rank alike
            if _is_root():
                _error(f"training failed: {err}")
            return 1
        if args.debug and _started_world() is None:
            raise
        if args.debug:
            traceback.print_exc()
        _error(f"{_rank_prefix()}internal error: {type(err).__name__}: {err} (rerun with "
               "--debug for details)")
        _abort_others(1)
        return 1
    finally:
        _report_repeats(handler)


if __name__ == "__main__":
    sys.exit(main())
