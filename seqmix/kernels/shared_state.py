"""One state per sequence and head, read by every query: its sum and its reads, in Triton.

Linear attention without a gate in the noncausal patterns needs no recurrence: every query reads
the same state ``S = S_0 + scale * sum_t x_t^T y_t`` (``x, y = k, v``). Both halves are
token-parallel, forward and backward::

    S   = S_0 + scale * X^T Y           dX = scale * Y dS^T,   dY = scale * X dS,   dS_0 = dS
    O   = scale * Q S                   dQ = scale * dO S^T,   dS = scale * Q^T dO

These are the kernels of :mod:`seqmix.kernels.linear_noncausal` with identity features and no
normaliser: the sum (time cut into splits, float32 partials added in a fixed order), the read, and
in the backward ``dQ, dS`` from one read of ``Q, dO`` and ``dX, dY`` from one of ``X, Y`` (head dims
up to ``MAX_DIM``; past it, reads and sums). ``scale`` is applied to the states (``[B, H, DX, DY]``
float32), which the reads take in the inputs' dtype. Layout ``[B, T, H, D]`` as the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels.linear_noncausal import _dot, backward_kv, backward_q, phi_sum, read  # noqa: F401  (_dot: gla_chunk's)

IDENTITY = 0  # linear_noncausal.FEATURE_MAPS["identity"]


def _scaled(S: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``scale * S`` in ``dtype``."""
    return (S if scale == 1.0 else S * scale).to(dtype)


class StateSumFunction(torch.autograd.Function):
    """``S = S_0 + scale * x^T y``; see :func:`state_sum`."""

    @staticmethod
    def forward(ctx, x, y, s0, scale):
        ctx.save_for_backward(x, y)
        ctx.scale, ctx.has_s0 = scale, s0 is not None
        S = phi_sum(x, y, IDENTITY, False)[0]
        S = S if scale == 1.0 else S * scale
        return S + s0 if s0 is not None else S

    @staticmethod
    def backward(ctx, dS):
        x, y = ctx.saved_tensors
        dx, dy = backward_kv(x, y, _scaled(dS, ctx.scale, x.dtype).contiguous(), None, IDENTITY)
        return dx, dy, (dS if ctx.has_s0 else None), None


class ReadStateFunction(torch.autograd.Function):
    """``o = scale * q @ S``; see :func:`read_state`."""

    @staticmethod
    def forward(ctx, q, S, scale):
        S_low = _scaled(S, scale, q.dtype)
        ctx.save_for_backward(q, S_low)
        ctx.scale, ctx.S_dtype = scale, S.dtype
        return read(q, S_low, None, IDENTITY, 0.0)

    @staticmethod
    def backward(ctx, do):
        q, S_low = ctx.saved_tensors
        dq, dS, _ = backward_q(q, do.contiguous(), S_low, None, IDENTITY, 0.0)
        return dq, (dS if ctx.scale == 1.0 else dS * ctx.scale).to(ctx.S_dtype), None


def state_sum(x: Tensor, y: Tensor, initial_state: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``S [B, H, DX, DY] = initial_state + scale * sum_t x_t^T y_t`` for ``x [B, T, H, DX]``,
    ``y [B, T, H, DY]``; float32, differentiable in every input."""
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return StateSumFunction.apply(x.contiguous(), y.contiguous(), initial_state, float(scale))


def read_state(q: Tensor, S: Tensor, scale: float) -> Tensor:
    """``o [B, T, H, V] = scale * q [B, T, H, K] @ S [B, H, K, V]`` (every query reads one state),
    differentiable in ``q`` and ``S``; ``o`` in q's dtype, ``S`` float32."""
    return ReadStateFunction.apply(q.contiguous(), S.contiguous(), float(scale))
