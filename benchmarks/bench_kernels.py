"""Times the Triton backends beside flash-linear-attention (when importable) and SDPA on the GPU.

bf16, H=16, D=128, 65,536 tokens per step (B = 65,536 / T), fwd+bwd (and fwd alone), median of
``triton.testing.do_bench``. Prints one table per length with each time and its ratio to the peer,
and the efficiency length (the shortest T at which the per-head-gate kernel beats SDPA causal).

    python benchmarks/bench_kernels.py [--lengths 2048 8192 32768] [--sweep] [--decoding] [--efficiency] [--delta]
                                       [--rows "head gate" ...]   # rows whose names contain these, and their peers
    python benchmarks/bench_kernels.py --breakdown [--delta] [--lengths 8192]   # GPU time per kernel
    python benchmarks/bench_kernels.py --rows "head gate" --sweep --sweep-only SEGMENT_MIN   # some rows, some constants
    python benchmarks/bench_kernels.py --rows "head gate" --configs "gla_chunk.BWD_BK=128,gla_chunk.BWD_WARPS=8"
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import re
import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from seqmix.kernels import gla_chunk
from seqmix.ops.delta import delta_rule
from seqmix.ops.gla import gated_linear_attention
from seqmix.ops.linear import linear_attention

H, D, TOKENS = 16, 128, 65536
START = time.perf_counter()


def inputs(T: int, kind: str, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """bf16 q, k, v and, by kind ("none", "head", "channel"), a log gate."""
    torch.manual_seed(seed)
    B = TOKENS // T
    x = {n: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for n in ("q", "k", "v")}
    x["k"] = x["k"] / D**0.5
    x["g"] = None
    if kind == "head":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3).to(torch.bfloat16)
    if kind == "channel":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device="cuda") + 3).to(torch.bfloat16)
    return x


def timed(fn: Callable, x: dict, backward: bool) -> float:
    """Median ms of ``fn(x)`` (and its backward, through ``autograd.grad`` so nothing accumulates)."""
    leaves = {n: t.requires_grad_(backward) for n, t in x.items() if t is not None}
    do = torch.randn_like(x["v"])

    def step():
        o = fn(x)
        if backward:
            torch.autograd.grad(o, list(leaves.values()), do)

    return do_bench(step, warmup=25, rep=150, return_mode="median")


def ours(causal: bool, chunk_size: int = 64, walks: bool | None = None, segments: bool = False) -> Callable:
    """The op on the triton backend; ``walks`` forces the walks over whole sequences (True) or the
    chunk-parallel form (False) in place of the choice by sequences x heads (None); ``segments``
    forces the walks per segment (as long as sequences are longer than ``SEGMENT_MIN``)."""
    def fn(x):
        target, below = gla_chunk.TARGET_PROGRAMS, gla_chunk.SEGMENT_BELOW
        if walks is not None:
            gla_chunk.TARGET_PROGRAMS, gla_chunk.SEGMENT_BELOW = (0 if walks else 2**31), 0
        if segments:
            gla_chunk.SEGMENT_BELOW = 2**31
        try:
            return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], causal=causal, backend="triton",
                                          chunk_size=chunk_size)[0]
        finally:
            gla_chunk.TARGET_PROGRAMS, gla_chunk.SEGMENT_BELOW = target, below
    return fn


def linear(x):
    """``linear_attention``, noncausal, elu + 1 features, normalised (triton backend)."""
    return linear_attention(x["q"], x["k"], x["v"], causal=False, backend="triton")


def sdpa(x):
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def peers() -> dict[str, Callable]:
    """flash-linear-attention's chunked kernels, if installed (its Hopper guard lifted for timing)."""
    if importlib.util.find_spec("fla") is None:
        return {}
    import fla.ops.common.chunk_o
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True
    return {
        "head": lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], x["g"].float())[0],
        "channel": lambda x: chunk_gla(x["q"], x["k"], x["v"], x["g"].float())[0],
    }


# (name, function, its inputs at length T, name of the peer row it is compared with)
def rows(fla: dict[str, Callable]) -> list[tuple[str, Callable, Callable[[int], dict], str | None]]:
    out = [
        ("head gate, causal", ours(True), "head", "fla chunk_simple_gla"),
        ("head gate, causal, walks", ours(True, walks=True), "head", "fla chunk_simple_gla"),
        ("head gate, causal, chunk-par.", ours(True, walks=False), "head", "fla chunk_simple_gla"),
        ("head gate, causal, segments", ours(True, segments=True), "head", "fla chunk_simple_gla"),
        ("channel gate, causal", ours(True), "channel", "fla chunk_gla"),
        ("no gate, causal", ours(True), "none", None),
        ("no gate, noncausal self", ours(False), "none", None),
        ("linear attn., noncausal (elu)", linear, "none", None),
    ]
    names = {"head": "fla chunk_simple_gla", "channel": "fla chunk_gla"}
    out += [(names[kind], fn, kind, None) for kind, fn in fla.items()]
    out.append(("sdpa causal", sdpa, "none", None))
    return [(name, fn, partial(inputs, kind=kind), peer) for name, fn, kind, peer in out]


def table(lengths: list[int], rows: list[tuple[str, Callable, Callable[[int], dict], str | None]]) -> None:
    """fwd and fwd+bwd times of ``rows`` (name, function, inputs at length T, name of the peer row),
    peers first, each with its ratio to its peer."""
    print(f"{'case':<28} {'T':>6} {'fwd ms':>8} {'fwd+bwd':>8} {'peer':>8} {'ratio':>6}")
    for T in lengths:
        times = {}
        for name, fn, make, peer in sorted(rows, key=lambda r: r[3] is not None):
            x = make(T)
            times[name] = (timed(fn, x, False), timed(fn, x, True))
            del x
            fwd, both = times[name]
            ref = f"{times[peer][1]:8.3f} {both / times[peer][1]:6.2f}" if peer in times else ""
            print(f"{name:<28} {T:>6} {fwd:8.3f} {both:8.3f} {ref}  (at {time.perf_counter() - START:.0f}s)", flush=True)


def delta_inputs(T: int, gated: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """bf16 q, L2-normalised k, v, beta in (0, 1) and (if gated) a log gate per head."""
    x = inputs(T, "head" if gated else "none", seed)
    x["k"] = F.normalize(x["k"].float(), dim=-1).to(torch.bfloat16)
    x["beta"] = torch.sigmoid(torch.randn(*x["k"].shape[:3], device="cuda")).to(torch.bfloat16)
    return x


def delta_rows() -> list[tuple[str, Callable, Callable[[int], dict], str | None]]:
    """(name, function, inputs at length T, name of the peer row) for the delta rule; fla's chunk_gated_delta_rule
    (and chunk_delta_rule) when installed, its Hopper guard lifted for timing."""
    def ours(causal: bool) -> Callable:
        def fn(x):
            return delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], causal=causal, backend="triton")[0]
        return fn

    out = [
        ("delta, head gate, causal", ours(True), True, "fla chunk_gated_delta_rule"),
        ("delta, no gate, causal", ours(True), False, "fla chunk_delta_rule"),
        ("delta, head gate, noncausal", ours(False), True, None),
    ]
    if importlib.util.find_spec("fla") is not None:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        from seqmix.bench.profile import lift_fla_hopper_guard

        lift_fla_hopper_guard()

        out += [
            ("fla chunk_gated_delta_rule", lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"].float(), x["beta"])[0], True, None),
            ("fla chunk_delta_rule", lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"])[0], False, None),
        ]
    return [(name, fn, partial(delta_inputs, gated=gated), peer) for name, fn, gated, peer in out]


def efficiency_length() -> None:
    """Shortest T (powers of two) at which the head-gate kernel's fwd+bwd beats SDPA causal."""
    print(f"{'T':>6} {'ours':>8} {'sdpa':>8}")
    for T in (256, 512, 1024, 2048):
        a = timed(ours(True), inputs(T, "head"), True)
        b = timed(sdpa, inputs(T, "none"), True)
        print(f"{T:>6} {a:8.3f} {b:8.3f}", flush=True)


SWEEP = {  # module constant of gla_chunk -> (values tried by --sweep, one at a time from the defaults; T)
    # the walks (chosen at T = 8192: 128 sequences x heads)
    "FWD_BV": ((32, 128), 8192), "FWD_WARPS": ((8,), 8192), "FWD_STAGES": ((1, 2), 8192),
    "BWD_BK": ((32,), 8192), "BWD_BV": ((32, 128), 8192), "BWD_WARPS": ((8,), 8192), "BWD_STAGES": ((1, 3), 8192),
    # the chunk-parallel form (chosen at T = 32768)
    "STATE_MIN_PROGRAMS": ((0, 2**31), 32768),
    "STATE_STAGES": (({2: 1, 4: 1}, {2: 2, 4: 2}), 32768), "OUT_BV": ((32, 128), 32768), "PAR_BK": ((32,), 32768),
    "PAR_BV": ((32,), 32768), "PAR_WARPS": ((4,), 32768), "PAR_STAGES": ((1, 3), 32768),
    "SAVE_STATES": ((False,), 32768),
    # the walks per segment (32768: 32 sequences x heads, segmented by default)
    "SEGMENT_PROGRAMS": ((1024, 2048), 32768), "SEGMENT_MIN": ((1024, 4096), 32768), "SEGMENT_STATE_BT": ((128,), 32768),
    "SEGMENT_STATE_TILE": (((64, 8), (32, 4)), 32768), "SEGMENT_STATE_STAGES": ((1, 3), 32768),
    "GATE_GRAD_BT": ((512,), 32768), "SEGMENT_BELOW": ((512,), 8192),
}


def sweep(only: list[str] | None = None) -> None:
    """Times the head-gate kernel: the defaults, each constant of SWEEP (or of ``only``) varied alone
    at its length, and (without ``only``) chunk size 128 with 4 and 8 warps."""
    print(f"{'variant':<24} {'T':>6} {'fwd':>7} {'fwd+bwd':>8}")
    for T in sorted({T for name, (_, T) in SWEEP.items() if only is None or name in only}):
        x = inputs(T, "head")
        print(f"{'defaults':<24} {T:>6} {timed(ours(True), x, False):7.3f} {timed(ours(True), x, True):8.3f}", flush=True)
        for name, (values, at) in SWEEP.items():
            if at != T or (only is not None and name not in only):
                continue
            default = getattr(gla_chunk, name)
            for value in values:
                setattr(gla_chunk, name, value)
                print(f"{name + ' ' + str(value):<24} {T:>6} {timed(ours(True), x, False):7.3f} "
                      f"{timed(ours(True), x, True):8.3f}", flush=True)
            setattr(gla_chunk, name, default)
        if only is not None:
            del x
            continue
        warps = gla_chunk.FWD_WARPS, gla_chunk.BWD_WARPS, gla_chunk.PAR_WARPS
        for w in (4, 8):
            gla_chunk.FWD_WARPS = gla_chunk.BWD_WARPS = gla_chunk.PAR_WARPS = w
            print(f"{'chunk 128, warps ' + str(w):<24} {T:>6} {timed(ours(True, 128), x, False):7.3f} "
                  f"{timed(ours(True, 128), x, True):8.3f}", flush=True)
        gla_chunk.FWD_WARPS, gla_chunk.BWD_WARPS, gla_chunk.PAR_WARPS = warps
        del x


def configs(lengths: list[int], row: tuple[str, Callable, Callable[[int], dict], str | None], specs: list[str]) -> None:
    """Times ``row`` with its defaults, then under each spec: constants of ``seqmix.kernels`` modules
    set together (``"gla_chunk.BWD_BK=128,gla_chunk.BWD_WARPS=8"``), restored after it."""
    name, fn, make, _ = row
    print(f"{name}: {'constants':<60} {'T':>6} {'fwd':>7} {'fwd+bwd':>8}")
    for T in lengths:
        x = make(T)
        for spec in ["defaults", *specs]:
            saved = []
            for item in [] if spec == "defaults" else re.split(r",(?=\s*\w+\.\w+=)", spec):
                target, value = item.split("=", 1)
                module, constant = target.rsplit(".", 1)
                module = importlib.import_module(f"seqmix.kernels.{module}")
                saved.append((module, constant, getattr(module, constant)))
                setattr(module, constant, ast.literal_eval(value))
            try:
                print(f"{spec:<60} {T:>6} {timed(fn, x, False):7.3f} {timed(fn, x, True):8.3f}", flush=True)
            except Exception as err:  # a failed launch (e.g. too much shared memory) ends this spec only
                print(f"{spec:<60} {T:>6} failed: {str(err).splitlines()[0][:80]}", flush=True)
            finally:
                for module, constant, value in saved:
                    setattr(module, constant, value)
        del x


def decoding() -> None:
    """One token per sequence through the fused step (the op, checks included, and the bare kernel)
    and the reference, at batch 64 and 1; H=16, D=128, bf16 inputs, float32 state."""
    from seqmix.kernels.step import step
    from seqmix.ops.gla import gla_step

    print(f"{'decoding step':<34} {'batch':>5} {'us':>8}")
    for B in (64, 1):
        q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, H, device="cuda") + 3).to(torch.bfloat16)
        S = torch.randn(B, H, D, D, device="cuda")
        for name, fn in [
            ("gla_step triton (op)", lambda: gla_step(q, k, v, g, S, backend="triton")),
            ("gla_step triton (kernel)", lambda: step(q, k, v, S, scale=D**-0.5, g=g)),
            ("gla_step reference (op)", lambda: gla_step(q, k, v, g, S, backend="reference")),
        ]:
            print(f"{name:<34} {B:>5} {1000 * do_bench(fn, warmup=25, rep=100, return_mode='median'):8.1f}", flush=True)


def inspect() -> None:
    """Registers, spills, shared memory and the kind of matrix instruction of each compiled kernel."""
    for T, kind in ((8192, "head"), (32768, "head"), (8192, "channel")):
        timed(ours(True), inputs(T, kind), True)
    kernels = (gla_chunk._fwd_kernel, gla_chunk._bwd_kernel, gla_chunk._gate_grad_kernel, gla_chunk._states_kernel,
               gla_chunk._output_kernel, gla_chunk._chunk_bwd_kernel)
    for fn in kernels:
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                ptx = kernel.asm.get("ptx", "")
                print(f"{fn.__name__:<20} warps {kernel.metadata.num_warps} stages {kernel.metadata.num_stages} "
                      f"regs {kernel.n_regs} spills {kernel.n_spills} shared {kernel.metadata.shared} "
                      f"wgmma {ptx.count('wgmma.mma_async')} mma.sync {ptx.count('mma.sync')}", flush=True)


def profile_step(T: int, row: tuple[str, Callable, Callable[[int], dict], str | None]) -> None:
    """One warm-up and one measured fwd+bwd of ``row`` at length ``T``, for ncu."""
    name, fn, make, _ = row
    x = make(T)
    for _ in range(2):
        timed_once(fn, x)
    print(f"{name} T={T}: two fwd+bwd run", flush=True)


def breakdown(lengths: list[int], rows: list[tuple[str, Callable, Callable[[int], dict], str | None]]) -> None:
    """GPU time of each kernel in one fwd+bwd of each row (torch.profiler, mean of 5 after a warm-up),
    largest first, with the row's total."""
    from torch.profiler import ProfilerActivity, profile

    for T in lengths:
        for name, fn, make, _ in rows:
            x = make(T)
            timed_once(fn, x)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    timed_once(fn, x)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            events.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in events) / 5e3
            print(f"{name} T={T}: {total:.3f} ms of kernels per fwd+bwd", flush=True)
            for e in events:
                print(f"  {e.device_time_total / 5e3:8.3f} ms {e.count // 5:4d}x  {e.key[:90]}")
            del x


def timed_once(fn: Callable, x: dict) -> None:
    leaves = [t.requires_grad_() for t in x.values() if t is not None]
    torch.autograd.grad(fn(x), leaves, torch.randn_like(x["v"]))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 2048, 32768])
    parser.add_argument("--sweep", action="store_true", help="time launch configurations first (T=8192, 32768)")
    parser.add_argument("--efficiency", action="store_true", help="also find the efficiency length against SDPA")
    parser.add_argument("--inspect", action="store_true", help="print the compiled kernels' resources and exit")
    parser.add_argument("--profile-step", action="store_true",
                        help="run two fwd+bwd of the first chosen row at the first length (for ncu) and exit")
    parser.add_argument("--decoding", action="store_true", help="also time the fused decoding step")
    parser.add_argument("--delta", action="store_true", help="time the delta rule beside fla instead of GLA")
    parser.add_argument("--breakdown", action="store_true", help="GPU time per kernel of each row instead of the table")
    parser.add_argument("--rows", nargs="+", help="only the rows whose names contain one of these (and their peers)")
    parser.add_argument("--sweep-only", nargs="+", default=None, help="--sweep: only these constants")
    parser.add_argument("--configs", nargs="+", help='time the first chosen row under these sets of constants '
                        '("gla_chunk.BWD_BK=128,gla_chunk.BWD_WARPS=8") beside its defaults, and exit')
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
          f"fla {importlib.metadata.version('fla-core') if importlib.util.find_spec('fla') else 'absent'}")
    if args.inspect:
        return inspect()
    chosen = delta_rows() if args.delta else rows({} if args.breakdown else peers())
    if args.rows:
        names = {name for name, *_ in chosen if any(part in name for part in args.rows)}
        names |= {peer for name, _, _, peer in chosen if name in names}
        chosen = [r for r in chosen if r[0] in names]
    if args.profile_step:
        return profile_step(args.lengths[0], chosen[0])
    if args.configs:
        return configs(args.lengths, chosen[0], args.configs)
    if args.breakdown:
        return breakdown(args.lengths, chosen)
    if args.delta:
        return table(args.lengths, chosen)
    if args.sweep:
        sweep(args.sweep_only)
    table(args.lengths, chosen)
    if args.decoding:
        decoding()
    if args.efficiency:
        efficiency_length()


if __name__ == "__main__":
    main()
