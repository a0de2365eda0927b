"""Linear attention with a feature map: ``o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from seqmix import kernels
from seqmix.ops._checks import check_qkv, check_tensor, resolve_backend

FEATURE_MAPS = ("identity", "elu", "relu", "performer")


def feature_map_fn(name: str | Callable, projection: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature map ``phi`` by name, applied over the last dim ``K``.

    - ``identity``: ``phi(x) = x``;  ``elu``: ``elu(x) + 1`` (Katharopoulos et al.);  ``relu``.
    - ``performer``: positive random features (FAVOR+), ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)``
      with ``x' = x K^{-1/4}`` and ``projection`` ``W [m, K]`` drawn from N(0, I), so that
      ``E[phi(q) . phi(k)] = exp(q . k / sqrt(K))``.
    """
    if callable(name):
        return name
    if name == "identity":
        return lambda x: x
    if name == "elu":
        return lambda x: F.elu(x) + 1
    if name == "relu":
        return F.relu
    if name == "performer":
        if projection is None:
            raise ValueError("feature_map='performer' needs projection, a [num_features, head_dim] tensor of N(0, 1) draws")

        def performer(x: torch.Tensor) -> torch.Tensor:
            x = x * x.shape[-1] ** -0.25
            return torch.exp(x @ projection.T - x.pow(2).sum(-1, keepdim=True) / 2) * projection.shape[0] ** -0.5

        return performer
    raise ValueError(f"unknown feature_map {name!r}; expected one of {FEATURE_MAPS} or a callable")


def linear_attention_reference(qf, kf, v, *, causal: bool, normalize: bool, eps: float):
    """Quadratic form on mapped features ``qf = phi(q)``, ``kf = phi(k)``: ``A = qf kf^T`` (lower
    triangle if causal), ``o = A v``, divided by ``A 1 + eps`` when normalizing."""
    A = torch.einsum("bthk,bshk->bhts", qf, kf)
    if causal:
        A = A.tril()
    o = torch.einsum("bhts,bshv->bthv", A, v)
    if normalize:
        o = o / (A.sum(-1).transpose(1, 2)[..., None] + eps)
    return o


def linear_attention_by_gla(qf, kf, v, *, causal: bool, normalize: bool, eps: float, backend: str):
    """Linear-time form through :func:`gated_linear_attention` with no gate (``backend``
    ``"chunked"`` or ``"triton"``): prefix states when causal; when not, every query reads the
    final state (self and cross coincide without decay). The normaliser rides along as an extra
    value column of ones when causal; when not, it is ``phi(q_i) . z`` with ``z = sum_j phi(k_j)``."""
    from seqmix.ops.gla import gated_linear_attention

    ones_column = normalize and causal
    if ones_column:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o, _ = gated_linear_attention(qf, kf, v, None, causal=causal, cross=not causal, scale=1.0, backend=backend)
    if ones_column:  # divided in float32: bf16 dq error 9.6e-3 -> 8.2e-3 (H100 check, causal, T = 1000)
        o = o.to(torch.promote_types(o.dtype, torch.float32))
        return (o[..., :-1] / (o[..., -1:] + eps)).to(v.dtype)
    if normalize:
        z = kf.sum(1, dtype=torch.promote_types(kf.dtype, torch.float32)).to(qf.dtype)
        return o / (torch.einsum("bthk,bhk->bth", qf, z)[..., None] + eps)
    return o


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str | Callable = "elu",
    normalize: bool = True,
    projection: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear attention: ``o_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps)``,
    over ``j <= i`` when causal (then ``S == T``), over all ``j`` otherwise (self or cross: with no
    decay, the noncausal forms coincide).

    Args:
        q: ``[B, T, H, K]``; k: ``[B, S, H, K]``; v: ``[B, S, H, V]``.
        feature_map: one of ``identity``, ``elu``, ``relu``, ``performer`` (needs ``projection``
            ``[m, K]``), or a callable on ``[..., K]``.
        normalize: divide by the normaliser (off for the un-normalised form, e.g. with ``identity``).
        backend: ``"reference"`` (quadratic), ``"chunked"`` (linear time, PyTorch), ``"triton"``
            (linear time: noncausal with ``elu``, ``relu`` or ``identity`` and head dims <= 128 in
            the fused kernels of :mod:`seqmix.kernels.linear_noncausal`, otherwise the
            gated-linear-attention kernels with no gate), or ``"auto"`` (triton on
            CUDA, else chunked).
    Returns:
        ``o [B, T, H, V]``.
    """
    check_qkv(q, k, v, causal=causal)
    if projection is not None:
        check_tensor("projection", projection, 2, like=q)
        if projection.shape[1] != q.shape[-1]:
            raise ValueError(f"projection has shape {list(projection.shape)}, expected [num_features, {q.shape[-1]}]")
    phi = feature_map_fn(feature_map, projection)
    dims = (q.shape[-1], v.shape[-1] + (1 if causal and normalize else 0))  # causal: the normaliser as a column
    why_not = {"triton": reason} if (reason := kernels.unsupported(q, dims)) else {}
    backend = resolve_backend("linear_attention", backend, ("reference", "chunked", "triton"), q.device, why_not)
    if backend == "triton" and not causal:
        from seqmix.kernels import linear_noncausal

        if linear_noncausal.supports(feature_map, q.shape[-1], v.shape[-1]):
            # fused: the feature maps and the normaliser inside the kernels (elu, relu, identity)
            return linear_noncausal.linear_attention_noncausal(q, k, v, feature_map, normalize, eps)
    qf, kf = phi(q), phi(k)
    if backend == "reference":
        return linear_attention_reference(qf, kf, v, causal=causal, normalize=normalize, eps=eps)
    return linear_attention_by_gla(qf, kf, v, causal=causal, normalize=normalize, eps=eps, backend=backend)
