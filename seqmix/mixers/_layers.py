"""Small pieces shared by mixers: short causal convolutions, rotary embeddings, masking, norms."""

from __future__ import annotations

import torch
from torch import nn

from seqmix.ops.conv import short_conv


def normed(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in the norm's weight dtype, returned in ``x``'s: under autocast a bf16
    ``x`` would meet float32 weights, which has no fused kernel (and warns)."""
    return norm(x.to(norm.weight.dtype)).to(x.dtype)


def zero_padded(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zeros ``t [B, T, ...]`` where ``mask [B, T]`` is False (padding)."""
    if mask is None:
        return t
    return t * mask.view(*mask.shape, *([1] * (t.dim() - 2))).to(t.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution of width ``W`` over ``[B, T, D]`` (Mamba, DeltaNet, Hyena).

    ``forward(x, state)`` continues from ``state``, the last ``W - 1`` inputs ``[B, W - 1, D]``
    (zeros at the start), and returns the new state too, so one call serves a whole sequence, a
    chunk of one, or a single decoding step.
    """

    def __init__(self, dim: int, width: int = 4):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.randn(dim, width) / width**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            state = self.init_state(x.shape[0], x)
        window = torch.cat([state, x], dim=1)  # (B, W - 1 + T, D)
        y = short_conv(window, self.weight, self.bias)[:, self.width - 1 :]
        return y, window[:, window.shape[1] - (self.width - 1) :].clone()  # not a view: hold only W - 1 inputs

    def init_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch_size, self.width - 1, self.weight.shape[0])


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) of ``x [B, T, H, D]`` at integer ``positions [T]``:
    channel pairs ``(x_i, x_{i + D/2})`` rotated by ``positions * base^(-2i/D)``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * freqs  # (T, half)
    cos, sin = (f.to(x.dtype)[None, :, None, :] for f in (angles.cos(), angles.sin()))
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, H * D]`` -> ``[B, T, H, D]``."""
    return t.unflatten(-1, (n_heads, -1))
