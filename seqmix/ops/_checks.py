"""Argument checks shared by the ops: clear errors naming the argument and what was expected."""

from __future__ import annotations

import torch

def check_tensor(name: str, t: object, ndim: int | tuple[int, ...], *, like: torch.Tensor | None = None) -> torch.Tensor:
    """A floating tensor of the given rank, on ``like``'s device and of its dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}, expected {like.device} (the device of q)")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype} (the dtype of q)")
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> tuple[int, int, int, int, int, int]:
    """Checks ``q [B, T, H, K]``, ``k [B, S, H, K]``, ``v [B, S, H, V]``; returns (B, T, S, H, K, V).

    Causal forms need aligned sequences, ``S == T``.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_tensor("q", q, 4)
    check_tensor("k", k, 4, like=q)
    check_tensor("v", v, 4, like=q)
    B, T, H, K = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]} (layout [batch, time, heads, head_dim])")
    if k.shape[2] != H or v.shape[2] != H:
        raise ValueError(f"head counts differ: q {H}, k {k.shape[2]}, v {v.shape[2]} (layout [batch, time, heads, head_dim])")
    if k.shape[3] != K:
        raise ValueError(f"k has head_dim {k.shape[3]}, expected {K} (the head_dim of q)")
    S = k.shape[1]
    if v.shape[1] != S:
        raise ValueError(f"k and v lengths differ: k {S}, v {v.shape[1]}")
    if T == 0 or S == 0:
        raise ValueError(f"sequences must not be empty: q has length {T}, k has length {S}")
    if causal and S != T:
        raise ValueError(f"causal forms need aligned sequences: q has length {T}, k and v have {S}")
    return B, T, S, H, K, v.shape[3]


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check of ``t``'s values (which reads the device) may run: not while compiling or
    capturing a CUDA graph."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_sign(t: torch.Tensor, sign: int, message: str) -> None:
    """Every entry of ``t`` ``<= 0`` (``sign = -1``) or ``>= 0`` (``sign = 1``), else
    ``ValueError(message)``: on the CPU at once; on the GPU as a device-side assertion
    (``torch._assert_async``), since a host sync per call would leave the GPU idle while the launches
    after it are issued. NaN passes (a diverged model's NaN loss is the benchmark's to record; on the
    GPU a failed assertion ends the process). Skipped while compiling or capturing (:func:`values_checkable`)."""
    if not values_checkable(t) or not t.numel():
        return
    extreme = t.amax() if sign < 0 else t.amin()  # one reduction, no mask as large as t
    ok = ~(extreme * sign < 0)
    if t.is_cuda:
        torch._assert_async(ok, message)
    elif not ok:
        raise ValueError(f"{message}; got {'max' if sign < 0 else 'min'} {extreme.item():.3g}")


def check_log_gate(name: str, g: torch.Tensor, like: torch.Tensor, shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """A log forget gate: one of the given shapes, every entry ``<= 0`` (decay at most 1)."""
    check_tensor(name, g, tuple(len(s) for s in shapes), like=like)
    if tuple(g.shape) not in [tuple(s) for s in shapes]:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name} has shape {list(g.shape)}, expected {want}")
    check_sign(g, -1, f"{name} is a log forget gate and must be <= 0 everywhere")
    return g


def check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """An optional tensor of exactly ``shape`` (same device as ``like``)."""
    if t is None:
        return None
    check_tensor(name, t, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device} (the device of q)")
    return t


def check_cu_seqlens(cu_seqlens: object, q: torch.Tensor, *, causal: bool) -> int | None:
    """Offsets ``[N + 1]`` of ``N`` sequences packed along the time axis of a batch of one; returns
    ``N`` (``None`` without packing). Packing is for the causal forms; every sequence is non-empty."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be a 1-D int32 or int64 tensor of sequence offsets [N + 1]")
    if not causal:
        raise ValueError("cu_seqlens (packed sequences) is for the causal forms; pass causal=True")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed into a batch of 1, got batch {q.shape[0]}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {q.device} (the device of q)")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the packed length {q.shape[1]}, got {bounds}")
    return len(bounds) - 1


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def resolve_backend(
    op: str, backend: str, available: tuple[str, ...], device: torch.device, unavailable: dict[str, str] | None = None
) -> str:
    """Turns ``"auto"`` into the fastest available backend; rejects unknown or unavailable ones.

    ``available`` lists the op's backends, reference first; ``"auto"`` picks ``"triton"`` on CUDA
    where the op has one, else the first fast PyTorch form (``"chunked"``, ``"fft"``). An explicitly
    named backend is used or refused, never silently replaced; ``unavailable`` maps a backend the op
    has but cannot use for this call to the reason, given in the error.
    """
    if backend == "auto":
        if "triton" in available and device.type == "cuda":
            return "triton"
        fast = [b for b in available if b not in ("reference", "triton")]
        return fast[0] if fast else "reference"
    if unavailable and backend in unavailable:
        raise ValueError(f"{op}: backend {backend!r} is not available for this call: {unavailable[backend]}")
    if backend not in available:
        raise ValueError(f"{op}: backend {backend!r} is not available; choose from {('auto',) + available}")
    return backend
