"""Tests for geoinvert.flows.glow: every transform through the same checks."""

import io

import pytest
import torch

from geoinvert.flows.glow import (
    ActNorm,
    AffineCoupling,
    FieldFlow,
    FlowSequence,
    GlowBlock,
    InvConv1x1,
    Squeeze,
    Unsqueeze,
)

# Inputs of at most 32 dims per sample, small enough for a dense autograd Jacobian.
IMAGE = (2, 2, 4, 4)

# name -> (factory, input shape)
FACTORIES = {
    "actnorm": (lambda: ActNorm(2), IMAGE),
    "invconv": (lambda: InvConv1x1(2), IMAGE),
    "coupling-channel": (lambda: AffineCoupling(2, 8, mask="channel"), IMAGE),
    "coupling-channel-odd": (lambda: AffineCoupling(2, 8, mask="channel", parity=1), IMAGE),
    "coupling-checkerboard": (lambda: AffineCoupling(2, 8, mask="checkerboard"), IMAGE),
    "coupling-checker-odd": (lambda: AffineCoupling(2, 8, mask="checkerboard", parity=1), IMAGE),
    "squeeze": (lambda: Squeeze(), IMAGE),
    "unsqueeze": (lambda: Unsqueeze(), (2, 8, 2, 2)),
    "glow-block": (lambda: GlowBlock(2, 8, mask="checkerboard"), IMAGE),
    "sequence": (lambda: FlowSequence(GlowBlock(2, 8), Squeeze(), GlowBlock(8, 8), Unsqueeze()), IMAGE),
    "field-flow-2x2": (lambda: ChannelAdapter(FieldFlow(2, 3, 8)), (2, 1, 2, 2)),
    "field-flow-4x4": (lambda: ChannelAdapter(FieldFlow(4, 3, 8)), (2, 1, 4, 4)),
    "coupling-context": (lambda: WithContext(AffineCoupling(2, 8, mask="checkerboard",
                                                            context_channels=3), (3, 4, 4)),
                         IMAGE),
    "glow-block-context": (lambda: WithContext(GlowBlock(2, 8, context_channels=2), (2, 4, 4)),
                           IMAGE),
    "field-flow-context": (lambda: ChannelAdapter(WithContext(FieldFlow(4, 3, 8,
                                                                        context_channels=2),
                                                              (2, 2, 2))), (2, 1, 4, 4)),
}
PERMUTATIONS = ("squeeze", "unsqueeze")


class WithContext(torch.nn.Module):
    """A conditional transform with a fixed random context (the same for every sample, so that
    the per-sample Jacobian check holds), so that the transform checks below run on it."""

    def __init__(self, flow, shape):
        super().__init__()
        self.flow = flow
        self.register_buffer("context", torch.randn((1, *shape),
                                                    generator=torch.Generator().manual_seed(5)))

    def _context(self, x):
        return self.context.expand(x.shape[0], *self.context.shape[1:]).to(x)

    def forward(self, x):
        return self.flow(x, context=self._context(x))

    def inverse(self, y):
        return self.flow.inverse(y, context=self._context(y))


class ChannelAdapter(torch.nn.Module):
    """Runs a FieldFlow on the single channel of (num, 1, n, n) inputs."""

    def __init__(self, flow: FieldFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        y, ladj = self.flow(x[:, 0])
        return y[:, None], ladj

    def inverse(self, y):
        x, ladj = self.flow.inverse(y[:, 0])
        return x[:, None], ladj


def make(name: str, perturbed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    t = FACTORIES[name][0]().to(torch.float64)
    if perturbed:
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return t


def jacobian_logdet(t, x):
    """log|det| of the Jacobian of x_i -> t(x_i) for each sample, by autograd and slogdet."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0].flatten(), xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


CASES = [(name, perturbed) for name in FACTORIES for perturbed in (False, True)]


@pytest.mark.parametrize("name, perturbed", CASES)
def test_transform(name, perturbed):
    t = make(name, perturbed)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(FACTORIES[name][1], dtype=torch.float64, generator=gen)

    # inverse(forward(x)) == x and the two log-dets cancel
    y, ladj = t(x)
    x2, ladj_inv = t.inverse(y)
    assert ladj.shape == (x.shape[0],)
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-10)

    # identity at initialisation; perturbed parameters give a non-identity map
    params = list(t.parameters())
    if name in PERMUTATIONS:
        assert sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())
    elif perturbed:
        assert (y - x).abs().max() > 1e-3
    else:
        assert torch.equal(y, x) and torch.equal(ladj, torch.zeros_like(ladj))

    # log-determinant equals slogdet of the autograd Jacobian
    torch.testing.assert_close(ladj, jacobian_logdet(t, x), rtol=0, atol=1e-10)

    # every parameter receives a gradient (non-zero once the zero-initialised layers moved)
    y, ladj = t(x.requires_grad_())
    (y.square().sum() + ladj.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        if perturbed:
            assert p.grad.abs().max() > 0

    # state_dict save/load round-trips
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(name, False)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x)[0], t(x)[0], rtol=0, atol=0)


def test_squeeze_keeps_blocks():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = Squeeze()(x)[0]
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_field_flow_shapes_and_float32(n):
    torch.manual_seed(0)
    flow = FieldFlow(n, blocks=2, hidden=4).to(torch.float32)
    x = torch.randn(3, n, n)
    y, ladj = flow(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and ladj.shape == (3,)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_a_conditional_coupling_depends_on_its_context_and_needs_one():
    torch.manual_seed(0)
    t = AffineCoupling(2, 8, mask="channel", context_channels=3).to(torch.float64)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    c1, c2 = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    y, logdet = t(x, context=c1)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4, dtype=torch.float64))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y1, _ = t(x, context=c1)
    y2, _ = t(x, context=c2)
    assert (y1 - y2).abs().max() > 1e-3
    torch.testing.assert_close(t.inverse(y1, context=c1)[0], x)
    with pytest.raises(ValueError, match="needs a context of shape"):
        t(x)
    with pytest.raises(ValueError, match="needs a context of shape"):
        t(x, context=c1[:, :2])
    with pytest.raises(ValueError, match="takes no context"):
        AffineCoupling(2, 8)(x.float(), context=c1.float())
