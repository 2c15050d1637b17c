"""Progress bars that suit where they are written.

On a terminal (or in a notebook) a bar updates several times a second. Written to a file (a
batch job's redirected stderr, ``mpirun ... 2> log``), every update is one more carriage-
return-separated record of the whole bar: a two-minute run wrote some 700 of them, an hour's
run tens of thousands. There a bar updates once every :data:`LOG_INTERVAL` seconds, and at
its end.
"""

import sys

__all__ = ["bar", "LOG_INTERVAL"]

LOG_INTERVAL = 30.0
"""Seconds between a bar's updates when its stream is not a terminal."""


def bar(*, file=None, **kwargs):
    """A ``tqdm.auto`` bar with ``kwargs``, updated every :data:`LOG_INTERVAL` seconds at most
    when ``file`` (default ``sys.stderr``) is not a terminal and no notebook shows it."""
    from tqdm.auto import tqdm
    stream = sys.stderr if file is None else file
    interactive = tqdm.__module__.startswith("tqdm.notebook") or \
        getattr(stream, "isatty", lambda: False)()
    if not interactive:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL)
    return tqdm(file=stream, **kwargs)
