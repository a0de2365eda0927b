"""Compiles, without a GPU, every Triton kernel an op launches, for the H100 (sm_90), and prints each
one's registers, spill (stack bytes per thread), shared memory and tensor-core instructions.

The op runs once forward and backward on CPU tensors at the benchmark's shape, with each launch
recorded instead of run (its arguments give the signature and constexprs; outputs stay
uninitialised: nothing here checks numbers); each distinct launch is then compiled for sm_90 with
the Triton installed and measured with the ``cuobjdump`` it bundles. For a session without device
time: register pressure, spills and shared memory past the 227 KB of an H100 show up here.

    python benchmarks/compile_kernels.py [--ops gla,delta,linear] [--gate head] [--length 8192] [--dtype bf16]

``linear`` is linear attention (elu + 1, normalised, then identity unnormalised; ``--causal no``: the
fused noncausal kernels); ``gla`` with ``--gate none`` and ``--causal no`` is the shared-state path
(no gate, noncausal self).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import seqmix.kernels.delta_chunk
import seqmix.kernels.gla_channel
import seqmix.kernels.gla_chunk
import seqmix.kernels.linear_noncausal
import seqmix.kernels.shared_state
import seqmix.kernels.step  # noqa: F401  (imported before TRITON_INTERPRET is set: JITFunctions, not interpreted ones)
from seqmix.ops.delta import delta_rule
from seqmix.ops.gla import gated_linear_attention
from seqmix.ops.linear import linear_attention

H, D, TOKENS = 16, 128, 65536
SHARED_LIMIT = 232_448  # bytes of shared memory a block may use on sm_90
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def recorded_launches(run) -> list[tuple[JITFunction, dict, dict, dict, dict]]:
    """``run()`` with every Triton launch recorded and skipped: ``(kernel, signature, constexprs,
    attrs, options)`` per distinct launch, in order; ``attrs`` marks the pointers and integers
    divisible by 16, as the JIT specialises them on the GPU (without it, loads compile scalar)."""
    launches, seen = [], set()

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(self.arg_names, args)) | kwargs
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(self.params):
            value = values.get(param.name, param.default)
            if param.is_constexpr or value is None:
                signature[param.name], constexprs[(i,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = f"*{TYPES[value.dtype]}"
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[param.name] = "fp32"
        key = (self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), str(attrs), tuple(options.items()))
        if key not in seen:
            seen.add(key)
            launches.append((self, signature, constexprs, attrs, options))

    original, JITFunction.run = JITFunction.run, record
    os.environ["TRITON_INTERPRET"] = "1"  # lets the ops hand CPU tensors to their kernels; the kernels are JITFunctions already
    try:
        run()
    finally:
        JITFunction.run = original
        del os.environ["TRITON_INTERPRET"]
    return launches


def resources(kernel: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict) -> str:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(item.split(":", 1) for line in dump.splitlines() if "REG:" in line for item in line.split() if ":" in item)
    shared, ptx = compiled.metadata.shared, compiled.asm["ptx"]
    over = "  OVER THE SHARED-MEMORY LIMIT" if shared > SHARED_LIMIT else ""
    return (f"regs {usage.get('REG', '?'):>4} spill {usage.get('STACK', '?'):>5} B shared {shared:>7} B "
            f"wgmma {ptx.count('wgmma.mma_async'):>3} mma.sync {ptx.count('mma.sync'):>3}{over}")


def op_call(op: str, gate: str, T: int, dtype: torch.dtype, causal: bool = True):
    """One forward and backward of ``op`` (self; causal unless ``causal`` is False) at ``TOKENS // T`` sequences of ``T`` tokens."""
    B = max(1, TOKENS // T)
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    per_channel = gate == "channel" and op == "gla"
    g = None if gate == "none" else F.logsigmoid(torch.randn(B, T, H, *((D,) if per_channel else ()))).to(dtype).requires_grad_()

    def run():
        if op == "linear":
            o = linear_attention(q, k, v, causal=causal, backend="triton")
            o = o + linear_attention(q, k, v, causal=causal, feature_map="identity", normalize=False, backend="triton")
        elif op == "gla":
            o, _ = gated_linear_attention(q, k, v, g, causal=causal, backend="triton")
        else:
            beta = torch.rand(B, T, H, dtype=dtype, requires_grad=True)
            o, _ = delta_rule(q, F.normalize(k, dim=-1), v, beta, g=g, causal=True, backend="triton")
        o.sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="gla,delta", help="comma-separated: gla, delta, linear")
    parser.add_argument("--causal", choices=("yes", "no"), default="yes", help="gla, linear: causal or noncausal self (delta: causal)")
    parser.add_argument("--gate", choices=("none", "head", "channel"), default="head", help="channel: gla only (delta takes head)")
    parser.add_argument("--length", type=int, default=8192, help="T; the batch is 65,536 // T")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"triton {triton.__version__}, target sm_90; {args.dtype}, H={H}, D={D}, T={args.length}, gate {args.gate}, causal {args.causal}")
    for op in args.ops.split(","):
        gate = "head" if op == "delta" and args.gate == "channel" else args.gate
        for kernel, signature, constexprs, attrs, options in recorded_launches(op_call(op, gate, args.length, dtype, args.causal == "yes")):
            flags = "".join(f" {k}={constexprs[(i,)]}" for i, k in enumerate(signature) if k in ("PHI", "NORM"))
            name = f"{op}: {kernel.fn.__name__}{flags}"
            try:
                print(f"{name:<44} warps {options.get('num_warps', 4)} stages {options.get('num_stages', 3)}  "
                      f"{resources(kernel, signature, constexprs, attrs, options)}", flush=True)
            except Exception as e:  # noqa: BLE001  (one kernel's failure is reported; the rest go on)
                print(f"{name:<44} FAILED {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)


if __name__ == "__main__":
    main()
