"""Variational families in the prior's whitened coordinates: an inverse autoregressive flow
(IAF) and a mean-field Gaussian.

Both are distributions q(x) on the fields of one level, x = W(T(z)), z ~ N(0, I_d), with W the
prior's exact whitening map (:func:`~geoinvert.samplers.whitening.prior_whitening`: the
coarsest noise first, then the conditioning noises coarse to fine) and T a learnable
bijection of R^d. T = identity gives the prior itself, which is where training starts.

The IAF's T is a stack of MADE-masked affine autoregressive maps in the IAF direction
(Kingma et al. 2016): u_i = mu_i(z_<i) + exp(a_i(z_<i)) z_i, one network pass per map for a
sample and its density, d sequential passes for the density of a given field. The maps and
their masks are zuko's ``MaskedAutoregressiveTransform``, used in the direction z -> u that
zuko calls forward (it is the inverse of a MAF); orders alternate between coarse-to-fine and
fine-to-coarse. The multiscale MsIGN keeps its own Glow blocks (:mod:`geoinvert.flows.glow`):
its couplings act on lattices level by level, which zuko's vector flows do not express.

All computations are in float64, like the prior's layers.
"""

import json
from pathlib import Path

import torch
from torch import nn

from geoinvert.inference.config import made_width
from geoinvert.samplers.whitening import prior_whitening, standard_normal_log_prob

__all__ = ["WhitenedFlow", "IAF", "MeanField", "VI_FAMILIES", "made_width",
           "AutoregressiveFieldFlow"]

_F64 = torch.float64
FORMAT_VERSION = 1
"""Version of the saved files of :meth:`WhitenedFlow.save`."""


class WhitenedFlow(nn.Module):
    """q(x) with x = W(T(z)), z ~ N(0, I): the interface shared by :class:`IAF` and
    :class:`MeanField` (and that of a correction's transport and approximation).

    Subclasses define ``_forward(z) -> (u, log|det du/dz|)`` and ``_inverse(u) -> (z,
    log|det dz/du|)`` on ``(num, d)`` float64 tensors.

    Args:
        prior: A Gaussian prior (``coarsest``, ``conditioning``).
        level: Level of the fields (``2**level`` cells a side, d = 4**level).
    """

    kind = None

    def __init__(self, prior, level):
        super().__init__()
        self.prior, self.level, self.dim = prior, int(level), 4 ** int(level)
        self._whitening = prior_whitening(prior, self.level)

    @property
    def config(self):
        """Keyword arguments that rebuild the network (besides ``prior``)."""
        return {"level": self.level}

    def to_x(self, z):
        """``(x (num, n, n), log|det dx/dz| (num,))`` of noises ``z (num, d)``, differentiable."""
        u, logdet = self._forward(z.to(_F64))
        return self._whitening.to_x(u), logdet + self._whitening.logdet

    def to_z(self, x):
        """Noises ``z (num, d)`` of fields ``x (num, n, n)`` (the inverse of :meth:`to_x`)."""
        return self._inverse(self._whitening.to_z(x))[0]

    def rsample(self, num, generator=None):
        """``(x, log q(x))``, reparameterised: differentiable in the parameters."""
        z = torch.randn((num, self.dim), generator=generator, dtype=_F64)
        x, logdet = self.to_x(z)
        return x, standard_normal_log_prob(z) - logdet

    def sample(self, num, generator=None):
        """``(x (num, n, n), log q(x) (num,))`` without gradients."""
        with torch.no_grad():
            return self.rsample(num, generator)

    def log_prob(self, x):
        """log q(x) ``(num,)`` of given fields (an IAF needs d sequential passes)."""
        z, logdet = self._inverse(self._whitening.to_z(x))
        return standard_normal_log_prob(z) + logdet - self._whitening.logdet

    def save(self, path, *, metadata=None):
        """Weights to ``path`` (.pt), the kind, config and ``metadata`` to ``path`` .json."""
        path = Path(path)
        torch.save(self.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "kind": self.kind, "config": self.config,
             "metadata": metadata or {}}, indent=1))

    @staticmethod
    def load(path, prior):
        """The network saved at ``path`` on ``prior``.

        Raises:
            ValueError: the file is of another format version or kind of network.
        """
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: saved with format version {meta.get('format_version')}, "
                             f"this geoinvert reads {FORMAT_VERSION}")
        if meta.get("kind") not in VI_FAMILIES:
            raise ValueError(f"{path}: not a variational flow (kind {meta.get('kind')!r})")
        model = VI_FAMILIES[meta["kind"]](prior, **meta["config"])
        model.load_state_dict(torch.load(path, weights_only=True))
        return model


class MeanField(WhitenedFlow):
    """The mean-field Gaussian u = m + exp(s) * z in whitened coordinates (2d parameters): a
    Gaussian in x whose covariance is the prior's, rescaled along the whitened coordinates."""

    kind = "meanfield"

    def __init__(self, prior, level):
        super().__init__(prior, level)
        self.loc = nn.Parameter(torch.zeros(self.dim, dtype=_F64))
        self.log_scale = nn.Parameter(torch.zeros(self.dim, dtype=_F64))

    def _forward(self, z):
        u = self.loc + torch.exp(self.log_scale) * z
        return u, self.log_scale.sum().expand(z.shape[0])

    def _inverse(self, u):
        z = (u - self.loc) * torch.exp(-self.log_scale)
        return z, -self.log_scale.sum().expand(u.shape[0])


class IAF(WhitenedFlow):
    """Inverse autoregressive flow in whitened coordinates (see the module text).

    Args:
        prior, level: as in :class:`WhitenedFlow`.
        transforms: Autoregressive maps stacked (orders alternating).
        hidden: Lower bound of the MADE width (:func:`made_width`).
    """

    kind = "iaf"

    def __init__(self, prior, level, *, transforms=4, hidden=32):
        super().__init__(prior, level)
        self.transforms_, self.hidden = int(transforms), int(hidden)
        self.maps = _identity_mades(self.dim, self.transforms_, hidden, _F64)

    @property
    def config(self):
        return {"level": self.level, "transforms": self.transforms_, "hidden": self.hidden}

    def _forward(self, z):
        logdet = z.new_zeros(z.shape[0])
        for made in self.maps:
            z, ladj = made().call_and_ladj(z)
            logdet = logdet + ladj
        return z, logdet

    def _inverse(self, u):
        logdet = u.new_zeros(u.shape[0])
        for made in reversed(self.maps):
            u, ladj = made().inv.call_and_ladj(u)
            logdet = logdet + ladj
        return u, logdet


VI_FAMILIES = {"iaf": IAF, "meanfield": MeanField}
"""The variational families by ``sampler.kind``."""


def _identity_mades(dim, transforms, hidden, dtype=None):
    """``transforms`` zuko MADE maps on R^dim, orders alternating, each the identity (zero
    last layer)."""
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    width = made_width(dim, hidden)
    ascending = torch.arange(dim)
    maps = nn.ModuleList([
        MaskedAutoregressiveTransform(dim, order=ascending if i % 2 == 0 else ascending.flip(0),
                                      hidden_features=(width, width))
        for i in range(transforms)])
    for made in maps:
        nn.init.zeros_(made.hyper[-1].weight)
        nn.init.zeros_(made.hyper[-1].bias)
    return maps if dtype is None else maps.to(dtype)


class AutoregressiveFieldFlow(nn.Module):
    """A flow F_l of the MsIGN made of MADE maps in the IAF direction on the flattened field
    (row-major cells), in place of :class:`~geoinvert.flows.glow.FieldFlow`'s Glow blocks:
    ``forward(x) -> (y, log|det|)`` in one pass per map (the sampling direction), ``inverse``
    in n^2 sequential passes per map. The identity at initialisation; no context.

    Args:
        n: Side of the field.
        transforms: MADE maps.
        hidden: Lower bound of their width (:func:`made_width`).
    """

    def __init__(self, n, transforms=4, hidden=32):
        super().__init__()
        self.n = int(n)
        self.maps = _identity_mades(self.n ** 2, transforms, hidden)

    def forward(self, x, context=None):
        if context is not None:
            raise ValueError("the autoregressive flows take no context")
        z = x.reshape(x.shape[0], -1)
        logdet = z.new_zeros(z.shape[0])
        for made in self.maps:
            z, ladj = made().call_and_ladj(z)
            logdet = logdet + ladj
        return z.reshape(x.shape), logdet

    def inverse(self, y, context=None):
        if context is not None:
            raise ValueError("the autoregressive flows take no context")
        u = y.reshape(y.shape[0], -1)
        logdet = u.new_zeros(u.shape[0])
        for made in reversed(self.maps):
            u, ladj = made().inv.call_and_ladj(u)
            logdet = logdet + ladj
        return u.reshape(y.shape), logdet
