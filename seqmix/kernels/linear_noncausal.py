"""Noncausal linear attention with a feature map and normaliser, fused, in Triton.

Per sequence and head, with ``kf = phi(k)``, ``qf = phi(q)`` (``phi`` applied on load: ``elu``
is ``elu(x) + 1``, ``relu``, ``identity``)::

    S = kf^T v [K, V],  z = sum_s kf_s [K],  den_t = qf_t . z + eps,  o_t = qf_t S / den_t

and backward, with ``g_t = do_t / den_t`` and ``gs_t = g_t S^T``::

    dden_t = -(do_t . o_t) / den_t = -(qf_t . gs_t) / den_t          (o is not read again)
    dqf = gs + dden z,  dS = qf^T g,  dz = sum_t dden_t qf_t,  dkf = v dS^T + dz,  dv = kf dS

Without the normaliser ``den = 1`` and ``dden = 0``. Four launches; each program walks a split of
one sequence's tokens (splits added until a launch has ~``TARGET_PROGRAMS`` programs), holds the
state it reads or sums for the whole split, and reads every token once:

- ``_sum_kernel``: float32 partials of ``S`` and ``z`` per split (added in a fixed order);
- ``_fwd_kernel``: ``o`` (``den`` recomputed from ``qf`` and ``z``, nothing else stored);
- ``_bwd_q_kernel``: ``dq`` and the partials of ``dS`` and ``dz`` from one read of ``q`` and ``do``;
- ``_bwd_kv_kernel``: ``dk`` and ``dv``.

``z`` and ``dz`` are products too (``phi(k)^T`` times a column of ones, ``phi(q)^T`` times ``dden``
split into its rounding to the input dtype and the remainder), so no step reduces across warps.
Whole rows per program (``K, V <= 128``). Float32 inputs: products to float32 accuracy
(``tf32x3``); bf16/fp16: the mapped features, states and ``g`` rounded to the input dtype for the
tensor cores, float32 accumulation, the normaliser in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqmix.kernels.shared_state import _dot, _pow2

FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}
MAX_DIM = 128  # K and V the fused path takes (whole rows per program)
# per launch: tokens per step, warps, software-pipelining stages
CONFIG = {"sum": (64, 4, 3), "fwd": (64, 4, 3), "bwd_q": (32, 8, 2), "bwd_kv": (128, 16, 2)}  # H100, Triton 3.6
MIN_SPLIT = 512  # fewest tokens per program
TARGET_PROGRAMS = 1024  # splits are added until a launch has this many programs


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
def _features(x, PHI: tl.constexpr):
    """``phi(x)`` in x's dtype, as a product operand (identity: x itself, no conversion)."""
    if PHI == 0:
        f = x
    else:
        f = _phi(x, PHI).to(x.dtype)
    return f


@triton.jit
def _tile(rows, valid, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Offsets and mask of the ``[BT, BD]`` tile of rows ``rows`` (flat ``b * T + t``) of head ``i_h``
    in a ``[B, T, H, D]`` tensor."""
    c = tl.arange(0, BD)
    return rows[:, None] * (H * D) + i_h * D + c[None, :], valid[:, None] & (c < D)[None, :]


@triton.jit
def _row(p, i_bh, D: tl.constexpr, BD: tl.constexpr):
    """Row ``i_bh`` of a float32 ``[B * H, D]`` tensor as ``[BD]`` (zero past D)."""
    c = tl.arange(0, BD)
    return tl.load(p + i_bh.to(tl.int64) * D + c, mask=c < D, other=0.0)


@triton.jit
def _prefetch(x, i_b, i_h, t0, end, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """The ``[BT, BD]`` tile of x at tokens ``t0 ..`` (zero from ``end``): loaded a step ahead by hand where
    the compiler's pipelining leaves a load in the loop (its users are not only products)."""
    t = t0 + tl.arange(0, BT)
    offs, mask = _tile(i_b.to(tl.int64) * T + t, t < end, i_h, H, D, BD)
    return tl.load(x + offs, mask=mask, other=0.0)


@triton.jit
def _state(p, i_bh, DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, TRANS: tl.constexpr):
    """Pointers and mask of state ``i_bh`` of a ``[B * H, DX, DY]`` tensor as ``[BX, BY]``, or its
    transpose as ``[BY, BX]`` if ``TRANS``."""
    cx, cy = tl.arange(0, BX), tl.arange(0, BY)
    base = p + i_bh.to(tl.int64) * DX * DY
    if TRANS:
        return base + cx[None, :] * DY + cy[:, None], (cx < DX)[None, :] & (cy < DY)[:, None]
    return base + cx[:, None] * DY + cy[None, :], (cx < DX)[:, None] & (cy < DY)[None, :]


@triton.jit
def _split_cols(x, keep, dtype: tl.constexpr):
    """``[BT, 16]`` product operand in ``dtype``: column 0 ``x`` rounded to dtype, column 1 its rounding
    error (so ``A^T`` times it, summed over columns, is ``A^T x`` to ~16 bits), zero rows where not ``keep``."""
    hi = x.to(dtype).to(tl.float32)
    c = tl.arange(0, 16)[None, :]
    cols = tl.where(c == 0, hi[:, None], tl.where(c == 1, (x - hi)[:, None], 0.0))
    return tl.where(keep[:, None], cols, 0.0).to(dtype)


@triton.jit
def _sum_kernel(
    k, v, S, z, T, split_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """``S[split, b, h] = phi(k)^T v`` ``[K, V]`` over the split's tokens and, if ``NORM``,
    ``z[split, b, h] = sum_t phi(k_t)`` ``[K]``; float32."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK, 16], dtype=tl.float32)  # z in column 0: a product with ones, no reduction per step
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        ok, mk = _tile(rows, valid, i_h, H, K, BK)
        ov, mv = _tile(rows, valid, i_h, H, V, BV)
        b_k = tl.load(k + ok, mask=mk, other=0.0)
        b_v = tl.load(v + ov, mask=mv, other=0.0)  # rows past T are zero: their phi(0) adds nothing to S
        b_kft = tl.trans(_features(b_k, PHI))
        acc += _dot(b_kft, b_v)
        if NORM:
            zacc += _dot(b_kft, _split_cols(tl.full([BT], 1.0, tl.float32), valid, b_k.dtype))
    i_out = i_s.to(tl.int64) * tl.num_programs(1) + i_bh
    p, m = _state(S, i_out, K, V, BK, BV, False)
    tl.store(p, acc, mask=m)
    if NORM:
        ck = tl.arange(0, BK)
        tl.store(z + i_out * K + ck, tl.sum(zacc, axis=1), mask=ck < K)


@triton.jit
def _fwd_kernel(
    q, S, z, o, eps, T, split_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """``o_t = phi(q_t) S / den_t`` over the split, ``den_t = phi(q_t) . z + eps`` (``1`` unless ``NORM``);
    ``S`` in the inputs' dtype."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p, m = _state(S, i_bh, K, V, BK, BV, False)
    b_S = tl.load(p, mask=m, other=0.0)
    b_z = _row(z, i_bh, K, BK) if NORM else tl.zeros([BK], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        oq, mq = _tile(rows, valid, i_h, H, K, BK)
        b_q = tl.load(q + oq, mask=mq, other=0.0)
        b_o = _dot(_features(b_q, PHI), b_S)
        if NORM:
            b_o = b_o * (1.0 / (tl.sum(_phi(b_q, PHI) * b_z[None, :], axis=1) + eps))[:, None]
        oo, mo = _tile(rows, valid, i_h, H, V, BV)
        tl.store(o + oo, b_o.to(o.dtype.element_ty), mask=mo)


@triton.jit
def _bwd_q_kernel(
    q, do, S, z, dq, dS, dz, eps, T, split_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """Over the split: ``dq = (gs + dden z) * phi'(q)`` with ``g = do / den``, ``gs = g S^T``,
    ``dden = -(phi(q) . gs) / den``; float32 partials ``dS[split, b, h] = phi(q)^T g`` and, if ``NORM``,
    ``dz[split, b, h] = sum_t dden_t phi(q_t)``. ``den`` from ``z`` as in the forward; ``S`` in the inputs' dtype."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p, m = _state(S, i_bh, K, V, BK, BV, True)
    b_St = tl.load(p, mask=m, other=0.0)
    b_z = _row(z, i_bh, K, BK) if NORM else tl.zeros([BK], dtype=tl.float32)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK, 16], dtype=tl.float32)  # dz in columns 0 and 1 (dden split in two for the product)
    start = i_s * split_len
    end = tl.minimum(start + split_len, T)
    b_q_next = _prefetch(q, i_b, i_h, start, end, T, H, K, BT, BK)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        oq, mq = _tile(rows, valid, i_h, H, K, BK)
        odo, mdo = _tile(rows, valid, i_h, H, V, BV)
        b_q = b_q_next
        b_q_next = _prefetch(q, i_b, i_h, t0 + BT, end, T, H, K, BT, BK)
        b_do = tl.load(do + odo, mask=mdo, other=0.0)  # rows past T are zero: g, gs and dden are too
        b_gs = _dot(b_do, b_St)  # den times gs
        b_qft = tl.trans(_features(b_q, PHI))
        if NORM:
            b_qf = _phi(b_q, PHI)
            b_r = 1.0 / (tl.sum(b_qf * b_z[None, :], axis=1) + eps)
            b_gs = b_gs * b_r[:, None]
            b_dden = -tl.sum(b_qf * b_gs, axis=1) * b_r
            b_dqf = b_gs + b_dden[:, None] * b_z[None, :]
            b_g = (b_do.to(tl.float32) * b_r[:, None]).to(b_do.dtype)
            zacc += _dot(b_qft, _split_cols(b_dden, valid, b_q.dtype))
        else:
            b_dqf = b_gs
            b_g = b_do
        tl.store(dq + oq, (b_dqf * _dphi(b_q, PHI)).to(dq.dtype.element_ty), mask=mq)
        acc += _dot(b_qft, b_g)
    i_out = i_s.to(tl.int64) * tl.num_programs(1) + i_bh
    p, m = _state(dS, i_out, K, V, BK, BV, False)
    tl.store(p, acc, mask=m)
    if NORM:
        ck = tl.arange(0, BK)
        tl.store(dz + i_out * K + ck, tl.sum(zacc, axis=1), mask=ck < K)


@triton.jit
def _bwd_kv_kernel(
    k, v, dS, dz, dk, dv, T, split_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """Over the split: ``dk = (v dS^T + dz) * phi'(k)``, ``dv = phi(k) dS``; ``dS`` in the inputs' dtype."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p, m = _state(dS, i_bh, K, V, BK, BV, False)
    b_dS = tl.load(p, mask=m, other=0.0)
    b_dz = _row(dz, i_bh, K, BK) if NORM else tl.zeros([BK], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        ok, mk = _tile(rows, valid, i_h, H, K, BK)
        ov, mv = _tile(rows, valid, i_h, H, V, BV)
        b_k = tl.load(k + ok, mask=mk, other=0.0)
        b_v = tl.load(v + ov, mask=mv, other=0.0)
        tl.store(dv + ov, _dot(_features(b_k, PHI), b_dS).to(dv.dtype.element_ty), mask=mv)
        b_dkf = _dot(b_v, tl.trans(b_dS))
        if NORM:
            b_dkf += b_dz[None, :]
        tl.store(dk + ok, (b_dkf * _dphi(b_k, PHI)).to(dk.dtype.element_ty), mask=mk)


def _grid(T: int, BH: int, BT: int) -> tuple[int, int]:
    """``(splits, split_len)``: tokens cut into splits (multiples of ``BT``, at least ``MIN_SPLIT`` long
    unless T is shorter) until ``splits * BH`` reaches ``TARGET_PROGRAMS``."""
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, BH), T // MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(T, splits), BT) * BT
    return max(1, triton.cdiv(T, split_len)), split_len


def _launch(kernel, name: str, T: int, B: int, H: int, K: int, V: int, phi: int, norm: bool, *args) -> None:
    """``kernel[(splits, B * H)](*args, T, split_len, ...)`` at ``CONFIG[name]``, split as :func:`_grid`."""
    BT, warps, stages = CONFIG[name]
    splits, split_len = _grid(T, B * H, BT)
    kernel[(splits, B * H)](*args, T, split_len, H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=norm,
                            num_warps=warps, num_stages=stages)


def _added(part: Tensor | None) -> Tensor | None:
    """The partials added over splits, in a fixed order."""
    return None if part is None else (part[0] if part.shape[0] == 1 else part.sum(0))


def phi_sum(k: Tensor, v: Tensor, phi: int, norm: bool) -> tuple[Tensor, Tensor | None]:
    """``S = phi(k)^T v`` ``[B, H, K, V]`` and, if ``norm``, ``z = sum_t phi(k_t)`` ``[B, H, K]``; float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = CONFIG["sum"][0]
    splits = _grid(T, B * H, BT)[0]
    S = torch.empty(splits, B, H, K, V, dtype=torch.float32, device=k.device)
    z = torch.empty(splits, B, H, K, dtype=torch.float32, device=k.device) if norm else S
    _launch(_sum_kernel, "sum", T, B, H, K, V, phi, norm, k, v, S, z)
    return _added(S), (_added(z) if norm else None)


def forward_read(q: Tensor, S: Tensor, z: Tensor | None, phi: int, eps: float) -> Tensor:
    """``o = phi(q) S / (phi(q) . z + eps)`` ``[B, T, H, V]`` (``z`` ``None``: no normaliser); ``S`` in q's dtype."""
    B, T, H, K = q.shape
    V = S.shape[-1]
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    _launch(_fwd_kernel, "fwd", T, B, H, K, V, phi, z is not None, q, S, S if z is None else z, o, eps)
    return o


def backward_q(q: Tensor, do: Tensor, S: Tensor, z: Tensor | None, phi: int, eps: float):
    """``dq`` and the float32 ``dS = phi(q)^T g`` ``[B, H, K, V]``, ``dz`` ``[B, H, K]`` (``None`` without ``z``)."""
    B, T, H, K = q.shape
    V = S.shape[-1]
    norm = z is not None
    splits = _grid(T, B * H, CONFIG["bwd_q"][0])[0]
    dq = torch.empty_like(q)
    dS = torch.empty(splits, B, H, K, V, dtype=torch.float32, device=q.device)
    dz = torch.empty(splits, B, H, K, dtype=torch.float32, device=q.device) if norm else dS
    _launch(_bwd_q_kernel, "bwd_q", T, B, H, K, V, phi, norm, q, do, S, z if norm else S, dq, dS, dz, eps)
    return dq, _added(dS), (_added(dz) if norm else None)


def backward_kv(k: Tensor, v: Tensor, dS: Tensor, dz: Tensor | None, phi: int) -> tuple[Tensor, Tensor]:
    """``dk = (v dS^T + dz) * phi'(k)``, ``dv = phi(k) dS``; ``dS`` in k's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _launch(_bwd_kv_kernel, "bwd_kv", T, B, H, K, V, phi, dz is not None, k, v, dS, dS if dz is None else dz, dk, dv)
    return dk, dv


class LinearNoncausalFunction(torch.autograd.Function):
    """See :func:`linear_attention_noncausal`."""

    @staticmethod
    def forward(ctx, q, k, v, phi, normalize, eps):
        S, z = phi_sum(k, v, phi, normalize)
        S = S.to(q.dtype)  # read in the inputs' dtype (bf16/fp16: the tensor cores' operand)
        o = forward_read(q, S, z, phi, eps)
        ctx.save_for_backward(q, k, v, S, z)
        ctx.phi, ctx.eps = phi, eps
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, S, z = ctx.saved_tensors
        dq, dS, dz = backward_q(q, do.contiguous(), S, z, ctx.phi, ctx.eps)
        dk, dv = backward_kv(k, v, dS.to(k.dtype), dz, ctx.phi)
        return dq, dk, dv, None, None, None


def supports(feature_map, K: int, V: int) -> bool:
    """Whether the fused path takes this feature map and these head dims."""
    return isinstance(feature_map, str) and feature_map in FEATURE_MAPS and max(K, V) <= MAX_DIM


def linear_attention_noncausal(q: Tensor, k: Tensor, v: Tensor, feature_map: str, normalize: bool, eps: float) -> Tensor:
    """``o [B, T, H, V]`` for ``q [B, T, H, K]``, ``k [B, S, H, K]``, ``v [B, S, H, V]``: every query
    reads ``S = phi(k)^T v`` (and ``z = sum phi(k)`` when normalising); differentiable in q, k, v."""
    return LinearNoncausalFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), FEATURE_MAPS[feature_map],
                                         bool(normalize), float(eps))
