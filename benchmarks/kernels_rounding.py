"""Which roundings of the chunked GLA backward the gate gradient feels, simulated in float64 on the CPU.

The per-head-gate backward of ``seqmix.kernels.gla_chunk`` (dq walking forward with the state,
dk walking backward with its gradient, ``dg`` as the suffix sum of ``q.dq - k.dk``) is replayed in
float64 with chosen intermediates rounded to a given number of mantissa bits: ``S`` (the state or
its gradient where a product reads it), ``dA`` (the intra-chunk score gradients), ``kd`` / ``qd``
(``k * exp(c_L - c)`` and ``q * exp(c)`` where they update the states). Prints the relative errors
of dq, dk and dg against the unrounded replay (bf16 keeps 7 stored bits, tf32 10, a hi/lo pair 16).

``--channel``: the chunk-parallel backward with a per-channel gate (``seqmix.kernels.gla_channel``),
where ``dg`` is summed inside each chunk and the rest of its suffix is ``<dS', S'>`` from the stored
states: the state reads (``S``), the state where ``<dS', S'>`` reads it (``Sb``) and the state passes'
update factors (``kd`` / ``qd``) rounded. ``--channel --head``: the same with one gate per head (a
walk made chunk-local: the forward's states stored in bf16 for dq and ``<dS', S'>``).

    python benchmarks/kernels_rounding.py [T] [--channel [--head]]
"""

from __future__ import annotations

import math
import sys

import torch

K = V = 128
C = 64


def rounded(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    if bits is None:
        return x
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)


def backward(q, k, v, g, do, dht, bits: dict[str, int]) -> tuple[torch.Tensor, ...]:
    B, T, _ = q.shape
    scale = K**-0.5
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    lower = torch.ones(C, C, dtype=torch.bool).tril()
    S = torch.zeros(B, K, V, dtype=q.dtype)
    for n in range(math.ceil(T / C)):
        t = slice(n * C, min(T, (n + 1) * C))
        L = t.stop - t.start
        c = g[:, t].cumsum(1)
        cl = c[:, -1:]
        dA = torch.einsum("biv,bjv->bij", do[:, t], v[:, t]) * torch.exp((c[:, :, None] - c[:, None, :]).masked_fill(~lower[:L, :L], -math.inf))
        dq[:, t] = scale * (torch.einsum("biv,bkv->bik", do[:, t], rounded(S, bits.get("S"))) * torch.exp(c)[..., None]
                            + torch.einsum("bij,bjk->bik", rounded(dA, bits.get("dA")), k[:, t]))
        kd = rounded(k[:, t] * torch.exp(cl - c)[..., None], bits.get("kd"))
        S = torch.exp(cl)[..., None] * S + torch.einsum("bik,biv->bkv", kd, v[:, t])
    ht, dS = S, dht.clone()
    for n in reversed(range(math.ceil(T / C))):
        t = slice(n * C, min(T, (n + 1) * C))
        L = t.stop - t.start
        c = g[:, t].cumsum(1)
        cl = c[:, -1:]
        dAt = torch.einsum("bjv,biv->bji", v[:, t], do[:, t]) * torch.exp((c[:, None, :] - c[:, :, None]).masked_fill(~lower[:L, :L].T, -math.inf))
        dk[:, t] = (torch.einsum("bjv,bkv->bjk", v[:, t], rounded(dS, bits.get("S"))) * torch.exp(cl - c)[..., None]
                    + scale * torch.einsum("bji,bik->bjk", rounded(dAt, bits.get("dA")), q[:, t]))
        qd = rounded(scale * q[:, t] * torch.exp(c)[..., None], bits.get("qd"))
        dS = torch.exp(cl)[..., None] * dS + torch.einsum("bik,biv->bkv", qd, do[:, t])
    dG = (q * dq).sum(-1) - (k * dk).sum(-1)
    dG[:, -1] += (dht * ht).sum((-2, -1))
    return dq, dk, dG.flip(1).cumsum(1).flip(1)


def channel_backward(q, k, v, g, do, bits: dict[str, int]) -> torch.Tensor:
    """dg of the chunk-parallel per-channel backward: the states before each chunk and the gradients
    of the states after it from the state passes, then per chunk ``<dS', S'>`` plus the suffix sum of
    ``q * dq - k * dk`` inside the chunk (as ``_dqk_kernel``)."""
    B, T, _ = q.shape
    scale, chunks = K**-0.5, [slice(n * C, min(T, (n + 1) * C)) for n in range(math.ceil(T / C))]
    S, dS, before, after = torch.zeros(B, K, V, dtype=q.dtype), torch.zeros(B, K, V, dtype=q.dtype), [], []
    for t in chunks:
        c = g[:, t].cumsum(1)
        before.append(S)
        kd = rounded(k[:, t] * torch.exp(c[:, -1:] - c), bits.get("kd"))
        S = torch.exp(c[:, -1])[..., None] * S + torch.einsum("bik,biv->bkv", kd, v[:, t])
    for t in reversed(chunks):
        c = g[:, t].cumsum(1)
        after.insert(0, dS)
        qd = rounded(scale * q[:, t] * torch.exp(c), bits.get("qd"))
        dS = torch.exp(c[:, -1])[..., None] * dS + torch.einsum("bik,biv->bkv", qd, do[:, t])
    dg = torch.zeros_like(g)
    for t, S, dS in zip(chunks, before, after):
        c, L = g[:, t].cumsum(1), t.stop - t.start
        dks = torch.einsum("bjv,bkv->bjk", v[:, t], rounded(dS, bits.get("S"))) * torch.exp(c[:, -1:] - c)
        dqs = torch.einsum("biv,bkv->bik", do[:, t], rounded(S, bits.get("S"))) * torch.exp(c)
        dA = torch.einsum("biv,bjv->bij", do[:, t], v[:, t]).tril()
        D = torch.exp((c[:, :, None] - c[:, None, :]).clamp(max=0))  # [b, i, j, k], read where j <= i
        dq = scale * (dqs + torch.einsum("bij,bjk,bijk->bik", dA, k[:, t], D))
        dk = dks + scale * torch.einsum("bij,bik,bijk->bjk", dA, q[:, t], D)
        carry = torch.exp(c[:, -1]) * (rounded(S, bits.get("Sb")) * dS).sum(-1) + (k[:, t] * dks).sum(1)
        dg[:, t] = carry[:, None] + (q[:, t] * dq - k[:, t] * dk).flip(1).cumsum(1).flip(1)
    return dg


def main() -> None:
    T = int(next((a for a in sys.argv[1:] if a.isdigit()), 1000))
    torch.manual_seed(0)
    B = 2
    bf16 = lambda x: rounded(x, 7)  # noqa: E731  (inputs are bf16 values)
    q, v = bf16(torch.randn(B, T, K, dtype=torch.float64)), bf16(torch.randn(B, T, V, dtype=torch.float64))
    k = bf16(torch.randn(B, T, K, dtype=torch.float64) / K**0.5)
    if "--channel" in sys.argv:
        head = "--head" in sys.argv
        g = bf16(torch.nn.functional.logsigmoid(torch.randn(B, T, 1 if head else K, dtype=torch.float64) + 3))
        g, do = g.expand(B, T, K).contiguous(), torch.randn(B, T, V, dtype=torch.float64)
        total = (lambda x: x.sum(-1)) if head else (lambda x: x)  # noqa: E731  (a per-head gate: summed)
        exact = total(channel_backward(q, k, v, g, do, {}))
        for bits in [dict(S=7), dict(kd=7, qd=7), dict(S=7, Sb=7, kd=7, qd=7), dict(S=16, Sb=16, kd=16, qd=16)]:
            got = total(channel_backward(q, k, v, g, do, bits))
            kind = "per head" if head else "per channel"
            print(f"T={T} {kind}, rounded bits {bits}: dg={((got - exact).norm() / exact.norm()).item():.1e}")
        return
    g = bf16(torch.nn.functional.logsigmoid(torch.randn(B, T, dtype=torch.float64) + 3))
    do, dht = torch.randn(B, T, V, dtype=torch.float64), torch.randn(B, K, V, dtype=torch.float64)
    exact = backward(q, k, v, g, do, dht, {})
    for bits in [dict(S=7), dict(dA=7), dict(kd=7, qd=7), dict(S=7, dA=7, kd=7, qd=7), dict(S=16, dA=7, kd=7, qd=7),
                 dict(S=7, dA=7, kd=16, qd=16), dict(S=16, dA=7, kd=16, qd=16), dict(S=10, dA=7, kd=10, qd=10)]:
        got = backward(q, k, v, g, do, dht, bits)
        errs = " ".join(f"{n}={((a - b).norm() / b.norm()).item():.1e}" for n, a, b in zip(("dq", "dk", "dg"), got, exact))
        print(f"T={T} rounded bits {bits}: {errs}", flush=True)


if __name__ == "__main__":
    main()
