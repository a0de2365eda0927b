"""Chunk-parallel kernels of :mod:`seqmix.kernels.gla_chunk` for a per-channel log gate ``g [B, T, H, K]``.

The state passes (``_states_kernel``, forward and reverse) are shared with the per-head gate; this
module holds what reads them. Forward: ``_scores_kernel`` writes the chunk's scores ``A [rows, H, BT]``
(in the inputs' dtype, as the products read it; kept for the backward with the states) and a flag
per chunk and head, ``_output_kernel`` reads them. Backward: ``_dqk_kernel`` dq, dk and dg (with
``dA = do v^T`` formed as it reads do and v), ``_dv_kernel`` dv.

A chunk of ``BT`` rows is cut into sub-chunks of ``SUB = 16``; ``c`` is the gate's cumsum from the
chunk start. Every sub-chunk ``I`` is referenced at its start ``b_I`` (the cumsum before its first
row), and the whole chunk takes one tensor-core product per sub-chunk, its rows and the rows up to
its end selected by masks::

    A += (q * exp(c - b_I) [rows of I]) (k * exp(b_I - c) [rows up to the end of I])^T    (then j <= i kept)

The queries' factor ``exp(c - b_I)`` is the cumsum inside ``I``: one exponential per element for every
sub-chunk at once; the keys' factor is one per sub-chunk, and ``b_I`` is read off a table of
sub-chunk totals (:func:`_sub_chunks`) instead of the chunk's cumsum.

Between sub-chunks every exponent is ``<= 0``. Inside ``I`` (the diagonal ``16 x 16`` blocks) the
keys' exponents ``b_I - c_j`` are ``>= 0``, up to the sub-chunk's decay span ``max_k (b_I - c_end)``:
the product is exact while that span is bounded (``SPAN_MAX``: ``e^40`` against the ``e^88`` of
fp32 / bf16; 0 for fp16, whose range is small). ``_scores_kernel`` flags each chunk and head where
some channel of some sub-chunk exceeds it; there the diagonal blocks are taken exactly instead, from
the three-dimensional decay ``E [i, j, k] = exp(c_ik - c_jk) [i sees j]`` (every exponent <= 0)::

    A_ij = sum_k q_ik k_jk E_ijk,   dq_ik = sum_j dA_ij k_jk E_ijk,   dk_jk = sum_i dA_ij q_ik E_ijk

by ``_diag_kernel`` (forward, over the clamped fast blocks) and ``_dqk_diag_kernel`` (backward, read
by ``_dqk_kernel``, which then keeps its products to the rows before each sub-chunk); both return at
once for unflagged chunks.
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
    _gate,
    _keep,
    _pow2,
    _sequence,
    _state_tile,
    _store_gate_grad,
    _suffix,
)

SUB = 16  # rows of a sub-chunk
# the largest decay span of a sub-chunk (max over channels of b_I - c at its end) for which its
# diagonal block is one tensor-core product: keys scaled by up to e^SPAN_MAX, queries by down to
# e^-SPAN_MAX (bf16 / fp32); fp16 inputs take the fast block only without decay (span 0)
SPAN_MAX = 40.0
KC = 32  # channels per step of the exact diagonal blocks of A (flagged chunks)
# channels per step of the scores and of the state reads of the outputs and dv (32: no spill on sm_90,
# but 13.25 ms fwd+bwd at 8K against 12.94 with 64; H100, 8924ddd, bench_channel.py --config against
# bench_kernels.py's default, one run)
KB = 64
SCORES_WARPS, SCORES_STAGES = 4, 1
OUT_BV, OUT_WARPS, OUT_STAGES = 128, 4, 1  # columns per output program
# channels per dq / dk / dg program (4 warps: illegal address on the H100, Triton 3.6) and columns per
# step of their reads of v, do and the states; at 8K, H100, 8924ddd: BK 32 15.4 ms fwd+bwd, BK = BV = 32
# 17.0 (no spill on sm_90) against 12.94 with 64 / 64 (424 B spill)
DQK_BK, DQK_WARPS, DQK_STAGES = 64, 8, 1
# columns per step of those reads, by input size: 16-bit 128 (H100, 189686f: 10.79 ms fwd+bwd at 8K
# against 11.13 with 64, the state products single since then), float32 64 (spill on sm_90: 952 B per
# thread, 2,328 B at 128)
DQK_BV = {2: 128, 4: 64}
DIAG_BK, DIAG_WARPS = 32, 4  # channels per step of the exact diagonal blocks of dq / dk (flagged chunks)
DIAG_A_WARPS, DIAG_A_STAGES = 4, 2  # programs of the exact diagonal blocks of A (flagged chunks)
DV_BV, DV_WARPS, DV_STAGES = 128, 4, 1  # columns per dv program


@triton.jit
def _rows_of(i_c, bos, Tn, BT: tl.constexpr, ANTI: tl.constexpr):
    """The rows of chunk ``i_c`` (of ``BT`` rows): their time indices ``t`` and which are real
    (:func:`_chunk_rows`), and a first row ``row0`` (int64: ``bos`` plus its time index) with int32
    steps ``dr`` from it (``-r`` when ``ANTI``): row ``r`` is ``row0 + dr[r]``."""
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    r = tl.arange(0, BT)
    if ANTI:
        row0 = bos + (Tn - 1 - i_c * BT)
        dr = -r
    else:
        row0 = bos + i_c * BT
        dr = r
    return t, valid, row0, dr


@triton.jit
def _at(p, row0, dr, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    """Pointers ``[len(dr), len(cols)]`` into head ``i_h`` of a ``[rows, H, D]`` tensor: a 64-bit
    scalar base and int32 offsets (no 64-bit tensors for the compiler to keep)."""
    return (p + (row0 * H + i_h) * D) + (dr[:, None] * (H * D) + cols[None, :])


@triton.jit
def _load(p, row0, dr, valid, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    """Tile of rows ``row0 + dr`` and columns ``cols`` of head ``i_h`` of a ``[rows, H, D]`` tensor; zeros outside."""
    return tl.load(_at(p, row0, dr, i_h, cols, H, D), mask=valid[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _put(p, x, row0, dr, valid, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    """Stores ``x`` in ``p``'s dtype where :func:`_load` reads."""
    tl.store(_at(p, row0, dr, i_h, cols, H, D), x.to(p.dtype.element_ty), mask=valid[:, None] & (cols < D)[None, :])


@triton.jit
def _decay3(c, SUB: tl.constexpr, ANTI: tl.constexpr):
    """``E [i, j, k] = exp(c_ik - c_jk)`` where row ``i`` sees row ``j``, else 0 (``c [SUB, BK]``)."""
    keep = _keep(SUB, ANTI)
    return tl.where(keep[:, :, None], tl.exp(tl.minimum(c[:, None, :] - c[None, :, :], 0.0)), 0.0)


@triton.jit
def _diag_scores(q, k, g, bos, t, row0, dr, valid, Tn, i_h, H: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr,
                 KC: tl.constexpr, ANTI: tl.constexpr):
    """``A [i, j] = sum_k q_ik k_jk exp(c_ik - c_jk)`` over every channel, ``i`` seeing ``j`` inside
    the sub-chunk of times ``t`` (rows ``row0 + dr``; else 0), ``KC`` channels at a time read from memory."""
    A = tl.zeros([SUB, SUB], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, KC)):
        ck = i_k * KC + tl.arange(0, KC)
        b_q = _load(q, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_k = _load(k, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_c = tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, SUB, 2, ANTI), 0)
        A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _decay3(b_c, SUB, ANTI), 2)
    return A


@triton.jit
def _sub_chunks(b_g, BT: tl.constexpr, SUB: tl.constexpr):
    """The chunk's log gates ``b_g [BT, BK]`` by sub-chunk: the cumsum inside each sub-chunk
    ``cl [NS, SUB, BK]`` (``NS = BT / SUB``), each sub-chunk's total ``tot [NS, BK]`` and the chunk's
    cumsum at its end ``e [NS, BK]``. The chunk's cumsum is ``c = e - tot + cl`` (row by row)."""
    g3 = tl.reshape(b_g, [BT // SUB, SUB, b_g.shape[1]])
    tot = tl.sum(g3, 1)
    return tl.cumsum(g3, 1), tot, tl.cumsum(tot, 0)


@triton.jit
def _by_rows(x, f):
    """``x [BT, BK]`` times ``f [NS, SUB, BK]`` (row ``I * SUB + i`` by ``f[I, i]``), ``[BT, BK]``."""
    return tl.reshape(tl.reshape(x, f.shape) * f, x.shape)


@triton.jit
def _sub_start(e, tot, I):
    """``b_I = e_I - tot_I [BK]``: the chunk's cumsum before sub-chunk ``I`` (:func:`_sub_chunks`)."""
    return tl.sum(tl.where(tl.arange(0, tot.shape[0])[:, None] == I, e - tot, 0.0), 0)


@triton.jit
def _scores_kernel(
    q, k, g, A, flags, chunk_first, chunk_seq, cu_seqlens, T, span_max,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr, SUB: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """``A [rows, H, BT]`` (A's dtype) of chunk ``i_t``, head ``i_h``: ``A [i, j]`` query ``i`` reading key
    ``j`` of the chunk, one product per sub-chunk ``I`` referenced at its start ``b_I``:
    ``(q * exp(c - b_I))`` over the rows of ``I`` times ``(k * exp(b_I - c))`` over the rows up to its
    end (channels ``KB`` at a time; ``c - b_I`` is the cumsum inside ``I``, :func:`_sub_chunks`). The
    keys' exponents inside ``I`` are clamped to ``span_max``; ``flags [i_t, i_h] = 1`` where that clamp
    was reached (the diagonal blocks are then wrong, and :func:`_diag_kernel` writes them), else 0."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    NS: tl.constexpr = BT // SUB
    t, valid, row0, dr = _rows_of(i_c, bos, Tn, BT, ANTI)
    sub = tl.arange(0, BT) // SUB
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_span = tl.zeros([KB], dtype=tl.float32)  # per channel, the largest sub-chunk decay span -tot
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        cl, tot, e = _sub_chunks(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI), BT, SUB)
        b_span = tl.maximum(b_span, tl.max(-tot, 0))
        b_c = tl.reshape(e[:, None, :] - tot[:, None, :] + cl, [BT, KB])
        b_q = _load(q, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_q = _by_rows(b_q, tl.exp(cl)).to(dt)  # q * exp(c - b_I)
        b_k = _load(k, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        for I in tl.static_range(0, NS):
            b_I = _sub_start(e, tot, I)
            b_ek = tl.exp(tl.where((sub <= I)[:, None], tl.minimum(b_I[None, :] - b_c, span_max), float("-inf")))
            b_A += _dot(tl.where((sub == I)[:, None], b_q, 0.0), tl.trans((b_k * b_ek).to(dt)))
    tl.store(flags + i_t * H + i_h, (tl.max(b_span, 0) > span_max).to(tl.int32))
    b_A = tl.where(_keep(BT, ANTI), b_A, 0.0)
    _put(A, b_A, row0, dr, valid, i_h, tl.arange(0, BT), H, BT)


@triton.jit
def _diag_kernel(
    q, k, g, A, flags, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, KC: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The diagonal blocks of chunk ``i_t``, head ``i_h`` in ``A`` (:func:`_diag_scores`), one
    sub-chunk after the other, where :func:`_scores_kernel` flagged the chunk; else nothing."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    if tl.load(flags + i_t * H + i_h) != 0:
        i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
        bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
        for m in range(BT // SUB):
            t, valid, row0, dr = _rows_of(i_c * (BT // SUB) + m, bos, Tn, SUB, ANTI)  # sub-chunk m of chunk i_c
            b_A = _diag_scores(q, k, g, bos, t, row0, dr, valid, Tn, i_h, H, K, SUB, KC, ANTI)
            _put(A, b_A, row0, dr, valid, i_h, m * SUB + tl.arange(0, SUB), H, BT)


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
    t, valid, row0, dr = _rows_of(i_c, bos, Tn, BT, ANTI)
    cv = i_v * BV + tl.arange(0, BV)
    b_o = _dot(_load(A, row0, dr, valid, i_h, tl.arange(0, BT), H, BT).to(dt), _load(v, row0, dr, valid, i_h, cv, H, V))
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        b_q = _load(q, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_c = tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI), 0)
        b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V).to(dt)
        b_o += _dot((b_q * tl.exp(b_c)).to(dt), b_S)
    _put(o, scale * b_o, row0, dr, valid, i_h, cv, H, V)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _dqk_diag_kernel(
    q, k, v, g, do, flags, dqd, dkd, chunk_first, chunk_seq, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The diagonal sub-chunk blocks' part of dq and dk / scale (fp32) of chunk ``i_t``, head
    ``i_h``, where :func:`_scores_kernel` flagged it (else nothing), one sub-chunk and ``BK``
    channels at a time: ``dA = do v^T`` inside the sub-chunk (``BV`` columns at a time, masked),
    ``dqd_ik = sum_j dA_ij k_jk E_ijk`` and ``dkd_jk = sum_i dA_ij q_ik E_ijk`` (:func:`_decay3`)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    if tl.load(flags + i_t * H + i_h) != 0:
        i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
        bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
        for m in range(BT // SUB):
            t, valid, row0, dr = _rows_of(i_c * (BT // SUB) + m, bos, Tn, SUB, ANTI)  # sub-chunk m of chunk i_c
            b_dA = tl.zeros([SUB, SUB], dtype=tl.float32)
            for i_v in range(tl.cdiv(V, BV)):
                cv = i_v * BV + tl.arange(0, BV)
                b_do = _load(do, row0, dr, valid, i_h, cv, H, V)
                b_dA += _dot(b_do, tl.trans(_load(v, row0, dr, valid, i_h, cv, H, V)))
            b_dA = tl.where(_keep(SUB, ANTI), b_dA, 0.0)
            for i_k in range(tl.cdiv(K, BK)):
                ck = i_k * BK + tl.arange(0, BK)
                b_q = _load(q, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
                b_k = _load(k, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
                b_E = _decay3(tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, SUB, 2, ANTI), 0), SUB, ANTI)
                _put(dqd, tl.sum(b_dA[:, :, None] * b_k[None, :, :] * b_E, 1), row0, dr, valid, i_h, ck, H, K)
                _put(dkd, tl.sum(b_dA[:, :, None] * b_q[:, None, :] * b_E, 0), row0, dr, valid, i_h, ck, H, K)


@triton.jit
def _dqk_kernel(
    q, k, v, g, states, dstates, do, flags, dqd, dkd, dq, dk, dg, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk and dg of chunk ``i_t``, head ``i_h``, channels ``i_k``::

        dq = scale * [(do S^T) * exp(c) + (dA * D) k],  dk = (v dS'^T) * exp(c_L - c) + scale * (dA * D)^T q
        dg = suffix sum of (q * dq - k * dk) + <dS', S'>

    with ``dA = do v^T``, ``D_ijk = exp(c_ik - c_jk) [j <= i]``, ``S`` / ``dS'`` the
    state before / the gradient of the state after the chunk. ``(dA * D)`` by one product pair per
    sub-chunk ``I`` referenced at its start, keys up to its end; in chunks flagged by
    :func:`_scores_kernel` keys before it only, the diagonal blocks from :func:`_dqk_diag_kernel`
    (``dqd``, ``dkd``)."""
    NK = (K + BK - 1) // BK
    i_t, i_k, i_h = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = i_k * BK + tl.arange(0, BK)
    t, valid, row0, dr = _rows_of(i_c, bos, Tn, BT, ANTI)
    rows = bos + t  # the gate's gradient
    NS: tl.constexpr = BT // SUB
    b_k = _load(k, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
    cl, tot, e = _sub_chunks(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI), BT, SUB)
    b_c = tl.reshape(e[:, None, :] - tot[:, None, :] + cl, [BT, BK])
    b_cl = tl.sum(tot, 0)
    # over columns BV at a time: the state parts dk_s = v dS'^T, dq_s = do S^T, <S, dS'> per row; dA = do v^T
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_SdS = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        b_v = _load(v, row0, dr, valid, i_h, cv, H, V)
        b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V)
        b_dS = _state_tile(dstates, i_t, i_h, ck, cv, H, K, V)
        b_dks += _dot(b_v, tl.trans(b_dS).to(dt))
        b_SdS += tl.sum(b_S * b_dS, 1)
        if HAS_Q:
            b_do = _load(do, row0, dr, valid, i_h, cv, H, V)
            b_dqs += _dot(b_do, tl.trans(b_S).to(dt))
            b_dA += _dot(b_do, tl.trans(b_v))
    b_dks *= tl.exp(b_cl[None, :] - b_c)
    # <dS', S'> with S' = diag(exp(c_L)) S + (k * exp(c_L - c))^T v: exp(c_L) <S, dS'> + sum_j k_j * dk_j
    # (the state part of dk), carried into the gate's gradient of every row of the chunk
    b_carry = tl.exp(b_cl) * b_SdS + tl.sum(b_k * b_dks, 0)
    b_x = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_Q:
        flag = tl.load(flags + i_t * H + i_h)  # flagged: the diagonal blocks come from dqd, dkd
        sub = tl.arange(0, BT) // SUB
        b_q = _load(q, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_qe = _by_rows(b_q, tl.exp(cl)).to(dt)  # q * exp(c - b_I)
        b_dA = tl.where(_keep(BT, ANTI), b_dA, 0.0).to(dt)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        for I in range(0, NS):  # a loop: unrolled, the compiler keeps every step's tiles (spill)
            b_I = _sub_start(e, tot, I)
            keys = (sub < I) | ((sub == I) & (flag == 0))  # flagged: the keys before I
            b_ek = tl.exp(tl.where(keys[:, None], b_I[None, :] - b_c, float("-inf")))
            b_dq += tl.where((sub == I)[:, None], _dot(b_dA, (b_k * b_ek).to(dt)), 0.0)
            b_dk += b_ek * _dot(tl.trans(b_dA), tl.where((sub == I)[:, None], b_qe, 0.0))
        b_dq = _by_rows(b_dq, tl.exp(cl))
        flagged = valid & (tl.zeros([BT], dtype=tl.int32) + flag != 0)
        b_dq = scale * (b_dqs * tl.exp(b_c) + b_dq + _load(dqd, row0, dr, flagged, i_h, ck, H, K))
        b_dk += _load(dkd, row0, dr, flagged, i_h, ck, H, K)
        _put(dq, b_dq, row0, dr, valid, i_h, ck, H, K)
        b_x = b_q * b_dq
    b_dk = b_dks + scale * b_dk
    _put(dk, b_dk, row0, dr, valid, i_h, ck, H, K)
    b_x -= b_k * b_dk
    _store_gate_grad(dg, b_carry[None, :] + _suffix(b_x), rows, t, valid, Tn, i_h, ck, H, K, 2, ANTI)


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
    t, valid, row0, dr = _rows_of(i_c, bos, Tn, BT, ANTI)
    cv = i_v * BV + tl.arange(0, BV)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if HAS_Q:
        b_A = _load(A, row0, dr, valid, i_h, tl.arange(0, BT), H, BT)
        b_dv += scale * _dot(tl.trans(b_A).to(dt), _load(do, row0, dr, valid, i_h, cv, H, V))
    for i_k in range(tl.cdiv(K, KB)):
        ck = i_k * KB + tl.arange(0, KB)
        b_k = _load(k, row0, dr, valid, i_h, ck, H, K).to(tl.float32)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, 2, ANTI)
        b_kd = b_k * tl.exp(tl.sum(b_g, 0)[None, :] - tl.cumsum(b_g, 0))
        b_dv += _dot(b_kd.to(dt), _state_tile(dstates, i_t, i_h, ck, cv, H, K, V).to(dt))
    _put(dv, b_dv, row0, dr, valid, i_h, cv, H, V)


# ----------------------------------------------------------------------------- launchers


def scores(q: Tensor, k: Tensor, g: Tensor, chunks, anticausal: bool, BT: int) -> tuple[Tensor, Tensor]:
    """``_scores_kernel`` over every chunk, then ``_diag_kernel`` (exact diagonal blocks where flagged):
    ``A [B, T, H, BT]`` in k's dtype (the products read it so) and the flags ``[chunks, H]`` (int32)."""
    B, T, H, K = k.shape
    A = torch.empty(B, T, H, BT, dtype=k.dtype, device=k.device)
    flags = torch.empty(chunks.count, H, dtype=torch.int32, device=k.device)
    varlen = chunks.cu_seqlens is not None
    span_max = 0.0 if k.dtype == torch.float16 else SPAN_MAX
    _scores_kernel[(chunks.count, H)](
        q, k, g, A, flags, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T, span_max,
        H=H, K=K, BT=BT, KB=min(KB, _pow2(K)), SUB=SUB, ANTI=anticausal,
        IS_VARLEN=varlen, num_warps=SCORES_WARPS, num_stages=SCORES_STAGES,
    )
    _diag_kernel[(chunks.count, H)](
        q, k, g, A, flags, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T,
        H=H, K=K, BT=BT, SUB=SUB, KC=min(KC, _pow2(K)), ANTI=anticausal,
        IS_VARLEN=varlen, num_warps=DIAG_A_WARPS, num_stages=DIAG_A_STAGES,
    )
    return A, flags


def outputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, states: Tensor, chunks, scale: float, anticausal: bool,
            BT: int) -> Tensor:
    """``o [B, T, H, V]`` in v's dtype: the scores, then ``_output_kernel`` over every chunk."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BV = min(_pow2(V), OUT_BV)
    A, flags = scores(q, k, g, chunks, anticausal, BT)
    if gla_chunk.SAVE_STATES:  # kept with the chunks (ctx.chunks) for the backward, as the states are
        chunks.scores = A, flags
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    _output_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        q, g, v, A, states, o, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, KB=min(KB, _pow2(K)), BV=BV, ANTI=anticausal,
        IS_VARLEN=chunks.cu_seqlens is not None, num_warps=OUT_WARPS, num_stages=OUT_STAGES,
    )
    return o


def backward(q, k, v, g, states, dstates, do, chunks, scale: float, anticausal: bool, BT: int):
    """dq (None without q), dk, dv and dg of every chunk from the states before and the state
    gradients after each chunk (the forward's scores and flags, else computed again); dg in g's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BKF, BVF = _pow2(K), _pow2(V)
    BK, BV = min(BKF, DQK_BK), min(BVF, DV_BV)
    BVQ = min(BVF, DQK_BV[k.element_size()])
    dq = torch.empty_like(q) if q is not None else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # every row of a causal pass stores its gate's gradient; the anticausal pass never reads the first gate
    dg = torch.zeros_like(g) if anticausal or chunks.cu_seqlens is not None else torch.empty_like(g)
    common = dict(H=H, K=K, V=V, BT=BT, HAS_Q=q is not None, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None)
    A = flags = dqd = dkd = None
    if q is not None:
        A, flags = getattr(chunks, "scores", None) or scores(q, k, g, chunks, anticausal, BT)
        # written (and read) only in flagged chunks
        dqd, dkd = (torch.empty(B, T, H, K, dtype=torch.float32, device=k.device) for _ in range(2))
        _dqk_diag_kernel[(chunks.count, H)](
            q, k, v, g, do, flags, dqd, dkd, chunks.first, chunks.seq, chunks.cu_seqlens, chunks.T, H=H, K=K, V=V,
            BT=BT, BK=min(BKF, DIAG_BK), BV=BVQ, SUB=SUB, ANTI=anticausal,
            IS_VARLEN=chunks.cu_seqlens is not None, num_warps=DIAG_WARPS, num_stages=1,
        )
    _dqk_kernel[(chunks.count * triton.cdiv(K, BK), H)](
        q, k, v, g, states, dstates, do, flags, dqd, dkd, dq, dk, dg, chunks.first, chunks.seq, chunks.cu_seqlens,
        scale, chunks.T, BK=BK, BV=BVQ, SUB=SUB, num_warps=DQK_WARPS, num_stages=DQK_STAGES, **common,
    )
    _dv_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        k, g, A, dstates, do, dv, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        KB=min(KB, BKF), BV=BV, num_warps=DV_WARPS, num_stages=DV_STAGES, **common,
    )
    return dq, dk, dv, dg
