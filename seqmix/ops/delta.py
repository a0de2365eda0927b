"""Delta rule (DeltaNet) and gated delta rule (Gated DeltaNet) in the four attention patterns.

Layout: ``q [B, T, H, K]``, ``k [B, S, H, K]``, ``v [B, S, H, V]``, ``beta [B, S, H]``,
``g [B, S, H]``, state ``[B, H, K, V]``. The state is a fast-weight memory written by the delta
rule: each token first erases what the memory returns for its key, then writes its value,

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t.

``g = None`` means ``g = 0`` (plain DeltaNet). Four forms: :func:`delta_rule` (checks and
dispatches), :func:`delta_rule_reference` (the recurrence as a loop over time),
:func:`delta_rule_chunked` (the chunked parallel form with the WY/UT representation) and
:func:`delta_rule_triton` (the same with its recurrence across chunks in Triton).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from seqmix import kernels
from seqmix.ops._checks import (
    check_cu_seqlens, check_log_gate, check_qkv, check_shape, check_tensor, needs_grad, resolve_backend, resolve_scale,
)

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_reference", "delta_rule_step", "delta_rule_triton"]


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Delta-rule (and, with ``g``, gated delta-rule) attention.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, S, H, K]``, typically L2-normalised by the mixer.
        v: values ``[B, S, H, V]``.
        beta: writing strengths ``[B, S, H]``, typically in ``(0, 1)``.
        g: optional log forget gate ``[B, S, H]``, every entry ``<= 0``; ``None`` means 0.
        causal: whether query ``i`` sees only positions ``<= i`` (needs ``S == T``).
        cross: whether ``k, v`` come from another sequence than ``q``.
        scale: output scale, ``K ** -0.5`` by default.
        initial_state: ``S_0`` of shape ``[B, H, K, V]`` (``[N, H, K, V]`` packed); zeros by default.
        output_final_state: whether to return the forward recurrence's last state.
        backend: ``"reference"``, ``"chunked"``, ``"triton"`` (the chunked form with its recurrence
            across chunks in Triton, and the fused step kernel for a single causal token without
            gradients; CUDA tensors or ``TRITON_INTERPRET=1``) or ``"auto"`` (triton on CUDA, else
            chunked).
        chunk_size: chunk length of the chunked and triton forms (triton: 16, 32 or 64, with head
            dims up to 128).
        cu_seqlens: for causal forms, offsets ``[N + 1]`` (int32/int64) of ``N`` sequences packed
            along time in a batch of one; each starts from its own initial state and has its own
            final state ``[N, H, K, V]``.

    Patterns (1-based time, ``S_t`` the recurrence above from ``S_0``):

    - causal, self or cross: ``o_t = scale * S_t^T q_t``; final state ``S_T``.
    - noncausal self: ``o_i = scale * (S_i + exp(g_{i+1}) R_{i+1})^T q_i`` with the exclusive
      backward recurrence ``R_{T+1} = 0``,
      ``R_j = exp(g_{j+1}) (I - beta_j k_j k_j^T) R_{j+1} + beta_j k_j v_j^T``, ``g_{T+1} := 0``;
      token ``j > i`` reaches query ``i`` with decay ``exp(sum_{l=i+1..j} g_l)``, each token
      counted once. Final state ``S_T``.
    - noncausal cross: ``o_i = scale * S_S^T q_i`` for every query; final state ``S_S``.

    Returns:
        ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` or ``None)``; the state is in
        ``promote_types(q.dtype, float32)``.
    """
    B, T, S, H, K, V = check_qkv(q, k, v, causal=causal)
    if not isinstance(cross, bool):
        raise TypeError(f"cross must be True or False, got {cross!r}")
    if not causal and not cross and S != T:
        raise ValueError(
            f"noncausal self-attention needs k and v of q's length: q has length {T}, k and v have {S} "
            "(pass cross=True to attend to another sequence)"
        )
    check_tensor("beta", beta, 3, like=q)
    check_shape("beta", beta, (B, S, H), q)
    if g is not None:
        check_log_gate("g", g, q, [(B, S, H)])
    n_seq = check_cu_seqlens(cu_seqlens, q, causal=causal)
    check_shape("initial_state", initial_state, (B if n_seq is None else n_seq, H, K, V), q)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    scale = resolve_scale(scale, K)
    why_not = {"triton": reason} if (reason := _triton_unsupported(q, K, V, chunk_size)) else {}
    available = ("reference", "chunked") + (() if why_not else ("triton",))
    backend = resolve_backend("delta_rule", backend, available, q.device, why_not)
    kwargs = dict(
        g=g, causal=causal, cross=cross, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )
    if backend == "triton":
        return delta_rule_triton(q, k, v, beta, **kwargs, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    run = delta_rule_reference if backend == "reference" else partial(delta_rule_chunked, chunk_size=chunk_size)
    if cu_seqlens is not None:
        return _each_sequence(run, q, k, v, beta, cu_seqlens=cu_seqlens, **kwargs)
    return run(q, k, v, beta, **kwargs)


def _triton_unsupported(q: Tensor, K: int, V: int, chunk_size: int) -> str | None:
    """Why the Triton kernels cannot take this call; their per-chunk tiles (``C x C``, ``C x K``,
    ``C x V``) must fit one multiprocessor's shared memory."""
    if reason := kernels.unsupported(q, (K, V), chunk_size):
        return reason
    if chunk_size > 64 or max(K, V) > 128:
        return f"the delta rule's kernels take chunk_size <= 64 and head dims <= 128, got chunk_size {chunk_size}, head dims {(K, V)}"
    return None


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, initial_state: Tensor | None,
    n_seq: int | None = None, keep_inputs: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Casts to the state dtype; fills in ``g = 0`` and ``S_0 = 0`` (one per sequence: ``n_seq``, or
    the batch). ``keep_inputs`` leaves q, k, v and beta in their dtype (the Triton kernels read them
    as they are and compute in float32)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, _, H, K = k.shape
    B = B if n_seq is None else n_seq
    V = v.shape[-1]
    g = torch.zeros_like(beta, dtype=dtype) if g is None else g.to(dtype)
    if initial_state is None:
        initial_state = torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
    inputs = (q, k, v, beta) if keep_inputs else (q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype))
    return *inputs, g, initial_state.to(dtype)


# --------------------------------------------------------------------------- reference


def _recurrent(
    q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor
) -> tuple[Tensor | None, Tensor]:
    """The forward recurrence, one token at a time; reads ``S_t^T q_t`` (inclusive) when q is given."""
    outputs = []
    for t in range(k.shape[1]):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]  # (B, H, K), (B, H, 1, 1)
        erase = k_t[..., :, None] * torch.einsum("bhk,bhkv->bhv", k_t, state)[..., None, :]  # (B, H, K, V)
        write = k_t[..., :, None] * v[:, t, :, None, :]
        state = g[:, t, :, None, None].exp() * (state - b_t * erase) + b_t * write
        if q is not None:
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return (torch.stack(outputs, dim=1) if q is not None else None), state


def _recurrent_backward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    """The exclusive backward recurrence ``R`` read by each query: ``exp(g_{i+1}) R_{i+1}^T q_i``."""
    B, T, H, K = k.shape
    R = torch.zeros(B, H, K, v.shape[-1], dtype=k.dtype, device=k.device)  # R_{T+1}
    outputs = []
    for j in reversed(range(T)):
        P = (g[:, j + 1, :, None, None].exp() * R) if j + 1 < T else R  # exp(g_{j+1}) R_{j+1}
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, j], P))
        k_j, b_j = k[:, j], beta[:, j, :, None, None]
        erase = k_j[..., :, None] * torch.einsum("bhk,bhkv->bhv", k_j, P)[..., None, :]
        R = P - b_j * erase + b_j * k_j[..., :, None] * v[:, j, :, None, :]
    return torch.stack(outputs[::-1], dim=1)


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The defining recurrences of :func:`delta_rule` as loops over time (forward, and the exclusive
    backward one for noncausal self); inputs are not checked. Differentiable by autograd; float64
    inputs run in float64."""
    scale, out_dtype = resolve_scale(scale, q.shape[-1]), q.dtype
    q, k, v, beta, g, state = _prepare(q, k, v, beta, g, initial_state)
    if causal:
        o, state = _recurrent(q, k, v, beta, g, state)
    elif cross:
        _, state = _recurrent(None, k, v, beta, g, state)
        o = torch.einsum("bthk,bhkv->bthv", q, state)
    else:
        o, state = _recurrent(q, k, v, beta, g, state)
        o = o + _recurrent_backward(q, k, v, beta, g)
    return (scale * o).to(out_dtype), (state if output_final_state else None)


# --------------------------------------------------------------------------- chunked


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """``[B, S, H, D]`` -> ``[B, H, N, C, D]``, zero-padding the time axis to ``N * C``."""
    B, S, H, D = x.shape
    N = -(-S // C)
    x = F.pad(x, (0, 0, 0, 0, 0, N * C - S))
    return x.reshape(B, N, C, H, D).permute(0, 3, 1, 2, 4)


def _chunk_gates(g: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """The gate's cumsum within each chunk ``G [B, H, N, C]`` and ``G_i - G_j [B, H, N, C, C]``."""
    G = _to_chunks(g[..., None], C)[..., 0].cumsum(-1)
    return G, G[..., :, None] - G[..., None, :]


def _decay(diff: Tensor, diagonal: int) -> Tensor:
    """``exp(G_i - G_j)`` on and below diagonal ``diagonal`` (0 or -1), else 0; masking to -inf
    before exponentiating keeps every exponent <= 0."""
    C = diff.shape[-1]
    keep = torch.ones(C, C, dtype=torch.bool, device=diff.device).tril(diagonal)
    return diff.masked_fill(~keep, float("-inf")).exp()


def _solve_chunks(k: Tensor, v: Tensor, beta: Tensor, g: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every chunk's ``W [B, H, N, C, K]``, ``U0 [B, H, N, C, V]``, keys decayed to its end
    ``[B, H, N, C, K]`` and decay ``gamma = exp(G_C) [B, H, N]`` (see :func:`_chunked_scan`); the
    Triton form is in :mod:`seqmix.kernels.delta_chunk`."""
    G, diff = _chunk_gates(g, C)
    k, v = _to_chunks(k, C), _to_chunks(v, C)
    beta = _to_chunks(beta[..., None], C)[..., 0]  # (B, H, N, C)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * _decay(diff, -1)
    rhs = torch.cat([k * (beta * G.exp())[..., None], v * beta[..., None]], dim=-1)
    w, u0 = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([k.shape[-1], v.shape[-1]], dim=-1)
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    return w, u0, k_to_end, G[..., -1].exp()


def _read_chunks(q: Tensor, k: Tensor, g: Tensor, entering: Tensor, U: Tensor, C: int, scale: float) -> Tensor:
    """The queries' reads ``O = scale * [(Q * exp(G)) S_n + ((Q K^T) * exp(G_i - G_j) [j <= i]) U_n]``
    per chunk, as ``o [B, S, H, V]`` in the state's dtype. The Triton form is
    :mod:`seqmix.kernels.delta_chunk`."""
    G, diff = _chunk_gates(g, C)
    qc, kc = _to_chunks(q, C), _to_chunks(k, C)
    q_from_start, attn = qc * G.exp()[..., None], (qc @ kc.transpose(-1, -2)) * _decay(diff, 0)
    o = scale * (q_from_start @ entering + attn @ U)  # (B, H, N, C, V)
    B, H, N, _, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, : q.shape[1]]


def _across_chunks(w: Tensor, u0: Tensor, k_to_end: Tensor, gamma: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence across chunks as a loop: ``U_n = U0_n - W_n S_n``,
    ``S_{n+1} = gamma_n S_n + k_to_end_n^T U_n``; returns the entering states ``[B, H, N, K, V]``,
    ``U [B, H, N, C, V]`` and the final state (the Triton form: :mod:`seqmix.kernels.delta_chunk`)."""
    entering, pseudo = [], []
    for n in range(w.shape[2]):
        U = u0[:, :, n] - w[:, :, n] @ state  # (B, H, C, V)
        entering.append(state)
        pseudo.append(U)
        state = gamma[:, :, n, None, None] * state + k_to_end[:, :, n].transpose(-1, -2) @ U
    return torch.stack(entering, dim=2), torch.stack(pseudo, dim=2), state


def _chunked_scan(
    q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor, chunk_size: int,
    solve: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] = _solve_chunks,
    across: Callable[..., tuple[Tensor, Tensor, Tensor]] = _across_chunks,
    read: Callable[..., Tensor] = partial(_read_chunks, scale=1.0),
) -> tuple[Tensor | None, Tensor]:
    """The forward recurrence in chunks of C tokens; reads ``S_t^T q_t`` (inclusive) when q is given.

    Within a chunk (local cumulative gate ``G_i = g_1 + ... + g_i``, start state ``S_0``) write
    ``S_t = exp(g_t) S_{t-1} + k_t u_t^T`` with pseudo-values ``u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)``.
    Unrolling gives ``(I + A) U = diag(beta) V - diag(beta exp(G)) K S_0`` with the strictly lower
    ``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)`` (j < i), so ``U = U0 - W S_0`` where ``U0, W`` come
    from one unit-lower-triangular solve for all chunks at once. Then

        O   = (Q * exp(G)) S_0 + ((Q K^T) * exp(G_i - G_j) [j <= i]) U,
        S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T U.

    Every exponent is ``<= 0``. Padded tokens (``beta = 0, g = 0``) leave the state unchanged.
    ``solve(k, v, beta, g, C)`` (:func:`_solve_chunks`, or the Triton kernels) gives every chunk's
    ``W, U0``, keys decayed to its end and decay. Only the state recurrence is sequential:
    ``across(w, u0, k_to_end, gamma, state)`` (the loop :func:`_across_chunks`, or the Triton
    kernel) gives every chunk's entering state and ``U``; ``read(q, k, g, entering, U, C)``
    (:func:`_read_chunks` with its scale, or the Triton kernels) the outputs ``scale * O``.
    """
    entering, U, state = across(*solve(k, v, beta, g, chunk_size), state)
    if q is None:
        return None, state
    return read(q, k, g, entering, U, chunk_size), state


def _reversed_inputs(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    """Time-flipped inputs for the backward recurrence; its gate is ``g`` flipped and shifted by one,
    so that reversed step ``s`` (token ``j = T+1-s``) decays by ``g_{j+1}`` (0 for the first)."""
    g_rev = g.flip(1)
    gb = torch.cat([torch.zeros_like(g_rev[:, :1]), g_rev[:, :-1]], dim=1)
    return q.flip(1), k.flip(1), v.flip(1), beta.flip(1), gb


def _by_pattern(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor, *, causal: bool, cross: bool,
    scan: Callable[..., tuple[Tensor | None, Tensor]], scale: float,
) -> tuple[Tensor, Tensor]:
    """The patterns from the causal scan ``scan(q or None, k, v, beta, g, state)``, whose reads
    are scaled by ``scale``: ``o`` (scaled) and the final state.

    The noncausal-self backward part reuses the causal scan on the flipped sequence (gate ``g``
    flipped and shifted by one): its read before reversed token ``s`` with query
    ``exp(gb_s) q'_s`` equals the inclusive read at ``s - 1`` with the query shifted by one.
    """
    if causal:
        return scan(q, k, v, beta, g, state)
    if cross:
        _, final = scan(None, k, v, beta, g, state)
        return scale * torch.einsum("bthk,bhkv->bthv", q.to(final.dtype), final), final
    o, final = scan(q, k, v, beta, g, state)
    qb, kb, vb, bb, gb = _reversed_inputs(q, k, v, beta, g)
    q_next = torch.cat([qb[:, 1:] * gb[:, 1:, :, None].exp(), torch.zeros_like(qb[:, :1])], dim=1)
    ob, _ = scan(q_next, kb, vb, bb, gb, torch.zeros_like(state))
    return o + torch.cat([torch.zeros_like(ob[:, :1]), ob[:, :-1]], dim=1).flip(1), final


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """:func:`delta_rule` in chunked parallel form (:func:`_chunked_scan` composed by
    :func:`_by_pattern`); inputs are not checked."""
    scale, out_dtype = resolve_scale(scale, q.shape[-1]), q.dtype
    q, k, v, beta, g, state = _prepare(q, k, v, beta, g, initial_state)
    C = min(chunk_size, k.shape[1])
    scan = partial(_chunked_scan, chunk_size=C, read=partial(_read_chunks, scale=scale))
    o, final = _by_pattern(q, k, v, beta, g, state, causal=causal, cross=cross, scan=scan, scale=scale)
    return o.to(out_dtype), (final if output_final_state else None)


def _chunk_aligned(cu_seqlens: Tensor, C: int) -> tuple[Tensor, Tensor, int]:
    """Packed sequences laid out so that each starts a chunk: the slot of every packed token
    ``[T]``, the chunk offsets of the sequences ``[N_seq + 1]`` (int32) and the padded length."""
    bounds = cu_seqlens.tolist()
    slots, offsets = [], [0]
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        slots.append(torch.arange(eos - bos) + offsets[-1] * C)
        offsets.append(offsets[-1] + -(-(eos - bos) // C))
    device = cu_seqlens.device
    return torch.cat(slots).to(device), torch.tensor(offsets, dtype=torch.int32, device=device), offsets[-1] * C


def delta_rule_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`delta_rule` as :func:`delta_rule_chunked` with the three parts of its scan in Triton
    (:mod:`seqmix.kernels.delta_chunk`, one autograd node): each chunk's ``W, U0``, the recurrence
    across chunks and the queries' reads (products with q's dtype as operands, float32 accumulation;
    intermediates that are only read as operands stored in q's dtype). A
    single causal token without gradients runs the fused step kernel.
    Packed sequences (``cu_seqlens``) are laid out chunk-aligned (zero padding: no write, no decay)
    and walked by the kernel per sequence. Inputs are not checked."""
    from seqmix.kernels.delta_chunk import scan_chunks

    scale, out_dtype = resolve_scale(scale, q.shape[-1]), q.dtype
    if causal and q.shape[1] == 1 and cu_seqlens is None and not needs_grad(q, k, v, beta, g, initial_state):
        B, _, H, K = q.shape
        S0 = initial_state if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
        o, final = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], S0, g=None if g is None else g[:, 0],
                                   scale=scale, backend="triton")
        return o[:, None], (final if output_final_state else None)
    n_seq = None if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, beta, g, state = _prepare(q, k, v, beta, g, initial_state, n_seq, keep_inputs=True)

    def scan(*inputs: Tensor, chunk_offsets: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        # the three parts of _chunked_scan (solve, across, read) under one autograd node
        return scan_chunks(*inputs, chunk_size, dtype=out_dtype, scale=scale, chunk_offsets=chunk_offsets)

    if cu_seqlens is None:
        o, final = _by_pattern(q, k, v, beta, g, state, causal=causal, cross=cross, scan=scan, scale=scale)
    else:
        slots, offsets, length = _chunk_aligned(cu_seqlens, chunk_size)

        def aligned(x: Tensor) -> Tensor:
            return x.new_zeros(1, length, *x.shape[2:]).index_copy(1, slots, x)

        o, final = scan(*map(aligned, (q, k, v, beta, g)), state, chunk_offsets=offsets)
        o = o[:, slots]
    return o.to(out_dtype), (final if output_final_state else None)


def _each_sequence(
    run: Callable[..., tuple[Tensor, Tensor | None]], q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
    cu_seqlens: Tensor, *, initial_state: Tensor | None, output_final_state: bool, **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """``run`` on each sequence packed by ``cu_seqlens``; outputs packed again, final states stacked."""
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, final = run(
            q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], beta[:, bos:eos], g=None if g is None else g[:, bos:eos],
            initial_state=None if initial_state is None else initial_state[n : n + 1], output_final_state=True, **kwargs,
        )
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), (torch.cat(finals) if output_final_state else None)


def delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Tensor, *, g: Tensor | None = None,
    scale: float | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One decoding step of the (gated) delta rule:
    ``S' = exp(g) (I - beta k k^T) S + beta k v^T``, ``o = scale * S'^T q``.

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; beta: ``[B, H]``; g: log gate ``[B, H]`` or ``None``.
        state: ``[B, H, K, V]``, the state before this token.
        scale: defaults to ``K ** -0.5``.
        backend: ``"reference"`` (PyTorch), ``"triton"`` (one fused kernel; CUDA tensors or
            ``TRITON_INTERPRET=1``; no gradients) or ``"auto"`` (triton on CUDA).

    Returns ``o [B, H, V]`` in q's dtype and the new state in ``promote_types(q.dtype, float32)``.
    """
    check_qkv(q[:, None], k[:, None], v[:, None], causal=True)
    B, H, K = q.shape
    V = v.shape[-1]
    check_tensor("beta", beta, 2, like=q)
    check_shape("beta", beta, (B, H), q)
    if g is not None:
        check_log_gate("g", g, q, [(B, H)])
    check_shape("state", state, (B, H, K, V), q)
    scale = resolve_scale(scale, K)
    why_not = {"triton": reason} if (reason := kernels.step_unsupported(q, (K, V), state, k, v, beta, g)) else {}
    available = ("reference",) + (() if why_not else ("triton",))
    backend = resolve_backend("delta_rule_step", backend, available, q.device, why_not)
    if backend == "triton":
        from seqmix.kernels.step import step

        return step(q, k, v, state, scale=scale, g=g, beta=beta)
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, beta, S = q.to(acc), k.to(acc), v.to(acc), beta.to(acc), state.to(acc)
    if g is not None:
        S = torch.exp(g.to(acc))[..., None, None] * S
    u = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    return (scale * torch.einsum("bhk,bhkv->bhv", q, S)).to(q.dtype), S
