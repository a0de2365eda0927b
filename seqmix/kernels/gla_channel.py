"""Chunk-parallel kernels of :mod:`seqmix.kernels.gla_chunk` for a per-channel log gate ``g [B, T, H, K]``.

The state passes (``_states_kernel``, forward and reverse) are shared with the per-head gate; this
module holds what reads them. Forward: ``_scores_kernel`` and ``_diag_kernel`` write the chunk's
scores ``A [rows, H, BT]`` (in k's dtype, kept for the backward with the states), ``_output_kernel`` reads
them. Backward: ``_dA_kernel`` writes ``dA = do v^T`` per chunk, ``_dqk_diag_kernel`` the diagonal
blocks' share of dq and dk (fp32), ``_dqk_kernel`` the rest of dq, dk and dg, ``_dv_kernel`` dv.

A chunk of ``BT`` rows is cut into sub-chunks of ``SUB = 16``; ``c`` is the gate's cumsum from the
chunk start. Between sub-chunks ``J < I`` the decay is split at the start ``b`` of ``I`` (every
exponent ``<= 0``), and the whole chunk takes one tensor-core product per later sub-chunk ``I``, its
rows and the rows before it selected by masks::

    A += (q * exp(c - b_I) [rows of I]) (k * exp(b_I - c) [rows before I])^T

Inside a sub-chunk (the diagonal ``16 x 16`` blocks) the decay differs per channel and cannot be
split that way without exponents > 0, so the blocks are built exactly, one row of the sub-chunk at a
time, by Horner's rule on ``exp(c_ik - c_jk) = prod_{j < r <= i} exp(g_rk)`` (every factor <= 1;
no three-dimensional decay tensor)::

    A_ij = sum_k q_ik k_jk E_ijk,   dq_ik = sum_j dA_ij k_jk E_ijk,   dk_jk = sum_i dA_ij q_ik E_ijk

``A`` sums every channel, ``KC`` at a time; dq and dk take ``DIAG_BK`` channels per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqmix.kernels import gla_chunk
from seqmix.kernels.gla_chunk import (
    _chunk_of,
    _chunk_rows,
    _dot,
    _dot_split,
    _gate,
    _pow2,
    _sequence,
    _state_tile,
    _store,
    _store_gate_grad,
    _suffix,
    _tile,
)

SUB = 16  # rows of a sub-chunk
KC = 128  # channels per step of the diagonal blocks of A
KB = 64  # channels per step of the scores between sub-chunks and of the state reads of the outputs and dv
SCORES_WARPS, SCORES_STAGES = 4, 1
OUT_BV, OUT_WARPS, OUT_STAGES = 128, 4, 1  # columns per output program
DQK_BK, DQK_WARPS, DQK_STAGES = 64, 8, 1  # channels per dq / dk / dg program (4 warps: illegal address on the H100, Triton 3.6)
DQK_BV = 32  # columns per step of their reads of v, do and the states
DIAG_BK, DIAG_WARPS = 64, 8  # channels per program of the diagonal blocks of dq / dk
DIAG_A_WARPS, DIAG_A_STAGES = 4, 2  # programs of the diagonal blocks of A
DA_BV, DA_WARPS, DA_STAGES = 64, 4, 2  # columns per step of dA = do v^T
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
def _row_at(s0, n: tl.constexpr, Tn, ANTI: tl.constexpr):
    """Time index of the row at walk position ``s0 + n`` (reversed when ``ANTI``) and whether it is real."""
    s = s0 + n
    if ANTI:
        t = Tn - 1 - s
    else:
        t = s
    return t, s < Tn


@triton.jit
def _vec(p, row, ok, cols, D: tl.constexpr, stride):
    """Row ``row`` (a scalar), columns ``cols`` of a ``[rows, D]`` view with row stride ``stride``; zeros outside."""
    return tl.load(p + row * stride + cols, mask=cols < tl.where(ok, D, 0), other=0.0)


@triton.jit
def _gate_exp(g, bos, t, ok, Tn, i_h, cols, H: tl.constexpr, K: tl.constexpr, ANTI: tl.constexpr):
    """``exp`` of the log gate of the row of time ``t`` (a scalar), as :func:`_gate` reads it: ``[len(cols)]``."""
    if ANTI:
        m = ok & (t + 1 < Tn)
        r = bos + t + 1
    else:
        m = ok
        r = bos + t
    return tl.exp(_vec(g + i_h * K, r, m, cols, K, H * K).to(tl.float32))


@triton.jit
def _boundary(c, I, SUB: tl.constexpr, BT: tl.constexpr):
    """Masks of the rows of sub-chunk ``I`` and of the rows before it, and the gate's cumsum at its
    start ``b`` (``[len(c[0])]``, the cumsum ``c [BT, .]`` at row ``I * SUB - 1``)."""
    r = tl.arange(0, BT)
    b = tl.sum(tl.where((r == I * SUB - 1)[:, None], c, 0.0), 0)
    return (r // SUB == I)[:, None], (r < I * SUB)[:, None], b


@triton.jit
def _scores_kernel(
    q, k, g, A, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr, SUB: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr, ROWS64: tl.constexpr,
):
    """``A [rows, H, BT]`` (in A's dtype) of chunk ``i_t``, head ``i_h``: ``A [i, j]`` query ``i`` reading key
    ``j`` of the chunk. Between sub-chunks, one product per later sub-chunk ``I`` referenced at its
    start ``b``: ``(q * exp(c - b))`` over the rows of ``I`` times ``(k * exp(b - c))`` over the rows
    before it (channels ``KB`` at a time); not the diagonal blocks (:func:`_diag_kernel`)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    rows = t.to(tl.int64) if ROWS64 else t  # inside the sequence (int32 unless ROWS64): its start in the base pointers
    q, k, g, A = q + bos * H * K, k + bos * H * K, g + bos * H * K, A + bos * H * BT
    r = tl.arange(0, BT)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_c = tl.cumsum(_gate(g, 0, rows, valid, Tn, i_h, ck, H, K, BT, 2, ANTI), 0)
        for I in range(1, BT // SUB):  # a loop, not unrolled: one step's tiles live
            in_I, before_I, b_I = _boundary(b_c, I, SUB, BT)
            b_qI = (b_q * tl.exp(tl.where(in_I, b_c - b_I[None, :], float("-inf")))).to(dt)
            b_kI = (b_k * tl.exp(tl.where(before_I, b_I[None, :] - b_c, float("-inf")))).to(dt)
            b_A += _dot(b_qI, tl.trans(b_kI))
    off = (r // SUB)[:, None] != (r // SUB)[None, :]  # the diagonal blocks: _diag_kernel
    tl.store(A + (rows * H + i_h)[:, None] * BT + r[None, :], b_A, mask=valid[:, None] & off)


@triton.jit
def _diag_kernel(
    q, k, g, A, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, KC: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The diagonal block of sub-chunk ``m`` of chunk ``i_t``, head ``i_h`` in ``A``:
    ``A_ij = sum_k q_ik k_jk exp(c_ik - c_jk)``, ``i`` seeing ``j``. One query row ``i`` at a time
    (ascending), ``P [j, k] = k_jk exp(c_ik - c_jk)`` over the keys so far: ``P <- P * exp(g_i) + k_i``
    (every factor <= 1, no three-dimensional decay), row ``i`` of ``A`` = ``P q_i``; ``KC`` channels
    at a time."""
    M: tl.constexpr = BT // SUB
    i_t, m, i_h = tl.program_id(0) // M, tl.program_id(0) % M, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    s0 = i_c * BT + m * SUB
    t, valid = _rows_at(s0, Tn, SUB, ANTI)
    r = tl.arange(0, SUB)
    b_At = tl.zeros([SUB, SUB], dtype=tl.float32)  # A^T: [j, i]
    for i_k in range(tl.cdiv(K, KC)):
        ck = i_k * KC + tl.arange(0, KC)
        b_k = _tile(k + i_h * K, bos + t, valid, ck, K, H * K).to(tl.float32)
        b_P = tl.zeros([SUB, KC], dtype=tl.float32)
        for i in tl.static_range(SUB):
            t_i, ok_i = _row_at(s0, i, Tn, ANTI)
            b_e = _gate_exp(g, bos, t_i, ok_i, Tn, i_h, ck, H, K, ANTI)
            b_qi = _vec(q + i_h * K, bos + t_i, ok_i, ck, K, H * K).to(tl.float32)
            b_P = b_P * b_e[None, :] + tl.where((r == i)[:, None], b_k, 0.0)
            b_At += tl.where((r == i)[None, :], tl.sum(b_P * b_qi[None, :], 1)[:, None], 0.0)
    if ANTI:
        sees = r[None, :] > r[:, None]
    else:
        sees = r[None, :] >= r[:, None]
    b_At = tl.where(sees, b_At, 0.0)
    cols = m * SUB + r
    tl.store(A + ((bos + t) * H + i_h)[None, :] * BT + cols[:, None], b_At, mask=valid[None, :])


@triton.jit
def _scores_tile(A, rows, valid, i_h, H: tl.constexpr, BT: tl.constexpr):
    """The chunk's ``A [BT, BT]`` written by :func:`_scores_kernel` (zero rows past the end)."""
    r = tl.arange(0, BT)
    return tl.load(A + (rows * H + i_h)[:, None] * BT + r[None, :], mask=valid[:, None], other=0.0)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _output_kernel(
    q, g, v, A, states, o, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """``o = scale * [(q * exp(c)) S + A v]`` for chunk ``i_t``, head ``i_h``, columns ``i_v``; ``S``
    is the state before the chunk, ``A`` from :func:`_scores_kernel`."""
    NV = (V + BV - 1) // BV
    i_t, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = v.dtype.element_ty
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    rows = bos + t
    cv = i_v * BV + tl.arange(0, BV)
    b_o = _dot(_scores_tile(A, rows, valid, i_h, H, BT).to(dt), _tile(v + i_h * V, rows, valid, cv, V, H * V))
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_c = tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI), 0)
        b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V).to(dt)
        b_o += _dot((b_q * tl.exp(b_c)).to(dt), b_S)
    _store(o + i_h * V, scale * b_o, rows, valid, cv, V, H * V)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _dA_kernel(
    v, do, dA, dAd, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, SUB: tl.constexpr, ANTI: tl.constexpr,
    IS_VARLEN: tl.constexpr, ROWS64: tl.constexpr,
):
    """``dA = do v^T [BT, BT]`` (unmasked) of chunk ``i_t``, head ``i_h``, stored as ``A`` in ``dA``'s dtype
    (k's: :func:`_dqk_kernel` reads it only as an operand in that dtype), and its diagonal ``SUB x SUB``
    blocks in fp32 as ``dAd [rows, H, SUB]`` (for :func:`_dqk_diag_kernel`)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    rows = t.to(tl.int64) if ROWS64 else t  # inside the sequence (int32 unless ROWS64): its start in the base pointers
    v, do, dA, dAd = v + bos * H * V, do + bos * H * V, dA + bos * H * BT, dAd + bos * H * SUB
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        b_dA += _dot(_tile(do + i_h * V, rows, valid, cv, V, H * V), tl.trans(_tile(v + i_h * V, rows, valid, cv, V, H * V)))
    r = tl.arange(0, BT)
    tl.store(dA + (rows * H + i_h)[:, None] * BT + r[None, :], b_dA, mask=valid[:, None])
    diag = (r // SUB)[:, None] == (r // SUB)[None, :]
    tl.store(dAd + (rows * H + i_h)[:, None] * SUB + (r % SUB)[None, :], b_dA, mask=valid[:, None] & diag)


@triton.jit
def _dqk_diag_kernel(
    q, k, g, dAd, dqd, dkd, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    SUB: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The diagonal sub-chunk blocks' part of dq and dk / scale (fp32) for sub-chunk ``m`` of chunk
    ``i_t``, head ``i_h``, channels ``i_k``: ``dA = do v^T`` inside the sub-chunk (``dAd`` from :func:`_dA_kernel`,
    ``i`` seeing ``j``), ``dqd_ik = sum_j dA_ij k_jk exp(c_ik - c_jk)`` and ``dkd_jk = sum_i dA_ij q_ik
    exp(c_ik - c_jk)``, by Horner's rule over the 16 rows (every factor ``exp(g) <= 1``)::

        dqd <- where(i >= j, dqd * exp(g_j) + dA[:, j] k_j, dqd)        j = 0, 1, ..., 15
        dkd <- where(j <= i, dkd * exp(g_i+1) + dA[i, :] q_i, dkd)      i = 15, 14, ..., 0

    (rows of the tile: ``i`` for dqd, ``j`` for dkd; ``dA`` read one column / row at a time)."""
    M: tl.constexpr = BT // SUB
    NK: tl.constexpr = (K + BK - 1) // BK
    pid = tl.program_id(0)
    i_t, m, i_k, i_h = pid // (M * NK), pid // NK % M, pid % NK, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    ck = i_k * BK + tl.arange(0, BK)
    s0 = i_c * BT + m * SUB
    t, valid = _rows_at(s0, Tn, SUB, ANTI)
    rows = bos + t
    r = tl.arange(0, SUB)
    p_dA = dAd + (rows * H + i_h) * SUB  # [SUB]: the block's rows
    b_dq = tl.zeros([SUB, BK], dtype=tl.float32)
    b_dk = tl.zeros([SUB, BK], dtype=tl.float32)
    for n in tl.static_range(SUB):
        # dq: key j = n (ascending)
        t_j, ok_j = _row_at(s0, n, Tn, ANTI)
        b_kj = _vec(k + i_h * K, bos + t_j, ok_j, ck, K, H * K).to(tl.float32)
        b_ej = _gate_exp(g, bos, t_j, ok_j, Tn, i_h, ck, H, K, ANTI)
        if ANTI:
            sees_q = r > n
        else:
            sees_q = r >= n
        b_col = tl.load(p_dA + n, mask=valid & sees_q, other=0.0)  # dA[:, j]
        b_dq = tl.where((r >= n)[:, None], b_dq * b_ej[None, :] + b_col[:, None] * b_kj[None, :], b_dq)
        # dk: query i = SUB - 1 - n (descending)
        i = SUB - 1 - n
        t_i, ok_i = _row_at(s0, i, Tn, ANTI)
        b_qi = _vec(q + i_h * K, bos + t_i, ok_i, ck, K, H * K).to(tl.float32)
        if ANTI:
            n_k = tl.where(ok_i, i, 0)
        else:
            n_k = tl.where(ok_i, i + 1, 0)
        b_row = tl.load(dAd + ((bos + t_i) * H + i_h) * SUB + r, mask=r < n_k, other=0.0)  # dA[i, :]
        if i < SUB - 1:
            t_n, ok_n = _row_at(s0, i + 1, Tn, ANTI)
            b_en = _gate_exp(g, bos, t_n, ok_n, Tn, i_h, ck, H, K, ANTI)
            b_dk = tl.where((r <= i)[:, None], b_dk * b_en[None, :] + b_row[:, None] * b_qi[None, :], b_dk)
        else:
            b_dk = tl.where((r <= i)[:, None], b_row[:, None] * b_qi[None, :], b_dk)
    _store(dqd + i_h * K, b_dq, rows, valid, ck, K, H * K)
    _store(dkd + i_h * K, b_dk, rows, valid, ck, K, H * K)


@triton.jit
def _dqk_kernel(
    q, k, v, g, states, dstates, do, dA, dqd, dkd, dq, dk, dg, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr, ROWS64: tl.constexpr,
):
    """dq, dk and dg of chunk ``i_t``, head ``i_h``, channels ``i_k``::

        dq = scale * [(do S^T) * exp(c) + (dA * D) k],  dk = (v dS'^T) * exp(c_L - c) + scale * (dA * D)^T q
        dg = suffix sum of (q * dq - k * dk) + <dS', S'>

    with ``dA = do v^T`` (:func:`_dA_kernel`), ``D_ijk = exp(c_ik - c_jk) [j <= i]``, ``S`` / ``dS'`` the state before / the
    gradient of the state after the chunk. The diagonal sub-chunk blocks of ``D`` come from
    :func:`_dqk_diag_kernel` (``dqd``, ``dkd``); the rest, one product pair per later sub-chunk."""
    NK = (K + BK - 1) // BK
    i_t, i_k, i_h = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = i_k * BK + tl.arange(0, BK)
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    # offsets inside the sequence in int32 (the sequence's start in the scalar base pointers) unless
    # ROWS64: half the registers of the [BT, .] pointer tiles
    rows = t.to(tl.int64) if ROWS64 else t
    k, g, dk, dg, v = k + bos * H * K, g + bos * H * K, dk + bos * H * K, dg + bos * H * K, v + bos * H * V
    if HAS_Q:
        q, dq, dqd, dkd = q + bos * H * K, dq + bos * H * K, dqd + bos * H * K, dkd + bos * H * K
        do, dA = do + bos * H * V, dA + bos * H * BT
    states, dstates = states + (i_t.to(tl.int64) * H + i_h) * K * V, dstates + (i_t.to(tl.int64) * H + i_h) * K * V
    b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
    b_g = _gate(g, 0, rows, valid, Tn, i_h, ck, H, K, BT, 2, ANTI)
    b_c = tl.cumsum(b_g, 0)
    b_cl = tl.sum(b_g, 0)
    # state parts over columns BV at a time: dk_s = v dS'^T, dq_s = do S^T, <S, dS'> per row
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)
    b_SdS = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
        b_S = _tile(states, ck, ck < K, cv, V, V)  # the chunk's [K, V] state (the base pointers at it)
        b_dS = _tile(dstates, ck, ck < K, cv, V, V)
        b_dks += _dot_split(b_v, tl.trans(b_dS), False)
        b_SdS += tl.sum(b_S * b_dS, 1)
        if HAS_Q:
            b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
            b_dqs += _dot_split(b_do, tl.trans(b_S), False)
    b_dks *= tl.exp(b_cl[None, :] - b_c)
    # <dS', S'> with S' = diag(exp(c_L)) S + (k * exp(c_L - c))^T v: exp(c_L) <S, dS'> + sum_j k_j * dk_j
    # (the state part of dk), carried into the gate's gradient of every row of the chunk
    b_carry = tl.exp(b_cl) * b_SdS + tl.sum(b_k * b_dks, 0)
    # dk: the state part and the diagonal blocks', then the products between sub-chunks (no other accumulator live)
    b_dk = b_dks
    b_x = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_Q:
        b_dk += scale * _tile(dkd + i_h * K, rows, valid, ck, K, H * K)
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_dA = _scores_tile(dA, rows, valid, i_h, H, BT).to(dt)  # do v^T
        b_dq = scale * (b_dqs * tl.exp(b_c) + _tile(dqd + i_h * K, rows, valid, ck, K, H * K))
        for I in range(1, BT // SUB):  # a loop, not unrolled: one step's tiles live
            in_I, before_I, b_I = _boundary(b_c, I, SUB, BT)
            b_eq = tl.exp(tl.where(in_I, b_c - b_I[None, :], float("-inf")))
            b_ek = tl.exp(tl.where(before_I, b_I[None, :] - b_c, float("-inf")))
            b_dq += (scale * b_eq) * _dot(b_dA, (b_k * b_ek).to(dt))
            b_dk += (scale * b_ek) * _dot(tl.trans(b_dA), (b_q * b_eq).to(dt))
        _store(dq + i_h * K, b_dq, rows, valid, ck, K, H * K)
        b_x = b_q * b_dq
    _store(dk + i_h * K, b_dk, rows, valid, ck, K, H * K)
    b_x -= b_k * b_dk
    _store_gate_grad(dg, b_carry[None, :] + _suffix(b_x), rows, rows, valid, Tn, i_h, ck, H, K, 2, ANTI)


@triton.jit
def _dv_kernel(
    k, g, A, dstates, do, dv, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv of chunk ``i_t``, head ``i_h``, columns ``i_v``: ``(k * exp(c_L - c)) dS' + scale * A^T do``,
    ``A`` from :func:`_scores_kernel`."""
    NV = (V + BV - 1) // BV
    i_t, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    rows = bos + t
    cv = i_v * BV + tl.arange(0, BV)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if HAS_Q:
        b_A = _scores_tile(A, rows, valid, i_h, H, BT)
        b_dv += scale * _dot(tl.trans(b_A).to(dt), _tile(do + i_h * V, rows, valid, cv, V, H * V))
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K).to(tl.float32)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI)
        b_kd = b_k * tl.exp(tl.sum(b_g, 0)[None, :] - tl.cumsum(b_g, 0))
        b_dv += _dot(b_kd.to(dt), _state_tile(dstates, i_t, i_h, ck, cv, H, K, V).to(dt))
    _store(dv + i_h * V, b_dv, rows, valid, cv, V, H * V)


# ----------------------------------------------------------------------------- launchers


def _scores_dtype(k: Tensor, v: Tensor) -> torch.dtype:
    """The scores' storage: k's dtype when v's is the same (the outputs and dv read them only as
    operands in that dtype: stored rounded as they would be read, half the bytes), else float32."""
    return k.dtype if k.dtype == v.dtype else torch.float32


def scores(q: Tensor, k: Tensor, g: Tensor, chunks, anticausal: bool, BT: int, dtype=torch.float32) -> Tensor:
    """``_scores_kernel`` and ``_diag_kernel`` over every chunk: ``A [B, T, H, BT]`` in ``dtype``."""
    B, T, H, K = k.shape
    A = torch.empty(B, T, H, BT, dtype=dtype, device=k.device)
    varlen = chunks.cu_seqlens is not None
    _scores_kernel[(chunks.count, H)](
        q, k, g, A, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T,
        H=H, K=K, BT=BT, KB=min(KB, _pow2(K)), SUB=SUB, ANTI=anticausal,
        IS_VARLEN=varlen, ROWS64=B * T * H * max(K, BT) >= 2**31, num_warps=SCORES_WARPS, num_stages=SCORES_STAGES,
    )
    _diag_kernel[(chunks.count * (BT // SUB), H)](
        q, k, g, A, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T,
        H=H, K=K, BT=BT, SUB=SUB, KC=min(KC, _pow2(K)), ANTI=anticausal,
        IS_VARLEN=varlen, num_warps=DIAG_A_WARPS, num_stages=DIAG_A_STAGES,
    )
    return A


def outputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, states: Tensor, chunks, scale: float, anticausal: bool,
            BT: int) -> Tensor:
    """``o [B, T, H, V]`` in v's dtype: the scores, then ``_output_kernel`` over every chunk."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BV = min(_pow2(V), OUT_BV)
    A = scores(q, k, g, chunks, anticausal, BT, _scores_dtype(k, v))
    if gla_chunk.SAVE_STATES:  # kept with the chunks (ctx.chunks) for the backward, as the states are
        chunks.scores = A
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    _output_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        q, g, v, A, states, o, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, KB=min(KB, _pow2(K)), BV=BV, ANTI=anticausal,
        IS_VARLEN=chunks.cu_seqlens is not None, num_warps=OUT_WARPS, num_stages=OUT_STAGES,
    )
    return o


def backward(q, k, v, g, states, dstates, do, chunks, scale: float, anticausal: bool, BT: int):
    """dq (None without q), dk, dv and dg of every chunk from the states before and the state
    gradients after each chunk (the forward's scores, else computed again); dg in g's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BKF, BVF = _pow2(K), _pow2(V)
    BK, BV = min(BKF, DQK_BK), min(BVF, DV_BV)
    dq = torch.empty_like(q) if q is not None else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # every row of a causal pass stores its gate's gradient; the anticausal pass never reads the first gate
    dg = torch.zeros_like(g) if anticausal or chunks.cu_seqlens is not None else torch.empty_like(g)
    common = dict(H=H, K=K, V=V, BT=BT, HAS_Q=q is not None, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None)
    rows64 = B * T * H * max(K, V, BT) >= 2**31  # int64 row offsets inside a sequence
    dA = dqd = dkd = None
    if q is not None:
        dA = torch.empty(B, T, H, BT, dtype=k.dtype, device=k.device)
        dAd = torch.empty(B, T, H, SUB, dtype=torch.float32, device=k.device)
        _dA_kernel[(chunks.count, H)](
            v, do, dA, dAd, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T, H=H, V=V, BT=BT, BV=min(BVF, DA_BV), SUB=SUB,
            ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None, ROWS64=rows64, num_warps=DA_WARPS, num_stages=DA_STAGES,
        )
        dqd, dkd = (torch.empty(B, T, H, K, dtype=torch.float32, device=k.device) for _ in range(2))
        BKD = min(BKF, DIAG_BK)
        _dqk_diag_kernel[(chunks.count * (BT // SUB) * triton.cdiv(K, BKD), H)](
            q, k, g, dAd, dqd, dkd, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T, H=H, K=K, BT=BT,
            BK=BKD, SUB=SUB, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None,
            num_warps=DIAG_WARPS, num_stages=1,
        )
    _dqk_kernel[(chunks.count * triton.cdiv(K, BK), H)](
        q, k, v, g, states, dstates, do, dA, dqd, dkd, dq, dk, dg, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        BK=BK, BV=min(BVF, DQK_BV), SUB=SUB, ROWS64=rows64,
        num_warps=DQK_WARPS, num_stages=DQK_STAGES, **common,
    )
    A = getattr(chunks, "scores", None)
    if A is None and q is not None:
        A = scores(q, k, g, chunks, anticausal, BT, _scores_dtype(k, v))
    _dv_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        k, g, A, dstates, do, dv, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        KB=min(KB, BKF), BV=BV, num_warps=DV_WARPS, num_stages=DV_STAGES, **common,
    )
    return dq, dk, dv, dg
