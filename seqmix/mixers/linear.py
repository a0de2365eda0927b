"""Linear-attention mixers: ``linear`` (feature maps, no decay), and the gated family ``retnet``
(fixed decay per head), ``gla`` (data-dependent decay per channel), ``mamba2`` (per head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixers._layers import ShortConv, normed, split_heads, zero_padded
from seqmix.mixers.base import Mixer
from seqmix.mixers.recurrent import RecurrentMixer
from seqmix.mixers.registry import register
from seqmix.ops.gla import gated_linear_attention
from seqmix.ops.linear import FEATURE_MAPS, feature_map_fn, linear_attention
from seqmix.patterns import ALL_PATTERNS


@register
class LinearAttention(Mixer):
    """Linear attention (Katharopoulos et al., Performer):
    ``y_i = W_o [phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)]`` with ``S_i = sum_j phi(k_j) v_j^T``,
    ``z_i = sum_j phi(k_j)`` over ``j <= i`` (causal) or all ``j``. State ``(S, z)``: ``H (K' V + K')``
    with ``K'`` the feature dimension (``num_features`` for performer, else the head dim).
    """

    name = "linear"
    patterns = ALL_PATTERNS
    backends = ("reference", "chunked", "triton")

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        *,
        feature_map: str = "elu",
        num_features: int | None = None,
        normalize: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(d_model, n_heads)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"{self.name}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.feature_map, self.normalize, self.eps, self.backend = feature_map, normalize, eps, backend
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        if feature_map == "performer":
            self.register_buffer("projection", torch.randn(num_features or 2 * self.head_dim, self.head_dim))
        else:
            self.projection = None
        self.feature_dim = self.projection.shape[0] if self.projection is not None else self.head_dim

    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        return feature_map_fn(self.feature_map, self.projection)(t)

    def _features(self, x, context, context_mask):
        qf = self._phi(split_heads(self.q_proj(x), self.n_heads))
        k, v = split_heads(self.kv_proj(context), self.n_heads).chunk(2, dim=-1)
        return qf, zero_padded(self._phi(k), context_mask), v

    def _forward(self, x, context, pattern, mask, context_mask):
        qf, kf, v = self._features(x, context, context_mask)
        o = linear_attention(
            qf, kf, v, causal=pattern.causal, feature_map="identity", normalize=self.normalize, eps=self.eps, backend=self.backend
        )
        return self.o_proj(o.flatten(2))

    def _init_state(self, batch_size, context):
        if context is not None:
            _, kf, v = self._features(context[:, :1], context, None)
            S = torch.einsum("bshk,bshv->bhkv", kf, v)
            return {"memory": True, "S": S, "z": kf.sum(1)}
        w = self.q_proj.weight
        return {
            "S": w.new_zeros(batch_size, self.n_heads, self.feature_dim, self.head_dim),
            "z": w.new_zeros(batch_size, self.n_heads, self.feature_dim),
        }

    def _step(self, x_t, state, context_t):
        source = x_t if context_t is None else context_t
        qf, kf, v = (t[:, 0] for t in self._features(x_t[:, None], source[:, None], None))  # (B, H, K')
        S, z = state["S"], state["z"]
        if not state.get("memory"):
            S = S + kf[..., :, None] * v[..., None, :]
            z = z + kf
            state = {"S": S, "z": z}
        o = torch.einsum("bhk,bhkv->bhv", qf, S)
        if self.normalize:
            o = o / (torch.einsum("bhk,bhk->bh", qf, z)[..., None] + self.eps)
        return self.o_proj(o.flatten(1)), state

    def prefill(self, x, state, *, context=None, mask=None):
        """The parallel causal form started from ``(S, z)``: the numerator and the normaliser as one
        gated-linear-attention pass (no gate) over values ``[v, 1]`` from the state ``[S, z]``;
        padded positions write nothing (zero keys)."""
        mask = self._check_prefill(x, state, context, mask)
        qf, kf, v = self._features(x, x if context is None else context, mask)
        S, z = state["S"], state["z"]
        o, final = gated_linear_attention(
            qf, kf, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1), None, causal=True, scale=1.0,
            initial_state=torch.cat([S, z[..., None]], dim=-1), output_final_state=True, backend=self.backend,
        )
        o = o[..., :-1] / (o[..., -1:] + self.eps) if self.normalize else o[..., :-1]
        final = final.to(S.dtype)
        return self.o_proj(o.flatten(2)), {"S": final[..., :-1], "z": final[..., -1]}

    def state_size(self, seq_len: int) -> int:
        return self.n_heads * self.feature_dim * (self.head_dim + 1)


class _GatedLinearMixer(RecurrentMixer):
    """Shared by ``retnet``, ``gla`` and ``mamba2``: state ``S [B, H, K, V]`` of
    :func:`seqmix.ops.gated_linear_attention`; features ``q, k, v, g`` and an output gate."""

    patterns = ALL_PATTERNS
    backends = ("reference", "chunked", "triton")

    def _op(self, fq, fkv, pattern, initial_state, output_final_state):
        return gated_linear_attention(
            fq["q"], fkv["k"], fkv["v"], fkv["g"], causal=pattern.causal, cross=pattern.cross, scale=self.scale,
            initial_state=initial_state, output_final_state=output_final_state, backend=self._op_backend(fq["q"].shape[1]),
        )

    def _read(self, fq, S):
        return self.scale * torch.einsum("bthk,bhkv->bthv", fq["q"], S.to(fq["q"].dtype))

    def _zero_state(self, batch_size):
        w = self.o_proj.weight
        return {"S": w.new_zeros(batch_size, self.n_heads, self.key_dim, self.head_dim)}


@register
class RetNet(_GatedLinearMixer):
    """Retention (Sun et al., 2023): a fixed decay ``gamma_h`` per head,
    ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t / sqrt(D)``; per-head RMSNorm and a
    swish output gate: ``y = W_o (norm(o) * silu(W_r x))``. ``gamma_h = 1 - 2^(-5 - h)``, spread
    over the heads from 1 - 1/32 to 1 - 1/512 (no xPos rotation: the decay carries position)."""

    name = "retnet"

    def __init__(self, d_model: int, n_heads: int = 4, *, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        self.backend, self.key_dim, self.scale = backend, self.head_dim, self.head_dim**-0.5
        gammas = 1 - 2.0 ** (-5 - torch.linspace(0, 4, n_heads))
        self.register_buffer("log_gamma", gammas.log(), persistent=False)
        self.qkvr_proj = nn.Linear(d_model, 4 * d_model, bias=False)
        self.norm = nn.RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _stream(self, inp, mask, conv_state, convolve):
        q, k, v, r = split_heads(self.qkvr_proj(inp), self.n_heads).chunk(4, dim=-1)
        g = self.log_gamma.to(inp.dtype).expand(*inp.shape[:2], -1)
        return {"q": q, "k": zero_padded(k, mask), "v": v, "g": zero_padded(g, mask), "r": r}, None

    def _out(self, o, fq):
        return self.o_proj((normed(self.norm, o) * F.silu(fq["r"])).flatten(2))


@register
class GLA(_GatedLinearMixer):
    """Gated linear attention (Yang et al., 2024): a data-dependent forget gate per channel,
    ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`` with ``log alpha_t = logsigmoid(W_2 W_1 x_t) / tau``
    (low rank 16, ``tau = 16``); keys of half the model width; ``y = W_o (norm(o) * silu(W_r x))``."""

    name = "gla"

    def __init__(self, d_model: int, n_heads: int = 4, *, expand_k: float = 0.5, gate_rank: int = 16, gate_temperature: float = 16.0, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        self.key_dim = max(1, int(self.head_dim * expand_k))
        self.backend, self.scale, self.gate_temperature = backend, self.key_dim**-0.5, gate_temperature
        self.qk_proj = nn.Linear(d_model, 2 * n_heads * self.key_dim, bias=False)
        self.vr_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.gate = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, n_heads * self.key_dim))
        self.norm = nn.RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _stream(self, inp, mask, conv_state, convolve):
        q, k = split_heads(self.qk_proj(inp), self.n_heads).chunk(2, dim=-1)
        v, r = split_heads(self.vr_proj(inp), self.n_heads).chunk(2, dim=-1)
        g = F.logsigmoid(split_heads(self.gate(inp), self.n_heads)) / self.gate_temperature
        return {"q": q, "k": zero_padded(k, mask), "v": v, "g": zero_padded(g, mask), "r": r}, None

    def _out(self, o, fq):
        return self.o_proj((normed(self.norm, o) * F.silu(fq["r"])).flatten(2))


@register
class Mamba2(_GatedLinearMixer):
    """Mamba-2 (Dao and Gu, 2024), the SSD layer: a data-dependent scalar decay per head,
    ``S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t^T S_t + D_h x_t``, where
    ``x, B, C`` pass a short causal convolution and SiLU; then ``W_o norm(y * silu(z))``.
    ``d_inner = expand * d_model`` split into ``n_heads`` heads; ``B, C`` shared by the heads."""

    name = "mamba2"

    def __init__(self, d_model: int, n_heads: int = 4, *, d_state: int = 64, expand: int = 2, conv_width: int = 4, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        self.d_inner, self.d_state, self.backend = expand * d_model, d_state, backend
        self.key_dim, self.head_dim, self.scale = d_state, self.d_inner // n_heads, 1.0
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + n_heads, bias=False)
        self.conv = ShortConv(self.d_inner + 2 * d_state, conv_width)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, n_heads)))
        self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1))))))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = nn.RMSNorm(self.d_inner)
        self.o_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _stream(self, inp, mask, conv_state, convolve):
        z, xBC, dt = self.in_proj(inp).split([self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)
        if convolve:
            xBC, conv_state = self.conv(zero_padded(xBC, mask), conv_state)
        x, Bm, Cm = F.silu(xBC).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = split_heads(x, self.n_heads)  # (B, T, H, P)
        dt = zero_padded(F.softplus(dt + self.dt_bias), mask)  # (B, T, H); 0 at padding: no write, no decay
        H = self.n_heads
        q = Cm[:, :, None].expand(-1, -1, H, -1)
        k = Bm[:, :, None] * dt[..., None]
        return {"q": q, "k": k, "v": x, "g": -torch.exp(self.A_log) * dt, "x": x, "z": z}, conv_state

    def _out(self, o, fq):
        y = o + self.D[:, None] * fq["x"]
        return self.o_proj(normed(self.norm, y.flatten(2) * F.silu(fq["z"])))

    def _zero_state(self, batch_size):
        return {**super()._zero_state(batch_size), "conv": self.conv.init_state(batch_size, self.o_proj.weight)}
