"""Linear attention in which every query reads one state, in Triton: noncausal, with a feature map
and normaliser fused (this op), and the shared state of :mod:`seqmix.kernels.shared_state`
(identity features, no normaliser: the no-gate noncausal patterns of gated linear attention).

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
- ``_read_kernel``: ``o`` (``den`` recomputed from ``qf`` and ``z``, nothing else stored);
- ``_bwd_q_kernel``: ``dq`` and the partials of ``dS`` and ``dz`` from one read of ``q`` and ``do``;
- ``_bwd_kv_kernel``: ``dk`` and ``dv``.

``z`` is a product too (``phi(k)^T`` times a column of ones: no reduction across warps per step).
The backward kernels hold whole rows (``K, V <= MAX_DIM``); the sum and the read take states in
blocks of at most ``MAX_DIM`` squared, so that past it (identity features, no normaliser only) the
backward is a read and a sum for ``dq, dS`` and two reads for ``dk, dv``. Float32 inputs: products
to float32 accuracy (``tf32x3``); bf16/fp16: the mapped features, states and ``g`` rounded to the
input dtype for the tensor cores, float32 accumulation, the normaliser in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}
MAX_DIM = 128  # K and V the fused kernels take (whole rows per program); the widest state block
# per launch: tokens per step, warps, software-pipelining stages
CONFIG = {"sum": (64, 4, 2), "fwd": (64, 4, 2), "bwd_q": (32, 8, 2), "bwd_kv": (128, 16, 2)}  # H100, Triton 3.6
MIN_SPLIT = 512  # fewest tokens per program
TARGET_PROGRAMS = 1024  # splits are added until a launch has this many programs


@triton.jit
def _dot(a, b):
    """``a @ b`` in fp32; float32 operands to float32 accuracy (``tf32x3``)."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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
def _tile(rows, valid, i_h, c0, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Offsets and mask of the ``[BT, BD]`` tile of rows ``rows`` (flat ``b * T + t``), columns ``c0 ..``,
    of head ``i_h`` in a ``[B, T, H, D]`` tensor."""
    c = c0 + tl.arange(0, BD)
    return rows[:, None] * (H * D) + i_h * D + c[None, :], valid[:, None] & (c < D)[None, :]


@triton.jit
def _row(p, i_bh, D: tl.constexpr, BD: tl.constexpr):
    """Row ``i_bh`` of a float32 ``[B * H, D]`` tensor as ``[BD]`` (zero past D)."""
    c = tl.arange(0, BD)
    return tl.load(p + i_bh.to(tl.int64) * D + c, mask=c < D, other=0.0)


@triton.jit
def _state(p, i_bh, x0, y0, DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
           TRANS: tl.constexpr):
    """Pointers and mask of the ``[BX, BY]`` block at rows ``x0 ..``, columns ``y0 ..`` of state ``i_bh``
    of a ``[B * H, DX, DY]`` tensor, or of its transpose ``[BY, BX]`` if ``TRANS``."""
    cx, cy = x0 + tl.arange(0, BX), y0 + tl.arange(0, BY)
    base = p + i_bh.to(tl.int64) * DX * DY
    if TRANS:
        return base + cx[None, :] * DY + cy[:, None], (cx < DX)[None, :] & (cy < DY)[:, None]
    return base + cx[:, None] * DY + cy[None, :], (cx < DX)[:, None] & (cy < DY)[None, :]


@triton.jit
def _ones_col(valid, dtype: tl.constexpr):
    """``[BT, 16]`` product operand in ``dtype``: ones in column 0 where ``valid``, zeros elsewhere."""
    c = tl.arange(0, 16)[None, :]
    return tl.where(valid[:, None] & (c == 0), 1.0, 0.0).to(dtype)


@triton.jit
def _sum_kernel(
    x, y, S, z, T, split_len,
    H: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr,
):
    """Block ``(i_x, i_y)`` (program axis 2) of ``S[split, b, h] = phi(x)^T y`` ``[DX, DY]`` over the split's
    tokens and, if ``NORM`` (one column block), ``z[split, b, h] = sum_t phi(x_t)`` ``[DX]``; float32."""
    i_s, i_bh, i_xy = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NY: tl.constexpr = triton.cdiv(DY, BY)
    x0, y0 = (i_xy // NY) * BX, (i_xy % NY) * BY
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    zacc = tl.zeros([BX, 16], dtype=tl.float32)  # z in column 0: a product with ones, no reduction per step
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        ox, mx = _tile(rows, valid, i_h, x0, H, DX, BX)
        oy, my = _tile(rows, valid, i_h, y0, H, DY, BY)
        b_x = tl.load(x + ox, mask=mx, other=0.0)
        b_y = tl.load(y + oy, mask=my, other=0.0)  # rows past T are zero: their phi(0) adds nothing to S
        b_xft = tl.trans(_features(b_x, PHI))
        acc += _dot(b_xft, b_y)
        if NORM:
            zacc += _dot(b_xft, _ones_col(valid, b_x.dtype))
    i_out = i_s.to(tl.int64) * tl.num_programs(1) + i_bh
    p, m = _state(S, i_out, x0, y0, DX, DY, BX, BY, False)
    tl.store(p, acc, mask=m)
    if NORM:
        cx = x0 + tl.arange(0, BX)
        tl.store(z + i_out * DX + cx, tl.sum(zacc, axis=1), mask=cx < DX)


@triton.jit
def _read_kernel(
    x, S, z, o, eps, T, split_len,
    H: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr, TRANS: tl.constexpr,
):
    """Columns block ``i_o`` (program axis 2) of ``o_t = phi(x_t) S / den_t`` over the split,
    ``den_t = phi(x_t) . z + eps`` (``1`` unless ``NORM``); ``S [DI, DO]`` in the inputs' dtype, or
    ``S^T`` of a stored ``[DO, DI]`` if ``TRANS``."""
    i_s, i_bh, i_o = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    if TRANS:
        p, m = _state(S, i_bh, i_o * BO, 0, DO, DI, BO, BI, True)
    else:
        p, m = _state(S, i_bh, 0, i_o * BO, DI, DO, BI, BO, False)
    b_S = tl.load(p, mask=m, other=0.0)
    b_z = _row(z, i_bh, DI, BI) if NORM else tl.zeros([BI], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        ox, mx = _tile(rows, valid, i_h, 0, H, DI, BI)
        b_x = tl.load(x + ox, mask=mx, other=0.0)
        b_o = _dot(_features(b_x, PHI), b_S)
        if NORM:
            b_o = b_o * (1.0 / (tl.sum(_phi(b_x, PHI) * b_z[None, :], axis=1) + eps))[:, None]
        oo, mo = _tile(rows, valid, i_h, i_o * BO, H, DO, BO)
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
    p, m = _state(S, i_bh, 0, 0, K, V, BK, BV, True)
    b_St = tl.load(p, mask=m, other=0.0)
    b_z = _row(z, i_bh, K, BK) if NORM else tl.zeros([BK], dtype=tl.float32)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        oq, mq = _tile(rows, valid, i_h, 0, H, K, BK)
        odo, mdo = _tile(rows, valid, i_h, 0, H, V, BV)
        b_q = tl.load(q + oq, mask=mq, other=0.0)
        b_do = tl.load(do + odo, mask=mdo, other=0.0)  # rows past T are zero: g, gs and dden are too
        if NORM:
            b_qf = _phi(b_q, PHI)
            b_den = tl.sum(b_qf * b_z[None, :], axis=1) + eps
            b_g = (b_do.to(tl.float32) / b_den[:, None]).to(b_do.dtype)
            b_gs = _dot(b_g, b_St)
            b_dden = -tl.sum(b_qf * b_gs, axis=1) / b_den
            b_dqf = b_gs + b_dden[:, None] * b_z[None, :]
            zacc += tl.sum(b_qf * b_dden[:, None], axis=0)
        else:
            b_g = b_do
            b_dqf = _dot(b_do, b_St)
        tl.store(dq + oq, (b_dqf * _dphi(b_q, PHI)).to(dq.dtype.element_ty), mask=mq)
        acc += _dot(tl.trans(_features(b_q, PHI)), b_g)
    i_out = i_s.to(tl.int64) * tl.num_programs(1) + i_bh
    p, m = _state(dS, i_out, 0, 0, K, V, BK, BV, False)
    tl.store(p, acc, mask=m)
    if NORM:
        ck = tl.arange(0, BK)
        tl.store(dz + i_out * K + ck, zacc, mask=ck < K)


@triton.jit
def _bwd_kv_kernel(
    k, v, dS, dz, dk, dv, T, split_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, NORM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
):
    """Over the split: ``dk = (v dS^T + dz) * phi'(k)`` if ``DK``, ``dv = phi(k) dS`` if ``DV``; ``dS`` in the
    inputs' dtype."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p, m = _state(dS, i_bh, 0, 0, K, V, BK, BV, False)
    b_dS = tl.load(p, mask=m, other=0.0)
    b_dz = _row(dz, i_bh, K, BK) if NORM else tl.zeros([BK], dtype=tl.float32)
    start = i_s * split_len
    for t0 in range(start, tl.minimum(start + split_len, T), BT):
        t = t0 + tl.arange(0, BT)
        rows, valid = i_b.to(tl.int64) * T + t, t < T
        ok, mk = _tile(rows, valid, i_h, 0, H, K, BK)
        ov, mv = _tile(rows, valid, i_h, 0, H, V, BV)
        b_k = tl.load(k + ok, mask=mk, other=0.0)
        if DK:
            b_v = tl.load(v + ov, mask=mv, other=0.0)
        if DV:
            tl.store(dv + ov, _dot(_features(b_k, PHI), b_dS).to(dv.dtype.element_ty), mask=mv)
        if DK:
            b_dkf = _dot(b_v, tl.trans(b_dS))
            if NORM:
                b_dkf += b_dz[None, :]
            tl.store(dk + ok, (b_dkf * _dphi(b_k, PHI)).to(dk.dtype.element_ty), mask=mk)


def _grid(T: int, programs: int, BT: int) -> tuple[int, int]:
    """``(splits, split_len)``: tokens cut into splits (multiples of ``BT``, at least ``MIN_SPLIT`` long
    unless T is shorter) until ``splits * programs`` reaches ``TARGET_PROGRAMS``."""
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), T // MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(T, splits), BT) * BT
    return max(1, triton.cdiv(T, split_len)), split_len


def _blocks(D: int) -> tuple[int, int]:
    """Block width (a power of two, at most ``MAX_DIM``) and block count for a dim of ``D``."""
    width = min(_pow2(D), MAX_DIM)
    return width, triton.cdiv(D, width)


def _config(name: str, dtype: torch.dtype) -> tuple[int, int, int]:
    """``CONFIG[name]``; float32 inputs at most 32 tokens per step and one stage (their tiles and
    states take twice the bytes, the states twice again as ``tf32x3`` operands)."""
    BT, warps, stages = CONFIG[name]
    return (min(BT, 32), warps, 1) if dtype.itemsize == 4 else (BT, warps, stages)


def _splits(name: str, T: int, programs: int, dtype: torch.dtype) -> int:
    """The splits launch ``name`` cuts T into, ``programs`` per split (see :func:`_grid`)."""
    return _grid(T, programs, _config(name, dtype)[0])[0]


def _launch(kernel, name: str, T: int, BH: int, blocks: int, dtype: torch.dtype, *args, **constexprs) -> None:
    """``kernel[(splits, BH, blocks)](*args, T, split_len, BT=..., **constexprs)`` at :func:`_config`."""
    BT, warps, stages = _config(name, dtype)
    splits, split_len = _grid(T, BH * blocks, BT)
    kernel[(splits, BH, blocks)](*args, T, split_len, BT=BT, num_warps=warps, num_stages=stages, **constexprs)


def _added(part: Tensor) -> Tensor:
    """The partials ``[splits, ...]`` added over splits, in a fixed order."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


def phi_sum(x: Tensor, y: Tensor, phi: int, norm: bool) -> tuple[Tensor, Tensor | None]:
    """``S = phi(x)^T y`` ``[B, H, DX, DY]`` and, if ``norm``, ``z = sum_t phi(x_t)`` ``[B, H, DX]``;
    float32, any dims (blocks of at most ``MAX_DIM`` squared)."""
    B, T, H, DX = x.shape
    DY = y.shape[-1]
    (BX, NX), (BY, NY) = _blocks(DX), _blocks(DY)
    assert NY == 1 or not norm, "z takes one column block"
    splits = _splits("sum", T, B * H * NX * NY, x.dtype)
    S = torch.empty(splits, B, H, DX, DY, dtype=torch.float32, device=x.device)
    z = torch.empty(splits, B, H, DX, dtype=torch.float32, device=x.device) if norm else S
    _launch(_sum_kernel, "sum", T, B * H, NX * NY, x.dtype, x, y, S, z, H=H, DX=DX, DY=DY, BX=BX, BY=BY, PHI=phi, NORM=norm)
    return _added(S), (_added(z) if norm else None)


def read(x: Tensor, S: Tensor, z: Tensor | None, phi: int, eps: float, trans: bool = False) -> Tensor:
    """``o = phi(x) S / (phi(x) . z + eps)`` ``[B, T, H, DO]`` (``z`` ``None``: no normaliser) for
    ``S [B, H, DI, DO]``, or ``phi(x) S^T`` for ``S [B, H, DO, DI]`` if ``trans``; ``S`` in x's dtype,
    ``DI`` whole in each program, ``DO`` in blocks."""
    B, T, H, DI = x.shape
    DO = S.shape[-2] if trans else S.shape[-1]
    BO, NO = _blocks(DO)
    o = torch.empty(B, T, H, DO, dtype=x.dtype, device=x.device)
    _launch(_read_kernel, "fwd", T, B * H, NO, x.dtype, x, S, S if z is None else z, o, eps,
            H=H, DI=DI, DO=DO, BI=_pow2(DI), BO=BO, PHI=phi, NORM=z is not None, TRANS=trans)
    return o


def _fused(K: int, V: int) -> bool:
    """Whether the backward's fused kernels (whole rows) take these dims."""
    return max(K, V) <= MAX_DIM


def backward_q(q: Tensor, do: Tensor, S: Tensor, z: Tensor | None, phi: int, eps: float):
    """``dq`` and the float32 ``dS = phi(q)^T g`` ``[B, H, K, V]``, ``dz`` ``[B, H, K]`` (``None`` without ``z``).
    Past ``MAX_DIM`` (identity, no normaliser only): a read ``do S^T`` and a sum ``q^T do``."""
    B, T, H, K = q.shape
    V = S.shape[-1]
    norm = z is not None
    if not _fused(K, V):
        assert phi == 0 and not norm, "feature maps and the normaliser take K, V <= MAX_DIM"
        return read(do, S, None, 0, 0.0, trans=True), phi_sum(q, do, 0, False)[0], None
    splits = _splits("bwd_q", T, B * H, q.dtype)
    dq = torch.empty_like(q)
    dS = torch.empty(splits, B, H, K, V, dtype=torch.float32, device=q.device)
    dz = torch.empty(splits, B, H, K, dtype=torch.float32, device=q.device) if norm else dS
    _launch(_bwd_q_kernel, "bwd_q", T, B * H, 1, q.dtype, q, do, S, z if norm else S, dq, dS, dz, eps,
            H=H, K=K, V=V, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=norm)
    return dq, _added(dS), (_added(dz) if norm else None)


def backward_kv(k: Tensor, v: Tensor, dS: Tensor, dz: Tensor | None, phi: int) -> tuple[Tensor, Tensor]:
    """``dk = (v dS^T + dz) * phi'(k)``, ``dv = phi(k) dS``; ``dS`` in k's dtype. Past ``MAX_DIM``
    (identity, no normaliser only): two reads."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if not _fused(K, V):
        assert phi == 0 and dz is None, "feature maps and the normaliser take K, V <= MAX_DIM"
        return read(v, dS, None, 0, 0.0, trans=True), read(k, dS, None, 0, 0.0)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # float32: dk and dv apart (the state as two float32 product operands does not fit in shared memory)
    for DK, DV in ((True, True),) if k.element_size() == 2 else ((True, False), (False, True)):
        _launch(_bwd_kv_kernel, "bwd_kv", T, B * H, 1, k.dtype, k, v, dS, dS if dz is None else dz, dk, dv,
                H=H, K=K, V=V, BK=_pow2(K), BV=_pow2(V), PHI=phi, NORM=dz is not None, DK=DK, DV=DV)
    return dk, dv


class LinearNoncausalFunction(torch.autograd.Function):
    """See :func:`linear_attention_noncausal`."""

    @staticmethod
    def forward(ctx, q, k, v, phi, normalize, eps):
        S, z = phi_sum(k, v, phi, normalize)
        S = S.to(q.dtype)  # read in the inputs' dtype (bf16/fp16: the tensor cores' operand)
        o = read(q, S, z, phi, eps)
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
