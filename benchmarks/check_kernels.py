"""Checks the Triton backends against the float64 chunked form on the GPU, at real shapes.

For each family, pattern, shape and dtype: fresh random inputs; the allocator's free blocks are
filled with NaN before the Triton run, so that an output element the kernels never write shows as
NaN; outputs, final state and the gradient of every input under a random cotangent are compared to
the chunked backend run on the same inputs upcast to float64. Bounds: bf16 rel err <= 1e-2, fp32
<= 5e-3. The Triton run is made ``--repeats`` times (2) and must repeat bit for bit (``repeat``: the
largest relative difference from the first run; the kernels have no atomics, so anything but 0 is
a race). Prints one row per check and exits 1 if any fails. GLA at these shapes (batch x heads below
``gla_chunk.TARGET_PROGRAMS``) runs the chunk-parallel form; the "walks" families force the walks,
the "segments" families the causal walks per segment (of 256 tokens and more).

    python benchmarks/check_kernels.py [--part quick|long|all] [--smoke] [--only delta] [--repeats 2]
    python benchmarks/check_kernels.py --part quick --only "gla, head, seg|gla, packed, seg"   # prefixes
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from seqmix.kernels import gla_chunk
from seqmix.ops.delta import delta_rule, delta_rule_step
from seqmix.ops.gla import gated_linear_attention, gla_step
from seqmix.ops.linear import linear_attention
from seqmix.patterns import Pattern

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 5e-3}


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[..., dict[str, torch.Tensor | None]]  # (B, T, S, H, K, V, gen) -> float64 inputs
    call: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (inputs, pattern, backend) -> (o, final state)
    patterns: tuple[Pattern, ...] = tuple(Pattern)
    packed: bool = False  # B sequences of uneven lengths packed with cu_seqlens (causal only)


DEVICE = "cuda"


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float64)


def _gla_inputs(gate: str):
    def make(B, T, S, H, K, V, gen):
        g = None
        if gate == "head":
            g = F.logsigmoid(_randn(gen, B, S, H) + 3)
        elif gate == "channel":
            g = F.logsigmoid(_randn(gen, B, S, H, K) + 3)
        return dict(q=_randn(gen, B, T, H, K), k=_randn(gen, B, S, H, K) / K**0.5, v=_randn(gen, B, S, H, V), g=g,
                    initial_state=_randn(gen, B, H, K, V))
    return make


def _gla_call(x, pattern, backend):
    # the per-channel float64 reference keeps [C, C, K] weights per chunk: chunks of 16 keep them small
    chunk = 16 if backend == "chunked" and x["g"] is not None and x["g"].dim() == 4 else 64
    return gated_linear_attention(
        x["q"], x["k"], x["v"], x["g"], causal=pattern.causal, cross=pattern.cross, initial_state=x["initial_state"],
        output_final_state=True, backend=backend, chunk_size=chunk, cu_seqlens=x.get("cu_seqlens"),
    )


def _walks(call):
    """``call`` with the walks forced (one program per sequence and head), whatever the shape."""
    def walks(x, pattern, backend):
        target, gla_chunk.TARGET_PROGRAMS = gla_chunk.TARGET_PROGRAMS, 1
        try:
            return call(x, pattern, backend)
        finally:
            gla_chunk.TARGET_PROGRAMS = target
    return walks


def _segments(call):
    """``call`` with the causal walks cut into segments of at least 256 tokens, whatever the shape."""
    def segments(x, pattern, backend):
        saved = gla_chunk.SEGMENT_BELOW, gla_chunk.SEGMENT_MIN
        gla_chunk.SEGMENT_BELOW, gla_chunk.SEGMENT_MIN = 2**31, 256
        try:
            return call(x, pattern, backend)
        finally:
            gla_chunk.SEGMENT_BELOW, gla_chunk.SEGMENT_MIN = saved
    return segments


def _packed(make):
    """The family's inputs for B sequences of lengths near T, packed into a batch of one."""
    def packed(B, T, S, H, K, V, gen):
        lengths = [T + 26 * i - 13 * (B - 1) for i in range(B)]
        x = make(1, sum(lengths), sum(lengths), H, K, V, gen)
        x["initial_state"] = _randn(gen, B, H, K, V)
        x["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], device=DEVICE, dtype=torch.int32)
        return x
    return packed


def _narrow(make):
    """The family's inputs with a quarter of the value columns (``V = D / 4``, under the key dim)."""
    def narrow(B, T, S, H, K, V, gen):
        return make(B, T, S, H, K, max(16, V // 4), gen)
    return narrow


def _delta_inputs(gated: bool):
    def make(B, T, S, H, K, V, gen):
        g = F.logsigmoid(_randn(gen, B, S, H) + 3) if gated else None
        return dict(q=_randn(gen, B, T, H, K), k=F.normalize(_randn(gen, B, S, H, K), dim=-1), v=_randn(gen, B, S, H, V),
                    beta=torch.sigmoid(_randn(gen, B, S, H)), g=g, initial_state=_randn(gen, B, H, K, V))
    return make


def _delta_call(x, pattern, backend):
    return delta_rule(
        x["q"], x["k"], x["v"], x["beta"], g=x["g"], causal=pattern.causal, cross=pattern.cross,
        initial_state=x["initial_state"], output_final_state=True, backend=backend, cu_seqlens=x.get("cu_seqlens"),
    )


def _linear_inputs(B, T, S, H, K, V, gen):
    return dict(q=_randn(gen, B, T, H, K), k=_randn(gen, B, S, H, K), v=_randn(gen, B, S, H, V))


def _linear_call(x, pattern, backend):
    """``linear_attention`` (elu + 1 features, normalised): no state out."""
    return linear_attention(x["q"], x["k"], x["v"], causal=pattern.causal, backend=backend), None


DELTA_FAMILIES = [
    Family("delta, no gate", _delta_inputs(False), _delta_call),
    Family("delta, head gate", _delta_inputs(True), _delta_call),
    Family("delta, head, packed", _packed(_delta_inputs(True)), _delta_call, (Pattern.CAUSAL_SELF,), packed=True),
    Family("delta, narrow v", _narrow(_delta_inputs(True)), _delta_call, (Pattern.CAUSAL_SELF,)),
]


FAMILIES = [
    Family("gla, no gate", _gla_inputs("none"), _gla_call),
    Family("gla, head gate", _gla_inputs("head"), _gla_call),
    Family("gla, chan. gate", _gla_inputs("channel"), _gla_call),
    Family("gla, head, packed", _packed(_gla_inputs("head")), _gla_call, (Pattern.CAUSAL_SELF,), packed=True),
    Family("gla, chan., packed", _packed(_gla_inputs("channel")), _gla_call, (Pattern.CAUSAL_SELF,), packed=True),
    Family("gla, none, walks", _gla_inputs("none"), _walks(_gla_call)),
    Family("gla, head, walks", _gla_inputs("head"), _walks(_gla_call)),
    Family("gla, packed, walks", _packed(_gla_inputs("head")), _walks(_gla_call), (Pattern.CAUSAL_SELF,), packed=True),
    Family("gla, head, segments", _gla_inputs("head"), _segments(_gla_call)),
    Family("gla, packed, segments", _packed(_gla_inputs("head")), _segments(_gla_call), (Pattern.CAUSAL_SELF,), packed=True),
    Family("gla, none, segments", _gla_inputs("none"), _segments(_gla_call)),
    Family("gla, head, narrow v", _narrow(_gla_inputs("head")), _gla_call, (Pattern.CAUSAL_SELF,)),
    Family("gla, chan., narrow v", _narrow(_gla_inputs("channel")), _gla_call, (Pattern.CAUSAL_SELF,)),
    Family("linear, elu", _linear_inputs, _linear_call, (Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_SELF)),
] + DELTA_FAMILIES


def poison(nbytes: list[int]) -> None:
    """Leaves NaN-filled free blocks of these sizes (three of each) in the CUDA caching allocator."""
    blocks = [torch.full((n // 4 + 1,), float("nan"), device=DEVICE) for n in nbytes for _ in range(3)]
    del blocks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def run(family: Family, x: dict, pattern: Pattern, backend: str, cot: dict) -> dict[str, torch.Tensor]:
    """Outputs and gradients of ``<o, do> + <state, dstate>`` w.r.t. every input tensor."""
    leaves = {n: t.detach().requires_grad_() for n, t in x.items() if t is not None and t.is_floating_point()}
    o, s = family.call({**x, **leaves}, pattern, backend)
    loss = (o.double() * cot["o"]).sum() + (0 if s is None else (s.double() * cot["state"]).sum())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    states = {} if s is None else {"state": s.detach()}
    return {"o": o.detach()} | states | {f"d{n}": d for n, d in zip(leaves, grads)}


def check(family: Family, pattern: Pattern, B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int,
          repeats: int = 2) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    S = T + 37 if pattern is Pattern.NONCAUSAL_CROSS else T
    x64 = family.make(B, T, S, H, D, D, gen)
    x = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in x64.items()}
    x64 = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in x.items()}  # rounded, exactly
    cot = {"o": _randn(gen, *x["q"].shape[:3], x["v"].shape[-1])}
    if "initial_state" in x:
        cot["state"] = _randn(gen, *x["initial_state"].shape)
    want = run(family, x64, pattern, "chunked", cot)
    poison([t.numel() * t.element_size() for t in want.values()])
    got = run(family, x, pattern, "triton", cot)
    errs = {n: rel_err(got[n], want[n]) for n in want}
    errs["repeat"] = 0.0
    for _ in range(repeats - 1):
        poison([t.numel() * t.element_size() for t in want.values()])
        again = run(family, x, pattern, "triton", cot)
        errs["repeat"] = max(errs["repeat"], *(rel_err(again[n], got[n]) for n in got))
    return errs


def check_step(op: str, gate: str, B: int, H: int, D: int, dtype: torch.dtype, seed: int) -> dict[str, float]:
    """A fused step (triton, dtype inputs, float32 state) against one token of the float64 reference."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    g = {"none": None, "head": F.logsigmoid(_randn(gen, B, H) + 3), "channel": F.logsigmoid(_randn(gen, B, H, D) + 3)}[gate]
    q, k, v = _randn(gen, B, H, D), F.normalize(_randn(gen, B, H, D), dim=-1), _randn(gen, B, H, D)
    beta, S = torch.sigmoid(_randn(gen, B, H)), _randn(gen, B, H, D, D).float()
    low = [t.to(dtype) if t is not None else None for t in (q, k, v, g, beta)]
    up = [t.double() if t is not None else None for t in low]
    poison([B * H * D * D * 4, B * H * D * 4])
    if op == "gla_step":
        o, s = gla_step(*low[:4], S, backend="triton")
        o_ref, s_ref = gla_step(*up[:4], S.double(), backend="reference")
    else:
        o, s = delta_rule_step(*low[:3], low[4], S, g=low[3], backend="triton")
        o_ref, s_ref = delta_rule_step(*up[:3], up[4], S.double(), g=up[3], backend="reference")
    return {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quick", "long", "all"), default="all",
                        help="quick: the first shape in every pattern, and the steps; long: the longer shapes, causal")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--repeats", type=int, default=2, help="Triton runs per check, each to repeat the first bit for bit")
    parser.add_argument("--only", default="", help="only the families and steps whose name starts with this (prefixes separated by |), e.g. delta")
    args = parser.parse_args()
    dtypes = (torch.bfloat16, torch.float32)
    shapes = [(2, 1000, 16, 128), (3, 4097, 16, 64), (2, 8191, 16, 128)]
    first = {"quick": 0, "long": 1, "all": 0}[args.part]
    last = {"quick": 1, "long": 3, "all": 3}[args.part]
    if args.smoke:
        global DEVICE
        DEVICE, shapes, dtypes = "cpu", [(2, 37, 2, 16)], (torch.float16, torch.float32)  # the interpreter's bf16 dot is wrong
        first, last = 0, 1
        device = "cpu (interpreter)"
    else:
        device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    header = f"{'family':<18} {'pat':>3} {'dtype':>8} {'B':>2} {'T':>5} {'H':>3} {'D':>4}  {'worst':>9} {'of':<15} {'ok':>4}"
    print(header)
    failed, seed = 0, 0
    for family in [f for f in FAMILIES if f.name.startswith(tuple(args.only.split("|")))]:
        for shape_index, (B, T, H, D) in list(enumerate(shapes))[first:last]:
            patterns = family.patterns if shape_index == 0 else (Pattern.CAUSAL_SELF,)
            for pattern in patterns:
                for dtype in dtypes:
                    seed += 1
                    t0 = time.perf_counter()
                    errs = check(family, pattern, B, T, H, D, dtype, seed, args.repeats)
                    name = max(errs, key=errs.get)
                    ok = errs[name] <= TOL[dtype] and errs["repeat"] == 0
                    failed += not ok
                    print(f"{family.name:<18} {pattern.short:>3} {str(dtype)[6:]:>8} {B:>2} {T:>5} {H:>3} {D:>4}  "
                          f"{errs[name]:9.2e} {name:<15} {'ok' if ok else 'FAIL':>4}   "
                          + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + f"  ({time.perf_counter() - t0:.1f}s)",
                          flush=True)
    if first == 0:
        for op, gate in [("gla_step", "none"), ("gla_step", "head"), ("gla_step", "channel"), ("delta_step", "none"), ("delta_step", "head")]:
            if not op.startswith(tuple(args.only.split("|"))):
                continue
            for dtype in dtypes:
                seed += 1
                B, H, D = (2, 2, 16) if args.smoke else (64, 16, 128)
                errs = check_step(op, gate, B, H, D, dtype, seed)
                name = max(errs, key=errs.get)
                ok = errs[name] <= TOL[dtype]
                failed += not ok
                print(f"{op + ', ' + gate:<18} {'':>3} {str(dtype)[6:]:>8} {B:>2} {1:>5} {H:>3} {D:>4}  {errs[name]:9.2e} {name:<15} "
                      f"{'ok' if ok else 'FAIL':>4}   " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    print(f"{failed} of {seed} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
