"""Triton GLA kernels (run under the interpreter) = the float64 reference: outputs, final states
and every gradient, per-head, per-channel and no gate, in every pattern, chunk-parallel (the default
at these sizes: sequences x heads < TARGET_PROGRAMS) and as walks (``WALK``: ``TARGET_PROGRAMS = 1``, gate per
head or none), as walks per segment (gate per head or none, causal), packed; per-channel gates in chunks of 16 (one sub-chunk), 32 and 64 (sub-chunks of 16)."""

from __future__ import annotations

import pytest
import torch

from seqmix.ops.gla import gated_linear_attention

CASES = {}
for gate in ("none", "head", "channel"):
    for T in (1, 7, 33) + ((65,) if gate != "channel" else ()):
        CASES[f"CS-{gate}-T{T}"] = dict(op="gla", pattern="CS", gate=gate, T=T, dtype="float32", seed=T)
    for pattern in ("NS", "NC", "CC"):
        T = 20 if gate == "channel" else 33  # per-channel scores take one key row at a time: slow here
        CASES[f"{pattern}-{gate}-T{T}"] = dict(op="gla", pattern=pattern, gate=gate, T=T, dtype="float32", seed=3)
    if gate != "channel":
        CASES[f"varlen-{gate}"] = dict(op="gla", pattern="CS", gate=gate, T=0, cu=[0, 1, 9, 80, 90], dtype="float32")
WALK = dict(TARGET_PROGRAMS=1)  # the walks at any size
for gate in ("none", "head"):  # one program per sequence and head walks the chunks
    CASES[f"CS-{gate}-walk"] = dict(op="gla", pattern="CS", gate=gate, T=80, dtype="float32", gla_constants=WALK)
    CASES[f"varlen-{gate}-walk"] = dict(op="gla", pattern="CS", gate=gate, T=0, cu=[0, 1, 9, 80, 90], dtype="float32",
                                        gla_constants=WALK)
CASES["NS-head-walk"] = dict(op="gla", pattern="NS", gate="head", T=150, dtype="float32", gla_constants=WALK)
# the backward walks' roles in launches of their own (dk's gate-gradient slots after dq's): the apart
# groups with two blocks of state rows (K = 80); two groups, per-head gate, noncausal cross; two groups
# in place of the one launch, no gate
APART = dict(BWD_APART=(0, 2**31))
CASES["CS-head-walk-apart"] = dict(op="gla", pattern="CS", gate="head", T=80, K=80, dtype="float32",
                                   gla_constants=dict(WALK, **APART))
CASES["NC-head-walk-apart-two"] = dict(op="gla", pattern="NC", gate="head", T=40, dtype="float32",
                                       gla_constants=dict(WALK, **APART, BWD_GROUPS_APART=(("dq", "dk"), ("dv",))))
CASES["CS-none-walk-fused-two"] = dict(op="gla", pattern="CS", gate="none", T=40, dtype="float32",
                                       gla_constants=dict(WALK, BWD_GROUPS_FUSED=(("dq",), ("dk", "dv"))))
# walks with 64 state columns (V = 40) over several chunks
CASES["CS-head-walk-wide"] = dict(op="gla", pattern="CS", gate="head", T=80, V=40, chunk=32, dtype="float32",
                                  gla_constants=WALK)
CASES["CS-head-dims"] = dict(op="gla", pattern="CS", gate="head", T=40, K=32, V=24, chunk=32, dtype="float32")
# chunks of 64, two blocks of state rows and columns in every chunk-parallel kernel (tiles of 64)
CASES["NS-head-blocks"] = dict(op="gla", pattern="NS", gate="head", T=150, K=80, V=72, chunk=64, dtype="float32")
CASES["CS-none-blocks"] = dict(op="gla", pattern="CS", gate="none", T=150, K=72, V=80, chunk=64, dtype="float32",
                               gla_constants=dict(STATE_MIN_PROGRAMS=0))  # state passes in tiles of 64, not 32
# per-channel sub-chunks: 4 in a chunk of 64; 2 in a chunk of 32, anticausal too; two blocks of rows and columns
CASES["CS-channel-chunk64"] = dict(op="gla", pattern="CS", gate="channel", B=1, T=70, chunk=64, dtype="float32", seed=5)
CASES["NS-channel-chunk32"] = dict(op="gla", pattern="NS", gate="channel", T=40, chunk=32, dtype="float32", seed=6,
                                   gla_constants=dict(SAVE_STATES=False))  # states recomputed in the backward
CASES["varlen-channel"] = dict(op="gla", pattern="CS", gate="channel", T=0, cu=[0, 1, 9, 45, 50], chunk=32, dtype="float32")
CASES["CS-channel-blocks"] = dict(op="gla", pattern="CS", gate="channel", B=1, T=30, K=80, V=72, chunk=32, dtype="float32")
CASES["CS-channel-dims"] = dict(op="gla", pattern="CS", gate="channel", T=24, K=24, V=16, dtype="float32")
# no gate, noncausal: the state is a sum over two splits of time (the last one partial), two blocks of columns
CASES["NS-none-splits"] = dict(op="gla", pattern="NS", gate="none", B=1, T=1100, V=80, dtype="float32", seed=7)
# causal walks per segment (SEGMENT_MIN shrunk so that these lengths are cut): segments of one
# chunk and a last one of a token (packed), equal ones of one and two chunks (a batch of segments);
# packed sequences (a 1-token one: one segment); chunks of 64 with two blocks of state rows and
# columns; the causal pass of the noncausal self pattern; cross; fp16
SEG = dict(SEGMENT_BELOW=2**31, SEGMENT_MIN=16)
CASES["CS-head-seg"] = dict(op="gla", pattern="CS", gate="head", T=65, dtype="float32", seed=7, gla_constants=SEG)
CASES["CS-head-seg-even"] = dict(op="gla", pattern="CS", gate="head", T=64, dtype="float32", seed=13, gla_constants=SEG)
CASES["CS-none-seg"] = dict(op="gla", pattern="CS", gate="none", T=96, dtype="float32", seed=8,
                            gla_constants=dict(SEG, SEGMENT_MIN=32))
CASES["varlen-head-seg"] = dict(op="gla", pattern="CS", gate="head", T=0, cu=[0, 1, 9, 80, 90], dtype="float32",
                                gla_constants=SEG)
CASES["CS-head-seg-blocks"] = dict(op="gla", pattern="CS", gate="head", B=1, T=150, K=80, V=72, chunk=64,
                                   dtype="float32", seed=9, gla_constants=SEG)
CASES["NS-head-seg"] = dict(op="gla", pattern="NS", gate="head", T=33, dtype="float32", seed=10, gla_constants=SEG)
CASES["CC-head-seg"] = dict(op="gla", pattern="CC", gate="head", T=33, dtype="float32", seed=11, gla_constants=SEG)
CASES["CS-head-seg-fp16"] = dict(op="gla", pattern="CS", gate="head", T=65, dtype="float16", seed=12, gla_constants=SEG)
CASES["CS-head-fp16"] = dict(op="gla", pattern="CS", gate="head", T=65, dtype="float16")
# no gate in fp16: the state products in one fp16 product each (no gate gradient to keep 16 bits for),
# chunk-parallel, as walks and per segment
CASES["CS-none-fp16"] = dict(op="gla", pattern="CS", gate="none", T=65, dtype="float16", seed=16)
CASES["CS-none-walk-fp16"] = dict(op="gla", pattern="CS", gate="none", T=80, dtype="float16", seed=17, gla_constants=WALK)
CASES["CS-none-seg-fp16"] = dict(op="gla", pattern="CS", gate="none", T=96, dtype="float16", seed=18,
                                 gla_constants=dict(SEG, SEGMENT_MIN=32))
CASES["CS-channel-fp16"] = dict(op="gla", pattern="CS", gate="channel", B=1, T=40, chunk=32, dtype="float16")
TOL = {"float32": 1e-5, "float16": 3e-3}
# per-channel gates decaying strongly (log gates x 30 in the first `strong` tokens: sub-chunk spans
# past SPAN_MAX): the exact diagonal blocks in those chunks, the tensor-core ones after them
STRONG = {
    "CS-channel-strong-chunk64": dict(op="gla", pattern="CS", gate="channel", B=1, T=100, chunk=64, dtype="float32",
                                      seed=14, strong=64),
    "NS-channel-strong-chunk32": dict(op="gla", pattern="NS", gate="channel", T=40, chunk=32, dtype="float32",
                                      seed=15, strong=40),
    "varlen-channel-strong": dict(op="gla", pattern="CS", gate="channel", T=0, cu=[0, 1, 9, 45, 70], chunk=32,
                                  dtype="float32", strong=30),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results, name):
    errors = results[name].get(timeout=600)
    assert set(errors) >= {"o", "final_state", "dq", "dk", "dv", "dinitial_state"}
    tol = TOL[CASES[name]["dtype"]]
    assert max(errors.values()) < tol, errors


def run_strong_gate(case: dict) -> dict[str, float]:
    """:func:`tests.kernels.cases.run_case` with the log gates of the first ``case["strong"]`` tokens x 30."""
    from tests.kernels import cases

    inputs = cases._inputs

    def strong(case, gen):
        x = inputs(case, gen)
        x["g"][:, : case["strong"]] *= 30
        return x

    cases._inputs = strong
    try:
        return cases.run_case(case)
    finally:
        cases._inputs = inputs


@pytest.mark.parametrize("name", list(STRONG))
def test_strong_channel_gate(interpreter_pool, name):
    from seqmix.kernels import gla_channel

    assert 16 * 30 * 0.1 > gla_channel.SPAN_MAX  # the scaled gates (about -0.13 x 30 per token) pass it
    errors = interpreter_pool.apply_async(run_strong_gate, (STRONG[name],)).get(timeout=600)
    assert set(errors) >= {"o", "dq", "dk", "dv", "dg"}
    assert max(errors.values()) < TOL["float32"], errors


def test_triton_needs_cuda_or_the_interpreter():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="triton.*(CUDA|installed)"):
        gated_linear_attention(q, q, q, causal=True, backend="triton")


def test_auto_on_cpu_is_the_chunked_form():
    q = torch.randn(1, 8, 2, 16, dtype=torch.float64)
    o, _ = gated_linear_attention(q, q, q, causal=True, backend="auto")
    ref, _ = gated_linear_attention(q, q, q, causal=True, backend="chunked")
    assert torch.equal(o, ref)
