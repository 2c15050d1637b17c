"""A prior learned from an ensemble of fields: an MsIGN trained by maximum likelihood.

Two steps (the MsIGN paper's image-synthesis setting, with the prior conditioning layers taken
from a Gaussian fitted to the data):

1. :func:`fit_gaussian`: the Matern prior (alpha = 2, Neumann boundary, constant mean) of
   largest likelihood for the ensemble, over its mean, std and correlation length (L-BFGS on
   the exact log density, a sparse precision at the finest level). Its conditioning layers
   PC_l become the MsIGN's, so the untrained network *is* this Gaussian.
2. :func:`fit_prior`: the MsIGN's flows F_l trained by maximum likelihood on the fields,
   every level at once, with a held-out split; the non-Gaussian structure (channels, facies)
   is what they learn.

Reported: the negative log likelihood per dimension of the held-out fields, in nats and in
bits (``nll / ln 2``, the continuous analogue of bits per dimension; the fields are real
numbers, so no dequantisation is needed), for the fitted Gaussian and for the learned prior.
"""

import logging
import math
import time

import numpy as np
import torch

from geoinvert.flows.msign import MsIGN
from geoinvert.inference.trainer import likelihood_step, lr_factor
from geoinvert.priors.gaussian import MaternPrior

__all__ = ["fit_gaussian", "fit_prior", "LearnedPrior", "LatentForward", "FORMAT_VERSION",
           "fit_figure"]

FORMAT_VERSION = 1
"""Version of the files written by :meth:`LearnedPrior.save`."""

logger = logging.getLogger(__name__)


def fit_gaussian(fields, bounds=(0.0, 1.0, 0.0, 1.0)):
    """The maximum-likelihood Matern prior of ``fields (num, n, n)`` (see the module text).

    Returns:
        :class:`~geoinvert.priors.gaussian.MaternPrior`.
    """
    from scipy.optimize import minimize
    fields = np.asarray(fields, float)
    level = int(round(math.log2(fields.shape[1])))
    x = torch.from_numpy(fields)
    mean0, std0 = float(fields.mean()), float(fields.std())

    def prior(theta):
        return MaternPrior(level, bounds, alpha=2, boundary="neumann", mean=theta[0],
                           std=math.exp(theta[1]), correlation_length=math.exp(theta[2]))

    def nll(theta):
        with torch.no_grad():
            return -float(prior(theta).log_prob(x, level).mean())

    start = np.array([mean0, math.log(std0), math.log(0.2)])
    best = minimize(nll, start, method="Nelder-Mead",
                    options={"xatol": 1e-3, "fatol": 1e-4, "maxiter": 400})
    logger.info("Gaussian fit: mean %.3f, std %.3f, correlation length %.3f", best.x[0],
                math.exp(best.x[1]), math.exp(best.x[2]))
    return prior(best.x)


class LearnedPrior:
    """A trained MsIGN G: z -> x over the fields of one lattice, with the Gaussian it started
    from, and the held-out numbers of its fit (``report``).

    It has the :class:`~geoinvert.problem.posterior.Prior` interface on its lattice
    (``sample(num, level)``, ``log_prob(x, level)``), so a posterior in the fields can be
    formed with it; inference runs in its latent space instead (:class:`LatentForward`).
    """

    def __init__(self, model, gaussian, report=None):
        self.model, self.gaussian, self.report = model, gaussian, report or {}

    @property
    def level(self):
        return self.gaussian.levels

    def _check_level(self, level):
        if level is not None and level != self.level:
            raise ValueError(f"a learned prior holds fields of level {self.level} only, "
                             f"not {level}")

    def draw(self, num, generator=None):
        """``(x (num, n, n), log p (num,))`` of ``num`` draws, float64."""
        with torch.no_grad():
            x, log_p = self.model.sample(num, generator=generator)
        return x.to(torch.float64), log_p.to(torch.float64)

    def sample(self, num, level=None, *, generator=None, dtype=torch.float64):
        """``num`` fields ``(num, n, n)`` (the prior interface)."""
        self._check_level(level)
        return self.draw(num, generator)[0].to(dtype)

    def log_prob(self, x, level=None):
        """Log density ``(num,)`` of fields ``x``, differentiable (the prior interface)."""
        self._check_level(level)
        return self.model.log_prob(torch.as_tensor(x).to(self.model.dtype)).to(torch.float64)

    def save(self, path):
        """The network to ``path`` (.pt, .json) with the Gaussian's parameters and the report."""
        g = self.gaussian
        self.model.save(path, metadata={
            "learned_prior": FORMAT_VERSION, "report": self.report,
            "gaussian": {"level": g.levels, "bounds": list(g.bounds),
                         "mean": float(np.mean(g.mean(g.levels))), "std": float(g.std),
                         "correlation_length": float(g.correlation_length)}})

    @classmethod
    def load(cls, path):
        """A learned prior written by :meth:`save`.

        Raises:
            ValueError: not a learned prior, or of another format version.
        """
        import json
        from pathlib import Path
        meta = json.loads(Path(path).with_suffix(".json").read_text()).get("metadata", {})
        if meta.get("learned_prior") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a learned prior of format version {FORMAT_VERSION}")
        g = meta["gaussian"]
        gaussian = MaternPrior(g["level"], tuple(g["bounds"]), alpha=2, boundary="neumann",
                               mean=g["mean"], std=g["std"],
                               correlation_length=g["correlation_length"])
        return cls(MsIGN.load(path, gaussian).eval(), gaussian, meta.get("report"))


def _nll_per_dim(log_prob, fields, batch=256):
    values = []
    with torch.no_grad():
        for block in torch.from_numpy(fields).split(batch):
            values.append(-log_prob(block).double().numpy())
    return float(np.mean(np.concatenate(values))) / fields[0].size


def fit_prior(fields, *, epochs=30, batch=64, lr=2e-3, blocks=4, hidden=32, held_out=0.1,
              seed=0, bounds=(0.0, 1.0, 0.0, 1.0), callback=None):
    """Fit the Gaussian, then train an MsIGN on ``fields`` by maximum likelihood.

    Returns:
        :class:`LearnedPrior` whose ``report`` holds ``gaussian_nll``, ``learned_nll`` (held
        out, nats per dimension), their values in bits, the fitted Gaussian's parameters and
        the per-epoch ``history`` (training and held-out NLL per dimension).
    """
    fields = np.asarray(fields, float)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(fields))
    split = int(round(len(fields) * (1 - held_out)))
    train, test = fields[order[:split]], fields[order[split:]]
    if len(train) < batch or len(test) < 1:
        raise ValueError(f"{len(fields)} fields are too few: need more than a batch of {batch} "
                         "to train on and some to hold out")
    gaussian = fit_gaussian(train, bounds)
    level = gaussian.levels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MsIGN(gaussian, blocks_per_level=blocks, hidden=hidden, stage=level)
    model = model.to(torch.float32)
    gaussian_nll = _nll_per_dim(lambda b: gaussian.log_prob(b, level), test)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(train).to(torch.float32)
    history, start = [], time.perf_counter()
    steps = max(1, len(train) // batch) * epochs
    step = 0
    for epoch in range(epochs):
        losses = []
        for rows in torch.randperm(len(train), generator=generator).split(batch):
            if len(rows) < 2:
                continue
            loss = -model.log_prob(data[rows]).mean() / train[0].size
            losses.append(likelihood_step(optimizer, loss,
                                          lr=lr * lr_factor(step, steps, "cosine", 0.05)))
            step += 1
        record = {"epoch": epoch, "loss": float(np.mean(losses)),
                  "held_out": _nll_per_dim(model.log_prob, test),
                  "time": time.perf_counter() - start}
        history.append(record)
        if callback is not None:
            callback(record)
    learned_nll = history[-1]["held_out"]
    report = {"gaussian_nll": gaussian_nll, "learned_nll": learned_nll,
              "gaussian_bits": gaussian_nll / math.log(2),
              "learned_bits": learned_nll / math.log(2),
              "gaussian": {"mean": float(np.mean(gaussian.mean(level))),
                           "std": float(gaussian.std), "correlation_length":
                           float(gaussian.correlation_length)},
              "train": int(len(train)), "held_out": int(len(test)), "history": history}
    return LearnedPrior(model.eval(), gaussian, report)


class LatentForward:
    """F(G(z)): a forward model of the fields composed with the learned prior's map, on its
    latent fields ``z (num, n, n)`` (the concatenated level noises in row-major order, which
    are N(0, I) under the prior), differentiable in ``z``.

    A posterior with an iid N(0, 1) prior and this forward model is the posterior pulled back
    to the latent space, where samplers see a Gaussian prior (Whang et al.'s composed flows).

    Args:
        forward: forward model of the fields, ``(num, n, n) -> (num, n_obs)``.
        transport: :class:`~geoinvert.inference.correction.FlowTransport` of the prior's MsIGN.
    """

    def __init__(self, forward, transport):
        self.inner, self.transport = forward, transport
        self.shape, self.n_obs = forward.shape, forward.n_obs

    n_solves = property(lambda self: self.inner.n_solves)
    last_failures = property(lambda self: self.inner.last_failures)
    # the prior's map is a torch flow: second derivatives are the inner model's
    twice_differentiable = property(
        lambda self: getattr(self.inner, "twice_differentiable", False))

    def fields(self, z):
        """``(x, log|det dG/dz|)`` of latent fields ``z (num, n, n)``, float64."""
        return self.transport.to_x(torch.as_tensor(z).reshape(z.shape[0], -1))

    def __call__(self, z):
        return self.inner(self.fields(z)[0])


def fit_figure(learned, fields, path, count=4):
    """A figure of a learned prior's fit to ``path`` (PNG): the training and held-out negative
    log likelihood per dimension by epoch against the fitted Gaussian's, and ``count``
    training fields beside as many draws of the learned prior and of the fitted Gaussian
    (same colour scale), so that a user sees whether the draws look like the ensemble."""
    from matplotlib.figure import Figure
    r = learned.report
    history = r.get("history", [])
    fig = Figure(figsize=(2.2 * count + 4.2, 6.6))
    grid = fig.add_gridspec(3, count + 2)
    ax = fig.add_subplot(grid[:, :2])
    epochs = [h["epoch"] + 1 for h in history]
    ax.plot(epochs, [h["loss"] for h in history], "o-", ms=3, label="learned, training")
    ax.plot(epochs, [h["held_out"] for h in history], "s-", ms=3, label="learned, held out")
    ax.axhline(r["gaussian_nll"], color="k", ls="--", lw=0.8, label="fitted Gaussian, held out")
    ax.set(xlabel="epoch", ylabel="negative log likelihood per dimension (nats)",
           title="maximum-likelihood training")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    gen = torch.Generator().manual_seed(0)
    rows = [("training field", np.asarray(fields[:count])),
            ("learned prior", learned.draw(count, gen)[0].numpy()),
            ("fitted Gaussian", learned.gaussian.sample(count, learned.level,
                                                        generator=gen).numpy())]
    lo, hi = np.percentile(np.asarray(fields[:64]), [1, 99])
    for i, (name, xs) in enumerate(rows):
        for j, x in enumerate(xs):
            a = fig.add_subplot(grid[i, 2 + j])
            a.imshow(x, origin="lower", cmap="viridis", vmin=lo, vmax=hi)
            a.set_xticks([]), a.set_yticks([])
            if j == 0:
                a.set_ylabel(name, fontsize=8)
    fig.suptitle(f"held-out NLL per dimension: learned {r['learned_nll']:.3f}, fitted "
                 f"Gaussian {r['gaussian_nll']:.3f} nats ({r['held_out']} fields)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
