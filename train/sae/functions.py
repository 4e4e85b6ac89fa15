"""Autograd functions of the JumpReLU family: the jump and the step with pseudo-derivatives.

Both take the pre-activation z [B, m] and theta [m] already exponentiated (theta = exp(log_theta)
is computed outside, so autograd applies the chain rule's theta factor itself), and a rectangle
kernel K of bandwidth eps for the pseudo-derivatives (DESIGN.md section 4):

    JumpReLUFn: f = z * H(z - theta);  df/dz = H(z - theta);  df/dtheta = -(theta / eps) K((z - theta) / eps)
    StepFn:     s = H(z - theta);      ds/dz = 0;             ds/dtheta = -(1 / eps) K((z - theta) / eps)

The step and the kernel are in-place float arithmetic: on the CPU, comparisons into bool masks and
mixed bool/float products or torch.where run several times slower than float ops on [B, m].
"""

import torch
from torch import Tensor


def _heaviside_(u: Tensor) -> Tensor:
    """H(u) = 1{u > 0} in u's dtype, in place on u."""
    return u.sign_().clamp_(min=0)


def _rectangle_(u: Tensor, eps: float) -> Tensor:
    """K(u / eps) = 1{|u / eps| < 1/2} in u's dtype, in place on u (0.5 - a > 0 exactly when a < 0.5)."""
    return u.div_(eps).abs_().neg_().add_(0.5).clamp_(min=0).sign_()


class JumpReLUFn(torch.autograd.Function):
    """f = z * H(z - theta). z [B, m], theta [m] (already exp'd), eps: kernel bandwidth.

    d/dz = H(z - theta); d/dtheta = -(theta / eps) K((z - theta) / eps) (pseudo-derivative).
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return _heaviside_(z - theta).mul_(z)  # z * H(z - theta), one [B, m] allocation

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = _heaviside_(z - theta).mul_(grad)
        grad_theta = -(theta / ctx.eps) * _rectangle_(z - theta, ctx.eps).mul_(grad).sum_to_size(theta.shape)
        return grad_z, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(z - theta) as z's dtype. d/dz = 0; d/dtheta = -(1 / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return _heaviside_(z - theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(1 / ctx.eps) * _rectangle_(z - theta, ctx.eps).mul_(grad).sum_to_size(theta.shape)
        return z.new_zeros(()).expand_as(z), grad_theta, None  # an exact zero that allocates nothing
