"""Cases run under Triton's interpreter in a worker process (see ``conftest.py``).

A case is a plain dict; :func:`run_case` builds fresh random inputs from its seed, runs the op with
``backend="triton"`` at the case's dtype and the reference backend in float64 on the same values,
and returns the relative error of the output, the final state and the gradient of every input
under a random cotangent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.patterns import Pattern


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _inputs(case: dict, gen: torch.Generator) -> dict[str, torch.Tensor | None]:
    pattern = Pattern.parse(case["pattern"])
    B, T, H, K, V = case.get("B", 2), case["T"], 2, case.get("K", 16), case.get("V", 16)
    S = T + 5 if pattern is Pattern.NONCAUSAL_CROSS else T
    N = B
    if case.get("cu"):
        B, T, S, N = 1, case["cu"][-1], case["cu"][-1], len(case["cu"]) - 1
    x = {"q": _randn(gen, B, T, H, K), "k": _randn(gen, B, S, H, K), "v": _randn(gen, B, S, H, V)}
    gate = case["gate"]
    # log gates around -0.15 per step: the initial state still counts after ~100 steps
    x["g"] = {"none": None, "head": -F.softplus(_randn(gen, B, S, H) - 2),
              "channel": -F.softplus(_randn(gen, B, S, H, K) - 2)}[gate]
    if case["op"] == "delta":
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = _randn(gen, B, S, H).sigmoid()
    x["initial_state"] = _randn(gen, N, H, K, V)
    return x


def _call(case: dict, x: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    from seqmix.ops.delta import delta_rule
    from seqmix.ops.gla import gated_linear_attention

    pattern = Pattern.parse(case["pattern"])
    common = dict(causal=pattern.causal, cross=pattern.cross, initial_state=x["initial_state"], output_final_state=True,
                  backend=backend, chunk_size=case.get("chunk", 16))
    cu = torch.tensor(case["cu"]) if case.get("cu") else None
    if case["op"] == "gla":
        return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], cu_seqlens=cu, **common)
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], cu_seqlens=cu, **common)


def _outputs_and_grads(case: dict, x: dict, backend: str, cot: dict) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().requires_grad_() for n, t in x.items() if t is not None}
    o, s = _call(case, {**x, **leaves}, backend)
    loss = (o.double() * cot["o"]).sum() + (s.double() * cot["state"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final_state": s} | {f"d{n}": d for n, d in zip(leaves, grads)}


def run_case(case: dict) -> dict[str, float]:
    """Relative errors of the triton backend against the float64 reference, per output and gradient
    (per output for the single-token steps)."""
    from seqmix.kernels import delta_chunk, gla_chunk

    if case["op"].endswith("step"):
        return _run_step(case)
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    x64 = _inputs(case, gen)
    dtype = getattr(torch, case["dtype"])
    x = {n: (t.to(dtype) if t is not None else None) for n, t in x64.items()}
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    cot = {"o": _randn(gen, *x["q"].shape[:3], x["v"].shape[-1]), "state": _randn(gen, *x["initial_state"].shape)}
    want = _outputs_and_grads(case, x64, "reference", cot)
    modules = {"gla_constants": gla_chunk, "delta_constants": delta_chunk}  # launch shapes
    saved = [(m, name, getattr(m, name)) for key, m in modules.items() for name in case.get(key, {})]
    for key, m in modules.items():
        for name, value in case.get(key, {}).items():
            setattr(m, name, value)
    try:
        got = _outputs_and_grads(case, x, "triton", cot)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
    dtypes = {"o": dtype, "final_state": torch.float32} | {f"d{n}": t.dtype for n, t in x.items() if t is not None}
    errors = {}
    for name, ref in want.items():
        a = got[name]
        bad = a.dtype != dtypes[name] or not torch.isfinite(a).all()
        errors[name] = float("inf") if bad else ((a.double() - ref).norm() / ref.norm()).item()
    return errors


def _run_step(case: dict) -> dict[str, float]:
    """``gla_step`` / ``delta_rule_step`` (triton, case dtype) against the float64 reference of one
    token of the chunk ops; the state is float32 as in decoding."""
    from seqmix.ops.delta import delta_rule, delta_rule_step
    from seqmix.ops.gla import gated_linear_attention, gla_step

    gen = torch.Generator().manual_seed(case.get("seed", 0))
    x = _inputs({**case, "pattern": "CS", "T": 1, "op": "delta" if case["op"] == "delta_step" else "gla"}, gen)
    dtype = getattr(torch, case["dtype"])
    x = {n: (t.to(dtype) if t is not None and n != "initial_state" else t) for n, t in x.items()}
    x["initial_state"] = x["initial_state"].float()
    one = {n: (t[:, 0] if t is not None and n != "initial_state" else t) for n, t in x.items()}
    up = {n: (t.double() if t is not None else None) for n, t in x.items()}
    if case["op"] == "gla_step":
        o, s = gla_step(one["q"], one["k"], one["v"], one["g"], one["initial_state"], backend="triton")
        o_ref, s_ref = gated_linear_attention(up["q"], up["k"], up["v"], up["g"], causal=True, initial_state=up["initial_state"],
                                              output_final_state=True, backend="reference")
    else:
        o, s = delta_rule_step(one["q"], one["k"], one["v"], one["beta"], one["initial_state"], g=one["g"], backend="triton")
        o_ref, s_ref = delta_rule(up["q"], up["k"], up["v"], up["beta"], g=up["g"], causal=True,
                                  initial_state=up["initial_state"], output_final_state=True, backend="reference")
    errors = {}
    for name, a, ref, want in (("o", o, o_ref[:, 0], dtype), ("state", s, s_ref, torch.float32)):
        bad = a.dtype != want or not torch.isfinite(a).all()
        errors[name] = float("inf") if bad else ((a.double() - ref).norm() / ref.norm()).item()
    return errors
