"""Softmax attention mixers: full (``softmax``) and sliding-window (``local``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixers._layers import rotary, split_heads
from seqmix.mixers.base import Mixer, State
from seqmix.mixers.registry import register
from seqmix.ops.softmax import softmax_attention
from seqmix.patterns import ALL_PATTERNS, Pattern


@register
class SoftmaxAttention(Mixer):
    """Multi-head softmax attention with rotary positions (Vaswani et al.; RoPE, Su et al.).

    ``q = W_q x``, ``k = W_k c``, ``v = W_v c`` with ``c`` the context (``x`` for self);
    ``y = W_o softmax(q k^T / sqrt(D)) v``. Rotary positions in every pattern but noncausal cross,
    where the two sequences share no positions. Decoding keeps a KV cache, grown ``cache_block``
    slots at a time (a copy every ``cache_block`` tokens), or a ring of ``window`` slots.
    """

    name = "softmax"
    patterns = ALL_PATTERNS
    backends = ("reference", "sdpa", "flex")
    recurrent = False

    def __init__(
        self, d_model: int, n_heads: int = 4, *, window: int | None = None, rope: bool = True, cache_block: int = 256, backend: str = "auto"
    ):
        super().__init__(d_model, n_heads)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"{self.name}: window must be a positive int or None, got {window!r}")
        if isinstance(cache_block, bool) or not isinstance(cache_block, int) or cache_block < 1:
            raise ValueError(f"{self.name}: cache_block must be a positive int, got {cache_block!r}")
        self.window, self.cache_block = window, cache_block
        self.rope = rope
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _q(self, x, positions):
        q = split_heads(self.q_proj(x), self.n_heads)
        return rotary(q, positions) if self.rope and positions is not None else q

    def _kv(self, context, positions):
        k, v = split_heads(self.kv_proj(context), self.n_heads).chunk(2, dim=-1)
        return (rotary(k, positions) if self.rope and positions is not None else k), v

    def _forward(self, x, context, pattern, mask, context_mask):
        # Rotary positions need aligned sequences: none in noncausal cross.
        positions = None if pattern is Pattern.NONCAUSAL_CROSS else torch.arange(x.shape[1], device=x.device)
        q, (k, v) = self._q(x, positions), self._kv(context, positions)
        o = softmax_attention(
            q, k, v, causal=pattern.causal, window=self.window, key_padding_mask=context_mask, backend=self.backend
        )
        return self.o_proj(o.flatten(2))

    # -- decoding: a KV cache --------------------------------------------------------------
    # State ``{"k", "v": [B, H, capacity, D], "pos": tokens seen, "valid": [B, capacity] bool or None}``.
    # Full attention: position p in slot p; the capacity grows in blocks of ``cache_block`` slots.
    # Sliding window w: a ring of w slots, position p in slot p % w. Keys are stored rotated.
    # ``valid`` exists once a prefill had padding: False at padded keys. ``step`` writes in place.

    def _init_state(self, batch_size, context):
        if context is not None:
            return {"memory": self._kv(context, None)}
        slots = 0 if self.window is None else self.window
        empty = self.q_proj.weight.new_zeros(batch_size, self.n_heads, slots, self.head_dim)
        return {"k": empty, "v": empty.clone(), "pos": 0, "valid": None}

    def _capacity(self, n: int) -> int:
        """Slots held after ``n`` tokens."""
        if self.window is not None:
            return self.window
        return self.cache_block * -(-n // self.cache_block)

    def _reserve(self, state: State, n: int) -> State:
        """Full attention: the state with room for ``n`` tokens, grown by whole blocks (one copy)."""
        cap = state["k"].shape[2]
        if n <= cap:
            return state

        def grow(t: torch.Tensor, dim: int) -> torch.Tensor:
            new = t.new_zeros(*t.shape[:dim], self._capacity(n), *t.shape[dim + 1 :])
            new.narrow(dim, 0, cap).copy_(t)
            return new

        valid = state["valid"]
        return {**state, "k": grow(state["k"], 2), "v": grow(state["v"], 2), "valid": None if valid is None else grow(valid, 1)}

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.window is None else positions % self.window

    def _filled(self, pos: int) -> int:
        """Slots ``[0, n)`` that hold a key after ``pos`` tokens."""
        return pos if self.window is None else min(pos, self.window)

    def _slot_positions(self, pos: int, device) -> torch.Tensor:
        """Absolute position of the key in each filled slot after ``pos`` tokens."""
        s = torch.arange(self._filled(pos), device=device)
        return s if self.window is None else pos - 1 - (pos - 1 - s) % self.window

    def _write(self, state: State, k, v, start: int, real: torch.Tensor | None) -> State:
        """Writes keys and values ``[B, T, H, D]`` of positions ``start..start+T-1`` (in a ring, the
        last ``w`` of them); ``real [B, T]`` marks real tokens (None: all real)."""
        B, T = k.shape[:2]
        if self.window is None:
            state = self._reserve(state, start + T)
        elif T > self.window:
            k, v, real = k[:, -self.window :], v[:, -self.window :], None if real is None else real[:, -self.window :]
            start, T = start + T - self.window, self.window
        slots = self._slots(torch.arange(start, start + T, device=k.device))
        state["k"].index_copy_(2, slots, k.transpose(1, 2))
        state["v"].index_copy_(2, slots, v.transpose(1, 2))
        valid = state["valid"]
        if real is not None and valid is None:
            valid = torch.ones(B, state["k"].shape[2], dtype=torch.bool, device=k.device)
        if valid is not None:
            valid[:, slots] = True if real is None else real
        return {**state, "valid": valid}

    def _step(self, x_t, state, context_t):
        if state.get("memory") is not None:
            k, v = state["memory"]
            q = self._q(x_t[:, None], None)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.o_proj(o.transpose(1, 2).flatten(1)), state
        pos = state["pos"]
        position = torch.arange(pos, pos + 1, device=x_t.device)  # no host-to-device copy: capturable in a CUDA graph
        q = self._q(x_t[:, None], position)
        k_t, v_t = self._kv((x_t if context_t is None else context_t)[:, None], position)
        state = self._write(state, k_t, v_t, pos, None)
        n = self._filled(pos + 1)
        valid = state["valid"]
        mask = None if valid is None else valid[:, None, None, :n]  # (B, 1, 1, n); the token's own key is real
        o = F.scaled_dot_product_attention(q.transpose(1, 2), state["k"][:, :, :n], state["v"][:, :, :n], attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).flatten(1)), {**state, "pos": pos + 1}

    def prefill(self, x, state, *, context=None, mask=None):
        """One causal attention over the cached keys and ``x``, then the new keys into the cache.

        From the empty state this is the forward's attention (SDPA); after earlier tokens, an
        explicit ``[T, cached + T]`` mask. Padded positions (``mask`` False) are keys nobody reads.
        """
        mask = self._check_prefill(x, state, context, mask)
        pos, T = state["pos"], x.shape[1]
        positions = torch.arange(pos, pos + T, device=x.device)
        q, (k, v) = self._q(x, positions), self._kv(x if context is None else context, positions)
        if pos == 0:
            o = softmax_attention(q, k, v, causal=True, window=self.window, key_padding_mask=mask, backend=self.backend)
        else:
            o = self._attend_after(q, k, v, positions, state, mask)
        state = self._write(state, k, v, pos, mask)
        return self.o_proj(o.flatten(2)), {**state, "pos": pos + T}

    def _attend_after(self, q, k, v, positions, state, mask):
        """Queries at ``positions`` over the cached keys and their own ``k, v [B, T, H, D]``."""
        pos, n = state["pos"], self._filled(state["pos"])
        keys = torch.cat([state["k"][:, :, :n], k.transpose(1, 2)], dim=2)  # (B, H, n + T, D)
        values = torch.cat([state["v"][:, :, :n], v.transpose(1, 2)], dim=2)
        key_pos = torch.cat([self._slot_positions(pos, q.device), positions])
        allowed = key_pos[None, :] <= positions[:, None]  # (T, n + T)
        if self.window is not None:
            allowed &= positions[:, None] - key_pos[None, :] < self.window
        allowed = allowed[None, None]
        cached_valid = None if state["valid"] is None else state["valid"][:, :n]
        if mask is not None or cached_valid is not None:
            B = q.shape[0]
            real_cached = cached_valid if cached_valid is not None else torch.ones(B, n, dtype=torch.bool, device=q.device)
            real_new = mask if mask is not None else torch.ones(B, q.shape[1], dtype=torch.bool, device=q.device)
            allowed = allowed & torch.cat([real_cached, real_new], dim=1)[:, None, None, :]
        has_keys = allowed.any(dim=-1, keepdim=True)
        # A query with no key to read (a padded one) attends everywhere and is zeroed: no NaN.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed | ~has_keys)
        return o.masked_fill(~has_keys, 0.0).transpose(1, 2)

    def state_size(self, seq_len: int) -> int:
        """Keys and values in the slots held: ``2 * d_model * capacity``, with capacity ``w`` for a
        window, else ``seq_len`` rounded up to whole ``cache_block``s (a padded prefill adds a
        ``[capacity]`` bool mask)."""
        return 2 * self._capacity(seq_len) * self.d_model


@register
class LocalAttention(SoftmaxAttention):
    """Sliding-window softmax attention: query i sees keys with ``i - w < j <= i`` (causal) or
    ``|i - j| < w`` (noncausal). Decoding keeps the last ``w`` keys and values. Noncausal cross is
    not served: two unaligned sequences have no window."""

    name = "local"
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})
    recurrent = True

    def __init__(self, d_model: int, n_heads: int = 4, *, window: int = 64, rope: bool = True, backend: str = "auto"):
        if window is None:
            raise ValueError("local: window must be a positive int (use 'softmax' for full attention)")
        super().__init__(d_model, n_heads, window=window, rope=rope, backend=backend)
