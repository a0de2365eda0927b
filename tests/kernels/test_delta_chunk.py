"""Triton delta rule (run under the interpreter) = the float64 reference: outputs, final states and
every gradient (q, k, v, beta, g, initial state), with and without a gate, in every pattern, on odd
lengths, several column blocks and packed sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqmix.ops.delta import delta_rule

CASES = {}
for gate in ("none", "head"):
    for T in (1, 7, 33, 65):
        CASES[f"CS-{gate}-T{T}"] = dict(op="delta", pattern="CS", gate=gate, T=T, dtype="float32", seed=T)
    for pattern in ("NS", "NC", "CC"):
        CASES[f"{pattern}-{gate}-T33"] = dict(op="delta", pattern=pattern, gate=gate, T=33, dtype="float32", seed=3)
    CASES[f"varlen-{gate}"] = dict(op="delta", pattern="CS", gate=gate, T=0, cu=[0, 1, 9, 40, 45], dtype="float32")
CASES["CS-head-dims"] = dict(op="delta", pattern="CS", gate="head", T=40, K=32, V=24, chunk=32, dtype="float32")
CASES["CS-head-chunk64"] = dict(op="delta", pattern="CS", gate="head", T=70, chunk=64, dtype="float32")
CASES["CS-head-two-column-blocks"] = dict(op="delta", pattern="CS", gate="head", T=37, V=80, dtype="float32")
CASES["CS-head-fp16"] = dict(op="delta", pattern="CS", gate="head", T=65, dtype="float16")
CASES["NS-head-fp16"] = dict(op="delta", pattern="NS", gate="head", T=33, dtype="float16")
TOL = {"float32": 1e-5, "float16": 3e-3}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results, name):
    errors = results[name].get(timeout=600)
    assert set(errors) >= {"o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state"}
    assert ("dg" in errors) == (CASES[name]["gate"] == "head")
    assert max(errors.values()) < TOL[CASES[name]["dtype"]], errors


def _inputs(B: int, T: int, H: int = 2, D: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
                k=F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1),
                v=torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
                beta=torch.rand(B, T, H, generator=gen, dtype=torch.float64),
                g=-torch.rand(B, T, H, generator=gen, dtype=torch.float64))


def test_triton_needs_cuda_or_the_interpreter():
    x = _inputs(1, 8)
    with pytest.raises(ValueError, match="triton.*(CUDA|installed)"):
        delta_rule(*(x[n].float() for n in ("q", "k", "v", "beta")), causal=True, backend="triton")


def test_triton_refuses_other_chunk_sizes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _inputs(1, 8)
    with pytest.raises(ValueError, match="chunk_size 8"):
        delta_rule(*(x[n].float() for n in ("q", "k", "v", "beta")), causal=True, backend="triton", chunk_size=8)


def test_triton_refuses_large_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _inputs(1, 8)
    with pytest.raises(ValueError, match="chunk_size <= 64 and head dims <= 128"):
        delta_rule(*(x[n].float() for n in ("q", "k", "v", "beta")), causal=True, backend="triton", chunk_size=128)


def test_auto_on_cpu_is_the_chunked_form():
    x = _inputs(1, 8)
    o, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], causal=True, backend="auto")
    ref, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], causal=True, backend="chunked")
    assert torch.equal(o, ref)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_packed_equals_separate(backend):
    """cu_seqlens on the PyTorch forms: each sequence from its own state, as if run alone."""
    lengths = [3, 11, 6]
    x = _inputs(1, sum(lengths))
    h0 = torch.randn(len(lengths), 2, 8, 8, dtype=torch.float64)
    cu = torch.tensor([0, 3, 14, 20])
    o, final = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], causal=True, initial_state=h0,
                          output_final_state=True, cu_seqlens=cu, backend=backend, chunk_size=4)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = {name: t[:, bos:eos] for name, t in x.items()}
        o_n, final_n = delta_rule(piece["q"], piece["k"], piece["v"], piece["beta"], g=piece["g"], causal=True,
                                  initial_state=h0[n : n + 1], output_final_state=True, backend="reference")
        torch.testing.assert_close(o[:, bos:eos], o_n)
        torch.testing.assert_close(final[n : n + 1], final_n)


def test_packed_needs_causal():
    x = _inputs(1, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        delta_rule(x["q"], x["k"], x["v"], x["beta"], causal=False, cu_seqlens=torch.tensor([0, 3, 8]))
