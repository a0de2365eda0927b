"""Time and peak memory of one call, on CUDA and on the CPU.

Time: warm-up, then the median of repeats.
- CUDA: ``triton.testing.do_bench(..., return_mode="median")`` (device events, L2 flushed between
  calls) when Triton is importable and a call takes under ``SLOW_MS``; slower calls (and no
  Triton) are timed with CUDA events around each of ``max(MIN_REPEATS, rep_ms / call)`` repeats,
  since ``do_bench`` would spend at least eight calls on them.
- CPU: a ``time.perf_counter`` loop, each call timed alone (CPU ops are synchronous).

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: ``peak`` is the
  whole process's allocated memory at its peak, ``extra`` the part above what was allocated just
  before the call (the inputs, the parameters and anything else alive).
- CPU (``LiveTensorBytes``): the peak, over the boundaries between ATen ops, of the bytes of
  tensor storage created during the call and still alive (a ``TorchDispatchMode`` sees every op,
  backward included); the inputs' own storage is excluded. Scratch space inside one op (a fused
  kernel's workspace) is not seen. ``peak`` is ``extra`` plus the inputs' bytes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SLOW_MS = 50.0
MIN_REPEATS = 3
MAX_REPEATS = 100

CUDA_MEMORY = "cuda.max_memory_allocated"
CPU_MEMORY = "cpu.live_tensor_bytes"


@dataclass(frozen=True)
class Timing:
    ms: float
    timer: str  # "triton.do_bench", "cuda.events" or "perf_counter"
    repeats: int | None  # None where do_bench chose


@dataclass(frozen=True)
class Memory:
    peak: int
    extra: int
    measure: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(leaves: Iterable[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def first_call(fn: Callable[[], object], leaves: list[torch.Tensor], device: torch.device) -> float:
    """Runs ``fn`` once (the first warm-up: compilation, autotuning, caches) and returns its seconds."""
    clear_grads(leaves)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` (reading and writing fixed tensors only) captured once in a CUDA graph; returns the
    replay, which launches the whole call at once (host launch overhead out of the time)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_call(fn: Callable[[], object], leaves: list[torch.Tensor], device: torch.device, *, first_ms: float, warmup_ms: float, rep_ms: float) -> Timing:
    """Median time of ``fn`` in milliseconds (gradients of ``leaves`` cleared before each call, untimed).

    ``first_ms``: the time of a first call already made, used to choose the number of repeats.
    """
    if device.type == "cuda" and first_ms < SLOW_MS:
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves or None, return_mode="median")
            return Timing(float(ms), "triton.do_bench", None)
    repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(rep_ms / max(first_ms, 1e-3))))
    warmups = max(1, min(MAX_REPEATS, int(warmup_ms / max(first_ms, 1e-3)))) if first_ms < SLOW_MS else 0
    for _ in range(warmups):
        clear_grads(leaves)
        fn()
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            clear_grads(leaves)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        return Timing(statistics.median(times), "cuda.events", repeats)
    for _ in range(repeats):
        clear_grads(leaves)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), "perf_counter", repeats)


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storage created under it and still alive; ``peak`` is their
    maximum over op boundaries. Storages in ``exclude`` (the inputs) are never counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if s.nbytes() and key not in self.live and key not in self.known:
                    self.live[key] = (StorageWeakRef(s), s.nbytes())
                    self.current += s.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object], leaves: list[torch.Tensor], inputs: list[torch.Tensor], device: torch.device) -> Memory:
    """Peak memory of one call of ``fn`` (see the module docstring for what is measured where)."""
    clear_grads(leaves)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return Memory(peak, peak - before, CUDA_MEMORY)
    with LiveTensorBytes(exclude=inputs) as tracker:
        fn()
    return Memory(tensor_bytes(inputs) + tracker.peak, tracker.peak, CPU_MEMORY)
