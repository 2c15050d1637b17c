"""MsIGN: a multiscale invertible generative network from prior conditioning layers and Glow flows."""

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from geoinvert.flows.glow import FieldFlow, squeeze, unsqueeze
from geoinvert.hierarchy import haar, inverse_haar

__all__ = ["MsIGN", "ContextEmbedding", "NearestUpsampling", "SqueezeSplit", "UPSAMPLINGS",
           "standard_normal_log_prob"]

UPSAMPLINGS = ("prior", "nearest", "squeeze")
_F64 = torch.float64


def standard_normal_log_prob(zs: list[Tensor]) -> Tensor:
    """Sum over a list of noise tensors ``(num, ...)`` of the N(0, I) log density, ``(num,)``."""
    total = 0.0
    for z in zs:
        flat = z.flatten(1)
        total = total - 0.5 * flat.square().sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
    return total


def noise_shape(level: int) -> tuple[int, ...]:
    """Shape of z_l per sample: (2, 2) at level 1, (3, m, m) with m = 2**(level-1) above."""
    return (2, 2) if level == 1 else (3, 2 ** (level - 1), 2 ** (level - 1))


def level_of(x: Tensor) -> int:
    """The level l of a field batch ``(num, n, n)`` with n = 2**l."""
    level = int(x.shape[-1]).bit_length() - 1
    if x.dim() != 3 or not x.shape[-1] == x.shape[-2] == 2**level >= 2:
        raise ValueError(f"expected fields (num, 2**l, 2**l), got shape {tuple(x.shape)}")
    return level


def check_level(x: Tensor, level: int | None) -> int:
    """The level of x, checked against ``level`` when given."""
    found = level_of(x)
    if level is not None and level != found:
        raise ValueError(f"level {level} does not match fields of shape {tuple(x.shape)}")
    return found


# -- upsampling layers between levels (ablations of the prior conditioning layer) ---------------
#
# Each maps (x_{l-1} (num, m, m), z_l (num, 3, m, m)) -> x~_l (num, 2m, 2m) bijectively, with the
# interface of geoinvert.priors.PriorConditioning: forward(x_coarse, z) -> (x_fine, logdet) and
# inverse(x_fine) -> (x_coarse, z, logdet of the inverse), log-determinants constant floats.


class NearestUpsampling:
    r"""Stochastic nearest-neighbour upsampling: x~_l = upsample(x_{l-1}) + H^T [0; mu_d + sigma z].

    In the orthonormal 2x2 Haar coordinates (a, d) of level l
    (:func:`~geoinvert.hierarchy.haar`) the averages are a = 2 x_{l-1} (so pool(x~_l) = x_{l-1}
    and with d = 0 the map is nearest-neighbour upsampling) and the three details of each coarse
    cell are d = mu_d + sigma z, with mu_d the details of the prior mean of level l and sigma a
    fixed constant. Unlike the prior conditioning layer, the details do not depend on the coarse
    field and are uncorrelated: the flows F_l must learn the prior's fine-scale structure.

    .. math:: \log|\det \partial \tilde x_l / \partial (x_{l-1}, z_l)|
        = m^2 \log 2 + 3 m^2 \log\sigma .

    Args:
        level: Fine level l >= 2 (m = 2**(level-1)).
        mean: Prior mean of level l, ``(2m, 2m)`` array.
        sigma: Detail scale > 0.
    """

    def __init__(self, level: int, mean, sigma: float):
        self.level, self.m, self.sigma = level, 2 ** (level - 1), float(sigma)
        self._mean_d = haar(torch.as_tensor(mean, dtype=_F64))[1]
        self.logdet = self.m ** 2 * (math.log(2.0) + 3 * math.log(self.sigma))

    @classmethod
    def from_prior(cls, prior, level: int) -> "NearestUpsampling":
        """sigma = the geometric mean of the prior's conditional detail stds (from PC_l's log-det),
        so that the layer has the same volume change as the prior conditioning layer."""
        m = 2 ** (level - 1)
        log_sigma = (prior.conditioning(level).logdet - m ** 2 * math.log(2.0)) / (3 * m ** 2)
        return cls(level, prior.mean(level), math.exp(log_sigma))

    def forward(self, x_coarse: Tensor, z: Tensor) -> tuple[Tensor, float]:
        """``(x_{l-1} (num, m, m), z (num, 3, m, m)) -> (x~_l (num, 2m, 2m), log|det|)``."""
        return inverse_haar(2 * x_coarse, self._mean_d.to(z) + self.sigma * z), self.logdet

    def inverse(self, x_fine: Tensor) -> tuple[Tensor, Tensor, float]:
        """``x~_l -> (x_{l-1}, z, log|det|)`` of the inverse map."""
        a, d = haar(x_fine)
        return a / 2, (d - self._mean_d.to(d)) / self.sigma, -self.logdet


class SqueezeSplit:
    r"""Glow's multiscale split, run in the generative direction: x~_l = S^{-1}([x_{l-1}, z_l]).

    The coarse field and the three noise channels are stacked into 4 channels on the m x m
    lattice and unsqueezed (:func:`~geoinvert.flows.glow.unsqueeze`): x_{l-1}[i, j] goes to
    cell (2i, 2j) and z_l to the other three cells of the block. With F_l = S^{-1} g_l S this
    is x_l = S^{-1} g_l([x_{l-1}, z_l]), the latent dimensions z_l being factored out at scale l
    as in Glow; no prior information, a permutation (log|det| = 0).

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    logdet = 0.0

    def __init__(self, level: int):
        self.level, self.m = level, 2 ** (level - 1)

    def forward(self, x_coarse: Tensor, z: Tensor) -> tuple[Tensor, float]:
        """``(x_{l-1} (num, m, m), z (num, 3, m, m)) -> (x~_l (num, 2m, 2m), 0.0)``."""
        return unsqueeze(torch.cat((x_coarse[:, None], z), 1))[:, 0], 0.0

    def inverse(self, x_fine: Tensor) -> tuple[Tensor, Tensor, float]:
        """``x~_l -> (x_{l-1}, z, 0.0)``."""
        s = squeeze(x_fine[:, None])
        return s[:, 0], s[:, 1:], 0.0


def upsampling_layer(kind: str, prior, level: int):
    """The layer from level-1 to ``level`` of an upsampling kind (see :data:`UPSAMPLINGS`)."""
    if kind == "prior":
        return prior.conditioning(level)
    if kind == "nearest":
        return NearestUpsampling.from_prior(prior, level)
    return SqueezeSplit(level)


class ContextEmbedding(nn.Module):
    """Maps a condition vector c ``(num, k)`` to one context tensor per level, ``(num, C,
    m, m)`` with m = 2**(l-1) the squeezed side of level l: a shared two-layer MLP (tanh)
    then a linear read-out per level. The read-outs start at zero, so a conditional MsIGN
    starts as the unconditional one (the identity flows, i.e. the prior)."""

    def __init__(self, features: int, levels: int, channels: int, hidden: int):
        super().__init__()
        width = max(2 * hidden, 32)
        self.channels = channels
        self.trunk = nn.Sequential(nn.Linear(features, width), nn.Tanh(),
                                   nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, channels * 4 ** (level - 1))
                                   for level in range(1, levels + 1))
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, c: Tensor) -> list[Tensor]:
        h = self.trunk(c)
        return [head(h).reshape(c.shape[0], self.channels, 2 ** (level - 1), 2 ** (level - 1))
                for level, head in enumerate(self.heads, start=1)]


class MsIGN(nn.Module):
    r"""Multiscale invertible generative network (MsIGN) over the levels of a Gaussian prior.

    Generation runs coarse to fine from independent standard normal noises z_l:

    .. math::
        \tilde x_1 = \mu_1 + C_1 z_1, \quad x_1 = F_1(\tilde x_1), \qquad
        \tilde x_l = \mathrm{PC}_l(x_{l-1}, z_l), \quad x_l = F_l(\tilde x_l), \; l = 2..L,

    with PC_l the exact prior conditioning layers of ``prior`` (MsIGN Lemma 2.1) and F_l
    :class:`~geoinvert.flows.glow.FieldFlow` s, each the identity at initialisation. With every
    F_l the identity the model *is* the prior. The density of x_l is

    .. math:: \log p(x_l) = \sum_{k \le l} \log N(z_k; 0, I) - \log|\det \partial x_l / \partial z_{1:l}| .

    Training is stage by stage: only F_1..F_s, s = :attr:`stage`, are applied; levels above the
    stage are reached through PC_l with F_l = identity. :meth:`grow` activates the next level.
    The surrogate of level l is the model of stage l-1 pushed through PC_l with F_l = identity
    (:meth:`sample_surrogate`, :meth:`surrogate_log_prob`), the importance proposal of the
    forward KL term of the Jeffreys divergence.

    Parameters live in :attr:`dtype` (``model.to(torch.float32)`` for speed); the prior layers
    compute in :attr:`prior_dtype` (float64) and their outputs are cast back.

    Ablations (MsIGN Section 5) replace PC_l by another exact upsampling layer U_l with a
    constant log-determinant, x~_l = U_l(x_{l-1}, z_l), everything else unchanged (x~_1 still
    comes from the prior's coarsest level, so stage 1 is the same for every variant):
    ``"nearest"`` (:class:`NearestUpsampling`: nearest-neighbour upsampling plus independent
    Haar details of a fixed scale) and ``"squeeze"`` (:class:`SqueezeSplit`: Glow's multiscale
    split, latent dimensions factored out at each scale). With these the model with every
    F_l = identity is no longer the prior.

    Args:
        prior: A :class:`~geoinvert.priors.GaussianPrior` (``coarsest``, ``coarsest_inverse``,
            ``conditioning(level)``).
        levels: Finest level L (fields of 2**L x 2**L cells); the prior's finest by default.
        blocks_per_level: Glow blocks in each F_l.
        hidden: Hidden channels of the coupling nets.
        bound: Bound on the coupling log-scales.
        stage: Initially active stage s, 1 <= s <= L.
        upsampling: Layer between levels, ``"prior"`` (PC_l, the default), ``"nearest"`` or
            ``"squeeze"`` (see above).
        context_features: Length of a condition vector c (e.g. standardised data y); with
            it every coupling of F_l sees ``context_channels`` maps of the lattice of level l
            computed from c by a :class:`ContextEmbedding` (cINN-style), and the model is the
            conditional density p(x | c). 0: unconditional.
        context_channels: Channels of those maps.
        flow: The flows F_l: ``"glow"`` (:class:`~geoinvert.flows.glow.FieldFlow`) or
            ``"iaf"`` (:class:`~geoinvert.flows.autoregressive.AutoregressiveFieldFlow`, MADE
            maps in the IAF direction: fast draws, slow densities of given fields).

    References:
        | Multiscale Invertible Generative Networks for High-Dimensional Bayesian Inference
        | (Zhang, Zhang & Hou, 2021), https://arxiv.org/abs/2105.05489
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    prior_dtype = torch.float64

    def __init__(self, prior, levels: int | None = None, *, blocks_per_level: int = 4,
                 hidden: int = 32, bound: float = 2.0, stage: int = 1,
                 upsampling: str = "prior", context_features: int = 0,
                 context_channels: int = 4, flow: str = "glow"):
        super().__init__()
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got {upsampling!r}")
        if flow not in ("glow", "iaf") or (flow == "iaf" and context_features):
            raise ValueError(f"flow must be 'glow' or, without a context, 'iaf'; got {flow!r}")
        levels = prior.levels if levels is None else levels
        self.prior = prior
        self.config = dict(levels=levels, blocks_per_level=blocks_per_level, hidden=hidden,
                           bound=bound, upsampling=upsampling)
        channels = context_channels if context_features else 0
        if context_features:
            self.config.update(context_features=context_features,
                               context_channels=context_channels)
        if flow != "glow":
            self.config["flow"] = flow
            from geoinvert.flows.autoregressive import AutoregressiveFieldFlow
            make = lambda n: AutoregressiveFieldFlow(n, blocks_per_level, hidden)  # noqa: E731
        else:
            make = lambda n: FieldFlow(n, blocks_per_level, hidden, bound=bound,  # noqa: E731
                                       context_channels=channels)
        self.flows = nn.ModuleList(make(2**level) for level in range(1, levels + 1))
        self.embedding = ContextEmbedding(context_features, levels, channels, hidden) \
            if context_features else None
        self.register_buffer("_stage", torch.tensor(0))
        self._conditionings = {}
        self.set_stage(stage)

    # -- stages -----------------------------------------------------------------------------

    @property
    def levels(self) -> int:
        """Finest level L."""
        return self.config["levels"]

    @property
    def stage(self) -> int:
        """Active stage s: flows F_1..F_s are applied."""
        return int(self._stage)

    @property
    def dtype(self) -> torch.dtype:
        """Floating point type of the parameters and of the samples."""
        return next(self.flows.parameters()).dtype

    def set_stage(self, stage: int) -> None:
        """Activate flows F_1..F_stage (inactive flows stay as initialised: the identity)."""
        if not 1 <= stage <= self.levels:
            raise ValueError(f"stage must be in 1..{self.levels}, got {stage}")
        self._stage.fill_(stage)

    def grow(self) -> None:
        """Activate the next level, whose flow is the identity unless it was trained before."""
        self.set_stage(self.stage + 1)

    def active_parameters(self) -> list[nn.Parameter]:
        """Parameters of the active flows F_1..F_s, the ones stage-s training updates."""
        return [p for flow in self.flows[: self.stage] for p in flow.parameters()]

    # -- the bijection z <-> x ----------------------------------------------------------------

    @property
    def upsampling(self) -> str:
        """Kind of the layers between levels: ``"prior"``, ``"nearest"`` or ``"squeeze"``."""
        return self.config["upsampling"]

    def conditioning(self, level: int):
        """The layer from level-1 to ``level``: PC_level, or its ablation (cached)."""
        if level not in self._conditionings:
            self._conditionings[level] = upsampling_layer(self.upsampling, self.prior, level)
        return self._conditionings[level]

    def _to_prior(self, t: Tensor) -> Tensor:
        return t.to(self.prior_dtype)

    def _flow(self, level: int, x: Tensor, upto: int, maps=None) -> tuple[Tensor, Tensor]:
        if level > upto:
            return x, x.new_zeros(x.shape[0])
        return self.flows[level - 1](x, None if maps is None else maps[level - 1])

    def _flow_inverse(self, level: int, x: Tensor, upto: int, maps=None
                      ) -> tuple[Tensor, Tensor]:
        if level > upto:
            return x, x.new_zeros(x.shape[0])
        return self.flows[level - 1].inverse(x, None if maps is None else maps[level - 1])

    def _maps(self, context, num):
        """Context maps of every level from ``context (num, k)`` (or one row for all), or
        None for an unconditional model."""
        if self.embedding is None:
            if context is not None:
                raise ValueError("this MsIGN takes no context (context_features = 0)")
            return None
        if context is None:
            raise ValueError("this MsIGN is conditional: give the context (the data)")
        context = torch.as_tensor(context, dtype=self.dtype)
        if context.ndim == 1:
            context = context.expand(num, -1)
        return self.embedding(context)

    def _decode_levels(self, zs: list[Tensor], upto: int, context=None):
        """Yield (x_l, log|det dx_l/dz_{1:l}|) for l = 1..len(zs)."""
        maps = self._maps(context, zs[0].shape[0])
        x1, logdet = self.prior.coarsest(self._to_prior(zs[0]))
        x, ld = self._flow(1, x1.to(self.dtype), upto, maps)
        logdet = logdet + ld
        yield x, logdet
        for level, z in enumerate(zs[1:], start=2):
            pc = self.conditioning(level)
            x, ld_pc = pc.forward(self._to_prior(x), self._to_prior(z))
            x, ld = self._flow(level, x.to(self.dtype), upto, maps)
            logdet = logdet + ld_pc + ld
            yield x, logdet

    def decode(self, zs: list[Tensor], *, upto: int | None = None, context=None
               ) -> tuple[Tensor, Tensor]:
        r"""Map noises to a field, x_l = G(z_1, ..., z_l) (given ``context``, for a conditional
        model).

        Args:
            zs: Noises z_1 ``(num, 2, 2)``, z_k ``(num, 3, 2**(k-1), 2**(k-1))``, k = 2..l.
            upto: Apply F_k only for k <= upto (default: the stage); others are the identity.
            context: ``(num, context_features)`` or one row for all (conditional models).

        Returns:
            The field ``(num, 2**l, 2**l)`` and log|det dx/dz| ``(num,)``.
        """
        upto = self.stage if upto is None else upto
        *_, (x, logdet) = self._decode_levels(zs, upto, context)
        return x, logdet

    def encode(self, x: Tensor, *, upto: int | None = None, context=None
               ) -> tuple[list[Tensor], Tensor]:
        r"""Map a field back to its noises, (z_1, ..., z_l) = G^{-1}(x_l), the inverse of :meth:`decode`.

        Args:
            x: Fields ``(num, 2**l, 2**l)``.
            upto: Invert F_k only for k <= upto (default: the stage).

        Returns:
            The noises (as in :meth:`decode`) and log|det dz/dx| ``(num,)``.
        """
        upto = self.stage if upto is None else upto
        x = x.to(self.dtype)
        maps = self._maps(context, x.shape[0])
        zs, logdet = [], x.new_zeros(x.shape[0])
        for level in range(level_of(x), 1, -1):
            x, ld = self._flow_inverse(level, x, upto, maps)
            coarse, z, ld_pc = self.conditioning(level).inverse(self._to_prior(x))
            x, logdet = coarse.to(self.dtype), logdet + ld + ld_pc
            zs.append(z.to(self.dtype))
        x, ld = self._flow_inverse(1, x, upto, maps)
        z1, ld_c = self.prior.coarsest_inverse(self._to_prior(x))
        zs.append(z1.to(self.dtype))
        return zs[::-1], logdet + ld + ld_c

    # -- densities and sampling ---------------------------------------------------------------

    def sample_noise(self, num: int, level: int, *, generator: torch.Generator | None = None):
        """Independent standard normal noises z_1..z_level in :attr:`dtype`."""
        return [
            torch.randn((num, *noise_shape(k)), generator=generator, dtype=self.dtype)
            for k in range(1, level + 1)
        ]

    def sample(self, num: int, *, generator: torch.Generator | None = None,
               level: int | None = None, context=None) -> tuple[Tensor, Tensor]:
        r"""Reparameterised samples x ~ p and their log densities log p(x).

        Both outputs are differentiable in the parameters (reverse KL training).

        Args:
            num: Number of samples.
            generator: Source of the noise.
            level: Level of the samples (default: the stage; above it F_l = identity).
            context: The condition of a conditional model (see :meth:`decode`).

        Returns:
            x ``(num, 2**level, 2**level)`` and log p(x) ``(num,)``.
        """
        zs = self.sample_noise(num, level or self.stage, generator=generator)
        x, logdet = self.decode(zs, context=context)
        return x, standard_normal_log_prob(zs) - logdet

    def log_prob(self, x: Tensor, level: int | None = None, context=None) -> Tensor:
        r"""log p(x) by inversion down the levels, differentiable in the parameters and in x.

        Args:
            x: Fields ``(num, n, n)``, n = 2**level.
            level: Level of x; checked against its shape when given.
            context: The condition of a conditional model (see :meth:`decode`).

        Returns:
            log p(x) ``(num,)`` in :attr:`dtype`.
        """
        check_level(x, level)
        zs, logdet = self.encode(x, context=context)
        return standard_normal_log_prob(zs) + logdet

    def sample_levels(self, num: int, *, generator: torch.Generator | None = None,
                      level: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Every level's intermediate sample x_1..x_level of one draw, with its log density.

        Returns:
            Lists ``[x_1, ..., x_level]`` (``(num, 2**l, 2**l)``) and ``[log p(x_1), ...]``.
        """
        zs = self.sample_noise(num, level or self.stage, generator=generator)
        xs, log_ps = [], []
        for k, (x, logdet) in enumerate(self._decode_levels(zs, self.stage), start=1):
            xs.append(x)
            log_ps.append(standard_normal_log_prob(zs[:k]) - logdet)
        return xs, log_ps

    @torch.no_grad()
    def sample_surrogate(self, num: int, level: int | None = None, *,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""Samples of the surrogate PC_l(p_{l-1}) and their surrogate log densities, without grad.

        The surrogate of level l applies F_1..F_{l-1} (capped by the stage) and F_l = identity.

        Args:
            num: Number of samples.
            level: Level l >= 2 (default: the stage).
            generator: Source of the noise.

        Returns:
            x ``(num, 2**l, 2**l)`` and log s(x) ``(num,)``.
        """
        level = level or self.stage
        zs = self.sample_noise(num, level, generator=generator)
        x, logdet = self.decode(zs, upto=min(level - 1, self.stage))
        return x, standard_normal_log_prob(zs) - logdet

    def surrogate_log_prob(self, x: Tensor, level: int | None = None) -> Tensor:
        """log s(x) of the surrogate PC_l(p_{l-1}) at fields x ``(num, 2**l, 2**l)``, ``(num,)``."""
        level = check_level(x, level)
        zs, logdet = self.encode(x, upto=min(level - 1, self.stage))
        return standard_normal_log_prob(zs) + logdet

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | Path, *, metadata: dict | None = None) -> None:
        """Write the state dict to ``path`` (.pt) and the config to ``path`` with suffix .json.

        Args:
            path: Destination of the weights.
            metadata: JSON-serialisable extras stored with the config (e.g. the case text).
        """
        path = Path(path)
        torch.save(self.state_dict(), path)
        config = dict(self.config, stage=self.stage, dtype=str(self.dtype).removeprefix("torch."),
                      metadata=metadata or {})
        path.with_suffix(".json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: str | Path, prior) -> "MsIGN":
        """Rebuild a model written by :meth:`save` on ``prior`` (weights loaded with weights_only)."""
        path = Path(path)
        config = json.loads(path.with_suffix(".json").read_text())
        dtype = getattr(torch, config.pop("dtype"))
        stage = config.pop("stage")
        config.pop("metadata", None)
        model = cls(prior, **config, stage=stage).to(dtype)
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model
