"""Logging of failed forward solves.

A solve fails where a field is beyond the solver (a coefficient too rough or too large for the
factorisation): the forward model returns a NaN row for that sample, lists it in
``last_failures``, and the target there is -inf. The samplers meet such fields at proposals they
then reject, and count them; :func:`geoinvert.run` reports the count in one line of its summary
(and in the result's attributes). So while a caller counts them (:func:`counted`), the forward
models log each failure at DEBUG only; elsewhere (a script calling a forward model) the first
few are warnings.
"""

import contextlib
import logging

__all__ = ["FailureLog", "counted", "is_counted"]

_counting = 0


@contextlib.contextmanager
def counted():
    """Within it, failed solves are logged at DEBUG: the caller counts them and reports the
    total (nests; the previous behaviour returns on exit)."""
    global _counting
    _counting += 1
    try:
        yield
    finally:
        _counting -= 1


def is_counted():
    """Whether a caller counts failed solves now (inside :func:`counted`)."""
    return _counting > 0


class FailureLog:
    """Logs a forward model's failed solves: outside :func:`counted`, a warning for each of the
    first :attr:`SHOWN` batches that have any, then once that further ones go unlogged (a
    script's logging shows a few lines, not one per batch); inside it, DEBUG only.

    Args:
        log: the forward model module's logger.
    """

    SHOWN = 3

    def __init__(self, log):
        self.log, self.batches = log, 0

    def __call__(self, message, *args):
        if is_counted():
            self.log.debug(message, *args)
            return
        self.batches += 1
        if self.batches <= self.SHOWN:
            self.log.warning(message, *args)
            if self.batches == self.SHOWN:
                self.log.warning("further failed solves of this forward model are not logged; "
                                 "the samplers count them in their results")
        else:
            self.log.debug(message, *args)
