"""Chunk-parallel kernels of :mod:`seqmix.kernels.gla_chunk` for a per-channel log gate ``g [B, T, H, K]``.

The state passes (``_states_kernel``, forward and reverse) are shared with the per-head gate; this
module holds what reads them: the outputs, and the backward's dq / dk / dg and dv programs.

A chunk of ``BT`` rows is cut into sub-chunks of ``SUB = 16``. With ``c`` the gate's cumsum from the
chunk start, the scores between sub-chunks ``J < I`` are tensor-core products of gated rows
referenced at a sub-chunk boundary ``b`` (the cumsum at the end of the earlier sub-chunk or the start
of the later one), so that every exponent is ``<= 0``::

    A_IJ = (q_I * exp(c_I - b)) (k_J * exp(b - c_J))^T

Inside a sub-chunk (the diagonal ``16 x 16`` blocks) the decay differs per channel and cannot be
split that way without exponents > 0, so the blocks are built exactly from the three-dimensional
decay ``E [i, j, k] = exp(c_ik - c_jk) [i sees j]`` (every exponent <= 0, zero where masked), in
registers::

    A_ij = sum_k q_ik k_jk E_ijk,   dq_ik = sum_j dA_ij k_jk E_ijk,   dk_jk = sum_i dA_ij q_ik E_ijk

The outputs and dv need ``A`` summed over every channel: there ``E`` is built ``KC`` channels at a
time from rows read back from memory (the cumsum from the sub-chunk start: only differences count).
dq, dk and dg take ``BK`` channels per program and keep their ``E`` for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqmix.kernels.gla_chunk import (
    _chunk_of,
    _chunk_rows,
    _dot,
    _dot_split,
    _gate,
    _keep,
    _pow2,
    _sequence,
    _state_tile,
    _store,
    _store_gate_grad,
    _suffix,
    _tile,
)

SUB = 16  # rows of a sub-chunk
KC = 32  # channels per step of the diagonal scores of the outputs and dv
OUT_BV, OUT_WARPS, OUT_STAGES = 128, 4, 1  # columns per output program
DQK_BK, DQK_WARPS, DQK_STAGES = 32, 8, 1  # channels per dq / dk / dg program
DV_BV, DV_WARPS, DV_STAGES = 128, 4, 1  # columns per dv program


@triton.jit
def _rows_at(s0, Tn, N: tl.constexpr, ANTI: tl.constexpr):
    """Time indices of the ``N`` rows from walk position ``s0`` (reversed when ``ANTI``) and which are real."""
    s = s0 + tl.arange(0, N)
    if ANTI:
        t = Tn - 1 - s
    else:
        t = s
    return t, s < Tn


@triton.jit
def _gate_before(g, bos, i_c, n, Tn, i_h, ck, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, ANTI: tl.constexpr):
    """Sum of the gates of the first ``n`` rows of chunk ``i_c``: ``[len(ck)]``."""
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    return tl.sum(_gate(g, bos, t, valid & (tl.arange(0, BT) < n), Tn, i_h, ck, H, K, BT, 2, ANTI), 0)


@triton.jit
def _sub_chunk(x, g, bos, i_c, m, b, Tn, i_h, ck, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
               SUB: tl.constexpr, ANTI: tl.constexpr):
    """Sub-chunk ``m`` of chunk ``i_c``, ``b`` the sum of the chunk's gates before it: its times,
    validity, rows of ``x`` (fp32, ``[SUB, len(ck)]``), the gate's cumsum from the chunk start ``c``
    and its value ``e`` at the sub-chunk's end."""
    t, valid = _rows_at(i_c * BT + m * SUB, Tn, SUB, ANTI)
    b_x = _tile(x + i_h * K, bos + t, valid, ck, K, H * K).to(tl.float32)
    b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, SUB, 2, ANTI)
    return t, valid, b_x, b[None, :] + tl.cumsum(b_g, 0), b + tl.sum(b_g, 0)


@triton.jit
def _decay3(c, SUB: tl.constexpr, ANTI: tl.constexpr):
    """``E [i, j, k] = exp(c_ik - c_jk)`` where row ``i`` sees row ``j``, else 0 (``c [SUB, BK]``)."""
    keep = _keep(SUB, ANTI)
    return tl.where(keep[:, :, None], tl.exp(tl.minimum(c[:, None, :] - c[None, :, :], 0.0)), 0.0)


@triton.jit
def _diag_scores(q, k, g, bos, t, valid, Tn, i_h, H: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr,
                 KC: tl.constexpr, ANTI: tl.constexpr):
    """``A [i, j] = sum_k q_ik k_jk exp(c_ik - c_jk)`` over every channel, ``i`` seeing ``j`` inside
    the sub-chunk of times ``t`` (else 0), ``KC`` channels at a time read from memory."""
    rows = bos + t
    A = tl.zeros([SUB, SUB], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, KC)):
        ck = i_k * KC + tl.arange(0, KC)
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_c = tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, SUB, 2, ANTI), 0)
        A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _decay3(b_c, SUB, ANTI), 2)
    return A


# ----------------------------------------------------------------------------- forward


@triton.jit
def _output_kernel(
    q, k, v, g, states, o, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, KC: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """``o = scale * [(q * exp(c)) S + A v]`` for chunk ``i_t``, head ``i_h``, columns ``i_v``, per
    sub-chunk ``m``: ``A v`` from the earlier sub-chunks (referenced at ``m``'s start) and the
    diagonal block; ``S`` is the state before the chunk."""
    NV = (V + BV - 1) // BV
    i_t, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V).to(dt)
    b_m = tl.zeros([BK], dtype=tl.float32)
    for m in range(BT // SUB):
        t, valid, b_q, c_m, e_m = _sub_chunk(q, g, bos, i_c, m, b_m, Tn, i_h, ck, H, K, BT, SUB, ANTI)
        rows = bos + t
        b_o = _dot((b_q * tl.exp(c_m)).to(dt), b_S)
        b_qr = (b_q * tl.exp(c_m - b_m[None, :])).to(dt)
        b_J = tl.zeros([BK], dtype=tl.float32)
        for J in range(m):
            t_J, valid_J, b_k, c_J, b_J = _sub_chunk(k, g, bos, i_c, J, b_J, Tn, i_h, ck, H, K, BT, SUB, ANTI)
            b_A = _dot(b_qr, tl.trans((b_k * tl.exp(b_m[None, :] - c_J)).to(dt)))
            b_o += _dot(b_A.to(dt), _tile(v + i_h * V, bos + t_J, valid_J, cv, V, H * V))
        b_A = _diag_scores(q, k, g, bos, t, valid, Tn, i_h, H, K, SUB, KC, ANTI)
        b_o += _dot(b_A.to(dt), _tile(v + i_h * V, rows, valid, cv, V, H * V))
        _store(o + i_h * V, scale * b_o, rows, valid, cv, V, H * V)
        b_m = e_m


# ----------------------------------------------------------------------------- backward


@triton.jit
def _dqk_kernel(
    q, k, v, g, states, dstates, do, dq, dk, dg, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
    SUB: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk and dg of chunk ``i_t``, head ``i_h``, channels ``i_k``, sub-chunk by sub-chunk from the
    last (the gate's gradient is a suffix sum)::

        dq = scale * [(do S^T) * exp(c) + (dA * D) k],  dk = (v dS'^T) * exp(c_L - c) + scale * (dA * D)^T q
        dg = suffix sum of (q * dq - k * dk) + <dS', S'>

    with ``dA = do v^T``, ``D_ijk = exp(c_ik - c_jk) [j <= i]``, ``S`` / ``dS'`` the state before / the
    gradient of the state after the chunk (every column, kept in registers)."""
    NK = (K + BK - 1) // BK
    i_t, i_k, i_h = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = i_k * BK + tl.arange(0, BK)
    cvf = tl.arange(0, BVF)
    b_S = _state_tile(states, i_t, i_h, ck, cvf, H, K, V)
    b_dS = _state_tile(dstates, i_t, i_h, ck, cvf, H, K, V)
    # <dS', S'> with S' = diag(exp(c_L)) S + (k * exp(c_L - c))^T v: exp(c_L) <S, dS'> + sum_j k_j * dk_j
    # (the state part of dk), carried into the gate's gradient of every row of the chunk
    t_c, valid_c = _chunk_rows(i_c, Tn, BT, ANTI)
    b_g = _gate(g, bos, t_c, valid_c, Tn, i_h, ck, H, K, BT, 2, ANTI)
    b_cl = tl.sum(b_g, 0)
    b_dks = _dot_split(_tile(v + i_h * V, bos + t_c, valid_c, cvf, V, H * V), tl.trans(b_dS), False)
    b_dks *= tl.exp(b_cl[None, :] - tl.cumsum(b_g, 0))
    b_carry = tl.exp(b_cl) * tl.sum(b_S * b_dS, 1)
    b_carry += tl.sum(_tile(k + i_h * K, bos + t_c, valid_c, ck, K, H * K).to(tl.float32) * b_dks, 0)
    M = BT // SUB
    for i in range(M):
        m = M - 1 - i
        b_m = _gate_before(g, bos, i_c, m * SUB, Tn, i_h, ck, H, K, BT, ANTI)
        t, valid, b_k, c_m, e_m = _sub_chunk(k, g, bos, i_c, m, b_m, Tn, i_h, ck, H, K, BT, SUB, ANTI)
        rows = bos + t
        b_v = _tile(v + i_h * V, rows, valid, cvf, V, H * V)
        b_dk = _dot_split(b_v, tl.trans(b_dS), False) * tl.exp(b_cl[None, :] - c_m)
        b_x = tl.zeros([SUB, BK], dtype=tl.float32)
        if HAS_Q:
            b_do = _tile(do + i_h * V, rows, valid, cvf, V, H * V)
            b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
            b_dq = _dot_split(b_do, tl.trans(b_S), False) * tl.exp(c_m)
            b_acc = tl.zeros([SUB, BK], dtype=tl.float32)
            b_J = tl.zeros([BK], dtype=tl.float32)
            for J in range(m):
                t_J, valid_J, b_kJ, c_J, b_J = _sub_chunk(k, g, bos, i_c, J, b_J, Tn, i_h, ck, H, K, BT, SUB, ANTI)
                b_dA = _dot(b_do, tl.trans(_tile(v + i_h * V, bos + t_J, valid_J, cvf, V, H * V)))
                b_acc += _dot(b_dA.to(dt), (b_kJ * tl.exp(b_m[None, :] - c_J)).to(dt))
            b_dq += b_acc * tl.exp(c_m - b_m[None, :])
            b_acc = tl.zeros([SUB, BK], dtype=tl.float32)
            b_I = e_m
            for I in range(m + 1, M):
                t_I, valid_I, b_qI, c_I, b_I = _sub_chunk(q, g, bos, i_c, I, b_I, Tn, i_h, ck, H, K, BT, SUB, ANTI)
                b_dA = _dot(_tile(do + i_h * V, bos + t_I, valid_I, cvf, V, H * V), tl.trans(b_v))
                b_acc += _dot(tl.trans(b_dA).to(dt), (b_qI * tl.exp(c_I - e_m[None, :])).to(dt))
            b_dk += scale * b_acc * tl.exp(e_m[None, :] - c_m)
            b_dA = tl.where(_keep(SUB, ANTI), _dot(b_do, tl.trans(b_v)), 0.0)
            b_E = _decay3(c_m, SUB, ANTI)
            b_dq += tl.sum(b_dA[:, :, None] * b_k[None, :, :] * b_E, 1)
            b_dk += scale * tl.sum(b_dA[:, :, None] * b_q[:, None, :] * b_E, 0)
            b_dq *= scale
            _store(dq + i_h * K, b_dq, rows, valid, ck, K, H * K)
            b_x = b_q * b_dq
        _store(dk + i_h * K, b_dk, rows, valid, ck, K, H * K)
        b_x -= b_k * b_dk
        _store_gate_grad(dg, b_carry[None, :] + _suffix(b_x), rows, t, valid, Tn, i_h, ck, H, K, 2, ANTI)
        b_carry += tl.sum(b_x, 0)


@triton.jit
def _dv_kernel(
    q, k, g, dstates, do, dv, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, KC: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv of chunk ``i_t``, head ``i_h``, columns ``i_v``, per key sub-chunk ``m``:
    ``(k * exp(c_L - c)) dS'`` plus ``scale * A^T do`` from the later sub-chunks (referenced at
    ``m``'s end) and the diagonal block."""
    NV = (V + BV - 1) // BV
    i_t, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    b_cl = _gate_before(g, bos, i_c, BT, Tn, i_h, ck, H, K, BT, ANTI)
    b_dS = _state_tile(dstates, i_t, i_h, ck, cv, H, K, V).to(dt)
    M = BT // SUB
    b_m = tl.zeros([BK], dtype=tl.float32)
    for m in range(M):
        t, valid, b_k, c_m, e_m = _sub_chunk(k, g, bos, i_c, m, b_m, Tn, i_h, ck, H, K, BT, SUB, ANTI)
        rows = bos + t
        b_dv = _dot((b_k * tl.exp(b_cl[None, :] - c_m)).to(dt), b_dS)
        if HAS_Q:
            b_kr = (b_k * tl.exp(e_m[None, :] - c_m)).to(dt)
            b_acc = tl.zeros([SUB, BV], dtype=tl.float32)
            b_I = e_m
            for I in range(m + 1, M):
                t_I, valid_I, b_qI, c_I, b_I = _sub_chunk(q, g, bos, i_c, I, b_I, Tn, i_h, ck, H, K, BT, SUB, ANTI)
                b_A = _dot((b_qI * tl.exp(c_I - e_m[None, :])).to(dt), tl.trans(b_kr))
                b_acc += _dot(tl.trans(b_A).to(dt), _tile(do + i_h * V, bos + t_I, valid_I, cv, V, H * V))
            b_A = _diag_scores(q, k, g, bos, t, valid, Tn, i_h, H, K, SUB, KC, ANTI)
            b_acc += _dot(tl.trans(b_A).to(dt), _tile(do + i_h * V, rows, valid, cv, V, H * V))
            b_dv += scale * b_acc
        _store(dv + i_h * V, b_dv, rows, valid, cv, V, H * V)
        b_m = e_m


# ----------------------------------------------------------------------------- launchers


def outputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, states: Tensor, chunks, scale: float, anticausal: bool,
            BT: int) -> Tensor:
    """``_output_kernel`` over every chunk: ``o [B, T, H, V]`` in v's dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BV = min(_pow2(V), OUT_BV)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    _output_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        q, k, v, g, states, o, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, SUB=SUB, KC=min(KC, _pow2(K)), ANTI=anticausal,
        IS_VARLEN=chunks.cu_seqlens is not None, num_warps=OUT_WARPS, num_stages=OUT_STAGES,
    )
    return o


def backward(q, k, v, g, states, dstates, do, chunks, scale: float, anticausal: bool, BT: int):
    """dq (None without q), dk, dv and dg of every chunk from the states before and the state
    gradients after each chunk; dg in g's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BKF, BVF = _pow2(K), _pow2(V)
    BK, BV = min(BKF, DQK_BK), min(BVF, DV_BV)
    dq = torch.empty_like(q) if q is not None else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # every row of a causal pass stores its gate's gradient; the anticausal pass never reads the first gate
    dg = torch.zeros_like(g) if anticausal or chunks.cu_seqlens is not None else torch.empty_like(g)
    common = dict(H=H, K=K, V=V, BT=BT, SUB=SUB, HAS_Q=q is not None, ANTI=anticausal,
                  IS_VARLEN=chunks.cu_seqlens is not None)
    _dqk_kernel[(chunks.count * triton.cdiv(K, BK), H)](
        q, k, v, g, states, dstates, do, dq, dk, dg, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        BK=BK, BVF=BVF, num_warps=DQK_WARPS, num_stages=DQK_STAGES, **common,
    )
    _dv_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        q, k, g, dstates, do, dv, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        BK=BKF, BV=BV, KC=min(KC, BKF), num_warps=DV_WARPS, num_stages=DV_STAGES, **common,
    )
    return dq, dk, dv, dg
