"""One state per sequence and head, read by every query: its sum and its reads, in Triton.

Linear attention without a gate in the noncausal patterns needs no recurrence: every query reads
the same state ``S = S_0 + scale * sum_t x_t^T y_t`` (``x, y = k, v``). Both halves are
token-parallel, forward and backward::

    S   = S_0 + scale * X^T Y           dX = scale * Y dS^T,   dY = scale * X dS,   dS_0 = dS
    O   = scale * Q S                   dQ = scale * dO S^T,   dS = scale * Q^T dO

The sum cuts time into splits so that even a few long sequences fill the GPU: one program per
(split, sequence and head, block of rows, block of columns) sums its split's outer products in
float32, and the splits' partial states are added in a fixed order (deterministic). A read is one
program per (64 tokens, sequence and head, block of columns). Layout ``[B, T, H, D]`` as the ops;
states ``[B, H, DX, DY]`` float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

READ_BT, READ_BO, READ_WARPS = 64, 128, 8  # tokens and columns per read program
SUM_BT, SUM_BX, SUM_BY = 64, 128, 64  # tokens per step, state rows and columns per sum program
SUM_MIN_SPLIT = 512  # fewest tokens per split of the sum
SUM_TARGET_PROGRAMS = 1024  # splits are added until the sum has this many programs (4 waves of 2 per SM)


@triton.jit
def _dot(a, b):
    """``a @ b`` in fp32; float32 operands to float32 accuracy (``tf32x3``)."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _sum_kernel(
    x, y, out, scale, T, split_len,
    H: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
):
    """``out[split, b, h] = scale * x[b, split, h]^T @ y[b, split, h]``, float32."""
    i_s, i_bh, i_xy = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NY: tl.constexpr = triton.cdiv(DY, BY)
    cx = (i_xy // NY) * BX + tl.arange(0, BX)
    cy = (i_xy % NY) * BY + tl.arange(0, BY)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows = i_b.to(tl.int64) * T + t
        valid = t < T
        b_x = tl.load(x + rows[:, None] * (H * DX) + i_h * DX + cx[None, :],
                      mask=valid[:, None] & (cx < DX)[None, :], other=0.0)
        b_y = tl.load(y + rows[:, None] * (H * DY) + i_h * DY + cy[None, :],
                      mask=valid[:, None] & (cy < DY)[None, :], other=0.0)
        acc += _dot(tl.trans(b_x), b_y)
    p = out + (i_s.to(tl.int64) * tl.num_programs(1) + i_bh) * DX * DY + cx[:, None] * DY + cy[None, :]
    tl.store(p, scale * acc, mask=(cx < DX)[:, None] & (cy < DY)[None, :])


@triton.jit
def _read_kernel(
    x, S, out, scale, T,
    H: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
    TRANS: tl.constexpr,
):
    """``out[b, t, h] = scale * x[b, t, h] @ S[b, h]`` (``S[b, h]^T`` if ``TRANS``); ``S`` float32, read in x's dtype."""
    i_t, i_bh, i_o = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    valid = t < T
    rows = i_b.to(tl.int64) * T + t
    ci = tl.arange(0, BI)
    co = i_o * BO + tl.arange(0, BO)
    b_x = tl.load(x + rows[:, None] * (H * DI) + i_h * DI + ci[None, :], mask=valid[:, None] & (ci < DI)[None, :],
                  other=0.0)
    if TRANS:
        p = S + i_bh.to(tl.int64) * DI * DO + co[None, :] * DI + ci[:, None]
    else:
        p = S + i_bh.to(tl.int64) * DI * DO + ci[:, None] * DO + co[None, :]
    b_S = tl.load(p, mask=(ci < DI)[:, None] & (co < DO)[None, :], other=0.0)
    b_o = scale * _dot(b_x, b_S.to(b_x.dtype))
    tl.store(out + rows[:, None] * (H * DO) + i_h * DO + co[None, :], b_o.to(out.dtype.element_ty),
             mask=valid[:, None] & (co < DO)[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _sum(x: Tensor, y: Tensor, scale: float) -> Tensor:
    """``scale * x^T y`` per sequence and head: ``[B, H, DX, DY]`` float32."""
    B, T, H, DX = x.shape
    DY = y.shape[-1]
    BX, BY = min(_pow2(DX), SUM_BX), min(_pow2(DY), SUM_BY)
    blocks = B * H * triton.cdiv(DX, BX) * triton.cdiv(DY, BY)
    splits = max(1, min(triton.cdiv(SUM_TARGET_PROGRAMS, blocks), T // SUM_MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(T, splits), SUM_BT) * SUM_BT
    splits = triton.cdiv(T, split_len)
    out = torch.empty(splits, B, H, DX, DY, dtype=torch.float32, device=x.device)
    _sum_kernel[(splits, B * H, triton.cdiv(DX, BX) * triton.cdiv(DY, BY))](
        x, y, out, scale, T, split_len, H=H, DX=DX, DY=DY, BT=SUM_BT, BX=BX, BY=BY, num_warps=4,
    )
    return out[0] if splits == 1 else out.sum(0)


def _read(x: Tensor, S: Tensor, scale: float, trans: bool) -> Tensor:
    """``scale * x @ S`` (``S^T`` if ``trans``) per sequence and head, in x's dtype."""
    B, T, H, DI = x.shape
    DO = S.shape[-2] if trans else S.shape[-1]
    BO = min(_pow2(DO), READ_BO)
    out = torch.empty(B, T, H, DO, dtype=x.dtype, device=x.device)
    _read_kernel[(triton.cdiv(T, READ_BT), B * H, triton.cdiv(DO, BO))](
        x, S, out, scale, T, H=H, DI=DI, DO=DO, BT=READ_BT, BI=_pow2(DI), BO=BO, TRANS=trans, num_warps=READ_WARPS,
    )
    return out


class StateSumFunction(torch.autograd.Function):
    """``S = S_0 + scale * x^T y``; see :func:`state_sum`."""

    @staticmethod
    def forward(ctx, x, y, s0, scale):
        ctx.save_for_backward(x, y)
        ctx.scale, ctx.has_s0 = scale, s0 is not None
        S = _sum(x, y, scale)
        return S + s0 if s0 is not None else S

    @staticmethod
    def backward(ctx, dS):
        x, y = ctx.saved_tensors
        dS = dS.contiguous()
        dx = _read(y, dS, ctx.scale, trans=True)
        dy = _read(x, dS, ctx.scale, trans=False)
        return dx, dy, (dS if ctx.has_s0 else None), None


class ReadStateFunction(torch.autograd.Function):
    """``o = scale * q @ S``; see :func:`read_state`."""

    @staticmethod
    def forward(ctx, q, S, scale):
        ctx.save_for_backward(q, S)
        ctx.scale = scale
        return _read(q, S, scale, trans=False)

    @staticmethod
    def backward(ctx, do):
        q, S = ctx.saved_tensors
        do = do.contiguous()
        return _read(do, S, ctx.scale, trans=True), _sum(q, do, ctx.scale).to(S.dtype), None


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
