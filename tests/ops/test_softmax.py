import pytest
import torch

from seqmix.ops import softmax_attention
from seqmix.ops.softmax import softmax_attention_reference
from tests.helpers import rel_err


def qkv(B=2, T=9, S=9, H=2, K=8, V=6, dtype=torch.float64, grad=False):
    q, k, v = (torch.randn(B, n, H, d, dtype=dtype, requires_grad=grad) for n, d in ((T, K), (S, K), (S, V)))
    return q, k, v


def brute_force(q, k, v, allowed):
    """Per query, a softmax over the allowed keys only, written as plainly as possible."""
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(k.shape[1]) if allowed(b, i, j)]
                if not js:
                    continue
                w = torch.softmax(torch.stack([q[b, i, h] @ k[b, j, h] for j in js]) * K**-0.5, 0)
                o[b, i, h] = sum(wj * v[b, j, h] for wj, j in zip(w, js))
    return o


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 3), (False, 3)])
def test_reference_equals_brute_force(causal, window):
    q, k, v = qkv()
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, :3] = False

    def allowed(b, i, j):
        ok = bool(pad[b, j]) and (not causal or j <= i)
        if window is not None:
            ok = ok and ((i - j < window) if causal else abs(i - j) < window)
        return ok

    o = softmax_attention_reference(q, k, v, causal=causal, window=window, key_padding_mask=pad)
    assert rel_err(o, brute_force(q, k, v, allowed)) < 1e-12


@pytest.mark.parametrize("causal,T,S,window", [(True, 300, 300, 70), (True, 300, 300, 200), (False, 300, 300, 70),
                                               (False, 260, 300, 130), (False, 300, 140, 40),
                                               (True, 1500, 1500, 130), (False, 1500, 1400, 130)])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: CPU
def test_flex_window_band_spans_blocks(causal, T, S, window):
    """The sliding-window block mask built from its band of 128-token blocks, on lengths of several
    blocks and windows across block edges (forward: FlexAttention has no backward on the CPU)."""
    q, k, v = qkv(B=1, T=T, S=S, H=1, dtype=torch.float32)
    kw = dict(causal=causal, window=window)
    o = softmax_attention(q, k, v, backend="flex", **kw)
    assert rel_err(o, softmax_attention(q.double(), k.double(), v.double(), backend="reference", **kw)) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal,window,padded,S", [(False, None, False, 5), (True, None, False, 9), (True, None, True, 9),
                                                    (False, None, True, 5), (True, 4, False, 9), (False, 4, False, 9), (True, 4, True, 9)])
def test_fast_backends_equal_reference(backend, causal, window, padded, S):
    if backend == "flex" and (window is None or padded):
        pytest.skip("flex serves sliding windows without padding masks")
    grad = backend != "flex"  # FlexAttention has no backward on the CPU
    q, k, v = qkv(S=S, grad=grad)
    pad = None
    if padded:
        pad = torch.ones(2, S, dtype=torch.bool)
        pad[1, -2:] = False
        pad[0, :] = False  # a row with no key: output 0, gradients finite
    kw = dict(causal=causal, window=window, key_padding_mask=pad)
    o = softmax_attention(q, k, v, backend=backend, **kw)
    o_ref = softmax_attention(q, k, v, backend="reference", **kw)
    assert rel_err(o, o_ref) < 1e-10
    if grad:
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        grads_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v))
        for g, g_ref in zip(grads, grads_ref):
            assert torch.isfinite(g).all() and (g - g_ref).abs().max() < 1e-10
    if padded:
        assert o[0].abs().max() == 0


def test_causality():
    q, k, v = qkv()
    o = softmax_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:] += 1
    v2[:, 5:] += 1
    assert (softmax_attention(q, k2, v2, causal=True)[:, :5] - o[:, :5]).abs().max() < 1e-12


def test_gradcheck_reference():
    q, k, v = qkv(B=1, T=3, S=3, H=1, K=2, V=2, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: softmax_attention(q, k, v, causal=True, backend="reference"), (q, k, v))


def test_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        softmax_attention(q[0], k, v, causal=False)
    with pytest.raises(ValueError, match="head counts differ"):
        softmax_attention(q, k[:, :, :1], v, causal=False)
    with pytest.raises(TypeError, match="k has dtype torch.float32"):
        softmax_attention(q, k.float(), v, causal=False)
    with pytest.raises(ValueError, match="causal forms need aligned"):
        softmax_attention(q, k[:, :4], v[:, :4], causal=True)
    with pytest.raises(ValueError, match="must not be empty"):
        softmax_attention(q[:, :0], k, v, causal=False)
    with pytest.raises(ValueError, match="window must be a positive int"):
        softmax_attention(q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor of shape \\[2, 9\\]"):
        softmax_attention(q, k, v, causal=True, key_padding_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="backend 'nope'"):
        softmax_attention(q, k, v, causal=True, backend="nope")
    with pytest.raises(ValueError, match="no backward on the CPU"):
        softmax_attention(*qkv(grad=True), causal=True, window=3, backend="flex")
    with pytest.raises(TypeError, match="causal must be True or False"):
        softmax_attention(q, k, v, causal=None)
    huge = torch.zeros(1, 1, 1, 1, dtype=torch.float32).expand(1, 2**20, 16, 128)  # 2**31 elements, no memory
    with pytest.raises(ValueError, match="32-bit offsets"):
        softmax_attention(huge, huge, huge, causal=True, window=8, backend="flex")
