"""User-facing errors that name the offending case-file key or path."""

__all__ = ["CaseError", "TrainingError"]


class CaseError(ValueError):
    """A problem with a case file or its inputs, located by a dotted key path.

    ``str(CaseError("prior.correlation_length", "must be > 0, got -1"))`` is
    ``"prior.correlation_length: must be > 0, got -1"``. The command line prints that one line and
    exits with status 2.

    Args:
        key: Dotted key path (``"noise.std"``) or a file path; empty for the whole case.
        message: What is wrong and, where useful, what would be accepted.
    """

    def __init__(self, key, message):
        self.key = str(key)
        self.message = str(message)
        super().__init__(f"{self.key}: {self.message}" if self.key else self.message)

    def __reduce__(self):
        return (type(self), (self.key, self.message))


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. many consecutive steps with a non-finite loss or gradient,
    or every target evaluation of a stage's start failed). Raised on every rank alike; the
    command line prints it in one line and exits with status 1."""
