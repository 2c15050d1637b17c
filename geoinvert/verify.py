"""Gradient verification: the Taylor remainder test for differentiable functionals."""

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["taylor_test", "TaylorResult"]


@dataclass(frozen=True)
class TaylorResult:
    """Remainders of a Taylor test and their observed convergence rates.

    Attributes:
        steps: step sizes h_k.
        first: |J(x + h dx) - J(x)| (decays like h when the gradient is nonzero).
        second: |J(x + h dx) - J(x) - h <g, dx>| (decays like h^2 when g is the gradient).
        first_rates, second_rates: log2 ratios of successive remainders (steps halve).
    """

    steps: np.ndarray
    first: np.ndarray
    second: np.ndarray

    @property
    def first_rates(self):
        return _rates(self.steps, self.first)

    @property
    def second_rates(self):
        return _rates(self.steps, self.second)

    @property
    def rate(self):
        """Convergence rate of the gradient-corrected remainder (2 for a correct gradient)."""
        return float(np.median(self.second_rates))


def _rates(steps, remainders):
    return np.log(remainders[:-1] / remainders[1:]) / np.log(steps[:-1] / steps[1:])


def taylor_test(functional, x, direction=None, *, h0=1e-2, n_steps=5, generator=None):
    """Taylor test of a scalar functional J against its torch autograd gradient.

    With steps h_k = h0 / 2^k the remainders r1 = |J(x + h dx) - J(x)| and
    r2 = |J(x + h dx) - J(x) - h <grad J(x), dx>| should decay with slopes 1 and 2.

    Args:
        functional: callable on a tensor shaped like ``x`` returning a scalar tensor.
        x: point of the test (float64 recommended).
        direction: perturbation dx (default: standard normal with ``generator``).
        h0: largest step.
        n_steps: number of halvings.
        generator: torch.Generator for the default direction.

    Returns:
        TaylorResult with the remainders; ``result.rate`` is ~2 for an exact gradient.
    """
    x = x.detach().clone().requires_grad_(True)
    value = functional(x)
    (grad,) = torch.autograd.grad(value, x)
    if direction is None:
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    slope = float((grad * direction).sum())
    steps = h0 / 2.0 ** np.arange(n_steps)
    first, second = [], []
    with torch.no_grad():
        for h in steps:
            delta = float(functional(x + h * direction) - value)
            first.append(abs(delta))
            second.append(abs(delta - h * slope))
    return TaylorResult(steps, np.array(first), np.array(second))
