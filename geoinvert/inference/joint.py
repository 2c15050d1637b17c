r"""Conditional flows by one invertible map of the parameters onto [data, latent]: the
single-loss joint flow of Xiao, Yan and Amit, and the multi-loss INN of Ardizzone et al.
that it is compared with.

Both use one bijection T of R^d (zuko's RealNVP: affine couplings, cheap in both directions)
acting on the prior-whitened field w (x = W(w), the prior's exact whitening), whose output is
split into d_y = n_obs "data" coordinates and d - n_obs latent ones:

.. math:: T(w) = [\hat y, z].

**Single loss (Xiao, Yan, Amit).** The data coordinates are the standardised data plus a
Gaussian error of width eps (here the noise in standardised units), the latent ones N(0, I):

.. math:: \log q(x \mid y) = \log N(\hat y - y; 0, \varepsilon^2) + \log N(z; 0, I)
          + \log |\det \partial T / \partial w| - \log |\det W|,

an exact density, trained by maximum likelihood over simulated pairs (one loss, no weights);
a draw for a new y is T^-1([y + eps v, z]), and T's data coordinates are a learned surrogate
of the forward model. The map needs d > n_obs (the method pads x with noise when it has
fewer parameters than data; a padded density is no longer exact, so that case is refused).

**Multi-loss INN (Ardizzone et al.).** The same map trained by a weighted sum of a
supervised data loss ``|y_hat - y|^2``, a maximum mean discrepancy between the outputs
[y_hat, z] and [y, N(0, I)], and one between T^-1([y, z]) and the simulated fields, with the
weights set by hand (all 1 here, as a default a user would start from). Draws are
T^-1([y, z]); the INN has no density of x given y (its draws lie on the set T_y(w) = y), so it
cannot propose the independence moves of a correction.

References:
    Xiao, Yan, Amit. A method to model conditional distributions with normalizing flows.
    arXiv:1911.02052 (2019).
    Ardizzone, Kruse, Wirkert, Rahner, Pellegrini, Klessen, Maier-Hein, Rother, Koethe.
    Analyzing inverse problems with invertible neural networks. ICLR 2019.
"""

import json
import math
from pathlib import Path

import torch
from torch import nn

from geoinvert.samplers.whitening import prior_whitening, standard_normal_log_prob

__all__ = ["JointFlow", "INN", "mmd", "JOINT_KINDS"]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


class _SplitFlow(nn.Module):
    """T: w -> [y_hat, z] on whitened fields of one level (see the module text).

    Args:
        prior: the Gaussian prior (its whitening of ``level``).
        level: level of the fields.
        n_obs: number of observations (< 4**level).
        transforms, hidden: RealNVP couplings and hidden width of their networks.
    """

    kind = None

    def __init__(self, prior, level, n_obs, *, transforms=6, hidden=128):
        super().__init__()
        import zuko
        self.prior, self.level, self.n_obs = prior, int(level), int(n_obs)
        self.dim = 4 ** self.level
        if self.n_obs >= self.dim:
            raise ValueError(f"a joint flow maps the {self.dim} parameters onto the "
                             f"{self.n_obs} data and the rest: it needs fewer observations "
                             "than parameters (use the conditional MsIGN)")
        self.transforms, self.hidden = int(transforms), int(hidden)
        self.net = zuko.flows.RealNVP(features=self.dim, transforms=self.transforms,
                                      hidden_features=[self.hidden, self.hidden]).to(_F64)
        self._whitening = prior_whitening(prior, self.level)

    @property
    def dtype(self):
        return _F64

    @property
    def config(self):
        return {"level": self.level, "n_obs": self.n_obs, "transforms": self.transforms,
                "hidden": self.hidden}

    def split(self, x):
        """``(y_hat (num, n_obs), z (num, d - n_obs), log|det dT/dw| - log|det W|)``."""
        w = self._whitening.to_z(torch.as_tensor(x).to(_F64))
        u, ladj = self.net.transform(None).call_and_ladj(w)
        return u[:, :self.n_obs], u[:, self.n_obs:], ladj - self._whitening.logdet

    def join(self, y_hat, z):
        """``(x (num, n, n), log|det dx/du|)`` of outputs ``[y_hat, z]``."""
        u = torch.cat([y_hat.to(_F64), z.to(_F64)], dim=1)
        w, ladj = self.net.transform(None).inv.call_and_ladj(u)
        return self._whitening.to_x(w), ladj + self._whitening.logdet

    def surrogate(self, x):
        """The data coordinates T_y(x) ``(num, n_obs)``: a learned surrogate of the
        standardised forward model."""
        return self.split(x)[0]

    def save(self, path, *, metadata=None):
        path = Path(path)
        torch.save(self.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(
            {"kind": self.kind, "config": self.config, "metadata": metadata or {}}, indent=1))

    @staticmethod
    def load(path, prior):
        """The joint flow or INN saved at ``path``, on ``prior``."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("kind") not in JOINT_KINDS:
            raise ValueError(f"{path}: not a joint flow (kind {meta.get('kind')!r})")
        state = torch.load(path, weights_only=True)
        model = JOINT_KINDS[meta["kind"]](prior, **meta["config"],
                                          **JOINT_KINDS[meta["kind"]].extra(state))
        model.load_state_dict(state)
        return model.eval()


class JointFlow(_SplitFlow):
    """The single-loss conditional flow (Xiao, Yan, Amit): an exact density q(x | y).

    Args:
        prior, level, n_obs, transforms, hidden: as :class:`_SplitFlow`.
        eps: ``(n_obs,)`` width of the data coordinates' error, in standardised units.
    """

    kind = "joint"

    def __init__(self, prior, level, n_obs, *, eps=0.05, transforms=6, hidden=128):
        super().__init__(prior, level, n_obs, transforms=transforms, hidden=hidden)
        eps = torch.as_tensor(eps, dtype=_F64).reshape(-1)
        self.register_buffer("eps", torch.clamp(eps.expand(self.n_obs).clone(), min=1e-3))

    @staticmethod
    def extra(state):
        return {"eps": state["eps"]}

    def _data_log_prob(self, r):
        """log N(r; 0, eps^2) of data residuals ``r (num, n_obs)``."""
        return (-0.5 * (r / self.eps).square() - torch.log(self.eps) - 0.5 * _LOG_2PI).sum(1)

    def log_prob(self, x, context):
        """log q(x | y) ``(num,)`` of fields ``x`` given standardised data ``context`` (one
        row for all or one per field), differentiable."""
        y_hat, z, logdet = self.split(x)
        y = torch.as_tensor(context, dtype=_F64).reshape(-1, self.n_obs)
        return self._data_log_prob(y_hat - y) + standard_normal_log_prob(z) + logdet

    def sample(self, num, *, generator=None, context):
        """``(x (num, n, n), log q(x | y) (num,))`` for standardised data ``context
        (n_obs,)``."""
        y = torch.as_tensor(context, dtype=_F64).reshape(1, self.n_obs)
        v = torch.randn((num, self.n_obs), generator=generator, dtype=_F64) * self.eps
        z = torch.randn((num, self.dim - self.n_obs), generator=generator, dtype=_F64)
        x, logdet = self.join(y + v, z)
        return x, self._data_log_prob(v) + standard_normal_log_prob(z) - logdet

    def loss(self, x, y):
        """The single loss: mean negative log likelihood per dimension of the pairs."""
        return -self.log_prob(x, y).mean() / self.dim


def mmd(a, b, widths=(0.2, 0.5, 0.9, 1.3)):
    """Squared maximum mean discrepancy of samples ``a (n, k)`` and ``b (m, k)`` with the
    inverse multiquadric kernels h^2 / (h^2 + |u - v|^2 / k) of Ardizzone et al. (distances
    per coordinate, so the widths hold in any dimension), summed over the widths."""
    k = a.shape[1]

    def kernel(u, v):
        d = torch.cdist(u, v).square() / k
        return sum(h * h / (h * h + d) for h in widths)

    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


class INN(_SplitFlow):
    """The multi-loss INN of Ardizzone et al.: draws T^-1([y, z]), no density.

    Args:
        prior, level, n_obs, transforms, hidden: as :class:`_SplitFlow`.
        weights: ``(data, latent, backward)`` weights of the three losses.
    """

    kind = "inn"

    def __init__(self, prior, level, n_obs, *, transforms=6, hidden=128,
                 weights=(1.0, 1.0, 1.0)):
        super().__init__(prior, level, n_obs, transforms=transforms, hidden=hidden)
        self.weights = tuple(float(w) for w in weights)

    @property
    def config(self):
        return {**super().config, "weights": list(self.weights)}

    @staticmethod
    def extra(state):
        return {}

    def sample(self, num, *, generator=None, context):
        """``(x (num, n, n), NaN (num,))``: draws for standardised data ``context``; an INN has
        no density of x given y."""
        y = torch.as_tensor(context, dtype=_F64).reshape(1, self.n_obs).expand(num, -1)
        z = torch.randn((num, self.dim - self.n_obs), generator=generator, dtype=_F64)
        x, _ = self.join(y, z)
        return x, torch.full((num,), math.nan, dtype=_F64)

    def log_prob(self, x, context):
        raise NotImplementedError("an INN has no density of the fields given the data: its "
                                  "draws lie on the set where its data coordinates equal y")

    def loss(self, x, y, generator=None):
        """The weighted sum of the supervised data loss, the latent MMD and the backward MMD
        over a batch of pairs ``(x, y)``."""
        y = torch.as_tensor(y, dtype=_F64)
        y_hat, z, _ = self.split(x)
        prior_z = torch.randn(z.shape, generator=generator, dtype=_F64)
        data = (y_hat - y).square().mean()
        latent = mmd(torch.cat([y_hat, z], 1), torch.cat([y, prior_z], 1))
        back, _ = self.join(y, prior_z)
        w = self._whitening.to_z(torch.as_tensor(x).to(_F64))
        backward = mmd(self._whitening.to_z(back), w)
        a, b, c = self.weights
        return a * data + b * latent + c * backward


JOINT_KINDS = {"joint": JointFlow, "inn": INN}
