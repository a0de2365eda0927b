"""Gated linear attention: a matrix state decayed by a log forget gate, in the four patterns.

Layout: ``q [B, T, H, K]``, ``k [B, S, H, K]``, ``v [B, S, H, V]``, state ``[B, H, K, V]``. The log
forget gate ``g <= 0`` is aligned with the keys: one per head ``[B, S, H]`` (RetNet, Mamba-2,
simple GLA), one per key channel ``[B, S, H, K]`` (GLA), or ``None`` (no decay: plain linear
attention). States accumulate in ``torch.promote_types(q.dtype, torch.float32)``; ``o`` has q's
dtype.

Causal, self or cross over an aligned context (``S == T``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S_0 = initial_state, or 0
    o_t = scale * q_t^T S_t                         final state S_T

Noncausal self (``S == T``), bidirectional, each position counted once, with ``G = cumsum(g)``
over time (per channel for per-channel gates)::

    o_i = scale * sum_j (q_i * exp(-|G_i - G_j|)) . k_j  v_j  +  scale * (q_i * exp(G_i))^T S_0

that is the causal ``o_i`` plus a backward pass exclusive of ``i``, in which ``j > i`` has weight
``exp(g_{i+1} + ... + g_j)``. Final state: the causal ``S_T``.

Noncausal cross (any ``S``): the causal recurrence runs over the whole context and every query
reads its end, ``o_i = scale * q_i^T S_S``; final state ``S_S``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from seqmix import kernels
from seqmix.ops._checks import (
    check_cu_seqlens, check_log_gate, check_qkv, check_shape, needs_grad, resolve_backend, resolve_scale,
)


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention (equations in the module docstring), checked and dispatched.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, S, H, K]``; v: ``[B, S, H, V]``.
        g: log forget gate ``<= 0``, ``[B, S, H]``, ``[B, S, H, K]`` or ``None`` (no decay).
        causal: required; causal forms need ``S == T``.
        cross: whether k, v come from another sequence than q.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]``, the state before the first key.
        output_final_state: also return the final state.
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"triton"`` (CUDA tensors, or
            ``TRITON_INTERPRET=1``; ``"auto"`` picks it on CUDA).
        chunk_size: chunk length of the chunked and triton backends (triton: 16, 32, 64 or 128).
        cu_seqlens: for causal forms, offsets ``[N + 1]`` (int32/int64) of ``N`` sequences packed
            along time in a batch of one, as FlashAttention's varlen API; each starts from its own
            initial state (``[N, H, K, V]``) and has its own final state.

    Returns:
        ``o [B, T, H, V]`` and the final state ``[B, H, K, V]`` (``[N, H, K, V]`` packed) or ``None``.
    """
    if not isinstance(cross, bool):
        raise TypeError(f"cross must be True or False, got {cross!r}")
    B, T, S, H, K, V = check_qkv(q, k, v, causal=causal)
    if not cross and S != T:
        raise ValueError(f"self forms need k and v as long as q: q has length {T}, k and v have {S}; pass cross=True")
    if g is not None:
        check_log_gate("g", g, q, [(B, S, H), (B, S, H, K)])
    n_seq = check_cu_seqlens(cu_seqlens, q, causal=causal)
    check_shape("initial_state", initial_state, (B if n_seq is None else n_seq, H, K, V), q)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    scale = resolve_scale(scale, K)
    why_not = {"triton": reason} if (reason := _triton_unsupported(q, g, K, V, chunk_size)) else {}
    available = ("reference", "chunked") + (() if why_not else ("triton",))
    backend = resolve_backend("gated_linear_attention", backend, available, q.device, why_not)
    kwargs = dict(causal=causal, cross=cross, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if backend == "triton":
        return gated_linear_attention_triton(q, k, v, g, chunk_size=chunk_size, cu_seqlens=cu_seqlens, **kwargs)
    if backend == "reference":
        run = gated_linear_attention_reference
    else:
        run = partial(gated_linear_attention_chunked, chunk_size=chunk_size)
    if cu_seqlens is not None:
        return _each_sequence(run, q, k, v, g, cu_seqlens, **kwargs)
    return run(q, k, v, g, **kwargs)


def _each_sequence(
    run: Callable[..., tuple[Tensor, Tensor | None]], q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
    cu_seqlens: Tensor, *, causal: bool, cross: bool, scale: float, initial_state: Tensor | None, output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """``run`` on each sequence packed by ``cu_seqlens``; outputs packed again, final states stacked."""
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, final = run(
            q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], None if g is None else g[:, bos:eos],
            causal=causal, cross=cross, scale=scale, initial_state=h0, output_final_state=True,
        )
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), (torch.cat(finals) if output_final_state else None)


def _triton_unsupported(q: Tensor, g: Tensor | None, K: int, V: int, chunk_size: int) -> str | None:
    return kernels.unsupported(q, (K, V), chunk_size)


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Casts to the accumulation dtype; a gate becomes ``[B, S, H, 1]`` (per head) or ``[B, S, H, K]``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    if g is not None:
        g = (g.unsqueeze(-1) if g.dim() == 3 else g).to(acc)
    if initial_state is not None:
        initial_state = initial_state.to(acc)
    return q.to(acc), k.to(acc), v.to(acc), g, initial_state


def gated_linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The defining form: a loop over time for the state, the quadratic formula for noncausal self.

    Same arguments and results as :func:`gated_linear_attention`; inputs are not checked.
    """
    out_dtype = q.dtype
    scale = resolve_scale(scale, q.shape[-1])
    q, k, v, g, initial_state = _prepare(q, k, v, g, initial_state)
    g = torch.zeros_like(k) if g is None else g.expand_as(k)  # [B, S, H, K]
    B, S, H, K = k.shape
    state = initial_state if initial_state is not None else k.new_zeros(B, H, K, v.shape[-1])
    states = []  # S_1 .. S_S, each [B, H, K, V]
    for t in range(S):
        state = torch.exp(g[:, t]).unsqueeze(-1) * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        states.append(state)
    if causal:
        o = torch.einsum("bthk,bthkv->bthv", q, torch.stack(states, dim=1))
    elif cross:
        o = torch.einsum("bthk,bhkv->bthv", q, state)
    else:
        G = g.cumsum(dim=1)  # [B, T, H, K]
        diff = G.unsqueeze(2) - G.unsqueeze(1)  # [B, T(i), T(j), H, K]: G_i - G_j
        after = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)[:, :, None, None]  # j > i
        w = torch.exp(torch.where(after, -diff, diff))  # exp(-|G_i - G_j|), each branch <= 0 where taken
        o = torch.einsum("bihk,bijhk,bjhk,bjhv->bihv", q, w, k, v)
        if initial_state is not None:
            o = o + torch.einsum("bihk,bhkv->bihv", q * torch.exp(G), initial_state)
    o = scale * o
    return o.to(out_dtype), (state if output_final_state else None)


def _to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """``[B, L, H, X]`` -> ``[B, H, N, C, X]``, zero-padding the time axis to ``N * C``."""
    B, L, H, X = x.shape
    n = -(-L // chunk_size)
    x = F.pad(x, (0, 0, 0, 0, 0, n * chunk_size - L))
    return x.reshape(B, n, chunk_size, H, X).permute(0, 3, 1, 2, 4)


def _state_pass(k: Tensor, v: Tensor, gc: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """States entering each chunk ``[B, H, N, K, V]`` and the final state ``[B, H, K, V]``.

    ``k [B, H, N, C, K]``, ``v [B, H, N, C, V]``, ``gc [B, H, N, C, 1 or K]`` the gate's cumsum
    within each chunk. Per chunk: ``S_next = diag(exp(Gc_last)) S + sum_j (k_j * exp(Gc_last - Gc_j)) v_j^T``.
    """
    B, H, N, _, K = k.shape
    g_last = gc[..., -1:, :]  # [B, H, N, 1, K']
    update = (k * torch.exp(g_last - gc)).transpose(-1, -2) @ v  # [B, H, N, K, V]
    decay = torch.exp(g_last).transpose(-1, -2)  # [B, H, N, K', 1]
    state = initial_state if initial_state is not None else k.new_zeros(B, H, K, v.shape[-1])
    entering = []
    for n in range(N):
        entering.append(state)
        state = decay[:, :, n] * state + update[:, :, n]
    return torch.stack(entering, dim=2), state


def _causal_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None, chunk_size: int, *, exclusive: bool
) -> tuple[Tensor, Tensor]:
    """Unscaled causal ``o [B, T, H, V]`` and final state; ``exclusive`` reads the state before each token's own key.

    Within a chunk, with ``Gc`` the gate's cumsum from the chunk start and ``S`` the entering state::

        o_i = (q_i * exp(Gc_i))^T S + sum_{j <= i} (q_i * exp(Gc_i - Gc_j)) . k_j  v_j   (j < i if exclusive)

    Every exponent is ``<= 0``: masked pairs are set to ``-inf`` before the exp.
    """
    T = q.shape[1]
    q, k, v, g = (_to_chunks(x, chunk_size) for x in (q, k, v, g))  # [B, H, N, C, .]
    gc = g.cumsum(dim=3)
    entering, final = _state_pass(k, v, gc, initial_state)
    o = (q * torch.exp(gc)) @ entering  # [B, H, N, C, V]
    keep = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril(-1 if exclusive else 0)
    diff = gc.unsqueeze(-2) - gc.unsqueeze(-3)  # [B, H, N, C(i), C(j), K']: Gc_i - Gc_j
    w = torch.exp(diff.masked_fill(~keep.unsqueeze(-1), float("-inf")))
    if g.shape[-1] == 1:
        a = (q @ k.transpose(-1, -2)) * w.squeeze(-1)  # [B, H, N, C, C]
    else:
        a = torch.einsum("...ik,...ijk,...jk->...ij", q, w, k)
    o = o + a @ v
    B, H, N, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T], final


def _by_pattern(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None, *, causal: bool, cross: bool,
    causal_pass: Callable[..., tuple[Tensor | None, Tensor | None]], read: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """The four patterns from one causal pass: ``o`` (scaled) and the final state.

    ``causal_pass(q, k, v, g, initial_state, anticausal)`` returns the scaled causal ``o`` and the
    final state; ``q=None`` asks for the final state only; ``anticausal=True`` for the exclusive
    backward pass of noncausal self, ``o_i = scale * sum_{j > i} exp(g_{i+1} + ... + g_j) (q_i . k_j) v_j``,
    no state in or out. ``read(q, S)`` is ``scale * q_t^T S`` for every query. Noncausal cross reads
    the final state from every query, and so does noncausal self without a gate (all weights are 1:
    the same sum).
    """
    if not causal and (cross or g is None):
        _, final = causal_pass(None, k, v, g, initial_state, False)
        return read(q, final), final
    o, final = causal_pass(q, k, v, g, initial_state, False)
    if not causal:
        o = o + causal_pass(q, k, v, g, None, True)[0]
    return o, final


def _chunked_pass(
    q: Tensor | None, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None, anticausal: bool,
    *, scale: float, chunk_size: int,
) -> tuple[Tensor | None, Tensor | None]:
    """The causal pass of :func:`_by_pattern` in chunked PyTorch; the anticausal one as a causal
    pass over flipped time, exclusive of each token, with the gates shifted by one."""
    if g is None:
        g = k.new_zeros(*k.shape[:3], 1)
    if q is None:
        kc, vc, gc = (_to_chunks(x, chunk_size) for x in (k, v, g))
        return None, _state_pass(kc, vc, gc.cumsum(dim=3), initial_state)[1]
    if anticausal:
        g_back = torch.cat([torch.zeros_like(g[:, :1]), g.flip(1)[:, :-1]], dim=1)
        o_back, _ = _causal_chunked(q.flip(1), k.flip(1), v.flip(1), g_back, None, chunk_size, exclusive=True)
        return scale * o_back.flip(1), None
    o, final = _causal_chunked(q, k, v, g, initial_state, chunk_size, exclusive=False)
    return scale * o, final


def gated_linear_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked parallel form: attention within chunks of ``chunk_size``, states passed between them.

    Same arguments and results as :func:`gated_linear_attention`; inputs are not checked. Memory of
    the intra-chunk weights is ``O(B * H * T * chunk_size)``, times ``K`` for per-channel gates.
    The patterns are composed from causal passes by :func:`_by_pattern`.
    """
    out_dtype = q.dtype
    scale = resolve_scale(scale, q.shape[-1])
    q, k, v, g, initial_state = _prepare(q, k, v, g, initial_state)
    o, final = _by_pattern(
        q, k, v, g, initial_state, causal=causal, cross=cross,
        causal_pass=partial(_chunked_pass, scale=scale, chunk_size=chunk_size),
        read=lambda q, S: scale * torch.einsum("bthk,bhkv->bthv", q, S),
    )
    return o.to(out_dtype), (final if output_final_state else None)


def gated_linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The Triton kernels of :mod:`seqmix.kernels.gla_chunk`, composed into the patterns by
    :func:`_by_pattern`; same arguments and results as :func:`gated_linear_attention`; inputs are
    not checked."""
    from seqmix.kernels.gla_chunk import chunk_gla
    from seqmix.kernels.shared_state import read_state, state_sum

    scale = resolve_scale(scale, q.shape[-1])
    if causal and q.shape[1] == 1 and cu_seqlens is None and not needs_grad(q, k, v, g, initial_state):
        from seqmix.kernels.step import step

        state = initial_state if initial_state is not None else q.new_zeros(*q.shape[::2], v.shape[-1], dtype=torch.float32)
        o, final = step(q[:, 0], k[:, 0], v[:, 0], state, scale=scale, g=None if g is None else g[:, 0])
        return o[:, None], (final if output_final_state else None)

    def causal_pass(q, k, v, g, initial_state, anticausal):
        if q is None and g is None and cu_seqlens is None:  # no recurrence: a sum of outer products
            return None, state_sum(k, v, initial_state)
        # the causal patterns need the final state only when it is returned (the kernels then keep
        # 16 bits of the forward's state updates under a gate); the noncausal ones read it
        return chunk_gla(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=not anticausal and (output_final_state or not causal),
            anticausal=anticausal, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )

    o, final = _by_pattern(
        q, k, v, g, initial_state, causal=causal, cross=cross, causal_pass=causal_pass,
        read=lambda q, S: read_state(q, S, scale),
    )
    return o.to(q.dtype), (final if output_final_state else None)


def gla_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor, *, scale: float | None = None, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """One decoding step of causal gated linear attention: ``S' = diag(exp(g)) S + k v^T``, ``o = scale * q^T S'``.

    Args:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g: log gate ``<= 0``, ``[B, H]``, ``[B, H, K]`` or ``None``.
        state: ``[B, H, K, V]``, the state before this token.
        scale: defaults to ``K ** -0.5``.
        backend: ``"reference"`` (PyTorch), ``"triton"`` (one fused kernel; CUDA tensors or
            ``TRITON_INTERPRET=1``; no gradients) or ``"auto"`` (triton on CUDA).

    Returns ``o [B, H, V]`` in q's dtype and the new state in ``promote_types(q.dtype, float32)``.
    """
    check_qkv(q[:, None], k[:, None], v[:, None], causal=True)
    B, H, K = q.shape
    V = v.shape[-1]
    if g is not None:
        check_log_gate("g", g, q, [(B, H), (B, H, K)])
    check_shape("state", state, (B, H, K, V), q)
    scale = resolve_scale(scale, K)
    why_not = {"triton": reason} if (reason := kernels.step_unsupported(q, (K, V), state, k, v, g)) else {}
    available = ("reference",) + (() if why_not else ("triton",))
    backend = resolve_backend("gla_step", backend, available, q.device, why_not)
    if backend == "triton":
        from seqmix.kernels.step import step

        return step(q, k, v, state, scale=scale, g=g)
    acc = torch.promote_types(q.dtype, torch.float32)
    S = state.to(acc)
    if g is not None:
        S = S * torch.exp(g.to(acc) if g.dim() == 3 else g.to(acc)[..., None])[..., None]
    S = S + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    return (scale * torch.einsum("bhk,bhkv->bhv", q.to(acc), S)).to(q.dtype), S
