"""Triton delta rule (run under the interpreter) = the float64 reference: outputs, final states and
every gradient (q, k, v, beta, g, initial state), with and without a gate, in every pattern, on odd
lengths, several column blocks, packed sequences, few walks (float16 cases: the intermediates stored in
float16); and backward passes that need only the outputs' or only the final state's gradients, or
repeat (the keys' gradient has a share from the reads and one from the solve)."""

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
# more than 64 key columns: two key blocks of dW, dE and the shares of dgamma summed in the solve's backward
CASES["CS-head-two-key-blocks"] = dict(op="delta", pattern="CS", gate="head", T=20, K=80, V=16, dtype="float32")
CASES["CS-head-fp16"] = dict(op="delta", pattern="CS", gate="head", T=65, dtype="float16")
CASES["NS-head-fp16"] = dict(op="delta", pattern="NS", gate="head", T=33, dtype="float16")
# float16 intermediates (W, E, states, U, leaving states' gradients) over several column blocks, packed, and without reads
CASES["CS-head-fp16-two-column-blocks"] = dict(op="delta", pattern="CS", gate="head", T=37, V=80, dtype="float16")
CASES["varlen-head-fp16"] = dict(op="delta", pattern="CS", gate="head", T=0, cu=[0, 1, 9, 40, 45], dtype="float16")
CASES["NC-head-fp16"] = dict(op="delta", pattern="NC", gate="head", T=33, dtype="float16", seed=3)
# walks too few for the SMs (long sequences on a GPU): narrower walks, dU^out formed before the reverse walk
FEW = dict(FEW_WALKS_BELOW=2**31)
CASES["CS-head-few-walks"] = dict(op="delta", pattern="CS", gate="head", T=37, V=80, dtype="float32", delta_constants=FEW)
CASES["varlen-head-few-walks-fp16"] = dict(op="delta", pattern="CS", gate="head", T=0, cu=[0, 1, 9, 40, 45],
                                           dtype="float16", delta_constants=FEW)
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


def _partial_backward_passes() -> dict[str, float]:
    """Worker side of :func:`test_partial_backward_passes`: the reads' share of dk (handed from the
    reads' backward to the solve's) under backward passes that skip one of them or repeat."""
    from tests.kernels.cases import _inputs as case_inputs

    case = dict(op="delta", pattern="CS", gate="head", T=40)
    x = case_inputs(case, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    cot_o, cot_s = torch.randn(2, 40, 2, 16, generator=gen, dtype=torch.float64), torch.randn(2, 2, 16, 16, generator=gen, dtype=torch.float64)

    def run(backend: str, dtype: torch.dtype) -> tuple[dict, torch.Tensor, torch.Tensor]:
        leaves = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
        o, s = delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves["g"], causal=True,
                          initial_state=leaves["initial_state"], output_final_state=True, backend=backend, chunk_size=16)
        return leaves, (o.double() * cot_o).sum(), (s.double() * cot_s).sum()

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a.double() - ref).norm() / ref.norm()).item()

    ref, ref_o, ref_s = run("reference", torch.float64)
    want_s = torch.autograd.grad(ref_s, [ref["k"], ref["v"]], retain_graph=True)
    want_all = torch.autograd.grad(ref_o + ref_s, [ref["k"]])[0]
    got, loss_o, loss_s = run("triton", torch.float32)
    errors = {}
    torch.autograd.grad(loss_o, [got["q"]], retain_graph=True)  # the reads' backward alone: leaves a share
    dk, dv = torch.autograd.grad(loss_s, [got["k"], got["v"]], retain_graph=True)  # the solve's alone: must not take it
    errors["state_only_dk"], errors["state_only_dv"] = rel(dk, want_s[0]), rel(dv, want_s[1])
    first = torch.autograd.grad(loss_o + loss_s, [got["k"]], retain_graph=True)[0]
    second = torch.autograd.grad(loss_o + loss_s, [got["k"]])[0]
    errors["dk"], errors["dk_again"] = rel(first, want_all), rel(second, want_all)
    return errors


def test_partial_backward_passes(interpreter_pool):
    errors = interpreter_pool.apply_async(_partial_backward_passes).get(timeout=600)
    assert set(errors) == {"state_only_dk", "state_only_dv", "dk", "dk_again"}
    assert max(errors.values()) < TOL["float32"], errors
