"""What ``backend="auto"`` stands for, by op or mixer and device: the profiler labels its cases with
it and the benchmark records it with each run."""

from __future__ import annotations

import torch

from seqmix.mixers import mixer_class
from seqmix.ops._checks import resolve_backend


def softmax_auto(device: torch.device, windowed: bool) -> str:
    """``softmax_attention``'s own ``"auto"``: FlexAttention for windows on CUDA, else SDPA."""
    return "flex" if windowed and device.type == "cuda" else "sdpa"


def mixer_backend(name: str, device: torch.device, windowed: bool) -> str:
    """What ``backend="auto"`` stands for in mixer ``name`` on ``device``: softmax attention's rule
    for the attention mixers, else triton on CUDA where the mixer has it, else its first fast
    PyTorch form."""
    backends = mixer_class(name).backends
    if "sdpa" in backends:
        return softmax_auto(device, windowed)
    return resolve_backend(name, "auto", backends, device)
