"""MPI layout of a run (ensemble and solve communicators) and stopping on signals.

A run on ``N`` ranks with ``k`` ranks per solve forms ``N / k`` solve groups of ``k``
consecutive ranks. Each group distributes its PDE solves over its ``k`` ranks (dolfinx and PETSc
on the group's communicator) and handles its own block of every batch; the ranks with the same
position in their groups form an ensemble communicator, over which flow gradients are summed.
Every rank holds the whole model.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["Layout", "layout", "Stopped", "StopRequest", "Ensemble", "draw_noise", "in_chunks",
           "EVALUATION_CHUNK"]

EVALUATION_CHUNK = 256
"""Samples evaluated at once where no gradient is needed (importance pools, final draws): the
solves keep their factorisations and solutions per batch, so a batch of thousands of samples
on a fine mesh, or with many observations, would need gigabytes at once."""


def in_chunks(fn, x, size=EVALUATION_CHUNK):
    """``fn(x)`` computed on blocks of at most ``size`` samples and concatenated along the
    first dimension (``fn`` returns a tensor or a tuple of tensors)."""
    import torch
    if x.shape[0] <= size:
        return fn(x)
    parts = [fn(block) for block in x.split(size)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)

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


class Stopped(Exception):
    """SIGINT or SIGTERM arrived outside training (set-up, correction, writing): the run stops
    at once. ``signal`` is the signal's name."""

    def __init__(self, name):
        super().__init__(f"{name} received")
        self.signal = name


class StopRequest:
    """SIGINT and SIGTERM inside a ``with`` block: a stop at once, or after a training step.

    During training (inside :meth:`deferring`) a signal is recorded; calling the object tells
    whether one came, and training polls it after every step, saves a checkpoint and stops
    cleanly (:class:`geoinvert.inference.trainer.TrainingInterrupted`); a second SIGINT raises
    :class:`KeyboardInterrupt` at once. Anywhere else (building the forward models, the
    correction, writing the result) the handler raises :class:`Stopped` at once: there is
    nothing a checkpoint could keep, and a scheduler's time limit must not wait for the next
    training step. The previous handlers come back when the block ends. Outside the main
    thread it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self.deferred = False
        self._previous = {}

    def __call__(self) -> bool:
        return self.received is not None

    @contextlib.contextmanager
    def deferring(self):
        """Within the block a signal waits for the next training step; a stop recorded when
        the block ends (after the last step's check) is raised then."""
        self.deferred = True
        try:
            yield self
        finally:
            self.deferred = False
        if self.received is not None:
            raise Stopped(self.received)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferred:
            self.received = name
            raise Stopped(name)
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name
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


# -- ensemble sums -------------------------------------------------------------------------


class Ensemble:
    """Sums over the ranks of an ensemble communicator; the identity without one.

    Each rank draws its share of the batch and evaluates its own forward models; losses are
    normalised by *global* counts, so summing the ranks' gradients (:meth:`allreduce_grads`)
    gives the gradient of the global loss.

    Args:
        comm: An mpi4py communicator (ranks holding independent forward models) or None.
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()

    def share(self, num: int) -> int:
        """This rank's part of ``num`` samples (the first ``num % size`` ranks take one more)."""
        return num // self.size + (self.rank < num % self.size)

    def part(self, num: int) -> slice:
        """This rank's contiguous block of ``num`` samples, ``share(num)`` long, in rank order."""
        start = self.rank * (num // self.size) + min(self.rank, num % self.size)
        return slice(start, start + self.share(num))

    def scatter(self, tensors):
        """This rank's block (:meth:`part`) of each tensor of a list drawn whole on every rank."""
        return [t[self.part(t.shape[0])] for t in tensors]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' blocks (:meth:`part`) along dim 0, on every rank."""
        if self.comm is None:
            return local
        import torch
        return torch.cat(self.comm.allgather(local))

    def map(self, fn, x: torch.Tensor):
        """``fn`` of this rank's block (:meth:`part`) of ``x``, gathered in rank order on every
        rank; ``fn`` returns a tensor or a tuple of tensors, and is not called on an empty
        block (a batch of one point is evaluated by one rank)."""
        mine = x[self.part(x.shape[0])]
        out = fn(mine) if mine.shape[0] else None
        if self.comm is None:
            return out
        parts = [p for p in self.comm.allgather(out) if p is not None]
        import torch
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)

    def sum(self, *values: float) -> np.ndarray:
        """Elementwise sum over the ranks of a few floats, ndarray float64."""
        local = np.asarray(values, dtype=np.float64)
        if self.comm is None:
            return local
        out = np.empty_like(local)
        self.comm.Allreduce(local, out)
        return out

    def max(self, value: float) -> float:
        """Maximum over the ranks."""
        if self.comm is None:
            return float(value)
        from mpi4py import MPI
        return float(self.comm.allreduce(float(value), op=MPI.MAX))

    def allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in place (one Allreduce)."""
        if self.comm is None:
            return
        import torch
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64).numpy()
        total = np.empty_like(flat)
        self.comm.Allreduce(flat, total)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = torch.from_numpy(total[offset:offset + n]).reshape(p.shape).to(p.dtype)
            offset += n


def draw_noise(model, level, num, generator, ensemble=None):
    """This rank's block of the noise of ``num`` samples of ``level``, drawn whole on every rank.

    Every rank draws the whole batch from the same generator and keeps its own block
    (:meth:`Ensemble.part`), so the generators stay in step and a seed gives the same samples,
    hence the same training, on any number of ranks.
    """
    ens = ensemble or Ensemble()
    return ens.scatter(model.sample_noise(num, level, generator=generator))
