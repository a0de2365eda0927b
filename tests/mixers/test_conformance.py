"""The mixer protocol, checked over every registered mixer and each pattern it serves (float64, CPU)."""

import pytest
import torch

import seqmix
from seqmix import Pattern
from tests.helpers import rel_err

D_MODEL, HEADS, B, T, T_CTX = 8, 2, 2, 7, 5
# Small settings so that every mechanism shows at T = 7 (a window shorter than T, a small state).
TINY = {"local": {"window": 3}, "s4d": {"d_state": 4}}


def build(name: str, **options) -> seqmix.Mixer:
    torch.manual_seed(0)
    return seqmix.build_mixer(name, D_MODEL, HEADS, **{**TINY.get(name, {}), **options}).double()


def cases(patterns=tuple(Pattern)):
    return [
        pytest.param(name, p, id=f"{name}-{p.short}")
        for name in seqmix.list_mixers()
        for p in patterns
        if p in seqmix.mixers.mixer_class(name).patterns
    ]


def inputs(pattern: Pattern, t_ctx: int = T):
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    context = torch.randn(B, t_ctx, D_MODEL, dtype=torch.float64) if pattern.cross else None
    return x, context


def run(mixer, pattern, x, context, **kw):
    return mixer(x, context, causal=pattern.causal, **kw)


def test_registry_has_the_promised_mixers():
    promised = {"softmax", "local", "linear", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "s4d", "mamba", "hyena"}
    assert promised <= set(seqmix.list_mixers())


@pytest.mark.parametrize("pattern", list(Pattern), ids=lambda p: p.short)
def test_pattern_coverage(pattern):
    served = [n for n in seqmix.list_mixers() if pattern in seqmix.mixers.mixer_class(n).patterns]
    assert len(served) >= (8 if pattern.causal else 6), served


@pytest.mark.parametrize("name,pattern", cases())
def test_shape_and_gradients(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T)
    x.requires_grad_(True)
    y = run(mixer, pattern, x, context)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,pattern", cases())
def test_bf16_autocast_forward_and_backward(name, pattern):
    """Under autocast some features come out of projections in bf16 and others (softplus, sigmoid)
    in float32: the mixer must hand its op one dtype."""
    mixer = build(name).float()
    x, context = (None if t is None else t.float() for t in inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T))
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(mixer, pattern, x, context)
    y.float().square().sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name,pattern", cases())
def test_bf16_weights_forward_matches_float32(name, pattern):
    """A mixer cast to bf16 (as the profiler runs it) computes what its float32 original does, to bf16 precision."""
    mixer = build(name).float()
    x, context = (None if t is None else t.float() for t in inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T))
    expected = run(mixer, pattern, x, context)
    y = run(mixer.to(torch.bfloat16), pattern, x.bfloat16(), None if context is None else context.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), expected) < 5e-2


@pytest.mark.parametrize("name,pattern", cases([Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS]))
@pytest.mark.parametrize("t", [0, 3])
def test_causality(name, pattern, t):
    mixer = build(name)
    x, context = inputs(pattern)
    y = run(mixer, pattern, x, context)
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    context2 = None
    if context is not None:
        context2 = context.clone()
        context2[:, t + 1 :] += torch.randn_like(context2[:, t + 1 :])
    y2 = run(mixer, pattern, x2, context2)
    assert (y2[:, : t + 1] - y[:, : t + 1]).abs().max() < 1e-12
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6


@pytest.mark.parametrize("name,pattern", cases([Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS]))
def test_noncausal_sees_the_future(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern)
    y = run(mixer, pattern, x, context)
    if context is None:
        x2 = x.clone()
        x2[:, 1] += 1.0  # the near future, inside any window
        y2 = run(mixer, pattern, x2, None)
    else:
        context2 = context.clone()
        context2[:, -1] += 1.0
        y2 = run(mixer, pattern, x, context2)
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-8


@pytest.mark.parametrize("name,pattern", cases([Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS]))
def test_cross_query_is_local(name, pattern):
    """In the cross patterns ``y_i`` depends on ``x_i`` and the context only."""
    mixer = build(name)
    x, context = inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T)
    y = run(mixer, pattern, x, context)
    x2 = x.clone()
    x2[:, 2] += 1.0
    y2 = run(mixer, pattern, x2, context)
    changed = (y2 - y).abs().amax(dim=(0, 2)) > 1e-12
    assert changed.tolist() == [i == 2 for i in range(T)]


@pytest.mark.parametrize("name", [n for n in seqmix.list_mixers() if Pattern.CAUSAL_CROSS in seqmix.mixers.mixer_class(n).patterns])
def test_causal_cross_needs_aligned_lengths(name):
    mixer = build(name)
    x, context = inputs(Pattern.CAUSAL_CROSS, T_CTX)
    with pytest.raises(ValueError, match="aligned"):
        mixer(x, context, causal=True)


@pytest.mark.parametrize("name,pattern", cases())
def test_padding_changes_no_real_output(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False  # right padding
    mask[1, :2] = False  # left padding
    kw = {"mask": mask}
    if context is not None:
        context_mask = torch.ones(B, context.shape[1], dtype=torch.bool)
        context_mask[0, -1:] = False
        context_mask[1, :1] = False
        if pattern.causal:
            context_mask = mask
        kw["context_mask"] = context_mask
    y = run(mixer, pattern, x, context, **kw)
    x2 = x + 10 * torch.randn_like(x) * (~mask)[..., None]
    context2 = None if context is None else context + 10 * torch.randn_like(context) * (~kw["context_mask"])[..., None]
    y2 = run(mixer, pattern, x2, context2, **kw)
    assert (y2 - y)[mask].abs().max() < 1e-10


@pytest.mark.parametrize("name,pattern", cases([Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS]))
def test_step_equals_forward(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern)
    y = run(mixer, pattern, x, context)
    state = mixer.init_state(B)
    for t in range(T):
        y_t, state = mixer.step(x[:, t], state, context_t=None if context is None else context[:, t])
        assert rel_err(y_t, y[:, t]) < 1e-10, t


@pytest.mark.parametrize("name,pattern", cases([Pattern.NONCAUSAL_CROSS]))
def test_step_over_a_fixed_context_equals_forward(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern, T_CTX)
    y = run(mixer, pattern, x, context)
    state = mixer.init_state(B, context=context)
    for t in range(T):
        y_t, state = mixer.step(x[:, t], state)
        assert rel_err(y_t, y[:, t]) < 1e-10, t


@pytest.mark.parametrize("name,pattern", cases([Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS]))
def test_split_with_carried_state_equals_whole(name, pattern):
    mixer = build(name)
    x, context = inputs(pattern)
    y = run(mixer, pattern, x, context)
    half = T // 2
    ctx = (None, None) if context is None else (context[:, :half], context[:, half:])
    y1, state = mixer.prefill(x[:, :half], mixer.init_state(B), context=ctx[0])
    y2, state = mixer.prefill(x[:, half:], state, context=ctx[1])
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-10


@pytest.mark.parametrize("name", [n for n in seqmix.list_mixers() if {Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS} <= seqmix.mixers.mixer_class(n).patterns])
def test_prefill_refuses_a_noncausal_cross_state(name):
    mixer = build(name)
    x, context = inputs(Pattern.NONCAUSAL_CROSS, T_CTX)
    with pytest.raises(ValueError, match="prefill continues a causal state"):
        mixer.prefill(x, mixer.init_state(B, context=context))


@pytest.mark.parametrize("name", [n for n in seqmix.list_mixers() if Pattern.CAUSAL_SELF in seqmix.mixers.mixer_class(n).patterns])
def test_state_size_counts_the_state_held(name):
    mixer = build(name)
    x, _ = inputs(Pattern.CAUSAL_SELF)
    state = mixer.init_state(1)
    for t in range(T):
        _, state = mixer.step(x[:1, t], state)
    held = sum(v.numel() * (2 if v.is_complex() else 1) for v in _tensors(state))
    assert held == mixer.state_size(T)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _tensors(v)


@pytest.mark.parametrize("name,pattern", cases())
def test_reference_backend_gradcheck(name, pattern):
    mixer = build(name, backend="reference")
    x, context = inputs(pattern, T_CTX if pattern is Pattern.NONCAUSAL_CROSS else T)
    x = x[:1, :4].requires_grad_(True)
    context = None if context is None else context[:1, :4]
    assert torch.autograd.gradcheck(lambda x: run(mixer, pattern, x, context), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", seqmix.list_mixers())
def test_unserved_pattern_and_bad_input_raise_clearly(name):
    mixer = build(name)
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    for p in set(Pattern) - mixer.patterns:
        context = torch.randn(B, T, D_MODEL, dtype=torch.float64) if p.cross else None
        with pytest.raises(ValueError, match=rf"{name}.*{p.value}.*serves"):
            mixer(x, context, causal=p.causal)
    p = next(iter(mixer.patterns))
    context = x if p.cross else None
    with pytest.raises(ValueError, match=r"x must have shape \[batch, time, 8\]"):
        mixer(x[..., :4], context, causal=p.causal)
    with pytest.raises(ValueError, match="x must not be empty"):
        mixer(x[:, :0], context, causal=p.causal)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        mixer(x, context, causal=p.causal, mask=torch.ones(B, T))
    if p.cross:
        with pytest.raises(ValueError, match="context has batch"):
            mixer(x, x[:1], causal=p.causal)
        with pytest.raises(ValueError, match="context is torch.float32"):
            mixer(x, x.float(), causal=p.causal)
    with pytest.raises(TypeError, match="takes no option"):
        seqmix.build_mixer(name, D_MODEL, HEADS, no_such_option=1)


def test_unknown_mixer_lists_what_exists():
    with pytest.raises(ValueError, match="registered mixers: .*softmax"):
        seqmix.build_mixer("nope", 8)
