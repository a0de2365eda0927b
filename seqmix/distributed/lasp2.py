"""LASP-2: sequence parallelism for the linear-recurrent family by one all-gather of chunk states.

A rank's chunk acts on the recurrent state as an affine map ``S -> A S + N``: ``N`` is the state the
chunk builds from zero, ``A`` its total transition (a diagonal decay ``exp(sum g)`` for gated linear
attention, ``prod exp(g_t) (I - beta_t k_t k_t^T)`` for the delta rule). Each rank computes its
``(A, N)``, one all-gather shares them, and each rank composes what it needs:

- causal (self, or cross over an aligned context): the state entering its chunk, the composition
  of the lower ranks' maps applied to zero; then the local causal op from that ``initial_state``.
- noncausal cross (the context split too): the composition of all ranks' maps, read by every query.
- noncausal self: the causal part as above, plus the backward part (keys after the query, each
  counted once): the same construction on the reversed sequence over the higher ranks, with the
  state ``R~_j = exp(g_j) (R~ after j, decayed and erased by token j) + write_j`` of the operators'
  docstrings, read by query ``i`` just after token ``i + 1``.

The backward pass of the gather is a reduce-scatter of the gradients of the gathered maps. States
are in ``promote_types(q.dtype, float32)``; outputs in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from seqmix.distributed.comm import world
from seqmix.ops._checks import check_log_gate, check_qkv, check_shape, resolve_scale
from seqmix.ops.delta import delta_rule
from seqmix.ops.gla import gated_linear_attention

Compose = Callable[[Tensor, Tensor], Tensor]  # (packed map [B, H, K, *], state [B, H, K, V]) -> state


class _GatherCompose(torch.autograd.Function):
    """All-gathers each rank's packed map and composes the states this rank needs.

    ``combine(gathered [P, ...]) -> tuple of states``. One function so that every rank runs the
    backward's reduce-scatter, also a rank whose states depend on no map (rank 0, causal).
    """

    @staticmethod
    def forward(ctx, packed: Tensor, combine: Callable[[Tensor], tuple[Tensor, ...]], group: ProcessGroup | None):
        _, P = world(group)
        packed = packed.contiguous()
        gathered = packed.new_empty(P, *packed.shape)
        dist.all_gather(list(gathered.unbind(0)), packed, group=group)
        ctx.save_for_backward(gathered)
        ctx.combine, ctx.group = combine, group
        return combine(gathered)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (gathered,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gathered.detach().requires_grad_()
            used = [(s, d) for s, d in zip(ctx.combine(leaf), grads) if s.requires_grad]
            d_gathered = None
            if used:
                (d_gathered,) = torch.autograd.grad([s for s, _ in used], leaf, [d for _, d in used], allow_unused=True)
        if d_gathered is None:  # this rank's states depend on no map
            d_gathered = torch.zeros_like(gathered)
        d_packed = gathered.new_empty(gathered.shape[1:])
        dist.reduce_scatter(d_packed, [t.contiguous() for t in d_gathered.unbind(0)], group=ctx.group)
        return d_packed, None, None


def _fold(maps: list[Tensor], compose: Compose, zero: Tensor) -> Tensor:
    """``map_n( ... map_1(map_0(0)))`` for maps in order (a fresh zero if there are none)."""
    state = zero.clone()
    for m in maps:
        state = compose(m, state)
    return state


def _lasp2(
    q: Tensor,
    summarize: Callable[[bool], Tensor],
    compose: Compose,
    scan: Callable[[Tensor, Tensor, bool], Tensor],
    state_shape: tuple[int, ...],
    *,
    causal: bool,
    cross: bool,
    scale: float,
    group: ProcessGroup | None,
) -> Tensor:
    """The pattern logic shared by the family. ``summarize(reverse)`` packs this rank's map (forward,
    or for the reversed recurrence); ``scan(queries, initial_state, reverse)`` is the local causal
    op, over the reversed chunk if ``reverse`` (queries given in forward order, output likewise)."""
    rank, P = world(group)
    acc = torch.promote_types(q.dtype, torch.float32)
    zero = q.new_zeros(state_shape, dtype=acc)
    if causal:
        (entering,) = _GatherCompose.apply(summarize(False), lambda g: (_fold(list(g[:rank]), compose, zero),), group)
        return scan(q, entering, False)
    if cross:
        (final,) = _GatherCompose.apply(summarize(False), lambda g: (_fold(list(g), compose, zero),), group)
        return (scale * torch.einsum("bthk,bhkv->bthv", q.to(acc), final)).to(q.dtype)
    forward_map, backward_map = summarize(False), summarize(True)
    split = forward_map.shape[-1]

    def combine(g: Tensor) -> tuple[Tensor, Tensor]:
        entering = _fold([m[..., :split] for m in g[:rank]], compose, zero)
        after = _fold([m[..., split:] for m in g[rank + 1 :].flip(0)], compose, zero)
        return entering, after

    entering, after = _GatherCompose.apply(torch.cat([forward_map, backward_map], dim=-1), combine, group)
    o = scan(q, entering, False)
    # query i reads the reversed state just after token i + 1: shift the queries one step later
    shifted = torch.cat([torch.zeros_like(q[:, :1]), q[:, :-1]], dim=1)
    back = scan(shifted, after, True)[:, 1:]
    last = (scale * torch.einsum("bthk,bhkv->bthv", q[:, -1:].to(acc), after)).to(q.dtype)
    return o + torch.cat([back, last], dim=1)


def _flip(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.flip(1)


def _check_pattern_lengths(T: int, S: int, causal: bool, cross: bool) -> None:
    if not isinstance(cross, bool):
        raise TypeError(f"cross must be True or False, got {cross!r}")
    if not cross and S != T:
        raise ValueError(f"self forms need k and v as long as q: q has length {T}, k and v have {S}; pass cross=True")


def lasp2_gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    group: ProcessGroup | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> Tensor:
    """:func:`seqmix.ops.gla.gated_linear_attention` over a sequence split across ``group``
    (contiguous layout), forward and backward; returns this rank's ``o [B, T/P, H, V]``.

    Each rank passes its shards: ``q [B, T/P, H, K]``, ``k [B, S/P, H, K]``, ``v [B, S/P, H, V]``,
    ``g [B, S/P, H]`` or ``[B, S/P, H, K]`` or ``None``. Patterns as the op (noncausal cross splits
    the context too, ``S`` may differ from ``T``). ``backend`` and ``chunk_size`` go to the local op.
    Communication: one all-gather of ``[B, H, K, V + 1]`` per rank (twice that for noncausal self).
    """
    B, T, S, H, K, V = check_qkv(q, k, v, causal=causal)
    _check_pattern_lengths(T, S, causal, cross)
    if g is not None:
        check_log_gate("g", g, q, [(B, S, H), (B, S, H, K)])
    scale = resolve_scale(scale, K)
    acc = torch.promote_types(q.dtype, torch.float32)
    gate = (k.new_zeros(B, S, H, 1) if g is None else (g[..., None] if g.dim() == 3 else g)).to(acc)  # [B, S, H, 1 or K]

    def summarize(reverse: bool) -> Tensor:
        """``[N | a]``: ``N = sum_j w_j k_j v_j^T`` and the total decay ``a = exp(sum_j g_j)`` ``[B, H, K, 1]``;
        forward ``w_j = exp(g_{j+1} + ... + g_end)``, reversed ``w_j = exp(g_start + ... + g_j)``.

        ``N`` is the final state of the local op from zero (over the reversed chunk for the reversed
        map), asked of its noncausal cross form, which reads that state with one query and discards
        the read: the op's own kernels, no ``[B, T, H, K]`` float32 copies or scans along time."""
        keys, values, gates = (k_reversed(), v.flip(1), _flip(g)) if reverse else (k, v, g)
        _, N = gated_linear_attention(
            q[:, :1], keys, values, gates, causal=False, cross=True, scale=scale, output_final_state=True,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip
        a = torch.exp(gate.sum(dim=1)).expand(B, H, K)[..., None]
        return torch.cat([N.to(acc), a], dim=-1)

    def k_reversed() -> Tensor:
        """Keys of the reversed recurrence ``R~_j``, which writes ``exp(g_j) k_j v_j^T``, in reversed time."""
        return (k * torch.exp(gate).to(k.dtype)).flip(1)

    def compose(m: Tensor, state: Tensor) -> Tensor:
        return m[..., -1:] * state + m[..., :-1]

    def scan(queries: Tensor, initial: Tensor, reverse: bool) -> Tensor:
        if not reverse:
            o, _ = gated_linear_attention(
                queries, k, v, g, causal=True, scale=scale, initial_state=initial, backend=backend, chunk_size=chunk_size
            )
            return o
        o, _ = gated_linear_attention(
            queries.flip(1), k_reversed(), v.flip(1), _flip(g), causal=True, scale=scale, initial_state=initial,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip
        return o.flip(1)

    return _lasp2(q, summarize, compose, scan, (B, H, K, V), causal=causal, cross=cross, scale=scale, group=group)


def lasp2_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    causal: bool,
    cross: bool = False,
    scale: float | None = None,
    group: ProcessGroup | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> Tensor:
    """:func:`seqmix.ops.delta.delta_rule` (gated if ``g``) over a sequence split across ``group``
    (contiguous layout), forward and backward; returns this rank's ``o [B, T/P, H, V]``.

    Shards as :func:`lasp2_gated_linear_attention`, with ``beta [B, S/P, H]`` and ``g [B, S/P, H]``.
    A chunk's map is ``S -> M S + N`` with ``M = prod_t exp(g_t) (I - beta_t k_t k_t^T)`` ``[B, H, K, K]``,
    both from one local run of the op over ``[0 | v]`` from the state ``[I | 0]``.
    Communication: one all-gather of ``[B, H, K, K + V]`` per rank (twice that for noncausal self).
    """
    B, T, S, H, K, V = check_qkv(q, k, v, causal=causal)
    _check_pattern_lengths(T, S, causal, cross)
    check_shape("beta", beta, (B, S, H), q)
    if g is not None:
        check_log_gate("g", g, q, [(B, S, H)])
    scale = resolve_scale(scale, K)
    acc = torch.promote_types(q.dtype, torch.float32)

    def run(queries, keys, values, betas, gates, initial, final: bool):
        return delta_rule(
            queries, keys, values, betas, g=gates, causal=True, scale=scale, initial_state=initial,
            output_final_state=final, backend=backend, chunk_size=chunk_size,
        )  # fmt: skip

    def reversed_inputs() -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Inputs of the reversed recurrence ``R~_j = exp(g_j) (I - beta_j k_j k_j^T) R~_{j+1} + beta_j k_j (exp(g_j) v_j)^T``."""
        v_rev = v if g is None else v * torch.exp(g)[..., None]
        return k.flip(1), v_rev.flip(1), beta.flip(1), _flip(g)

    def summarize(reverse: bool) -> Tensor:
        keys, values, betas, gates = reversed_inputs() if reverse else (k, v, beta, g)
        eye = torch.eye(K, dtype=acc, device=q.device).expand(B, H, K, K)
        initial = torch.cat([eye, q.new_zeros(B, H, K, V, dtype=acc)], dim=-1)
        values = torch.cat([torch.zeros_like(k), values], dim=-1)
        _, mn = run(torch.zeros_like(k), keys, values, betas, gates, initial, True)
        return mn  # [M | N]

    def compose(m: Tensor, state: Tensor) -> Tensor:
        return m[..., :K] @ state + m[..., K:]

    def scan(queries: Tensor, initial: Tensor, reverse: bool) -> Tensor:
        if not reverse:
            return run(queries, k, v, beta, g, initial, False)[0]
        keys, values, betas, gates = reversed_inputs()
        return run(queries.flip(1), keys, values, betas, gates, initial, False)[0].flip(1)

    return _lasp2(q, summarize, compose, scan, (B, H, K, V), causal=causal, cross=cross, scale=scale, group=group)
