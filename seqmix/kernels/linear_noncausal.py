"""Noncausal linear attention with a feature map and normaliser, fused, in Triton.

Per sequence and head, with ``kf = phi(k)``, ``qf = phi(q)`` (``phi`` applied on load: ``elu``
is ``elu(x) + 1``, ``relu``, ``identity``)::

    S = kf^T v [K, V],  z = sum_s kf_s [K],  den_t = qf_t . z + eps,  o_t = qf_t S / den_t

and backward, with ``g_t = do_t / den_t`` and ``dden_t = -(do_t . o_t) / den_t``::

    dqf = g S^T + dden z,  dS = qf^T g,  dz = sum_t dden_t qf_t,  dkf = v dS^T + dz,  dv = kf dS

Without the normaliser ``den = 1`` and ``dden = 0``. Five launches, each reading its tokens once:

- ``_phi_sum_kernel`` (forward ``S, z``; backward ``dS, dz``): time cut into splits (as the shared
  state's sum, until ~1,024 programs), float32 partials added in a fixed order;
- ``_fwd_read_kernel``: ``o`` and ``den`` (float32 ``[B, T, H]``, kept for the backward);
- ``_bwd_q_kernel``: ``dq`` and ``dden`` (float32 ``[B, T, H]``, read by the backward sum);
- ``_bwd_kv_kernel``: ``dk`` and ``dv``.

The read kernels hold whole rows (``K, V <= 128``). Float32 inputs: products to float32 accuracy
(``tf32x3``); bf16/fp16: the mapped features and states rounded to the input dtype for the tensor
cores, float32 accumulation, the normaliser in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqmix.kernels.shared_state import _dot, _pow2

FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}
MAX_DIM = 128  # K and V the fused path takes (whole rows per read program)
READ_BT, READ_WARPS = 64, 8  # tokens per read program
SUM_BT, SUM_BX, SUM_BY = 64, 128, 64  # tokens per step, state rows and columns per sum program
# the backward's dq kernel recomputes phi(q) S instead of reading o (one [B, T, H, V] read less, ~0.1 ms
# at 8K) if set; off: bf16 sm_90 then spills 680 B (255 regs) against 64 B reading o
BWD_RECOMPUTE = False
SUM_WARPS = 8
SUM_MIN_SPLIT = 512  # fewest tokens per split of the sums
SUM_TARGET_PROGRAMS = 1024  # splits are added until a sum has this many programs


@triton.jit
def _phi(x, PHI: tl.constexpr):
    """``phi(x)`` in float32 (0 identity, 1 elu + 1, 2 relu)."""
    x = x.to(tl.float32)
    if PHI == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif PHI == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _dphi(x, PHI: tl.constexpr):
    """``phi'(x)`` in float32."""
    x = x.to(tl.float32)
    if PHI == 1:
        d = tl.exp(tl.minimum(x, 0.0))
    elif PHI == 2:
        d = tl.where(x > 0, 1.0, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _phi_sum_kernel(
    x, y, den, vec, out, zout, T, split_len,
    H: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
    PHI: tl.constexpr, HAS_DEN: tl.constexpr, Z: tl.constexpr, HAS_VEC: tl.constexpr,
):
    """``out[split, b, h] = phi(x)^T (y / den)`` over the split (``den`` per token, if ``HAS_DEN``);
    if ``Z``, the programs of the first column block also write ``zout[split, b, h] = sum_t vec_t phi(x_t)``
    (``vec = 1`` unless ``HAS_VEC``). Float32."""
    i_s, i_bh, i_xy = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NY: tl.constexpr = triton.cdiv(DY, BY)
    i_x, i_y = i_xy // NY, i_xy % NY
    cx = i_x * BX + tl.arange(0, BX)
    cy = i_y * BY + tl.arange(0, BY)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    zacc = tl.zeros([BX], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows = i_b.to(tl.int64) * T + t
        valid = t < T
        b_x = tl.load(x + rows[:, None] * (H * DX) + i_h * DX + cx[None, :],
                      mask=valid[:, None] & (cx < DX)[None, :], other=0.0)
        b_xf = tl.where(valid[:, None], _phi(b_x, PHI), 0.0)
        b_y = tl.load(y + rows[:, None] * (H * DY) + i_h * DY + cy[None, :],
                      mask=valid[:, None] & (cy < DY)[None, :], other=0.0)
        if HAS_DEN:
            b_den = tl.load(den + rows * H + i_h, mask=valid, other=1.0)
            b_y = (b_y.to(tl.float32) / b_den[:, None]).to(b_x.dtype)
        acc += _dot(tl.trans(b_xf.to(b_x.dtype)), b_y)
        if Z:
            if i_y == 0:
                if HAS_VEC:
                    b_vec = tl.load(vec + rows * H + i_h, mask=valid, other=0.0)
                    zacc += tl.sum(b_xf * b_vec[:, None], axis=0)
                else:
                    zacc += tl.sum(b_xf, axis=0)
    base = i_s.to(tl.int64) * tl.num_programs(1) + i_bh
    tl.store(out + base * DX * DY + cx[:, None] * DY + cy[None, :], acc, mask=(cx < DX)[:, None] & (cy < DY)[None, :])
    if Z:
        if i_y == 0:
            tl.store(zout + base * DX + cx, zacc, mask=cx < DX)


@triton.jit
def _fwd_read_kernel(
    q, S, z, o, den, eps, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """``o_t = phi(q_t) S / den_t``, ``den_t = phi(q_t) . z + eps`` (stored, float32); ``den = 1`` unless ``NORM``."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    valid = t < T
    rows = i_b.to(tl.int64) * T + t
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    b_q = tl.load(q + rows[:, None] * (H * K) + i_h * K + ck[None, :], mask=valid[:, None] & (ck < K)[None, :],
                  other=0.0)
    b_qf = _phi(b_q, PHI)
    b_S = tl.load(S + i_bh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :],
                  mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
    b_o = _dot(b_qf.to(b_q.dtype), b_S.to(b_q.dtype))
    if NORM:
        b_z = tl.load(z + i_bh.to(tl.int64) * K + ck, mask=ck < K, other=0.0)
        b_den = tl.sum(b_qf * b_z[None, :], axis=1) + eps
        b_o = b_o / b_den[:, None]
        tl.store(den + rows * H + i_h, b_den, mask=valid)
    tl.store(o + rows[:, None] * (H * V) + i_h * V + cv[None, :], b_o.to(o.dtype.element_ty),
             mask=valid[:, None] & (cv < V)[None, :])


@triton.jit
def _bwd_q_kernel(
    q, do, o, den, S, z, dq, dden, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr, RECOMPUTE: tl.constexpr,
):
    """``dq = (g S^T + dden z) * phi'(q)`` with ``g = do / den``, ``dden = -(do . o) / den`` (stored, float32);
    if ``RECOMPUTE``, ``do . o = (do . phi(q) S) / den`` (o not read)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    valid = t < T
    rows = i_b.to(tl.int64) * T + t
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    m_v = valid[:, None] & (cv < V)[None, :]
    b_do = tl.load(do + rows[:, None] * (H * V) + i_h * V + cv[None, :], mask=m_v, other=0.0)
    b_St = tl.load(S + i_bh.to(tl.int64) * K * V + cv[:, None] + ck[None, :] * V,
                   mask=(cv < V)[:, None] & (ck < K)[None, :], other=0.0)
    m_k = valid[:, None] & (ck < K)[None, :]
    if NORM:
        b_den = tl.load(den + rows * H + i_h, mask=valid, other=1.0)
        b_g = b_do.to(tl.float32) / b_den[:, None]
        if RECOMPUTE:
            b_S = tl.load(S + i_bh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :],
                          mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
            b_qr = tl.load(q + rows[:, None] * (H * K) + i_h * K + ck[None, :], mask=m_k, other=0.0)
            b_num = _dot(_phi(b_qr, PHI).to(b_qr.dtype), b_S.to(b_qr.dtype))
            b_dden = -tl.sum(b_g * b_num, axis=1) / b_den
        else:
            b_o = tl.load(o + rows[:, None] * (H * V) + i_h * V + cv[None, :], mask=m_v, other=0.0)
            b_dden = -tl.sum(b_g * b_o.to(tl.float32), axis=1)
        tl.store(dden + rows * H + i_h, b_dden, mask=valid)
        b_dqf = _dot(b_g.to(b_do.dtype), b_St.to(b_do.dtype))
        b_z = tl.load(z + i_bh.to(tl.int64) * K + ck, mask=ck < K, other=0.0)
        b_dqf += b_dden[:, None] * b_z[None, :]
    else:
        b_dqf = _dot(b_do, b_St.to(b_do.dtype))
    b_q = tl.load(q + rows[:, None] * (H * K) + i_h * K + ck[None, :], mask=m_k, other=0.0)  # late: fewer registers
    b_dq = b_dqf * _dphi(b_q, PHI)
    tl.store(dq + rows[:, None] * (H * K) + i_h * K + ck[None, :], b_dq.to(dq.dtype.element_ty), mask=m_k)


@triton.jit
def _bwd_kv_kernel(
    k, v, dS, dz, dk, dv, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """``dk = (v dS^T + dz) * phi'(k)``, ``dv = phi(k) dS``."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    valid = t < T
    rows = i_b.to(tl.int64) * T + t
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    m_k = valid[:, None] & (ck < K)[None, :]
    m_v = valid[:, None] & (cv < V)[None, :]
    m_s = (ck < K)[:, None] & (cv < V)[None, :]
    b_k = tl.load(k + rows[:, None] * (H * K) + i_h * K + ck[None, :], mask=m_k, other=0.0)
    b_v = tl.load(v + rows[:, None] * (H * V) + i_h * V + cv[None, :], mask=m_v, other=0.0)
    b_dS = tl.load(dS + i_bh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :], mask=m_s, other=0.0)
    b_dS = b_dS.to(b_k.dtype)
    b_dv = _dot(_phi(b_k, PHI).to(b_k.dtype), b_dS)
    tl.store(dv + rows[:, None] * (H * V) + i_h * V + cv[None, :], b_dv.to(dv.dtype.element_ty), mask=m_v)
    b_dkf = _dot(b_v, tl.trans(b_dS))
    if NORM:
        b_dz = tl.load(dz + i_bh.to(tl.int64) * K + ck, mask=ck < K, other=0.0)
        b_dkf += b_dz[None, :]
    b_dk = b_dkf * _dphi(b_k, PHI)
    tl.store(dk + rows[:, None] * (H * K) + i_h * K + ck[None, :], b_dk.to(dk.dtype.element_ty), mask=m_k)


def _phi_sum(x: Tensor, y: Tensor, phi: int, den: Tensor | None, z: bool, vec: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``phi(x)^T (y / den)`` ``[B, H, DX, DY]`` and, if ``z``, ``sum_t vec_t phi(x_t)`` ``[B, H, DX]``; float32."""
    B, T, H, DX = x.shape
    DY = y.shape[-1]
    BX, BY = min(_pow2(DX), SUM_BX), min(_pow2(DY), SUM_BY)
    blocks = B * H * triton.cdiv(DX, BX) * triton.cdiv(DY, BY)
    splits = max(1, min(triton.cdiv(SUM_TARGET_PROGRAMS, blocks), T // SUM_MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(T, splits), SUM_BT) * SUM_BT
    splits = max(1, triton.cdiv(T, split_len))
    out = torch.empty(splits, B, H, DX, DY, dtype=torch.float32, device=x.device)
    zout = torch.empty(splits, B, H, DX, dtype=torch.float32, device=x.device) if z else out
    _phi_sum_kernel[(splits, B * H, triton.cdiv(DX, BX) * triton.cdiv(DY, BY))](
        x, y, den if den is not None else out, vec if vec is not None else out, out, zout, T, split_len,
        H=H, DX=DX, DY=DY, BT=SUM_BT, BX=BX, BY=BY, PHI=phi, HAS_DEN=den is not None, Z=z, HAS_VEC=vec is not None,
        num_warps=SUM_WARPS,
    )
    return (out[0] if splits == 1 else out.sum(0)), ((zout[0] if splits == 1 else zout.sum(0)) if z else None)


class LinearNoncausalFunction(torch.autograd.Function):
    """See :func:`linear_attention_noncausal`."""

    @staticmethod
    def forward(ctx, q, k, v, phi, normalize, eps):
        B, T, H, K = q.shape
        V = v.shape[-1]
        S, z = _phi_sum(k, v, phi, None, normalize, None)
        S = S.to(q.dtype)  # the reads take S in the inputs' dtype (bf16/fp16: fewer registers, no spill)
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
        den = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if normalize else S
        _fwd_read_kernel[(triton.cdiv(T, READ_BT), B * H)](
            q, S, z if normalize else S, o, den, eps, T,
            H=H, K=K, V=V, BT=READ_BT, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=normalize, num_warps=READ_WARPS,
        )
        ctx.save_for_backward(q, k, v, None if BWD_RECOMPUTE else o, den if normalize else None, S, z)
        ctx.phi, ctx.normalize = phi, normalize
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, S, z = ctx.saved_tensors
        phi, norm = ctx.phi, ctx.normalize
        do = do.contiguous()
        B, T, H, K = q.shape
        Sl, V = k.shape[1], v.shape[-1]
        dq = torch.empty_like(q)
        dden = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if norm else None
        _bwd_q_kernel[(triton.cdiv(T, READ_BT), B * H)](
            q, do, o if o is not None else S, den if norm else S, S, z if norm else S, dq, dden if norm else S, T,
            H=H, K=K, V=V, BT=READ_BT, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=norm, RECOMPUTE=o is None,
            num_warps=READ_WARPS,
        )
        dS, dz = _phi_sum(q, do, phi, den, norm, dden)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _bwd_kv_kernel[(triton.cdiv(Sl, READ_BT), B * H)](
            k, v, dS, dz if norm else dS, dk, dv, Sl,
            H=H, K=K, V=V, BT=READ_BT, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=norm, num_warps=READ_WARPS,
        )
        return dq, dk, dv, None, None, None


def supports(feature_map, K: int, V: int) -> bool:
    """Whether the fused path takes this feature map and these head dims."""
    return isinstance(feature_map, str) and feature_map in FEATURE_MAPS and max(K, V) <= MAX_DIM


def linear_attention_noncausal(q: Tensor, k: Tensor, v: Tensor, feature_map: str, normalize: bool, eps: float) -> Tensor:
    """``o [B, T, H, V]`` for ``q [B, T, H, K]``, ``k [B, S, H, K]``, ``v [B, S, H, V]``: every query
    reads ``S = phi(k)^T v`` (and ``z = sum phi(k)`` when normalising); differentiable in q, k, v."""
    return LinearNoncausalFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), FEATURE_MAPS[feature_map],
                                         bool(normalize), float(eps))
