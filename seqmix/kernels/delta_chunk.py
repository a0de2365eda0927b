"""The (gated) delta rule's recurrence across chunks in Triton, forward and backward.

The within-chunk parts are parallel over chunks and come from :func:`seqmix.ops.delta._within_chunks`
(the WY/UT form). Per sequence and head, chunk ``n`` of ``C`` tokens has ``W_n [C, K]``,
pseudo-values ``U0_n [C, V]``, keys decayed to the chunk's end ``E_n [C, K]`` and the chunk's
decay ``gamma_n`` (``exp`` of its summed log gates). From the initial state ``S_0 [K, V]``::

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

One program owns a block of state columns of one sequence and head. ``dW``, ``dE`` and
``dgamma`` sum over all columns: each column block writes its own slot, summed afterwards.

Layout: chunk-major ``[B, H, N, C, D]`` (contiguous), ``gamma [B, H, N]``, states ``[B, H, N, K, V]``
float32. Packed sequences (``chunk_offsets [N_seq + 1]``, ``B = 1``) occupy whole chunks:
sequence ``i`` owns chunks ``[chunk_offsets[i], chunk_offsets[i + 1])``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch shapes: state columns per program (halved for key dims above 128), warps, pipeline stages.
FWD_BV, BWD_BV = 64, 32
NUM_WARPS = 4
FWD_STAGES, BWD_STAGES = 2, 1


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
    return tl.load(p + idx * (R * D) + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)


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
def _fwd_kernel(
    w, u0, e, gamma, h0, states, u, ht, chunk_offsets, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
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
        b_w = _load(w, idx, C, K, rc, ck)
        b_u = _load(u0, idx, C, V, rc, cv).to(tl.float32) - _dot(b_w, b_S)  # [C, BV]
        _store(u, idx, C, V, rc, cv, b_u)
        b_e = _load(e, idx, C, K, rc, ck)
        b_S = tl.load(gamma + idx) * b_S + _dot(tl.trans(b_e), b_u)
    _store(ht, i_nh.to(tl.int64), K, V, ck, cv, b_S)


@triton.jit
def _bwd_kernel(
    w, e, gamma, states, u, dstates, du, dht, dw, du0, de, dgamma, dh0, chunk_offsets, N, SLOT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DSTATES: tl.constexpr, HAS_DU: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Gradients of columns ``i_v`` of one sequence and head, walking its chunks backward.
    ``dw``, ``de`` and ``dgamma`` get this column block's share in slot ``i_v`` (stride ``SLOT`` chunks)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    b, c0, c1 = _chunk_range(i_n, chunk_offsets, N, IS_VARLEN)
    rc, ck, cv = tl.arange(0, C), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS += _load(dht, i_nh.to(tl.int64), K, V, ck, cv).to(tl.float32)
    first = (b * H + i_h).to(tl.int64) * N
    for i in range(c1 - c0):
        idx = first + c1 - 1 - i
        slot = i_v * SLOT + idx
        b_S = _load(states, idx, K, V, ck, cv)
        b_e = _load(e, idx, C, K, rc, ck)
        b_du = _dot(b_e, b_dS)  # [C, BV]
        if HAS_DU:
            b_du += _load(du, idx, C, V, rc, cv).to(tl.float32)
        _store(du0, idx, C, V, rc, cv, b_du)
        b_u = _load(u, idx, C, V, rc, cv)
        _store(de, slot, C, K, rc, ck, _dot(b_u, tl.trans(b_dS)))
        tl.store(dgamma + slot, tl.sum(tl.sum(b_S * b_dS, 1), 0))
        _store(dw, slot, C, K, rc, ck, -_dot(b_du, tl.trans(b_S)))
        b_w = _load(w, idx, C, K, rc, ck)
        b_dS = tl.load(gamma + idx) * b_dS - _dot(tl.trans(b_w), b_du)
        if HAS_DSTATES:
            b_dS += _load(dstates, idx, K, V, ck, cv)
    _store(dh0, i_nh.to(tl.int64), K, V, ck, cv, b_dS)


def _blocks(K: int, V: int, max_bv: int) -> tuple[int, int]:
    """``(BK, BV)``: all key rows, and a block of at most ``max_bv`` state columns (half above K = 128)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), max_bv if K <= 128 else max_bv // 2)
    return BK, BV


class AcrossChunksFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; see :func:`across_chunks`."""

    @staticmethod
    def forward(ctx, w, u0, e, gamma, h0, chunk_offsets, dtype):
        w, u0, e = (t.to(dtype).contiguous() for t in (w, u0, e))
        B, H, N, C, K = w.shape
        V = u0.shape[-1]
        n_seq = h0.shape[0]
        BK, BV = _blocks(K, V, FWD_BV)
        states = torch.empty(B, H, N, K, V, dtype=torch.float32, device=w.device)
        u = torch.empty(B, H, N, C, V, dtype=torch.float32, device=w.device)
        ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=w.device)
        _fwd_kernel[(triton.cdiv(V, BV), n_seq * H)](
            w, u0, e, gamma, h0, states, u, ht, chunk_offsets, N,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, IS_VARLEN=chunk_offsets is not None, num_warps=NUM_WARPS,
            num_stages=FWD_STAGES,
        )
        ctx.save_for_backward(w, e, gamma, states, u, chunk_offsets)
        ctx.h0_dtype = h0.dtype
        ctx.set_materialize_grads(False)
        return states, u, ht

    @staticmethod
    def backward(ctx, dstates, du, dht):
        w, e, gamma, states, u, chunk_offsets = ctx.saved_tensors
        B, H, N, C, K = w.shape
        V = u.shape[-1]
        n_seq = dht.shape[0] if dht is not None else (B if chunk_offsets is None else chunk_offsets.numel() - 1)
        BK, BV = _blocks(K, V, BWD_BV)
        NV = triton.cdiv(V, BV)
        f32 = dict(dtype=torch.float32, device=w.device)
        dw, de = torch.empty(NV, B, H, N, C, K, **f32), torch.empty(NV, B, H, N, C, K, **f32)
        dgamma = torch.empty(NV, B, H, N, **f32)
        du0 = torch.empty(B, H, N, C, V, **f32)
        dh0 = torch.empty(n_seq, H, K, V, **f32)
        dstates, du, dht = (None if t is None else t.contiguous() for t in (dstates, du, dht))
        _bwd_kernel[(NV, n_seq * H)](
            w, e, gamma, states, u, dstates, du, dht, dw, du0, de, dgamma, dh0, chunk_offsets, N, B * H * N,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, HAS_DSTATES=dstates is not None, HAS_DU=du is not None,
            HAS_DHT=dht is not None, IS_VARLEN=chunk_offsets is not None, num_warps=NUM_WARPS,
            num_stages=BWD_STAGES,
        )
        return dw.sum(0), du0, de.sum(0), dgamma.sum(0), dh0.to(ctx.h0_dtype), None, None


def across_chunks(
    w: Tensor, u0: Tensor, e: Tensor, gamma: Tensor, initial_state: Tensor, chunk_offsets: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence across chunks (module docstring), differentiable in every tensor input.

    Args:
        w, e: ``[B, H, N, C, K]``; u0: ``[B, H, N, C, V]``, float32; gamma: chunk decays ``[B, H, N]``, float32.
        initial_state: ``[N_seq, H, K, V]`` (``N_seq = B``, or the number of packed sequences).
        chunk_offsets: ``[N_seq + 1]`` int32 chunk offsets of packed sequences (``B = 1``), or ``None``.
        dtype: operand dtype of the products (``W, U0, E`` are read in it, the state and ``U`` are
            cast to it); accumulation, states and gradients stay float32.

    Returns the entering states ``[B, H, N, K, V]``, the pseudo-values ``U [B, H, N, C, V]`` and the
    final states ``[N_seq, H, K, V]``, all float32.
    """
    gamma, initial_state = gamma.contiguous(), initial_state.contiguous()
    return AcrossChunksFunction.apply(w, u0, e, gamma, initial_state, chunk_offsets, dtype)
