"""MPI layout of a run (ensemble and solve communicators) and stopping on signals.

A run on ``N`` ranks with ``k`` ranks per solve forms ``N / k`` solve groups of ``k``
consecutive ranks. Each group distributes its PDE solves over its ``k`` ranks (dolfinx and PETSc
on the group's communicator) and handles its own block of every batch; the ranks with the same
position in their groups form an ensemble communicator, over which flow gradients are summed.
Every rank holds the whole model.
"""

import logging
import signal
import threading
from dataclasses import dataclass

__all__ = ["Layout", "layout", "StopRequest"]

logger = logging.getLogger(__name__)


@dataclass
class Layout:
    """Communicators of a run.

    Attributes:
        world: All ranks of the run (None: one process without MPI).
        solve: The ranks sharing each PDE solve (None: ``COMM_SELF``).
        ensemble: The ranks summing flow gradients, one per solve group (None: one group).
    """

    world: object = None
    solve: object = None
    ensemble: object = None

    @property
    def rank(self) -> int:
        return 0 if self.world is None else self.world.Get_rank()

    @property
    def size(self) -> int:
        return 1 if self.world is None else self.world.Get_size()

    @property
    def root(self) -> bool:
        """Whether this is the rank that writes files and prints (rank 0 of ``world``)."""
        return self.rank == 0

    @property
    def groups(self) -> int:
        """Number of solve groups (ranks of the ensemble)."""
        return 1 if self.ensemble is None else self.ensemble.Get_size()

    def bcast(self, value):
        """``value`` of the root on every rank."""
        return value if self.world is None else self.world.bcast(value, root=0)


def layout(world=None, ranks_per_solve: int = 1) -> Layout:
    """Split ``world`` into solve groups of ``ranks_per_solve`` consecutive ranks.

    Args:
        world: mpi4py communicator of the run, or None (one process).
        ranks_per_solve: Ranks sharing each PDE solve; must divide the size of ``world``.

    Raises:
        ValueError: ``ranks_per_solve`` < 1 or not a divisor of the number of ranks.
    """
    size = 1 if world is None else world.Get_size()
    k = int(ranks_per_solve)
    if k != ranks_per_solve or k < 1 or size % k:
        raise ValueError(f"ranks per solve must be a positive divisor of the number of ranks "
                         f"({size}), got {ranks_per_solve!r}")
    if size == 1:
        return Layout()
    rank = world.Get_rank()
    if k == 1:
        from mpi4py import MPI
        solve = MPI.COMM_SELF
    else:
        solve = world.Split(rank // k, rank)
    ensemble = world.Split(rank % k, rank) if k < size else None
    return Layout(world, solve, ensemble)


class StopRequest:
    """Records SIGINT and SIGTERM inside a ``with`` block instead of dying at once.

    Calling the object tells whether a stop was asked for; training polls it after every step,
    saves a checkpoint and stops cleanly (:class:`geoinvert.train.TrainingInterrupted`). A second
    SIGINT while a stop is pending raises :class:`KeyboardInterrupt` at once. The previous
    handlers come back when the block ends. Outside the main thread it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step and saving a checkpoint "
                       "(press Ctrl-C again to abort without one)", self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
