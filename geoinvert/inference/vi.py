"""Reverse-KL variational inference with a single-level flow (:mod:`geoinvert.flows.autoregressive`).

The loss of a step is the reparameterised estimate of D_KL(q || p) - log Z over a batch,

    L = 1/n sum_i log q(x_i) - log p~(x_i),    x_i = T(z_i), z_i ~ N(0, I),

so -L is the evidence lower bound (ELBO) against the unnormalised posterior p~. The target is
evaluated outside the network's graph and its gradient g = d log p~ / dx pulled back through
x (d/dtheta log p~(x) = d/dtheta g . x), as in the MsIGN's reverse KL. Samples whose target or
gradient is not finite are left out; a step whose loss or gradient is not finite is skipped.
"""

import logging
import math
import time

import torch

from geoinvert.errors import TrainingError
from geoinvert.inference.objectives import pulled_back_terms
from geoinvert.inference.trainer import lr_factor
from geoinvert.parallel import Ensemble
from geoinvert.samplers.whitening import standard_normal_log_prob

__all__ = ["train_vi", "elbo_step"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


def elbo_step(model, posterior, batch, generator, ensemble=None):
    """``(loss, stats)`` of one batch: this rank's differentiable part of L (the sum over the
    ranks is L) and ``{"loss", "nfs", "failed"}`` (global). Every rank draws the whole batch's
    noise from ``generator`` and keeps its block, so a seed trains alike on any number of
    ranks."""
    ens = ensemble or Ensemble()
    z = torch.randn((batch, model.dim), generator=generator, dtype=_F64)[ens.part(batch)]
    x, logdet = model.to_x(z)
    term, value, ok = pulled_back_terms(x, standard_normal_log_prob(z) - logdet, posterior)
    n_ok, total = ens.sum(float(ok.sum()), float(value[ok].sum()))
    loss = term[ok].sum() / n_ok if n_ok else term.sum() * math.nan
    return loss, {"loss": total / n_ok if n_ok else math.nan, "nfs": batch,
                  "failed": int(batch - n_ok)}


def train_vi(model, posterior, *, steps, batch, lr=1e-3, generator=None, comm=None,
             budget=None, callback=None, grad_clip=10.0, lr_min=0.05, max_failures=20):
    """Train ``model`` by the reverse KL for ``steps`` steps of ``batch`` samples (Adam, cosine
    learning rate from ``lr`` to ``lr_min * lr``, gradient norm clipped to ``grad_clip``).

    Args:
        model: A :class:`~geoinvert.flows.autoregressive.WhitenedFlow`.
        posterior: Target with ``grad_log_prob(x)`` on the model's level.
        budget: Most forward solves (one per sample per step); training stops before a step
            would exceed it.
        comm: Ensemble communicator (or None): the batch is shared out over its ranks and
            the gradients summed (:class:`~geoinvert.parallel.Ensemble`).
        callback: ``callback(record)`` after every step.

    Returns:
        History: a list of ``{"stage", "step", "nfs", "loss", "ess", "failed", "skipped",
        "lr", "time"}`` (``stage`` is the model's level, ``ess`` NaN).

    Raises:
        TrainingError: ``max_failures`` consecutive steps were not finite.
    """
    ens = Ensemble(comm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    history, nfs, consecutive, skipped, start = [], 0, 0, 0, time.perf_counter()
    for step in range(steps):
        if budget and nfs + batch > budget:
            break
        factor = lr_factor(step, steps, "cosine", lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        optimizer.zero_grad(set_to_none=False)
        loss, stats = elbo_step(model, posterior, batch, generator, ens)
        if torch.isfinite(loss):
            loss.backward()
        ens.allreduce_grads(params)
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        bad = not (math.isfinite(stats["loss"]) and math.isfinite(norm))
        if bad:
            optimizer.zero_grad(set_to_none=False)
            consecutive, skipped = consecutive + 1, skipped + 1
            if consecutive >= max_failures:
                raise TrainingError(f"{consecutive} consecutive variational steps had a "
                                    f"non-finite loss or gradient ({stats['failed']} failed "
                                    "target evaluations in the last)")
        else:
            optimizer.step()
            consecutive = 0
        nfs += stats["nfs"]
        record = {"stage": model.level, "step": step, "nfs": nfs, "loss": stats["loss"],
                  "ess": math.nan, "failed": stats["failed"], "skipped": skipped,
                  "lr": lr * factor, "time": time.perf_counter() - start}
        history.append(record)
        if callback is not None:
            callback(record)
    if history:
        logger.info("variational training: %d steps, nFS %d, -ELBO %.4g, %d skipped",
                    len(history), nfs, history[-1]["loss"], skipped)
    return history
