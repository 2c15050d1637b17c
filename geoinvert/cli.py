"""The ``geoinvert`` command: run, check and plot cases."""

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

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
    run = sub.add_parser("run", help="train on a case file and write the result")
    run.add_argument("case", type=Path, help="case file (YAML)")
    run.add_argument("--out", type=Path, help="result netCDF file (default: output.path or "
                     "results/<name>.nc)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the model saved beside the result")
    run.add_argument("--seed", type=int, help="random seed (overrides sampler.seed)")
    check = sub.add_parser("check", help="validate a case file and print a summary")
    check.add_argument("case", type=Path, help="case file (YAML)")
    plot = sub.add_parser("plot", help="write PNG figures of a result file")
    plot.add_argument("result", type=Path, help="result netCDF file")
    plot.add_argument("--out", type=Path, help="folder for the PNGs (default: <result>_figures)")
    for p in (run, check, plot):
        _common(p)
    return parser


def _setup_logging(args):
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _check(args):
    from geoinvert.case import load_case
    case = load_case(args.case)
    print(f"{args.case}: OK")
    print("\n".join(case.summary()))
    return 0


def _run(args):
    from geoinvert.case import load_case
    from geoinvert.export import run
    case = load_case(args.case)
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed: must be >= 0, got {args.seed}")
    result = run(case, out=args.out, seed=args.seed, progress=not args.quiet, resume=args.resume)
    if not args.quiet:
        print(f"wrote {result.path} and {result.model_path}")
    return 0


def _plot(args):
    from geoinvert.export import figures, read_result
    if not args.result.is_file():
        raise UserError(f"{args.result}: no such result file")
    try:
        ds = read_result(args.result)
    except (OSError, ValueError) as err:
        raise UserError(f"{args.result}: cannot read as netCDF ({err})") from None
    if "samples" not in ds:
        raise UserError(f"{args.result}: not a geoinvert result (no 'samples' variable)")
    outdir = args.out or args.result.with_name(args.result.stem + "_figures")
    for path in figures(ds, outdir):
        if not args.quiet:
            print(path)
    return 0


COMMANDS = {"run": _run, "check": _check, "plot": _plot}


def _error(message):
    print(f"geoinvert: error: {message}", file=sys.stderr)


def main(argv=None):
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Exit status 0 on success, 2 for user errors (one line on stderr naming the key or path;
    ``--debug`` shows the traceback), 1 for internal errors, 130 on interrupt.
    """
    from geoinvert.errors import CaseError
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (status 2 from argparse)
        return int(exc.code or 0)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (CaseError, UserError) as err:
        if args.debug:
            raise
        _error(err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            raise
        _error(f"internal error: {type(err).__name__}: {err} (rerun with --debug for details)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
