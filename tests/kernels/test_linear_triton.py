"""``linear_attention(backend="triton")`` (the gated-linear-attention kernels with no gate, under the
interpreter) against the float64 reference: output and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch

CASES = {
    f"{'causal' if causal else 'noncausal'}-S{S}-{feature_map}-{'norm' if normalize else 'raw'}": (causal, S, feature_map, normalize)
    for causal, S in ((True, 37), (False, 37), (False, 21))
    for feature_map, normalize in (("elu", True), ("relu", False))
}


def _errors(causal: bool, S: int, feature_map: str, normalize: bool) -> dict[str, float]:
    from seqmix.ops import linear_attention

    gen = torch.Generator().manual_seed(S)
    B, T, H, K, V = 2, 37, 2, 16, 16
    x64 = [torch.randn(B, n, H, d, generator=gen, dtype=torch.float64) for n, d in ((T, K), (S, K), (S, V))]
    cot = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    kw = dict(causal=causal, feature_map=feature_map, normalize=normalize)
    got, want = {}, {}
    for backend, dtype, out in (("triton", torch.float32, got), ("reference", torch.float64, want)):
        leaves = [t.to(dtype).double().to(dtype).requires_grad_() for t in x64]
        o = linear_attention(*leaves, backend=backend, **kw)
        out.update(o=o, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad((o.double() * cot).sum(), leaves))))
    return {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in want}


@pytest.fixture(scope="module")
def results(interpreter_pool):
    return {name: interpreter_pool.apply_async(_errors, case) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results, name):
    errors = results[name].get(timeout=600)
    assert set(errors) == {"o", "dq", "dk", "dv"}
    assert max(errors.values()) < 1e-5, errors


def test_triton_is_refused_without_cuda_or_the_interpreter():
    from seqmix.ops import linear_attention

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="triton"):
        linear_attention(q, q, q, causal=True, backend="triton")
