"""Chunked gated linear attention in Triton: forward and backward; gate per head, per channel, or none.

Per sequence and head, with ``q, k [T, K]``, ``v [T, V]``, a log gate ``g <= 0`` of shape ``[T]``
(per head), ``[T, K]`` (per channel) or absent (zero), and a float32 state ``S [K, V]``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * q_t^T S_t       (S_0 = initial state)

``anticausal=True`` computes instead the exclusive backward pass of the noncausal self pattern,
``o_i = scale * sum_{j > i} (q_i * exp(g_{i+1} + ... + g_j)) . k_j  v_j``, with no state in or out:
the same recurrence run from the end, exclusive of each token, reading ``g`` shifted by one.

Algorithm. Time is cut into chunks of ``BT`` tokens; ``c`` is the gate's cumsum inside the chunk
and ``c_L`` its total. Every exponent below is ``<= 0``::

    o  = scale * [ (q * exp(c)) S  +  A v ],    A_ij = sum_k q_ik k_jk exp(c_ik - c_jk) [j <= i]
    S' = diag(exp(c_L)) S + (k * exp(c_L - c))^T v

``A`` is ``(q k^T) * exp(c_i - c_j)`` for a per-head gate; for a per-channel gate it is built from
sub-chunks of 16 (:mod:`seqmix.kernels.gla_channel`). Two forms share these formulas:

- the walks (gate per head or none): one program per sequence, head and block of state columns
  walks the chunks in order, keeping ``S`` in registers (no state goes to memory). The backward
  runs three kinds of programs (in one launch, or one each: ``BWD_APART``): ``dq`` walks
  forward recomputing ``S`` (a block of its rows); ``dk`` and
  ``dv`` walk backward carrying ``dS`` (a block of its rows, resp. columns)::

    dS <- diag(exp(c_L)) dS + scale * (q * exp(c))^T do            (dS at the end = grad of final state)
    dq  = scale * [ (do S^T) * exp(c) + sum_j (do_i . v_j) k_j exp(c_i - c_j) [j <= i] ]
    dk  = (v dS^T) * exp(c_L - c) + scale * sum_i (do_i . v_j) q_i exp(c_i - c_j) [j <= i]
    dv  = (k * exp(c_L - c)) dS + scale * A^T do

  Causal walks with few sequences x heads (``SEGMENT_BELOW``) run per segment of a sequence, each
  segment a sequence of its own with an initial state and a final-state gradient: the state at every
  segment's start comes from the segments' own final states from zero (one pass over all segments
  at once, no per-chunk states) chained per sequence, ``S_start[s + 1] = exp(G_s) S_start[s] +
  local[s]``; the state gradient at every segment's end likewise, backward, from the queries' share
  of each segment. dq, dk, dv are then exact per segment and the gate's gradient is summed over
  whole sequences.

- the chunk-parallel form, for per-channel gates and when sequences x heads are too few to fill
  the GPU (``TARGET_PROGRAMS``; causal walks with a gate per head or none take segments first):
  one pass per sequence walks only the inter-chunk recurrence and writes the state before every
  chunk (``[chunks, H, K, V]``, bf16 for bf16 inputs, else float32); then one program per chunk,
  head and block of columns computes its outputs. The backward likewise: one reverse pass writes the
  gradient of the state after every chunk, then every chunk computes dq, dk, dv and dg at once.

The gate's gradient follows from the cumulative gate ``G``: outputs depend on it through
``exp(G_i - G_j)``, so ``dL/dG_t = q_t * dq_t - k_t * dk_t`` (summed over channels for a per-head
gate; ``+ <dS_T, S_T>`` at the last token), and ``dg`` is its suffix sum. The walks sum over whole
sequences (an exclusive prefix sum for the anticausal pass), so the state reads and updates that
feed it keep about 16 bits: a float32 operand of a bf16/fp16 product is split into a high and a low
part (float32 inputs use ``tf32x3``); without a gate the walks take one product in the inputs'
dtype. The chunk-parallel form sums only inside each chunk: the rest of the suffix is
``<dS', S'>``, the gradient of the state after the chunk with that state (summed over columns; from
the chunk's own state and keys, see :func:`_chunk_term`), so rounding errors do not add up along the
sequence and its state products are single products in the inputs' dtype too (a float64 replay of
the per-channel backward, every state product rounded to bf16: dg within 1.1e-3 at T = 1,000 and
4,000).

Layout ``[B, T, H, D]`` as the ops; ``cu_seqlens [N + 1]`` packs ``N`` sequences into ``B = 1``.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from seqmix.kernels.shared_state import _dot

# Launch shapes. The chunk length is the op's chunk_size (16 for per-channel gates).
FWD_BV = 64  # state columns per forward walk
BWD_BK = 64  # state rows per dq / dk walk
BWD_BV = 64  # state columns per dv walk
FWD_WARPS, FWD_STAGES = 4, 3
BWD_WARPS, BWD_STAGES = 4, 2
# the backward walks' roles (dq, dk, dv, in this order) in groups, one launch per group: a launch
# compiles only its roles and holds only their registers. With a per-head gate and sequences x heads
# in BWD_APART each role runs apart: 3.07 against 3.39 ms fwd+bwd at 8K (128), 3.07 against 3.15 at
# 4K (256); all in one launch is faster at 2K (512: 2.97 against 3.07) and 1K, in the walks per
# segment (16K, 32K), at 32 (the walks forced at 32K: 5.58 against 10.1; three launches of few
# programs each) and without a gate (2.15 against 2.21 at 8K) (H100, bf16, H = 16, D = 128;
# benchmarks/kernels.md, sixth session)
BWD_GROUPS_FUSED = (("dq", "dk", "dv"),)
BWD_GROUPS_APART = (("dq",), ("dk",), ("dv",))
BWD_APART = (128, 256)
# sequences x heads below which the chunk-parallel form replaces the walks, by measurement (H100,
# Triton 3.6, bf16, H = 16, D = 128, 65,536 tokens, fwd+bwd; benchmarks/kernels.md, v4): walks
# 3.65 / 4.23 / 7.35 ms at T = 2K / 8K / 32K (64 / 16 / 2 sequences), chunk-parallel 8.02 / 7.99 /
# 9.41 ms. The walks' time grows with T / (sequences x heads); the chunk-parallel form's does not.
TARGET_PROGRAMS = 32
# causal walks (gate per head or none) with sequences x heads below SEGMENT_BELOW cut each sequence
# into segments of at least SEGMENT_MIN tokens, aiming at SEGMENT_PROGRAMS segments x heads: the
# state at every segment's start (and the state gradient at its end) comes from one pass over the
# segments in parallel (_states_kernel, no per-chunk states) and a chain over the segments
# (_chain_kernel); then the walks run per segment. Replaces the chunk-parallel form there.
SEGMENT_BELOW = 128
SEGMENT_PROGRAMS = 512
SEGMENT_MIN = 2048
# the segments' state passes (_states_kernel, no outputs): rows per step, (state rows = columns,
# warps) per program, stages. Measured at 32K (H100, fwd+bwd): 128 rows per step slower than 64
# (1.33 ms against 1.21 for both passes); tiles of 64 with 4 warps 4.51 ms against 5.05 with 8
# (two programs per multiprocessor: 182 / 240 registers, no spill), 32 with 4 warps 5.58
SEGMENT_STATE_BT = 64
SEGMENT_STATE_TILE = (64, 4)
SEGMENT_STATE_STAGES = 2
GATE_GRAD_BT = 2048  # rows per step of the gate gradient's suffix sum
# chunk-parallel kernels: 8 warps, as with 4 every one of them spills (sm_90, bf16, D = 128)
# (state rows = columns, warps) per program of the inter-chunk passes: the largest tile of
# STATE_TILES that still gives STATE_MIN_PROGRAMS programs (these passes are sequential over the
# chunks, so with few sequences x heads they are latency-bound), else the smallest. H100, d94c93b,
# per channel fwd+bwd at 2K / 8K / 32K: 8.56 / 8.61 / 9.16 ms against 9.21 / 9.27 / 10.45 with
# ((64, 8), (32, 4)) and 512 (32K took 32 x 32 tiles, 512 programs); per head (chunk-parallel)
# 5.33 / 5.30 / 6.20 against 5.45 / 5.58 / 6.10 (state_tiles_d94c93b.log)
STATE_TILES = ((64, 4), (32, 4))
STATE_MIN_PROGRAMS = 128
# software-pipeline stages of those passes by input size: 16-bit 3 (H100, 189686f: per channel 10.66
# against 10.79 ms at 8K), float32 2 (3 would need 320 KB of shared memory at chunks of 128)
STATE_STAGES = {2: 3, 4: 2}
OUT_BV = 64  # columns per output program
PAR_BK, PAR_BV = 64, 64  # state rows per dq / dk program, columns per dv program (and step of their loops)
PAR_WARPS, PAR_STAGES = 8, 2
# the chunk-parallel forward keeps its states (bf16 for bf16 inputs, else float32) for the backward;
# False recomputes them there (one more state pass)
SAVE_STATES = True


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sequence(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """First row (int64) and length of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        Tn = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        Tn = T
    return bos, Tn


@triton.jit
def _chunk_rows(i_c, Tn, BT: tl.constexpr, ANTI: tl.constexpr):
    """Time indices of the chunk's rows (reversed when ``ANTI``) and which rows are real."""
    s = i_c * BT + tl.arange(0, BT)
    if ANTI:
        t = Tn - 1 - s
    else:
        t = s
    return t, s < Tn


@triton.jit
def _tile(p, rows, valid, cols, D: tl.constexpr, stride):
    """``[len(rows), len(cols)]`` tile of a ``[rows, D]`` view with row stride ``stride``; zeros outside."""
    return tl.load(p + rows[:, None] * stride + cols[None, :], mask=valid[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _store(p, x, rows, valid, cols, D: tl.constexpr, stride):
    tl.store(p + rows[:, None] * stride + cols[None, :], x.to(p.dtype.element_ty), mask=valid[:, None] & (cols < D)[None, :])


@triton.jit
def _gate(g, bos, t, valid, Tn, i_h, cols, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
          GATE: tl.constexpr, ANTI: tl.constexpr):
    """The chunk's log gates in fp32: ``[BT]`` (none: zeros; per head) or ``[BT, len(cols)]`` (per
    channel). The anticausal pass reads ``g_{t+1}`` (0 past the end)."""
    if ANTI:
        m = valid & (t + 1 < Tn)
        r = bos + t + 1
    else:
        m = valid
        r = bos + t
    if GATE == 0:
        b_g = tl.zeros([BT], dtype=tl.float32)
    elif GATE == 1:
        b_g = tl.load(g + r * H + i_h, mask=m, other=0.0).to(tl.float32)
    else:
        b_g = _tile(g + i_h * K, r, m, cols, K, H * K).to(tl.float32)
    return b_g


@triton.jit
def _rows_times(x, e, GATE: tl.constexpr):
    """``x * e`` with ``e`` per row ``[BT]`` (none, per head) or elementwise (per channel)."""
    if GATE == 2:
        out = x * e
    else:
        out = x * e[:, None]
    return out


@triton.jit
def _to_end(c, cl, GATE: tl.constexpr):
    """``c_L - c``: the gates after each row, to the chunk's end."""
    if GATE == 2:
        out = cl[None, :] - c
    else:
        out = cl - c
    return out


@triton.jit
def _decayed(S, cl, GATE: tl.constexpr):
    """``diag(exp(c_L)) S`` for a state with its K rows first."""
    if GATE == 2:
        out = S * tl.exp(cl)[:, None]
    else:
        out = S * tl.exp(cl)
    return out


@triton.jit
def _dot_split(a, b, SPLIT_A: tl.constexpr, KEEP: tl.constexpr):
    """``a @ b`` where one operand (``a`` if ``SPLIT_A``) is float32 and the other is exact in its
    dtype. ``KEEP`` (products that feed a gate's gradient): the float32 one is kept to about 16 bits
    as a high and a low part of the other's dtype; else it is rounded to that dtype (one product).
    A float32 pair is one ``tf32x3`` product either way."""
    if SPLIT_A:
        if b.dtype == tl.float32:
            out = tl.dot(a, b, input_precision="tf32x3")
        elif KEEP:
            hi = a.to(b.dtype)
            out = tl.dot(hi, b) + tl.dot((a - hi.to(tl.float32)).to(b.dtype), b)
        else:
            out = tl.dot(a.to(b.dtype), b)
    else:
        if a.dtype == tl.float32:
            out = tl.dot(a, b, input_precision="tf32x3")
        elif KEEP:
            hi = b.to(a.dtype)
            out = tl.dot(a, hi) + tl.dot(a, (b - hi.to(tl.float32)).to(a.dtype))
        else:
            out = tl.dot(a, b.to(a.dtype))
    return out


@triton.jit
def _sees(i, j, ANTI: tl.constexpr):
    """Query row ``i`` sees key row ``j`` (``j <= i``; ``j < i`` if ``ANTI``), broadcast."""
    if ANTI:
        out = i > j
    else:
        out = i >= j
    return out


@triton.jit
def _keep(BT: tl.constexpr, ANTI: tl.constexpr):
    """``[i, j]``: query row ``i`` sees key row ``j``."""
    r = tl.arange(0, BT)
    return _sees(r[:, None], r[None, :], ANTI)


@triton.jit
def _head_decay(c, BT: tl.constexpr, ANTI: tl.constexpr):
    """``[i, j]``: ``exp(c_i - c_j)`` where ``i`` sees ``j``, else 0."""
    return tl.exp(tl.where(_keep(BT, ANTI), c[:, None] - c[None, :], float("-inf")))


@triton.jit
def _head_decay_t(c, BT: tl.constexpr, ANTI: tl.constexpr):
    """``[j, i]``: ``exp(c_i - c_j)`` where ``i`` sees ``j``, else 0 (:func:`_head_decay` transposed)."""
    r = tl.arange(0, BT)
    return tl.exp(tl.where(_sees(r[None, :], r[:, None], ANTI), c[None, :] - c[:, None], float("-inf")))


@triton.jit
def _scores(q, k, c, BT: tl.constexpr, ANTI: tl.constexpr):
    """``A [i, j]``: query ``i`` reading key ``j`` inside the chunk, with its decay (gate per head or none)."""
    return _dot(q, tl.trans(k)) * _head_decay(c, BT, ANTI)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q, k, v, g, h0, o, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr, SPLIT: tl.constexpr,
):
    """``o`` for state columns ``i_v`` of one sequence and head, walking its chunks; its final state.
    ``SPLIT``: the state update keeps about 16 bits of ``k * exp(c_L - c)`` (hi/lo parts), for a
    final state that the gate's gradient reads (``<dS_T, S_T>``); else one product in the inputs'
    dtype (the outputs read the state in that dtype anyway)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    dt = k.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    state_offs = i_nh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S += tl.load(h0 + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    for i_c in range(tl.cdiv(Tn, BT)):
        t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
        rows = bos + t
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
        b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        if HAS_Q:
            b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
            b_A = _scores(b_q, b_k, b_c, BT, ANTI)
            b_o = _dot(_rows_times(b_q, tl.exp(b_c), GATE).to(dt), b_S.to(dt)) + _dot(b_A.to(dt), b_v)
            _store(o + i_h * V, scale * b_o, rows, valid, cv, V, H * V)
        b_kd = _rows_times(b_k, tl.exp(_to_end(b_c, b_cl, GATE)), GATE)
        b_S = _decayed(b_S, b_cl, GATE) + _dot_split(tl.trans(b_kd), b_v, True, SPLIT)
    if STORE_HT:
        tl.store(ht + state_offs, b_S, mask=state_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq(
    q, k, v, g, h0, do, dq, dG, scale, bos, Tn, i_nh, i_h, i_k, TG,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, ANTI: tl.constexpr,
):
    """dq for state rows ``i_k``, walking forward and recomputing the state; ``q * dq`` into dG."""
    dt = k.dtype.element_ty
    ck = i_k * BK + tl.arange(0, BK)
    cv = tl.arange(0, BV)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state_offs = i_nh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
        b_S += tl.load(h0 + state_offs, mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(tl.float32)
    for i_c in range(tl.cdiv(Tn, BT)):
        t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
        rows = bos + t
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
        b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
        b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        b_dq = _rows_times(_dot_split(b_do, tl.trans(b_S), False, GATE > 0), tl.exp(b_c), GATE)
        b_dA = _dot(b_do, tl.trans(b_v)) * _head_decay(b_c, BT, ANTI)
        b_dq += _dot(b_dA.to(dt), b_k)
        b_dq *= scale
        _store(dq + i_h * K, b_dq, rows, valid, ck, K, H * K)
        if GATE:  # q read here, where it is used: fewer tiles live across the products (less spill)
            b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
            tl.store(dG + i_k * TG + i_h * (TG // H) + rows, tl.sum(b_q.to(tl.float32) * b_dq, 1), mask=valid)
        b_kd = _rows_times(b_k, tl.exp(_to_end(b_c, b_cl, GATE)), GATE)
        b_S = _decayed(b_S, b_cl, GATE) + _dot_split(tl.trans(b_kd), b_v, True, GATE > 0)


@triton.jit
def _bwd_dk(
    q, k, v, g, do, dht, dk, dh0, dG, scale, bos, Tn, i_nh, i_h, i_k, slot, TG,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, ANTI: tl.constexpr,
):
    """dk for state rows ``i_k``, walking backward with ``dS``; ``-k * dk`` into dG; dh0 rows. dk is
    formed transposed, ``dk^T = dS v^T + scale * q^T dA``, so that ``dS`` (registers) is a product's
    first operand and not copied to shared memory as its second."""
    dt = k.dtype.element_ty
    ck = i_k * BK + tl.arange(0, BK)
    cv = tl.arange(0, BV)
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    state_offs = i_nh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS += tl.load(dht + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    NT = tl.cdiv(Tn, BT)
    for i in range(NT):
        t, valid = _chunk_rows(NT - 1 - i, Tn, BT, ANTI)
        rows = bos + t
        b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        b_dkt = _dot_split(b_dS, tl.trans(b_v), True, GATE > 0) * tl.exp(_to_end(b_c, b_cl, GATE))[None, :]
        b_dS = _decayed(b_dS, b_cl, GATE)
        if HAS_Q:
            b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
            b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
            b_dA = _dot(b_do, tl.trans(b_v)) * _head_decay(b_c, BT, ANTI)
            b_dkt += scale * _dot(tl.trans(b_q), b_dA.to(dt))
            b_qd = _rows_times(scale * b_q.to(tl.float32), tl.exp(b_c), GATE)
            b_dS += _dot_split(tl.trans(b_qd), b_do, True, GATE > 0)
        b_dk = tl.trans(b_dkt)
        _store(dk + i_h * K, b_dk, rows, valid, ck, K, H * K)
        if GATE:  # k read here, where it is used: fewer tiles live across the products (less spill)
            b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
            tl.store(dG + slot * TG + i_h * (TG // H) + rows, -tl.sum(b_k.to(tl.float32) * b_dk, 1), mask=valid)
    if STORE_DH0:
        tl.store(dh0 + state_offs, b_dS, mask=state_mask)


@triton.jit
def _bwd_dv(
    q, k, g, do, dht, dv, scale, bos, Tn, i_nh, i_h, i_v,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, ANTI: tl.constexpr,
):
    """dv for state columns ``i_v``, walking backward with ``dS``. The gates multiply the products'
    rows (``dv``) or their per-row operand ``do`` instead of k and q, and the scores are formed
    transposed, so that k and q feed the products straight from shared memory."""
    dt = k.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        state_offs = i_nh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
        b_dS += tl.load(dht + state_offs, mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(tl.float32)
    NT = tl.cdiv(Tn, BT)
    for i in range(NT):
        t, valid = _chunk_rows(NT - 1 - i, Tn, BT, ANTI)
        rows = bos + t
        b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        # the scores first (q, k), then the products into dv and dS, each operand cast to the
        # inputs' dtype where it is made: fewer float32 tiles live at once (less spill)
        if HAS_Q:
            b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
            b_At = (_dot(b_k, tl.trans(b_q)) * _head_decay_t(b_c, BT, ANTI)).to(dt)
        b_dv = _dot(b_k, b_dS.to(dt)) * tl.exp(_to_end(b_c, b_cl, GATE))[:, None]
        b_dS = _decayed(b_dS, b_cl, GATE)
        if HAS_Q:
            b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
            b_dv += scale * _dot(b_At, b_do)
            b_dS += _dot(tl.trans(b_q), (b_do.to(tl.float32) * (scale * tl.exp(b_c))[:, None]).to(dt))
        _store(dv + i_h * V, b_dv, rows, valid, cv, V, H * V)


@triton.jit
def _bwd_kernel(
    q, k, v, g, h0, do, dht, dq, dk, dv, dh0, dG, cu_seqlens, scale, T, TG, ROLE0,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BKF: tl.constexpr, BVF: tl.constexpr, BKS: tl.constexpr, BVS: tl.constexpr, NK: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr, DQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
):
    """Role ``ROLE0 + program_id(0)``: roles ``[0, NK)`` compute dq (only with queries), the next
    ``NK`` dk, the rest dv; ``DQ``, ``DK``, ``DV``: which of them this launch compiles. The dG slot
    of a dk program is its role."""
    role, i_nh = ROLE0 + tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    if HAS_Q:
        if role < NK:
            if DQ:
                _bwd_dq(q, k, v, g, h0, do, dq, dG, scale, bos, Tn, i_nh, i_h, role, TG,
                        H, K, V, BT, BKS, BVF, GATE, HAS_H0, ANTI)
        elif role < 2 * NK:
            if DK:
                _bwd_dk(q, k, v, g, do, dht, dk, dh0, dG, scale, bos, Tn, i_nh, i_h, role - NK, role, TG,
                        H, K, V, BT, BKS, BVF, GATE, HAS_Q, HAS_DHT, STORE_DH0, ANTI)
        else:
            if DV:
                _bwd_dv(q, k, g, do, dht, dv, scale, bos, Tn, i_nh, i_h, role - 2 * NK,
                        H, K, V, BT, BKF, BVS, GATE, HAS_Q, HAS_DHT, ANTI)
    else:
        if role < NK:
            if DK:
                _bwd_dk(q, k, v, g, do, dht, dk, dh0, dG, scale, bos, Tn, i_nh, i_h, role, role, TG,
                        H, K, V, BT, BKS, BVF, GATE, HAS_Q, HAS_DHT, STORE_DH0, ANTI)
        else:
            if DV:
                _bwd_dv(q, k, g, do, dht, dv, scale, bos, Tn, i_nh, i_h, role - NK,
                        H, K, V, BT, BKF, BVS, GATE, HAS_Q, HAS_DHT, ANTI)


@triton.jit
def _gate_grad_kernel(
    dG, dlast, dg, cu_seqlens, T, TG,
    NP: tl.constexpr, H: tl.constexpr, BT: tl.constexpr, HAS_LAST: tl.constexpr, ANTI: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """``dg [rows, H]`` from the ``NP`` slots of ``dL/dG`` (``dG [NP, H, rows]``): a suffix sum per
    sequence (an exclusive prefix sum for the anticausal pass), ``dlast [N, H]`` added at the last token."""
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    carry = tl.zeros([1], dtype=tl.float32)
    NT = tl.cdiv(Tn, BT)
    for i in range(NT):
        if ANTI:
            i_c = i
        else:
            i_c = NT - 1 - i
        t = i_c * BT + tl.arange(0, BT)
        valid = t < Tn
        rows = bos + t
        x = tl.zeros([BT], dtype=tl.float32)
        for p in tl.static_range(NP):
            x += tl.load(dG + p * TG + i_h * (TG // H) + rows, mask=valid, other=0.0)
        if HAS_LAST:
            x += tl.where(t == Tn - 1, tl.load(dlast + i_nh), 0.0)
        if ANTI:
            y = carry + tl.cumsum(x, 0) - x
        else:
            y = carry + _suffix(x)
        carry += tl.sum(x, 0)
        tl.store(dg + rows * H + i_h, y, mask=valid)


@triton.jit
def _chain_kernel(
    local, gs, s0, start, final, seg_first,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Chains the segments of sequence ``i_n`` (rows ``i_k``, columns ``i_v`` of the state): ``S = s0[n]``
    (or 0); over its segments (last first if ``REVERSE``) ``start[seg] = S``, then ``S <- exp(gs[seg]) S
    + local[seg]`` (``gs [segments, H]`` the segment's gate sum); ``final[n] = S``."""
    NK = (K + BK - 1) // BK
    NV = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_nh, i_k, i_v = pid // (NK * NV), pid // NV % NK, pid % NV
    i_n, i_h = i_nh // H, i_nh % H
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mask = (ck < K)[:, None] & (cv < V)[None, :]
    offs = i_h * K * V + ck[:, None] * V + cv[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        b_S += tl.load(s0 + i_n.to(tl.int64) * H * K * V + offs, mask=mask, other=0.0).to(tl.float32)
    first = tl.load(seg_first + i_n)
    count = tl.load(seg_first + i_n + 1) - first
    for i in range(count):
        if REVERSE:
            seg = first + count - 1 - i
        else:
            seg = first + i
        p = seg.to(tl.int64) * H * K * V + offs
        tl.store(start + p, b_S, mask=mask)
        if GATE != 0:
            b_S = b_S * tl.exp(tl.load(gs + seg.to(tl.int64) * H + i_h))
        if HAS_LOCAL:
            b_S += tl.load(local + p, mask=mask, other=0.0)
    if STORE_FINAL:
        tl.store(final + i_n.to(tl.int64) * H * K * V + offs, b_S, mask=mask)


# ----------------------------------------------------------------------------- chunk-parallel form


@triton.jit
def _chunk_of(i_t, chunk_first, chunk_seq):
    """Sequence ``i_n`` of global chunk ``i_t`` and its index ``i_c`` in that sequence."""
    i_n = tl.load(chunk_seq + i_t)
    return i_n, i_t - tl.load(chunk_first + i_n)


@triton.jit
def _state_tile(p, i_t, i_h, rows, cols, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Rows ``rows`` and columns ``cols`` of the state ``p[i_t, i_h]`` of a ``[C, H, K, V]`` tensor, as
    float32 (64-bit base, int32 offsets)."""
    base = p + (i_t.to(tl.int64) * H + i_h) * (K * V)
    mask = (rows < K)[:, None] & (cols < V)[None, :]
    return tl.load(base + (rows[:, None] * V + cols[None, :]), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _states_kernel(
    x, y, g, s0, states, final, chunk_first, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_X: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
    ANTI: tl.constexpr, IS_VARLEN: tl.constexpr, KEEP: tl.constexpr,
):
    """The inter-chunk recurrence of sequence ``i_n``, rows ``i_k`` and columns ``i_v`` of the state.

    Walks the chunks (last first if ``REVERSE``) from ``S = s0`` (or 0); at each chunk stores
    ``states[chunk] = S`` (if ``STORE_STATES``), then ``S <- diag(exp(c_L)) S + scale * (x * w)^T y`` with
    ``w = exp(c_L - c)`` (forward: the state before each chunk) or ``w = exp(c)`` (``REVERSE``: the
    gradient of the state after each chunk, ``x, y = q, do``); ``final[i_n] = S``. ``KEEP``: the update
    keeps about 16 bits of ``x * w`` (states that a gate gradient over whole sequences reads)."""
    NK = (K + BK - 1) // BK
    NV = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_nh, i_k, i_v = pid // (NK * NV), pid // NV % NK, pid % NV
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    first = tl.load(chunk_first + i_n).to(tl.int64)
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mask = (ck < K)[:, None] & (cv < V)[None, :]
    offs = ck[:, None] * V + cv[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        b_S += tl.load(s0 + i_nh.to(tl.int64) * K * V + offs, mask=mask, other=0.0).to(tl.float32)
    NT = tl.cdiv(Tn, BT)
    for i in range(NT):
        if REVERSE:
            i_c = NT - 1 - i
        else:
            i_c = i
        t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
        rows = bos + t
        b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        at = ((first + i_c) * H + i_h) * K * V + offs
        if STORE_STATES:
            tl.store(states + at, b_S.to(states.dtype.element_ty), mask=mask)
        b_S = _decayed(b_S, b_cl, GATE)
        if HAS_X:
            if REVERSE:
                b_w = b_c
            else:
                b_w = _to_end(b_c, b_cl, GATE)
            b_x = _rows_times(scale * _tile(x + i_h * K, rows, valid, ck, K, H * K).to(tl.float32), tl.exp(b_w), GATE)
            b_S += _dot_split(tl.trans(b_x), _tile(y + i_h * V, rows, valid, cv, V, H * V), True, KEEP)
    tl.store(final + i_nh.to(tl.int64) * K * V + offs, b_S, mask=mask)


@triton.jit
def _output_kernel(
    q, k, v, g, states, o, chunk_first, chunk_seq, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """``o = scale * [(q * exp(c)) S + A v]`` for chunk ``i_t``, head ``i_h``, columns ``i_v``;
    ``S`` is the state before the chunk."""
    NV = (V + BV - 1) // BV
    i_t, i_v, i_h = tl.program_id(0) // NV, tl.program_id(0) % NV, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V)
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    rows = bos + t
    dt = k.dtype.element_ty
    b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
    b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
    b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
    b_c = tl.cumsum(_gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI), 0)
    b_A = _scores(b_q, b_k, b_c, BT, ANTI)
    b_o = _dot((b_q * tl.exp(b_c)[:, None]).to(dt), b_S.to(dt)) + _dot(b_A.to(dt), b_v)
    _store(o + i_h * V, scale * b_o, rows, valid, cv, V, H * V)


@triton.jit
def _chunk_term(SdS, cl, k, dk_state):
    """``<dS', S'>`` per state row, the gradient of the state after the chunk with that state:
    ``S' = diag(exp(c_L)) S + (k * exp(c_L - c))^T v`` gives ``exp(c_L) SdS + sum_j k_j * dk_j``, with
    ``SdS = sum_v S * dS'`` per row and ``dk = (v dS'^T) * exp(c_L - c)`` (fp32 ``[BT, BK]``)."""
    return tl.exp(cl) * SdS + tl.sum(k.to(tl.float32) * dk_state, 0)


@triton.jit
def _suffix(x):
    """``y_i = sum_{j >= i} x_j`` along the rows."""
    return tl.sum(x, 0) - tl.cumsum(x, 0) + x


@triton.jit
def _store_gate_grad(dG, y, rows, t, valid, Tn, i_h, ck, H: tl.constexpr, K: tl.constexpr,
                     GATE: tl.constexpr, ANTI: tl.constexpr):
    """Stores the gradient of the gate each row read, ``y`` (``[rows]`` per head, ``[rows, len(ck)]``
    per channel), at the gate's row: ``t + 1`` in the anticausal pass."""
    if ANTI:
        rows = rows + 1
        valid = valid & (t + 1 < Tn)
    if GATE == 1:
        tl.store(dG + rows * H + i_h, y, mask=valid)
    else:
        _store(dG + i_h * K, y, rows, valid, ck, K, H * K)


@triton.jit
def _chunk_dqk(
    q, k, v, g, states, dstates, do, dq, dk, dG, scale, bos, Tn, i_t, i_h, t, valid, i_k, TG,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr,
):
    """dq, dk (and the gate's gradient) of one chunk for state rows ``i_k``::

        dq = scale * [(do S^T) * exp(c) + (dA * D) k],  dk = (v dS'^T) * exp(c_L - c) + scale * (dA * D)^T q

    with ``dA = do v^T``, ``D_ij = exp(c_i - c_j) [j <= i]``, ``S`` / ``dS'`` the state before / the
    gradient of the state after the chunk."""
    dt = k.dtype.element_ty
    rows = bos + t
    ck = i_k * BK + tl.arange(0, BK)
    b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
    b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
    b_c = tl.cumsum(b_g, 0)
    b_cl = tl.sum(b_g, 0)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_SdS = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        b_v = _tile(v + i_h * V, rows, valid, cv, V, H * V)
        b_dS = _state_tile(dstates, i_t, i_h, ck, cv, H, K, V)
        b_dk += _dot(b_v, tl.trans(b_dS).to(dt))
        if HAS_Q or GATE:
            b_S = _state_tile(states, i_t, i_h, ck, cv, H, K, V)
        if GATE:
            b_SdS += tl.sum(b_S * b_dS, 1)
        if HAS_Q:
            b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
            b_dq += _dot(b_do, tl.trans(b_S).to(dt))
            b_dA += _dot(b_do, tl.trans(b_v))
    b_dk = _rows_times(b_dk, tl.exp(_to_end(b_c, b_cl, GATE)), GATE)
    if GATE:
        b_term = tl.sum(_chunk_term(b_SdS, b_cl, b_k, b_dk), 0)
    b_x = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_Q:
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
        b_dA = (scale * b_dA * _head_decay(b_c, BT, ANTI)).to(dt)
        b_dq = scale * _rows_times(b_dq, tl.exp(b_c), GATE) + _dot(b_dA, b_k)
        b_dk += _dot(tl.trans(b_dA), b_q)
        _store(dq + i_h * K, b_dq, rows, valid, ck, K, H * K)
        b_x = b_q.to(tl.float32) * b_dq
    _store(dk + i_h * K, b_dk, rows, valid, ck, K, H * K)
    if GATE:
        b_x = tl.sum(b_x - b_k.to(tl.float32) * b_dk, 1)
        b_y = b_term + _suffix(b_x)
        _store_gate_grad(dG + i_k * TG, b_y, rows, t, valid, Tn, i_h, ck, H, K, GATE, ANTI)


@triton.jit
def _chunk_dv(
    q, k, g, dstates, do, dv, scale, bos, Tn, i_t, i_h, t, valid, i_v,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr,
):
    """dv of one chunk for columns ``i_v``: ``dv = (k * exp(c_L - c)) dS' + scale * A^T do``."""
    dt = k.dtype.element_ty
    rows = bos + t
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    b_k = _tile(k + i_h * K, rows, valid, ck, K, H * K)
    b_g = _gate(g, bos, t, valid, Tn, i_h, ck, H, K, BT, GATE, ANTI)
    b_c = tl.cumsum(b_g, 0)
    b_kd = _rows_times(b_k, tl.exp(_to_end(b_c, tl.sum(b_g, 0), GATE)), GATE)
    b_dv = _dot(b_kd.to(dt), _state_tile(dstates, i_t, i_h, ck, cv, H, K, V).to(dt))
    if HAS_Q:
        b_q = _tile(q + i_h * K, rows, valid, ck, K, H * K)
        b_do = _tile(do + i_h * V, rows, valid, cv, V, H * V)
        b_dv += scale * _dot(tl.trans(_scores(b_q, b_k, b_c, BT, ANTI)).to(dt), b_do)
    _store(dv + i_h * V, b_dv, rows, valid, cv, V, H * V)


@triton.jit
def _chunk_bwd_kernel(
    q, k, v, g, states, dstates, do, dq, dk, dv, dG, chunk_first, chunk_seq, cu_seqlens, scale, T, TG,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BVF: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BVD: tl.constexpr, NK: tl.constexpr,
    GATE: tl.constexpr, HAS_Q: tl.constexpr, ANTI: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Programs ``[0, NK)`` of chunk ``i_t`` compute dq and dk (and the gate's gradient, into dG slot
    ``i_k`` for a per-head gate) for ``BK`` state rows (over columns ``BV`` at a time), the rest dv
    for ``BVD`` columns."""
    NR = NK + (V + BVD - 1) // BVD
    i_t, role, i_h = tl.program_id(0) // NR, tl.program_id(0) % NR, tl.program_id(1)
    i_n, i_c = _chunk_of(i_t, chunk_first, chunk_seq)
    bos, Tn = _sequence(i_n, cu_seqlens, T, IS_VARLEN)
    t, valid = _chunk_rows(i_c, Tn, BT, ANTI)
    if role < NK:
        _chunk_dqk(q, k, v, g, states, dstates, do, dq, dk, dG, scale, bos, Tn, i_t, i_h, t, valid, role, TG,
                   H, K, V, BT, BK, BV, GATE, HAS_Q, ANTI)
    else:
        _chunk_dv(q, k, g, dstates, do, dv, scale, bos, Tn, i_t, i_h, t, valid, role - NK,
                  H, K, V, BT, BKF, BVD, GATE, HAS_Q, ANTI)


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _gate_kind(g: Tensor | None) -> int:
    return 0 if g is None else (1 if g.dim() == 3 else 2)


class _Chunks:
    """The chunks of ``N`` sequences: ``first [N + 1]`` (global index of each sequence's first chunk),
    ``seq [count]`` (sequence of each chunk); ``T`` is the kernels' common length (0 with offsets).
    ``count``, ``first`` and ``seq`` are made when first used: the walks need none of them (no small
    launches, and with offsets no wait for the count, before their kernels)."""

    def __init__(self, k: Tensor, cu_seqlens: Tensor | None, chunk: int):
        B, T = k.shape[:2]
        self.cu_seqlens, self.chunk, self.device = cu_seqlens, chunk, k.device
        if cu_seqlens is None:
            self.N, self.T = B, T
        else:
            self.N, self.T = cu_seqlens.numel() - 1, 0

    @cached_property
    def per_seq(self) -> Tensor:
        if self.cu_seqlens is None:
            return torch.full((self.N,), triton.cdiv(self.T, self.chunk), device=self.device, dtype=torch.int32)
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1] + self.chunk - 1) // self.chunk

    @cached_property
    def count(self) -> int:
        if self.cu_seqlens is None:
            return self.N * triton.cdiv(self.T, self.chunk)
        return int(self.per_seq.sum())

    @cached_property
    def first(self) -> Tensor:
        return F.pad(self.per_seq.cumsum(0), (1, 0)).to(torch.int32)

    @cached_property
    def seq(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(self.N, device=self.device, dtype=torch.int32), self.per_seq,
                                       output_size=self.count)


def _state_block(sequence_heads: int, K: int, V: int) -> tuple[int, int, int]:
    """Rows and columns of the state and warps per program of ``_states_kernel`` (see ``STATE_TILES``)."""
    for size, warps in STATE_TILES:
        BK, BV = min(_pow2(K), size), min(_pow2(V), size)
        if sequence_heads * triton.cdiv(K, BK) * triton.cdiv(V, BV) >= STATE_MIN_PROGRAMS:
            break
    return BK, BV, warps


def _states(x, y, g, s0, chunks: _Chunks, dims: tuple[int, int, int], scale: float, anticausal: bool, BT: int,
            reverse: bool = False, store_states: bool = True, keep: bool = False) -> tuple[Tensor | None, Tensor]:
    """``_states_kernel`` over every sequence: ``(states [C, H, K, V] or None, final [N, H, K, V])``;
    the states before each chunk, or with ``reverse`` the gradients of the states after each chunk.
    ``final`` is float32; ``states`` is bf16 for bf16 inputs (every chunk's products read them in bf16,
    and its gate gradient sums inside the chunk: a float64 replay with them in bf16,
    ``kernels_rounding.py --channel``, gives dg 1.1e-3), else float32 (fp16's range is too small).
    ``keep``: 16-bit updates (a final state returned to the caller; the chunks' own products need
    only the inputs' dtype)."""
    H, K, V = dims
    BK, BV, warps = _state_block(chunks.N * H, K, V)
    given = next(t for t in (x, y, s0) if t is not None)
    stored = torch.bfloat16 if given.dtype == torch.bfloat16 else torch.float32  # fp16's range is too small
    states = torch.empty(chunks.count, H, K, V, dtype=stored, device=given.device) if store_states else None
    final = torch.empty(chunks.N, H, K, V, dtype=torch.float32, device=given.device)
    _states_kernel[(chunks.N * H * triton.cdiv(K, BK) * triton.cdiv(V, BV),)](
        x, y, g, s0, states, final, chunks.first, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=_gate_kind(g), HAS_X=x is not None, HAS_S0=s0 is not None,
        REVERSE=reverse, STORE_STATES=store_states, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None,
        KEEP=keep, num_warps=warps, num_stages=STATE_STAGES[given.element_size()],
    )
    return states, final


def _outputs(q, k, v, g, states, chunks: _Chunks, scale: float, anticausal: bool, BT: int) -> Tensor:
    """``_output_kernel`` over every chunk: ``o [B, T, H, V]`` in v's dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if _gate_kind(g) == 2:
        from seqmix.kernels import gla_channel  # per-channel gates: their own kernels

        return gla_channel.outputs(q, k, v, g, states, chunks, scale, anticausal, BT)
    BV = min(_pow2(V), OUT_BV)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    _output_kernel[(chunks.count * triton.cdiv(V, BV), H)](
        q, k, v, g, states, o, chunks.first, chunks.seq, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, GATE=_gate_kind(g), ANTI=anticausal,
        IS_VARLEN=chunks.cu_seqlens is not None, num_warps=PAR_WARPS, num_stages=PAR_STAGES,
    )
    return o


def _parallel_backward(q, k, v, g, h0, states, do, dht, chunks: _Chunks, scale: float, anticausal: bool, BT: int):
    """dq, dk, dv, dg, dh0 of the chunk-parallel form: state gradients per chunk from one reverse
    pass, then every chunk at once."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    gate = _gate_kind(g)
    dstates, dh0 = _states(q, do, g, dht, chunks, (H, K, V), scale, anticausal, BT, reverse=True)
    dh0 = dh0.to(h0.dtype) if h0 is not None else None
    if gate == 2:
        from seqmix.kernels import gla_channel  # per-channel gates: their own kernels

        return *gla_channel.backward(q, k, v, g, states, dstates, do, chunks, scale, anticausal, BT), dh0
    BKF, BVF = _pow2(K), _pow2(V)
    BK, BV = min(BKF, PAR_BK), min(BVF, PAR_BV)
    BVD = min(BVF, PAR_BV)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BVD)
    dq = torch.empty_like(q) if q is not None else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dG = torch.zeros(NK, B * T, H, 1, dtype=torch.float32, device=k.device) if gate else None
    _chunk_bwd_kernel[((NK + NV) * chunks.count, H)](
        q, k, v, g, states, dstates, do, dq, dk, dv, dG, chunks.first, chunks.seq, chunks.cu_seqlens, scale,
        chunks.T, B * T * H, H=H, K=K, V=V, BT=BT, BKF=BKF, BVF=BVF, BK=BK, BV=BV, BVD=BVD, NK=NK,
        GATE=gate, HAS_Q=q is not None, ANTI=anticausal,
        IS_VARLEN=chunks.cu_seqlens is not None, num_warps=PAR_WARPS, num_stages=PAR_STAGES,
    )
    dg = dG.sum(0).reshape(g.shape).to(g.dtype) if gate else None
    return dq, dk, dv, dg, dh0


def _walk_forward(q, k, v, g, h0, chunks: _Chunks, scale: float, anticausal: bool, BT: int, output_final_state: bool):
    """``_fwd_kernel``: one program per sequence, head and block of columns walks the chunks."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _pow2(K), min(_pow2(V), FWD_BV)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device) if q is not None else None
    ht = torch.empty(chunks.N, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    _fwd_kernel[(triton.cdiv(V, BV), chunks.N * H)](
        q, k, v, g, h0, o, ht, chunks.cu_seqlens, scale, chunks.T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=_gate_kind(g), HAS_Q=q is not None, HAS_H0=h0 is not None,
        STORE_HT=output_final_state, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None,
        SPLIT=output_final_state and g is not None, num_warps=FWD_WARPS, num_stages=FWD_STAGES,
    )
    return o, ht


def _walk_grads(q, k, v, g, h0, do, dht, chunks: _Chunks, scale: float, anticausal: bool, BT: int, store_dh0: bool):
    """``_bwd_kernel``: dq, dk, dv, the slots of ``dL/dG`` per row (``dG [slots, H, rows]`` or None),
    and dh0 (float32, if ``store_dh0``); dq walks forward, dk and dv backward, one launch per group
    of roles (``BWD_GROUPS_APART`` with a per-head gate and sequences x heads in ``BWD_APART``, else
    ``BWD_GROUPS_FUSED``)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    gate = _gate_kind(g)
    has_q = q is not None
    rows = B * T
    dh0 = torch.empty(chunks.N, H, K, V, dtype=torch.float32, device=k.device) if store_dh0 else None
    BKF, BVF = _pow2(K), _pow2(V)
    BKS, BVS = min(BKF, BWD_BK), min(BVF, BWD_BV)
    NK, NV = triton.cdiv(K, BKS), triton.cdiv(V, BVS)
    dq = torch.empty_like(q) if has_q else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    slots = (2 if has_q else 1) * NK
    dG = torch.empty(slots, H, rows, dtype=torch.float32, device=k.device) if gate else None
    cu = chunks.cu_seqlens
    apart = gate == 1 and BWD_APART[0] <= chunks.N * H <= BWD_APART[1]
    groups = BWD_GROUPS_APART if apart else BWD_GROUPS_FUSED
    if [role for group in groups for role in group] != ["dq", "dk", "dv"]:
        raise ValueError(f"the backward's role groups must split ('dq', 'dk', 'dv') in order, got {groups}")
    programs = {"dq": NK if has_q else 0, "dk": NK, "dv": NV}
    role0 = 0
    for group in groups:
        n = sum(programs[role] for role in group)
        if n:
            _bwd_kernel[(n, chunks.N * H)](
                q, k, v, g, h0, do, dht, dq, dk, dv, dh0, dG, cu, scale, chunks.T, rows * H, role0,
                H=H, K=K, V=V, BT=BT, BKF=BKF, BVF=BVF, BKS=BKS, BVS=BVS, NK=NK, GATE=gate, HAS_Q=has_q,
                HAS_H0=h0 is not None, HAS_DHT=dht is not None, STORE_DH0=store_dh0, ANTI=anticausal,
                IS_VARLEN=cu is not None, DQ="dq" in group, DK="dk" in group, DV="dv" in group,
                num_warps=BWD_WARPS, num_stages=_bwd_stages(k, BKF, BVF),
            )
        role0 += n
    return dq, dk, dv, dG, dh0


def _bwd_stages(k: Tensor, BKF: int, BVF: int) -> int:
    """``BWD_STAGES``, or 1 past 1 KB of a row of q, k and v tiles (float32 at a key dim above 128,
    e.g. the normaliser's column of causal linear attention: 311 KB of shared memory at 2 stages)."""
    return BWD_STAGES if k.element_size() * (BKF + BVF) <= 1024 else 1


def _gate_grad(dG: Tensor, g: Tensor, dht, ht, chunks: _Chunks, anticausal: bool) -> Tensor:
    """``_gate_grad_kernel``: dg from the slots of ``dL/dG``, a suffix sum over each sequence of ``chunks``."""
    H = g.shape[2]
    dg = torch.empty_like(g)
    dlast = (dht * ht).sum((-2, -1)) if dht is not None else None
    _gate_grad_kernel[(chunks.N * H,)](
        dG, dlast, dg, chunks.cu_seqlens, chunks.T, dG[0].numel(), NP=dG.shape[0], H=H, BT=GATE_GRAD_BT,
        HAS_LAST=dlast is not None, ANTI=anticausal, IS_VARLEN=chunks.cu_seqlens is not None,
    )
    return dg


def _walk_backward(q, k, v, g, h0, ht, do, dht, chunks: _Chunks, scale: float, anticausal: bool, BT: int):
    """dq, dk, dv, dg, dh0 from the chunk walks: dq forward, dk and dv backward, in one launch;
    then the gate's gradient as a suffix sum over each sequence."""
    dq, dk, dv, dG, dh0 = _walk_grads(q, k, v, g, h0, do, dht, chunks, scale, anticausal, BT, h0 is not None)
    dg = _gate_grad(dG, g, dht, ht, chunks, anticausal) if g is not None else None
    return dq, dk, dv, dg, (dh0.to(h0.dtype) if h0 is not None else None)


def _offsets(values: list[int], device: torch.device) -> Tensor:
    """``values`` as int32 on ``device``; to a GPU through pinned memory, without waiting (a blocking
    copy waits for the stream's queued kernels, so the host could not launch ahead of the GPU)."""
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class _Segments:
    """The sequences of ``chunks`` cut into segments of ``size`` tokens (the last of each sequence
    shorter), as sequences of their own: ``chunks`` (a :class:`_Chunks` over the segments: a batch
    of segments of ``size`` when it divides the common length, else packed), ``first [N + 1]``
    (index of each sequence's first segment), ``count`` and ``gs [count, H]`` (each segment's gate
    sum in float32, summed in float64; None without a gate)."""

    def __init__(self, k: Tensor, g: Tensor | None, bounds: list[int], size: int, BT: int, uniform: bool):
        starts, first = [], [0]
        for bos, eos in zip(bounds[:-1], bounds[1:]):
            starts += range(bos, eos, size)
            first.append(len(starts))
        device = k.device
        self.N, self.count = len(bounds) - 1, len(starts)
        self.first = _offsets(first, device)
        if uniform:
            self.chunks = _Chunks(k.view(self.count, size, *k.shape[2:]), None, BT)
        else:
            self.chunks = _Chunks(k, _offsets(starts + [bounds[-1]], device), BT)
        self.gs = None
        if g is not None:
            H = g.shape[2]
            if uniform:
                self.gs = g.reshape(self.count, size, H).double().sum(1).float()
            else:
                cs = F.pad(g.reshape(-1, H).double().cumsum(0), (0, 0, 1, 0))
                at = self.chunks.cu_seqlens.long()
                self.gs = (cs[at[1:]] - cs[at[:-1]]).float().contiguous()

    @staticmethod
    def plan(k: Tensor, g: Tensor | None, chunks: _Chunks, BT: int) -> "_Segments | None":
        """Segments when sequences x heads are below ``SEGMENT_BELOW`` and some sequence is longer
        than one segment (``SEGMENT_MIN`` tokens or more, enough for ``SEGMENT_PROGRAMS``); else None."""
        B, T, H = k.shape[:3]
        if chunks.N * H >= SEGMENT_BELOW or chunks.N == 0:
            return None
        if chunks.cu_seqlens is None:
            bounds = list(range(0, B * T + 1, T)) if T > 0 else [0] * (B + 1)
        else:
            bounds = chunks.cu_seqlens.tolist()
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        pieces = -(-SEGMENT_PROGRAMS // (chunks.N * H))
        size = -(-max(SEGMENT_MIN, -(-longest // pieces)) // BT) * BT
        if size >= longest:
            return None
        uniform = False
        if chunks.cu_seqlens is None:  # equal segments if a count near T / size divides T in whole chunks
            m = -(-T // size)
            uniform = T % m == 0 and (T // m) % BT == 0
            size = T // m if uniform else size
        return _Segments(k, g, bounds, size, BT, uniform)

    def local_states(self, x: Tensor, y: Tensor, g: Tensor | None, dims: tuple[int, int, int], scale: float,
                     reverse: bool) -> Tensor:
        """``_states_kernel`` over every segment from a zero state, no per-chunk states: float32
        ``[count, H, K, V]``, each segment's state at its end (``x, y = k, v``), or with ``reverse``
        the state gradient at its start from its own queries (``x, y = q, do``)."""
        H, K, V = dims
        size, warps = SEGMENT_STATE_TILE
        BK, BV = min(_pow2(K), size), min(_pow2(V), size)
        c = self.chunks
        final = torch.empty(c.N, H, K, V, dtype=torch.float32, device=x.device)
        _states_kernel[(c.N * H * triton.cdiv(K, BK) * triton.cdiv(V, BV),)](
            x, y, g, None, None, final, c.first, c.cu_seqlens, scale, c.T,
            H=H, K=K, V=V, BT=SEGMENT_STATE_BT, BK=BK, BV=BV, GATE=_gate_kind(g), HAS_X=True, HAS_S0=False,
            REVERSE=reverse, STORE_STATES=False, ANTI=False, IS_VARLEN=c.cu_seqlens is not None,
            KEEP=g is not None, num_warps=warps, num_stages=SEGMENT_STATE_STAGES,
        )
        return final

    def chain(self, local: Tensor | None, s0: Tensor | None, dims: tuple[int, int, int], reverse: bool,
              store_final: bool) -> tuple[Tensor, Tensor | None]:
        """``_chain_kernel``: the state at every segment's start (``reverse``: the state gradient at
        every segment's end), float32 ``[count, H, K, V]``, and per sequence the final one (or None)."""
        H, K, V = dims
        BK, BV = min(_pow2(K), 64), min(_pow2(V), 64)
        device = self.first.device
        start = torch.empty(self.count, H, K, V, dtype=torch.float32, device=device)
        final = torch.empty(self.N, H, K, V, dtype=torch.float32, device=device) if store_final else None
        _chain_kernel[(self.N * H * triton.cdiv(K, BK) * triton.cdiv(V, BV),)](
            local, self.gs, s0, start, final, self.first, H=H, K=K, V=V, BK=BK, BV=BV,
            GATE=int(self.gs is not None), HAS_LOCAL=local is not None, HAS_S0=s0 is not None,
            STORE_FINAL=store_final, REVERSE=reverse,
        )
        return start, final


class ChunkGLAFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels; see :func:`chunk_gla` for the arguments."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, anticausal, cu_seqlens, chunk_size, output_final_state):
        H, K = k.shape[2:]
        V = v.shape[-1]
        gate = _gate_kind(g)
        BT = chunk_size
        chunks = _Chunks(k, cu_seqlens, BT)
        segments = _Segments.plan(k, g, chunks, BT) if gate != 2 and not anticausal else None
        walk = gate != 2 and chunks.N * H >= TARGET_PROGRAMS
        states = None
        if segments is not None:
            # the state at each segment's start: local states of the segments, chained
            local = segments.local_states(k, v, g, (H, K, V), 1.0, reverse=False)
            states, ht = segments.chain(local, h0, (H, K, V), reverse=False, store_final=output_final_state)
            o = _walk_forward(q, k, v, g, states, segments.chunks, scale, False, BT, False)[0] if q is not None else None
        elif walk:
            o, ht = _walk_forward(q, k, v, g, h0, chunks, scale, anticausal, BT, output_final_state)
        else:
            states, ht = _states(k, v, g, h0, chunks, (H, K, V), 1.0, anticausal, BT,
                                 keep=output_final_state and g is not None)
            o = _outputs(q, k, v, g, states, chunks, scale, anticausal, BT) if q is not None else None
        ctx.save_for_backward(q, k, v, g, h0, ht, states if SAVE_STATES or segments is not None else None)
        ctx.chunks, ctx.scale, ctx.anticausal, ctx.BT, ctx.walk = chunks, scale, anticausal, BT, walk
        ctx.segments = segments
        ctx.set_materialize_grads(False)
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht, states = ctx.saved_tensors
        if q is not None and do is None:
            do = torch.zeros_like(v)
        do = do.contiguous() if q is not None else None
        dht = dht.contiguous() if dht is not None else None
        if ctx.segments is not None:
            dq, dk, dv, dg, dh0 = _segments_backward(q, k, v, g, h0, ht, states, do, dht, ctx.chunks, ctx.segments,
                                                     ctx.scale, ctx.BT)
            return dq, dk, dv, dg, dh0, None, None, None, None, None
        if not ctx.walk and states is None:
            states, _ = _states(k, v, g, h0, ctx.chunks, (k.shape[2], k.shape[3], v.shape[3]), 1.0, ctx.anticausal, ctx.BT)
        backward = _walk_backward if ctx.walk else _parallel_backward
        args = (q, k, v, g, h0, ht, do, dht) if ctx.walk else (q, k, v, g, h0, states, do, dht)
        dq, dk, dv, dg, dh0 = backward(*args, ctx.chunks, ctx.scale, ctx.anticausal, ctx.BT)
        return dq, dk, dv, dg, dh0, None, None, None, None, None


def _segments_backward(q, k, v, g, h0, ht, starts, do, dht, chunks: _Chunks, segments: _Segments, scale: float, BT: int):
    """dq, dk, dv, dg, dh0 of the segmented walks (causal): the state gradient at each segment's end
    from the local ones (queries of the segment only) chained backward; the walks per segment from
    their start state ``starts`` and end gradient; the gate's gradient over whole sequences."""
    dims = (k.shape[2], k.shape[3], v.shape[3])
    local = None
    if q is not None:
        local = segments.local_states(q, do, g, dims, scale, reverse=True)
    ends, dh0 = segments.chain(local, dht, dims, reverse=True, store_final=h0 is not None)
    dq, dk, dv, dG, _ = _walk_grads(q, k, v, g, starts, do, ends, segments.chunks, scale, False, BT, False)
    dg = _gate_grad(dG, g, dht, ht, chunks, False) if g is not None else None
    return dq, dk, dv, dg, (dh0.to(h0.dtype) if h0 is not None else None)


def chunk_gla(
    q: Tensor | None,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    anticausal: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor | None, Tensor | None]:
    """Causal (or anticausal, see the module docstring) gated linear attention.

    Args:
        q: ``[B, T, H, K]``, or ``None`` to compute only the final state.
        k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: log gate ``[B, T, H]`` (per head), ``[B, T, H, K]`` (per channel) or ``None``.
        scale: output scale.
        initial_state: ``[N, H, K, V]`` (``N = B``, or the number of packed sequences).
        output_final_state: also return the final states ``[N, H, K, V]`` (float32).
        anticausal: the exclusive backward pass; no initial or final state.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences (``B = 1``).
        chunk_size: 16, 32, 64 or 128.

    Returns ``o [B, T, H, V]`` in v's dtype (``None`` without q) and the final state or ``None``.
    Inputs are not checked beyond what the kernels need: the ops check them.
    """
    if anticausal and (initial_state is not None or output_final_state):
        raise ValueError("the anticausal pass has no initial or final state")
    q, k, v, g = (None if t is None else t.contiguous() for t in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return ChunkGLAFunction.apply(q, k, v, g, initial_state, float(scale), anticausal, cu_seqlens, chunk_size, output_final_state)

