"""``linear_attention(backend="triton")`` under the interpreter against the float64 reference: output
and the gradients of q, k and v. Causal: the gated-linear-attention kernels with no gate; noncausal
with ``elu``, ``relu`` or ``identity``: the fused kernels of ``seqmix.kernels.linear_noncausal``
(odd lengths, ``S != T``, several time splits of several steps, with and without the normaliser, fp16).
The same kernels as ``seqmix.kernels.shared_state`` (``read_state(q, state_sum(k, v, S0), scale)``):
fused, and past ``MAX_DIM`` (shrunk to 16) in blocks of state rows and columns."""

from __future__ import annotations

import pytest
import torch

CASES = {
    f"{'causal' if causal else 'noncausal'}-S{S}-{feature_map}-{'norm' if normalize else 'raw'}": (causal, S, feature_map, normalize, "fp32")
    for causal, S in ((True, 37), (False, 37), (False, 21))
    for feature_map, normalize in (("elu", True), ("relu", False))
} | {
    "noncausal-S37-identity-raw": (False, 37, "identity", False, "fp32"),
    "noncausal-S21-relu-norm": (False, 21, "relu", True, "fp32"),
    "noncausal-S150-elu-norm-splits": (False, 150, "elu", True, "fp32"),  # T 70 <-> S 150: 2 and 4 splits of 48
    "noncausal-S150-identity-raw-splits": (False, 150, "identity", False, "fp32"),
    "noncausal-S45-elu-norm-fp16": (False, 45, "elu", True, "fp16"),
}
TOLERANCE = {"fp32": 1e-5, "fp16": 3e-3}  # fp16: features, states and g rounded to fp16 for the products (the interpreter gets bf16 products wrong)


def _errors(causal: bool, S: int, feature_map: str, normalize: bool, dtype: str) -> dict[str, float]:
    from seqmix.kernels import linear_noncausal
    from seqmix.ops import linear_attention

    # splits of at least 32 tokens in steps of 16: S = 150 gives 4 splits of 48 tokens (3 steps, the last short)
    linear_noncausal.MIN_SPLIT = 32
    linear_noncausal.CONFIG = {name: (16, warps, stages) for name, (_, warps, stages) in linear_noncausal.CONFIG.items()}
    fused_calls = []
    apply = linear_noncausal.LinearNoncausalFunction.apply
    linear_noncausal.LinearNoncausalFunction.apply = lambda *a: fused_calls.append(1) or apply(*a)
    gen = torch.Generator().manual_seed(S)
    B, T, H, K, V = 2, 37, 2, 16, 16
    if S == 150:
        T, V = 70, 24  # 3 splits of the backward sum; V not a power of two: masked columns
    x64 = [torch.randn(B, n, H, d, generator=gen, dtype=torch.float64) for n, d in ((T, K), (S, K), (S, V))]
    cot = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    kw = dict(causal=causal, feature_map=feature_map, normalize=normalize)
    low = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    got, want = {}, {}
    for backend, dt, out in (("triton", low, got), ("reference", torch.float64, want)):
        leaves = [t.to(low).double().to(dt).requires_grad_() for t in x64]
        o = linear_attention(*leaves, backend=backend, **kw)
        out.update(o=o, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad((o.double() * cot).sum(), leaves))))
    assert len(fused_calls) == (not causal), "the noncausal cases take the fused kernels, the causal ones do not"
    return {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in want}


def _shared_state_errors(max_dim: int) -> dict[str, float]:
    from seqmix.kernels import linear_noncausal
    from seqmix.kernels.shared_state import read_state, state_sum

    linear_noncausal.MAX_DIM, linear_noncausal.MIN_SPLIT = max_dim, 32
    linear_noncausal.CONFIG = {name: (16, warps, stages) for name, (_, warps, stages) in linear_noncausal.CONFIG.items()}
    gen = torch.Generator().manual_seed(max_dim)
    B, T, S, H, K, V = 2, 37, 70, 2, 24, 40  # max_dim 16: 2 x 3 blocks of the state, reads and sums in the backward
    x64 = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
           ((B, T, H, K), (B, S, H, K), (B, S, H, V), (B, H, K, V))]
    cot = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    got, want = {}, {}
    for dt, out in ((torch.float32, got), (torch.float64, want)):
        q, k, v, s0 = leaves = [t.float().to(dt).requires_grad_() for t in x64]
        if dt == torch.float64:
            o = 0.7 * torch.einsum("bthk,bhkv->bthv", q, s0 + torch.einsum("bshk,bshv->bhkv", k, v))
        else:
            o = read_state(q, state_sum(k, v, s0), 0.7)
        out.update(o=o, **dict(zip(("dq", "dk", "dv", "ds0"), torch.autograd.grad((o.double() * cot).sum(), leaves))))
    return {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in want}


SHARED_STATE_CASES = {"shared-state-fused": 128, "shared-state-blocks": 16}


@pytest.fixture(scope="module")
def results(interpreter_pool):
    return {name: interpreter_pool.apply_async(_errors, case) for name, case in CASES.items()} | {
        name: interpreter_pool.apply_async(_shared_state_errors, (max_dim,)) for name, max_dim in SHARED_STATE_CASES.items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results, name):
    errors = results[name].get(timeout=600)
    assert set(errors) == {"o", "dq", "dk", "dv"}
    assert max(errors.values()) < TOLERANCE[CASES[name][4]], errors


@pytest.mark.parametrize("name", list(SHARED_STATE_CASES))
def test_shared_state_matches_reference(results, name):
    errors = results[name].get(timeout=600)
    assert max(errors.values()) < TOLERANCE["fp32"], errors


def test_triton_is_refused_without_cuda_or_the_interpreter():
    from seqmix.ops import linear_attention

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="triton"):
        linear_attention(q, q, q, causal=True, backend="triton")
    with pytest.raises(ValueError, match="triton"):
        linear_attention(q, q, q, causal=False, backend="triton")
