"""Softmax attention: an explicit reference, SDPA and FlexAttention as the fast forms."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seqmix.ops._checks import check_qkv, resolve_scale

BACKENDS = ("reference", "sdpa", "flex")


def attention_mask(
    T: int,
    S: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask ``[B or 1, 1, T, S]``, True where query i may attend to key j; None if all may.

    ``causal``: ``j <= i``; ``window=w``: ``i - w < j <= i`` (causal) or ``|i - j| < w``;
    ``key_padding_mask [B, S]``: True at real keys.
    """
    mask = None
    if causal or window is not None:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        mask = torch.ones(T, S, dtype=torch.bool, device=device)
        if causal:
            mask &= j <= i
        if window is not None:
            mask &= (i - j < window) if causal else ((i - j).abs() < window)
        mask = mask[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def _rows_with_keys(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.any(dim=-1, keepdim=True)


def softmax_attention_reference(q, k, v, *, causal: bool, window: int | None = None, key_padding_mask=None, scale=None):
    """``o_i = sum_j softmax_j(scale * q_i . k_j  over allowed j) v_j``, an explicit softmax.

    Queries with no allowed key get a zero output.
    """
    scale = resolve_scale(scale, q.shape[-1])
    T, S = q.shape[1], k.shape[1]
    mask = attention_mask(T, S, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = scores.masked_fill(~_rows_with_keys(mask), 0.0)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v)


def _softmax_attention_sdpa(q, k, v, *, causal, window, key_padding_mask, scale):
    T, S = q.shape[1], k.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if window is None and key_padding_mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
        return o.transpose(1, 2)
    mask = attention_mask(T, S, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device)
    has_keys = _rows_with_keys(mask)
    # Rows without any key attend everywhere (no NaN, forward or backward); their output is zeroed.
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~has_keys, scale=scale)
    return o.masked_fill(~has_keys, 0.0).transpose(1, 2)


def _softmax_attention_flex(q, k, v, *, causal, window, key_padding_mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if key_padding_mask is not None:
        raise ValueError("softmax_attention: backend 'flex' takes no key_padding_mask; use backend='sdpa'")
    if window is None:
        raise ValueError("softmax_attention: backend 'flex' is for sliding windows; pass window or use backend='sdpa'")
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("softmax_attention: backend 'flex' has no backward on the CPU; use backend='sdpa'")
    if max(q.numel(), k.numel(), v.numel()) >= 2**31:
        raise ValueError(
            f"softmax_attention: backend 'flex' indexes with 32-bit offsets; q, k, v must have under 2**31 elements, got "
            f"{[list(t.shape) for t in (q, k, v)]}; split the batch or use backend='sdpa'"
        )
    block_mask = _window_block_mask(q.shape[1], k.shape[1], window, causal, q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return o.transpose(1, 2)


FLEX_BLOCK = 128


@functools.lru_cache(maxsize=32)
def _window_block_mask(T: int, S: int, window: int, causal: bool, device: torch.device):
    """The sliding-window ``BlockMask`` (query ``i`` sees key ``j`` if ``|i - j| < window``, and
    ``j <= i`` if causal), built from its band of key blocks: ``O((T / 128) (S / 128))`` small
    integers, where ``create_block_mask`` evaluates the mask on the whole ``T x S`` grid. Each row
    of block indices is as wide as the key blocks (``BlockMask`` requires it), its first ``count``
    entries the band. Every block of the band is treated as partial (the mask is applied inside
    it). Cached per shape."""
    from torch.nn.attention.flex_attention import BlockMask

    def local(b, h, i, j):
        if causal:
            return (j <= i) & (i - j < window)
        return (i - j < window) & (j - i < window)

    rows = torch.arange(-(-T // FLEX_BLOCK), device=device) * FLEX_BLOCK  # first query of each block
    first = ((rows - window + 1).clamp_min(0) // FLEX_BLOCK).clamp_max(-(-S // FLEX_BLOCK) - 1)
    last_key = rows + FLEX_BLOCK - 1 if causal else rows + FLEX_BLOCK - 1 + window - 1
    last = (last_key.clamp_max(S - 1) // FLEX_BLOCK)
    count = (last - first + 1).clamp_min(0)
    key_blocks = -(-S // FLEX_BLOCK)
    indices = (first[:, None] + torch.arange(key_blocks, device=device)).clamp_max(key_blocks - 1)
    return BlockMask.from_kv_blocks(
        count[None, None].int(), indices[None, None].int(), BLOCK_SIZE=FLEX_BLOCK, mask_mod=local, seq_lengths=(T, S)
    )


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention, ``o_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over the allowed keys.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, S, H, K]``; v: ``[B, S, H, V]``.
        causal: key j allowed for query i only if ``j <= i`` (needs ``S == T``).
        window: sliding window ``w``: keys with ``i - w < j <= i`` (causal) or ``|i - j| < w``.
        key_padding_mask: ``[B, S]`` bool, True at real keys. A query with no allowed key outputs 0.
        scale: defaults to ``K ** -0.5``.
        backend: ``"reference"`` (explicit softmax), ``"sdpa"``
            (``scaled_dot_product_attention``), ``"flex"`` (FlexAttention, sliding windows), or
            ``"auto"``: flex for windows on CUDA, else sdpa.
    Returns:
        ``o [B, T, H, V]`` (softmax attention keeps no recurrent state).
    """
    B, T, S, H, K, V = check_qkv(q, k, v, causal=causal)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape [{B}, {S}], got {key_padding_mask.dtype} {list(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, expected {q.device} (the device of q)")
    scale = resolve_scale(scale, K)
    if backend == "auto":
        backend = "flex" if window is not None and key_padding_mask is None and q.is_cuda else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"softmax_attention: backend {backend!r} is not available; choose from {('auto',) + BACKENDS}")
    fn = {
        "reference": softmax_attention_reference,
        "sdpa": _softmax_attention_sdpa,
        "flex": _softmax_attention_flex,
    }[backend]
    return fn(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask, scale=scale)
