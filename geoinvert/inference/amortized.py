"""Amortized inversion: a conditional flow q(x | y) trained once on simulations (x from the
prior, y = F(x) + e) by maximum likelihood, then sampled for any new data in a fraction of a
second. Two networks (``method``): the conditional MsIGN below (default), or the single-loss
joint flow of Xiao, Yan and Amit (:class:`~geoinvert.inference.joint.JointFlow`: one bijection
of the field onto [data, latent], no context network).

The conditional MsIGN keeps the coarse-to-fine structure and the exact prior conditioning
layers; every coupling of F_l also sees maps of the lattice of level l computed from the
standardised data by a :class:`~geoinvert.flows.msign.ContextEmbedding` (cINN-style). Training
maximises E log q(x | y) over the simulations, streamed from their file chunk by chunk
(:func:`~geoinvert.io.read_simulations`), with Adam and a cosine learning rate; the densities
of given fields cost one pass through the Glow blocks, so no solve is needed.
"""

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from geoinvert.flows.msign import MsIGN
from geoinvert.inference.objectives import pulled_back_terms
from geoinvert.inference.trainer import likelihood_step, lr_factor

__all__ = ["AmortizedPosterior", "AtData", "train_amortized", "fine_tune", "FORMAT_VERSION",
           "AMORTIZED_METHODS"]

AMORTIZED_METHODS = ("msign", "joint")
"""Networks of an amortized posterior: the conditional MsIGN, or the single-loss joint flow."""

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the files written by :meth:`AmortizedPosterior.save`."""


class AmortizedPosterior:
    """q(x | y): a conditional :class:`~geoinvert.flows.msign.MsIGN` with the standardisation of
    its data (``(y - data_mean) / data_std``, from the simulations).

    Args:
        model: The conditional MsIGN (``context_features`` = number of observations).
        data_mean, data_std: ``(n_obs,)`` arrays.
        data_range: ``(2, n_obs)`` smallest and largest simulated value of each observation.
    """

    def __init__(self, model, data_mean, data_std, data_range=None):
        self.model = model
        self.method = getattr(model, "kind", None) or "msign"
        self.data_mean = np.asarray(data_mean, float)
        self.data_std = np.asarray(data_std, float)
        self.data_range = None if data_range is None else np.asarray(data_range, float)

    def outside(self, y):
        """Indices of the observations of ``y`` outside the range of the simulated data (the
        network extrapolates there: misspecified model or too few simulations)."""
        if self.data_range is None:
            return np.zeros(0, int)
        y = np.asarray(y, float)
        return np.flatnonzero((y < self.data_range[0]) | (y > self.data_range[1]))

    def context(self, y):
        """Standardised data ``(num, n_obs)`` or ``(n_obs,)`` as a tensor of the model's dtype."""
        y = np.asarray(y, float)
        if y.shape[-1] != self.data_mean.size:
            raise ValueError(f"data must have {self.data_mean.size} observations, got "
                             f"{y.shape[-1]}")
        return torch.as_tensor((y - self.data_mean) / self.data_std, dtype=self.model.dtype)

    def sample(self, num, y, *, generator=None):
        """``(x (num, n, n), log q(x | y) (num,))`` for one data set ``y (n_obs,)``, float64."""
        with torch.no_grad():
            x, log_q = self.model.sample(num, generator=generator, context=self.context(y))
        return x.to(torch.float64), log_q.to(torch.float64)

    def rsample(self, num, y, *, generator=None):
        """:meth:`sample`, differentiable in the network's parameters (reparameterised)."""
        x, log_q = self.model.sample(num, generator=generator, context=self.context(y))
        return x.to(torch.float64), log_q.to(torch.float64)

    def log_prob(self, x, y):
        """log q(x | y) ``(num,)`` of fields ``x (num, n, n)`` given ``y`` (one row for all, or
        one per field)."""
        dtype = self.model.dtype
        return self.model.log_prob(torch.as_tensor(x, dtype=dtype),
                                   context=self.context(y)).to(torch.float64)

    def save(self, path, *, metadata=None):
        """The network to ``path`` (.pt, .json) and the standardisation beside it."""
        path = Path(path)
        self.model.save(path, metadata={"format_version": FORMAT_VERSION, "amortized": True,
                                        "method": self.method,
                                        "data_mean": self.data_mean.tolist(),
                                        "data_std": self.data_std.tolist(),
                                        "data_range": None if self.data_range is None
                                        else self.data_range.tolist(),
                                        **(metadata or {})})

    @classmethod
    def load(cls, path, prior):
        """An amortized posterior written by :meth:`save`, on ``prior``.

        Raises:
            ValueError: not an amortized model, or of another format version.
        """
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text()).get("metadata", {})
        if not meta.get("amortized"):
            raise ValueError(f"{path}: not an amortized posterior")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: saved with format version {meta.get('format_version')}, "
                             f"this geoinvert reads {FORMAT_VERSION}")
        method = meta.get("method", "msign")
        if method not in AMORTIZED_METHODS:
            raise ValueError(f"{path}: an amortized posterior of unknown method {method!r}")
        if method == "joint":
            from geoinvert.inference.joint import JointFlow
            model = JointFlow.load(path, prior)
        else:
            model = MsIGN.load(path, prior)
        return cls(model, meta["data_mean"], meta["data_std"], meta.get("data_range"))

    def surrogate(self, x):
        """The joint flow's learned forward model: predicted data ``(num, n_obs)`` of fields
        ``x`` (only ``method`` joint has one)."""
        if self.method != "joint":
            raise ValueError("only the joint flow has a surrogate of the forward model")
        with torch.no_grad():
            y = self.model.surrogate(torch.as_tensor(x)).numpy()
        return y * self.data_std + self.data_mean


def _moments(path):
    """Mean, std and range ``(2, n_obs)`` of the data of a simulations file, in one pass."""
    from geoinvert.io import read_simulations
    total, square, count, low, high = 0.0, 0.0, 0, np.inf, -np.inf
    for _, data in read_simulations(path):
        total = total + data.sum(0)
        square = square + (data ** 2).sum(0)
        low, high = np.minimum(low, data.min(0)), np.maximum(high, data.max(0))
        count += len(data)
    mean = total / count
    return mean, np.sqrt(np.maximum(square / count - mean ** 2, 1e-300)), np.stack([low, high])


def train_amortized(prior, simulations, *, epochs=20, batch=128, lr=2e-3, blocks=4,
                    hidden=32, context_channels=4, generator=None, callback=None,
                    held_out=0.1, grad_clip=10.0, method="msign"):
    """Train a conditional MsIGN (or the joint flow) on a simulations file by maximum
    likelihood.

    The last ``held_out`` fraction of the simulations is kept apart: its mean negative log
    likelihood per dimension is recorded after every epoch (it must fall as the fit improves,
    and is what :attr:`history` reports as ``held_out``). Batches are drawn chunk by chunk
    from the file, shuffled within a chunk of 1024 simulations.

    Args:
        prior: The case's prior (its finest level is the simulations' lattice).
        simulations: Path of a ``geoinvert simulate`` file.
        epochs, batch, lr: Passes over the training simulations, batch size, Adam's rate
            (cosine schedule to 5 % of it).
        blocks, hidden, context_channels: The network (see :class:`MsIGN`; for the joint
            flow ``blocks`` RealNVP couplings with MLPs of width ``4 * hidden``).
        method: ``msign`` or ``joint`` (:data:`AMORTIZED_METHODS`).
        generator: For the initial weights' draw order and the shuffles.
        callback: ``callback(record)`` after every epoch.

    Returns:
        ``(AmortizedPosterior, history)``, history a list of per-epoch records
        ``{"epoch", "loss", "held_out", "time"}`` (negative log likelihoods per dimension).
    """
    from geoinvert.io import read_simulations, simulation_count
    generator = generator or torch.Generator().manual_seed(0)
    total = simulation_count(simulations)
    split = int(round(total * (1 - held_out)))
    if split < batch:
        raise ValueError(f"{simulations}: {total} simulations, fewer than a batch of {batch} "
                         "to train on")
    mean, std, data_range = _moments(simulations)
    if method not in AMORTIZED_METHODS + ("inn",):
        raise ValueError(f"method must be one of {AMORTIZED_METHODS}, got {method!r}")
    first = next(read_simulations(simulations, stop=1))[1]
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        if method in ("joint", "inn"):
            from geoinvert.inference.joint import INN, JointFlow
            from geoinvert.io import simulation_noise
            shape = {"transforms": max(2 * blocks, 2), "hidden": 4 * hidden}
            model = JointFlow(prior, prior.levels, first.shape[1],
                              eps=simulation_noise(simulations) / std, **shape) \
                if method == "joint" else INN(prior, prior.levels, first.shape[1], **shape)
        else:
            model = MsIGN(prior, blocks_per_level=blocks, hidden=hidden, stage=prior.levels,
                          context_features=first.shape[1], context_channels=context_channels)
            model = model.to(torch.float32)
    posterior = AmortizedPosterior(model, mean, std, data_range)
    dim = 4 ** prior.levels
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, split // batch)
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for field, data in read_simulations(simulations, chunk=1024, stop=split):
            order = torch.randperm(len(field), generator=generator)
            for rows in order.split(batch):
                if len(rows) < 2:
                    continue
                loss = _loss(posterior, field[rows.numpy()], data[rows.numpy()], dim,
                             generator)
                rate = lr * lr_factor(step, epochs * steps_per_epoch, "cosine", 0.05)
                losses.append(likelihood_step(optimizer, loss, lr=rate, grad_clip=grad_clip))
                step += 1
        record = {"epoch": epoch, "loss": float(np.mean(losses)),
                  "held_out": _held_out_nll(posterior, simulations, split, dim),
                  "time": time.perf_counter() - start}
        history.append(record)
        logger.info("amortized training: epoch %d, NLL/dim %.4f (held out %.4f)", epoch,
                    record["loss"], record["held_out"])
        if callback is not None:
            callback(record)
    model.eval()
    return posterior, history


def _loss(posterior, field, data, dim, generator=None):
    """The training loss of a batch: the negative log likelihood per dimension, or the INN's
    weighted losses (:class:`~geoinvert.inference.joint.INN`, which has no likelihood)."""
    if posterior.method == "inn":
        return posterior.model.loss(torch.as_tensor(field), posterior.context(data), generator)
    return -posterior.log_prob(field, data).mean() / dim


def _held_out_nll(posterior, simulations, start, dim):
    """The held-out loss (:func:`_loss`): its mean over the simulations from ``start``."""
    from geoinvert.io import read_simulations
    total, count = 0.0, 0
    with torch.no_grad():
        for field, data in read_simulations(simulations, chunk=1024, start=start):
            loss = _loss(posterior, field, data, dim, torch.Generator().manual_seed(0))
            total, count = total + float(loss) * len(field), count + len(field)
    return total / count if count else math.nan


def fine_tune(post, posterior, y, *, steps, batch=32, lr=2e-4, generator=None, callback=None):
    """A copy of ``post`` trained further on one data set ``y`` by the reverse KL against its
    posterior (the data shift: simulations cover the prior, one y needs one region).

    Each step draws ``batch`` reparameterised fields of q(x | y), evaluates the posterior and
    its adjoint gradient (``batch`` solves) and takes an Adam step on E[log q - log pi]; the
    target's gradient is pulled back through the draws, as in flow training.

    Args:
        post: :class:`AmortizedPosterior` (not changed).
        posterior: the posterior of ``y`` (``grad_log_prob``).
        y: the data set ``(n_obs,)``.
        steps, batch, lr: Adam steps, draws per step and rate (constant; small, to refine).
        generator: of the draws.
        callback: ``callback(record)`` after every step.

    Returns:
        ``(AmortizedPosterior, history)``: the fine-tuned copy and per-step records
        ``{"step", "elbo", "nfs", "failed"}`` (ELBO of the step's draws).
    """
    tuned = AmortizedPosterior(_clone(post.model), post.data_mean, post.data_std,
                               post.data_range)
    model = tuned.model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = generator or torch.Generator().manual_seed(0)
    history, nfs = [], 0
    for step in range(int(steps)):
        x, log_q = tuned.rsample(batch, y, generator=generator)
        term, value, ok = pulled_back_terms(x, log_q, posterior)
        nfs += batch
        if not ok.any():
            history.append({"step": step, "elbo": math.nan, "nfs": nfs, "failed": batch})
            continue
        optimizer.zero_grad()
        term[ok].mean().backward()
        optimizer.step()
        record = {"step": step, "elbo": float(-value[ok].mean()), "nfs": nfs,
                  "failed": int((~ok).sum())}
        history.append(record)
        if callback is not None:
            callback(record)
    model.eval()
    return tuned, history


def _clone(model):
    """A copy of an amortized network with its own weights on the same prior (the prior's
    factorisations are shared, not copied)."""
    from geoinvert.inference.joint import JOINT_KINDS
    state = model.state_dict()
    kind = getattr(model, "kind", None)
    if kind in JOINT_KINDS:
        new = JOINT_KINDS[kind](model.prior, **model.config, **JOINT_KINDS[kind].extra(state))
    else:
        new = MsIGN(model.prior, **model.config, stage=model.stage).to(model.dtype)
    new.load_state_dict({k: v.clone() for k, v in state.items()})
    return new


class AtData:
    """The amortized posterior at one data set: ``sample(num, generator) -> (x, log q)`` and
    ``log_prob(x)``, the interface of a correction's independence proposal."""

    def __init__(self, post, y):
        self.post, self.y = post, np.asarray(y, float)

    def sample(self, num, generator=None):
        return self.post.sample(num, self.y, generator=generator)

    def log_prob(self, x):
        with torch.no_grad():
            return self.post.log_prob(x, self.y)
