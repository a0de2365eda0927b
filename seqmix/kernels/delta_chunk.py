"""The chunked (gated) delta rule in Triton: each chunk's WY/UT parts, the recurrence across
chunks and the queries' reads, forward and backward (the math of :func:`seqmix.ops.delta._chunked_scan`).

Within chunks (``_inverse_kernel``, then ``_solve_fwd_kernel``; one program per chunk and head). Chunk ``n`` of ``C`` tokens
has keys ``K [C, K]``, values ``V [C, V]``, writing strengths ``beta``, log gates ``g`` and their
cumsum ``G`` inside the chunk (``G_C`` its total)::

    A   = strictly_lower(diag(beta) (K K^T) * exp(G_i - G_j)),    T = (I + A)^{-1}
    W   = T diag(beta exp(G)) K,    U0 = T diag(beta) V,    E = diag(exp(G_C - G)) K,    gamma = exp(G_C)

``T`` is inverted in ``16 x 16`` blocks held in registers: forward substitution over the rows of
each diagonal block, then the blocks below by ``T_ij = -T_ii sum_l A_il T_lj`` (tensor-core
products); it is kept for the backward, which with ``X = W`` or ``U0`` and ``R`` its right-hand side uses
``dR = T^T dX``, ``dT = sum_X dX R^T`` and ``dA = -strictly_lower(T^T dT T^T)``, then the products'
rules down to ``dk, dv, dbeta`` and ``dG``, whose suffix sum within the chunk is ``dg``.

Across chunks (``_fwd_kernel``, ``_bwd_kernel``). From the initial state ``S_0 [K, V]``::

    U_n     = U0_n - W_n S_n                   (the chunk's pseudo-values)
    S_{n+1} = gamma_n S_n + E_n^T U_n

The forward returns every entering state ``S_n``, every ``U_n`` and the final state. The
backward takes the gradients of those (``dS_n^out``, ``dU_n^out``, ``dS_N``) and walks the chunks
in reverse with the state gradient ``dS`` in registers (``dS = dS_{n+1}`` on entering chunk ``n``)::

    dU_n     = dU_n^out + E_n dS_{n+1}         (= dU0_n)
    dW_n     = -dU_n S_n^T
    dE_n     = U_n dS_{n+1}^T
    dgamma_n = <S_n, dS_{n+1}>
    dS_n     = gamma_n dS_{n+1} - W_n^T dU_n + dS_n^out

One program owns a block of state columns of one sequence and head; the reads' ``dS_n^out`` and
``dU_n^out`` (below) are formed in the walk from the queries, gates, ``dO`` and the forward's
``Attn`` (with fewer walks than SMs, ``dU^out`` by ``_du_kernel`` before it); the walk stores every
``dS_{n+1}`` and ``dU0_n``. ``dW``, ``dE`` and ``dgamma`` (sums over all state columns) are then
formed from those, the entering states and ``U`` by ``_grads_kernel`` (one program per chunk, head
and block of key columns; ``dgamma`` as one share per key block), which reads each tile of ``S_n``
and ``U_n`` once for the reads' gradients too; the within-chunk backward reads them all.

The queries' reads (``_read_fwd_kernel``, one program per chunk and head; it stores ``Attn`` for
the backward), with ``Attn = (Q K^T) * exp(G_i - G_j) [j <= i]`` and ``Qd = Q * exp(G)``::

    O_n = Qd S_n + Attn U_n
    dS_n^out = Qd^T dO,  dU_n^out = Attn^T dO,  dQd = dO S_n^T,  dAttn = dO U_n^T

Layout: inputs ``[B, S, H, D]`` as the ops; chunk-major ``[B, H, N, C, D]`` (contiguous) for
``W, U0, E``, ``T, Attn [B, H, N, C, C]``, ``gamma [B, H, N]``, states ``[B, H, N, K, V]``. The three parts run under one autograd
node (:func:`scan_chunks`), so the intermediates never meet autograd: for bfloat16 / float16
inputs ``T, W, U0, E, Attn``, the entering states, ``U`` and the leaving states' gradients (read only as
products' operands, cast to the inputs' dtype there) are stored in that dtype, and so are the
gradients ``dU0``, ``dU^out`` where it is stored and the reads' share of ``dk`` (rounded once more: in a CPU replay
with round-to-nearest bf16, dv and dbeta errors rise ~20 %, dk ~10 %) and ``dW``, ``dE`` (the
GPU check at D = 128 unchanged by them: bf16 worst 6.2e-3; ``T`` and ``U0`` in bf16 took the
gates' gradient from 3.4e-3 to 4.0e-3 at worst); ``gamma`` stays float32, and float32 inputs keep
everything float32. Products of two 16-bit tiles (``K K^T``, ``dW K^T``, ``dU0 V^T``, their row
scalings taken after) are one 16-bit tensor-core pass, exact as the tf32 pass of the same values
was; so are ``W``'s product, the backward's products of ``T^T`` with ``dW`` and ``dU0``, ``dA =
-T^T dT T^T`` (``dT`` and the inner product rounded to 16 bits) and ``dA``'s share of ``dk``; the
rest (the inverse's block rows, ``U0``'s product) take tf32 operands (float32 inputs: ``tf32x3`` throughout).
Packed sequences (``chunk_offsets [N_seq + 1]``, ``B = 1``) occupy whole chunks: sequence ``i`` owns chunks
``[chunk_offsets[i], chunk_offsets[i + 1])``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch shapes: state columns per program (halved for key dims above 128), warps, pipeline stages.
FWD_BV, BWD_BV = 64, 64  # BWD_BV 64: 1.53 ms against 1.86 at 32 (sweep_launch_delta_5ebb97a.log); 32: see _columns
NUM_WARPS = 4
# pipeline stages of the walks (forward, backward) by the products' operand size: 16-bit (2, 2)
# (H100, bf16, fwd+bwd at 8K 6.46 -> 6.33 ms against (2, 1): configs_delta_Vd.log), float32 (2, 1)
WALK_STAGES = {2: (2, 2), 4: (2, 1)}
# with fewer walks than SMs (long sequences): fewer state columns per program, so more programs
# (H100, bf16, 32K: fwd+bwd 8.43 -> 7.37 ms with the inverse's and storage changes, the backward
# walk 2.13 -> 1.73 ms at 32 columns; 16 columns 7.37 against 7.47 at 32: few_walk_columns.log),
# and deeper pipelines by the products' operand size: 16-bit (3, 2) (H100, bf16, 5eaedab, 32K
# 9.48 -> 9.02: delta_configs_5eaedab.log), float32 as the others (3 stages take 224 KB of shared
# memory and spill)
FEW_WALK_BV = (32, 16)
FEW_WALKS_BELOW = None  # walks are few below this many programs at FWD_BV / BWD_BV columns (None: the SMs)
FEW_WALK_STAGES = {2: (3, 2), 4: (2, 1)}
# dW, dE, dgamma and the reads' gradients (_grads_kernel): key columns per program; state columns at
# a time, stages and warps by the products' operand size (H100, bf16, fwd+bwd at 8K: 5.83 ms at 4
# warps and 2 stages, 6.45 at 3 stages (120 KB of shared memory), 6.43 at 8 warps; float32 at 4
# warps spills 1 KB on sm_90)
GRAD_BK = 64
GRAD_BV, GRAD_STAGES, GRAD_WARPS = {2: 64, 4: 32}, {2: 2, 4: 2}, {2: 4, 4: 8}
# within chunks: key and value columns at a time of the forward (SOLVE_BD); the backward took 2.9 ms at 4 warps and 1 stage,
# 3.9 at 8 and 3 (H100, T = 8K, sweep_solve_delta_257c64c.log)
# 3 stages since its products are 16-bit (fwd+bwd 6.40 against 6.46 ms at 2, configs_delta_Vd.log)
SOLVE_FWD_WARPS, SOLVE_FWD_STAGES, SOLVE_BWD_WARPS, SOLVE_BWD_STAGES, SOLVE_BD = 4, 3, 4, 3, 64
# the backward's columns at a time, by the products' operand size, and stages: 16-bit 64 since its
# products of 16-bit tiles are 16-bit (H100, 2e8e74a, fwd+bwd 7.41 -> 7.10 ms at 8K, 8.76 -> 8.44 at
# 32K: delta_configs_2e8e74a.log; 2.38 ms against 2.48 before, delta4 sweeps), float32 32 (64 spills
# 1.3 KB on sm_90); 2.31 ms at 2 stages against 2.38 at 1 (H100, T = 8K, delta4 sweeps)
SOLVE_BWD_BD = {2: 64, 4: 32}
# the inverse (_inverse_kernel): key columns at a time, warps, stages. One warp keeps its row
# sums within the warp: the forward 2.44 ms at 8K against 2.69 with 2 warps, 3.23 with 4 (H100,
# bf16, delta_inverse_registers.log)
INVERSE_BD, INVERSE_WARPS, INVERSE_STAGES = 64, 1, 3
DU_BV = 64  # dU^out's columns at a time (_du_kernel)
READ_FWD_BV, READ_FWD_WARPS = 128, 4  # 0.88 ms against 0.99 at 64 (same sweep)
_LOW = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' LOW: products' operand dtype


@triton.jit
def _chunk_range(i_n, chunk_offsets, N, IS_VARLEN: tl.constexpr):
    """Batch row and chunk range ``[c0, c1)`` of sequence ``i_n``."""
    if IS_VARLEN:
        b = 0
        c0 = tl.load(chunk_offsets + i_n)
        c1 = tl.load(chunk_offsets + i_n + 1)
    else:
        b = i_n
        c0 = 0
        c1 = N
    return b, c0, c1


@triton.jit
def _load(p, idx, R: tl.constexpr, D: tl.constexpr, rows, cols):
    """Tile ``[rows, cols]`` of the ``idx``-th ``[R, D]`` matrix at ``p``, zeros outside."""
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    base = p + idx * (R * D)
    return tl.load(base + (rows[:, None] * D + cols[None, :]), mask=mask, other=0.0)


@triton.jit
def _load_t(p, idx, R: tl.constexpr, D: tl.constexpr, rows, cols):
    """Tile ``[cols, rows]`` of the transposed ``idx``-th ``[R, D]`` matrix at ``p``, zeros outside."""
    mask = (rows < R)[None, :] & (cols < D)[:, None]
    return tl.load(p + idx * (R * D) + (rows[None, :] * D + cols[:, None]), mask=mask, other=0.0)


@triton.jit
def _store(p, idx, R: tl.constexpr, D: tl.constexpr, rows, cols, x):
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    tl.store(p + idx * (R * D) + rows[:, None] * D + cols[None, :], x.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b):
    """``a @ b`` accumulated in fp32, ``b`` cast to ``a``'s dtype; float32 to float32 accuracy (``tf32x3``)."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b.to(tl.float32), input_precision="tf32x3")
    else:
        out = tl.dot(a, b.to(a.dtype))
    return out


@triton.jit
def _as(x, LOW: tl.constexpr):
    """``x`` in the products' operand dtype: float32 (``LOW`` 0), bfloat16 (1) or float16 (2)."""
    if LOW == 1:
        out = x.to(tl.bfloat16)
    elif LOW == 2:
        out = x.to(tl.float16)
    else:
        out = x
    return out


@triton.jit
def _fwd_kernel(
    w, u0, e, gamma, h0, states, u, ht, chunk_offsets, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    LOW: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """States, pseudo-values and final state of columns ``i_v`` of one sequence and head."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    b, c0, c1 = _chunk_range(i_n, chunk_offsets, N, IS_VARLEN)
    rc, ck, cv = tl.arange(0, C), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    b_S = _load(h0, i_nh.to(tl.int64), K, V, ck, cv).to(tl.float32)  # [BK, BV]
    first = (b * H + i_h).to(tl.int64) * N
    for c in range(c0, c1):
        idx = first + c
        _store(states, idx, K, V, ck, cv, b_S)
        b_w = _as(_load(w, idx, C, K, rc, ck), LOW)
        b_u = _load(u0, idx, C, V, rc, cv).to(tl.float32) - _dot(b_w, b_S)  # [C, BV]
        _store(u, idx, C, V, rc, cv, b_u)
        b_S = tl.load(gamma + idx) * b_S + _dot(_as(_load_t(e, idx, C, K, rc, ck), LOW), b_u)
    _store(ht, i_nh.to(tl.int64), K, V, ck, cv, b_S)


@triton.jit
def _bwd_kernel(
    w, e, gamma, q, g, do, attn, du, dht, du0, dnext, dh0, chunk_offsets, scale, S, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    LOW: tl.constexpr, HAS_DO: tl.constexpr, HAS_DU: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Columns ``i_v`` of one sequence and head, walking its chunks backward: ``dU0_n`` and the
    gradient of each chunk's leaving state ``dS_{n+1}`` (into ``dnext``), then ``dS_0``. With
    ``HAS_DO`` the reads' gradients enter: ``dU_n^out = scale * Attn^T dO``, read from ``du``
    (``HAS_DU``, :func:`_du_kernel`) or formed here from ``Attn`` (stored by the forward's reads),
    and ``dS_n^out = scale * (Q * exp(G))^T dO``, formed here from ``q, g, do``; at 32 columns or
    fewer as ``Q^T (scale * exp(G) * dO)``, the gate scaling the narrow tile."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    b, c0, c1 = _chunk_range(i_n, chunk_offsets, N, IS_VARLEN)
    rc, ck, cv = tl.arange(0, C), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS += _load(dht, i_nh.to(tl.int64), K, V, ck, cv).to(tl.float32)
    first = (b * H + i_h).to(tl.int64) * N
    for i in range(c1 - c0):
        c = c1 - 1 - i
        idx = first + c
        _store(dnext, idx, K, V, ck, cv, b_dS)
        b_du = _dot(_as(_load(e, idx, C, K, rc, ck), LOW), b_dS)  # [C, BV]
        if HAS_DO:
            b_do = scale * _chunk_rows(do, b, c, S, i_h, H, V, C, cv)
            if HAS_DU:
                b_du += _load(du, idx, C, V, rc, cv).to(tl.float32)
            else:
                b_du += _dot(_as(_load_t(attn, idx, C, C, rc, rc), LOW), _as(b_do, LOW))
        _store(du0, idx, C, V, rc, cv, b_du)
        b_dS = tl.load(gamma + idx) * b_dS - _dot(_as(_load_t(w, idx, C, K, rc, ck), LOW), b_du)
        if HAS_DO:
            b_g, _, _ = _chunk_gate(g, b, c, S, i_h, H, C)
            b_qt = _chunk_cols(q, b, c, S, i_h, H, K, C, ck)  # [BK, C]
            if BV <= 32:  # the gate on dO's narrow tile (H100, 32K: 7.28 -> 7.20 ms; at 64 columns 6.24 -> 6.58 at 8K)
                b_do = b_do * tl.exp(tl.cumsum(b_g, 0))[:, None]
            else:
                b_qt = b_qt.to(tl.float32) * tl.exp(tl.cumsum(b_g, 0))[None, :]
            b_dS += _dot(_as(b_qt, LOW), _as(b_do, LOW))
    _store(dh0, i_nh.to(tl.int64), K, V, ck, cv, b_dS)


@triton.jit
def _du_kernel(
    attn, do, du, scale, S, N,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr,
):
    """Columns ``i_v`` of chunk ``i_c``'s ``dU^out = scale * Attn^T dO`` (``[C, BV]``, in ``du``'s dtype)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    idx = i_bh.to(tl.int64) * N + i_c
    rc, cv = tl.arange(0, C), i_v * BV + tl.arange(0, BV)
    b_do = _as(scale * _chunk_rows(do, i_b, i_c, S, i_h, H, V, C, cv), LOW)
    _store(du, idx, C, V, rc, cv, _dot(_as(_load_t(attn, idx, C, C, rc, rc), LOW), b_do))


@triton.jit
def _grads_kernel(
    q, k, g, states, u, do, du0, dnext, dq, dk, dg, dw, de, dgamma, scale, S, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    LOW: tl.constexpr, HAS_DO: tl.constexpr,
):
    """Chunk ``i_c`` of batch and head ``i_bh``, key columns ``[i_k BD, (i_k + 1) BD)``, summing over
    the state's columns ``BV`` at a time, each tile of ``S_n``, ``U_n`` read once and used only as
    products' operands (with ``dgamma`` summed from the tiles in registers instead, ``dq`` differed
    from run to run at 3 stages and was wrong at 2 on the H100 with Triton 3.6, the pattern of
    triton-lang/triton#6691):
    ``dW = -dU0 S_n^T`` and ``dE = U dS_{n+1}^T`` (``[C, BD]``, stored in ``dw``'s and ``de``'s dtype)
    and those columns' share of ``dgamma = <S_n, dS_{n+1}> = trace(S_n dS_{n+1}^T)`` (``dgamma [B, H, N, NKB]`` float32,
    ``NKB = cdiv(K, BD)``); with ``HAS_DO`` the reads' gradients: ``dQd = dO S_n^T``, ``dAttn = dO
    U_n^T``, ``M = dAttn * exp(G_i - G_j) [j <= i]``, ``dq = dQd * exp(G) + M K``, the reads' share of
    ``dk = M^T Q`` and these columns' share of the reads' ``dg`` (``dg [B, S, H, NKB]`` float32)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    idx = i_bh.to(tl.int64) * N + i_c
    rc, rk = tl.arange(0, C), tl.arange(0, BD)
    ck = i_k * BD + rk
    b_dw = tl.zeros([C, BD], dtype=tl.float32)
    b_de = tl.zeros([C, BD], dtype=tl.float32)
    b_sds = tl.zeros([BD, BD], dtype=tl.float32)  # S_n dS_{n+1}^T over these key columns: dgamma its trace
    b_dqd = tl.zeros([C, BD], dtype=tl.float32)
    b_dattn = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        b_St = _load_t(states, idx, K, V, ck, cv)  # [BV, BD]
        b_dnt = _load_t(dnext, idx, K, V, ck, cv)
        b_u = _as(_load(u, idx, C, V, rc, cv), LOW)
        b_dw -= _dot(_as(_load(du0, idx, C, V, rc, cv), LOW), b_St)
        b_de += _dot(b_u, b_dnt)
        b_sds += _dot(tl.trans(b_St), b_dnt)
        if HAS_DO:
            b_do = _as(scale * _chunk_rows(do, i_b, i_c, S, i_h, H, V, C, cv), LOW)
            b_dqd += _dot(b_do, b_St)
            b_dattn += _dot(b_do, tl.trans(b_u))
    _store(dw, idx, C, K, rc, ck, b_dw)
    _store(de, idx, C, K, rc, ck, b_de)
    NKB = tl.num_programs(0)
    b_dgamma = tl.sum(tl.sum(tl.where(rk[:, None] == rk[None, :], b_sds, 0.0), 1), 0)
    tl.store(dgamma + idx * NKB + i_k, b_dgamma)
    if HAS_DO:
        b_q = _chunk_rows(q, i_b, i_c, S, i_h, H, K, C, ck)
        b_k = _chunk_rows(k, i_b, i_c, S, i_h, H, K, C, ck)
        b_g, offs, valid = _chunk_gate(g, i_b, i_c, S, i_h, H, C)
        b_G = tl.cumsum(b_g, 0)
        b_M = b_dattn * _causal_decay(b_G, C)
        b_dqd *= tl.exp(b_G)[:, None]
        _store_rows(dq, b_dqd + _dot(_as(b_M, LOW), b_k), i_b, i_c, S, i_h, H, K, C, ck)
        _store_rows(dk, _dot(_as(tl.trans(b_M), LOW), b_q), i_b, i_c, S, i_h, H, K, C, ck)
        b_Z = b_M * _dot(_as(b_q, LOW), tl.trans(b_k))  # dAttn * Attn, these key columns' share
        b_dG = tl.sum(b_q * b_dqd, 1) + tl.sum(b_Z, 1) - tl.sum(b_Z, 0)
        tl.store(dg + offs * NKB + i_k, tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG, mask=valid)


# ----------------------------------------------------------------------------- within chunks


@triton.jit
def _chunk_rows(p, i_b, i_c, S, i_h, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, cols):
    """Chunk ``i_c`` of batch ``i_b``, head ``i_h`` of a ``[B, S, H, D]`` tensor: ``[C, cols]`` float32, zeros outside."""
    t = i_c * C + tl.arange(0, C)
    p = p + (i_b.to(tl.int64) * S + t[:, None]) * (H * D) + i_h * D + cols[None, :]
    return tl.load(p, mask=(t < S)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_cols(p, i_b, i_c, S, i_h, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, cols):
    """The transpose of :func:`_chunk_rows`: ``[cols, C]`` in its stored dtype, zeros outside."""
    t = i_c * C + tl.arange(0, C)
    p = p + (i_b.to(tl.int64) * S + t[None, :]) * (H * D) + i_h * D + cols[:, None]
    return tl.load(p, mask=(t < S)[None, :] & (cols < D)[:, None], other=0.0)


@triton.jit
def _store_rows(p, x, i_b, i_c, S, i_h, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, cols):
    t = i_c * C + tl.arange(0, C)
    p = p + (i_b.to(tl.int64) * S + t[:, None]) * (H * D) + i_h * D + cols[None, :]
    tl.store(p, x.to(p.dtype.element_ty), mask=(t < S)[:, None] & (cols < D)[None, :])


@triton.jit
def _rows_at(p, i_b, i_c, S, i_h, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, c0, BD: tl.constexpr):
    """Pointers and mask of columns ``[c0, c0 + BD)`` of chunk ``i_c`` (batch ``i_b``, head ``i_h``)
    of a ``[B, S, H, D]`` tensor: a scalar 64-bit base and 32-bit offsets within the chunk."""
    t, cols = tl.arange(0, C), c0 + tl.arange(0, BD)
    p = p + (i_b.to(tl.int64) * S + i_c * C) * (H * D) + i_h * D
    return p + (t[:, None] * (H * D) + cols[None, :]), ((i_c * C + t) < S)[:, None] & (cols < D)[None, :]


@triton.jit
def _tile_at(p, idx, R: tl.constexpr, D: tl.constexpr, c0, BD: tl.constexpr):
    """Pointers and mask of columns ``[c0, c0 + BD)`` of the ``idx``-th ``[R, D]`` matrix at ``p``."""
    rows, cols = tl.arange(0, R), c0 + tl.arange(0, BD)
    return p + idx * (R * D) + (rows[:, None] * D + cols[None, :]), (cols < D)[None, :] & (rows < R)[:, None]


@triton.jit
def _get(at):
    """float32 tile at ``(pointers, mask)``, zeros outside."""
    return tl.load(at[0], mask=at[1], other=0.0).to(tl.float32)


@triton.jit
def _put(at, x):
    tl.store(at[0], x.to(at[0].dtype.element_ty), mask=at[1])


@triton.jit
def _chunk_gate(p, i_b, i_c, S, i_h, H: tl.constexpr, C: tl.constexpr):
    """``[C]`` float32 of a ``[B, S, H]`` tensor (zeros past ``S``) and the row offsets."""
    t = i_c * C + tl.arange(0, C)
    offs = (i_b.to(tl.int64) * S + t) * H + i_h
    return tl.load(p + offs, mask=t < S, other=0.0).to(tl.float32), offs, t < S


@triton.jit
def _mm(a, b, PRECISE: tl.constexpr):
    """``a @ b`` of float32 tiles: to float32 accuracy (``tf32x3``) if ``PRECISE``, else one tf32 pass."""
    if PRECISE:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, input_precision="tf32")
    return out


@triton.jit
def _get_raw(at):
    """Tile at ``(pointers, mask)`` in its stored dtype, zeros outside."""
    return tl.load(at[0], mask=at[1], other=0.0)


@triton.jit
def _pair(a, b, PRECISE: tl.constexpr):
    """``a b^T`` in float32 of tiles in the inputs' dtype (``b`` cast to ``a``'s): 16-bit products are
    exact in one tensor-core pass (as tf32 ones of the same values were); float32 to float32
    accuracy (``tf32x3``)."""
    if PRECISE:
        out = tl.dot(a, tl.trans(b).to(a.dtype), input_precision="tf32x3")
    else:
        out = tl.dot(a, tl.trans(b).to(a.dtype))
    return out


@triton.jit
def _gram(k, PRECISE: tl.constexpr):
    """``k k^T`` (:func:`_pair`)."""
    return _pair(k, k, PRECISE)


@triton.jit
def _strict_decay(G, C: tl.constexpr):
    """``exp(G_i - G_j)`` for ``j < i``, else 0."""
    r = tl.arange(0, C)
    return tl.exp(tl.where(r[:, None] > r[None, :], G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _decayed(P, beta_i, G_i, G_j, STRICT: tl.constexpr):
    """Block ``(i, j)`` of ``A``: ``beta_i exp(G_i - G_j) P`` (``P`` the block of ``K K^T``), strictly lower if ``STRICT``."""
    r = tl.arange(0, 16)
    d = G_i[:, None] - G_j[None, :]
    if STRICT:
        d = tl.where(r[:, None] > r[None, :], d, float("-inf"))
    return P * (beta_i[:, None] * tl.exp(d))


@triton.jit
def _diagonal_inverse(a):
    """``(I + a)^{-1}`` of a strictly lower ``[16, 16]`` tile, by forward substitution over its rows in
    registers: ``N_i = -a_i - sum_{j < i} a_ij N_j`` (rows 0 and 1 are ``-a_i``), the inverse ``I + N``."""
    r = tl.arange(0, 16)
    n = -a
    for i in range(2, 16):
        row = tl.sum(tl.where((r == i)[:, None], n, 0.0), 0)  # -a_i, zero from column i on
        row += tl.sum(row[:, None] * n, 0)  # rows j < i of n are final
        n = tl.where((r == i)[:, None], row[None, :], n)
    return n + tl.where(r[:, None] == r[None, :], 1.0, 0.0)


@triton.jit
def _put_block(p, i: tl.constexpr, j: tl.constexpr, C: tl.constexpr, x):
    """Block ``(i, j)`` (``16 x 16``) of the row-major ``[C, C]`` at ``p``."""
    r = tl.arange(0, 16)
    tl.store(p + (i * 16 + r)[:, None] * C + (j * 16 + r)[None, :], x.to(p.dtype.element_ty))


@triton.jit
def _inverse_kernel(
    k, beta, g, tinv, S, N,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PRECISE: tl.constexpr,
):
    """``T = (I + A)^{-1}`` of chunk ``i_c`` of batch and head ``i_bh`` into ``tinv [C, C]`` (zero upper
    part), ``A = strictly_lower(diag(beta) (K K^T) * exp(G_i - G_j))``, in blocks of 16 rows (``C // 16``
    = 1, 2 or 4 of them) held in registers: the blocks of ``K K^T`` (keys ``BD`` columns at a time),
    the diagonal blocks' inverses (:func:`_diagonal_inverse`), then by block rows
    ``T_ij = -T_ii sum_{j <= l < i} A_il T_lj`` (:func:`_mm`)."""
    NB: tl.constexpr = C // 16
    tl.static_assert(NB == 1 or NB == 2 or NB == 4)
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p_t = tinv + (i_bh.to(tl.int64) * N + i_c) * (C * C)
    blk = i_c * NB  # the chunk's first block of 16 rows, as a chunk of 16 tokens
    g0 = _chunk_gate(g, i_b, blk, S, i_h, H, 16)[0]
    G0, b0 = tl.cumsum(g0, 0), _chunk_gate(beta, i_b, blk, S, i_h, H, 16)[0]
    P00 = tl.zeros([16, 16], dtype=tl.float32)
    if NB > 1:
        g1 = _chunk_gate(g, i_b, blk + 1, S, i_h, H, 16)[0]
        G1, b1 = tl.cumsum(g1, 0) + tl.sum(g0, 0), _chunk_gate(beta, i_b, blk + 1, S, i_h, H, 16)[0]
        P10 = tl.zeros([16, 16], dtype=tl.float32)
        P11 = tl.zeros([16, 16], dtype=tl.float32)
    if NB > 2:
        g2 = _chunk_gate(g, i_b, blk + 2, S, i_h, H, 16)[0]
        g3 = _chunk_gate(g, i_b, blk + 3, S, i_h, H, 16)[0]
        G2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
        G3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
        b2, b3 = _chunk_gate(beta, i_b, blk + 2, S, i_h, H, 16)[0], _chunk_gate(beta, i_b, blk + 3, S, i_h, H, 16)[0]
        P20 = tl.zeros([16, 16], dtype=tl.float32)
        P21 = tl.zeros([16, 16], dtype=tl.float32)
        P22 = tl.zeros([16, 16], dtype=tl.float32)
        P30 = tl.zeros([16, 16], dtype=tl.float32)
        P31 = tl.zeros([16, 16], dtype=tl.float32)
        P32 = tl.zeros([16, 16], dtype=tl.float32)
        P33 = tl.zeros([16, 16], dtype=tl.float32)
    for c0 in tl.static_range(0, BK, BD):
        k0 = _get_raw(_rows_at(k, i_b, blk, S, i_h, H, K, 16, c0, BD))
        P00 += _gram(k0, PRECISE)
        if NB > 1:
            k1 = _get_raw(_rows_at(k, i_b, blk + 1, S, i_h, H, K, 16, c0, BD))
            P10 += _pair(k1, k0, PRECISE)
            P11 += _gram(k1, PRECISE)
        if NB > 2:
            k2 = _get_raw(_rows_at(k, i_b, blk + 2, S, i_h, H, K, 16, c0, BD))
            k3 = _get_raw(_rows_at(k, i_b, blk + 3, S, i_h, H, K, 16, c0, BD))
            P20 += _pair(k2, k0, PRECISE)
            P21 += _pair(k2, k1, PRECISE)
            P22 += _gram(k2, PRECISE)
            P30 += _pair(k3, k0, PRECISE)
            P31 += _pair(k3, k1, PRECISE)
            P32 += _pair(k3, k2, PRECISE)
            P33 += _gram(k3, PRECISE)
    for i in tl.static_range(NB):  # the upper blocks
        for j in tl.static_range(i + 1, NB):
            _put_block(p_t, i, j, C, tl.zeros([16, 16], dtype=tl.float32))
    T00 = _diagonal_inverse(_decayed(P00, b0, G0, G0, True))
    _put_block(p_t, 0, 0, C, T00)
    if NB > 1:
        T11 = _diagonal_inverse(_decayed(P11, b1, G1, G1, True))
        A10 = _decayed(P10, b1, G1, G0, False)
        T10 = -_mm(T11, _mm(A10, T00, PRECISE), PRECISE)
        _put_block(p_t, 1, 0, C, T10)
        _put_block(p_t, 1, 1, C, T11)
    if NB > 2:
        T22 = _diagonal_inverse(_decayed(P22, b2, G2, G2, True))
        T33 = _diagonal_inverse(_decayed(P33, b3, G3, G3, True))
        A21, A32 = _decayed(P21, b2, G2, G1, False), _decayed(P32, b3, G3, G2, False)
        A31 = _decayed(P31, b3, G3, G1, False)
        T21 = -_mm(T22, _mm(A21, T11, PRECISE), PRECISE)
        T32 = -_mm(T33, _mm(A32, T22, PRECISE), PRECISE)
        T20 = -_mm(T22, _mm(_decayed(P20, b2, G2, G0, False), T00, PRECISE) + _mm(A21, T10, PRECISE), PRECISE)
        T31 = -_mm(T33, _mm(A31, T11, PRECISE) + _mm(A32, T21, PRECISE), PRECISE)
        T30 = -_mm(T33, _mm(_decayed(P30, b3, G3, G0, False), T00, PRECISE) + _mm(A31, T10, PRECISE)
                   + _mm(A32, T20, PRECISE), PRECISE)
        _put_block(p_t, 2, 0, C, T20)
        _put_block(p_t, 2, 1, C, T21)
        _put_block(p_t, 2, 2, C, T22)
        _put_block(p_t, 3, 0, C, T30)
        _put_block(p_t, 3, 1, C, T31)
        _put_block(p_t, 3, 2, C, T32)
        _put_block(p_t, 3, 3, C, T33)


@triton.jit
def _solve_fwd_kernel(
    k, v, beta, g, tinv, w, u0, e, gamma, S, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BD: tl.constexpr, PRECISE: tl.constexpr,
):
    """Chunk ``i_c`` of batch and head ``i_bh``: ``W``, ``U0``, ``E``, ``gamma`` from ``T`` (:func:`_inverse_kernel`),
    the keys and values ``BD`` columns at a time."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    idx = i_bh.to(tl.int64) * N + i_c
    rc = tl.arange(0, C)
    b_beta, _, _ = _chunk_gate(beta, i_b, i_c, S, i_h, H, C)
    b_g, _, _ = _chunk_gate(g, i_b, i_c, S, i_h, H, C)
    b_G = tl.cumsum(b_g, 0)
    b_GC = tl.sum(b_g, 0)
    b_T = _load(tinv, idx, C, C, rc, rc).to(tl.float32)
    scale_w, to_end = b_beta * tl.exp(b_G), tl.exp(b_GC - b_G)
    b_Tw = b_T.to(w.dtype.element_ty)  # W is stored in its dtype (the inputs'): its product's operands too
    for c0 in tl.static_range(0, BK, BD):
        b_k = _get(_rows_at(k, i_b, i_c, S, i_h, H, K, C, c0, BD))
        _put(_tile_at(w, idx, C, K, c0, BD), _dot(b_Tw, b_k * scale_w[:, None]))
        _put(_tile_at(e, idx, C, K, c0, BD), b_k * to_end[:, None])
    for c0 in tl.static_range(0, BV, BD):
        b_v = _get(_rows_at(v, i_b, i_c, S, i_h, H, V, C, c0, BD))
        _put(_tile_at(u0, idx, C, V, c0, BD), _mm(b_T, b_v * b_beta[:, None], PRECISE))
    tl.store(gamma + idx, tl.exp(b_GC))


@triton.jit
def _solve_bwd_kernel(
    k, v, beta, g, tinv, dw, de, dgamma, du0, dk_in, dg_in, dk, dv, dbeta, dg, S, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BD: tl.constexpr, NKB: tl.constexpr, PRECISE: tl.constexpr, HAS_READS: tl.constexpr,
):
    """Gradients of chunk ``i_c``'s keys, values, betas and log gates from those of ``W, U0, E, gamma``
    (the module docstring's chain rule through ``T``; ``dW, dE [C, K]`` and the ``NKB`` shares of
    ``dgamma`` from :func:`_grads_kernel`), ``BD`` columns at a time: the keys' side
    (``dT = dW Rw^T``, ``P = K K^T``, row sums with ``dRw = T^T dW`` and ``dE``), the values' side
    (``dT += dU0 Ru^T``, ``dRu = T^T dU0``, ``dv``), ``dA = -strictly_lower(T^T dT T^T)``, then the
    keys' gradient (``dRw`` recomputed); with ``HAS_READS`` plus the reads' shares ``dk_in`` and
    ``dg_in`` (its ``NKB`` shares per token); the gradients are stored in their inputs' dtypes."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    idx = i_bh.to(tl.int64) * N + i_c
    rc = tl.arange(0, C)
    b_beta, offs, valid = _chunk_gate(beta, i_b, i_c, S, i_h, H, C)
    b_g, _, _ = _chunk_gate(g, i_b, i_c, S, i_h, H, C)
    b_G = tl.cumsum(b_g, 0)
    b_GC = tl.sum(b_g, 0)
    scale_w, to_end = b_beta * tl.exp(b_G), tl.exp(b_GC - b_G)
    # T^T in the inputs' dtype (T is stored in it) for every product with it, dA's included
    b_Tl = _load_t(tinv, idx, C, C, rc, rc).to(dw.dtype.element_ty)
    b_dT = tl.zeros([C, C], dtype=tl.float32)
    b_P = tl.zeros([C, C], dtype=tl.float32)
    k_drw = tl.zeros([C], dtype=tl.float32)
    k_de = tl.zeros([C], dtype=tl.float32)
    v_dru = tl.zeros([C], dtype=tl.float32)
    # products of two tiles stored in the inputs' dtype take it (exact, as tf32 ones of the same
    # values were); the row scalings of their right-hand sides come after, on dT's columns
    for c0 in range(0, BK, BD):
        b_k = _get_raw(_rows_at(k, i_b, i_c, S, i_h, H, K, C, c0, BD))
        b_dw = _get_raw(_tile_at(dw, idx, C, K, c0, BD))
        b_P += _gram(b_k, PRECISE)
        b_dT += _pair(b_dw, b_k, PRECISE) * scale_w[None, :]
        k_drw += tl.sum(b_k.to(tl.float32) * _dot(b_Tl, b_dw), 1)
        k_de += tl.sum(b_k.to(tl.float32) * _get(_tile_at(de, idx, C, K, c0, BD)), 1)
    for c0 in range(0, BV, BD):
        b_v = _get_raw(_rows_at(v, i_b, i_c, S, i_h, H, V, C, c0, BD))
        b_du0 = _get_raw(_tile_at(du0, idx, C, V, c0, BD))
        b_dT += _pair(b_du0, b_v, PRECISE) * b_beta[None, :]
        b_dru = _dot(b_Tl, b_du0)
        v_dru += tl.sum(b_v.to(tl.float32) * b_dru, 1)
        _put(_rows_at(dv, i_b, i_c, S, i_h, H, V, C, c0, BD), b_dru * b_beta[:, None])
    b_dA = -_dot(_dot(b_Tl, b_dT).to(b_Tl.dtype), b_Tl)
    decay = _strict_decay(b_G, C)  # zero on and above the diagonal: masks dA to the strictly lower part
    b_dP = b_dA * b_beta[:, None] * decay
    s_e = to_end * k_de
    b_dAA = b_dP * b_P  # dA * A
    b_dgamma = tl.sum(tl.load(dgamma + idx * NKB + tl.arange(0, NKB)), 0)
    b_dbeta = tl.sum(b_dA * b_P * decay, 1) + tl.exp(b_G) * k_drw + v_dru
    b_dG = tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0) + scale_w * k_drw - s_e
    b_dG += tl.where(rc == C - 1, tl.sum(s_e, 0) + tl.exp(b_GC) * b_dgamma, 0.0)
    b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG  # suffix sums: G_i sums g_1..g_i
    if HAS_READS:
        for i in tl.static_range(NKB):
            b_dg += tl.load(dg_in + offs * NKB + i, mask=valid, other=0.0)
    tl.store(dbeta + offs, b_dbeta.to(dbeta.dtype.element_ty), mask=valid)
    tl.store(dg + offs, b_dg.to(dg.dtype.element_ty), mask=valid)
    b_dPs = b_dP + tl.trans(b_dP)
    for c0 in range(0, BK, BD):
        b_dk = _dot(b_dPs.to(b_Tl.dtype), _get_raw(_rows_at(k, i_b, i_c, S, i_h, H, K, C, c0, BD)))
        b_dk += _dot(b_Tl, _get_raw(_tile_at(dw, idx, C, K, c0, BD))) * scale_w[:, None]
        b_dk += _get(_tile_at(de, idx, C, K, c0, BD)) * to_end[:, None]
        if HAS_READS:
            b_dk += _get(_rows_at(dk_in, i_b, i_c, S, i_h, H, K, C, c0, BD))
        _put(_rows_at(dk, i_b, i_c, S, i_h, H, K, C, c0, BD), b_dk)


# ----------------------------------------------------------------------------- queries' reads


@triton.jit
def _causal_decay(G, C: tl.constexpr):
    """``exp(G_i - G_j)`` for ``j <= i``, else 0."""
    r = tl.arange(0, C)
    return tl.exp(tl.where(r[:, None] >= r[None, :], G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _read_fwd_kernel(
    q, k, g, states, u, o, attn, scale, S, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    LOW: tl.constexpr, STORE_ATTN: tl.constexpr,
):
    """Columns ``i_v`` of chunk ``i_c``'s outputs: ``O = scale * [(Q * exp(G)) S_n + Attn U_n]``; with
    ``STORE_ATTN`` also ``Attn`` (``[C, C]``, in ``attn``'s dtype) for the backward walk."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    idx = i_bh.to(tl.int64) * N + i_c
    rc, ck, cv = tl.arange(0, C), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    b_q = _chunk_rows(q, i_b, i_c, S, i_h, H, K, C, ck)
    b_k = _chunk_rows(k, i_b, i_c, S, i_h, H, K, C, ck)
    b_g, _, _ = _chunk_gate(g, i_b, i_c, S, i_h, H, C)
    b_G = tl.cumsum(b_g, 0)
    b_attn = _dot(_as(b_q, LOW), tl.trans(b_k)) * _causal_decay(b_G, C)
    if STORE_ATTN:
        if i_v == 0:
            _store(attn, idx, C, C, rc, rc, b_attn)
    b_o = _dot(_as(b_q * tl.exp(b_G)[:, None], LOW), _load(states, idx, K, V, ck, cv))
    b_o += _dot(_as(b_attn, LOW), _load(u, idx, C, V, rc, cv))
    _store_rows(o, scale * b_o, i_b, i_c, S, i_h, H, V, C, cv)


# ----------------------------------------------------------------------------- launchers


def _blocks(K: int, V: int, max_bv: int | None) -> tuple[int, int]:
    """``(BK, BV)``: all key rows, and a block of at most ``max_bv`` state columns (half above K = 128;
    ``None``: all), widened by :func:`_columns`."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    if max_bv is not None:
        BV = min(BV, max_bv if K <= 128 else max_bv // 2)
    return BK, _columns(BK, BV)


def _columns(BK: int, BV: int) -> int:
    """A block of ``BV`` state columns widened to at least ``min(BK, 64)`` (masked past ``V``): with
    bf16 operands, 32-column blocks under 64 or more key rows made illegal memory accesses on the
    H100 (Triton 3.6): the reverse walk at K = V = 128 (compute-sanitizer: an out-of-range shared
    address inside the compiled product) and the queries' reads at K = 128, V = 32
    (``benchmarks/kernels.md``, sixth session). The walks, which load their transposed operands
    transposed (:func:`_load_t`), run at 32 and 16 columns (``FEW_WALK_BV``; H100 checks)."""
    return max(BV, min(BK, 64))


def _walk_launch(
    K: int, V: int, walks: int, dtype: torch.dtype, device: torch.device, backward: bool,
) -> tuple[int, int, bool]:
    """State columns per program, pipeline stages of the forward (``backward``: reverse) walk over
    ``walks`` sequences x heads, and whether its programs are few: ``FWD_BV`` (``BWD_BV``) columns
    at ``WALK_STAGES``, or, when those programs leave SMs idle (``FEW_WALKS_BELOW``),
    ``FEW_WALK_BV`` columns at ``FEW_WALK_STAGES``."""
    _, BV = _blocks(K, V, BWD_BV if backward else FWD_BV)
    below = FEW_WALKS_BELOW
    if below is None:
        below = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    size = _mid_dtype(dtype).itemsize
    if triton.cdiv(V, BV) * walks >= below:
        return BV, WALK_STAGES[size][backward], False
    return min(BV, FEW_WALK_BV[backward]), FEW_WALK_STAGES[size][backward], True


def _mid_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the intermediates but ``gamma`` (module docstring): the products' operand
    dtype (float32 for float32 inputs)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


class ScanFunction(torch.autograd.Function):
    """One autograd node for the whole causal scan (solve, walk, reads): its intermediates never
    meet autograd, so each is stored in the dtype its readers need (:func:`_mid_dtype`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, C, dtype, scale, chunk_offsets):
        B, S, H, K = k.shape
        V, N, n_seq = v.shape[-1], triton.cdiv(S, C), h0.shape[0]
        BK, BVs = _blocks(K, V, None)
        precise, low, mid = dtype == torch.float32, _LOW[dtype], _mid_dtype(dtype)
        dev = k.device
        f32 = dict(dtype=torch.float32, device=dev)
        # within chunks
        w, e = torch.empty(B, H, N, C, K, dtype=mid, device=dev), torch.empty(B, H, N, C, K, dtype=mid, device=dev)
        u0 = torch.empty(B, H, N, C, V, dtype=mid, device=dev)
        gamma, tinv = torch.empty(B, H, N, **f32), torch.empty(B, H, N, C, C, dtype=mid, device=dev)
        _inverse_kernel[(N, B * H)](k, beta, g, tinv, S, N, H=H, K=K, C=C, BK=BK, BD=min(BK, INVERSE_BD),
                                    PRECISE=precise, num_warps=INVERSE_WARPS, num_stages=INVERSE_STAGES)
        _solve_fwd_kernel[(N, B * H)](k, v, beta, g, tinv, w, u0, e, gamma, S, N, H=H, K=K, V=V, C=C, BK=BK, BV=BVs,
                                      BD=min(BK, BVs, SOLVE_BD), PRECISE=precise, num_warps=SOLVE_FWD_WARPS,
                                      num_stages=SOLVE_FWD_STAGES)
        # across chunks
        BV, stages, _ = _walk_launch(K, V, n_seq * H, dtype, dev, backward=False)
        states = torch.empty(B, H, N, K, V, dtype=mid, device=dev)
        u = torch.empty(B, H, N, C, V, dtype=mid, device=dev)
        ht = torch.empty(n_seq, H, K, V, **f32)
        _fwd_kernel[(triton.cdiv(V, BV), n_seq * H)](
            w, u0, e, gamma, h0, states, u, ht, chunk_offsets, N,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, LOW=low, IS_VARLEN=chunk_offsets is not None,
            num_warps=NUM_WARPS, num_stages=stages,
        )
        del u0
        # the queries' reads
        o = attn = None
        if q is not None:
            BV = min(BVs, READ_FWD_BV)
            o = torch.empty(B, S, H, V, dtype=dtype, device=dev)
            store_attn = any(ctx.needs_input_grad[:6])
            attn = torch.empty(B, H, N, C, C, dtype=mid, device=dev) if store_attn else None
            _read_fwd_kernel[(triton.cdiv(V, BV), N, B * H)](
                q, k, g, states, u, o, attn, scale, S, N, H=H, K=K, V=V, C=C, BK=BK, BV=BV, LOW=low,
                STORE_ATTN=store_attn, num_warps=READ_FWD_WARPS,
            )
        ctx.save_for_backward(q, k, v, beta, g, tinv, w, e, gamma, states, u, attn, chunk_offsets)
        ctx.C, ctx.dtype, ctx.scale, ctx.h0_dtype, ctx.n_seq = C, dtype, scale, h0.dtype, n_seq
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, tinv, w, e, gamma, states, u, attn, chunk_offsets = ctx.saved_tensors
        B, S, H, K = k.shape
        V, C, N, n_seq = v.shape[-1], ctx.C, triton.cdiv(S, ctx.C), ctx.n_seq
        BK, BVs = _blocks(K, V, None)
        precise, low, mid = ctx.dtype == torch.float32, _LOW[ctx.dtype], _mid_dtype(ctx.dtype)
        dev = k.device
        f32 = dict(dtype=torch.float32, device=dev)
        do = None if q is None or do is None else do.contiguous()
        # the reverse walk, forming the reads' dS_n^out, and dU_n^out unless its programs are few
        # (H100, bf16, 32K: at 16 columns per program the walk took 2.12 ms forming it, 1.60 reading it)
        BV, stages, few = _walk_launch(K, V, n_seq * H, ctx.dtype, dev, backward=True)
        du = None
        if do is not None and few:
            du = torch.empty(B, H, N, C, V, dtype=mid, device=dev)
            BVd = min(BVs, DU_BV)
            _du_kernel[(triton.cdiv(V, BVd), N, B * H)](attn, do, du, ctx.scale, S, N, H=H, V=V, C=C, BV=BVd, LOW=low)
        du0, dnext = torch.empty(B, H, N, C, V, dtype=mid, device=dev), torch.empty(B, H, N, K, V, dtype=mid, device=dev)
        dh0 = torch.empty(n_seq, H, K, V, **f32)
        dht = None if dht is None else dht.contiguous()
        _bwd_kernel[(triton.cdiv(V, BV), n_seq * H)](
            w, e, gamma, q, g, do, attn, du, dht, du0, dnext, dh0, chunk_offsets, ctx.scale, S, N,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, LOW=low, HAS_DO=do is not None, HAS_DU=du is not None,
            HAS_DHT=dht is not None, IS_VARLEN=chunk_offsets is not None, num_warps=NUM_WARPS, num_stages=stages,
        )
        del du
        # dW, dE, dgamma of every chunk and the reads' dq and shares of dk, dg; then within chunks
        BD = min(BK, GRAD_BK)
        NKB = triton.cdiv(K, BD)
        dw, de = torch.empty_like(w), torch.empty_like(w)
        dgamma = torch.empty(B, H, N, NKB, **f32)
        dq = dk_read = dg_read = None
        if do is not None:
            dq, dk_read, dg_read = torch.empty_like(q), torch.empty_like(k, dtype=mid), torch.empty(B, S, H, NKB, **f32)
        _grads_kernel[(NKB, N, B * H)](
            q, k, g, states, u, do, du0, dnext, dq, dk_read, dg_read, dw, de, dgamma, ctx.scale, S, N,
            H=H, K=K, V=V, C=C, BD=BD, BV=min(BVs, GRAD_BV[mid.itemsize]), LOW=low, HAS_DO=do is not None,
            num_warps=GRAD_WARPS[mid.itemsize], num_stages=GRAD_STAGES[mid.itemsize],
        )
        dk, dv, dbeta, dg = (torch.empty_like(t) for t in (k, v, beta, g))
        _solve_bwd_kernel[(N, B * H)](k, v, beta, g, tinv, dw, de, dgamma, du0, dk_read, dg_read, dk, dv, dbeta, dg,
                                      S, N, H=H, K=K, V=V, C=C, BK=BK, BV=BVs,
                                      BD=min(BK, BVs, SOLVE_BWD_BD[mid.itemsize]), NKB=NKB, PRECISE=precise,
                                      HAS_READS=do is not None, num_warps=SOLVE_BWD_WARPS, num_stages=SOLVE_BWD_STAGES)
        return dq, dk, dv, dbeta, dg, dh0.to(ctx.h0_dtype), None, None, None, None


def scan_chunks(
    q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, initial_state: Tensor, C: int,
    dtype: torch.dtype, scale: float, chunk_offsets: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    """The causal chunked scan (module docstring: within chunks, across chunks, the queries' reads),
    differentiable in every tensor input.

    Args: ``q`` (or ``None``: final state only), ``k [B, S, H, K]``, ``v [B, S, H, V]``,
    ``beta, g [B, S, H]`` (the chunk's tail past ``S`` is zero padding); ``initial_state
    [N_seq, H, K, V]`` (``N_seq = B``, or the number of packed sequences); ``C`` the chunk length (16,
    32 or 64); ``dtype`` the products' operand dtype and the output's: float32 products to float32
    accuracy (``tf32x3``) for float32; ``scale`` of the reads; ``chunk_offsets [N_seq + 1]`` int32 of
    packed sequences (``B = 1``) or ``None``.

    Returns ``o = scale * O [B, S, H, V]`` in ``dtype`` (``None`` without ``q``) and the final states
    ``[N_seq, H, K, V]`` float32.
    """
    q = None if q is None else q.contiguous()
    k, v, beta, g, initial_state = (t.contiguous() for t in (k, v, beta, g, initial_state))
    return ScanFunction.apply(q, k, v, beta, g, initial_state, C, dtype, float(scale), chunk_offsets)
