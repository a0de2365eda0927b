"""Per-channel-gate GLA on the GPU: each kernel of the chunk-parallel form timed alone, under launch
shapes set one configuration at a time, and fwd+bwd of the op (bf16, H=16, D=128, 65,536 tokens).

    python benchmarks/bench_channel.py [--lengths 8192] [--kernels] [--config '{"DQK_BK": 64}']
    python benchmarks/bench_channel.py --sweep [--lengths 8192] [--budget 150]

Each configuration is a set of module constants of :mod:`seqmix.kernels.gla_channel` (applied,
timed, restored). Times: the state passes, the forward's and the backward's launches of that module
together, then each of its kernels alone (the scores counted once, in the forward).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from seqmix.kernels import gla_channel, gla_chunk
from seqmix.ops.gla import gated_linear_attention

H, D, TOKENS = 16, 128, 65536
SWEEP = [  # one process each (--config), so that a launch that fails does not end the sweep
    {},
    {"DQK_WARPS": 4},
    {"DQK_BK": 32},
    {"DQK_BK": 32, "DQK_BV": {2: 32, 4: 32}},
    {"DQK_BV": {2: 64, 4: 64}},
    {"DQK_STAGES": 2},
    {"KB": 32},
    {"OUT_WARPS": 8, "DV_WARPS": 8, "SCORES_WARPS": 8},
    # every chunk with a decaying gate on the exact (3-D) diagonal blocks, and their launch shapes
    {"SPAN_MAX": 0.0},
    {"SPAN_MAX": 0.0, "DIAG_BK": 64, "DIAG_WARPS": 8},
    {"SPAN_MAX": 0.0, "KC": 16},
]
# each alone: with _scores_kernel skipped, the exact diagonal kernels read the flags its last run left
# (the caching allocator hands back the same buffer)
KERNELS = ("_scores_kernel", "_diag_kernel", "_output_kernel", "_dqk_diag_kernel", "_dqk_kernel", "_dv_kernel")


def inputs(T: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    B = TOKENS // T
    x = {n: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for n in ("q", "k", "v", "do")}
    x["k"] = x["k"] / D**0.5
    x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device="cuda") + 3).to(torch.bfloat16)
    return x


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def kernels(x: dict, BT: int = 64) -> dict[str, float]:
    """Median ms of each kernel of one fwd+bwd, launched alone on the same inputs."""
    q, k, v, g, do = x["q"], x["k"], x["v"], x["g"], x["do"]
    scale = D**-0.5
    chunks = gla_chunk._Chunks(k, None, BT)
    dims = (H, D, D)
    states, _ = gla_chunk._states(k, v, g, None, chunks, dims, 1.0, False, BT)
    dstates, _ = gla_chunk._states(q, do, g, None, chunks, dims, scale, False, BT, reverse=True)
    fwd = lambda: gla_channel.outputs(q, k, v, g, states, chunks, scale, False, BT)  # noqa: E731
    bwd = lambda: gla_channel.backward(q, k, v, g, states, dstates, do, chunks, scale, False, BT)  # noqa: E731
    out = {
        "states fwd": ms(lambda: gla_chunk._states(k, v, g, None, chunks, dims, 1.0, False, BT)),
        "states rev": ms(lambda: gla_chunk._states(q, do, g, None, chunks, dims, scale, False, BT, reverse=True)),
        "outputs": ms(fwd),
        "backward": ms(bwd),
    }
    runs = {name: getattr(gla_channel, name).run for name in KERNELS}
    for name in KERNELS:  # each kernel alone: the others' launches are no-ops
        for other in KERNELS:
            if other != name:
                getattr(gla_channel, other).run = lambda *a, **kw: None
        try:
            forward = name in ("_scores_kernel", "_diag_kernel", "_output_kernel")
            out[name.strip("_").removesuffix("_kernel")] = ms(fwd if forward else bwd)
        finally:
            for other, run in runs.items():
                getattr(gla_channel, other).run = run
    return out


def total(x: dict) -> float:
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "g")]

    def step():
        o, _ = gated_linear_attention(x["q"], x["k"], x["v"], x["g"], causal=True, backend="triton", chunk_size=64)
        torch.autograd.grad(o, leaves, x["do"])

    out = do_bench(step, warmup=10, rep=100, return_mode="median")
    for t in leaves:
        t.requires_grad_(False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--sweep", action="store_true", help="every configuration of SWEEP, one process each")
    parser.add_argument("--config", default="{}", help="module constants to set, as a Python dict literal")
    parser.add_argument("--kernels", action="store_true", help="also each kernel alone")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which the sweep stops")
    args = parser.parse_args()
    if args.sweep:
        start = time.perf_counter()
        for cfg in SWEEP:
            if time.perf_counter() - start > args.budget:
                print("budget spent: sweep stopped", flush=True)
                break
            cmd = [sys.executable, __file__, "--config", repr(cfg), "--kernels", "--lengths", *map(str, args.lengths)]
            try:
                subprocess.run(cmd, timeout=max(10.0, args.budget + 30 - (time.perf_counter() - start)))
            except subprocess.TimeoutExpired:
                print(f"{cfg}: stopped by the budget", flush=True)
        return
    cfg = ast.literal_eval(args.config)
    for n, val in cfg.items():
        assert hasattr(gla_channel, n), n
        setattr(gla_channel, n, val)
    print(f"{cfg or 'default'} ({torch.cuda.get_device_name()}, torch {torch.__version__})", flush=True)
    for T in args.lengths:
        x = inputs(T)
        try:
            line = f"  T={T}: fwd+bwd of the op {total(x):.3f} ms"
            if args.kernels:
                line += "; " + "  ".join(f"{n} {v:.3f}" for n, v in kernels(x).items())
        except Exception as e:  # noqa: BLE001  (a configuration that does not compile or fit)
            line = f"  T={T}: FAILED {type(e).__name__}: {str(e)[:150]}"
        print(line, flush=True)
        del x


if __name__ == "__main__":
    main()
