"""Decode-step benchmark: the cost of one token for a gated-linear-attention layer.

Three parts, each printed as a table (and written as JSON to ``$OUT/decode_step.json`` when ``OUT``
is set, or to ``--json``):

1. State step: one GLA layer's state update and read per token,
   ``S = diag(exp g) S + k v^T``, ``o = scale q^T S``, state ``[B, H, K, V]`` in float32
   (H = 16, K = V = 128: 1 MiB per sequence), at batch 1 and 64, from the real state after a
   context of 1K to 1M tokens (built by ``seqmix.ops.gated_linear_attention`` at batch 1 and copied
   to every sequence): the time must not depend on the context. Forms: PyTorch eager (as
   written, and in place), ``torch.compile``, a CUDA graph of each, flash-linear-attention's
   ``fused_recurrent_simple_gla`` (a gate per head) and ``fused_recurrent_gla`` (per channel)
   when ``fla`` imports, and ``seqmix.ops.gla_step`` when it exists. Floor: the state read and
   written once at 3.0 TB/s. Every form is checked against a float64 reference first.
2. Layer step: a whole pre-norm decoder block (RMSNorm, seqmix's ``gla`` mixer with 16 heads of
   128, RMSNorm, SwiGLU MLP) at d_model 2048, batch 1, bf16 weights and a float32 state, through
   ``seqmix.models.generation.block_step``: eager, compiled, and CUDA graphs. Floor: weights read
   once plus the state read and written once, at 3.0 TB/s.
3. For contrast, SDPA of one query per sequence over a bf16 KV cache of 1K / 8K / 32K tokens at
   batch 64. Floor: the cache read once.

Run on a GPU:  ``python benchmarks/decode_step.py``
Dry run on a CPU at tiny sizes:  ``python benchmarks/decode_step.py --tiny --device cpu``
(CUDA graphs and the Triton kernels are skipped there, with the reason printed).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import seqmix
from seqmix.bench.measure import cuda_graph
from seqmix.models.generation import block_step
from seqmix.models.layers import Block
from seqmix.ops import gated_linear_attention

BANDWIDTH = 3.0e12  # bytes/s: a device-to-device copy on the lent H100 (read + write)


@dataclass(frozen=True)
class Config:
    device: str
    heads: int
    key_dim: int
    value_dim: int
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_segment: int
    layer_d_model: int
    layer_heads: int
    kv_contexts: tuple[int, ...]
    kv_batch: int
    iters: int
    repeats: int

    @staticmethod
    def make(tiny: bool, device: str) -> Config:
        if tiny:
            return Config(device, 2, 8, 8, (1, 2), (16, 64, 256), 64, 64, 2, (64, 256), 2, 20, 3)
        contexts = tuple(1024 * 4**i for i in range(6))  # 1K .. 1M
        return Config(device, 16, 128, 128, (1, 64), contexts, 4096, 2048, 16, (1024, 8192, 32768), 64, 200, 7)


@dataclass
class Results:
    env: dict
    config: dict
    state_step: list[dict] = field(default_factory=list)
    layer_step: list[dict] = field(default_factory=list)
    sdpa: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def skip(self, what: str, why: str) -> None:
        line = f"skipped {what}: {why}"
        print(line)
        self.skipped.append(line)


# -- timing ----------------------------------------------------------------------------------
def time_us(fn: Callable[[], object], cfg: Config) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls, in microseconds
    (CUDA events on a GPU, so launch gaps count; the host clock on a CPU)."""
    cuda = cfg.device == "cuda"
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(cfg.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(cfg.iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / cfg.iters)
        else:
            t0 = time.perf_counter()
            for _ in range(cfg.iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e6 / cfg.iters)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- part 1: the state step ------------------------------------------------------------------------
def step_eager(S, q, k, v, g, scale: float):
    """``S [B, H, K, V]``, ``q, k, g [B, H, K]``, ``v [B, H, V]`` -> ``(o [B, H, V], new S)``."""
    S = torch.exp(g)[..., None] * S + k[..., None] * v[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


def step_in_place(S, q, k, v, g, scale: float):
    """The same, updating ``S`` in place (two passes over the state for the update, one for the read)."""
    S.mul_(torch.exp(g)[..., None]).addcmul_(k[..., None], v[..., None, :])
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


def fla_forms() -> tuple[dict[str, Callable], str]:
    """flash-linear-attention's fused recurrent steps (layout ``[B, T, H, K]``), if it imports."""
    try:
        import fla
        from fla.ops.gla import fused_recurrent_gla
        from fla.ops.simple_gla import fused_recurrent_simple_gla
    except Exception as err:  # any import failure means: not available here
        return {}, f"flash-linear-attention does not import ({type(err).__name__}: {err})"
    layout = {"head_first": False} if "head_first" in inspect.signature(fused_recurrent_gla).parameters else {}

    def simple(S, q, k, v, g_head, scale):
        o, S = fused_recurrent_simple_gla(
            q=q[:, None], k=k[:, None], v=v[:, None], g=g_head[:, None], scale=scale,
            initial_state=S, output_final_state=True, **layout,
        )
        return o[:, 0], S

    def per_channel(S, q, k, v, g, scale):
        o, S = fused_recurrent_gla(
            q=q[:, None], k=k[:, None], v=v[:, None], gk=g[:, None], scale=scale,
            initial_state=S, output_final_state=True, **layout,
        )
        return o[:, 0], S

    return {"fla fused_recurrent_simple_gla": simple, "fla fused_recurrent_gla": per_channel}, f"fla {getattr(fla, '__version__', '?')}"


def context_states(cfg: Config) -> dict[int, torch.Tensor]:
    """The state ``[1, H, K, V]`` after each context length: GLA over random keys, values and gates
    (``log alpha = logsigmoid(.) / 16``, as the gla mixer), by seqmix's op, segment by segment."""
    H, K, V, dev = cfg.heads, cfg.key_dim, cfg.value_dim, cfg.device
    gen = torch.Generator(device=dev).manual_seed(0)
    states, S, done = {}, torch.zeros(1, H, K, V, device=dev), 0
    for target in sorted(cfg.contexts):
        while done < target:
            n = min(cfg.prefill_segment, target - done)
            q, k = (torch.randn(1, n, H, K, device=dev, generator=gen) * K**-0.5 for _ in range(2))
            v = torch.randn(1, n, H, V, device=dev, generator=gen)
            g = F.logsigmoid(torch.randn(1, n, H, K, device=dev, generator=gen)) / 16
            _, S = gated_linear_attention(q, k, v, g, causal=True, initial_state=S, output_final_state=True)
            done += n
        states[target] = S.clone()
    return states


def state_step(cfg: Config, res: Results) -> None:
    H, K, V, dev = cfg.heads, cfg.key_dim, cfg.value_dim, cfg.device
    scale = K**-0.5
    cuda = dev == "cuda"
    t0 = time.perf_counter()
    states = context_states(cfg)
    print(f"context states built up to {max(cfg.contexts)} tokens in {time.perf_counter() - t0:.1f} s")

    forms: dict[str, tuple[Callable, bool]] = {  # name: (step, takes the per-channel gate)
        "eager": (step_eager, True),
        "eager in place": (step_in_place, True),
        "torch.compile": (torch.compile(step_eager, dynamic=False), True),
    }
    fla, fla_note = fla_forms() if cuda else ({}, "its kernels are Triton, CUDA only")
    if not fla:
        res.skip("flash-linear-attention", fla_note)
    for name, fn in fla.items():
        forms[name] = (fn, "simple" not in name)
    kernel = getattr(seqmix.ops, "gla_step", None)
    if kernel is None:
        res.skip("seqmix.ops.gla_step", "seqmix.ops has no gla_step (a Triton step kernel) in this revision")
    elif not cuda:
        res.skip("seqmix.ops.gla_step", "a Triton kernel, CUDA only")
    else:  # assumed contract: gla_step(q, k, v, g, state, *, scale) -> (o [B, H, V], new state)
        forms["seqmix.ops.gla_step"] = (lambda S, q, k, v, g, scale: kernel(q, k, v, g, S, scale=scale), True)

    for B in cfg.batches:
        gen = torch.Generator(device=dev).manual_seed(B)
        q, k = (torch.randn(B, H, K, device=dev, generator=gen) * K**-0.5 for _ in range(2))
        v = torch.randn(B, H, V, device=dev, generator=gen)
        g = F.logsigmoid(torch.randn(B, H, K, device=dev, generator=gen)) / 16
        g_head = g[..., 0].contiguous()  # a gate per head (simple GLA)
        floor = 2 * B * H * K * V * 4 / BANDWIDTH * 1e6
        for name, (fn, per_channel) in forms.items():
            gate = g if per_channel else g_head
            ref_inputs = [t.double() for t in (q, k, v, gate if per_channel else g_head[..., None].expand_as(k))]
            for label, graphed in [(name, False)] + ([(f"{name} + CUDA graph", True)] if cuda else []):
                times, err = {}, 0.0
                try:
                    for L in cfg.contexts:
                        S = states[L].expand(B, H, K, V).contiguous()
                        o_ref, S_ref = step_eager(S.double(), *ref_inputs, scale)
                        o, S_new = fn(S.clone(), q, k, v, gate, scale)
                        err = max(err, rel_err(o, o_ref), rel_err(S_new, S_ref))

                        def run(fn=fn, S=S, gate=gate):  # in place forms carry S from token to token
                            return fn(S, q, k, v, gate, scale)

                        times[L] = time_us(cuda_graph(run) if graphed else run, cfg)
                except Exception as exc:
                    res.skip(f"{label} at batch {B}", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                if err > 1e-3:
                    res.skip(f"{label} at batch {B}", f"WRONG: relative error {err:.1e} against float64")
                    continue
                for L, us in times.items():
                    res.state_step.append(dict(form=label, batch=B, context=L, us=us, floor_us=floor, rel_err=err))


# -- part 2: a whole decoder layer --------------------------------------------------------------------
def layer_step(cfg: Config, res: Results) -> None:
    dev, d = cfg.device, cfg.layer_d_model
    cuda = dev == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("gla", d, cfg.layer_heads, expand_k=1.0)
    block = Block(d, mixer, causal=True).to(dev, dtype)
    H, K, V = cfg.layer_heads, mixer.key_dim, mixer.head_dim
    x = torch.randn(1, d, device=dev, dtype=dtype)
    S = torch.randn(1, H, K, V, device=dev, dtype=torch.float32) * 0.1  # float32 state
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    floor = (weights + 2 * S.numel() * 4) / BANDWIDTH * 1e6
    out = torch.empty_like(x)

    def eager_step():
        y, state = block_step(block, x, {"S": S})
        S.copy_(state["S"])  # carry the state: a real decoding step
        out.copy_(y)

    compiled_block = torch.compile(lambda x_t, S_t: block_step(block, x_t, {"S": S_t}), dynamic=False)

    def compiled_step():
        y, state = compiled_block(x, S)
        S.copy_(state["S"])
        out.copy_(y)

    note = f"weights {weights / 2**20:.1f} MiB {str(dtype).removeprefix('torch.')}, state {S.numel() * 4 / 2**20:.2f} MiB float32"
    forms = [("eager", eager_step, False), ("torch.compile", compiled_step, False)]
    if cuda:
        forms += [("torch.compile + CUDA graph", compiled_step, True), ("eager + CUDA graph", eager_step, True)]
    else:
        res.skip("layer step with CUDA graphs", "CUDA only")
    with torch.no_grad():
        for label, fn, graphed in forms:
            try:
                run = cuda_graph(fn) if graphed else fn
                us = time_us(run, cfg)
            except Exception as err:
                res.skip(f"layer step, {label}", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            res.layer_step.append(dict(form=label, batch=1, d_model=d, us=us, floor_us=floor, note=note))


# -- part 3: SDPA over a KV cache ------------------------------------------------------------------------
def sdpa(cfg: Config, res: Results) -> None:
    dev, B, H, D = cfg.device, cfg.kv_batch, cfg.heads, cfg.key_dim
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for L in cfg.kv_contexts:
        q = torch.randn(B, H, 1, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(2))
        us = time_us(lambda: F.scaled_dot_product_attention(q, k, v), cfg)
        floor = 2 * k.numel() * k.element_size() / BANDWIDTH * 1e6
        res.sdpa.append(dict(form="SDPA, one query over the KV cache", batch=B, context=L, us=us, floor_us=floor, dtype=str(dtype)))
        del k, v


# -- report --------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    env = {"torch": torch.__version__, "python": platform.python_version(), "git": rev, "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def print_tables(res: Results, cfg: Config) -> None:
    print("\n== state step: us per token (state update + read), float32 state "
          f"[B, {cfg.heads}, {cfg.key_dim}, {cfg.value_dim}] ==")
    contexts = list(cfg.contexts)
    head = f"{'form':40s} {'B':>3s} " + " ".join(f"{_k(L):>8s}" for L in contexts) + f" {'max/min':>8s} {'floor':>7s} {'x floor':>7s} {'rel err':>8s}"
    print(head)
    keys = dict.fromkeys((r["form"], r["batch"]) for r in res.state_step)
    for form, B in sorted(keys, key=lambda fb: (fb[1], fb[0])):
        rows = {r["context"]: r for r in res.state_step if r["form"] == form and r["batch"] == B}
        times = [rows[L]["us"] for L in contexts if L in rows]
        any_row = next(iter(rows.values()))
        cells = " ".join(f"{rows[L]['us']:8.1f}" if L in rows else f"{'-':>8s}" for L in contexts)
        best = min(times)
        print(f"{form:40s} {B:3d} {cells} {max(times) / best:8.2f} {any_row['floor_us']:7.1f} "
              f"{best / any_row['floor_us']:7.2f} {any_row['rel_err']:8.1e}")
    print(f"\n== layer step: decoder block (norm + gla mixer + norm + SwiGLU), d_model {cfg.layer_d_model}, batch 1 ==")
    for r in res.layer_step:
        print(f"{r['form']:40s} {r['us']:8.1f} us   floor {r['floor_us']:6.1f} us ({r['note']})")
    print(f"\n== contrast: SDPA, one query per sequence over a KV cache, batch {cfg.kv_batch} ==")
    for r in res.sdpa:
        print(f"{_k(r['context']):>6s} tokens {r['us']:10.1f} us   floor {r['floor_us']:8.1f} us ({r['dtype']})")
    if res.skipped:
        print("\n" + "\n".join(res.skipped))


def _k(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run, e.g. on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: $OUT/decode_step.json if OUT is set)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu (with --tiny) for a dry run")
    cfg = Config.make(args.tiny, args.device)
    res = Results(env=environment(args.device), config=asdict(cfg))
    print(json.dumps(res.env))
    if args.device == "cpu":
        res.skip("CUDA graphs", "CUDA only; times on the CPU are host-clock times of a dry run")
    with torch.no_grad():
        state_step(cfg, res)
        sdpa(cfg, res)
    layer_step(cfg, res)  # last: a failed graph capture is the only step that may leave CUDA unusable
    print_tables(res, cfg)
    path = args.json or (Path(os.environ["OUT"]) / "decode_step.json" if os.environ.get("OUT") else None)
    if path is not None:
        path.write_text(json.dumps(asdict(res), indent=1))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
