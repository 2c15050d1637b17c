"""Glow transforms on image batches: actnorm, invertible 1x1 convolution, affine coupling, squeeze."""

import torch
from torch import Tensor, nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FieldFlow",
    "FlowSequence",
    "GlowBlock",
    "InvConv1x1",
    "Squeeze",
    "Unsqueeze",
]

# Every transform maps (num, C, H, W) tensors and follows one convention:
#   forward(x) -> (y, logdet) and inverse(y) -> (x, logdet),
# where logdet (num,) is log|det J| of the map that was applied (so the inverse returns
# minus the forward log-determinant at the same point). All are initialised to the identity.


class ActNorm(nn.Module):
    r"""Per-channel affine map, initialised to the identity.

    .. math:: y_{c} = x_{c} \exp(s_c) + b_c,
        \qquad \log|\det J| = H W \sum_c s_c .

    There is no data-dependent initialisation: a new layer is exactly the identity.

    Args:
        channels: Number of channels C of the inputs ``(num, C, H, W)``.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def _logdet(self, x: Tensor) -> Tensor:
        return (x.shape[-2] * x.shape[-1] * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.bias, self._logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (y - self.bias) * torch.exp(-self.log_scale), -self._logdet(y)


class InvConv1x1(nn.Module):
    r"""Invertible 1x1 convolution with an LU-parameterised weight, initialised to the identity.

    .. math:: y_{:, i, j} = W x_{:, i, j}, \qquad W = P L (U + \mathrm{diag}(\sigma e^{v})),
        \qquad \log|\det J| = H W \sum_c v_c ,

    with P a fixed permutation (the identity), L unit lower triangular, U strictly upper
    triangular, fixed signs sigma = +1 and trainable log-magnitudes v. At initialisation
    L = I, U = 0, v = 0, hence W = I.

    Args:
        channels: Number of channels C.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, channels: int):
        super().__init__()
        eye = torch.eye(channels)
        self.register_buffer("perm", eye.clone())
        self.register_buffer("sign", torch.ones(channels))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(torch.zeros(channels, channels))
        self.upper = nn.Parameter(torch.zeros(channels, channels))
        self.log_diag = nn.Parameter(torch.zeros(channels))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.log_diag.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_diag.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix W = P L U of shape (C, C)."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """The matrix W^-1 = U^-1 L^-1 P^T by triangular solves."""
        lower, upper = self._factors()
        linv_pt = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, linv_pt, upper=True)

    def _logdet(self, x: Tensor) -> Tensor:
        return (x.shape[-2] * x.shape[-1] * self.log_diag.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.einsum("dc,nchw->ndhw", self.weight(), x), self._logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.einsum("dc,nchw->ndhw", self.inverse_weight(), y), -self._logdet(y)


def coupling_net(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """3x3 conv - ReLU - 1x1 conv - ReLU - 3x3 conv (zero-initialised) with 'same' padding."""
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        last,
    )


def checkerboard(h: int, w: int, parity: int) -> Tensor:
    """Mask (1, 1, h, w) equal to 1 where (i + j + parity) is even."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j + parity) % 2 == 0).float()[None, None]


class AffineCoupling(nn.Module):
    r"""Affine coupling layer with a channel or checkerboard mask, initialised to the identity.

    With a binary mask m (1 = conditioning part, kept), the map is

    .. math:: y = m \odot x + (1 - m) \odot (x \odot e^{s(m \odot x)} + t(m \odot x)),
        \qquad s = \beta \tanh(r / \beta),

    where (r, t) is the output of a small convolutional net whose last layer is zero, so
    s = t = 0 at initialisation. The bound beta keeps |s| < beta for stability.
    ``log|det J| = sum((1 - m) s)``.

    Args:
        channels: Number of channels C (at least 2 for the channel mask).
        hidden: Hidden channels of the conv net.
        mask: ``"channel"`` (split channels into halves) or ``"checkerboard"`` (spatial).
        parity: 0 or 1, which half (or colour) is kept.
        bound: The bound beta on the log-scale.
        context_channels: Channels of an optional context tensor c ``(num, C_c, h, w)`` fed to
            the conv net beside the kept part, (r, t) = net([m x, c]): a conditional coupling
            (cINN), e.g. conditioned on an embedding of the data. 0: no context.

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, channels: int, hidden: int = 32, *, mask: str = "channel",
                 parity: int = 0, bound: float = 2.0, context_channels: int = 0):
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        self.mask, self.parity, self.bound = mask, parity, bound
        self.context_channels = int(context_channels)
        self.net = coupling_net(channels + self.context_channels, 2 * channels, hidden)

    def _mask(self, x: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            return checkerboard(x.shape[-2], x.shape[-1], self.parity).to(x)
        c = x.shape[1]
        keep = torch.arange(c, device=x.device) < c // 2
        keep = keep if self.parity == 0 else ~keep
        return keep.to(x)[None, :, None, None]

    def _shift_scale(self, x: Tensor, m: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        inputs = m * x
        if self.context_channels:
            expected = (x.shape[0], self.context_channels, *x.shape[2:])
            if context is None or tuple(context.shape) != expected:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"this coupling needs a context of shape {expected}, got {got}")
            inputs = torch.cat([inputs, context.to(x)], dim=1)
        elif context is not None:
            raise ValueError("this coupling takes no context (context_channels is 0)")
        raw, shift = self.net(inputs).chunk(2, dim=1)
        log_scale = self.bound * torch.tanh(raw / self.bound)
        return (1 - m) * shift, (1 - m) * log_scale

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m = self._mask(x)
        shift, log_scale = self._shift_scale(x, m, context)
        return x * log_scale.exp() + shift, log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m = self._mask(y)
        shift, log_scale = self._shift_scale(y, m, context)
        return (y - shift) * torch.exp(-log_scale), -log_scale.flatten(1).sum(1)


def squeeze(x: Tensor) -> Tensor:
    """(num, C, 2h, 2w) -> (num, 4C, h, w); channel 4c + 2a + b holds x[:, c, 2i + a, 2j + b]."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(y: Tensor) -> Tensor:
    """(num, 4C, h, w) -> (num, C, 2h, 2w), the inverse of :func:`squeeze`."""
    n, c4, h, w = y.shape
    y = y.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c4 // 4, 2 * h, 2 * w)


class Squeeze(nn.Module):
    r"""Space-to-depth: each output location holds the 4 values of one 2x2 block.

    ``(num, C, 2h, 2w) -> (num, 4C, h, w)``, a permutation, so log|det J| = 0.

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return unsqueeze(y), y.new_zeros(y.shape[0])


class Unsqueeze(nn.Module):
    r"""Depth-to-space ``(num, 4C, h, w) -> (num, C, 2h, 2w)``, the inverse of :class:`Squeeze`."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return unsqueeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return squeeze(y), y.new_zeros(y.shape[0])


class FlowSequence(nn.Module):
    r"""Composition of transforms, applied in order.

    .. math:: y = f_k \circ \dots \circ f_1 (x), \qquad \log|\det J| = \sum_i \log|\det J_{f_i}| .

    Args:
        transforms: Transforms with ``forward(x, context=None)``/``inverse(y, context=None)``
            returning ``(tensor, logdet)``; the context (if any) is handed to each of them,
            and the conditional ones (couplings with ``context_channels``) use it.
    """

    def __init__(self, *transforms: nn.Module):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, context=context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for t in reversed(self.transforms):
            y, ld = t.inverse(y, context=context)
            logdet = logdet + ld
        return y, logdet


class GlowBlock(FlowSequence):
    r"""One Glow step: actnorm, invertible 1x1 convolution, affine coupling; the identity at init.

    .. math:: y = \mathrm{coupling}(\mathrm{invconv}(\mathrm{actnorm}(x))) .

    Args:
        channels: Number of channels C.
        hidden: Hidden channels of the coupling net.
        mask: Coupling mask, ``"channel"`` or ``"checkerboard"``.
        parity: Which half or colour the coupling keeps.
        bound: Bound on the coupling log-scale.
        context_channels: Context channels of the coupling (0: unconditional).

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, channels: int, hidden: int = 32, *, mask: str = "channel",
                 parity: int = 0, bound: float = 2.0, context_channels: int = 0):
        super().__init__(
            ActNorm(channels),
            InvConv1x1(channels),
            AffineCoupling(channels, hidden, mask=mask, parity=parity, bound=bound,
                           context_channels=context_channels),
        )


def block_pattern(k: int, size: int) -> tuple[str, int]:
    """Mask and parity of block k: channel/checkerboard alternating, parities alternating.

    On a 1x1 lattice a checkerboard keeps everything, so only channel masks are used there.
    """
    if size < 2:
        return "channel", k % 2
    return ("channel", "checkerboard")[k % 2], (k // 2) % 2


class FieldFlow(nn.Module):
    r"""Flow on scalar fields ``(num, n, n)``: squeeze to 4 channels, Glow blocks, unsqueeze.

    .. math:: y = S^{-1} \circ g_K \circ \dots \circ g_1 \circ S (x),

    with S the 2x2 space-to-depth squeeze ``(num, 1, n, n) -> (num, 4, n/2, n/2)`` and g_k
    :class:`GlowBlock` s. The identity at initialisation.

    Args:
        n: Side of the field, even (n = 2 gives 1x1 lattices with 4 channels).
        blocks: Number of Glow blocks K.
        hidden: Hidden channels of the coupling nets.
        bound: Bound on the coupling log-scales.
        context_channels: Channels of an optional context ``(num, C_c, n/2, n/2)`` (at the
            squeezed resolution of the blocks) given to every coupling; 0: unconditional.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, n: int, blocks: int = 4, hidden: int = 32, *, bound: float = 2.0,
                 context_channels: int = 0):
        super().__init__()
        patterns = [block_pattern(k, n // 2) for k in range(blocks)]
        self.flow = FlowSequence(
            Squeeze(),
            *(GlowBlock(4, hidden, mask=m, parity=p, bound=bound,
                        context_channels=context_channels) for m, p in patterns),
            Unsqueeze(),
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = self.flow(x[:, None], context=context)
        return y[:, 0], logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet = self.flow.inverse(y[:, None], context=context)
        return x[:, 0], logdet

