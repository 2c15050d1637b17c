"""Simulations of a case for amortized inference: x from the prior, y = F(x) + e.

:func:`simulate` draws them chunk by chunk with the batched forward model, shares each chunk's
solves over MPI ranks and writes them with :class:`~geoinvert.io.SimulationWriter`;
:func:`~geoinvert.io.read_simulations` streams them back.
"""

import contextlib
import logging

import torch

from geoinvert.errors import TrainingError
from geoinvert.io import SIMULATION_CHUNK, SimulationWriter, atomic_path
from geoinvert.parallel import Ensemble
from geoinvert.problem.forward import failures

__all__ = ["simulate"]

logger = logging.getLogger(__name__)

MAX_FAILED_FRACTION = 0.9
"""Past this fraction of failed solves the prior's fields are beyond the solver: stop."""


def simulate(case, num, out, *, seed=0, comm=None, chunk=SIMULATION_CHUNK, progress=False):
    """Draw ``num`` simulations of ``case`` on its finest level and write them to ``out``.

    Every rank draws each chunk's fields and noise whole from the shared generator, so the
    file is the same on any number of ranks; each rank solves its block of the chunk (one
    process per solve) and rank 0 writes the gathered chunk. Draws whose solve fails are left
    out, counted (the file's ``failed`` attribute) and made up by further draws. The file is
    renamed into place when complete.

    Args:
        case: A :class:`~geoinvert.case.Case`.
        num: Simulations wanted (>= 1).
        out: netCDF file to write.
        seed: Seed of the fields and the noise.
        comm: MPI communicator of the ranks sharing the work (None: one process).
        chunk: Simulations drawn and solved at a time.
        progress: A progress bar on rank 0.

    Returns:
        ``(written, failed)``.

    Raises:
        TrainingError: more than :data:`MAX_FAILED_FRACTION` of the solves failed.
    """
    from geoinvert.progress import bar as progress_bar
    ens = Ensemble(comm)
    root = comm is None or comm.Get_rank() == 0
    level, prior = case.finest, case.prior()
    forward = case.forward(level)            # one process per solve: each rank its block
    noise_std = torch.as_tensor(case.noise, dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed))
    written = failed = 0
    bar = progress_bar(total=num, unit="sim", disable=not (progress and root),
                       dynamic_ncols=True, desc="simulations")
    place = atomic_path(out) if root else contextlib.nullcontext(None)   # rank 0 writes
    try:
        with place as tmp, failures.counted():     # counted, reported once below
            writer = SimulationWriter(tmp, case_text=case.text, name=case.name,
                                      shape=case.lattice_shape(level),
                                      noise=noise_std.expand(case.n_obs).numpy(),
                                      seed=seed, chunk=chunk) if root else None
            try:
                while written < num:
                    size = min(chunk, num - written)
                    x = prior.sample(size, level, generator=generator)
                    e = torch.randn((size, case.n_obs), generator=generator,
                                    dtype=torch.float64)
                    mine = ens.part(size)
                    with torch.no_grad():
                        y = forward(x[mine]).to(torch.float64) + e[mine] * noise_std
                    y = ens.gather(y)
                    ok = torch.isfinite(y).all(1)
                    failed += int((~ok).sum())
                    if failed > MAX_FAILED_FRACTION * (written + failed + int(ok.sum())):
                        raise TrainingError(f"{failed} of {written + failed + int(ok.sum())} "
                                            "simulations' forward solves failed: the prior's "
                                            "fields are beyond what the solver can do")
                    if root:
                        writer.append(x[ok].numpy(), y[ok].numpy())
                    written += int(ok.sum())
                    bar.update(int(ok.sum()))
            finally:
                if writer is not None:
                    writer.close(failed)
            if comm is not None:
                comm.Barrier()
    finally:
        bar.close()
    if failed:
        logger.warning("%d simulations had a failed forward solve and were drawn again", failed)
    return written, failed
