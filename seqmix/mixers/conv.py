"""Long-convolution mixers: ``s4d`` (diagonal state space kernel) and ``hyena`` (implicit filter).

Both are gated: the convolution runs over the context stream and is read through a gate computed
from ``x``, so causal cross (aligned) is served as well as the self patterns. Noncausal cross is
not: a convolution needs the two sequences aligned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixers._layers import ShortConv, zero_padded
from seqmix.mixers.base import Mixer
from seqmix.mixers.registry import register
from seqmix.ops.conv import long_conv
from seqmix.patterns import Pattern

ALIGNED_PATTERNS = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})


def two_sided(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Kernel ``[D, 2T - 1]`` for lags ``-(T-1)..T-1`` from a forward kernel (lags ``0..T-1``) and a
    backward one (its lag ``s`` is lag ``-s``; its lag 0 is unused: each position counts once)."""
    return torch.cat([backward[:, 1:].flip(-1), forward], dim=-1)


@register
class S4D(Mixer):
    """S4D (Gu et al., 2022): a diagonal state space model per channel, as a long convolution.

    Per channel, ``N/2`` complex modes ``A_n = -exp(a_n) + i b_n`` (S4D-Lin init), step ``dt``,
    zero-order hold: ``h_t = exp(dt A) h_{t-1} + (exp(dt A) - 1) / A * u_t``,
    ``y_t = 2 Re(C h_t) + D u_t``, i.e. ``y = K * u + D u`` with kernel
    ``K_l = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n exp(l dt A_n))``.
    Mixer: ``u = W_u c``, ``out = W_o [(K * u + D u) * silu(W_z x)]``. Noncausal: a second kernel
    (its own ``C``) for the negative lags. ``n_heads`` is unused (every channel is its own SSM).
    """

    name = "s4d"
    patterns = ALIGNED_PATTERNS
    backends = ("reference", "fft")

    def __init__(self, d_model: int, n_heads: int = 4, *, d_state: int = 64, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        if d_state < 2 or d_state % 2:
            raise ValueError(f"{self.name}: d_state must be an even int >= 2, got {d_state!r}")
        modes = d_state // 2
        self.d_state, self.backend = d_state, backend
        self.log_dt = nn.Parameter(torch.empty(d_model).uniform_(math.log(1e-3), math.log(1e-1)))
        self.log_A_real = nn.Parameter(torch.full((d_model, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).expand(d_model, modes).clone())
        self.C = nn.Parameter(torch.randn(2, d_model, modes, 2) * 0.5**0.5)  # (direction, D, modes, re/im)
        self.D = nn.Parameter(torch.randn(d_model))
        self.u_proj = nn.Linear(d_model, d_model)
        self.z_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    @property
    def _real(self) -> torch.dtype:
        """The real dtype of the complex parameters: float32 at least (no complex bf16 or fp16)."""
        return torch.promote_types(self.D.dtype, torch.float32)

    def _discrete(self):
        """``dt A`` and the zero-order-hold input weights ``(exp(dt A) - 1) / A``, ``[D, modes]`` complex."""
        A = torch.complex(-torch.exp(self.log_A_real.to(self._real)), self.A_imag.to(self._real))
        dtA = torch.exp(self.log_dt.to(self._real))[:, None] * A
        return dtA, (torch.exp(dtA) - 1) / A

    def _C(self, direction: int) -> torch.Tensor:
        """The output weights ``C [D, modes]`` complex, of ``direction`` (1: the backward kernel)."""
        return torch.view_as_complex(self.C[direction].to(self._real).contiguous())

    def kernel(self, length: int, direction: int = 0) -> torch.Tensor:
        """``K [D, length]`` for lags ``0..length-1`` (direction 1: the backward kernel).

        Lags split as ``l = a L_b + r`` with ``L_b = isqrt(length)``, and
        ``exp(l dt A) = exp(a L_b dt A) exp(r dt A)``: ``K`` is one batched product of
        ``[D, length / L_b, modes]`` by ``[D, modes, L_b]``, in ``O(D (modes sqrt(length) + length))``
        memory rather than the ``[D, modes, length]`` of every power."""
        dtA, B = self._discrete()
        block = max(1, math.isqrt(length))
        n_blocks = -(-length // block)
        inner = torch.exp(dtA[..., None] * torch.arange(block, device=dtA.device))  # (D, modes, L_b)
        starts = torch.arange(0, n_blocks * block, block, device=dtA.device)
        outer = (self._C(direction) * B)[..., None] * torch.exp(dtA[..., None] * starts)  # (D, modes, blocks)
        K = 2 * torch.einsum("dna,dnr->dar", outer, inner).real  # (D, blocks, L_b)
        return K.reshape(K.shape[0], -1)[:, :length]

    def _forward(self, x, context, pattern, mask, context_mask):
        u = zero_padded(self.u_proj(context), context_mask)
        T = u.shape[1]
        K = self.kernel(T).to(u.dtype)
        if not pattern.causal:
            K = two_sided(K, self.kernel(T, direction=1).to(u.dtype))
        y = long_conv(u, K, causal=pattern.causal, backend=self.backend) + self.D * u
        return self.o_proj(y * F.silu(self.z_proj(x)))

    def _init_state(self, batch_size, context):
        if context is not None:
            self.check_pattern(Pattern.NONCAUSAL_CROSS)
        dtype = torch.complex128 if self.D.dtype == torch.float64 else torch.complex64
        return {"h": torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=dtype, device=self.D.device)}

    def _step(self, x_t, state, context_t):
        u = self.u_proj(x_t if context_t is None else context_t)  # (B, D)
        dtA, B = self._discrete()
        h = torch.exp(dtA) * state["h"] + B * u[..., None]
        y = 2 * torch.einsum("dn,bdn->bd", self._C(0), h).real.to(u.dtype) + self.D * u
        return self.o_proj(y * F.silu(self.z_proj(x_t))), {"h": h}

    def prefill(self, x, state, *, context=None, mask=None):
        """The FFT convolution from ``state``: with ``P_l = exp(l dt A)``,
        ``y_t = (K * u)_t + D u_t + 2 Re(C P_{t+1} h_0)`` and the state by its closed form
        ``h_T = P_T h_0 + sum_s P_{T-1-s} B u_s`` (padded positions: zero input, as in ``forward``)."""
        self._check_seq("x", x)
        if context is not None:
            self._check_context(x, context, aligned=True)
        mask = self._check_mask("mask", mask, x)
        u = zero_padded(self.u_proj(x if context is None else context), mask)  # (B, T, D)
        T = u.shape[1]
        dtA, B = self._discrete()
        C = self._C(0)
        h0 = state["h"]
        P = torch.exp(dtA[..., None] * torch.arange(T + 1, device=u.device)).to(h0.dtype)  # (D, modes, T + 1)
        y = long_conv(u, self.kernel(T).to(u.dtype), causal=True, backend=self.backend) + self.D * u
        y = y + 2 * torch.einsum("dn,bdn,dnt->btd", C.to(h0.dtype), h0, P[..., 1:]).real.to(u.dtype)
        h = P[..., T] * h0 + B.to(h0.dtype) * torch.einsum("dnt,btd->bdn", P[..., :T].flip(-1), u.to(h0.dtype))
        return self.o_proj(y * F.silu(self.z_proj(x))), {"h": h}

    def state_size(self, seq_len: int) -> int:
        return self.d_model * self.d_state  # d_state / 2 complex modes = d_state reals per channel


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter: ``h(t) = FFN(sin/cos features of t) * exp(-alpha |t|)`` per
    channel, at integer lags ``t`` (signed: a two-sided filter for the noncausal patterns)."""

    def __init__(self, d_model: int, n_freqs: int = 8, hidden: int = 32, max_period: float = 4096.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi / max_period ** (torch.arange(n_freqs) / max(n_freqs - 1, 1)), persistent=False)
        self.register_buffer("alpha", torch.exp(torch.linspace(math.log(1e-3), math.log(0.3), d_model)), persistent=False)
        self.ffn = nn.Sequential(nn.Linear(2 * n_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_model))

    def forward(self, lags: torch.Tensor) -> torch.Tensor:
        """``lags [L]`` (integers) -> ``h [D, L]``."""
        dtype = self.ffn[0].weight.dtype
        angles = lags.to(dtype)[:, None] * self.freqs.to(dtype)
        h = self.ffn(torch.cat([angles.sin(), angles.cos()], dim=-1)).T  # (D, L)
        return h * torch.exp(-self.alpha.to(dtype)[:, None] * lags.abs().to(dtype))


@register
class Hyena(Mixer):
    """Hyena operator of order 2 (Poli et al., 2023):
    ``y = W_o [x1 * (h * (x2 * v))]``, with ``x1`` from ``x`` and ``x2, v`` from the context (``x``
    for self), each after a short causal convolution, and ``h`` an implicit long filter.
    Decoding keeps every past ``x2 * v``: the state grows as ``T * d_model``, and step ``t``
    evaluates the filter at ``t`` lags and sums over the history, ``O(t * d_model * filter_hidden)``
    time (and copies the history, ``O(t * d_model)``). Prefill is one FFT convolution.
    """

    name = "hyena"
    patterns = ALIGNED_PATTERNS
    backends = ("reference", "fft")
    recurrent = False

    def __init__(self, d_model: int, n_heads: int = 4, *, short_conv_width: int = 3, filter_hidden: int = 32, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.q_conv = ShortConv(d_model, short_conv_width)
        self.kv_conv = ShortConv(2 * d_model, short_conv_width)
        self.filter = ImplicitFilter(d_model, hidden=filter_hidden)
        self.o_proj = nn.Linear(d_model, d_model)

    def _forward(self, x, context, pattern, mask, context_mask):
        x1 = self.q_proj(x)
        if not pattern.cross:  # the query stream stays position-local in cross patterns
            x1, _ = self.q_conv(zero_padded(x1, mask))
        kv, _ = self.kv_conv(zero_padded(self.kv_proj(context), context_mask))
        x2, v = kv.chunk(2, dim=-1)
        w = zero_padded(x2 * v, context_mask)
        T = w.shape[1]
        lags = torch.arange(T, device=x.device) if pattern.causal else torch.arange(-(T - 1), T, device=x.device)
        return self.o_proj(x1 * long_conv(w, self.filter(lags), causal=pattern.causal, backend=self.backend))

    def _init_state(self, batch_size, context):
        if context is not None:
            self.check_pattern(Pattern.NONCAUSAL_CROSS)
        w = self.q_proj.weight
        return {
            "q_conv": self.q_conv.init_state(batch_size, w),
            "kv_conv": self.kv_conv.init_state(batch_size, w),
            "history": w.new_zeros(batch_size, 0, self.d_model),
        }

    def _step(self, x_t, state, context_t):
        x1, q_conv = self.q_proj(x_t), state["q_conv"]
        if context_t is None:
            x1, q_conv = self.q_conv(x1[:, None], q_conv)
            x1 = x1[:, 0]
        kv, kv_conv = self.kv_conv(self.kv_proj(x_t if context_t is None else context_t)[:, None], state["kv_conv"])
        x2, v = kv[:, 0].chunk(2, dim=-1)
        history = torch.cat([state["history"], (x2 * v)[:, None]], dim=1)  # (B, t, D)
        t = history.shape[1]
        h = self.filter(torch.arange(t - 1, -1, -1, device=x_t.device))  # lags t-1..0 line up with history
        y = x1 * torch.einsum("dl,bld->bd", h, history)
        return self.o_proj(y), {"q_conv": q_conv, "kv_conv": kv_conv, "history": history}

    def prefill(self, x, state, *, context=None, mask=None):
        """One FFT convolution over the history and ``x``; the new ``x2 * v`` join the history."""
        self._check_seq("x", x)
        if context is not None:
            self._check_context(x, context, aligned=True)
        mask = self._check_mask("mask", mask, x)
        x1, q_conv = self.q_proj(x), state["q_conv"]
        if context is None:
            x1, q_conv = self.q_conv(zero_padded(x1, mask), q_conv)
        kv, kv_conv = self.kv_conv(zero_padded(self.kv_proj(x if context is None else context), mask), state["kv_conv"])
        x2, v = kv.chunk(2, dim=-1)
        history = torch.cat([state["history"], zero_padded(x2 * v, mask)], dim=1)  # (B, t0 + T, D)
        L, T = history.shape[1], x.shape[1]
        y = long_conv(history, self.filter(torch.arange(L, device=x.device)), causal=True, backend=self.backend)[:, L - T :]
        return self.o_proj(x1 * y), {"q_conv": q_conv, "kv_conv": kv_conv, "history": history}

    def state_size(self, seq_len: int) -> int:
        return seq_len * self.d_model + (self.q_conv.width - 1) * 3 * self.d_model
