"""Delta-rule mixers: ``deltanet`` (Schlag et al. 2021; Yang et al. 2024) and ``gated_deltanet``
(Yang et al., 2025), on :func:`seqmix.ops.delta_rule`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixers._layers import ShortConv, normed, split_heads, zero_padded
from seqmix.mixers.recurrent import RecurrentMixer
from seqmix.mixers.registry import register
from seqmix.ops.delta import delta_rule
from seqmix.patterns import ALL_PATTERNS


@register
class DeltaNet(RecurrentMixer):
    """DeltaNet: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = q_t^T S_t / sqrt(D)``.

    ``q, k, v`` pass a short causal convolution and SiLU, ``q, k`` are L2-normalised per head,
    ``beta_t = sigmoid(W_b x_t)`` per head; ``y = W_o norm(o)`` (per-head RMSNorm).
    """

    name = "deltanet"
    patterns = ALL_PATTERNS
    backends = ("reference", "chunked", "triton")
    gated = False

    def __init__(self, d_model: int, n_heads: int = 4, *, conv_width: int = 4, backend: str = "auto"):
        super().__init__(d_model, n_heads)
        self.backend, self.scale = backend, self.head_dim**-0.5
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model, conv_width)
        self.beta_proj = nn.Linear(d_model, n_heads)
        if self.gated:
            self.gate_proj = nn.Linear(d_model, n_heads, bias=False)  # dt of the decay, as Mamba-2
            self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, n_heads)))
            self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1))))))
            self.r_proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _stream(self, inp, mask, conv_state, convolve):
        qkv = self.qkv_proj(inp)
        if convolve:
            qkv, conv_state = self.conv(zero_padded(qkv, mask), conv_state)
        q, k, v = split_heads(F.silu(qkv), self.n_heads).chunk(3, dim=-1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        features = {"q": q, "k": k, "v": v, "beta": zero_padded(torch.sigmoid(self.beta_proj(inp)), mask), "g": None}
        if self.gated:
            dt = F.softplus(self.gate_proj(inp) + self.dt_bias)
            features["g"] = zero_padded(-torch.exp(self.A_log) * dt, mask)
            features["r"] = split_heads(self.r_proj(inp), self.n_heads)
        return features, conv_state

    def _op(self, fq, fkv, pattern, initial_state, output_final_state):
        return delta_rule(
            fq["q"], fkv["k"], fkv["v"], fkv["beta"], g=fkv["g"], causal=pattern.causal, cross=pattern.cross, scale=self.scale,
            initial_state=initial_state, output_final_state=output_final_state, backend=self._op_backend(fq["q"].shape[1]),
        )

    def _read(self, fq, S):
        return self.scale * torch.einsum("bthk,bhkv->bthv", fq["q"], S.to(fq["q"].dtype))

    def _out(self, o, fq):
        o = normed(self.norm, o)
        if self.gated:
            o = o * F.silu(fq["r"])
        return self.o_proj(o.flatten(2))

    def _zero_state(self, batch_size):
        w = self.o_proj.weight
        return {"S": w.new_zeros(batch_size, self.n_heads, self.head_dim, self.head_dim), "conv": self.conv.init_state(batch_size, w)}


@register
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with a
    data-dependent decay per head, ``g_t = -exp(A_log) softplus(W_a x_t + dt_bias)`` (as Mamba-2),
    and a swish output gate: ``y = W_o (norm(o) * silu(W_r x))``."""

    name = "gated_deltanet"
    gated = True
