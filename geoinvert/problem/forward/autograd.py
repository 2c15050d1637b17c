"""Torch autograd bridge for forward models solved outside torch with exact discrete adjoints."""

import numpy as np
import torch

__all__ = ["AdjointFunction", "apply_adjoint_model"]


class AdjointFunction(torch.autograd.Function):
    """y = F(x) for a batch, with the vector-Jacobian product from the model's adjoint.

    The model implements ``solve_batch(x: ndarray (num, ny, nx)) -> (y (num, n_obs), state)``
    and ``vjp_batch(state, w: ndarray (num, n_obs)) -> ndarray (num, ny, nx)`` returning
    ``w^T dF/dx`` per sample. Failed samples carry NaN rows in ``y`` and get zero gradients.
    """

    @staticmethod
    def forward(ctx, x, model):
        x_np = x.detach().to(torch.float64).cpu().numpy()
        y, state = model.solve_batch(x_np)
        ctx.model, ctx.state = model, state
        return torch.from_numpy(y).to(dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_y):
        w = grad_y.detach().to(torch.float64).cpu().numpy()
        w = np.where(np.isfinite(w), w, 0.0)
        grad = ctx.model.vjp_batch(ctx.state, w)
        return torch.from_numpy(grad).to(dtype=grad_y.dtype, device=grad_y.device), None


def apply_adjoint_model(model, x):
    """Evaluate ``model`` on a tensor ``(num, ny, nx)`` or ``(ny, nx)`` through :class:`AdjointFunction`."""
    single = x.dim() == 2
    y = AdjointFunction.apply(x.unsqueeze(0) if single else x, model)
    return y[0] if single else y
