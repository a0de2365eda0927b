"""Sequence parallelism on several GPUs: a bf16 check of each scheme, then weak and strong scaling.

One machine, one call (issue 7)::

    torchrun --nproc_per_node 4 benchmarks/sequence_parallel_gpu.py --out benchmarks/results/sequence_parallel.json

Dry run on the CPU with gloo at tiny sizes (one process or more)::

    torchrun --nproc_per_node 1 benchmarks/sequence_parallel_gpu.py --dry-run

1. Check: for softmax attention (ring, Ulysses) and gated linear attention (LASP-2, Ulysses), causal
   and noncausal, the output and the gradients of ``q, k, v`` (and ``g``) on every rank against a
   single-GPU run of the same op on the whole sequence, all in ``--dtype``; relative error <= 1e-2.
2. Scaling: forward + backward of the mixing op of one layer (``B=1``, ``H`` heads of ``D``, causal;
   projections are local and not timed) on ``P = 1, 2, 4, ...`` GPUs (sub-groups of the world):
   weak scaling with ``--tokens-per-gpu`` tokens per GPU, strong scaling with ``--strong-tokens`` in
   all. ``single`` rows are the plain op on one GPU. Times are the median over ``--reps`` steps of the
   slowest rank. Efficiency = ideal time / measured time, the ideal being the single-GPU time scaled
   by the per-GPU work (softmax: ``T^2 / P``; gated linear attention: ``T / P``).

NVLink multicast stays off (the device README): the variables below are set before NCCL starts.
"""

from __future__ import annotations

import os

for _var, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_var] = _value

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seqmix.distributed import lasp2_gated_linear_attention, ring_attention, shard_sequence, ulysses  # noqa: E402
from seqmix.ops.gla import gated_linear_attention  # noqa: E402
from seqmix.ops.softmax import softmax_attention  # noqa: E402

# (op, scheme) -> (layout, fn(q, k, v, g, causal, group) -> o); "single" runs the plain op on one GPU
Run = Callable[..., torch.Tensor]


def _softmax(causal: bool) -> Callable[..., torch.Tensor]:
    return lambda q, k, v: softmax_attention(q, k, v, causal=causal, backend="sdpa")


def _gla(causal: bool) -> Callable[..., torch.Tensor]:
    return lambda q, k, v, g: gated_linear_attention(q, k, v, g, causal=causal)[0]


SCHEMES: dict[tuple[str, str], tuple[str, Run]] = {
    ("softmax", "single"): ("contiguous", lambda q, k, v, g, causal, group: _softmax(causal)(q, k, v)),
    ("softmax", "ring"): ("zigzag", lambda q, k, v, g, causal, group: ring_attention(q, k, v, causal=causal, group=group)),
    ("softmax", "ulysses"): ("contiguous", lambda q, k, v, g, causal, group: ulysses(_softmax(causal), q, k, v, group=group)),
    ("gla", "single"): ("contiguous", lambda q, k, v, g, causal, group: _gla(causal)(q, k, v, g)),
    ("gla", "lasp2"): ("contiguous", lambda q, k, v, g, causal, group: lasp2_gated_linear_attention(q, k, v, g, causal=causal, group=group)),
    ("gla", "ulysses"): ("contiguous", lambda q, k, v, g, causal, group: ulysses(_gla(causal), q, k, v, g, group=group)),
}


def inputs(op: str, T: int, args, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``q, k, v [1, T, H, D]`` and, for gated linear attention, a log gate ``g [1, T, H]`` (per head)."""
    q, k, v = (torch.randn(1, T, args.heads, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    if op == "softmax":
        return [q, k, v]
    k = k / args.head_dim**0.5
    g = F.logsigmoid(torch.randn(1, T, args.heads, device=device, dtype=torch.float32)).to(dtype) / 16
    return [q, k, v, g]


def run(op: str, scheme: str, xs: list[torch.Tensor], causal: bool, group) -> torch.Tensor:
    q, k, v, g = (xs + [None])[:4]
    return SCHEMES[op, scheme][1](q, k, v, g, causal, group)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(args, device, dtype, world: int) -> list[dict]:
    """Every scheme at the world size against the single-GPU op on the whole sequence (each rank
    computes the reference on its own GPU and compares its shard)."""
    rows = []
    for (op, scheme), (layout, _) in SCHEMES.items():
        if scheme == "single" or op not in args.ops.split(","):
            continue
        for causal in (True, False):
            torch.manual_seed(0)
            full = [x.requires_grad_() for x in inputs(op, args.check_tokens, args, device, dtype)]
            o = run(op, "single", full, causal, None)
            w = torch.randn_like(o)
            o.backward(w)
            local = [shard_sequence(x.detach(), layout=layout).requires_grad_() for x in full]
            o_local = run(op, scheme, local, causal, None)
            o_local.backward(shard_sequence(w, layout=layout))
            errors = {"o": rel_err(o_local, shard_sequence(o.detach(), layout=layout))}
            for name, x, xl in zip("qkvg", full, local):
                errors[f"d{name}"] = rel_err(xl.grad, shard_sequence(x.grad, layout=layout))
            worst = torch.tensor(max(errors.values()), device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            row = {"kind": "check", "op": op, "scheme": scheme, "causal": causal, "P": world, "tokens": args.check_tokens}
            row |= {"max_rel_err": worst.item(), "rank0_rel_err": errors, "pass": worst.item() <= 1e-2}
            rows.append(row)
            report(row)
    return rows


def time_step(op: str, scheme: str, tokens_local: int, args, device, dtype, group) -> float:
    """Median seconds of forward + backward over ``args.reps`` steps, the slowest rank's."""
    xs = [x.requires_grad_() for x in inputs(op, tokens_local, args, device, dtype)]
    w = torch.randn_like(xs[2])
    times = []
    for i in range(args.warmup + args.reps):
        for x in xs:
            x.grad = None
        if group is not None:
            dist.barrier(group=group)
        sync(device)
        start = time.perf_counter()
        run(op, scheme, xs, True, group).backward(w)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    t = torch.tensor(statistics.median(times), device=device)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def timed_or_oom(op: str, scheme: str, tokens_local: int, args, device, dtype, group) -> float:
    """:func:`time_step`, or NaN where the GPU runs out of memory (reported, not fatal: a
    single-GPU baseline at the strong-scaling length may not fit)."""
    try:
        return time_step(op, scheme, tokens_local, args, device, dtype, group)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"rank {dist.get_rank()}: out of memory: {op} {scheme} with {tokens_local} tokens per GPU", flush=True)
        return float("nan")


def scaling(args, device, dtype, rank: int, world: int) -> list[dict]:
    sizes = [p for p in (1, 2, 4, 8, 16, 32) if p <= world]
    groups = {p: dist.new_group(list(range(p))) for p in sizes}  # every rank takes part in creating each
    rows = []
    for kind, total in (("weak", None), ("strong", args.strong_tokens)):
        base = {}
        for op in args.ops.split(","):
            if rank == 0:  # the plain op on one GPU, the others idle
                T = args.tokens_per_gpu if kind == "weak" else total
                base[op] = timed_or_oom(op, "single", T, args, device, dtype, None)
                rows.append({"kind": kind, "op": op, "scheme": "single", "P": 1, "tokens": T, "tokens_per_gpu": T, "ms": 1e3 * base[op]})
                report(rows[-1])
            dist.barrier()
            for p in sizes:
                for scheme in [s for o, s in SCHEMES if o == op and s != "single"]:
                    T = args.tokens_per_gpu * p if kind == "weak" else total
                    if rank < p:
                        seconds = timed_or_oom(op, scheme, T // p, args, device, dtype, groups[p])
                        if rank == 0:
                            ideal = base[op] / p if kind == "strong" else base[op] * (p if op == "softmax" else 1)
                            row = {"kind": kind, "op": op, "scheme": scheme, "P": p, "tokens": T, "tokens_per_gpu": T // p}
                            row |= {"ms": 1e3 * seconds, "efficiency": ideal / seconds}
                            rows.append(row)
                            report(row)
                    dist.barrier()
    return rows


def report(row: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(args, world: int, device: torch.device) -> dict:
    rev = args.revision  # named where the tree runs outside its checkout (a copied tree may carry a stale .git)
    if rev is None:
        try:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            rev = "unknown"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": rev,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": world,
        "backend": dist.get_backend(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "multicast_env": {v: os.environ.get(v) for v in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
    }
    if device.type == "cuda":
        env |= {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    else:
        env |= {"device": platform.processor() or "cpu"}
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-gpu", type=int, default=65536, help="weak scaling: tokens per GPU")
    parser.add_argument("--strong-tokens", type=int, default=262144, help="strong scaling: tokens in all")
    parser.add_argument("--check-tokens", type=int, default=16384, help="tokens of the correctness check")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ops", default="softmax,gla", help="ops to measure, comma-separated (softmax, gla)")
    parser.add_argument("--skip-scaling", action="store_true", help="run the check only")
    parser.add_argument("--revision", default=None, help="git revision to record where the script runs outside a checkout")
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo at tiny sizes, to see that everything runs")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON (rank 0)")
    args = parser.parse_args()
    if args.dry_run:
        args.tokens_per_gpu, args.strong_tokens, args.check_tokens = 256, 1024, 512
        args.heads, args.head_dim, args.reps, args.warmup = 4, 16, 2, 1

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for name, n, parts in (("--tokens-per-gpu", args.tokens_per_gpu, 1), ("--strong-tokens", args.strong_tokens, world), ("--check-tokens", args.check_tokens, world)):
        if n % (2 * parts):
            raise SystemExit(f"{name} {n} must divide by {2 * parts} (two zigzag chunks per GPU)")
    if args.heads % world:
        raise SystemExit(f"Ulysses needs --heads {args.heads} to divide by the world size {world}")

    results = {"environment": environment(args, world, device), "rows": []}
    report(results["environment"])
    results["rows"] += check(args, device, dtype, world)
    if not args.skip_scaling:
        results["rows"] += scaling(args, device, dtype, rank, world)
    if rank == 0 and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    ok = all(r["pass"] for r in results["rows"] if r["kind"] == "check")
    if rank == 0:
        print("check:", "all schemes within 1e-2 of the single-GPU op" if ok else "FAILED (see max_rel_err above)", flush=True)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
